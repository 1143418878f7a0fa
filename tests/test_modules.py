"""The module-kind table and the rank layout: consistent with the naming tables, the model's shapes and
the ParallelSpec rules they bind (the planner / pool / validation tests check what reads them)."""

from __future__ import annotations

import dataclasses

import pytest

from tp_lora.errors import LayoutError
from tp_lora.format.modules import MODULES, POOL_MODULES, SOURCES, TP, Scope
from tp_lora.format.naming import FAMILY_TABLES
from tp_lora.plan.layout import RankLayout
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec

PRESETS = ("tiny-dense", "tiny-moe", "tiny-qwen2-moe")


def test_every_name_the_reader_yields_is_a_source_of_the_table():
    for fam, table in FAMILY_TABLES.items():
        for canonical in [*table.layer_modules.values(), *table.expert_names.values()]:
            assert canonical in SOURCES, (fam, canonical)
    assert {"embed", "lm_head", "experts.gate_up", "experts.down"} <= set(SOURCES)
    for src in SOURCES.values():  # members share kind, scope and input dimension
        kinds = [MODULES[m] for m in src.members]
        assert len({(k.tp, k.scope, k.in_dim) for k in kinds}) == 1, src
    assert POOL_MODULES == tuple(MODULES) and len(set(POOL_MODULES)) == len(POOL_MODULES)


@pytest.mark.parametrize("preset", PRESETS)
def test_scopes_follow_the_model(preset):
    m = ModelSpec.from_preset(preset)
    for layer in range(m.num_hidden_layers):
        assert m.has_scope(Scope.EXPERTS, layer) == m.is_moe_layer(layer)
        assert m.has_scope(Scope.DENSE_MLP, layer) == (not m.is_moe_layer(layer))
        assert m.has_scope(Scope.SHARED_EXPERT, layer) == m.has_shared_expert(layer)
    assert m.linear_shape("qkv") == (m.q_size + 2 * m.kv_size, m.hidden_size)
    assert m.linear_shape("gate_up") == (2 * m.intermediate_size, m.hidden_size)
    assert m.linear_shape("embed") == (m.hidden_size, m.vocab_size)  # embedding LoRA: "in" is the vocab
    for name, kind in MODULES.items():
        out, inp = m.linear_shape(name)
        assert (out, inp) == (m.dim(kind.out_dim), m.dim(kind.in_dim))
        assert kind.split_dim == (kind.out_dim if kind.tp in (TP.COLUMN, TP.VOCAB_COLUMN) else kind.in_dim)


@pytest.mark.parametrize("preset,tp,ep", [("tiny-dense", 4, 1), ("tiny-moe", 4, 2), ("tiny-moe", 2, 2),
                                          ("tiny-qwen2-moe", 2, 1)])
def test_layout_binds_the_parallel_rules_once(preset, tp, ep):
    m = ModelSpec.from_preset(preset)
    for p in ParallelSpec(tp_size=tp, ep_size=ep).all_ranks():
        lay = RankLayout(m, p)
        assert RankLayout.of(m, lay) is lay and RankLayout.of(m, p) == lay
        assert (lay.heads, lay.kv_heads, lay.vocab_range, lay.vocab_per_rank) == (
            p.heads_range(m), p.kv_heads_range(m), p.vocab_range(m), p.vocab_per_rank(m))
        assert lay.local_experts == (p.local_experts(m) if m.is_moe else range(0))
        assert lay.span("q") == (p.heads_range(m).start * m.head_dim, p.heads_range(m).stop * m.head_dim)
        assert lay.span("intermediate") == p.shard(m.intermediate_size, tp, p.tp_rank)
        assert lay.local("vocab") == p.vocab_per_rank(m)
        assert lay.local("moe") == (m.moe_intermediate_size // p.moe_tp_size if m.is_moe else 0)


def test_layout_refuses_illegal_and_mismatched_layouts():
    m = ModelSpec.from_preset("tiny-dense")
    with pytest.raises(LayoutError, match="not divisible"):
        RankLayout(m, ParallelSpec(tp_size=3))
    other = dataclasses.replace(m, name="other", num_hidden_layers=3)
    with pytest.raises(LayoutError, match="layout of model 'tiny-dense' used for model 'other'"):
        RankLayout.of(other, RankLayout(m, ParallelSpec()))

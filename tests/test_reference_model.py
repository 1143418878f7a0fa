"""The reference TP/EP model against Hugging Face ``transformers`` on real gloo process groups.

Two checks per layout, on a flattened batch of 3 sequences of different lengths:
- base parity: TPModel logits == HF logits of the same ``save_pretrained`` checkpoint;
- call-site parity: a fake ``lora`` that adds full-rank weight deltas through the layer-op contract
  (each rank adding only its slice) gives HF's logits with the deltas merged into the weights. That pins
  down what every call site passes (pre-activation outputs, pre-reduce partials, global token ids, routed
  rows before the routing weight), not just that it is called.

One spawn per world size runs every layout of that size, to keep process start-up off the clock.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from support.distributed import DistributedTestError, run_distributed
from safetensors import safe_open
from safetensors.torch import save_file

from tp_lora.errors import ConfigError, LayoutError
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.reference import TPModel, hf_config_dict, write_random_checkpoint

LENS = [5, 11, 8]
TOL = 1e-4   # max abs error relative to max(1, max |logit|)
DELTA_STD = 0.05


def _variant(preset: str, **changes: Any) -> ModelSpec:
    d = ModelSpec.from_preset(preset).to_dict()
    d.update(changes)
    return ModelSpec.from_dict(d)


VARIANTS: dict[str, ModelSpec] = {
    "llama": ModelSpec.from_preset("tiny-dense"),
    # Qwen3 dense: q/k norm, tied embeddings, biases on q/k/v and o (row bias after the all-reduce)
    "qwen3-tied": _variant("tiny-dense", name="tiny-qwen3", family="qwen3", qk_norm=True,
                           tie_word_embeddings=True, attention_bias=True),
    "qwen2": _variant("tiny-dense", name="tiny-qwen2", family="qwen2", attention_bias=True),
    "qwen3-moe": ModelSpec.from_preset("tiny-moe"),
    # a dense layer between MoE layers, and the shared expert
    "qwen2-moe": _variant("tiny-qwen2-moe", num_hidden_layers=3, mlp_only_layers=(1,)),
    "mixtral": _variant("tiny-moe", name="tiny-mixtral", family="mixtral", qk_norm=False,
                        intermediate_size=32),
}
FUSED = "qwen3-moe-fused"   # same weights as qwen3-moe, experts stored as transformers-5 fused 3-D params


def _spec_of(variant: str) -> ModelSpec:
    return VARIANTS["qwen3-moe" if variant == FUSED else variant]


# (variant, tp, ep) per world size
LAYOUTS: dict[int, list[tuple[str, int]]] = {
    1: [(v, 1) for v in [*VARIANTS, FUSED]],
    2: [("llama", 1), ("qwen3-tied", 1), ("qwen2", 1), ("qwen3-moe", 1), ("qwen3-moe", 2), (FUSED, 1),
        ("qwen2-moe", 2), ("mixtral", 2)],
    # tiny presets have 2 kv heads: tp=4 replicates each kv head on 2 ranks
    4: [("llama", 1), ("qwen3-tied", 1), ("qwen2", 1), ("qwen3-moe", 1), ("qwen3-moe", 2),
        ("qwen3-moe", 4), (FUSED, 2), ("qwen2-moe", 1), ("qwen2-moe", 4), ("mixtral", 4)],
}


# -- the batch and the deltas ------------------------------------------------------------------------
def _batch(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (sum(LENS),), generator=g)
    ids[0], ids[1] = spec.vocab_size - 1, 0   # both ends of the vocabulary: first and last rank's rows
    pos = torch.cat([torch.arange(n) for n in LENS])
    return ids, pos


def _lora_modules(spec: ModelSpec, layer: int) -> list[str]:
    mods = ["q", "k", "v", "o"]
    if spec.is_moe_layer(layer):
        mods += ["router", "experts.w1", "experts.w3", "experts.w2"]
        if spec.has_shared_expert(layer):
            mods += ["shared.gate", "shared.up", "shared.down", "shared_gate"]
    else:
        mods += ["gate", "up", "down"]
    return mods


def _deltas(spec: ModelSpec) -> dict[tuple, torch.Tensor]:
    """Full-size weight deltas keyed (layer, module) or (layer, module, expert); embed/lm_head at layer 0."""
    g = torch.Generator().manual_seed(2)
    rnd = lambda shape: torch.randn(shape, generator=g) * DELTA_STD  # noqa: E731
    d: dict[tuple, torch.Tensor] = {}
    for i in range(spec.num_hidden_layers):
        for m in _lora_modules(spec, i):
            out_f, in_f = spec.linear_shape(m, i)
            if m.startswith("experts."):
                for e in range(spec.num_experts):
                    d[(i, m, e)] = rnd((out_f, in_f))
            else:
                d[(i, m)] = rnd((out_f, in_f))
    d[(0, "embed")] = rnd((spec.vocab_size, spec.hidden_size))
    # tied: HF has one matrix for both, so the lm_head delta is the embedding delta
    d[(0, "lm_head")] = d[(0, "embed")] if spec.tie_word_embeddings else rnd((spec.vocab_size, spec.hidden_size))
    return d


@torch.no_grad()
def _merge_into_hf(model: Any, spec: ModelSpec, deltas: dict[tuple, torch.Tensor]) -> None:
    attn_names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    mlp_names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    im = spec.moe_intermediate_size
    for key, dw in deltas.items():
        layer, module = key[0], key[1]
        if module == "embed":
            model.model.embed_tokens.weight += dw
            continue
        if module == "lm_head":
            if not spec.tie_word_embeddings:
                model.lm_head.weight += dw
            continue
        blk = model.model.layers[layer]
        if module in attn_names:
            getattr(blk.self_attn, attn_names[module]).weight += dw
        elif module in mlp_names:
            getattr(blk.mlp, mlp_names[module]).weight += dw
        elif module == "router":       # the routing logits (transformers 5: a TopKRouter's weight)
            blk.mlp.gate.weight += dw
        elif module == "shared_gate":
            blk.mlp.shared_expert_gate.weight += dw
        elif module.startswith("shared."):
            getattr(blk.mlp.shared_expert, mlp_names[module[7:]]).weight += dw
        else:
            e, ex = key[2], blk.mlp.experts
            if module == "experts.w1":
                ex.gate_up_proj[e, :im] += dw
            elif module == "experts.w3":
                ex.gate_up_proj[e, im:] += dw
            else:
                ex.down_proj[e] += dw


class DeltaLoRA:
    """A fake ``lora``: adds this rank's slice of full weight deltas, asserting shapes, logging calls."""

    def __init__(self, spec: ModelSpec, parallel: ParallelSpec, deltas: dict[tuple, torch.Tensor]):
        self.spec, self.p, self.d = spec, parallel, deltas
        self.calls: list[tuple] = []
        self.T = sum(LENS)

    def _out_rows(self, module: str) -> tuple[int, int]:
        s, p, hd = self.spec, self.p, self.spec.head_dim
        if module == "q":
            r = p.heads_range(s)
            return r.start * hd, r.stop * hd
        if module in ("k", "v"):
            r = p.kv_heads_range(s)
            return r.start * hd, r.stop * hd
        if module in ("gate", "up", "down"):
            return p.shard(s.intermediate_size, p.tp_size, p.tp_rank)
        if module.startswith("shared."):
            return p.shard(s.shared_expert_intermediate_size, p.tp_size, p.tp_rank)
        if module in ("o",):
            return self._out_rows("q")
        if module.startswith("experts."):
            return p.shard(s.moe_intermediate_size, p.moe_tp_size, p.moe_tp_rank)
        if module == "lm_head":
            return p.vocab_range(s)
        if module in ("router", "shared_gate"):   # replicated: the whole output on every rank
            return 0, s.num_experts if module == "router" else 1
        raise AssertionError(module)

    def column(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        a, b = self._out_rows(module)
        width = self.p.vocab_per_rank(self.spec) if module == "lm_head" else b - a
        assert x.shape == (self.T, self.spec.hidden_size), (module, x.shape)
        assert out.shape == (self.T, width), (module, out.shape, width)
        self.calls.append(("column", layer, module, None, tuple(x.shape), tuple(out.shape)))
        out[:, : b - a] += x @ self.d[(layer, module)][a:b].T

    def row(self, layer: int, module: str, x_local: torch.Tensor, out: torch.Tensor) -> None:
        a, b = self._out_rows(module)
        assert x_local.shape == (self.T, b - a), (module, x_local.shape)
        assert out.shape == (self.T, self.spec.hidden_size), (module, out.shape)
        self.calls.append(("row", layer, module, None, tuple(x_local.shape), tuple(out.shape)))
        out += x_local @ self.d[(layer, module)][:, a:b].T

    def embedding(self, token_ids: torch.Tensor, out: torch.Tensor) -> None:
        assert token_ids.shape == (self.T,) and out.shape == (self.T, self.spec.hidden_size)
        self.calls.append(("embedding", 0, "embed", None, tuple(token_ids.shape), tuple(out.shape)))
        a, b = self.p.vocab_range(self.spec)
        mine = (token_ids >= a) & (token_ids < b)
        out[mine] += self.d[(0, "embed")][token_ids[mine]]

    def _expert(self, kind: str, layer: int, module: str, expert: int, x: torch.Tensor,
                token_index: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        assert expert in self.p.local_experts(self.spec), (expert, self.p)
        n = x.shape[0]
        assert n > 0 and token_index.shape == (n,) and token_index.dtype == torch.long
        assert int(token_index.min()) >= 0 and int(token_index.max()) < self.T
        self.calls.append((kind, layer, module, expert, tuple(x.shape), tuple(out.shape)))
        return self._out_rows(module)

    def expert_column(self, layer: int, module: str, expert: int, x: torch.Tensor,
                      token_index: torch.Tensor, out: torch.Tensor) -> None:
        a, b = self._expert("expert_column", layer, module, expert, x, token_index, out)
        assert x.shape[1] == self.spec.hidden_size and out.shape == (x.shape[0], b - a)
        out += x @ self.d[(layer, module, expert)][a:b].T

    def expert_row(self, layer: int, module: str, expert: int, x: torch.Tensor,
                   token_index: torch.Tensor, out: torch.Tensor) -> None:
        a, b = self._expert("expert_row", layer, module, expert, x, token_index, out)
        assert x.shape[1] == b - a and out.shape == (x.shape[0], self.spec.hidden_size)
        out += x @ self.d[(layer, module, expert)][:, a:b].T


# -- the per-rank work -------------------------------------------------------------------------------
def _run_layouts(rank: int, world: int, jobs: list[tuple[str, int, str]]) -> dict[tuple[str, int], Any]:
    """On one rank: load each (variant, ep, folder) at tp=world, run the batch plain and with DeltaLoRA."""
    import torch.distributed as dist
    group = dist.group.WORLD if world > 1 else None
    res = {}
    for variant, ep, folder in jobs:
        spec = _spec_of(variant)
        par = ParallelSpec(tp_size=world, tp_rank=rank, ep_size=ep)
        model = TPModel.from_pretrained(folder, par, group, spec=spec)
        ids, pos = _batch(spec)
        base = model(ids, pos, LENS)
        fake = DeltaLoRA(spec, par, _deltas(spec))
        merged = model(ids, pos, LENS, lora=fake)
        res[(variant, ep)] = (base, merged, fake.calls)
    return res


# -- fixtures: HF models, checkpoints, references -----------------------------------------------------
def _hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    outs, start = [], 0
    with torch.no_grad():
        for n in LENS:
            outs.append(model(input_ids=ids[None, start:start + n]).logits[0])
            start += n
    return torch.cat(outs)


def _fuse_experts(src: Path, dst: Path, spec: ModelSpec) -> None:
    """Rewrite a per-expert checkpoint in the transformers-5 fused layout (gate_up [E,2I,H], down [E,H,I])."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        for k in keys:
            if ".experts." not in k:
                out[k] = f.get_tensor(k)
        for i in range(spec.num_hidden_layers):
            p = f"model.layers.{i}.mlp.experts."
            if p + "0.gate_proj.weight" not in keys:
                continue
            E = spec.num_experts
            out[p + "gate_up_proj"] = torch.stack([
                torch.cat([f.get_tensor(f"{p}{e}.gate_proj.weight"), f.get_tensor(f"{p}{e}.up_proj.weight")])
                for e in range(E)])
            out[p + "down_proj"] = torch.stack([f.get_tensor(f"{p}{e}.down_proj.weight") for e in range(E)])
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per variant: its checkpoint folder and HF's logits without and with merged deltas."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("ckpt")
    out: dict[str, Any] = {}
    for variant, spec in VARIANTS.items():
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(**hf_config_dict(spec), initializer_range=0.05)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        folder = root / variant
        model.save_pretrained(folder)
        ids, _ = _batch(spec)
        base = _hf_logits(model, ids)
        _merge_into_hf(model, spec, _deltas(spec))
        out[variant] = (folder, base, _hf_logits(model, ids))
    _fuse_experts(root / "qwen3-moe", root / FUSED, VARIANTS["qwen3-moe"])
    folder, base, merged = out["qwen3-moe"]
    out[FUSED] = (root / FUSED, base, merged)
    return out


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))


@pytest.fixture(scope="module")
def runs(checkpoints: dict[str, Any]) -> dict[int, list[dict]]:
    """world size -> each rank's results for every layout of that size (one spawn per world size)."""
    got: dict[int, list[dict]] = {}
    for world, layouts in LAYOUTS.items():
        jobs = [(v, ep, str(checkpoints[v][0])) for v, ep in layouts]
        got[world] = ([_run_layouts(0, 1, jobs)] if world == 1
                      else run_distributed(_run_layouts, world, jobs, timeout=120))
    return got


ALL = [(w, v, ep) for w, ls in LAYOUTS.items() for v, ep in ls]


def _expected_sites(spec: ModelSpec) -> set[tuple]:
    sites = {("embedding", 0, "embed"), ("column", 0, "lm_head")}
    for i in range(spec.num_hidden_layers):
        for m in _lora_modules(spec, i):
            kind = ("row" if m in ("o", "down", "shared.down") else
                    "expert_row" if m == "experts.w2" else
                    "expert_column" if m.startswith("experts.") else "column")
            sites.add((kind, i, m))
    return sites


@pytest.mark.parametrize("world,variant,ep", ALL, ids=[f"tp{w}-ep{ep}-{v}" for w, v, ep in ALL])
def test_logits_match_hf(runs: dict, checkpoints: dict, world: int, variant: str, ep: int) -> None:
    _, ref_base, ref_merged = checkpoints[variant]
    spec = _spec_of(variant)
    ranks = [r[(variant, ep)] for r in runs[world]]
    base0, merged0, _ = ranks[0]
    for rank, (base, merged, _) in enumerate(ranks):   # every rank ends with the same full logits
        assert torch.equal(base, base0) and torch.equal(merged, merged0), f"rank {rank} differs from rank 0"
    e_base, e_merged = _err(base0, ref_base), _err(merged0, ref_merged)
    assert e_base < TOL, f"base logits: max rel err {e_base:.2e}"
    assert e_merged < TOL, f"merged-delta logits: max rel err {e_merged:.2e}"
    # the deltas matter: without the LoRA path the merged reference is far away
    assert _err(base0, ref_merged) > 100 * TOL

    seen_experts: dict[int, set[int]] = {}
    all_sites: set[tuple] = set()
    expected = _expected_sites(spec)
    for rank, (_, _, calls) in enumerate(ranks):
        sites = {(k, layer, m) for k, layer, m, *_ in calls}
        # a rank whose local experts got no token of a layer makes no expert call there
        assert {x for x in expected if not x[0].startswith("expert")} <= sites <= expected, f"rank {rank}"
        all_sites |= sites
        assert calls[0][0] == "embedding" and calls[-1][2] == "lm_head"
        for k, layer, m, e, _, _ in calls:
            if e is not None:
                seen_experts.setdefault(layer, set()).add(e)
    assert all_sites == expected
    # every routed expert runs somewhere (EP ranks split them); with top-2 of 8 over 24 tokens, most do
    for layer, es in seen_experts.items():
        assert len(es) >= spec.num_experts_per_tok, (layer, es)


def test_expert_calls_are_grouped_per_expert(runs: dict) -> None:
    """w1, w3 then w2 of one expert, with the same routed rows, before the next expert."""
    calls = runs[2][0][("qwen3-moe", 1)][2]
    ex = [c for c in calls if c[3] is not None]
    for j in range(0, len(ex), 3):
        (_, _, m1, e1, x1, _), (_, _, m3, e3, x3, _), (_, _, m2, e2, x2, o2) = ex[j:j + 3]
        assert (m1, m3, m2) == ("experts.w1", "experts.w3", "experts.w2") and e1 == e3 == e2
        assert x1 == x3 and x2[0] == x1[0] and o2 == x1


# -- single-process checks -----------------------------------------------------------------------------
def test_tp_without_group_raises() -> None:
    with pytest.raises(LayoutError, match="process group"):
        TPModel(VARIANTS["llama"], ParallelSpec(tp_size=2, tp_rank=0))


def test_shape_mismatch_names_tensor(tmp_path: Path) -> None:
    spec = VARIANTS["llama"]
    write_random_checkpoint(spec, tmp_path)
    wrong = _variant("tiny-dense", intermediate_size=64)
    with pytest.raises(ConfigError, match=r"mlp\.gate_proj\.weight.*\[128, 64\].*\[64, 64\]"):
        TPModel.from_pretrained(tmp_path, ParallelSpec(), spec=wrong)


@pytest.mark.parametrize("variant", ["llama", "qwen2-moe", "mixtral"])
def test_random_checkpoint_loads_in_transformers(tmp_path: Path, variant: str) -> None:
    """write_random_checkpoint uses HF's names: transformers loads it and agrees with TPModel."""
    transformers = pytest.importorskip("transformers")
    spec = VARIANTS[variant]
    write_random_checkpoint(spec, tmp_path, seed=3, std=0.05)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == spec.family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, pos = _batch(spec)
    model = TPModel.from_pretrained(tmp_path, ParallelSpec())   # spec from config.json
    assert dataclasses.replace(model.spec, name=spec.name) == spec
    ours = model(ids, pos, LENS)
    assert _err(ours, _hf_logits(hf, ids)) < TOL


def test_run_distributed_reports_failing_rank() -> None:
    with pytest.raises(DistributedTestError, match="boom on rank 1") as info:
        run_distributed(_fail_on_rank_1, 2, timeout=60)
    assert info.value.rank == 1


def _fail_on_rank_1(rank: int, world: int) -> int:
    import torch.distributed as dist
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()   # rank 0 would wait forever: run_distributed must kill it, not hang
    return rank

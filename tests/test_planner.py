"""The key property test of the planner (``plan_rank``).

For many layouts (tp in 1, 2, 4, 8; ep in 1, 2, 4 with ep | tp; MoE-TP with ep < tp and pure EP with
ep == tp), many models (presets, variants with 8 or 16 heads so that tp=8 is legal, kv replication with
tp > kv heads, HF-config-derived models, empty vocab ranges) and many adapters (real ``peft``
``save_pretrained`` of tiny ``transformers`` models, synthetic per-expert / fused-expert / merged
qkv+gate_up / rank_pattern / alpha_pattern / rsLoRA adapters) we apply every rank's SliceOps to the real
tensor bytes and check:

(i)   the union over ranks covers every element of every source tensor;
(ii)  every rank holds exactly what an INDEPENDENT reference of the TP rule says (tests/support/tp_reference.py, from
      the ModelSpec numbers only: head ownership, kv replication, vLLM/SGLang vocab padding, contiguous
      expert blocks, MoE-TP slices, peft's fused-expert interleave ``A row e*r+j``, ``B column j*E+e``),
      at the destination (module, side, layer, local expert) and under the canonical name;
(iii) experts that are not local to a rank never appear in its plan;
(iv)  per-rank planned bytes equal a closed-form formula of the shapes;
(v)   ``chunks()``: every op in exactly one chunk, in plan order, offsets aligned to the element size
      (no padding at all for a single-dtype adapter) and non-overlapping,
      CopyGroups covering every op once with consecutive flat indices and back-to-back bytes.

A second check multiplies each rank's slices back together and compares with peft's own
``get_delta_weight`` (ParamWrapper for fused experts, Linear, Embedding): the interleave and the scalings
are checked against peft's math, not against our reading of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tp_lora.format.adapter import AdapterHeader
from tp_lora.plan.validate import AdapterSource
from tp_lora.errors import LayoutError
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.plan.planner import SlicePlan, plan_rank
from tp_lora.job.synthetic import write_synthetic_adapter

from support.tp_reference import VOCAB_PAD, RefRank

ALL_LAYOUTS = [(tp, ep) for tp in (1, 2, 4, 8) for ep in (1, 2, 4) if tp % ep == 0]
CHUNK_SIZES = (1, 100, 4096, 1 << 30)
TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_TMP = tempfile.TemporaryDirectory(prefix="tp_lora_test_planner_")  # removed when the session ends


def canonical(module: str, side: str, layer: int, expert: int | None) -> str:
    base = f"{module}.{side}" if module in ("embed", "lm_head") else f"layers.{layer}.{module}.{side}"
    return base if expert is None else f"{base}#expert{expert}"


Held = dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]  # canonical -> (tensor, rows, cols)


def reference_holdings(header: AdapterHeader, ref: RefRank) -> Held:
    """What rank ``ref.rank`` must hold: canonical destination -> (source key, global rows, global cols)."""
    m = ref.model
    out: Held = {}

    def put(module: str, side: str, layer: int, tensor: str, rows: list[int], cols: list[int],
            expert: int | None = None) -> None:
        if rows and cols:  # an empty slice carries nothing
            layer = 0 if module in ("embed", "lm_head") else layer
            key = canonical(module, side, layer, expert)
            assert key not in out, key
            out[key] = (tensor, tuple(rows), tuple(cols))

    for t in header.targets:
        A, B, L = t.A, t.B, t.layer
        a_rows, a_cols = list(range(A.shape[0])), list(range(A.shape[1]))
        b_rows, b_cols = list(range(B.shape[0])), list(range(B.shape[1]))

        def column(module: str, rows: list[int], offset: int = 0, expert: int | None = None) -> None:
            put(module, "A", L, A.key, a_rows, a_cols, expert)
            put(module, "B", L, B.key, [offset + g for g in rows], b_cols, expert)

        def row(module: str, cols: list[int], expert: int | None = None) -> None:
            put(module, "A", L, A.key, a_rows, cols, expert)
            put(module, "B", L, B.key, b_rows, b_cols, expert)

        mod = t.module
        if mod == "q":
            column("q", ref.q_rows())
        elif mod in ("k", "v"):
            column(mod, ref.kv_rows())
        elif mod == "qkv":
            column("q", ref.q_rows())
            column("k", ref.kv_rows(), m.q_size)
            column("v", ref.kv_rows(), m.q_size + m.kv_size)
        elif mod == "o":
            row("o", ref.q_rows())
        elif mod in ("gate", "up"):
            column(mod, ref.tp_split(m.intermediate_size))
        elif mod == "gate_up":
            column("gate", ref.tp_split(m.intermediate_size))
            column("up", ref.tp_split(m.intermediate_size), m.intermediate_size)
        elif mod == "down":
            row("down", ref.tp_split(m.intermediate_size))
        elif mod in ("shared.gate", "shared.up"):
            column(mod, ref.tp_split(m.shared_expert_intermediate_size))
        elif mod == "shared.down":
            row(mod, ref.tp_split(m.shared_expert_intermediate_size))
        elif mod in ("experts.w1", "experts.w3"):
            if t.expert in ref.local_experts():
                column(mod, ref.moe_split(), expert=t.expert)
        elif mod == "experts.w2":
            if t.expert in ref.local_experts():
                row(mod, ref.moe_split(), expert=t.expert)
        elif mod in ("experts.gate_up", "experts.down"):
            # peft ParamWrapper: A reshaped (E, r, in) -> row e*r+j; B reshaped (out, r, E) -> column j*E+e
            E, r = m.num_experts, A.shape[0] // m.num_experts
            assert B.shape[1] == E * r
            for e in ref.local_experts():
                e_rows = [e * r + j for j in range(r)]
                e_cols = [j * E + e for j in range(r)]
                if mod == "experts.gate_up":  # gate rows [0, I), up rows [I, 2I) of the fused parameter
                    for name, off in (("experts.w1", 0), ("experts.w3", m.moe_intermediate_size)):
                        put(name, "A", L, A.key, e_rows, a_cols, e)
                        put(name, "B", L, B.key, [off + g for g in ref.moe_split()], e_cols, e)
                else:
                    put("experts.w2", "A", L, A.key, e_rows, ref.moe_split(), e)
                    put("experts.w2", "B", L, B.key, b_rows, e_cols, e)
        elif mod == "embed":  # A is [r, vocab]: this rank's vocabulary columns
            row("embed", ref.vocab_rows())
        elif mod == "lm_head":
            column("lm_head", ref.vocab_rows())
        else:
            raise AssertionError(f"reference has no rule for {mod}")
    return out


def reference_bytes(header: AdapterHeader, ref: RefRank) -> int:
    """Closed form of the bytes a rank plans (independent of the index lists above)."""
    m = ref.model
    h, tp = m.hidden_size, ref.tp
    q_loc = m.q_size // tp
    kv_loc = m.head_dim * (m.num_key_value_heads // tp if tp <= m.num_key_value_heads else 1)
    i_loc = m.intermediate_size // tp
    s_loc = m.shared_expert_intermediate_size // tp
    im_loc = m.moe_intermediate_size // ref.moe_tp
    n_local = m.num_experts // ref.ep if m.is_moe else 0
    padded = math.ceil(m.vocab_size / VOCAB_PAD) * VOCAB_PAD
    v_loc = max(0, min(m.vocab_size, (ref.rank + 1) * (padded // tp)) - min(m.vocab_size, ref.rank * (padded // tp)))
    group = 0 if ref.replicated else ref.rank // ref.moe_tp   # replicated: one group of every expert
    local = set(range(group * n_local, (group + 1) * n_local))
    total = 0
    for t in header.targets:
        r = t.rank
        here = t.expert in local
        # (elements of A, elements of B) this rank plans for the pair
        a_el, b_el = {
            "q": (r * h, q_loc * r),
            "k": (r * h, kv_loc * r),
            "v": (r * h, kv_loc * r),
            "qkv": (3 * r * h, (q_loc + 2 * kv_loc) * r),
            "o": (r * q_loc, h * r),
            "gate": (r * h, i_loc * r),
            "up": (r * h, i_loc * r),
            "gate_up": (2 * r * h, 2 * i_loc * r),
            "down": (r * i_loc, h * r),
            "shared.gate": (r * h, s_loc * r),
            "shared.up": (r * h, s_loc * r),
            "shared.down": (r * s_loc, h * r),
            "experts.w1": (r * h * here, im_loc * r * here),
            "experts.w3": (r * h * here, im_loc * r * here),
            "experts.w2": (r * im_loc * here, h * r * here),
            "experts.gate_up": (n_local * 2 * r * h, n_local * 2 * im_loc * r),
            "experts.down": (n_local * r * im_loc, n_local * h * r),
            "embed": (r * v_loc, h * r),
            "lm_head": (r * h, v_loc * r),
        }[t.module]
        total += a_el * TORCH_DTYPE[t.A.dtype].itemsize + b_el * TORCH_DTYPE[t.B.dtype].itemsize
    return total


# ==================================================================================================
# Applying a plan to the real bytes
# ==================================================================================================
class Source:
    """An adapter's tensors: via safetensors (by key) and via raw file bytes (by offset, as a rank reads)."""

    def __init__(self, header: AdapterHeader):
        self.header = header
        self.tensors = load_file(header.weights_path)
        self.raw = bytearray(Path(header.weights_path).read_bytes())

    def from_offset(self, op) -> torch.Tensor:
        dt = TORCH_DTYPE[op.dtype]
        n = op.src_shape[0] * op.src_shape[1]
        return torch.frombuffer(self.raw, dtype=dt, count=n, offset=op.src_offset).view(op.src_shape)


def apply_plan(plan: SlicePlan, src: Source) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...], torch.Tensor]]:
    held = {}
    for op in plan.ops:
        full = src.from_offset(op)
        assert torch.equal(full, src.tensors[op.tensor]), f"{op.tensor}: src_offset/dtype/shape wrong"
        rows = tuple(range(*op.rows))
        cols = tuple(range(*op.cols))
        data = full[op.rows[0]:op.rows[1], op.cols[0]:op.cols[1]:op.cols[2]]
        assert data.shape == op.shape == (len(rows), len(cols))
        assert op.key not in held, f"{op.key} planned twice"
        held[op.key] = (op.tensor, rows, cols, data)
    return held


def check_chunks(plan: SlicePlan) -> None:
    for chunk_bytes in CHUNK_SIZES:
        chunks = plan.chunks(chunk_bytes)
        flat = []
        for ci, ch in enumerate(chunks):
            assert ch.index == ci
            assert ch.ops, "empty chunk"
            raw = sum(op.nbytes for op in ch.ops)
            assert raw <= chunk_bytes or len(ch.ops) == 1, (chunk_bytes, raw)
            # a chunk is a run of plan.ops (layer order); inside it, ops may be re-sorted by module
            start = len(flat)
            assert sorted(map(id, ch.ops)) == sorted(map(id, plan.ops[start:start + len(ch.ops)]))
            flat.extend(ch.ops)
            assert len(ch.offsets) == len(ch.ops)
            end = 0
            for op, off in zip(ch.ops, ch.offsets):
                assert off % op.itemsize == 0, (off, op.dtype)  # the device views the slice in its dtype
                assert off >= end, "overlapping slices in a chunk"
                end = off + op.nbytes
            assert ch.nbytes == end
            if len({op.dtype for op in ch.ops}) == 1:  # no padding at all: pinned bytes == planned bytes
                assert ch.nbytes == raw
            # CopyGroups: consecutive ops of one (module, side, dtype, shape), consecutive flat indices,
            # back-to-back bytes; together they cover every op of the chunk once, in order
            i = 0
            for g in ch.groups:
                assert g.count >= 1
                assert ch.offsets[i] == g.byte_offset
                for k in range(g.count):
                    op = ch.ops[i + k]
                    assert (op.module, op.side, op.dtype, op.shape) == (g.module, g.side, g.dtype, g.shape)
                    assert op.flat_index(plan.n_local_experts) == g.flat_start + k
                    assert ch.offsets[i + k] == g.byte_offset + k * op.nbytes
                i += g.count
            assert i == len(ch.ops)
            assert sum(g.nbytes for g in ch.groups) == raw
        assert len(flat) == len(plan.ops) and len({id(o) for o in flat}) == len(plan.ops)
        if chunk_bytes >= plan.nbytes and plan.ops:
            assert len(chunks) == 1


def check_layout(header: AdapterHeader, model: ModelSpec, tp: int, ep: int | str, src: Source) -> None:
    """``ep`` "rep": the experts replicated (``moe_replicated``), checked against the reference's own rule."""
    covered = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in src.tensors.items()}
    rep = ep == "rep"
    ep = 1 if rep else ep
    base = ParallelSpec(tp_size=tp, ep_size=ep, moe_replicated=rep)
    for rank in range(tp):
        par = base.for_rank(rank)
        ref = RefRank(model, tp, ep, rank, replicated=rep)
        plan = plan_rank(header, model, par)
        assert plan.tp_rank == rank and plan.ep_rank == rank // (tp // ep)
        assert plan.full_bytes == sum(v.numel() * v.element_size() for v in src.tensors.values())
        held = apply_plan(plan, src)

        # (ii) exactly the reference's holdings, element for element
        want = reference_holdings(header, ref)
        assert set(held) == set(want), (f"rank {rank}: missing {sorted(set(want) - set(held))[:5]}, "
                                        f"extra {sorted(set(held) - set(want))[:5]}")
        for key, (tensor, rows, cols, data) in held.items():
            w_tensor, w_rows, w_cols = want[key]
            assert (tensor, rows, cols) == (w_tensor, w_rows, w_cols), (
                f"rank {rank} {key}: planned {tensor} rows {rows[:3]}..{rows[-1:]} cols {cols[:3]}..{cols[-1:]}"
                f", reference {w_tensor} rows {w_rows[:3]}..{w_rows[-1:]} cols {w_cols[:3]}..{w_cols[-1:]}")
            expect = src.tensors[tensor][list(rows)][:, list(cols)]
            assert torch.equal(data, expect), key
            covered[tensor][torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
        # destinations agree with the canonical key
        local = ref.local_experts() if model.is_moe else []
        for op in plan.ops:
            assert op.key == canonical(op.module, op.side, op.layer, op.expert)
            if op.expert is None:
                assert op.local_expert is None
            else:
                # (iii) only local experts, at their local index
                assert op.expert in local, f"rank {rank}: non-local expert {op.expert} planned"
                assert op.local_expert == op.expert - local[0]
                assert 0 <= op.local_expert < plan.n_local_experts
        assert plan.n_local_experts == len(local)
        assert not {e for e in range(model.num_experts) if e not in local} & {op.expert for op in plan.ops}
        # (iv) bytes by formula
        assert plan.nbytes == reference_bytes(header, ref), f"rank {rank}"
        # scalings/ranks recorded for every destination block
        for op in plan.ops:
            assert (op.module, op.layer, op.local_expert) in plan.scalings
        # (v)
        check_chunks(plan)
    # (i) the union over ranks covers every element
    for k, mask in covered.items():
        assert bool(mask.all()), f"tp={tp} ep={ep}: {k} has {int((~mask).sum())} uncovered elements"
    assert base.tp_size == tp


def legal_layouts(model: ModelSpec) -> list[tuple[int, int]]:
    out = []
    for tp, ep in ALL_LAYOUTS:
        try:
            ParallelSpec(tp_size=tp, ep_size=ep).validate(model)
        except LayoutError:
            continue
        out.append((tp, ep))
    return out


# ==================================================================================================
# Models
# ==================================================================================================
def _replace(base: ModelSpec | str, **kw: Any) -> ModelSpec:
    spec = ModelSpec.from_preset(base) if isinstance(base, str) else base
    return dataclasses.replace(spec, **kw)


def _hf_specs() -> dict[str, ModelSpec]:
    from transformers import MixtralConfig, Qwen2MoeConfig
    mix = MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, vocab_size=200)
    q2 = Qwen2MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
                        shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                        num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[1], num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=300)
    return {"hf-mixtral": ModelSpec.from_hf_config(mix.to_dict(), name="hf-mixtral"),
            "hf-qwen2-moe": ModelSpec.from_hf_config(q2.to_dict(), name="hf-qwen2-moe")}


@lru_cache(maxsize=None)
def models() -> dict[str, ModelSpec]:
    d = {
        "tiny-dense": ModelSpec.from_preset("tiny-dense"),
        "tiny-moe": ModelSpec.from_preset("tiny-moe"),
        "tiny-qwen2-moe": ModelSpec.from_preset("tiny-qwen2-moe"),
        # tp=8 splitting 8 kv heads
        "dense-8h8kv": _replace("tiny-dense", name="dense-8h8kv", num_attention_heads=8, num_key_value_heads=8,
                                head_dim=8),
        # tp=8 > kv=2: kv heads replicated 4x; vocab 130 pads to 192 -> ranks 6, 7 hold no vocabulary
        "dense-16h2kv": _replace("tiny-dense", name="dense-16h2kv", num_attention_heads=16,
                                 num_key_value_heads=2, head_dim=4, vocab_size=130),
        "moe-16h2kv": _replace("tiny-moe", name="moe-16h2kv", num_attention_heads=16, num_key_value_heads=2,
                               head_dim=4, num_hidden_layers=3, mlp_only_layers=(1,)),
        # odd vocabulary with rank 3: bf16/fp16 slices of an odd number of bytes/2 (alignment padding)
        "dense-odd-vocab": _replace("tiny-dense", name="dense-odd-vocab", vocab_size=251),
        "qwen2-moe-8h": _replace("tiny-qwen2-moe", name="qwen2-moe-8h", num_attention_heads=8,
                                 num_key_value_heads=8, head_dim=8),
    }
    d.update(_hf_specs())
    return d


def test_model_zoo_covers_the_layouts_we_claim():
    zoo = models()
    got = {name: legal_layouts(m) for name, m in zoo.items()}
    assert (8, 1) in got["dense-8h8kv"] and (8, 1) in got["dense-16h2kv"]
    for name in ("moe-16h2kv", "qwen2-moe-8h"):
        assert {(8, 1), (8, 2), (8, 4), (4, 4), (2, 2)} <= set(got[name]), name
    assert (4, 1) in got["tiny-dense"]  # tp=4 > kv=2: replication on a preset
    # every MoE model is tested with MoE-TP (ep < tp) and pure EP (ep == tp > 1)
    for name, m in zoo.items():
        if m.is_moe:
            assert any(ep < tp for tp, ep in got[name]) and any(ep == tp > 1 for tp, ep in got[name]), name
    # the zoo has rank layouts where some ranks hold no vocabulary
    m = zoo["dense-16h2kv"]
    assert any(not RefRank(m, 8, 1, r).vocab_rows() for r in range(8))


# ==================================================================================================
# Synthetic adapters
# ==================================================================================================
SYNTH_KINDS = {
    # name: (kwargs for write_synthetic_adapter, applies to dense?, applies to MoE?)
    "all-bf16": (dict(rank=4, dtype="bf16", targets=None, extra=("embed", "lm_head")), True, True),
    "merged-fp32-r3": (dict(rank=3, dtype="fp32", merged=True, targets=None, extra=("embed", "lm_head")),
                       True, True),
    "fused-fp16": (dict(rank=2, dtype="fp16", fused_experts=True, targets=None, extra=("lm_head",)), False,
                   True),
    # every tensor in its own dtype (A and B of a pair may differ): exercises element-size alignment in chunks
    "mixed-dtypes": (dict(rank=3, dtype="fp32", targets=None, extra=("embed", "lm_head"), mixed=True), True,
                     True),
    "patterns-rslora": (dict(rank=4, dtype="bf16", use_rslora=True, targets=("q", "k", "v", "o", "embed"),
                             rank_pattern={"q_proj": 8, r"layers\.1\.self_attn\.o_proj": 2, "embed_tokens": 5},
                             alpha_pattern={"v_proj": 3.0, "k_proj": 1.5}, layers=[1]), True, True),
}


def recast_randomly(folder: Path | str, seed: int) -> None:
    """Rewrite an adapter with every tensor cast to a randomly chosen float dtype."""
    from safetensors.torch import save_file
    path = Path(folder) / "adapter_model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    choices = (torch.bfloat16, torch.float16, torch.float32)
    out = {k: v.to(choices[int(torch.randint(3, (1,), generator=g))]) for k, v in sorted(tensors.items())}
    save_file(out, str(path))


def _targets(model: ModelSpec, kw: dict) -> tuple[str, ...]:
    from tp_lora.job.synthetic import default_targets
    base = kw["targets"] or default_targets(model)
    return tuple(base) + tuple(kw.get("extra", ()))


@lru_cache(maxsize=None)
def synthetic_adapter(model_name: str, kind: str) -> tuple[AdapterHeader, Source]:
    model = models()[model_name]
    kw = dict(SYNTH_KINDS[kind][0])
    targets = _targets(model, kw)
    kw.pop("extra", None)
    kw["targets"] = targets
    mixed = kw.pop("mixed", False)
    seed = zlib.crc32(f"{model_name}/{kind}".encode()) % 1000
    out = Path(tempfile.mkdtemp(prefix=f"{model_name}_{kind}_", dir=_TMP.name))
    write_synthetic_adapter(out, model, seed=seed, **kw)
    if mixed:
        recast_randomly(out, seed)
    header = AdapterSource.open(out, model)
    return header, Source(header)


SYNTH_CASES = [(m, k) for m in ("tiny-dense", "dense-odd-vocab", "tiny-moe", "tiny-qwen2-moe", "dense-8h8kv",
                                "dense-16h2kv",
                                "moe-16h2kv", "qwen2-moe-8h", "hf-mixtral", "hf-qwen2-moe")
               for k, (_, dense_ok, moe_ok) in SYNTH_KINDS.items()
               if (moe_ok if m in ("tiny-moe", "tiny-qwen2-moe", "moe-16h2kv", "qwen2-moe-8h", "hf-mixtral",
                                   "hf-qwen2-moe") else dense_ok)]


@pytest.mark.parametrize("model_name,kind", SYNTH_CASES, ids=[f"{m}-{k}" for m, k in SYNTH_CASES])
def test_synthetic_adapter_all_layouts(model_name, kind):
    model = models()[model_name]
    header, src = synthetic_adapter(model_name, kind)
    layouts = legal_layouts(model)
    assert len(layouts) >= 3
    if model.is_moe:   # the experts replicated over the TP ranks of each legal TP size
        layouts += [(tp, "rep") for tp in sorted({tp for tp, _ in layouts}) if tp > 1]
    for tp, ep in layouts:
        check_layout(header, model, tp, ep, src)


def test_synthetic_adapters_exercise_the_features():
    """Guard against the parametrisation silently losing a feature."""
    h, _ = synthetic_adapter("moe-16h2kv", "fused-fp16")
    assert {"experts.gate_up", "experts.down"} <= h.modules
    h, _ = synthetic_adapter("moe-16h2kv", "all-bf16")
    assert {"experts.w1", "experts.w3", "experts.w2", "gate", "up", "down", "embed", "lm_head"} <= h.modules
    h, _ = synthetic_adapter("tiny-dense", "merged-fp32-r3")
    assert {"qkv", "gate_up"} <= h.modules
    h, _ = synthetic_adapter("qwen2-moe-8h", "all-bf16")
    assert {"shared.gate", "shared.up", "shared.down"} <= h.modules
    h, _ = synthetic_adapter("hf-mixtral", "all-bf16")
    assert any(t.expert == 3 for t in h.targets)
    h, src = synthetic_adapter("dense-odd-vocab", "mixed-dtypes")
    assert len({t.dtype for t in src.tensors.values()}) == 3
    plan = plan_rank(h, models()["dense-odd-vocab"], ParallelSpec())
    (chunk,) = plan.chunks(1 << 30)
    assert chunk.nbytes > plan.nbytes  # some slice needed alignment padding
    h, _ = synthetic_adapter("tiny-dense", "patterns-rslora")
    by = {t.module: t for t in h.targets}
    assert by["q"].rank == 8 and by["o"].rank == 2 and by["embed"].rank == 5 and by["k"].rank == 4
    assert by["v"].scaling == pytest.approx(3.0 / 2.0) and by["k"].scaling == pytest.approx(1.5 / 2.0)
    assert by["q"].scaling == pytest.approx(8.0 / math.sqrt(8))  # alpha = 2*r(config) = 8, rsLoRA
    plan = plan_rank(h, models()["tiny-dense"], ParallelSpec(tp_size=2, tp_rank=1))
    assert plan.scalings[("v", 1, None)] == pytest.approx(1.5)
    assert plan.ranks[("q", 1, None)] == 8


# ==================================================================================================
# Real peft adapters of tiny transformers models
# ==================================================================================================
def _peft_imports():
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")
    from peft import LoraConfig, get_peft_model
    return LoraConfig, get_peft_model


LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@lru_cache(maxsize=None)
def peft_case(name: str):
    """(peft model, ModelSpec, AdapterHeader, Source) of a real ``save_pretrained`` adapter."""
    LoraConfig, get_peft_model = _peft_imports()
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(1234)
    if name == "llama":
        # 8 heads, 2 kv heads: tp=8 replicates every kv head 4x; vocab 130 -> empty vocab on ranks 6, 7
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=4, vocab_size=130)
        model = LlamaForCausalLM(cfg)
        lc = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=LINEAR + ["embed_tokens", "lm_head"],
                        rank_pattern={"layers.1.mlp.down_proj": 2}, alpha_pattern={"o_proj": 5})
    elif name in ("qwen3-moe", "qwen3-moe-v4-targets"):
        cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                             num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=4, vocab_size=200)
        model = Qwen3MoeForCausalLM(cfg)
        if name == "qwen3-moe":
            lc = LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens", "lm_head"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        else:
            # v4-style targets: peft 0.21 converts gate_proj/up_proj into a fused gate_up_proj LoRA of rank 2r
            # with rank_pattern/alpha_pattern {'.*\.gate_up_proj': 2r / 2 alpha}
            lc = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=LINEAR + ["lm_head"])
    else:
        raise KeyError(name)
    pm = get_peft_model(model, lc)
    out = Path(tempfile.mkdtemp(prefix=f"peft_{name}_", dir=_TMP.name))
    pm.save_pretrained(out, save_embedding_layers=False)
    spec = ModelSpec.from_hf_config(cfg.to_dict(), name=f"hf-{name}")
    header = AdapterSource.open(out, spec)
    return pm, spec, header, Source(header)


PEFT_CASES = ["llama", "qwen3-moe", "qwen3-moe-v4-targets"]


@pytest.mark.parametrize("name", PEFT_CASES)
def test_peft_adapter_all_layouts(name):
    pm, spec, header, src = peft_case(name)
    n_lora_keys = sum(1 for k in src.tensors if ".lora_A" in k or "lora_embedding_A" in k)
    assert len(header.targets) == n_lora_keys  # every pair of the file was understood
    layouts = legal_layouts(spec)
    assert (8, 1) in layouts
    if spec.is_moe:
        assert {(8, 2), (8, 4), (4, 4)} <= set(layouts)
        assert {"experts.gate_up", "experts.down"} <= header.modules
    for tp, ep in layouts:
        check_layout(header, spec, tp, ep, src)


def _peft_modules(pm) -> dict[tuple[str, int], Any]:
    """(canonical source module, layer) -> the peft layer holding that LoRA."""
    from peft.tuners.lora.layer import Embedding, Linear, ParamWrapper
    out = {}
    names = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down", "lm_head": "lm_head", "embed_tokens": "embed"}
    for n, mod in pm.named_modules():
        if not isinstance(mod, (ParamWrapper, Linear, Embedding)):
            continue
        parts = n.split(".")
        layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else 0
        if isinstance(mod, ParamWrapper):
            out[("experts." + {"gate_up_proj": "gate_up", "down_proj": "down"}[mod.parameter_name], layer)] = mod
        elif isinstance(mod, (Linear, Embedding)) and parts[-1] in names:
            out[(names[parts[-1]], layer)] = mod
    return out


DELTA_CASES = [(n, tp, ep) for n in PEFT_CASES for tp, ep in [(8, 1), (4, 2), (8, 4), (2, 2)]
               if n.startswith("qwen3-moe") or ep == 1]


@pytest.mark.parametrize("name,tp,ep", DELTA_CASES)
def test_rank_slices_multiply_to_peft_delta_weight(name, tp, ep):
    """Each rank's (B slice) @ (A slice) * scaling is its part of peft's own delta weight (fp32 math)."""
    pm, spec, header, src = peft_case(name)
    mods = _peft_modules(pm)
    deltas = {k: m.get_delta_weight("default").detach().double() for k, m in mods.items()}
    checked = set()
    for rank in range(tp):
        par = ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep)
        ref = RefRank(spec, tp, ep, rank)
        plan = plan_rank(header, spec, par)
        held = {k: v[3].double() for k, v in apply_plan(plan, src).items()}

        def product(module: str, layer: int, expert: int | None = None) -> torch.Tensor | None:
            a = held.get(canonical(module, "A", layer, expert))
            b = held.get(canonical(module, "B", layer, expert))
            if a is None or b is None:
                return None
            le = None if expert is None else expert - ref.local_experts()[0]
            return b @ a * plan.scalings[(module, layer, le)]

        for (mod, layer), delta in deltas.items():
            peft_scaling = mods[(mod, layer)].scaling["default"]
            if mod in ("q", "k", "v", "gate", "up", "lm_head"):
                rows = {"q": ref.q_rows, "k": ref.kv_rows, "v": ref.kv_rows, "lm_head": ref.vocab_rows,
                        "gate": lambda: ref.tp_split(spec.intermediate_size),
                        "up": lambda: ref.tp_split(spec.intermediate_size)}[mod]()
                got = product(mod, layer)
                if not rows:
                    assert got is None
                    continue
                want = delta[rows]
            elif mod in ("o", "down"):
                cols = ref.q_rows() if mod == "o" else ref.tp_split(spec.intermediate_size)
                got, want = product(mod, layer), delta[:, cols]
            elif mod == "embed":  # peft's embedding delta is [vocab, hidden]
                rows = ref.vocab_rows()
                got = product("embed", 0)
                if not rows:
                    assert got is None
                    continue
                got, want = got.T, delta[rows]
            elif mod == "experts.gate_up":  # delta [E, 2I, hidden]: gate rows then up rows
                for e in ref.local_experts():
                    im = spec.moe_intermediate_size
                    sl = ref.moe_split()
                    for name_, off in (("experts.w1", 0), ("experts.w3", im)):
                        got = product(name_, layer, e)
                        torch.testing.assert_close(got, delta[e][[off + g for g in sl]], rtol=1e-5, atol=1e-6)
                        checked.add((name_, e))
                assert plan.scalings[("experts.w1", layer, 0)] == pytest.approx(peft_scaling)
                continue
            elif mod == "experts.down":  # delta [E, hidden, I]
                for e in ref.local_experts():
                    got = product("experts.w2", layer, e)
                    torch.testing.assert_close(got, delta[e][:, ref.moe_split()], rtol=1e-5, atol=1e-6)
                    checked.add(("experts.w2", e))
                continue
            else:
                raise AssertionError(mod)
            assert got is not None, (mod, layer, rank)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            key = ("embed", 0, None) if mod == "embed" else (mod, layer, None)
            assert plan.scalings[key] == pytest.approx(peft_scaling)
            checked.add(mod)
    assert checked, "nothing compared"
    if spec.is_moe:
        assert {("experts.w1", e) for e in range(spec.num_experts)} <= checked


def test_peft_v4_targets_conversion_rank_pattern_is_honoured():
    """peft 0.21 turns gate_proj/up_proj targets of a transformers-5 MoE into gate_up_proj with rank 2r."""
    pm, spec, header, _ = peft_case("qwen3-moe-v4-targets")
    cfg = json.loads(Path(header.path, "adapter_config.json").read_text())
    assert any(v == 4 for v in cfg["rank_pattern"].values())
    gu = [t for t in header.targets if t.module == "experts.gate_up"]
    dn = [t for t in header.targets if t.module == "experts.down"]
    assert gu and all(t.rank == 4 and t.scaling == pytest.approx(6 / 4) for t in gu)
    assert dn and all(t.rank == 2 and t.scaling == pytest.approx(3 / 2) for t in dn)


# ==================================================================================================
# Random models and adapters (hypothesis)
# ==================================================================================================
@st.composite
def random_case(draw):
    tp = draw(st.sampled_from((1, 2, 4, 8)))
    moe = draw(st.booleans())
    ep = draw(st.sampled_from([e for e in (1, 2, 4) if tp % e == 0])) if moe else 1
    kv = draw(st.sampled_from((1, 2, 4, 8)))  # powers of two: kv | tp or tp | kv
    heads = math.lcm(kv, tp) * draw(st.integers(1, 2))
    hd = draw(st.sampled_from((2, 4, 6)))
    hidden = draw(st.sampled_from((8, 16, 24)))
    inter = tp * draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 300))
    layers = draw(st.integers(1, 3))
    rank = draw(st.integers(1, 5))
    kw: dict[str, Any] = dict(name="rand", family="llama", hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                              intermediate_size=inter, vocab_size=vocab)
    if moe:
        n_exp = ep * draw(st.integers(1, 3))
        kw.update(family=draw(st.sampled_from(("qwen3_moe", "qwen2_moe", "mixtral"))), num_experts=n_exp,
                  num_experts_per_tok=1, moe_intermediate_size=(tp // ep) * draw(st.integers(1, 3)))
        if kw["family"] == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = tp * draw(st.integers(0, 2))
        if kw["family"] != "mixtral" and layers > 1 and draw(st.booleans()):
            kw["mlp_only_layers"] = (0,)
    spec = ModelSpec(**kw)
    fused = moe and draw(st.booleans())
    merged = draw(st.booleans())
    dtype = draw(st.sampled_from(("bf16", "fp16", "fp32")))
    extra = draw(st.sets(st.sampled_from(("embed", "lm_head"))))
    return spec, tp, ep, dict(rank=rank, dtype=dtype, merged=merged, fused_experts=fused, extra=tuple(extra),
                              seed=draw(st.integers(0, 99)), mixed=draw(st.booleans()))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_case())
def test_random_models_and_layouts(case):
    from tp_lora.job.synthetic import default_targets
    spec, tp, ep, kw = case
    ParallelSpec(tp_size=tp, ep_size=ep).validate(spec)
    extra = kw.pop("extra")
    mixed = kw.pop("mixed")
    with tempfile.TemporaryDirectory(dir=_TMP.name) as d:
        write_synthetic_adapter(d, spec, targets=default_targets(spec) + extra, **kw)
        if mixed:
            recast_randomly(d, kw["seed"])
        header = AdapterSource.open(d, spec)
        check_layout(header, spec, tp, ep, Source(header))


# ==================================================================================================
# The reference must be able to fail: a wrong plan is caught
# ==================================================================================================
def _shift_kv(monkeypatch):
    orig = ParallelSpec.kv_heads_range

    def shifted(self, m):
        r = orig(self, m)
        return range(r.start ^ 1, (r.start ^ 1) + len(r))

    monkeypatch.setattr(ParallelSpec, "kv_heads_range", shifted)


def _contiguous_fused_cols(monkeypatch):
    """Fused-expert B columns taken as e*r .. e*r+r (a plausible misreading) instead of j*E+e."""
    import tp_lora.plan.planner as planner
    orig = planner.SliceOp

    def make(*args, **kw):
        op = orig(*args, **kw)
        c0, c1, step = op.cols
        if step > 1:
            r = (c1 - c0 - 1) // step + 1
            return dataclasses.replace(op, cols=(c0 * r, c0 * r + r, 1))
        return op

    monkeypatch.setattr(planner, "SliceOp", make)


def _megatron_vocab(monkeypatch):
    """Pad the vocabulary to 64 * tp (Megatron's rule) instead of 64 (vLLM / SGLang)."""
    def per(self, m):
        q = self.vocab_pad_to * self.tp_size
        return -(-m.vocab_size // q) * q // self.tp_size

    monkeypatch.setattr(ParallelSpec, "vocab_per_rank", per)


def _next_expert_group(monkeypatch):
    orig = ParallelSpec.local_experts

    def shifted(self, m):
        r = orig(self, m)
        n = len(r)
        start = (r.start + n) % m.num_experts
        return range(start, start + n)

    monkeypatch.setattr(ParallelSpec, "local_experts", shifted)


def _moe_tp_rank_zero(monkeypatch):
    monkeypatch.setattr(ParallelSpec, "moe_tp_rank", property(lambda self: 0))


def _shift_heads(monkeypatch):
    """Each rank's block of q heads starts one head late (same count, wrong rows)."""
    def heads(self, m):
        per = m.num_attention_heads // self.tp_size
        start = (self.tp_rank * per + 1) % m.num_attention_heads
        return range(start, start + per)

    monkeypatch.setattr(ParallelSpec, "heads_range", heads)


MUTATIONS = {
    # mutation: (patch, model, adapter kind, tp, ep)
    "kv-owner-shifted": (_shift_kv, "dense-16h2kv", "all-bf16", 8, 1),
    "fused-cols-contiguous": (_contiguous_fused_cols, "moe-16h2kv", "fused-fp16", 4, 2),
    "vocab-megatron-padding": (_megatron_vocab, "dense-16h2kv", "all-bf16", 8, 1),
    "wrong-expert-group": (_next_expert_group, "tiny-moe", "all-bf16", 4, 2),
    "moe-tp-rank-zero": (_moe_tp_rank_zero, "moe-16h2kv", "fused-fp16", 8, 2),
    "heads-shifted": (_shift_heads, "dense-8h8kv", "merged-fp32-r3", 4, 1),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_checker_catches_planner_mutations(monkeypatch, mutation):
    """The property check is not a tautology: each plausible planner/ownership bug makes it fail."""
    patch, model_name, kind, tp, ep = MUTATIONS[mutation]
    model = models()[model_name]
    header, src = synthetic_adapter(model_name, kind)
    check_layout(header, model, tp, ep, src)  # fine as is
    patch(monkeypatch)
    with pytest.raises(AssertionError):
        check_layout(header, model, tp, ep, src)


@pytest.mark.parametrize("tp,vocab,expected", [
    (1, 250, [(0, 250)]),
    (2, 250, [(0, 128), (128, 250)]),
    (8, 250, [(32 * r, min(250, 32 * r + 32)) for r in range(8)]),
    (8, 130, [(0, 24), (24, 48), (48, 72), (72, 96), (96, 120), (120, 130), (130, 130), (130, 130)]),
    (4, 128256, [(32064 * r, 32064 * (r + 1)) for r in range(4)]),
    (8, 128256, [(16032 * r, 16032 * (r + 1)) for r in range(8)]),  # vLLM/SGLang: 128256/8, no extra pad
    (8, 151936, [(18992 * r, 18992 * (r + 1)) for r in range(8)]),
    (8, 32000, [(4000 * r, 4000 * (r + 1)) for r in range(8)]),
])
def test_vocab_ranges_match_vllm_sglang(tp, vocab, expected):
    spec = _replace("tiny-dense", vocab_size=vocab)
    got = [ParallelSpec(tp_size=tp, tp_rank=r).vocab_range(spec) for r in range(tp)]
    assert got == expected
    per = ParallelSpec(tp_size=tp).vocab_per_rank(spec)
    assert per == math.ceil(vocab / 64) * 64 // tp

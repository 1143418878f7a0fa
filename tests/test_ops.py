"""LoRAOps against a direct per-token reference computed from the pool buffers.

The reference (``ref_*`` below) loops over tokens (or routed rows) in float64 on the CPU and, for each one,
reads ITS slot's A, B and scaling straight from the pool: ``out[t] + s * B @ (A @ x[t])``, nothing for slot
-1. LoRAOps groups tokens by slot and works in batched matmuls; the two must agree for mixed slots, -1
tokens, empty requests, vocab-parallel embeddings (tokens outside the rank's shard add exactly 0, and the
ranks' partial sums add up to the unsharded result), routed expert rows, and untargeted modules (scaling
0, zero buffers: exactly 0 added).

``check_*`` helpers take the device and dtypes, so ``tests/gpu/test_gpu_ops.py`` runs the same checks on
CUDA with a bf16 pool.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from tp_lora.runtime.batch import BatchInfo, build_batch
from tp_lora.plan.model import ModelSpec
from tp_lora.format.modules import EXPERT_MODULES, POOL_MODULES
from tp_lora.ops.layer import LoRAOps
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.device.pool import GpuPool

DENSE = ModelSpec.from_preset("tiny-dense")
MOE = ModelSpec.from_preset("tiny-moe")
QWEN2_MOE = ModelSpec.from_preset("tiny-qwen2-moe")   # shared expert (shared.gate/up/down)
R = 8
SLOT_RANKS = (8, 3, 5)   # slot 1 holds a rank-3 adapter: rows/cols 3.. of its buffers stay zero
# request slots (-1: no adapter) and token counts: slots interleaved, an empty request, -1 in between
REQ_SLOTS = [0, -1, 2, 1, 0, -1, 2]
REQ_TOKENS = [3, 2, 4, 0, 2, 3, 1]
Tol = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (ref, magnitude) -> elementwise bound


def exact64(ref: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """float64 pool and activations: only summation order differs from the reference."""
    return 1e-12 * (mag + 1.0)


# -- building pools -----------------------------------------------------------------------------------------
def make_pool(spec: ModelSpec, par: ParallelSpec, *, dtype: torch.dtype = torch.float64,
              device: str | torch.device = "cpu", modules: tuple[str, ...] = POOL_MODULES,
              untargeted: dict[int, set[str]] | None = None, seed: int = 0) -> GpuPool:
    """A pool whose slot ``s`` holds a random rank-``SLOT_RANKS[s]`` adapter (zero padding beyond its rank,
    as the loader leaves it) and random non-zero scalings; modules in ``untargeted[s]`` stay all zero
    (buffers and scaling), as the pool leaves a module an adapter does not target."""
    pool = GpuPool(spec, par, max_loras=len(SLOT_RANKS), max_rank=R, modules=modules, dtype=dtype,
                   device=device)
    g = torch.Generator().manual_seed(seed)
    untargeted = untargeted or {}
    for m in pool.modules:
        for s, r in enumerate(SLOT_RANKS):
            if m in untargeted.get(s, set()):
                continue
            A, B = pool.A[m][s], pool.B[m][s]
            A[..., :r, :] = (torch.randn(A[..., :r, :].shape, generator=g, dtype=torch.float64) * 0.3).to(A)
            B[..., :r] = (torch.randn(B[..., :r].shape, generator=g, dtype=torch.float64) * 0.3).to(B)
            sc = pool.scaling[m][s]
            sc.copy_((0.5 + 1.5 * torch.rand(sc.shape, generator=g, dtype=torch.float64)).to(sc))
    return pool


def make_batch(device: str | torch.device = "cpu", slots: list[int] = REQ_SLOTS,
               tokens: list[int] = REQ_TOKENS) -> BatchInfo:
    names = [None if s < 0 else f"ad{s}" for s in slots]
    return build_batch(slots, names, tokens, {s: SLOT_RANKS[s] for s in slots if s >= 0},
                       torch.device(device), None)


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


# -- the per-token reference ----------------------------------------------------------------------------------
def ref_linear(pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor, out: torch.Tensor,
               *, expert_le: int | None = None, token_index: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected out, magnitude) in float64: row i is token ``token_index[i]`` (default: i). ``magnitude`` is
    ``|out| + |s| * |B| @ (|A| @ |x|)`` per element, the scale of the rounding errors."""
    x64, res = _cpu64(x), _cpu64(out).clone()
    mag = res.abs()
    slots = batch.token_slots.cpu()
    rows = range(x.shape[0])
    for i in rows:
        t = i if token_index is None else int(token_index[i])
        s = int(slots[t])
        if s < 0:
            continue
        if expert_le is None:
            A, B = pool.A[module][s, layer], pool.B[module][s, layer]
            sc = float(pool.scaling[module][s, layer, 0])
        else:
            A, B = pool.A[module][s, layer, expert_le], pool.B[module][s, layer, expert_le]
            sc = float(pool.scaling[module][s, layer, expert_le])
        A, B = _cpu64(A), _cpu64(B)
        res[i] += sc * (B @ (A @ x64[i]))
        mag[i] += abs(sc) * (B.abs() @ (A.abs() @ x64[i].abs()))
    return res, mag


def ref_embedding(full_A: torch.Tensor, full_B: torch.Tensor, scaling: torch.Tensor, batch: BatchInfo,
                  ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsharded embedding delta: ``s * B @ A[:, id]`` per token; full_A ``[S, R, V]``, full_B ``[S, h, R]``."""
    slots = batch.token_slots.cpu()
    res = torch.zeros(ids.shape[0], full_B.shape[1], dtype=torch.float64)
    mag = torch.zeros_like(res)
    for t in range(ids.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        a = full_A[s, :, int(ids[t])]
        res[t] = float(scaling[s]) * (full_B[s] @ a)
        mag[t] = abs(float(scaling[s])) * (full_B[s].abs() @ a.abs())
    return res, mag


def _assert_close(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, tol: Tol, what: str) -> None:
    err = (_cpu64(got) - ref).abs()
    bound = tol(ref, mag)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements out of tolerance; worst err "
                           f"{float(err.max()):.3e}, bound there {float(bound.flatten()[err.argmax()]):.3e}")


def _unchanged_rows(batch: BatchInfo, token_index: torch.Tensor | None = None) -> torch.Tensor:
    slots = batch.token_slots.cpu()
    if token_index is not None:
        slots = slots[token_index.cpu()]
    return slots < 0


# -- checks (shared with the GPU test) ---------------------------------------------------------------------------
def check_dense_ops(spec: ModelSpec, par: ParallelSpec, *, device: str | torch.device = "cpu",
                    pool_dtype: torch.dtype = torch.float64, act_dtype: torch.dtype = torch.float64,
                    tol: Tol = exact64, seed: int = 0, backend: Callable[[], Any] | None = None) -> None:
    """column / row of every dense pool module (and lm_head) of every layer vs the per-token reference."""
    pool = make_pool(spec, par, dtype=pool_dtype, device=device, seed=seed)
    batch = make_batch(device)
    ops = LoRAOps(pool, batch, backend() if backend else None)
    g = torch.Generator().manual_seed(seed + 1)
    T = batch.num_tokens
    checked = 0
    for m, shape in pool.shapes.items():
        if m in EXPERT_MODULES or m == "embed":
            continue
        for layer in range(shape.layers):
            in_f, out_f = shape.a_shape[1], shape.b_shape[0]
            x = torch.randn(T, in_f, generator=g, dtype=torch.float64).to(device, act_dtype)
            out = torch.randn(T, out_f, generator=g, dtype=torch.float64).to(device, act_dtype)
            before = out.clone()
            ref, mag = ref_linear(pool, batch, layer, m, x, out)
            if m in ("o", "down", "shared.down"):
                ops.row(layer, m, x, out)
            else:
                ops.column(layer, m, x, out)
            _assert_close(out, ref, mag, tol, f"{m} layer {layer}")
            keep = _unchanged_rows(batch).to(out.device)
            assert torch.equal(out[keep], before[keep]), f"{m}: no-adapter tokens changed"
            checked += 1
    assert checked >= 4 * spec.num_hidden_layers + 1   # q/k/v/o of every layer and lm_head at least


def check_embedding(spec: ModelSpec, tp: int, *, device: str | torch.device = "cpu",
                    pool_dtype: torch.dtype = torch.float64, act_dtype: torch.dtype = torch.float64,
                    tol: Tol = exact64, seed: int = 0, backend: Callable[[], Any] | None = None) -> None:
    """Vocab-parallel embedding: each rank's pool holds its columns of one full A; tokens outside a rank's
    shard leave that rank's rows exactly unchanged, and the ranks' partial sums equal the unsharded delta."""
    g = torch.Generator().manual_seed(seed)
    pars = ParallelSpec(tp_size=tp).all_ranks()
    per = pars[0].vocab_per_rank(spec)
    S, h, V = len(SLOT_RANKS), spec.hidden_size, spec.vocab_size
    full_A = torch.zeros(S, R, per * tp, dtype=torch.float64)   # padded vocab columns stay zero
    full_B = torch.zeros(S, h, R, dtype=torch.float64)
    for s, r in enumerate(SLOT_RANKS):
        full_A[s, :r, :V] = torch.randn(r, V, generator=g, dtype=torch.float64)
        full_B[s, :, :r] = torch.randn(h, r, generator=g, dtype=torch.float64) * 0.3
    scaling = 0.5 + torch.rand(S, generator=g, dtype=torch.float64)
    # round the factors to the pool dtype first: the reference then measures only the op's arithmetic
    full_A, full_B = full_A.to(pool_dtype).double(), full_B.to(pool_dtype).double()
    batch = make_batch(device)
    T = batch.num_tokens
    ids = torch.randint(0, V, (T,), generator=g)
    ids[:4] = torch.tensor([0, V - 1, per - 1, min(per, V - 1)])   # both ends and a shard edge
    total = torch.zeros(T, h, dtype=torch.float64)
    base_mag = torch.zeros(T, h, dtype=torch.float64)   # |out| of the rank that owns each token
    for par in pars:
        pool = GpuPool(spec, par, max_loras=S, max_rank=R, modules=("embed",), dtype=pool_dtype, device=device)
        start = par.tp_rank * per
        pool.A["embed"][:, 0] = full_A[:, :, start:start + per].to(device, pool_dtype)
        pool.B["embed"][:, 0] = full_B.to(device, pool_dtype)
        pool.scaling["embed"][:, 0, 0] = scaling.to(device, torch.float32)
        base = torch.randn(T, h, generator=g, dtype=torch.float64).to(device, act_dtype)
        out = base.clone()
        LoRAOps(pool, batch, backend() if backend else None).embedding(ids.to(device), out)
        a, b = par.vocab_range(spec)
        outside = ((ids < a) | (ids >= b)) | _unchanged_rows(batch)
        assert torch.equal(out[outside.to(out.device)], base[outside.to(out.device)]), \
            f"rank {par.tp_rank}: tokens outside [{a}, {b}) or without adapter changed"
        total += _cpu64(out) - _cpu64(base)
        base_mag[~outside] += _cpu64(base).abs()[~outside]
    # float32 scalings in the pool: the reference uses the same float32 values
    ref, mag = ref_embedding(full_A, full_B, scaling.float().double(), batch, ids)
    _assert_close(total, ref, mag + base_mag, tol, f"embedding tp={tp}")
    assert (ref.abs().sum(1) > 0).sum() >= 5   # the check is not vacuous


def check_expert_ops(spec: ModelSpec, par: ParallelSpec, *, device: str | torch.device = "cpu",
                     pool_dtype: torch.dtype = torch.float64, act_dtype: torch.dtype = torch.float64,
                     tol: Tol = exact64, seed: int = 0, backend: Callable[[], Any] | None = None) -> None:
    """expert_column / expert_row for every local expert of every layer, with routed rows in an arbitrary
    order (rows -> batch tokens through ``token_index``), vs the per-row reference."""
    pool = make_pool(spec, par, dtype=pool_dtype, device=device, seed=seed)
    batch = make_batch(device)
    ops = LoRAOps(pool, batch, backend() if backend else None)
    g = torch.Generator().manual_seed(seed + 2)
    T = batch.num_tokens
    local = par.local_experts(spec)
    for layer in range(spec.num_hidden_layers):
        for e in local:
            n = 1 + (e * 5 + layer) % T
            token_index = torch.randperm(T, generator=g)[:n]   # distinct tokens, unsorted
            for m in EXPERT_MODULES:
                shape = pool.shapes[m]
                in_f, out_f = shape.a_shape[1], shape.b_shape[0]
                x = torch.randn(n, in_f, generator=g, dtype=torch.float64).to(device, act_dtype)
                out = torch.randn(n, out_f, generator=g, dtype=torch.float64).to(device, act_dtype)
                before = out.clone()
                le = e - local.start
                ref, mag = ref_linear(pool, batch, layer, m, x, out, expert_le=le, token_index=token_index)
                ti = token_index.to(device)
                if m == "experts.w2":
                    ops.expert_row(layer, m, e, x, ti, out)
                else:
                    ops.expert_column(layer, m, e, x, ti, out)
                _assert_close(out, ref, mag, tol, f"{m} layer {layer} expert {e}")
                keep = _unchanged_rows(batch, token_index).to(out.device)
                assert torch.equal(out[keep], before[keep]), f"{m} expert {e}: no-adapter rows changed"


# -- CPU tests ------------------------------------------------------------------------------------------------
DENSE_LAYOUTS = [(DENSE, 1, 0, 1), (DENSE, 2, 1, 1), (DENSE, 4, 3, 1), (MOE, 4, 2, 2), (QWEN2_MOE, 2, 1, 1)]


@pytest.mark.parametrize("spec,tp,rank,ep", DENSE_LAYOUTS,
                         ids=[f"{s.name}-tp{tp}-r{r}-ep{ep}" for s, tp, r, ep in DENSE_LAYOUTS])
def test_column_and_row_match_per_token_reference(spec: ModelSpec, tp: int, rank: int, ep: int) -> None:
    check_dense_ops(spec, ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_embedding_vocab_parallel_matches_unsharded_reference(tp: int) -> None:
    check_embedding(DENSE, tp)


EXPERT_LAYOUTS = [(1, 0, 1), (2, 1, 2), (4, 3, 2), (4, 1, 1), (4, 2, 4)]


@pytest.mark.parametrize("tp,rank,ep", EXPERT_LAYOUTS, ids=[f"tp{a}-r{b}-ep{c}" for a, b, c in EXPERT_LAYOUTS])
def test_expert_ops_match_per_row_reference(tp: int, rank: int, ep: int) -> None:
    check_expert_ops(MOE, ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep))


def test_bf16_pool_float32_activations_cpu() -> None:
    """The backend casts a bf16 pool to the activations' dtype: with float32 activations only the pool's own
    rounding differs from float64, and the reference reads the same rounded values."""
    tol: Tol = lambda ref, mag: 1e-5 * (mag + 1.0)   # float32 matmuls of O(1) values, a few dozen terms
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    check_dense_ops(MOE, par, pool_dtype=torch.bfloat16, act_dtype=torch.float32, tol=tol)
    check_expert_ops(MOE, par, pool_dtype=torch.bfloat16, act_dtype=torch.float32, tol=tol)
    check_embedding(DENSE, 2, pool_dtype=torch.bfloat16, act_dtype=torch.float32, tol=tol)


def test_untargeted_module_adds_exactly_zero() -> None:
    """A module an adapter does not target (zero buffers, scaling 0) adds exactly 0 to its tokens, while a
    targeted module of the same slot changes them; so do modules the pool does not hold at all."""
    par = ParallelSpec(tp_size=2, tp_rank=0, ep_size=2)
    pool = make_pool(MOE, par, untargeted={1: {"v", "experts.w2", "lm_head", "embed"}, 2: {"q"}})
    batch = make_batch(slots=[0, 1, -1, 2, 1], tokens=[3, 2, 2, 3, 2])
    ops = LoRAOps(pool, batch)
    T = batch.num_tokens
    slots = batch.token_slots
    g = torch.Generator().manual_seed(5)

    def delta(fn: Callable[[torch.Tensor], None], width: int, n: int = T) -> torch.Tensor:
        out = torch.randn(n, width, generator=g, dtype=torch.float64)
        before = out.clone()
        fn(out)
        return out - before

    h = MOE.hidden_size
    x = torch.randn(T, h, dtype=torch.float64, generator=g)
    kv = pool.shapes["v"].b_shape[0]
    d_v = delta(lambda o: ops.column(1, "v", x, o), kv)
    d_k = delta(lambda o: ops.column(1, "k", x, o), kv)
    d_q = delta(lambda o: ops.column(0, "q", x, o), pool.shapes["q"].b_shape[0])
    d_lm = delta(lambda o: ops.column(0, "lm_head", x, o), pool.shapes["lm_head"].b_shape[0])
    ids = torch.arange(T) * 7 % MOE.vocab_size   # many tokens in rank 0's shard
    d_emb = delta(lambda o: ops.embedding(ids, o), h)
    assert torch.count_nonzero(d_v[slots == 1]) == 0 and torch.count_nonzero(d_v[slots == 0]) > 0
    assert torch.count_nonzero(d_k[slots == 1]) > 0
    assert torch.count_nonzero(d_q[slots == 2]) == 0 and torch.count_nonzero(d_q[slots == 1]) > 0
    assert torch.count_nonzero(d_lm[slots == 1]) == 0 and torch.count_nonzero(d_lm[slots == 2]) > 0
    assert torch.count_nonzero(d_emb[slots == 1]) == 0 and torch.count_nonzero(d_emb[slots == 0]) > 0
    e = par.local_experts(MOE).start
    ti = torch.arange(T)
    xi = torch.randn(T, pool.shapes["experts.w2"].a_shape[1], dtype=torch.float64, generator=g)
    d_w2 = delta(lambda o: ops.expert_row(0, "experts.w2", e, xi, ti, o), h)
    d_w1 = delta(lambda o: ops.expert_column(0, "experts.w1", e, x, ti, o), pool.shapes["experts.w1"].b_shape[0])
    assert torch.count_nonzero(d_w2[slots == 1]) == 0 and torch.count_nonzero(d_w2[slots == 0]) > 0
    assert torch.count_nonzero(d_w1[slots == 1]) > 0
    for d in (d_v, d_k, d_q, d_lm, d_emb, d_w2, d_w1):   # and no-adapter tokens never change
        assert torch.count_nonzero(d[slots < 0]) == 0

    # modules the pool does not hold: the ops are no-ops
    small = make_pool(DENSE, ParallelSpec(), modules=("q", "o"))
    ops2 = LoRAOps(small, batch)
    for m, width in (("v", DENSE.kv_size), ("gate", DENSE.intermediate_size), ("lm_head", 256)):
        assert torch.count_nonzero(delta(lambda o: ops2.column(0, m, x, o), width)) == 0
    assert torch.count_nonzero(delta(lambda o: ops2.embedding(ids, o), h)) == 0
    assert torch.count_nonzero(delta(lambda o: ops2.row(0, "down", torch.randn(T, 128, dtype=torch.float64),
                                                         o), h)) == 0


def test_batch_without_adapters_is_exact_noop() -> None:
    pool = make_pool(MOE, ParallelSpec(tp_size=2, tp_rank=1, ep_size=2))
    batch = make_batch(slots=[-1, -1], tokens=[3, 4])
    assert batch.slot_tokens == {}
    ops = LoRAOps(pool, batch)
    x = torch.randn(7, MOE.hidden_size, dtype=torch.float64)
    out = torch.randn(7, pool.shapes["q"].b_shape[0], dtype=torch.float64)
    before = out.clone()
    ops.column(0, "q", x, out)
    ops.embedding(torch.arange(7) + 130, x)   # rank 1's shard
    assert torch.equal(out, before)
    y = torch.randn(3, pool.shapes["experts.w1"].b_shape[0], dtype=torch.float64)
    y0 = y.clone()
    ops.expert_column(1, "experts.w1", 4, x[:3], torch.tensor([0, 5, 6]), y)
    assert torch.equal(y, y0)


def test_expert_not_local_raises() -> None:
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)   # experts 4..7
    ops = LoRAOps(make_pool(MOE, par), make_batch())
    x = torch.randn(2, MOE.hidden_size, dtype=torch.float64)
    out = torch.zeros(2, MOE.moe_intermediate_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="expert 3 is not local"):
        ops.expert_column(0, "experts.w1", 3, x, torch.tensor([0, 1]), out)


def test_slot_ranks_and_grouping_of_batch() -> None:
    """The batch groups tokens by slot (what the ops iterate) and keeps -1 tokens out of every group."""
    b = make_batch()
    assert b.num_tokens == sum(REQ_TOKENS)
    assert sorted(b.slot_tokens) == [0, 1, 2] and b.slots == (0, 1, 2)
    seen = torch.cat(list(b.slot_tokens.values()))
    assert len(set(seen.tolist())) == seen.numel()
    assert set(seen.tolist()) == set(torch.nonzero(b.token_slots >= 0).flatten().tolist())
    for s, idx in b.slot_tokens.items():
        assert bool((b.token_slots[idx] == s).all())
    # the empty request (slot 1, 0 tokens) leaves slot 1 with no tokens but still listed
    assert b.slot_tokens[1].numel() == 0


@pytest.mark.parametrize("tp,rank,ep", [(1, 0, 1), (4, 3, 2)], ids=["tp1", "tp4-ep2"])
def test_fused_expert_op_matches_per_row_reference(tp: int, rank: int, ep: int) -> None:
    """``experts_column`` / ``experts_row``: all routed rows of all local experts in one call (rows in any
    order, several experts and slots mixed, base-only rows) equal the per-row float64 reference, and rows
    without adapter are exactly unchanged."""
    par = ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep)
    pool = make_pool(MOE, par)
    batch = make_batch()
    ops = LoRAOps(pool, batch)
    T = batch.num_tokens
    local = par.local_experts(MOE)
    g = torch.Generator().manual_seed(9)
    N = 3 * T
    tok = torch.randint(0, T, (N,), generator=g)
    exp = torch.randint(local.start, local.stop, (N,), generator=g)
    routing = ops.expert_routing(tok, exp)
    for layer in range(MOE.num_hidden_layers):
        for m in EXPERT_MODULES:
            shape = pool.shapes[m]
            x = torch.randn(N, shape.a_shape[1], generator=g, dtype=torch.float64)
            out = torch.randn(N, shape.b_shape[0], generator=g, dtype=torch.float64)
            before = out.clone()
            ref, mag = out.clone(), out.abs()
            for e in local:
                sel = exp == e
                if sel.any():
                    ref[sel], mag[sel] = ref_linear(pool, batch, layer, m, x[sel], out[sel],
                                                    expert_le=e - local.start, token_index=tok[sel])
            (ops.experts_row if m == "experts.w2" else ops.experts_column)(layer, m, x, routing, out)
            _assert_close(out, ref, mag, exact64, f"fused {m} layer {layer}")
            keep = _unchanged_rows(batch, tok)
            assert torch.equal(out[keep], before[keep])

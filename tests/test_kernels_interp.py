"""The Triton kernels on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), on the tiny presets.

Same checks as the GPU tests (``tests/gpu/test_kernels.py``): the per-token float64-derived reference of
``tests/test_ops.py`` (float32 pools, 1e-5), the torch path on random mixed batches with base-only rows
(float32 1e-5, bf16 12u * magnitude), the per-slot rank (NaN planted above a smaller adapter's rank never
reaches its outputs: the kernels do not touch the padding), and row isolation: bit for bit the same output
alone or batched with hostile adapters (3e38, inf, NaN). Also the pure block planning, and the tenant
isolation property of the torch path and of the reference model's attention (issue 15).

Skipped when Triton is not installed (it is in the ``test`` extra; not a runtime dependency on CPU), or
when the kernels module was already imported without the interpreter in this process.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if "tp_lora.ops.triton_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernels already compiled for a GPU in this process", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from support import kernel_checks as kc  # noqa: E402
from test_ops import DENSE, MOE, QWEN2_MOE, SLOT_RANKS, make_batch, make_pool, check_dense_ops, check_embedding  # noqa: E402
from test_ops import check_expert_ops  # noqa: E402

from tp_lora.device.pool import GpuPool  # noqa: E402
from tp_lora.ops import triton_kernels  # noqa: E402
from tp_lora.ops.layer import LoRAOps, TorchBackend  # noqa: E402
from tp_lora.ops.meta import expert_blocks, plan_dense_blocks  # noqa: E402
from tp_lora.ops.triton_backend import TritonBackend  # noqa: E402
from tp_lora.plan.parallel import ParallelSpec  # noqa: E402
from tp_lora.runtime.batch import build_batch  # noqa: E402

DEV = "cpu"
pytestmark = pytest.mark.skipif(not triton_kernels.INTERPRET, reason="kernels compiled for a GPU here")
FP32_TOL = lambda ref, mag: 1e-5 * (mag + 1.0)   # noqa: E731


def test_plan_dense_blocks_groups_by_slot_and_chunks() -> None:
    b = build_batch([2, -1, 0, 2, 0], [None] * 5, [3, 4, 20, 0, 2], {0: 4, 2: 8}, torch.device("cpu"), None)
    p = plan_dense_blocks(b, block_m=16)
    # slot 0: tokens 7..26 (request 2) then 27..28 (request 4) = 22 rows -> blocks of 16 and 6; slot 2: 0..2
    assert p.blk_slot.tolist() == [0, 0, 2]
    assert p.blk_len.tolist() == [16, 6, 3]
    assert p.blk_start.tolist() == [0, 16, 22]
    assert p.perm.tolist() == list(range(7, 29)) + [0, 1, 2]
    assert 3 not in p.perm.tolist() and 6 not in p.perm.tolist()   # base-only tokens are in no block


def test_dense_meta_packs_the_plan_into_one_buffer() -> None:
    """DenseMeta's eight int32 tables (the last: per-block records) are 16-byte aligned views of one buffer
    holding the batch's plan;
    the static buffer keeps its address across batches (CUDA graphs) and its unused entries are reset
    (slot -1 for blocks and tokens)."""
    from tp_lora.ops.meta import DenseMeta
    b1 = build_batch([2, -1, 0, 2, 0], [None] * 5, [3, 4, 20, 1, 2], {0: 4, 2: 8}, torch.device("cpu"), None)
    b2 = build_batch([1], [None], [2], {1: 3}, torch.device("cpu"), None)
    static, eager = DenseMeta(4, 8, "cpu", capacity=40), DenseMeta(4, 8, "cpu")
    names = ("perm", "blk_start", "blk_len", "blk_slot", "token_slots", "slot_rank", "nblk", "blk_rec")
    for m in (static, eager):
        for b in (b1, b2):
            addr = m.buffer.data_ptr() if m is static else None
            m.update(b)
            assert addr is None or m.buffer.data_ptr() == addr
            p = plan_dense_blocks(b, 16)
            n = p.num_blocks
            assert m.perm[:p.perm.numel()].tolist() == p.perm.tolist()
            assert m.blk_start[:n].tolist() == p.blk_start.tolist() and m.blk_len[:n].tolist() == p.blk_len.tolist()
            assert m.blk_slot[:n].tolist() == p.blk_slot.tolist() and set(m.blk_slot[n:].tolist()) <= {-1}
            tok = [s for s, k in zip(b.request_slots, b.seg_lens) for _ in range(k)]
            assert m.token_slots[:len(tok)].tolist() == tok and set(m.token_slots[len(tok):].tolist()) <= {-1}
            assert m.slot_rank.tolist() == [b.slot_ranks.get(s, 0) for s in range(4)]
            assert m.nblk.tolist() == [n]
            rec = m.blk_rec[:n * 20].view(n, 20).tolist()    # [slot, rank, rows, start, 16 rows (0 past them)]
            for i, r in enumerate(rec):
                st, ln, s = p.blk_start[i].item(), p.blk_len[i].item(), p.blk_slot[i].item()
                assert r[:4] == [s, b.slot_ranks[s], ln, st]
                assert r[4:] == p.perm[st:st + ln].tolist() + [0] * (16 - ln)
            for name in names:
                v = getattr(m, name)
                assert v.data_ptr() % 16 == 0 and v.untyped_storage().data_ptr() == m.buffer.data_ptr(), name
    assert static.grid_blocks == -(-40 // 16) + 4 and eager.grid_blocks == 1


@pytest.mark.parametrize("builder", ["torch", "triton"])
def test_expert_blocks_cover_each_adapter_row_once(builder: str) -> None:
    """Both builders of the (expert, slot) blocks (torch ops in ``meta``, the counting-sort kernels the
    backend uses): every adapter row in exactly one block of its own expert and slot, none other."""
    g = torch.Generator().manual_seed(0)
    for N, E, S, bm in ((0, 4, 3, 16), (1, 4, 3, 16), (50, 4, 3, 16), (200, 8, 5, 16), (70, 2, 2, 64)):
        slots = torch.randint(-1, S, (N,), generator=g)
        experts = torch.randint(0, E, (N,), generator=g)
        if builder == "torch":
            eb = expert_blocks(slots, experts, E, S, bm)
            perm, bstart, blen, bslot, bexp = eb.perm, eb.blk_start, eb.blk_len, eb.blk_slot, eb.blk_expert
            nb = eb.blk_slot.numel()
            used = None
        else:   # token i has slot slots[i]; row i is token i
            (perm, bstart, blen, bslot, bexp), nb, nblk = triton_kernels.route_blocks(
                torch.arange(N), experts.to(torch.int32), slots.to(torch.int32), E, S, bm)
            used = int(nblk[0])   # the used blocks come first (the fused kernel reads only those)
            assert bool((bslot[:used] >= 0).all()) and bool((bslot[used:nb] < 0).all())
        assert nb == -(-N // bm) + min(N, E * S)
        seen = []
        for b in range(nb):
            s, n, st, e = int(bslot[b]), int(blen[b]), int(bstart[b]), int(bexp[b])
            if s < 0:
                continue
            assert 0 < n <= bm
            rows = perm[st:st + n].long()
            assert bool((slots[rows] == s).all()) and bool((experts[rows] == e).all())
            seen += rows.tolist()
        assert sorted(seen) == sorted(torch.nonzero(slots >= 0).flatten().tolist())


LAYOUTS = [(DENSE, 2, 1, 1), (MOE, 4, 2, 2), (QWEN2_MOE, 2, 0, 1)]


@pytest.mark.parametrize("spec,tp,rank,ep", LAYOUTS, ids=["dense-tp2", "moe-tp4-ep2", "qwen2moe-tp2"])
def test_kernels_match_per_token_reference_fp32(spec, tp, rank, ep) -> None:
    par = ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep)
    check_dense_ops(spec, par, device=DEV, pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                    backend=TritonBackend)
    if spec.is_moe:
        check_expert_ops(spec, par, device=DEV, pool_dtype=torch.float32, act_dtype=torch.float32,
                         tol=FP32_TOL, backend=TritonBackend)


@pytest.mark.parametrize("tp", [1, 2])
def test_kernel_embedding_vocab_parallel(tp: int) -> None:
    check_embedding(DENSE, tp, device=DEV, pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                    backend=TritonBackend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_match_torch_path_on_random_mixed_batches(dtype) -> None:
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    assert kc.compare_dense(MOE, par, dtype, DEV, seed=3, trials=2) >= 8
    assert kc.compare_experts(MOE, par, dtype, DEV, seed=4) == 3 * MOE.num_hidden_layers


def test_rank_padding_is_never_read() -> None:
    """Slot 1 is rank 3 in a rank-8 pool: NaN planted in its padding never reaches any output (the torch
    path, which multiplies the padding's zeros, would return NaN)."""
    par = ParallelSpec(tp_size=2, tp_rank=0, ep_size=2)
    pool = make_pool(MOE, par, dtype=torch.float32)
    kc.poison_rank_padding(pool, slot=1, rank=3)
    batch = make_batch(slots=[1, 0, 1], tokens=[3, 2, 4])
    ops = LoRAOps(pool, batch, TritonBackend())
    T = batch.num_tokens
    for m in ("q", "o", "lm_head"):
        x = torch.randn(T, pool.shapes[m].a_shape[1])
        out = torch.zeros(T, pool.shapes[m].b_shape[0])
        ops.column(0, m, x, out)
        assert bool(torch.isfinite(out).all()) and bool(out.abs().sum() > 0), m
    x = torch.randn(8, MOE.hidden_size)
    out = torch.zeros(8, pool.shapes["experts.w1"].b_shape[0])
    le = par.local_experts(MOE)
    ops.experts_column(0, "experts.w1", x, ops.expert_routing(torch.arange(8), torch.full((8,), le.start)), out)
    assert bool(torch.isfinite(out).all())
    torch_out = torch.zeros_like(out)
    LoRAOps(pool, batch, TorchBackend()).experts_column(
        0, "experts.w1", x, ops.expert_routing(torch.arange(8), torch.full((8,), le.start)), torch_out)
    assert bool(torch.isnan(torch_out).any())   # the poison is real: a full-rank product sees it


@pytest.mark.parametrize("kind", ["huge", "inf", "nan"])
def test_kernels_isolate_rows_from_hostile_adapters(kind: str) -> None:
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    pool = make_pool(MOE, par, dtype=torch.float32, seed=1)
    kc.hostile_slot(pool, 2, kind)
    rng = random.Random({"huge": 1, "inf": 2, "nan": 3}[kind])
    for _ in range(2):
        kc.isolation_trial(pool, TritonBackend, rng, DEV, good_slots=[0, 1], bad_slots=[2],
                           ranks={0: 8, 1: 3, 2: 5})


def test_static_metadata_equals_eager(monkeypatch) -> None:
    """Static metadata (CUDA-graph mode: a block table and grid for 64 tokens, the used blocks read on the
    device) on a batch of a few blocks: bit for bit the eager result (a table of the batch's blocks), over
    several N tiles (16 wide here)."""
    monkeypatch.setitem(triton_kernels.FUSED_CONFIG, "block_n", 16)
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    pool = make_pool(MOE, par, dtype=torch.float32, seed=5)
    batch = make_batch(slots=[1, -1, 0], tokens=[3, 2, 4])
    T = batch.num_tokens
    static, eager = LoRAOps(pool, batch, TritonBackend(max_tokens=64)), LoRAOps(pool, batch, TritonBackend())
    assert static.backend.meta.grid_blocks > 2 * eager.backend.meta.grid_blocks
    g = torch.Generator().manual_seed(0)
    for m in ("q", "o", "lm_head"):
        x = torch.randn(T, pool.shapes[m].a_shape[1], generator=g)
        out = torch.randn(T, pool.shapes[m].b_shape[0], generator=g)
        o1, o2 = out.clone(), out.clone()
        static.column(0, m, x, o1)
        eager.column(0, m, x, o2)
        assert torch.equal(o1, o2), m
        assert not torch.equal(o1, out), m


@pytest.mark.parametrize("records,hoist", [(True, True), (False, False)], ids=["records", "tables"])
def test_fused_k_chunks_match_reference(monkeypatch, records: bool, hoist: bool) -> None:
    """The fused kernel's K chunks (16 columns here, so the tiny presets' K spans several; summed in chunk
    order by one program per block under the interpreter): still the per-token reference (fp32), with the
    blocks read from their records or from the tables (rows loaded after the rank test)."""
    monkeypatch.setitem(triton_kernels.FUSED_CONFIG, "chunk_k", 16)
    monkeypatch.setitem(triton_kernels.FUSED_CONFIG, "records", records)
    monkeypatch.setitem(triton_kernels.FUSED_CONFIG, "hoist", hoist)
    assert triton_kernels.fused_chunks(DENSE.hidden_size)[0] > 2
    par = ParallelSpec(tp_size=2, tp_rank=0)
    check_dense_ops(DENSE, par, device=DEV, pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                    backend=TritonBackend)


def test_two_launch_path_matches_reference(monkeypatch) -> None:
    """Pools above the fused kernel's max rank take the shrink/expand path: still the reference (fp32)."""
    monkeypatch.setattr(triton_kernels, "FUSED_MAX_RANK", 4)
    par = ParallelSpec(tp_size=4, tp_rank=2, ep_size=2)
    check_dense_ops(MOE, par, device=DEV, pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                    backend=TritonBackend)
    check_expert_ops(MOE, par, device=DEV, pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                     backend=TritonBackend)


def test_launch_key_separates_what_triton_specialises_on() -> None:
    """The compiled-handle launcher reuses a binary only for arguments Triton would specialise the same
    way: a tensor's dtype and 16-byte alignment, an int's value 1, divisibility by 16 and 32-bit range."""
    k = triton_kernels._key
    base = torch.zeros(64, dtype=torch.float32)
    assert k((base, 32)) == k((torch.zeros(8, dtype=torch.float32), 64))
    assert k((base, 32)) != k((base[1:], 32))                       # 4-byte offset: not 16-aligned
    assert k((base, 32)) != k((base.to(torch.bfloat16), 32))
    assert len({k((base, v)) for v in (1, 16, 17, 2 ** 31, 2 ** 31 + 1, 2 ** 63)}) == 6
    assert k((base, 48)) == k((base, 2 ** 30)) and k((base, 3)) == k((base, 5))
    assert k((base, 2 ** 31)) == k((base, -(2 ** 31) - 16))           # both int64, both divisible by 16


def test_next_pow2_is_tritons() -> None:
    import triton
    for n in list(range(1, 300)) + [4095, 4096, 4097, 14336, 2 ** 31 + 5]:
        assert triton_kernels._next_pow2(n) == triton.next_power_of_2(n), n
    assert triton_kernels._next_pow2(0) == 1


def test_memoised_launch_geometry_follows_the_tuning(monkeypatch) -> None:
    """The fused launch's geometry is memoised per op shape; changing a tuning key (as a sweep or a test
    does, also through monkeypatch) or a module-level switch it reads is seen by the next launch."""
    K = triton_kernels
    geo = lambda: K._fused_geometry(4096, 4096, 8, 16, 16, False, torch.bfloat16,  # noqa: E731
                                    torch.device("cpu"), True, True)
    before = geo()
    assert geo() is before                                        # memoised
    monkeypatch.setitem(K.FUSED_CONFIG, "block_n", 32)
    assert geo()[6]["BLOCK_N"] == 32 and before[6]["BLOCK_N"] == 256
    monkeypatch.setitem(K.FUSED_CONFIG, "chunk_k", 1024)
    assert geo()[:2] == (4, 1024)
    monkeypatch.setattr(K, "FUSED_MAX_RANK", 8)
    assert geo()[6]["RT"] == 16
    monkeypatch.undo()
    assert geo()[6] == before[6] and geo()[:2] == before[:2]
    saved = dict(K.FUSED_CONFIG)
    try:
        K.FUSED_CONFIG |= {"block_n": 64}                         # every way of changing the table counts
        assert geo()[6]["BLOCK_N"] == 64
    finally:
        K.FUSED_CONFIG.clear()
        K.FUSED_CONFIG.update(saved)
    assert geo()[6] == before[6]


def test_fast_path_key_is_the_key_of_the_arguments(monkeypatch) -> None:
    """With the compiled-handle path on, every launch's key is composed from memoised segments (a layer's
    factors, the batch's tables) and the per-call parts: it must equal ``_key`` of the arguments as
    launched, in signature order, for the fused launch (dense decode, experts), the two launches (dense
    prefill, the experts' wide regime without the fused kernel), across batches (new tables) and with other
    x / out strides; and the tables launched are always the current batch's."""
    K = triton_kernels
    seen: list = []

    def record(self, grid, args, consts, num_warps=4, num_stages=3, pdl=False, tail=None, key=None):
        seen.append((self.fn, args, key, tail, consts))

    monkeypatch.setattr(K._Launcher, "__call__", record)
    monkeypatch.setattr(K, "DIRECT", True)
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    pool = make_pool(MOE, par, dtype=torch.float32, device=DEV, seed=3)
    backend = TritonBackend()
    local = par.local_experts(MOE)
    kernels = set()
    for trial, (slots, lens, wide) in enumerate((([0, 1, -1, 2], [3, 5, 2, 4], False),
                                                 ([2, -1, 1, 1, 0], [3, 5, 2, 4, 1], True),
                                                 ([1, 0, -1], [300, 250, 20], False))):   # 570 tokens: prefill
        monkeypatch.setattr(K, "EXPERT_FUSED_ROWS", 0 if wide else 4096)
        monkeypatch.setattr(K, "EXPERT_WIDE_FUSED", False)
        batch = build_batch(slots, [None] * len(slots), lens, {0: 8, 1: 3, 2: 5}, torch.device(DEV), None)
        ops = LoRAOps(pool, batch, backend)
        T = batch.num_tokens
        x = torch.randn(T, MOE.hidden_size + 4 * trial)[:, :MOE.hidden_size]
        out = torch.zeros(T, pool.shapes["q"].b_shape[0])
        tok = torch.arange(T).repeat_interleave(2)
        ex = (torch.arange(2 * T) * 3) % len(local) + local.start
        for _ in range(2):
            seen.clear()
            ops.column(0, "q", x, out)
            ops.column(1, "q", x, out)
            ops.experts_column(0, "experts.w1", x.repeat_interleave(2, 0), ops.expert_routing(tok, ex),
                               torch.zeros(2 * T, pool.shapes["experts.w1"].b_shape[0]))
            dense = [s for s in seen if s[0] in (K._fused.fn, K._shrink.fn, K._expand.fn)]
            for fn, args, key, tail, consts in dense:
                assert key == K._key(args), (fn, trial)
                assert tail == (tuple(consts.values()),) + tail[1:]
                kernels.add(fn)
            m = backend.meta
            first = dense[0][1]
            assert first[0] is x                                       # fused and shrink: x first
            if dense[0][0] is K._fused.fn:
                assert first[16] is out and first[19] is m.perm and first[24] is m.slot_rank
                A, B, sc = pool.A["q"][:, 1], pool.B["q"][:, 1], pool.scaling["q"][:, 1, 0]
                assert torch.equal(dense[1][1][3], A) and torch.equal(dense[1][1][8], B) and \
                    torch.equal(dense[1][1][13], sc)
            else:                                                      # prefill: shrink, expand
                assert m.prefill and first[16] is m.perm and first[21] is m.slot_rank
                assert dense[1][1][12] is out and dense[1][1][15] is m.perm
                assert torch.equal(dense[3][1][4], pool.B["q"][:, 1])
    assert kernels == {K._fused.fn, K._shrink.fn, K._expand.fn}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-launch"])
def test_expert_wide_regime_matches_reference(monkeypatch, fused: bool) -> None:
    """The expert op's wide regime (above ``EXPERT_FUSED_ROWS`` routed rows; lowered to 0 here so every
    routing is wide): 64-row (expert, slot) blocks through the fused kernel or the two launches, against the
    per-token reference (fp32, 1e-5) and the torch path on random routing."""
    monkeypatch.setattr(triton_kernels, "EXPERT_FUSED_ROWS", 0)
    monkeypatch.setattr(triton_kernels, "EXPERT_WIDE_BLOCK_M", 64)
    monkeypatch.setattr(triton_kernels, "EXPERT_WIDE_FUSED", fused)
    assert triton_kernels.expert_regime(1) == (64, fused)
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    check_expert_ops(MOE, par, device=DEV, pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                     backend=TritonBackend)
    assert kc.compare_experts(MOE, par, torch.float32, DEV, seed=6, rows=90) == 3 * MOE.num_hidden_layers


def test_fused_stages_deepen_only_where_they_were_timed():
    """The tuned depth (4) for 2-byte activations up to rank tile 64 (the H200 sweep's cases); fp32 and
    rank tile 128 keep at most 3 (four fp32 stages of a 128 rank tile need more shared memory than an
    H100 has)."""
    f = triton_kernels.fused_stages
    tuned = triton_kernels.FUSED_CONFIG["num_stages"]
    assert f(torch.bfloat16, 16) == f(torch.float16, 64) == tuned
    assert f(torch.float32, 16) == f(torch.bfloat16, 128) == f(torch.float32, 128) == min(tuned, 3)


def test_shrink_stages_fit_the_shared_memory():
    """The shrink keeps its tuned depth where the stages fit (bf16 prefill tiles up to rank tile 128) and
    takes fewer where they would not: float32 prefill at rank tile 64 / 128 (64 / 96 KiB a stage), bf16
    decode at rank tile 128 (256-column K tiles: 72 KiB a stage); never zero."""
    f = triton_kernels.shrink_stages
    tuned = triton_kernels.TWO_LAUNCH_CONFIG["shrink_stages"]
    assert f(torch.bfloat16, 64, 128, 16) == f(torch.bfloat16, 64, 128, 128) == tuned == 4
    assert f(torch.float32, 64, 128, 64) == 3 and f(torch.float32, 64, 128, 128) == 2
    assert f(torch.bfloat16, 16, 256, 128) == 3
    for dt in (torch.float32, torch.bfloat16):
        for rt in (16, 64, 128):
            n = f(dt, 64, 128, rt)
            assert 1 <= n and n * (64 + rt) * 128 * dt.itemsize <= triton_kernels.SHRINK_SMEM


PREFILL_CONFIGS = [dict(), dict(reduce=False, p_low=False, prefill_splits=0), dict(shrink_rows=16),
                   dict(shrink_rows=32, prefill_split=1 << 20, p_low=True),
                   dict(prefill_split=16, reduce=True, p_low=True),
                   dict(expand_tiles=3, expand_tiles_wide=3, expand_block_n=16, expand_block_n_wide=16)]


@pytest.mark.parametrize("cfg", PREFILL_CONFIGS, ids=["defaults", "expand-sums-splits", "sub16",
                                                      "sub32-one-split-low", "reduce-4-splits", "expand-walk"])
def test_prefill_two_launch_tunings_match_torch_path(monkeypatch, cfg: dict) -> None:
    """The dense prefill regime (``PREFILL_TOKENS`` lowered to 8, so random batches of up to 40-token
    requests take 64-row blocks and the two launches) with each shrink tuning the benchmark sweeps: shrink
    programs over sub-blocks of a block, one K split with P in the compute dtype. fp32 and bf16 against the
    torch path; base-only rows unchanged."""
    from tp_lora.ops import meta
    monkeypatch.setattr(meta, "PREFILL_TOKENS", 8)
    for k, v in cfg.items():
        monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, k, v)
    par = ParallelSpec(tp_size=2, tp_rank=1)
    for dtype in (torch.float32, torch.bfloat16):
        assert kc.compare_dense(DENSE, par, dtype, DEV, seed=11, trials=2, max_len=40) >= 8


@pytest.mark.parametrize("split", [1 << 20, 16], ids=["one-split", "four-splits"])
def test_prefill_shrink_sub_blocks_and_low_p_keep_the_bits(monkeypatch, split: int) -> None:
    """Sub-blocks only change which program computes a row; P in the compute dtype is the rounding the
    expand makes anyway; the shrink's split reduction adds the splits in the order the expand would: bf16,
    every tuning gives the same bits as the whole-block, float32-P shrink whose splits the expand sums (and
    the sub-blocks really are several programs a block, the splits several programs a sub-block)."""
    from tp_lora.ops import meta
    monkeypatch.setattr(meta, "PREFILL_TOKENS", 8)
    monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "prefill_split", split)
    pool = make_pool(DENSE, ParallelSpec(tp_size=2, tp_rank=0), dtype=torch.bfloat16, seed=4)
    K = pool.shapes["q"].a_shape[1]
    assert -(-K // triton_kernels.split_size(K, True)) == (1 if split > K else 4)
    batch = make_batch(slots=[0, -1, 1, 2], tokens=[37, 5, 20, 50])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch.num_tokens, pool.shapes["q"].a_shape[1], generator=g).to(torch.bfloat16)
    out = torch.randn(batch.num_tokens, pool.shapes["q"].b_shape[0], generator=g).to(torch.bfloat16)
    got = []
    for rows, low, red in ((0, False, False), (16, False, False), (16, True, False), (32, True, True),
                           (0, False, True)):
        monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "shrink_rows", rows)
        monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "p_low", low)
        monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "reduce", red)
        assert triton_kernels.shrink_rows(64) == (rows or 64)
        ops = LoRAOps(pool, batch, TritonBackend())
        assert ops.backend.meta.prefill and ops.backend.meta.block_m == 64
        o = out.clone()
        ops.column(0, "q", x, o)
        got.append(o)
        if red and split < K:       # the counters the reduction used are back to zero
            cnt = ops.backend._scratch.red
            assert cnt is not None and int(cnt.abs().sum()) == 0
    assert not torch.equal(got[0], out)
    for o in got[1:]:
        assert torch.equal(o, got[0])


@pytest.mark.parametrize("wide", [False, True], ids=["rank-tile-16", "rank-tile-64-mixed"])
def test_prefill_expand_walk_keeps_the_bits(monkeypatch, wide: bool) -> None:
    """The expand walking several N tiles a program (``expand_tiles``; P loaded once, the next tile's loads
    ahead) computes each tile as one program a tile does. Under the interpreter (its elementwise product) that
    is the same bits, bf16 and fp32, for a rank-16 pool
    and a mixed pool of rank tile 64 (slots of rank 40, 3 and 24: both of its kernel branches), with tile
    counts that leave the last program a partial walk; base-only rows unchanged."""
    from tp_lora.ops import meta
    monkeypatch.setattr(meta, "PREFILL_TOKENS", 8)
    monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "expand_block_n", 16)
    monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "expand_block_n_wide", 16)
    ranks = (40, 3, 24) if wide else SLOT_RANKS
    for dtype in (torch.bfloat16, torch.float32):
        pool = GpuPool(DENSE, ParallelSpec(), max_loras=3, max_rank=max(ranks), modules=("q", "down"),
                       dtype=dtype, device=DEV)
        g = torch.Generator().manual_seed(5)
        for m in pool.modules:
            for s, r in enumerate(ranks):
                pool.A[m][s][..., :r, :] = (torch.randn(pool.A[m][s][..., :r, :].shape, generator=g) * 0.3).to(dtype)
                pool.B[m][s][..., :r] = (torch.randn(pool.B[m][s][..., :r].shape, generator=g) * 0.3).to(dtype)
                pool.scaling[m][s].fill_(0.5 + s)
        slots, toks = [0, -1, 1, 2], [37, 5, 20, 50]
        batch = build_batch(slots, [None if s < 0 else f"ad{s}" for s in slots], toks,
                            {s: ranks[s] for s in slots if s >= 0}, torch.device(DEV), None)
        for module in ("q", "down"):
            shape = pool.shapes[module]
            N = shape.b_shape[0]
            assert -(-N // 16) % 3 != 0          # three tiles a program: the last walk is partial
            x = torch.randn(batch.num_tokens, shape.a_shape[1], generator=g).to(dtype)
            out = torch.randn(batch.num_tokens, N, generator=g).to(dtype)
            got = []
            for nt in (1, 2, 3, 64):
                monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "expand_tiles", nt)
                monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "expand_tiles_wide", nt)
                ops = LoRAOps(pool, batch, TritonBackend())
                assert ops.backend.meta.prefill
                o = out.clone()
                ops.column(0, module, x, o)
                got.append(o)
            base = batch.token_slots < 0
            assert not torch.equal(got[0], out) and torch.equal(got[0][base], out[base])
            for o in got[1:]:
                assert torch.equal(o, got[0]), (module, dtype)


def test_prefill_shrink_items_of_the_used_blocks_only(monkeypatch) -> None:
    """The shrink runs one program per work item (rank tile, used block, sub-block, K split), numbered from
    program 0, in a grid sized for the static table: with a capacity far above the batch (most of the table
    unused), three rank tiles (max rank 40, a 16-wide tile), two sub-blocks and four splits, it gives the
    eager result (a table of the batch's blocks only) bit for bit, and the torch path within fp32's
    tolerance; the reduction's counters are all back to zero after both."""
    from tp_lora.device.pool import GpuPool
    from tp_lora.ops import meta
    monkeypatch.setattr(meta, "PREFILL_TOKENS", 8)
    monkeypatch.setattr(triton_kernels, "FUSED_MAX_RANK", 16)
    monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "shrink_rows", 32)
    monkeypatch.setitem(triton_kernels.TWO_LAUNCH_CONFIG, "prefill_split", 16)
    ranks = {0: 40, 1: 10, 2: 33}
    pool = GpuPool(DENSE, ParallelSpec(tp_size=2, tp_rank=1), max_loras=4, max_rank=40, modules=("q",),
                   dtype=torch.float32, device=DEV)
    g = torch.Generator().manual_seed(8)
    for s, r in ranks.items():
        A, B = pool.A["q"][s], pool.B["q"][s]
        A[..., :r, :] = torch.randn(A[..., :r, :].shape, generator=g) * 0.3
        B[..., :r] = torch.randn(B[..., :r].shape, generator=g) * 0.3
    pool.scaling["q"].uniform_(0.5, 2.0, generator=g)
    slots, tokens = [2, -1, 0, 1, 0], [70, 5, 20, 9, 41]
    batch = build_batch(slots, [None if s < 0 else f"ad{s}" for s in slots], tokens,
                        {s: ranks[s] for s in slots if s >= 0}, torch.device(DEV), None)
    K = pool.shapes["q"].a_shape[1]
    grid, _, sub_m, rt = triton_kernels.shrink_grid(K, 1, 64, pool.max_rank)
    assert (grid[0], 64 // sub_m, rt) == (3, 2, 16) and grid[2] >= 4
    T = batch.num_tokens
    x = torch.randn(T, K, generator=g)
    out = torch.randn(T, pool.shapes["q"].b_shape[0], generator=g)
    static = LoRAOps(pool, batch, TritonBackend(max_tokens=4 * T))
    eager = LoRAOps(pool, batch, TritonBackend())
    assert static.backend.meta.prefill and eager.backend.meta.prefill
    used = int(static.backend.meta.nblk[0])
    assert used == eager.backend.meta.grid_blocks and static.backend.meta.grid_blocks > 3 * used
    got = []
    for ops in (static, eager):
        o = out.clone()
        ops.column(0, "q", x, o)
        got.append(o)
        assert int(ops.backend._scratch.red.abs().sum()) == 0
    assert torch.equal(got[0], got[1])
    ref = out.clone()
    LoRAOps(pool, batch, TorchBackend()).column(0, "q", x, ref)
    assert not torch.equal(ref, out)
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)


def test_pdl_only_on_compiled_hopper_launches(monkeypatch) -> None:
    """A launch is a programmatic dependent launch (the prefill expand of its shrink: ``pdl``; the decode
    fused kernel of the kernel before it: ``FUSED_CONFIG["pdl"]``) only where its switch is set, the
    kernels are compiled (never under the interpreter) and the GPU has grid dependency control
    (capability >= 9.0)."""
    K = triton_kernels
    assert K.TWO_LAUNCH_CONFIG["pdl"] is True           # the default (H200 sweep 2026-12-03b)
    cuda = torch.device("cuda", 0)
    assert not K.pdl_ok(cuda)                          # this process: the interpreter
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setitem(K._PDL, 0, True)
    assert K.pdl_ok(cuda) and not K.pdl_ok(torch.device("cpu"))
    monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "pdl", False)
    assert not K.pdl_ok(cuda)
    monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "pdl", True)
    # the fused kernel's own switch (a dependent of the kernel before it, waiting first), on by default
    assert K.FUSED_CONFIG["pdl"] is True
    assert K.pdl_ok(cuda, K.FUSED_CONFIG["pdl"]) and not K.pdl_ok(cuda, False)
    monkeypatch.setitem(K._PDL, 0, False)               # an Ampere GPU
    assert not K.pdl_ok(cuda)


_SM90_COMPILE = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tp_lora.ops import triton_kernels as K

def build(fn, consts, ptrs, **opts):
    names = list(fn.arg_names)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in names}
    cx = {(names.index(n),): v for n, v in consts.items()}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    ptx = k.asm["ptx"]
    return ptx.count("griddepcontrol.wait"), ptx.count("griddepcontrol.launch_dependents"), bool(k.metadata.launch_pdl)

for gdc in (False, True):
    for nt in (1, 4):
        e = build(K._expand_kernel, dict(SPLITS=1, HAS_EXPERT=False, IEEE=False, UPCAST=False, CDT=tl.bfloat16,
                  BLOCK_M=64, BLOCK_N=128, RT=16, GDC=gdc, NT=nt), {"p_ptr": "*bf16", "b_ptr": "*bf16",
                  "sc_ptr": "*fp32", "out_ptr": "*bf16"}, num_warps=4, num_stages=1, launch_pdl=gdc)
        print("expand" if nt == 1 else "expand-walk", gdc, *e)
    s = build(K._shrink_kernel, dict(HAS_EXPERT=False, IEEE=False, UPCAST=False, BLOCK_M=64, SUB=1, RT=16,
              BLOCK_K=256, SPLITS=4, REDUCE=True, UNROLL=False, GDC=gdc), {"x_ptr": "*bf16", "a_ptr": "*bf16",
              "p_ptr": "*fp32", "q_ptr": "*bf16"}, num_warps=4, num_stages=4)
    print("shrink", gdc, *s)
"""


def test_pdl_launches_compile_for_sm90_with_grid_dependency_control() -> None:
    """Compiled ahead of time for sm_90 (no GPU needed; a clean process, without the interpreter): with
    ``GDC`` the expand waits (``griddepcontrol.wait``) and is marked for a programmatic dependent launch,
    the shrink lets its dependent start (``launch_dependents``); without it neither instruction is there."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() or "GPUTarget" in r.stderr):
        pytest.skip("this Triton cannot compile for sm_90 here: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert "expand False 0 0 False" in lines and "shrink False 0 0 False" in lines, r.stdout
    assert "expand True 1 0 True" in lines and "shrink True 0 1 False" in lines, r.stdout
    assert "expand-walk False 0 0 False" in lines and "expand-walk True 1 0 True" in lines, r.stdout

"""The Triton backend on CUDA: exactness against the per-token reference and the torch path, per-slot rank,
row isolation, and a decode step with LoRA captured in a CUDA graph that replays with other adapter mixes
(and base-only rows) without re-capture. Skipped without CUDA.

Tolerances: ``tests/support/kernel_checks.py`` (float32 1e-5 * (mag + 1); bf16 12u * mag against the torch path).
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")]


if torch.cuda.is_available():
    from support import kernel_checks as kc  # noqa: E402
    from test_ops import DENSE, MOE, QWEN2_MOE, make_pool, check_dense_ops, check_embedding  # noqa: E402
    from test_ops import check_expert_ops  # noqa: E402
    from tp_lora.ops.layer import LoRAOps, TorchBackend, default_backend  # noqa: E402
    from tp_lora.ops.triton_backend import TritonBackend  # noqa: E402
    from tp_lora.plan.parallel import ParallelSpec  # noqa: E402
    from tp_lora.runtime.batch import build_batch  # noqa: E402

FP32_TOL = lambda ref, mag: 1e-5 * (mag + 1.0)   # noqa: E731
LAYOUTS = [(DENSE, 2, 1, 1), (MOE, 4, 3, 2), (QWEN2_MOE, 2, 0, 1)] if torch.cuda.is_available() else []


def _captured(fn) -> "torch.cuda.CUDAGraph":
    """``fn`` run once eagerly (compiles, warms up), once on a side stream, then captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def test_default_backend_on_cuda_is_triton() -> None:
    assert isinstance(default_backend("cuda"), TritonBackend)
    assert isinstance(default_backend("cpu"), TorchBackend)


@pytest.mark.parametrize("spec,tp,rank,ep", LAYOUTS, ids=["dense-tp2", "moe-tp4-ep2", "qwen2moe-tp2"][:len(LAYOUTS)])
def test_kernels_fp32_match_reference(spec, tp, rank, ep) -> None:
    par = ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep)
    check_dense_ops(spec, par, device="cuda", pool_dtype=torch.float32, act_dtype=torch.float32,
                    tol=FP32_TOL, backend=TritonBackend)
    if spec.is_moe:
        check_expert_ops(spec, par, device="cuda", pool_dtype=torch.float32, act_dtype=torch.float32,
                         tol=FP32_TOL, backend=TritonBackend)
    check_embedding(DENSE, tp, device="cuda", pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                    backend=TritonBackend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernels_match_torch_path_random_mixed(dtype, seed) -> None:
    par = ParallelSpec(tp_size=2, tp_rank=seed % 2, ep_size=2)
    assert kc.compare_dense(MOE, par, dtype, "cuda", seed=seed, trials=4) >= 16
    assert kc.compare_experts(MOE, par, dtype, "cuda", seed=seed, rows=200) == 3 * MOE.num_hidden_layers


def test_rank_padding_never_read_cuda() -> None:
    par = ParallelSpec(tp_size=2, tp_rank=0, ep_size=2)
    pool = make_pool(MOE, par, dtype=torch.bfloat16, device="cuda")
    kc.poison_rank_padding(pool, slot=1, rank=3)
    batch = build_batch([1, 0, 1], [None] * 3, [3, 2, 40], {0: 8, 1: 3}, torch.device("cuda"), None)
    ops = LoRAOps(pool, batch, TritonBackend())
    T = batch.num_tokens
    for m in ("q", "o", "lm_head"):
        x = torch.randn(T, pool.shapes[m].a_shape[1], device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(T, pool.shapes[m].b_shape[0], device="cuda", dtype=torch.bfloat16)
        ops.column(0, m, x, out)
        assert bool(torch.isfinite(out).all()) and bool(out.abs().sum() > 0), m


@pytest.mark.parametrize("kind", ["huge", "inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_isolation_cuda(kind, dtype) -> None:
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    for backend, indep in ((TritonBackend, True), (TorchBackend, False)):
        pool = make_pool(MOE, par, dtype=dtype, device="cuda", seed=1)
        kc.hostile_slot(pool, 2, kind)
        rng = random.Random(7)
        for _ in range(4):
            kc.isolation_trial(pool, backend, rng, "cuda", good_slots=[0, 1], bad_slots=[2],
                               ranks={0: 8, 1: 3, 2: 5}, row_independent=indep)


def test_cuda_graph_decode_step_replays_other_adapter_mixes() -> None:
    """One captured decode step (q/o/lm_head, embedding and the fused experts of a layer, base-only rows
    included) replays with three other adapter mixes, and equals an eager run of each mix."""
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    pool = make_pool(MOE, par, dtype=torch.bfloat16, device="cuda", seed=3)
    T = 12
    ranks = {0: 8, 1: 3, 2: 5}
    mixes = [[0] * T, [0, 1, 2, -1] * 3, [-1] * (T - 1) + [2], [2, 2, 1, 1, -1, -1, 0, 0, 1, 2, -1, 0]]
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(T, MOE.hidden_size, device="cuda", dtype=bf, generator=g)
    xo = torch.randn(T, pool.shapes["o"].a_shape[1], device="cuda", dtype=bf, generator=g)
    ids = torch.randint(0, MOE.vocab_size, (T,), device="cuda", generator=g)
    local = par.local_experts(MOE)
    tok = torch.arange(T, device="cuda").repeat_interleave(2)
    ex = (torch.arange(2 * T, device="cuda") * 5) % len(local) + local.start
    outs = {"q": torch.empty(T, pool.shapes["q"].b_shape[0], device="cuda", dtype=bf),
            "o": torch.empty(T, MOE.hidden_size, device="cuda", dtype=bf),
            "lm_head": torch.empty(T, pool.shapes["lm_head"].b_shape[0], device="cuda", dtype=bf),
            "embed": torch.empty(T, MOE.hidden_size, device="cuda", dtype=bf),
            "w1": torch.empty(2 * T, pool.shapes["experts.w1"].b_shape[0], device="cuda", dtype=bf)}
    base = {k: torch.randn(v.shape, device="cuda", dtype=bf, generator=g) for k, v in outs.items()}
    xe = x.repeat_interleave(2, 0)

    def step(ops: LoRAOps) -> None:
        for k, v in outs.items():
            v.copy_(base[k])
        ops.column(0, "q", x, outs["q"])
        ops.row(0, "o", xo, outs["o"])
        ops.lm_head(x, outs["lm_head"])
        ops.embedding(ids, outs["embed"])
        ops.experts_column(0, "experts.w1", xe, ops.expert_routing(tok, ex), outs["w1"])

    def batch_of(slots):
        return build_batch(slots, [None] * T, [1] * T, {s: ranks[s] for s in slots if s >= 0},
                           torch.device("cuda"), None)

    backend = TritonBackend(max_tokens=16)
    ops = LoRAOps(pool, batch_of(mixes[0]), backend)
    graph = _captured(lambda: step(ops))
    for mix in mixes[1:] + mixes[:1]:
        batch = batch_of(mix)
        LoRAOps(pool, batch, backend)          # rewrites the static metadata in place
        graph.replay()
        got = {k: v.clone() for k, v in outs.items()}
        step(LoRAOps(pool, batch, TritonBackend()))   # eager, fresh metadata
        for k in outs:
            assert torch.equal(got[k], outs[k]), f"mix {mix}: {k} replay != eager"
        slots = torch.tensor(mix, device="cuda")
        base_rows = slots < 0
        for k in ("q", "o", "lm_head", "embed"):
            assert torch.equal(got[k][base_rows], base[k][base_rows]), (mix, k)
            assert bool((got[k][~base_rows] != base[k][~base_rows]).any()) or not bool((~base_rows).any())
        assert torch.equal(got["w1"][base_rows.repeat_interleave(2)], base["w1"][base_rows.repeat_interleave(2)])
    # a batch beyond the static capacity is refused with a clear error (no silent truncation)
    from tp_lora.ops.meta import MetaCapacityError
    big = build_batch([0], [None], [17], {0: 8}, torch.device("cuda"), None)
    with pytest.raises(MetaCapacityError, match="17 tokens exceeds"):
        LoRAOps(pool, big, backend)


def test_direct_launch_equals_jit_launch(monkeypatch) -> None:
    """The launcher's fast path (the compiled kernel through its handle) computes what JITFunction.run
    launches, bit for bit, for the dense and the fused expert op (first call compiles, later calls hit the
    cache, also with other x/out tensors and strides)."""
    from tp_lora.ops import triton_kernels as K
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    pool = make_pool(MOE, par, dtype=torch.bfloat16, device="cuda", seed=4)
    batch = build_batch([0, 1, -1, 2], [None] * 4, [3, 5, 2, 4], {0: 8, 1: 3, 2: 5}, torch.device("cuda"), None)
    T = batch.num_tokens
    g = torch.Generator(device="cuda").manual_seed(1)
    local = par.local_experts(MOE)
    tok = torch.arange(T, device="cuda").repeat_interleave(2)
    ex = (torch.arange(2 * T, device="cuda") * 3) % len(local) + local.start

    def run(direct: bool, x, xe, out, oute):
        monkeypatch.setattr(K, "DIRECT", direct)
        ops = LoRAOps(pool, batch, TritonBackend())
        o, oe = out.clone(), oute.clone()
        ops.column(0, "q", x, o)
        ops.experts_column(0, "experts.w1", xe, ops.expert_routing(tok, ex), oe)
        return o, oe

    for trial in range(3):
        x = torch.randn(T, MOE.hidden_size + 8 * trial, device="cuda", dtype=torch.bfloat16, generator=g)
        x = x[:, :MOE.hidden_size]          # another row stride each trial
        xe = torch.randn(2 * T, MOE.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
        out = torch.randn(T, pool.shapes["q"].b_shape[0], device="cuda", dtype=torch.bfloat16, generator=g)
        oute = torch.randn(2 * T, pool.shapes["experts.w1"].b_shape[0], device="cuda", dtype=torch.bfloat16,
                           generator=g)
        ref = run(False, x, xe, out, oute)
        for _ in range(2):
            got = run(True, x, xe, out, oute)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), trial
    assert K._fused.cache, "the fast path was never taken"


def test_two_launch_path_cuda(monkeypatch) -> None:
    """Pools above the fused kernel's max rank take the shrink/expand path: fp32 reference, bf16 torch path."""
    from tp_lora.ops import triton_kernels as K
    monkeypatch.setattr(K, "FUSED_MAX_RANK", 4)
    par = ParallelSpec(tp_size=4, tp_rank=3, ep_size=2)
    check_dense_ops(MOE, par, device="cuda", pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                    backend=TritonBackend)
    check_expert_ops(MOE, par, device="cuda", pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                     backend=TritonBackend)
    assert kc.compare_dense(MOE, par, torch.bfloat16, "cuda", seed=5, trials=2) >= 8


@pytest.mark.parametrize("bm,fused", [(64, True), (64, False), (16, True)],
                         ids=["bm64-fused", "bm64-two", "bm16-fused"])
def test_expert_wide_regime_cuda(monkeypatch, bm: int, fused: bool) -> None:
    """The expert op's wide regime (``EXPERT_FUSED_ROWS`` lowered to 0: every routing is wide) with each
    block size / kernel the benchmark sweeps: fp32 per-token reference, bf16 and fp32 torch path."""
    from tp_lora.ops import triton_kernels as K
    monkeypatch.setattr(K, "EXPERT_FUSED_ROWS", 0)
    monkeypatch.setattr(K, "EXPERT_WIDE_BLOCK_M", bm)
    monkeypatch.setattr(K, "EXPERT_WIDE_FUSED", fused)
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    check_expert_ops(MOE, par, device="cuda", pool_dtype=torch.float32, act_dtype=torch.float32, tol=FP32_TOL,
                     backend=TritonBackend)
    for dtype in (torch.float32, torch.bfloat16):
        assert kc.compare_experts(MOE, par, dtype, "cuda", seed=7, rows=300) == 3 * MOE.num_hidden_layers


@pytest.mark.parametrize("records", [True, False], ids=["records", "tables"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_fused_kernel_large_k(dtype, records, monkeypatch) -> None:
    """Llama-3-8B q/down shapes (K 4096 / 14336): the decode regime's fused kernel splits K into 16 / 14
    chunks over several programs per block that meet on the device. fp32 against the float64 per-token
    delta (1e-5 * (mag + 1)), bf16 against the torch path (12u * mag); ranks 16/64/8/40 (two rank tiles), base-only rows
    untouched; repeated eager calls and CUDA-graph replays (static metadata, other mixes) bit for bit equal;
    the per-block counters are back to zero after each launch."""
    import dataclasses
    from tp_lora.device.pool import GpuPool
    from tp_lora.ops import triton_kernels as K
    from tp_lora.plan.model import ModelSpec
    monkeypatch.setitem(K.FUSED_CONFIG, "records", records)     # blocks from their records or the tables
    monkeypatch.setitem(K.FUSED_CONFIG, "hoist", records)
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=1)
    pool = GpuPool(spec, ParallelSpec(), max_loras=4, max_rank=64, modules=("q", "down"), dtype=dtype,
                   device="cuda")
    ranks = {0: 16, 1: 64, 2: 8, 3: 40}
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in pool.modules:
        for s, r in ranks.items():
            pool.A[m][s].zero_()
            pool.B[m][s].zero_()
            pool.A[m][s][..., :r, :] = (torch.randn(pool.A[m][s][..., :r, :].shape, device="cuda", generator=g)
                                        * 0.05).to(dtype)
            pool.B[m][s][..., :r] = (torch.randn(pool.B[m][s][..., :r].shape, device="cuda", generator=g)
                                     * 0.05).to(dtype)
        pool.scaling[m].uniform_(0.5, 2.0, generator=g)
    rng = random.Random(3)
    backend = TritonBackend(max_tokens=40)
    for trial in range(3):
        slots = [rng.choice([-1, 0, 1, 2, 3]) for _ in range(9)]
        lens = [rng.randint(1, 4) for _ in slots]
        batch = build_batch(slots, [None] * len(slots), lens, {s: ranks[s] for s in slots if s >= 0},
                            torch.device("cuda"), None)
        T = batch.num_tokens
        tok_slots = torch.tensor([s for s, n in zip(slots, lens) for _ in range(n)])
        for m in ("q", "down"):
            Kdim = pool.shapes[m].a_shape[1]
            assert K.fused_chunks(Kdim)[0] > 1
            x = torch.randn(T, Kdim, device="cuda", generator=g).to(dtype)
            out = torch.randn(T, pool.shapes[m].b_shape[0], device="cuda", generator=g).to(dtype)
            ops = LoRAOps(pool, batch, TritonBackend())
            o1, o2 = out.clone(), out.clone()
            ops.column(0, m, x, o1)
            ops.column(0, m, x, o2)
            assert torch.equal(o1, o2), "two eager calls differ"
            assert int(ops.backend._scratch.cnt.abs().sum()) == 0, "block counters not reset"
            base = tok_slots < 0
            assert torch.equal(o1[base.cuda()], out[base.cuda()])
            # float64 per-token delta and magnitude
            xd, od = x.double().cpu(), out.double().cpu()
            ref, mag = od.clone(), od.abs().clone()
            fac = {s: (pool.A[m][s, 0, :r].double().cpu(), pool.B[m][s, 0, :, :r].double().cpu(),
                       float(pool.scaling[m][s, 0, 0])) for s, r in ranks.items()}
            for t, s in enumerate(tok_slots.tolist()):
                if s < 0:
                    continue
                A, B, sc = fac[s]
                ref[t] += sc * (B @ (A @ xd[t]))
                mag[t] += abs(sc) * (B.abs() @ (A.abs() @ xd[t].abs()))
            if dtype == torch.float32:
                assert bool(((o1.double().cpu() - ref).abs() <= 1e-5 * (mag + 1)).all()), m
            else:
                o_t = out.clone()
                LoRAOps(pool, batch, TorchBackend()).column(0, m, x, o_t)
                assert bool(((o1.double() - o_t.double()).abs().cpu() <= kc.tol_for(dtype)(mag)).all()), m
            # the same inside a CUDA graph on static metadata, replayed twice
            LoRAOps(pool, batch, backend)
            xg, og = x.clone(), out.clone()
            run = lambda: LoRAOps.column(ops_g, 0, m, xg, og)  # noqa: E731
            ops_g = LoRAOps(pool, batch, backend)
            run()
            torch.cuda.synchronize()
            s_ = torch.cuda.Stream()
            s_.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s_):
                og.copy_(out)
                run()
            torch.cuda.current_stream().wait_stream(s_)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            for _ in range(2):
                og.copy_(out)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(og, o1), f"{m}: replay != eager"
            assert int(backend._scratch.cnt.abs().sum()) == 0


def _same_bits_alone_and_unsplit(monkeypatch, pool, alone, m: str, x, out, batched, what: str) -> None:
    """The first request's rows of ``batched`` (``out`` plus the delta of a batch of many blocks) are bit for
    bit those of that request alone (few blocks: many programs a block) and alone with one program a block
    (``fused_meet`` 1: no meeting); the delta is not zero."""
    from tp_lora.ops import triton_kernels as K
    n = alone.num_tokens
    oa = out[:n].clone()
    LoRAOps(pool, alone, TritonBackend()).column(0, m, x[:n], oa)
    assert not torch.equal(oa, out[:n]), what
    assert torch.equal(batched[:n], oa), f"{what}: batched != alone"
    with monkeypatch.context() as mp:
        mp.setattr(K, "fused_meet", lambda device, split: 1)
        o1 = out[:n].clone()
        LoRAOps(pool, alone, TritonBackend()).column(0, m, x[:n], o1)
    assert torch.equal(o1, oa), f"{what}: one program a block != split"


def test_fused_split_bits_do_not_depend_on_the_batch(monkeypatch) -> None:
    """The number of programs sharing a block (``G``, from the used blocks on the device) never changes a
    row's bits: a request's rows of q / down (Llama-3-8B, K split into chunks) are bit for bit the same
    alone (G = all chunks), in a batch of many blocks (small G) and with one program per block (G = 1,
    the meeting point off), in bf16 and fp32."""
    import dataclasses
    from tp_lora.device.pool import GpuPool
    from tp_lora.ops import triton_kernels as K
    from tp_lora.plan.model import ModelSpec
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=1)
    g = torch.Generator(device="cuda").manual_seed(4)
    ranks = {s: (16, 64, 8, 40)[s % 4] for s in range(12)}
    for dtype in (torch.bfloat16, torch.float32):
        pool = GpuPool(spec, ParallelSpec(), max_loras=12, max_rank=64, modules=("q", "down"), dtype=dtype,
                       device="cuda")
        for m in pool.modules:
            pool.A[m].normal_(0, 0.05, generator=g)
            pool.B[m].normal_(0, 0.05, generator=g)
            pool.scaling[m].uniform_(0.5, 2.0, generator=g)
        slots = [1] + [s for s in range(12) for _ in range(3)]         # 37 requests, ~25 blocks
        lens = [5] + [7] * 36
        big = build_batch(slots, [None] * len(slots), lens, {s: ranks[s] for s in set(slots)},
                          torch.device("cuda"), None)
        alone = build_batch([1], [None], [5], {1: ranks[1]}, torch.device("cuda"), None)
        for m in ("q", "down"):
            Kdim, N = pool.shapes[m].a_shape[1], pool.shapes[m].b_shape[0]
            assert K.fused_chunks(Kdim)[0] > 1
            x = torch.randn(big.num_tokens, Kdim, device="cuda", generator=g).to(dtype)
            out = torch.randn(big.num_tokens, N, device="cuda", generator=g).to(dtype)
            ob = out.clone()
            LoRAOps(pool, big, TritonBackend()).column(0, m, x, ob)
            _same_bits_alone_and_unsplit(monkeypatch, pool, alone, m, x, out, ob, f"{m} {dtype}")
        del pool


PREFILL_TUNINGS = [dict(), dict(shrink_rows=16), dict(prefill_split=1 << 20, shrink_rows=16, p_low=True),
                   dict(prefill_split=16, reduce=True, p_low=True), dict(prefill_split=16, reduce=True,
                                                                          shrink_rows=32), dict(pdl=False),
                   dict(expand_tiles=3, expand_tiles_wide=3, expand_block_n=16, expand_block_n_wide=16)]


@pytest.mark.parametrize("cfg", PREFILL_TUNINGS, ids=["block", "sub16", "one-split-low", "reduce-low",
                                                      "reduce-sub32", "stream-order", "expand-walk"])
def test_prefill_two_launch_tunings_cuda(monkeypatch, cfg: dict) -> None:
    """The dense prefill regime (``PREFILL_TOKENS`` lowered to 8: 64-row blocks, shrink + expand) with each
    shrink tuning the benchmark sweeps: fp32 and bf16 against the torch path on random batches of up to
    40-token requests; base-only rows unchanged."""
    from tp_lora.ops import meta
    from tp_lora.ops import triton_kernels as K
    monkeypatch.setattr(meta, "PREFILL_TOKENS", 8)
    for k, v in cfg.items():
        monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, k, v)
    assert K.pdl_ok(torch.device("cuda")) == cfg.get("pdl", True) or torch.cuda.get_device_capability()[0] < 9
    par = ParallelSpec(tp_size=2, tp_rank=1)
    for dtype in (torch.float32, torch.bfloat16):
        assert kc.compare_dense(DENSE, par, dtype, "cuda", seed=13, trials=3, max_len=40) >= 12


@pytest.mark.parametrize("pdl", [False, True], ids=["stream", "pdl"])
def test_prefill_split_reduction_in_a_cuda_graph(monkeypatch, pdl: bool) -> None:
    """The shrink's split reduction (its counters reset by the kernel) in a captured prefill-regime op:
    replays with other batches equal eager runs bit for bit, and equal the expand-summed splits. With
    ``pdl`` the expand is a programmatic dependent of the shrink (captured as such): the same bits as the
    plain launches, replay after replay (an expand reading P before the shrink finished would differ)."""
    from tp_lora.ops import meta
    from tp_lora.ops import triton_kernels as K
    monkeypatch.setattr(meta, "PREFILL_TOKENS", 8)
    monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "pdl", pdl)
    monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "prefill_split", 16)
    monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "reduce", True)
    pool = make_pool(DENSE, ParallelSpec(tp_size=2, tp_rank=0), dtype=torch.bfloat16, device="cuda", seed=5)
    T = 96
    ranks = {0: 8, 1: 3, 2: 5}
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, pool.shapes["q"].a_shape[1], device="cuda", dtype=torch.bfloat16, generator=g)
    base = torch.randn(T, pool.shapes["q"].b_shape[0], device="cuda", dtype=torch.bfloat16, generator=g)
    out = torch.empty_like(base)
    mixes = [([0, 1, -1, 2], [40, 20, 16, 20]), ([2, 2, 0], [70, 6, 20]), ([-1, 1], [90, 6]),
             ([1, 0, 2, -1, 0], [10, 30, 26, 20, 10])]

    def batch_of(mix):
        slots, lens = mix
        return build_batch(slots, [None] * len(slots), lens, {s: ranks[s] for s in slots if s >= 0},
                           torch.device("cuda"), None)

    def op(ops: LoRAOps) -> None:
        out.copy_(base)
        ops.column(0, "q", x, out)

    backend = TritonBackend(max_tokens=T)
    ops = LoRAOps(pool, batch_of(mixes[0]), backend)
    assert ops.backend.meta.prefill
    graph = _captured(lambda: op(ops))
    for mix in mixes[1:] + mixes[:1]:
        batch = batch_of(mix)
        LoRAOps(pool, batch, backend)
        for _ in range(2):
            graph.replay()
            got = out.clone()
            op(LoRAOps(pool, batch, TritonBackend()))
            assert torch.equal(got, out), mix
        monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "reduce", False)
        op(LoRAOps(pool, batch, TritonBackend()))          # the expand sums the splits instead
        assert torch.equal(got, out), mix
        monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "reduce", True)
        if pdl:
            monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "pdl", False)
            op(LoRAOps(pool, batch, TritonBackend()))      # plain stream order
            assert torch.equal(got, out), mix
            monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "pdl", True)
    torch.cuda.synchronize()
    assert int(backend._scratch.red.abs().sum()) == 0


def _llama_q_down_pool(max_rank: int, dtype: torch.dtype, ranks: list[int], seed: int):
    """(pool, generator): a one-layer Llama-3-8B pool of q and down, slot s holding a random rank-``ranks[s]``
    adapter (zero padding above it) and random scalings in [0.5, 2]; the generator continues for the inputs."""
    import dataclasses
    from tp_lora.device.pool import GpuPool
    from tp_lora.plan.model import ModelSpec
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=1)
    dev = torch.device("cuda")
    pool = GpuPool(spec, ParallelSpec(), max_loras=len(ranks), max_rank=max_rank, modules=("q", "down"),
                   dtype=dtype, device=dev)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for m in pool.modules:
        for s, r in enumerate(ranks):
            A, B = pool.A[m][s], pool.B[m][s]
            A[..., :r, :] = torch.randn(A[..., :r, :].shape, generator=g, device=dev).to(dtype) * 0.02
            B[..., :r] = torch.randn(B[..., :r].shape, generator=g, device=dev).to(dtype) * 0.02
        pool.scaling[m].uniform_(0.5, 2.0, generator=g)
    return pool, g


@pytest.mark.parametrize("dtype,max_rank", [(torch.float32, 128), (torch.float32, 64), (torch.bfloat16, 128)],
                         ids=["fp32-r128", "fp32-r64", "bf16-r128"])
def test_prefill_full_size_shapes_fit_and_match(dtype, max_rank: int) -> None:
    """Llama-3-8B q / down at 600 tokens (the real prefill regime) with the default tuning: the shrink's
    pipeline stages fit the shared memory for every dtype and rank tile (float32 at rank tile 128 takes
    96 KiB a stage), and the result is the torch path's (fp32 1e-5 relative, bf16 2e-2)."""
    from tp_lora.ops import triton_kernels as K
    dev = torch.device("cuda")
    ranks = [max_rank, 16, max_rank // 2 + 3]
    pool, g = _llama_q_down_pool(max_rank, dtype, ranks, seed=2)
    slots = [0, 1, -1, 2, 0, 1]
    lens = [130, 70, 50, 200, 90, 60]
    batch = build_batch(slots, [None] * 6, lens, {s: ranks[s] for s in slots if s >= 0}, dev, None)
    ops_k, ops_t = LoRAOps(pool, batch, TritonBackend()), LoRAOps(pool, batch, TorchBackend())
    assert ops_k.backend.meta.prefill
    for m in ("q", "down"):
        Kd, N = pool.shapes[m].a_shape[1], pool.shapes[m].b_shape[0]
        assert K.shrink_stages(dtype, 64, 128, K.rank_tile(max_rank)) >= 2
        x = torch.randn(batch.num_tokens, Kd, device=dev, generator=g).to(dtype)
        out = torch.randn(batch.num_tokens, N, device=dev, generator=g).to(dtype)
        ok, ot = out.clone(), out.clone()
        ops_k.column(0, m, x, ok)
        ops_t.column(0, m, x, ot)
        d = (ok.double() - out.double()), (ot.double() - out.double())
        rel = float((d[0] - d[1]).norm() / d[1].norm())
        assert rel <= (1e-5 if dtype == torch.float32 else 2e-2), (m, rel)
        base = batch.token_slots < 0
        assert torch.equal(ok[base], out[base])


@pytest.mark.parametrize("max_rank", [16, 64], ids=["r16", "mixed-r64"])
def test_prefill_expand_walk_cuda(monkeypatch, max_rank: int) -> None:
    """Llama-3-8B q / down at 600 tokens with the expand walking 1, 2, 4 or 8 N tiles a program
    (``expand_tiles`` / ``expand_tiles_wide``), bf16 and fp32: the torch path's result (fp32 1e-5 relative,
    bf16 2e-2), base-only rows unchanged, a CUDA graph's replay equal to the eager call bit for bit, and a
    request alone equal bit for bit to the same request in the batch (the tile count is the shape's, never
    the batch's). Across tile counts the bits may differ (the compiler may choose another MMA form)."""
    from tp_lora.ops import triton_kernels as K
    dev = torch.device("cuda")
    ranks = [max_rank, 16, 5] if max_rank == 16 else [max_rank, 16, 37]
    for dtype in (torch.bfloat16, torch.float32):
        pool, g = _llama_q_down_pool(max_rank, dtype, ranks, seed=4)
        slots = [0, 1, -1, 2, 0, 1]
        lens = [130, 70, 50, 200, 90, 60]
        batch = build_batch(slots, [None] * 6, lens, {s_: ranks[s_] for s_ in slots if s_ >= 0}, dev, None)
        # the request of slot 2 with a base-only one (600 tokens: the same prefill regime)
        alone = build_batch([2, -1], [None, None], [200, 400], {2: ranks[2]}, dev, None)
        first = sum(lens[:3])                   # request 3 (slot 2) starts here
        for m in ("q", "down"):
            Kd, N = pool.shapes[m].a_shape[1], pool.shapes[m].b_shape[0]
            x = torch.randn(batch.num_tokens, Kd, device=dev, generator=g).to(dtype)
            out = torch.randn(batch.num_tokens, N, device=dev, generator=g).to(dtype)
            ot = out.clone()
            LoRAOps(pool, batch, TorchBackend()).column(0, m, x, ot)
            for nt in (1, 2, 4, 8):
                monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "expand_tiles", nt)
                monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "expand_tiles_wide", nt)
                ops = LoRAOps(pool, batch, TritonBackend(max_tokens=batch.num_tokens))
                assert ops.backend.meta.prefill
                o = out.clone()
                ops.column(0, m, x, o)
                d = (o.double() - out.double()), (ot.double() - out.double())
                rel = float((d[0] - d[1]).norm() / d[1].norm())
                assert rel <= (1e-5 if dtype == torch.float32 else 2e-2), (m, dtype, nt, rel)
                base = batch.token_slots < 0
                assert torch.equal(o[base], out[base])
                og = out.clone()
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    ops.column(0, m, x, og)
                og.copy_(out)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(og, o), (m, dtype, nt, "graph")
                oa = torch.cat([out[first:first + 200], out[:400]])
                ops_a = LoRAOps(pool, alone, TritonBackend())
                assert ops_a.backend.meta.prefill
                ops_a.column(0, m, torch.cat([x[first:first + 200], x[:400]]), oa)
                assert torch.equal(oa[:200], o[first:first + 200]), (m, dtype, nt, "alone")
        del pool


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_programmatic_dependent_launches_cuda(monkeypatch, prefill: bool) -> None:
    """The default launches (decode: the fused kernel a programmatic dependent of the kernel before it,
    waiting before any read; prefill: the expand a dependent of its shrink): the torch path's result, and
    bit for bit the plain launches' (``pdl`` off), eager and replayed in a CUDA graph right after the
    kernel that writes ``out``."""
    from tp_lora.ops import meta
    from tp_lora.ops import triton_kernels as K
    if prefill:
        monkeypatch.setattr(meta, "PREFILL_TOKENS", 8)
    par = ParallelSpec(tp_size=2, tp_rank=1)
    for dtype in (torch.float32, torch.bfloat16):
        assert kc.compare_dense(DENSE, par, dtype, "cuda", seed=21, trials=2, max_len=40 if prefill else 6) >= 8
    pool = make_pool(DENSE, ParallelSpec(tp_size=2, tp_rank=0), dtype=torch.bfloat16, device="cuda", seed=5)
    ranks = {0: 8, 1: 3, 2: 5}
    lens = [40, 20, 16, 20] if prefill else [3, 2, 1, 4]
    batch = build_batch([0, 1, -1, 2], [None] * 4, lens, {s: ranks[s] for s in (0, 1, 2)}, torch.device("cuda"),
                        None)
    g = torch.Generator(device="cuda").manual_seed(2)
    T = batch.num_tokens
    x = torch.randn(T, pool.shapes["q"].a_shape[1], device="cuda", dtype=torch.bfloat16, generator=g)
    base = torch.randn(T, pool.shapes["q"].b_shape[0], device="cuda", dtype=torch.bfloat16, generator=g)
    out = torch.empty_like(base)

    def op(ops: LoRAOps) -> None:
        out.copy_(base)              # the kernel right before the op writes out
        ops.column(0, "q", x, out)

    backend = TritonBackend(max_tokens=T)
    ops = LoRAOps(pool, batch, backend)
    assert K.pdl_ok(torch.device("cuda"), K.FUSED_CONFIG["pdl"]) or torch.cuda.get_device_capability()[0] < 9
    graph = _captured(lambda: op(ops))
    monkeypatch.setitem(K.FUSED_CONFIG, "pdl", False)
    monkeypatch.setitem(K.TWO_LAUNCH_CONFIG, "pdl", False)
    op(LoRAOps(pool, batch, TritonBackend()))
    plain = out.clone()
    assert not torch.equal(plain, base)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain)

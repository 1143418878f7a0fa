"""The transfer pipeline on CPU: every planned slice lands bit-exactly (with torch's cast) where the
plan says, the slot equals an independent reference, only this rank's bytes are read from disk, many
chunks flow through the reader thread, failures mid-transfer leave no trace, and no CUDA is touched.
"""

from __future__ import annotations

import pytest

from tp_lora.runtime.manager import AdapterState
import torch
from safetensors.torch import load_file

from support.runtime_ref import ALL_DENSE, ReadRecorder, expected_slot, make_adapter, new_manager, slot_diff
from tp_lora.errors import AdapterDataError
from tp_lora.device.transfer import LoadJob

LAYOUTS = {
    # name: (preset, tp, rank, ep, adapter kwargs)
    "dense-tp4": ("tiny-dense", 4, 1, 1, dict(targets=ALL_DENSE)),
    "dense-merged-tp4": ("tiny-dense", 4, 3, 1, dict(targets=ALL_DENSE, merged=True)),
    "moe-fused-tp4-ep2": ("tiny-moe", 4, 2, 2, dict(targets=("q", "k", "v", "o", "experts", "embed", "lm_head"),
                                                      fused_experts=True)),
    "qwen2moe-tp2": ("tiny-qwen2-moe", 2, 1, 1, dict(targets=("q", "k", "v", "o", "experts", "shared.gate",
                                                              "shared.up", "shared.down", "lm_head"))),
}
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _block(pool, op, slot):
    buf = (pool.A if op.side == "A" else pool.B)[op.module][slot, op.layer]
    if op.local_expert is not None:
        buf = buf[op.local_expert]
    return buf[:op.nrows, :op.ncols]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("src", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("pool_dtype", ["float32", "bfloat16"])
def test_every_slice_equals_the_full_tensor_slice(adir, layout, src, pool_dtype):
    preset, tp, rank, ep, kw = LAYOUTS[layout]
    path = make_adapter(adir, f"{layout}-{src}", preset, rank=4, dtype=src, seed=7, std=0.3, **kw)
    full = load_file(str(path / "adapter_model.safetensors"))
    assert all(t.dtype == _TORCH[src] for t in full.values())
    with new_manager(preset, tp=tp, rank=rank, ep=ep, dtype=pool_dtype, max_loras=2) as mgr:
        mgr.register("other", make_adapter(adir, f"{layout}-other", preset, rank=8, dtype="bf16", seed=8, **kw))
        mgr.activate("other")  # slot 0 holds something else, so slot 1 must not leak into / from it
        other_sum = mgr.pool.checksum(0)
        plan = mgr.register("x", path)
        assert mgr.activate("x") == {"x": 1}
        pool = mgr.pool
        assert len(plan.ops) > 10
        for op in plan.ops:
            r0, r1 = op.rows
            c0, c1, step = op.cols
            want = full[op.tensor][r0:r1, c0:c1:step].to(pool.dtype)  # torch's cast
            got = _block(pool, op, 1)
            assert got.dtype == pool.dtype
            assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), op.key
        # the whole slot (incl. padding and untargeted modules) equals the hand-built reference
        assert slot_diff(pool, 1, expected_slot(path, mgr.model, tp, rank, ep, pool)) == []
        assert pool.checksum(0) == other_sum


def _planned_intervals(plan):
    """Byte intervals [start, end) of the file that the plan needs, and the allowed span reads."""
    exact, spans = [], []
    for op in plan.ops:
        rows, cols = op.src_shape
        isz = op.itemsize
        c0, c1, step = op.cols
        if step == 1:
            for r in range(*op.rows):
                s = op.src_offset + (r * cols + c0) * isz
                exact.append((s, s + op.ncols * isz))
        else:
            first = op.src_offset + (op.rows[0] * cols + c0) * isz
            last = op.src_offset + ((op.rows[1] - 1) * cols + c0 + (op.ncols - 1) * step + 1) * isz
            spans.append((first, last))
    return exact, spans


def _merge(iv):
    out = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _covered(iv, by):
    by = _merge(by)
    return all(any(bs <= s and e <= be for bs, be in by) for s, e in iv if e > s)


@pytest.mark.parametrize("rank", range(4))
def test_reads_only_this_ranks_bytes_dense_tp4(adir, monkeypatch, rank):
    path = make_adapter(adir, "reads-dense", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=9)
    with new_manager("tiny-dense", tp=4, rank=rank, max_loras=1, read_mode="exact") as mgr:
        plan = mgr.register("x", path)
        rec = ReadRecorder(monkeypatch)
        mgr.activate("x")
        monkeypatch.undo()
    exact, spans = _planned_intervals(plan)
    assert spans == []
    # the header (metadata, not tensor data) is re-read once to check the file did not change
    data_start = 8 + mgr._adapters["x"].header.header_bytes
    header_reads = [(o, n) for o, n in rec.reads if o < data_start]
    assert all(o + n <= data_start for o, n in header_reads) and len(header_reads) <= 1
    reads = [(o, o + n) for o, n in rec.reads if o >= data_start]
    rec.reads = [(o, n) for o, n in rec.reads if o >= data_start]
    assert _covered(reads, exact), "a read outside this rank's planned slices"
    assert rec.nbytes == plan.nbytes  # every byte once: nothing more, nothing twice
    assert _merge(reads) == _merge(exact)  # and every planned byte was read
    assert plan.nbytes < plan.full_bytes  # tp=4 really reads a part of the file
    st = mgr.stats()
    assert st.bytes_read == plan.nbytes


@pytest.mark.parametrize("fused", [False, True])
def test_reads_only_this_ranks_bytes_moe_tp4_ep2(adir, monkeypatch, fused):
    path = make_adapter(adir, f"reads-moe-{fused}", "tiny-moe", rank=4, dtype="fp32", fused_experts=fused,
                        targets=("q", "o", "experts", "embed"), seed=10)
    for rank in (0, 3):
        with new_manager("tiny-moe", tp=4, rank=rank, ep=2, max_loras=1, read_mode="exact") as mgr:
            plan = mgr.register("x", path)
            rec = ReadRecorder(monkeypatch)
            mgr.activate("x")
            monkeypatch.undo()
            data_start = 8 + mgr._adapters["x"].header.header_bytes
        exact, spans = _planned_intervals(plan)
        # the header (metadata) is re-read once to check the file did not change; tensor reads follow
        assert sum(o < data_start for o, _ in rec.reads) <= 1
        rec.reads = [(o, n) for o, n in rec.reads if o >= data_start]
        reads = [(o, o + n) for o, n in rec.reads]
        assert _covered(reads, exact + spans)
        if not fused:
            assert spans == [] and rec.nbytes == plan.nbytes and _merge(reads) == _merge(exact)
        else:
            # fused-expert B: a rank's columns interleave with other experts' (stride E): documented
            # span reads of the row range; A rows and everything else are exact
            assert spans and rec.nbytes > plan.nbytes
            exact_reads = [r for r in reads if not any(s <= r[0] and r[1] <= e for s, e in spans)]
            assert sum(e - s for s, e in exact_reads) == sum(e - s for s, e in exact)


def test_many_chunks_and_stats(adir):
    path = make_adapter(adir, "chunks", "tiny-dense", rank=8, dtype="fp32", targets=ALL_DENSE, seed=11)
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, chunk_bytes=4096, read_mode="exact") as mgr:
        plan = mgr.register("x", path)
        chunks = plan.chunks(4096)
        assert len(chunks) >= 10
        mgr.activate("x")
        ls = mgr.stats().load_stats[-1]
        assert ls["chunks"] == len(chunks)
        assert ls["bytes_copied"] == sum(c.nbytes for c in chunks)
        assert ls["bytes_read"] == ls["bytes_planned"] == plan.nbytes
        assert not ls["warm"] and not ls["streamed"]
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 2, 0, 1, mgr.pool)) == []


def test_cpu_path_touches_no_cuda(adir, monkeypatch):
    path = make_adapter(adir, "nocuda", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=12)

    def boom(*a, **k):
        raise AssertionError("CUDA touched on the CPU path")

    for name in ("Stream", "Event", "current_stream", "stream", "synchronize", "current_device"):
        monkeypatch.setattr(torch.cuda, name, boom)
    monkeypatch.setattr(torch.Tensor, "pin_memory", boom)
    with new_manager("tiny-dense", tp=2, rank=1, max_loras=1, host_cache_bytes=1 << 20) as mgr:
        mgr.register("x", path)
        mgr.activate("x")  # cold, cached
        mgr.register("y", make_adapter(adir, "nocuda2", "tiny-dense", rank=4, dtype="fp16", seed=13))
        mgr.activate("y")
        mgr.activate("x")  # warm
    with new_manager("tiny-dense", tp=2, rank=1, max_loras=1, host_cache_bytes=0) as mgr:
        mgr.register("x", path)
        mgr.activate("x")  # streamed through the ring
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 2, 1, 1, mgr.pool)) == []


# ------------------------------------------------------------------------------------------------
# the engine directly: a failure mid-transfer leaves the cache as it was
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["read", "h2d"])
@pytest.mark.parametrize("mode", ["cached", "streamed", "warm"])
def test_engine_failure_mid_transfer_leaves_no_trace(adir, stage, mode):
    path = make_adapter(adir, "eng", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=14)
    keep = make_adapter(adir, "eng-keep", "tiny-dense", rank=4, dtype="fp32", targets=("q", "down"), seed=15)
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=2,
                     host_cache_bytes=0 if mode == "streamed" else 1 << 20) as mgr:
        mgr.register("keep", keep)
        mgr.activate("keep")
        plan = mgr.register("x", path)
        if mode == "warm":
            mgr.activate("x")
            mgr.unregister("keep")  # free slot 0 again; x stays cached
            mgr.register("keep", keep)
            mgr.activate("keep")
            assert mgr.slot_of("keep") == 0
            # make x's slot reload: evict it from the pool (not from the cache)
            mgr.pool.free(mgr.slot_of("x"))
            mgr._adapters["x"].state = AdapterState.REGISTERED  # its slot follows the pool (freed above)
        eng, cache, pool = mgr.engine, mgr.cache, mgr.pool
        before = (cache.stats.pinned_bytes, cache.stats.planned_bytes, cache.reserved_bytes, cache.names(),
                  pool.checksum(0))
        nchunks = len(plan.chunks(mgr.config.chunk_bytes))
        calls = []

        def fault(st, i):
            calls.append((st, i))
            if st == stage and i == nchunks // 2:
                raise RuntimeError(f"injected at {st} {i}")

        pool.reserve(1, "x")
        job = LoadJob(header=mgr._adapters["x"].header, plan=plan, slot=1, fault=fault)
        if mode == "warm" and stage == "read":  # a warm load reads nothing: the read stage never runs
            eng.run(job)
            assert calls and all(st == "h2d" for st, _ in calls)
            pool.free(1)
            return
        with pytest.raises((RuntimeError, AdapterDataError), match="injected"):
            eng.run(job)
        assert (stage, nchunks // 2) in calls
        pool.free(1)
        after = (cache.stats.pinned_bytes, cache.stats.planned_bytes, cache.reserved_bytes, cache.names(),
                 pool.checksum(0))
        assert after == before
        # the engine (ring, staging, cache) is usable again and gives exact contents
        pool.reserve(1, "x")
        res = eng.run(LoadJob(header=mgr._adapters["x"].header, plan=plan, slot=1))
        assert res.stats.warm == (mode == "warm") and res.stats.streamed == (mode == "streamed")
        assert slot_diff(pool, 1, expected_slot(path, mgr.model, 2, 0, 1, pool)) == []
        pool.free(1)
        mgr._adapters["x"].state = AdapterState.REGISTERED  # its slot follows the pool (freed above)


def test_engine_reader_error_is_our_exception(adir, tmp_path):
    """A read error in the reader thread comes back as AdapterDataError, not a raw OSError."""
    import shutil

    src = make_adapter(adir, "eng-trunc", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=16)
    path = tmp_path / "a"
    shutil.copytree(src, path)
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as mgr:
        plan = mgr.register("x", path)
        f = path / "adapter_model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        mgr.pool.reserve(0, "x")
        with pytest.raises(AdapterDataError, match="size changed|truncated"):
            mgr.engine.run(LoadJob(header=mgr._adapters["x"].header, plan=plan, slot=0))
        assert mgr.cache.stats.pinned_bytes == 0 and mgr.cache.reserved_bytes == 0


def test_the_cold_timeline_sees_every_unit_within_the_read_ahead_window(adir):
    """``TransferEngine.trace``: a cold load's timeline has every unit read once, never more units
    reading at once than ``read_ahead``, the loader's waits and issues; with the list unset nothing is
    recorded."""
    path = make_adapter(adir, "window", "tiny-moe", rank=8, dtype="bf16", seed=31,
                        targets=("q", "k", "v", "o", "experts"))
    with new_manager("tiny-moe", tp=2, rank=0, max_loras=1, read_workers=12, part_bytes=4096,
                     chunk_bytes=1 << 16, read_ahead=3, host_cache_bytes=1 << 30) as mgr:
        eng = mgr.engine
        mgr.register("a", path)
        mgr.register("b", path)
        mgr.activate("b")  # untraced
        assert eng.trace is None
        eng.trace = []
        mgr.activate("a")
        (tr,) = eng.trace
        assert tr.adapter == "a" and tr.units > 3  # more units than the window
        assert sorted(u for _, u, *_ in tr.reads) == list(range(tr.units))
        assert all(p <= r <= d <= tr.end for _, _, p, r, d, _ in tr.reads)
        events = sorted([(r, 1) for _, _, _, r, _, _ in tr.reads] + [(d, -1) for _, _, _, _, d, _ in tr.reads])
        live = peak = 0
        for _, k in events:
            live += k
            peak = max(peak, live)
        assert 1 <= peak <= 3
        kinds = {k for k, *_ in tr.loader}
        assert kinds == {"wait", "issue"} and all(a <= b for _, a, b, _ in tr.loader)
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 2, 0, 1, mgr.pool)) == []

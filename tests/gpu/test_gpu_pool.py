"""The CUDA path of the pipeline (pinned host chunks, copy stream, device-side place + cast, events).

Skipped without CUDA. Checks: pool contents on the GPU equal the independent CPU reference (full
safetensors tensors + the TP reference of tests/support, cast by torch) for bf16/fp16/fp32 sources into a bf16 pool,
cached, warm and streamed, both pin modes; a warm activation reads nothing from disk and pins nothing;
``activate`` does not block the compute stream (an event wait, not a synchronisation).
"""

from __future__ import annotations

import time

import pytest
import torch

from support.runtime_ref import ALL_DENSE, ReadRecorder, expected_slot, make_adapter, new_manager, slot_diff

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYOUTS = {
    "dense-tp4": ("tiny-dense", 4, 1, 1, dict(targets=ALL_DENSE)),
    "moe-fused-tp4-ep2": ("tiny-moe", 4, 2, 2, dict(targets=("q", "k", "v", "o", "experts", "embed", "lm_head"),
                                                      fused_experts=True)),
    "qwen2moe-tp2": ("tiny-qwen2-moe", 2, 0, 1, dict(targets=("q", "k", "v", "o", "experts", "shared.gate",
                                                              "shared.up", "shared.down", "lm_head"))),
}


def _gpu_manager(preset, tp, rank, ep, **cfg):
    cfg.setdefault("dtype", "bfloat16")
    cfg.setdefault("max_loras", 2)
    return new_manager(preset, tp=tp, rank=rank, ep=ep, device="cuda", **cfg)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("src", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("overlap", [True, False], ids=["place-stream", "serial-place"])
def test_cuda_pool_equals_cpu_reference(adir, layout, src, overlap):
    """Cold and warm loads of many 4 KiB chunks: with placements on their own stream (each overlapping
    the next chunk's H2D into the other staging buffer) and on the copy stream."""
    preset, tp, rank, ep, kw = LAYOUTS[layout]
    a = make_adapter(adir, f"{layout}-{src}-a", preset, rank=8, dtype=src, seed=1, std=0.3, **kw)
    b = make_adapter(adir, f"{layout}-{src}-b", preset, rank=4, dtype=src, seed=2, std=0.3, **kw)
    with _gpu_manager(preset, tp, rank, ep, max_loras=1, host_cache_bytes=1 << 20) as mgr:
        mgr.engine.overlap_place = overlap
        assert mgr.pool.A["q"].is_cuda and mgr.pool.dtype == torch.bfloat16
        mgr.register("a", a)
        mgr.register("b", b)
        ra, rb = (expected_slot(p, mgr.model, tp, rank, ep, mgr.pool) for p in (a, b))
        for n, ref, warm in (("a", ra, False), ("b", rb, False), ("a", ra, True), ("b", rb, True)):
            mgr.activate(n)
            torch.cuda.synchronize()
            assert slot_diff(mgr.pool, 0, ref) == [], (n, warm)
            assert mgr.stats().load_stats[-1]["warm"] == warm


@pytest.mark.parametrize("pin_mode", ["caching", "register"])
def test_cuda_streamed_and_pin_modes(adir, pin_mode):
    # fp32 rank 16: slices larger than a 4096-byte chunk, streamed through the ring with CUDA events
    big = make_adapter(adir, "big16", "tiny-dense", rank=16, dtype="fp32", targets=ALL_DENSE, seed=3)
    with _gpu_manager("tiny-dense", 2, 1, 1, max_lora_rank=16, host_cache_bytes=0, pin_mode=pin_mode,
                      read_mode="exact") as mgr:
        plan = mgr.register("big", big)
        mgr.activate("big")
        torch.cuda.synchronize()
        st = mgr.stats()
        assert st.streamed_loads == 1 and 0 < st.peak_inflight_bytes <= st.inflight_bound
        assert st.load_stats[-1]["bytes_read"] == plan.nbytes
        assert slot_diff(mgr.pool, 0, expected_slot(big, mgr.model, 2, 1, 1, mgr.pool)) == []
    with _gpu_manager("tiny-dense", 2, 1, 1, max_lora_rank=16, host_cache_bytes=1 << 20, pin_mode=pin_mode) as mgr:
        plan = mgr.register("big", big)
        mgr.activate("big")
        torch.cuda.synchronize()
        st = mgr.stats()
        assert st.pinned_bytes_now == st.pinned_planned_now == plan.nbytes
        assert st.load_stats[-1]["bytes_pinned"] == plan.nbytes
        assert slot_diff(mgr.pool, 0, expected_slot(big, mgr.model, 2, 1, 1, mgr.pool)) == []


def test_warm_activation_reads_and_pins_nothing(adir, monkeypatch):
    a = make_adapter(adir, "warm-a", "tiny-moe", rank=8, dtype="bf16", fused_experts=True, seed=4)
    b = make_adapter(adir, "warm-b", "tiny-moe", rank=4, dtype="fp16", seed=5)
    with _gpu_manager("tiny-moe", 4, 1, 2, max_loras=1, host_cache_bytes=1 << 20) as mgr:
        pa = mgr.register("a", a)
        mgr.register("b", b)
        mgr.activate("a")
        cold = mgr.stats().load_stats[-1]
        assert cold["bytes_pinned"] == pa.nbytes and cold["bytes_read"] >= pa.nbytes
        mgr.activate("b")
        pinned = mgr.stats().pinned_bytes_now
        rec = ReadRecorder(monkeypatch)
        mgr.activate("a")
        monkeypatch.undo()
        torch.cuda.synchronize()
        ls = mgr.stats().load_stats[-1]
        assert rec.reads == [] and ls["warm"] and ls["bytes_read"] == 0 and ls["bytes_pinned"] == 0
        assert mgr.stats().pinned_bytes_now == pinned
        assert slot_diff(mgr.pool, 0, expected_slot(a, mgr.model, 4, 1, 2, mgr.pool)) == []


def _sleep_kernel(seconds: float) -> None:
    """Keep the current stream busy for about ``seconds`` (calibrated torch.cuda._sleep)."""
    probe = 10_000_000
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(probe)
    e.record()
    e.synchronize()
    per_cycle = s.elapsed_time(e) / 1e3 / probe
    torch.cuda._sleep(int(seconds / per_cycle))


@pytest.mark.parametrize("warm", [False, True])
def test_activate_does_not_block_the_compute_stream(adir, warm):
    x = make_adapter(adir, "ev-x", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=6)
    y = make_adapter(adir, "ev-y", "tiny-dense", rank=4, dtype="bf16", targets=("q",), seed=7)
    with _gpu_manager("tiny-dense", 2, 0, 1, max_loras=1, host_cache_bytes=1 << 20) as mgr:
        mgr.register("x", x)
        mgr.register("y", y)
        if warm:
            mgr.activate("x")
            mgr.activate("y")
        torch.cuda.synchronize()
        mgr.prefetch("x").result(timeout=30)  # the copy runs now, while the compute stream is idle
        compute = torch.cuda.current_stream()
        _sleep_kernel(0.5)  # then a long "forward" is queued on the compute stream
        t = time.perf_counter()
        assert mgr.activate("x") == {"x": 0}
        dt = time.perf_counter() - t
        busy = not compute.query()
        # activate returned while the forward was still running: it only queued an event wait
        assert busy and dt < 0.25, (busy, dt)
        assert mgr.stats().load_stats[-1]["warm"] == warm
        # work queued on the compute stream after activate sees the adapter (ordered by the event)
        got = mgr.pool.A["q"][0].float().sum()
        compute.synchronize()
        ref = expected_slot(x, mgr.model, 2, 0, 1, mgr.pool)["q"][0].float().sum()
        assert torch.equal(got.cpu(), ref)
        assert slot_diff(mgr.pool, 0, expected_slot(x, mgr.model, 2, 0, 1, mgr.pool)) == []


def test_batch_on_compute_stream_is_not_overwritten_by_a_later_load(adir):
    """A slot freed by a batch whose kernels still run is reloaded only after them (the copy stream waits
    for the compute event taken at prefetch)."""
    x = make_adapter(adir, "ev-x", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=6)
    y = make_adapter(adir, "ev-y", "tiny-dense", rank=4, dtype="bf16", targets=("q",), seed=7)
    with _gpu_manager("tiny-dense", 2, 0, 1, max_loras=1, host_cache_bytes=1 << 20) as mgr:
        mgr.register("x", x)
        mgr.register("y", y)
        mgr.activate("x")
        torch.cuda.synchronize()
        with mgr.prepare_batch(["x"]):
            _sleep_kernel(0.3)
            snap = mgr.pool.A["q"][0].clone()  # the "forward" reads x's slot after the long kernel
        mgr.activate("y")  # evicts x from slot 0: its copies must wait for the read above
        torch.cuda.synchronize()
        want = expected_slot(x, mgr.model, 2, 0, 1, mgr.pool)["q"][0]
        assert torch.equal(snap.cpu(), want)
        assert slot_diff(mgr.pool, 0, expected_slot(y, mgr.model, 2, 0, 1, mgr.pool)) == []


@pytest.mark.parametrize("order", ["backwards", "interleaved"])
def test_batch_parts_out_of_order_on_cuda(tmp_path, monkeypatch, order):
    """The C batch's parts copied H2D in the order they complete, into the loader's staging buffers
    (fewer than the chunks open at once in the interleaved order: parts wait for one), land the
    reference's slot on the GPU."""
    from support.runtime_ref import check_out_of_order_batch
    from tp_lora.host import native

    if native.load() is None:
        pytest.skip("the native read loop cannot be built here")
    check_out_of_order_batch(tmp_path, monkeypatch, "tiny-dense", dict(targets=ALL_DENSE), order, device="cuda")


@pytest.mark.parametrize("src", ["bf16", "fp32"])
def test_chunks_copied_straight_from_the_page_cache(adir, src):
    """``map_reads="on"``: the mapper pins the file's cached pages in place (read-only cudaHostRegister)
    and copies its chunks H2D from them, cast on the device: the slot is the reference's, and the cache
    entry, refilled after the load, equals one the readers filled (so a warm load lands the same slot)."""
    from tp_lora.host import native

    if native.load() is None:
        pytest.skip("no C compiler")
    path = make_adapter(adir, f"mapped-{src}", "tiny-dense", rank=8, dtype=src, seed=7, targets=ALL_DENSE)
    entries = {}
    for mode in ("off", "on"):
        with _gpu_manager("tiny-dense", 1, 0, 1, max_loras=1, read_mode="exact", chunk_bytes=1 << 13,
                          part_bytes=4096, read_workers=1, map_reads=mode) as mgr:
            mgr.engine.mapper.head_start = 2
            mgr.register("a", path)
            mgr.activate("a")
            ls = mgr.stats().load_stats[-1]
            if mode == "on":
                assert mgr.engine.mapper.disabled is None, mgr.engine.mapper.disabled
                assert ls["mapped_chunks"] >= 1 and ls["bytes_mapped"] > 0
            assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 1, 0, 1, mgr.pool)) == []
            mgr.engine.settle_fill()
            e = mgr.cache._entries["a"]
            assert e.complete
            entries[mode] = [b.clone() for b in e.buffers]
            if mode == "on":
                assert mgr.engine.mapper._free.qsize() == 2 and mgr.engine.mapper.c_chunks
    assert all(torch.equal(a, b) for a, b in zip(entries["on"], entries["off"]))

"""io_uring reads (host/uring.py) and the reader's batched path: the same bytes as pread, batches larger
than the ring, short and failed results redone piece by piece (our error at EOF), the cost model that
reads owned bytes only, and the choice of backend. Skipped where the kernel refuses io_uring."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from support.runtime_ref import ALL_DENSE, ReadRecorder, expected_slot, make_adapter, new_manager, slot_diff
from tp_lora.host import native, reader, uring
from tp_lora.plan.packing import RING_COST, pack, read_counts

needs_ring = pytest.mark.skipif(not uring.available(), reason="this kernel / seccomp profile refuses io_uring")


@needs_ring
def test_ring_readv_equals_pread_across_batches(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.tobytes())
    fd = os.open(f, os.O_RDONLY)
    ring = uring.Ring(16)  # 300 requests: many batches of the ring's size
    try:
        rnd = random.Random(1)
        buf = torch.zeros(1 << 21, dtype=torch.uint8)
        iovs, want, niov, offs, pos = [], [], [], [], 0
        for _ in range(300):
            k = rnd.randint(1, 3)  # one to three iovecs a request
            off = rnd.randrange(0, (1 << 20) - 4096)
            offs.append(off)
            niov.append(k)
            total = 0
            for _ in range(k):
                n = rnd.randint(1, 900)
                iovs.append((buf.data_ptr() + pos, n))
                want.append((pos, off + total, n))
                pos += n
                total += n
        iov = np.array(iovs, dtype=np.uint64)
        first = np.cumsum([0] + niov[:-1]).astype(np.uint64)
        res = ring.readv(fd, np.uint64(iov.ctypes.data) + np.uint64(16) * first, np.array(niov, dtype=np.uint32),
                         np.array(offs, dtype=np.uint64))
        sizes = np.add.reduceat(iov[:, 1].astype(np.int64), first.astype(np.int64))
        assert (res == sizes).all()
        b = buf.numpy()
        for p, o, n in want:
            assert (b[p:p + n] == data[o:o + n]).all()
        assert ring.submits >= 300 // 16
        # at the end of the file a read comes back short, not as an error
        tail = ring.readv(fd, np.array([iov.ctypes.data], dtype=np.uint64), np.array([1], dtype=np.uint32),
                          np.array([(1 << 20) - 10], dtype=np.uint64))
        assert 0 <= tail[0] <= 10
    finally:
        ring.close()
        os.close(fd)


@needs_ring
def test_ring_batches_that_wrap_the_ring_mid_batch(tmp_path):
    """The SQEs are written as at most two slices (the ring's end, then its start): batches that start
    anywhere in the ring read what pread reads, call after call."""
    data = np.random.default_rng(3).integers(0, 256, 1 << 16, dtype=np.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.tobytes())
    fd = os.open(f, os.O_RDONLY)
    ring = uring.Ring(8)
    try:
        buf = torch.zeros(64 * 100, dtype=torch.uint8)
        for call, k in enumerate((5, 7, 11, 3, 13)):  # tails 0, 5, 12, 23, 26: most batches cross the end
            offs = np.arange(k, dtype=np.uint64) * np.uint64(517) + np.uint64(call * 97)
            iov = np.zeros((k, 2), dtype=np.uint64)
            iov[:, 0] = buf.data_ptr() + 64 * np.arange(k, dtype=np.uint64)
            iov[:, 1] = 64
            buf.zero_()
            res = ring.readv(fd, np.uint64(iov.ctypes.data) + np.uint64(16) * np.arange(k, dtype=np.uint64),
                             np.ones(k, dtype=np.uint32), offs)
            assert (res == 64).all(), (call, res)
            b = buf.numpy()
            for j, o in enumerate(offs.tolist()):
                assert (b[64 * j:64 * j + 64] == data[o:o + 64]).all(), (call, j)
    finally:
        ring.close()
        os.close(fd)


@needs_ring
@pytest.mark.parametrize("preset,tp,kw", [("tiny-dense", 4, dict(targets=ALL_DENSE)),
                                          ("tiny-moe", 4, dict(targets=("q", "k", "v", "o", "experts")))])
def test_batched_exact_reads_only_owned_bytes_and_equal_preadv(adir, monkeypatch, preset, tp, kw):
    path = make_adapter(adir, f"ring-{preset}", preset, rank=8, dtype="bf16", seed=9, **kw)
    rec = ReadRecorder(monkeypatch)
    sums = {}
    for backend in ("io_uring", "preadv"):
        with new_manager(preset, tp=tp, rank=1, max_loras=1, read_mode="exact", read_backend=backend,
                         chunk_bytes=1 << 16, part_bytes=4096) as mgr:
            plan = mgr.register("a", path)
            rec.reads.clear()
            mgr.activate("a")
            ls = mgr.stats().load_stats[-1]
            assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, tp, 1, 1, mgr.pool)) == []
            counts = read_counts(mgr.engine.chunks(plan))
            assert ls["bytes_read"] == counts.read and ls["syscalls"] == counts.syscalls
            if backend == "io_uring":
                assert ls["ring_reads"] > 0 and mgr.engine.cost is RING_COST
                if preset == "tiny-dense":  # no strided columns: every byte read is an owned byte
                    assert rec.nbytes - _header_reads(rec) == plan.nbytes == ls["bytes_read"]
            else:
                assert ls["ring_reads"] == 0
            sums[backend] = mgr.pool.checksum(0)
    assert sums["io_uring"] == sums["preadv"]


def _header_reads(rec: ReadRecorder) -> int:
    return sum(n for o, n in rec.reads if o == 0)  # the header check reads from offset 0


def _hooks(native_reads: bool):
    """(the reader's hook for a part's ring batch, a wrapper maker): ``wrap(after)`` calls the real reads,
    then ``after(res)`` on the results (which may rewrite them) - the Python ring path's ``_RING_READV``,
    or the C loop's ``_NATIVE_READ`` (whose short-count is recomputed from the rewritten results)."""
    if native_reads:
        real = reader._NATIVE_READ

        def wrap(after):
            def hook(nat, ring, fd, tab, b, s, iov, res):
                real(nat, ring, fd, tab, b, s, iov, res)
                after(res)
                return int((res != tab.direct_want).sum())
            return hook
        return "_NATIVE_READ", wrap
    real_ring = reader._RING_READV

    def wrap(after):
        def hook(ring, fd, addr, niov, off):
            res = real_ring(ring, fd, addr, niov, off).copy()
            after(res)
            return res
        return hook
    return "_RING_READV", wrap


@needs_ring
@pytest.mark.parametrize("loop", ["batch", "native", "python"])
def test_short_ring_results_are_read_again_and_truncation_is_our_error(adir, monkeypatch, tmp_path, loop):
    """Reads that come back short are read again piece by piece, and a file cut short under the reader
    is our error naming the file: in the C batch (every reader thread one call per load), the C loop per
    part, and the Python loop."""
    from tp_lora.errors import AdapterActivationError

    native_reads = loop != "python"
    if native_reads and native.load() is None:
        pytest.skip("no C compiler here: the native read loop cannot be built")
    path = make_adapter(adir, "ring-short", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=4)
    calls = []
    if loop == "batch":
        # the C batch reports every other part short (its reads did return their bytes: the redo must
        # read them again and land the same bytes)
        monkeypatch.setattr(reader, "_BATCH_SHORT_EVERY", 2)
        real = reader.SliceReader.redo

        def redo(self, pb, i, buf):
            calls.append(i)
            real(self, pb, i, buf)

        monkeypatch.setattr(reader.SliceReader, "redo", redo)
    else:
        name, wrap = _hooks(native_reads)

        def shorten(res):
            calls.append(len(res))
            res[::2] = np.minimum(res[::2], 1)  # every other read "came back short" (a signal)

        monkeypatch.setattr(reader, name, wrap(shorten))
    kw = dict(read_mode="exact", read_backend="io_uring", chunk_bytes=1 << 16, part_bytes=4096,
              native_reads=native_reads)
    with new_manager("tiny-dense", tp=4, rank=2, max_loras=1, **kw) as mgr:
        mgr.engine.batch_reads = loop == "batch"
        mgr.register("a", path)
        mgr.activate("a")
        assert calls and slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 4, 2, 1, mgr.pool)) == []
        assert (mgr.stats().load_stats[-1]["native_parts"] > 0) == native_reads

    # a file cut short under the reader: the redo hits EOF and raises our error naming the file
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    w = cut / "adapter_model.safetensors"

    if loop == "batch":
        def cut_after_first(a, stage, i):
            if stage == "read" and i == 0:
                os.truncate(w, 64)  # after the header: every later read and redo fails
    else:
        def truncating(res):
            os.truncate(w, 64)
            res[:] = 0

        monkeypatch.setattr(reader, name, wrap(truncating))
    with new_manager("tiny-dense", tp=4, rank=2, max_loras=1, **kw) as mgr:
        mgr.engine.batch_reads = loop == "batch"
        if loop == "batch":
            mgr.fault_hook = cut_after_first
        mgr.register("a", cut)
        with pytest.raises(AdapterActivationError, match="truncated|changed"):
            mgr.activate("a")


def test_backend_choice_and_refusal(monkeypatch):
    from tp_lora.errors import ConfigError
    from tp_lora.runtime.config import LoRAConfig

    with pytest.raises(ConfigError, match="read_backend"):
        LoRAConfig(read_backend="aio")
    with new_manager("tiny-dense", read_backend="preadv") as mgr:
        assert mgr.engine.rings is None and not mgr.engine.cost.batched
    monkeypatch.setattr(uring, "available", lambda: False)
    with pytest.raises(ValueError, match="cannot create an io_uring"):
        with new_manager("tiny-dense", read_backend="io_uring"):
            pass
    with new_manager("tiny-dense") as mgr:  # auto: preadv where no ring can be made
        assert mgr.engine.rings is None and not mgr.engine.cost.batched


def test_ring_cost_joins_row_slices_through_junk_gaps(adir):
    """The cost model of the batched readers: the o/down A row slices of a TP rank are never spans (no
    gathers: every read stays in the one submission of its part); rows closer than ``junk_gap()`` share
    one request, their gaps all read onto the same junk bytes at scratch offset 0. ``join_exact=False``
    reads only owned bytes, one request per row."""
    import dataclasses

    from support.runtime_ref import make_adapter as mk
    from tp_lora.plan.model import ModelSpec
    from tp_lora.plan.parallel import ParallelSpec
    from tp_lora.plan.planner import plan_rank
    from tp_lora.plan.validate import AdapterSource

    path = mk(adir, "cost-dense", "tiny-dense", rank=8, dtype="bf16", seed=3, targets=ALL_DENSE)
    model = ModelSpec.from_preset("tiny-dense")
    plan = plan_rank(AdapterSource.open(path, model, name="u"), model, ParallelSpec(tp_size=4, tp_rank=1))
    auto = read_counts(pack(plan, 1 << 20, 4096, "auto"))
    exact_cost = dataclasses.replace(RING_COST, join_exact=False)
    exact = read_counts(pack(plan, 1 << 20, 4096, "auto", exact_cost))
    joined = read_counts(pack(plan, 1 << 20, 4096, "auto", RING_COST))
    assert auto.read > plan.nbytes and auto.span_ops > 0
    assert exact.read == plan.nbytes and exact.span_ops == 0 and exact.syscalls > auto.syscalls
    assert joined.span_ops == 0 and plan.nbytes < joined.read and joined.syscalls < exact.syscalls
    gap_max = RING_COST.junk_gap()
    for cost in (exact_cost, RING_COST):
        for c in pack(plan, 1 << 20, 4096, "auto", cost):
            for u in c.units():
                for _, pieces, copies, sb in u.reads:
                    assert not copies
                    gaps = [n for o, n in pieces if o < 0]
                    assert all(o == -1 for o, _ in pieces if o < 0) and sb == max(gaps + [0]) <= gap_max
                    assert cost.join_exact or not gaps
    # a gap wider than junk_gap() is not joined: a cost whose request is worth fewer bytes than one row's gap
    tight = dataclasses.replace(RING_COST, syscall_s=RING_COST.byte_s * 8)
    assert tight.junk_gap() == 8
    assert read_counts(pack(plan, 1 << 20, 4096, "auto", tight)).read == plan.nbytes


@needs_ring
@pytest.mark.parametrize("join", [True, False])
def test_junk_gap_reads_land_only_owned_bytes(adir, join):
    """End to end through the rings: joined rows give the slots of the exact reads, the cache pins only
    the planned bytes, and the read counters report the junk bytes beside the owned ones."""
    import dataclasses

    path = make_adapter(adir, "junk-gaps", "tiny-dense", rank=8, dtype="bf16", seed=5, targets=ALL_DENSE)
    with new_manager("tiny-dense", tp=4, rank=1, max_loras=1, read_backend="io_uring", chunk_bytes=1 << 16,
                     part_bytes=4096) as mgr:
        mgr.engine.cost = dataclasses.replace(RING_COST, join_exact=join)
        plan = mgr.register("a", path)
        mgr.activate("a")
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 4, 1, 1, mgr.pool)) == []
        ls, st = mgr.stats().load_stats[-1], mgr.stats()
        counts = read_counts(mgr.engine.chunks(plan))
        assert ls["bytes_read"] == counts.read and ls["syscalls"] == counts.syscalls
        assert (ls["bytes_read"] > plan.nbytes) == join
        # a part of several reads goes through its ring (a part of one read is one preadv either way)
        multi = any(len(u.reads) > 1 for c in mgr.engine.chunks(plan) for u in c.units())
        assert (ls["ring_reads"] > 0) == multi
        assert st.pinned_bytes_now == st.pinned_planned_now == plan.nbytes

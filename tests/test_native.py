"""The readers' C loop (host/native.c, built by host/native.py): built once and cached, refused cleanly
where it cannot be built, and reading exactly what the Python loop reads - through an io_uring (batches
larger than the ring, wrapping it) and through preadv - end to end in a manager too."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch

from support.runtime_ref import (ALL_DENSE, ReadRecorder, check_out_of_order_batch, expected_slot, make_adapter,
                                 new_manager, slot_diff)
from tp_lora.host import native, reader, uring
from tp_lora.plan.packing import read_counts

NAT = native.load()
needs_native = pytest.mark.skipif(NAT is None, reason="the native read loop cannot be built here (no C compiler)")


def test_build_is_cached_and_atomic(tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    lib = native.build(tmp_path)
    assert lib.parent == tmp_path and lib.name.endswith(".so")
    mtime = lib.stat().st_mtime_ns
    assert native.build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary left behind


def test_refused_without_compiler_or_when_turned_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.raises(OSError, match="no C compiler"):
        native.build(tmp_path)
    monkeypatch.setenv("TP_LORA_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with caplog.at_level(logging.INFO, logger="tp_lora.host.native"):
        assert native._load() is None
    assert "no C compiler" in caplog.text
    monkeypatch.setenv("TP_LORA_NATIVE", "0")
    assert native._load() is None


def test_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(OSError, match="failed"):
        native.build(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def _random_reads(rng: random.Random, size: int, n: int):
    """``n`` direct scatter reads of 1-4 pieces each (gaps onto scratch offset 0, like the junk joins) over
    a file of ``size`` bytes, packed back to back into the buffer: (reads, expected (buf offset, file
    offset, bytes) of the owned pieces, buffer bytes)."""
    reads, want, pos = [], [], 0
    for _ in range(n):
        off = rng.randrange(0, size - 8192)
        pieces, at = [], off
        for i in range(rng.randint(1, 4)):
            if i % 2 == 1:
                g = rng.randint(1, 300)
                pieces.append((-1, g))  # a gap: scratch offset 0 (-o - 1 == 0)
                at += g
                continue
            m = rng.randint(1, 1500)
            pieces.append((pos, m))
            want.append((pos, at, m))
            pos += m
            at += m
        reads.append((off, tuple(pieces), (), max([m for o, m in pieces if o < 0] + [0])))
    return tuple(reads), want, pos


def _random_file(tmp_path, seed: int) -> tuple[np.ndarray, int]:
    """1 MiB of random bytes written to a file: (the bytes, a read-only fd the test closes)."""
    data = np.random.default_rng(seed).integers(0, 256, 1 << 20, dtype=np.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.tobytes())
    return data, os.open(f, os.O_RDONLY)


@needs_native
@pytest.mark.parametrize("use_ring", [True, False], ids=["io_uring", "preadv"])
def test_read_part_equals_the_file(tmp_path, use_ring):
    if use_ring and not uring.available():
        pytest.skip("this kernel refuses io_uring")
    data, fd = _random_file(tmp_path, 5)
    ring = uring.Ring(8) if use_ring else None  # 8 slots: 300 reads wrap it many times
    try:
        rng = random.Random(2)
        for n in (1, 7, 300):
            reads, want, nbytes = _random_reads(rng, 1 << 20, n)
            tab = reader._IovTable.build(reads)
            assert len(tab.direct) == n and not tab.rest
            buf = torch.zeros(nbytes, dtype=torch.uint8)
            scratch = torch.zeros(max(tab.scratch_end, 1), dtype=torch.uint8)
            iov, iov_ptr, res = NAT.buffers(len(tab.rel), n)
            raddr = None if ring is None else NAT.ring_addr(ring)
            bad = reader._NATIVE_READ(NAT, raddr, fd, tab, buf.data_ptr(), scratch.data_ptr(), iov_ptr, res[:n])
            assert bad == 0 and (res[:n] == tab.direct_want).all()
            assert (iov[:len(tab.rel)] == tab.rebased(buf, scratch)).all()  # the C rebase = numpy's
            b = buf.numpy()
            for p, o, m in want:
                assert (b[p:p + m] == data[o:o + m]).all()
        if ring is not None:
            # the Python path shares the ring after the C loop: its head / tail are where C left them
            one = torch.zeros(64, dtype=torch.uint8)
            iovs = np.array([[one.data_ptr(), 64]], dtype=np.uint64)
            r = ring.readv(fd, np.array([iovs.ctypes.data], dtype=np.uint64), np.ones(1, dtype=np.uint32),
                           np.array([4096], dtype=np.uint64))
            assert r[0] == 64 and (one.numpy() == data[4096:4160]).all()
        # past the end of the file a read comes back short (counted), not as an error
        reads = ((len(data) - 10, ((0, 100),), (), 0), (0, ((100, 10),), (), 0))
        tab = reader._IovTable.build(reads)
        buf = torch.zeros(110, dtype=torch.uint8)
        iov, iov_ptr, res = NAT.buffers(len(tab.rel), 2)
        raddr = None if ring is None else NAT.ring_addr(ring)
        assert reader._NATIVE_READ(NAT, raddr, fd, tab, buf.data_ptr(), 0, iov_ptr, res[:2]) == 1
        assert res[0] == 10 and res[1] == 10
    finally:
        if ring is not None:
            ring.close()
        os.close(fd)


def _batch_of_parts(rng, data_len: int, parts: int):
    """``parts`` parts of random direct reads: (tables, buffers, expected (part, buf offset, file offset,
    bytes))."""
    tabs, bufs, want = [], [], []
    for i in range(parts):
        reads, w, nbytes = _random_reads(rng, data_len, rng.randint(1, 40))
        tabs.append(reader._IovTable.build(reads))
        bufs.append(torch.zeros(nbytes, dtype=torch.uint8))
        want += [(i, p, o, m) for p, o, m in w]
    return tabs, bufs, want


@needs_native
@pytest.mark.parametrize("use_ring", [True, False], ids=["io_uring", "preadv"])
def test_batch_read_by_threads_and_by_the_pool_equals_the_file(tmp_path, use_ring):
    """The C batch protocol: parts published in two steps, read by Python threads each calling ``run``
    (every part exactly once, each status 0 or, with ``short_every``, reported short), then the same
    through a ``ReaderPool`` (threads kept in C): the buffers hold the file's bytes; a batch cancelled
    before its parts are published ends with every pool thread out of it; closing the pool stops them."""
    import threading

    if use_ring and not uring.available():
        pytest.skip("this kernel refuses io_uring")
    data, fd = _random_file(tmp_path, 8)
    rings = uring.RingPool(16) if use_ring else None
    rng = random.Random(4)
    try:
        def check(tabs, bufs, want):
            for i, p, o, m in want:
                assert (bufs[i].numpy()[p:p + m] == data[o:o + m]).all(), (i, p, o, m)

        # Python threads calling run(): 3 threads, 50 parts, every 7th reported short
        tabs, bufs, want = _batch_of_parts(rng, len(data), 50)
        scratch = torch.zeros(max(max(t.scratch_end for t in tabs), 1), dtype=torch.uint8)
        b = NAT.batch(len(tabs), scratch.data_ptr(), fd, short_every=7)
        for i in range(25):
            b.set(i, tabs[i].native[1], bufs[i].data_ptr())
        b.publish(25)

        def worker(w):
            ring = rings.ring() if rings is not None else None
            _, iov_ptr, res = NAT.buffers(max(len(t.rel) for t in tabs), max(len(t.direct) for t in tabs))
            assert b.run(None if ring is None else NAT.ring_addr(ring), fd, iov_ptr, res.ctypes.data, w) == 0

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        for t in ts:
            t.start()
        for i in range(25, 50):  # published while the threads read (they wait for them)
            b.set(i, tabs[i].native[1], bufs[i].data_ptr())
        b.publish(50)
        for t in ts:
            t.join(timeout=30)
        assert b.wait(0, 1.0) == 50
        assert set(b.worker.tolist()) <= {0, 1, 2} and (b.worker >= 0).all()  # a subset: a thread may get none
        assert (b.status == np.where(np.arange(50) % 7 == 0, 1, 0)).all()
        assert (b.t_end >= b.t_start).all() and (b.t_start > 0).all()
        check(tabs, bufs, want)

        # the pool: 4 threads in C, two batches in a row, a taking order given
        pool = NAT.pool(4, rings)
        for order in (None, list(range(40))[::-1]):
            tabs, bufs, want = _batch_of_parts(rng, len(data), 40)
            scratch = torch.zeros(max(max(t.scratch_end for t in tabs), 1), dtype=torch.uint8)
            b = NAT.batch(len(tabs), scratch.data_ptr(), fd, order=order)
            for i in range(40):
                b.set(i, tabs[i].native[1], bufs[i].data_ptr())
            b.publish(40)
            pool.post(b, max(len(t.rel) for t in tabs), max(len(t.direct) for t in tabs))
            seen = 0
            while seen < 40:
                seen = b.wait(seen, 5.0)
            assert pool.wait_idle(10.0) == 0 and b.active == 0 and (b.status == 0).all()
            check(tabs, bufs, want)
        # cancelled with nothing published: every thread leaves the batch
        b = NAT.batch(10, 0, fd)
        pool.post(b, 1, 1)
        b.cancel()
        assert pool.wait_idle(10.0) == 0 and (b.status == native.PENDING).all()
        assert pool.usable()
        pool.close()
        assert not pool.usable() and not any(t.is_alive() for t in pool._threads)
    finally:
        if rings is not None:
            rings.close()
        os.close(fd)


def test_engine_pool_lifecycle_and_fallback(adir, monkeypatch):
    """The engine makes its reader pool with its readers and stops it at close; a pool that is not usable
    (a forked child, say) sends loads to the per-part path, with the same slot."""
    if NAT is None:
        pytest.skip("no C compiler")
    path = make_adapter(adir, "pool-life", "tiny-dense", rank=8, dtype="bf16", seed=3, targets=ALL_DENSE)
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, read_mode="exact") as mgr:
        pool = mgr.engine.batch_pool
        assert pool is not None and pool.usable() and pool.threads == mgr.engine.read_workers
        monkeypatch.setattr(type(pool), "usable", lambda self: False)
        mgr.register("a", path)
        mgr.activate("a")
        ls = mgr.stats().load_stats[-1]
        assert not ls["batched"] and ls["native_parts"] > 0
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 2, 0, 1, mgr.pool)) == []
        monkeypatch.undo()
    assert not any(t.is_alive() for t in pool._threads)


def test_batch_made_at_register_is_the_one_loads_reset(adir, monkeypatch):
    """The plan's batch object is made by the preparer at register; its loads reset it, none makes one."""
    if NAT is None:
        pytest.skip("no C compiler")
    path = make_adapter(adir, "pool-prep", "tiny-dense", rank=8, dtype="bf16", seed=4, targets=ALL_DENSE)
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, read_mode="exact") as mgr:
        mgr.register("a", path)
        mgr.register("b", path)  # one slot: each activation evicts the other, so each one loads cold
        mgr.engine.wait_prepared()
        made = []
        orig = type(NAT).batch
        monkeypatch.setattr(type(NAT), "batch", lambda self, *a, **k: made.append(a) or orig(self, *a, **k))
        for n in ("a", "b", "a"):
            mgr.cache.evict("a")
            mgr.cache.evict("b")
            mgr.activate(n)
            ls = mgr.stats().load_stats[-1]
            assert ls["batched"] and not ls["warm"]
        assert made == []
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 2, 0, 1, mgr.pool)) == []


@needs_native
@pytest.mark.parametrize("preset,tp,ep,kw", [
    ("tiny-dense", 4, 1, dict(targets=ALL_DENSE)),
    ("tiny-moe", 4, 1, dict(targets=("q", "k", "v", "o", "experts"))),
    ("tiny-moe", 4, 4, dict(targets=("q", "o", "experts"))),
])
def test_native_and_python_loops_load_the_same_slot(adir, monkeypatch, preset, tp, ep, kw):
    """Every backend and read mode: the C loop and the Python loop read the same file ranges (recorded) into
    the same slot bytes, and the stats say which ran."""
    path = make_adapter(adir, f"native-{preset}-{ep}", preset, rank=8, dtype="bf16", seed=13, **kw)
    backends = ["preadv"] + (["io_uring"] if uring.available() else [])
    for backend in backends:
        for mode in ("auto", "exact"):
            got = {}
            for loop in ("batch", "native", "python"):
                nat = loop != "python"
                rec = ReadRecorder(monkeypatch)
                with new_manager(preset, tp=tp, rank=1, ep=ep, max_loras=1, read_mode=mode, read_backend=backend,
                                 native_reads=nat, chunk_bytes=1 << 16, part_bytes=4096) as mgr:
                    mgr.engine.batch_reads = loop == "batch"
                    plan = mgr.register("a", path)
                    rec.reads.clear()
                    mgr.activate("a")
                    ls = mgr.stats().load_stats[-1]
                    assert (ls["native_parts"] > 0) == nat, (backend, mode, loop)
                    # the batch takes every load whose parts are all direct reads (no span reads here)
                    assert ls["batched"] == (loop == "batch" and ls["span_ops"] == 0), (backend, mode, loop)
                    assert ls["bytes_read"] == read_counts(mgr.engine.chunks(plan)).read
                    assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, tp, 1, ep, mgr.pool)) == []
                    got[loop] = (mgr.pool.checksum(0), sorted(r for r in rec.reads if r[0] != 0))
                monkeypatch.undo()
            assert got["batch"] == got["native"] == got["python"], (backend, mode)


def test_config_checks_native_reads():
    from tp_lora.errors import ConfigError
    from tp_lora.runtime.config import LoRAConfig

    with pytest.raises(ConfigError, match="native_reads"):
        LoRAConfig(native_reads="yes")
    with new_manager("tiny-dense", native_reads=False) as mgr:
        assert mgr.engine.native is None


@needs_native
@pytest.mark.parametrize("order", ["backwards", "interleaved"])
@pytest.mark.parametrize("preset,kw", [("tiny-dense", dict(targets=ALL_DENSE)),
                                       ("tiny-moe", dict(targets=("q", "o", "experts")))])
def test_batch_parts_completing_out_of_order_land_in_place(adir, monkeypatch, preset, kw, order):
    """The loader copies a batch's parts in the order they complete (support.runtime_ref.batch_order:
    last to first, or every chunk's first part, then every chunk's second...): the slot is the
    reference's."""
    check_out_of_order_batch(adir, monkeypatch, preset, kw, order, device="cpu")


@needs_native
def test_native_view_and_batch_layout_keep_the_first_built(monkeypatch):
    """The registration's preparer and a load may build a table's C view, or a plan's batch layout, at
    once (Python >= 3.12's ``cached_property`` has no lock): whoever stores first wins and both use that
    one, so no batch holds the address of a view that is freed. Simulated: the other thread stores its
    view / layout while this one is still building."""
    import types

    reads, _, _ = _random_reads(random.Random(5), 1 << 16, 3)
    tab = reader._IovTable.build(reads)
    real = native.NativeReads.table
    first: list = []

    def racing(*a):
        view = real(*a)
        if not first:   # the other thread finishes first and stores its own view
            other = real(*a)
            first.append(tab.__dict__.setdefault("_native_view", ((other, a[1]), native.ctypes.addressof(other))))
        return view
    monkeypatch.setattr(native.NativeReads, "table", staticmethod(racing))
    got = tab.native
    assert got is first[0] and tab.native is got
    monkeypatch.setattr(native.NativeReads, "table", staticmethod(real))

    part = types.SimpleNamespace(spans=(), reads=reads)
    units = [(None, part)]
    tables: dict = {}
    key = ("batch", id(part), 1)
    real_table = reader._table
    theirs: list = []

    def racing_table(u, t):
        if not theirs:   # the other thread's layout lands while this one builds its own
            theirs.append((["theirs"], 0, 0, 0, [], None, None))
            t[key] = theirs[0]
        return real_table(u, t)
    monkeypatch.setattr(reader, "_table", racing_table)
    assert reader._batch_layout(units, tables) is theirs[0]
    assert tables[key] is theirs[0]

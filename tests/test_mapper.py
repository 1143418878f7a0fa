"""The mapper (device/mapper.py, host/pagecache.py): a cached cold load's last chunks taken from the back
of the C batch and copied by another thread (on CUDA straight from the page cache; here with preadv into
a staging buffer), their cache bytes refilled after the load. Every position of the batch is taken exactly
once, the slot is the reference's, the cache entry equals a load without the mapper, and every failure
falls back to the readers without losing the slot or leaving a half-filled entry."""

from __future__ import annotations

import logging
import os
import random
import threading

import numpy as np
import pytest
import torch

from support.runtime_ref import ALL_DENSE, expected_slot, make_adapter, new_manager, slot_diff
from tp_lora.device import mapper as mapper_mod
from tp_lora.host import native, pagecache, reader

NAT = native.load()
needs_native = pytest.mark.skipif(NAT is None, reason="the native read loop cannot be built here (no C compiler)")


def _table(reads):
    return reader._IovTable.build(tuple((off, tuple(p), (), 0) for off, p in reads))


def test_copies_of_joins_runs_skips_gaps_and_tiles_the_chunk(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    f = tmp_path / "f.bin"
    f.write_bytes(data.tobytes())
    # part 1: file [100, 300) -> buf [0, 200) as two adjacent pieces (joined), a gap of 50, then
    # file [350, 400) -> buf [200, 250); part 2: file [5000, 5100) -> buf [250, 350)
    t1 = _table([(100, [(0, 120), (120, 80), (-1, 50), (200, 50)])])
    t2 = _table([(5000, [(250, 100)])])
    cc = pagecache.copies_of(350, [t1, t2])
    assert cc is not None
    assert cc.dst.tolist() == [0, 200, 250] and cc.src.tolist() == [100, 350, 5000]
    assert cc.nbytes.tolist() == [200, 50, 100] and cc.total == 350
    assert cc.lo == 0 and cc.hi == -(-5100 // pagecache.PAGE) * pagecache.PAGE
    buf = torch.zeros(350, dtype=torch.uint8)
    fd = os.open(f, os.O_RDONLY)
    try:
        pagecache.read_into(fd, cc, buf)
    finally:
        os.close(fd)
    want = np.concatenate([data[100:300], data[350:400], data[5000:5100]])
    assert np.array_equal(buf.numpy(), want)


def test_copies_of_refuses_what_does_not_suit():
    t = _table([(0, [(0, 100)]), (1000, [(100, 100)])])
    assert pagecache.copies_of(200, [t]) is not None
    assert pagecache.copies_of(300, [t]) is None  # does not cover the chunk
    assert pagecache.copies_of(200, [t], max_copies=1) is None
    far = _table([(0, [(0, 100)]), (1 << 20, [(100, 100)])])
    assert pagecache.copies_of(200, [far]) is None  # a span 5000x its bytes
    gathers = reader._IovTable.build(((0, ((0, 100),), ((0, 0, 1),), 0),))
    assert gathers.rest and pagecache.copies_of(100, [gathers]) is None
    assert pagecache.copies_of(0, []) is None


def test_span_maps_checks_residency_and_closes(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(3 * pagecache.PAGE + 100))
    with open(f, "rb") as fh:
        fh.read()
    fd = os.open(f, os.O_RDONLY)
    try:
        s = pagecache.Span(fd, pagecache.PAGE, 8 * pagecache.PAGE, f.stat().st_size)
        assert s.length == 2 * pagecache.PAGE + 100 and s.pages_bytes == 3 * pagecache.PAGE
        assert s.resident()  # just read: in the page cache
        assert bytes(s.tensor[:16].numpy()) == f.read_bytes()[pagecache.PAGE:pagecache.PAGE + 16]
        s.close()
        s.close()  # twice is fine
    finally:
        os.close(fd)


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_claims_from_both_ends_take_every_position_once(seed):
    """Reader threads take positions from the front while another thread takes runs from the back
    (``claim_back``) and completes them: every position gets exactly one status, the readers read none of
    the claimed ones, and the claimed ones are a suffix."""
    rng = random.Random(seed)
    n = 400
    b = NAT.batch(n, 0, -1)
    # tables of zero reads: a reader "reads" a part at once; the C loop still claims and marks it
    empty = reader._IovTable.build(())
    addr = empty.native[1]
    b.set_many(np.arange(n), np.full(n, addr, dtype=np.uint64), 0)
    b.publish(n)
    claimed = []

    def back():
        hi = n
        while hi > 0:
            lo = max(0, hi - rng.randint(1, 7))
            got = b.claim_back(lo)
            if got < 0:
                return
            assert got == hi
            b.complete(lo, hi, native.ON_DEVICE)
            claimed.append((lo, hi))
            hi = lo

    iov = np.zeros((16, 2), dtype=np.uint64)
    res = np.zeros(16, dtype=np.int64)
    readers = [threading.Thread(target=b.run, args=(None, -1, iov.ctypes.data, res.ctypes.data, w))
               for w in range(3)]
    t = threading.Thread(target=back)
    for th in [t, *readers]:
        th.start()
    for th in [t, *readers]:
        th.join(10)
    assert b.wait(n - 1, 1.0) == n
    st = b.status
    on_dev = st == native.ON_DEVICE
    assert np.all((st == 0) | on_dev)
    if claimed:
        low = min(lo for lo, _ in claimed)
        assert on_dev[low:].all() and not on_dev[:low].any()
        assert (b.worker[low:] == -2).all() and (b.worker[:low] >= 0).all()
    # a claim below what the readers took, or above the limit, is refused
    assert b.claim_back(0) == -1 or not claimed


def _adapter(adir, name="mapped", seed=3):
    return make_adapter(adir, name, "tiny-dense", rank=8, dtype="bf16", seed=seed, targets=ALL_DENSE)


def _mgr(map_reads, **kw):
    opts = dict(tp=1, rank=0, max_loras=1, read_mode="exact", chunk_bytes=1 << 13, part_bytes=4096,
                read_workers=1, map_reads=map_reads)
    opts.update(kw)
    mgr = new_manager("tiny-dense", **opts)
    mgr.engine.mapper.head_start = 2  # two chunks claimed before the readers start (deterministic)
    return mgr


def _hold_refill(monkeypatch, eng, gate: threading.Event) -> None:
    """The engine's refills wait for ``gate`` (at most 5 s) before they start."""
    real = eng._refill

    def held(*a):
        gate.wait(5)
        real(*a)
    monkeypatch.setattr(eng, "_refill", held)


def _entry(mgr, name="a"):
    e = mgr.cache._entries[name]
    assert e.complete
    return [b.clone() for b in e.buffers]


@needs_native
def test_mapped_load_fills_the_slot_and_the_entry_as_the_readers_do(adir):
    path = _adapter(adir)
    with _mgr("off") as ref:
        ref.register("a", path)
        ref.activate("a")
        want = _entry(ref)
    with _mgr("on") as mgr:
        plan = mgr.register("a", path)
        mgr.activate("a")
        ls = mgr.stats().load_stats[-1]
        assert ls["batched"] and ls["mapped_chunks"] >= 1 and ls["bytes_mapped"] > 0
        # the readers read the rest; the mapped bytes come later, from the refill
        assert ls["bytes_read"] + ls["bytes_mapped"] == plan.nbytes
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 1, 0, 1, mgr.pool)) == []
        mgr.engine.settle_fill()
        assert mgr.engine.refills["bytes"] == ls["bytes_mapped"] and mgr.engine.refills["failed"] == 0
        got = _entry(mgr)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert mgr.engine.mapper._free.qsize() == mapper_mod.MAP_STAGINGS  # every staging buffer back
        # a later activation of the cached entry is warm and lands the same slot
        mgr.pool.free(0)
        mgr._adapters["a"].state = type(mgr._adapters["a"].state).REGISTERED
        mgr._adapters["a"].future = None
        mgr.activate("a")
        assert mgr.stats().load_stats[-1]["warm"]
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 1, 0, 1, mgr.pool)) == []


@needs_native
def test_evict_waits_for_the_refill(adir, monkeypatch):
    """An entry being refilled is in flight; ``evict`` waits for its refill instead of leaving it behind
    (an unregistered adapter's pinned bytes would stay forever)."""
    path = _adapter(adir)
    gate = threading.Event()
    with _mgr("on") as mgr:
        eng = mgr.engine
        _hold_refill(monkeypatch, eng, gate)
        mgr.register("a", path)
        mgr.activate("a")
        assert mgr.stats().load_stats[-1]["mapped_chunks"] >= 1
        assert not mgr.cache.contains("a")  # not complete until refilled
        threading.Timer(0.2, gate.set).start()
        assert mgr.cache.evict("a")
        assert not mgr.cache.contains("a") and mgr.cache.reserved_bytes == 0


@needs_native
def test_a_failing_copy_falls_back_to_the_readers_and_turns_mapping_off(adir, monkeypatch, caplog):
    path = _adapter(adir)

    def broken(fd, cc, buf):
        raise OSError("simulated: the driver refused the registration")
    monkeypatch.setattr(mapper_mod, "read_into", broken)
    with _mgr("on") as mgr, caplog.at_level(logging.WARNING, logger="tp_lora.device.mapper"):
        mgr.register("a", path)
        mgr.activate("a")
        ls = mgr.stats().load_stats[-1]
        assert ls["bytes_mapped"] == 0
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 1, 0, 1, mgr.pool)) == []
        assert mgr.engine.mapper.disabled and "off from now on" in caplog.text
        assert not mgr.engine.mapper.wanted(1 << 40)
        mgr.engine.settle_fill()
        assert mgr.cache.contains("a")


@needs_native
def test_pages_not_in_the_page_cache_stay_the_readers(adir, monkeypatch):
    path = _adapter(adir)
    monkeypatch.setattr(pagecache.Span, "resident", lambda self: False)
    with _mgr("on") as mgr:
        mgr.register("a", path)
        mgr.activate("a")
        ls = mgr.stats().load_stats[-1]
        assert ls["bytes_mapped"] == 0 and ls["batched"]
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 1, 0, 1, mgr.pool)) == []
        assert mgr.engine.mapper.disabled is None  # not an error: later loads may map


@needs_native
def test_a_failed_refill_drops_the_entry_and_keeps_the_slot(adir, monkeypatch, caplog):
    """The file changes between the load and its refill: the entry is dropped (its mapped chunks would
    hold other bytes than the slot), the slot stays, the next load reads the file again."""
    path = _adapter(adir, "changing")
    gate = threading.Event()
    with _mgr("on") as mgr, caplog.at_level(logging.WARNING, logger="tp_lora.device.transfer"):
        eng = mgr.engine
        _hold_refill(monkeypatch, eng, gate)
        mgr.register("a", path)
        mgr.activate("a")
        assert mgr.stats().load_stats[-1]["mapped_chunks"] >= 1
        w = path / "adapter_model.safetensors"
        st = w.stat()
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten after the load, say
        gate.set()
        eng.settle_fill()
        assert "refilling its cache entry failed" in caplog.text and eng.refills["failed"] == 1
        assert not mgr.cache.contains("a") and mgr.cache.reserved_bytes == 0
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 1, 0, 1, mgr.pool)) == []


@needs_native
def test_a_failing_load_with_the_mapper_rolls_back_and_returns_its_buffers(adir):
    path = _adapter(adir)
    with _mgr("on") as mgr:
        mgr.register("a", path)

        def hook(name, stage, i):
            if stage == "h2d" and i == 1:
                raise OSError("simulated failure")
        mgr.fault_hook = hook
        with pytest.raises(Exception, match="simulated failure"):
            mgr.activate("a")
        mgr.engine.settle_fill()
        assert not mgr.cache.contains("a") and mgr.cache.reserved_bytes == 0
        assert mgr.engine.mapper._free.qsize() == mapper_mod.MAP_STAGINGS
        mgr.fault_hook = None
        mgr.activate("a")
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 1, 0, 1, mgr.pool)) == []


def test_config_checks_map_reads():
    from tp_lora.errors import ConfigError
    from tp_lora.runtime.config import LoRAConfig

    with pytest.raises(ConfigError, match="map_reads"):
        LoRAConfig(map_reads="yes")
    with new_manager("tiny-dense") as mgr:  # CPU: "auto" maps nothing
        assert not mgr.engine.mapper.wanted(1 << 40)


@needs_native
@pytest.mark.parametrize("fail", [None, "register", "copy"])
def test_map_chunk_in_c_claims_pins_copies_and_completes(tmp_path, fail):
    """native.c ``tpl_map_chunk`` with stand-ins for the CUDA runtime (copies as host memmoves): the
    chunk's bytes land in place and its positions are ON_DEVICE; a refused registration or copy gives
    them status 1 (the loader reads them), nothing stays registered; a chunk a reader already took, or
    pages not in the page cache, are not taken."""
    import ctypes

    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 5 * pagecache.PAGE + 123, dtype=np.uint8)
    f = tmp_path / "f.bin"
    f.write_bytes(data.tobytes())
    f.read_bytes()  # in the page cache
    calls = {"register": 0, "copy": 0, "record": 0, "wait": 0}
    REG = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
    CPY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                           ctypes.c_void_p)
    WAIT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)
    REC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

    def reg(p, n, flags):
        calls["register"] += 1
        assert flags == 8 and n % pagecache.PAGE == 0
        return 1 if fail == "register" else 0

    def cpy(d, s, n, kind, stream):
        calls["copy"] += 1
        assert kind == 1
        if fail == "copy":
            return 700
        ctypes.memmove(d, s, n)
        return 0

    fns = [REG(reg), CPY(cpy), WAIT(lambda s, e, fl: calls.__setitem__("wait", calls["wait"] + 1) or 0),
           REC(lambda e, s: calls.__setitem__("record", calls["record"] + 1) or 0)]
    cuda = native._Cuda(*[ctypes.cast(fn, ctypes.c_void_p).value for fn in fns])
    n = 6
    b = NAT.batch(n, 0, -1)
    out = np.zeros(300, dtype=np.uint8)
    dst = np.array([0, 100], dtype=np.int64)
    src = np.array([pagecache.PAGE + 7, 3 * pagecache.PAGE + 50], dtype=np.int64)
    ln = np.array([100, 200], dtype=np.int64)
    lo_off, map_len = pagecache.PAGE, 4 * pagecache.PAGE + 123
    vec = np.zeros(8, dtype=np.uint8)
    rc, addr = NAT.map_chunk(b, cuda, os.open(f, os.O_RDONLY), 4, 6, lo_off, map_len,
                             5 * pagecache.PAGE, dst, src, ln, out.ctypes.data, 0, 1234, 5678, vec)
    st = b.status
    if fail is None:
        assert rc == 1 and addr != 0
        assert np.array_equal(out[:100], data[src[0]:src[0] + 100])
        assert np.array_equal(out[100:], data[src[1]:src[1] + 200])
        assert (st[4:] == native.ON_DEVICE).all() and (st[:4] == native.PENDING).all()
        assert calls["wait"] == 1 and calls["record"] == 1
        pagecache._libc.munmap(addr, map_len)
    else:
        assert rc <= -100000 and (st[4:] == 1).all()
        assert calls["record"] == 0
        if addr:
            pagecache._libc.munmap(addr, map_len)
    assert b.wait(1, 0.0) == 2  # the loader was told
    # positions [4, 6) are gone: a second claim of them is refused and maps nothing
    rc2, addr2 = NAT.map_chunk(b, cuda, os.open(f, os.O_RDONLY), 4, 6, lo_off, map_len, 5 * pagecache.PAGE,
                               dst, src, ln, out.ctypes.data, 0, 0, 5678, vec)
    assert rc2 == 0 and addr2 == 0

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


@needs_native
@pytest.mark.parametrize("use_ring", [True, False], ids=["io_uring", "preadv"])
def test_read_part_equals_the_file(tmp_path, use_ring):
    if use_ring and not uring.available():
        pytest.skip("this kernel refuses io_uring")
    data = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.tobytes())
    fd = os.open(f, os.O_RDONLY)
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

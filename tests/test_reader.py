"""SliceReader at load time (host/reader.py): one open per load, identity checked on that fd, links not
followed, short and changed reads detected with our error naming the file (and tensor), no fd leak."""

from __future__ import annotations

import os
import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from support.runtime_ref import ALL_DENSE, make_adapter, new_manager
from tp_lora.device.transfer import LoadJob
from tp_lora.errors import AdapterActivationError, AdapterDataError
from tp_lora.format import safetensors_header as sh
from tp_lora.host.reader import SliceReader

W = "adapter_model.safetensors"


@pytest.fixture
def adapter(tmp_path_factory, tmp_path):
    src = make_adapter(tmp_path_factory.mktemp("reader"), "r", "tiny-dense", rank=8, dtype="bf16",
                       targets=ALL_DENSE, seed=40)
    path = tmp_path / "a"
    shutil.copytree(src, path)
    return path


def _run(mgr, name="x"):
    a = mgr._adapters[name]
    mgr.pool.reserve(0, name)
    try:
        return mgr.engine.run(LoadJob(header=a.header, plan=a.plan, slot=0))
    finally:
        mgr.pool.free(0)


def test_link_swapped_in_is_not_followed(adapter, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(adapter / W, outside)  # same bytes, outside the folder
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as mgr:
        mgr.register("x", adapter)
        (adapter / W).unlink()
        os.symlink(outside, adapter / W)
        with pytest.raises(AdapterDataError, match="symbolic link"):
            _run(mgr)
        assert mgr.cache.reserved_bytes == 0


def test_replaced_file_loads_only_with_the_registered_header(adapter, caplog):
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as mgr:
        mgr.register("x", adapter)
        data = bytearray((adapter / W).read_bytes())
        os.rename(adapter / W, adapter / "old")  # kept, so its inode number is not reused at once
        (adapter / W).write_bytes(bytes(data))  # a new inode: not the file registration validated
        with caplog.at_level("WARNING", logger="tp_lora.host.reader"):
            assert not _run(mgr).stats.warm  # same header: offsets hold; loaded, with a warning
        assert "replaced or rewritten since registration" in caplog.text
        mgr.cache.evict("x")
        hl = int.from_bytes(data[:8], "little")
        i = data.index(b'"shape"', 8, 8 + hl)
        data[i + 1] = ord("S")
        os.rename(adapter / W, adapter / "old2")
        (adapter / W).write_bytes(bytes(data))  # replaced by a same-size file with another header
        with pytest.raises(AdapterDataError, match="replaced and its safetensors header differs"):
            _run(mgr)


def test_rewritten_in_place_same_header_is_read_other_header_refused(adapter):
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as mgr:
        mgr.register("x", adapter)
        p = adapter / W
        raw = bytearray(p.read_bytes())
        with open(p, "r+b") as f:  # same inode, new mtime, header unchanged: offsets still valid
            f.write(bytes(raw))
        assert not _run(mgr).stats.warm
        mgr.cache.evict("x")
        hl = int.from_bytes(raw[:8], "little")
        i = raw.index(b'"shape"', 8, 8 + hl)
        raw[i + 1] = ord("S")  # same size, another header
        p.write_bytes(bytes(raw))
        with pytest.raises(AdapterDataError, match="header differs"):
            _run(mgr)


def _other_header(raw: bytearray) -> bytes:
    hl = int.from_bytes(raw[:8], "little")
    i = raw.index(b'"shape"', 8, 8 + hl)
    out = bytearray(raw)
    out[i + 1] = ord("S")  # same size, another header
    return bytes(out)


def test_fresh_file_has_its_header_checked_at_every_cold_load(adapter):
    # just copied (ctime now): not settled, so each cold load reads and compares the header
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as mgr:
        mgr.register("x", adapter)
        assert mgr._adapters["x"].header.settled_identity is None
        for _ in range(2):
            assert _run(mgr).stats.header_checked
            mgr.cache.evict("x")


def test_settled_file_skips_the_header_check_until_it_is_written(adapter, monkeypatch):
    monkeypatch.setattr(sh, "SETTLE_NS", 50_000_000)  # 50 ms, so that the test need not wait 2 s
    time.sleep(0.12)
    p = adapter / W
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as mgr:
        mgr.register("x", adapter)
        st = os.stat(p)
        assert mgr._adapters["x"].header.settled_identity == sh.stat_identity(st)
        res = _run(mgr)
        assert not res.stats.warm and not res.stats.header_checked
        mgr.cache.evict("x")
        # another header written in place, then mtime put back: the 4-field identity matches again, the
        # ctime does not, so the header is compared and the load refused
        raw = bytearray(p.read_bytes())
        with open(p, "r+b") as f:
            f.write(_other_header(raw))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = os.stat(p)
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
        with pytest.raises(AdapterDataError, match="header differs"):
            _run(mgr)
        assert mgr.cache.names() == []


def test_settled_identity_needs_mtime_and_ctime_older_than_the_window():
    st = SimpleNamespace(st_dev=3, st_ino=7, st_size=100, st_mtime_ns=10_000, st_ctime_ns=20_000)
    assert sh.settled_identity(st, 20_000 + sh.SETTLE_NS) == (3, 7, 100, 10_000, 20_000)
    assert sh.settled_identity(st, 20_000 + sh.SETTLE_NS - 1) is None  # ctime too recent
    st.st_mtime_ns = 30_000  # mtime set ahead (utime): counts too
    assert sh.settled_identity(st, 20_000 + sh.SETTLE_NS) is None


def test_change_during_the_read_is_detected(adapter):
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, chunk_bytes=4096) as mgr:
        mgr.register("x", adapter)
        p = adapter / W
        data = p.read_bytes()
        a = mgr._adapters["x"]
        done = []

        def fault(stage, i):  # truncated and regrown to the same size while the load reads
            if stage == "read" and not done:
                done.append(i)
                with open(p, "r+b") as f:
                    f.truncate(8)
                    f.seek(0)
                    f.write(data)
                    f.flush()
                    os.utime(p, ns=(1, 1))

        mgr.pool.reserve(0, "x")
        with pytest.raises(AdapterDataError, match="changed while it was read|truncated while reading"):
            mgr.engine.run(LoadJob(header=a.header, plan=a.plan, slot=0, fault=fault))
        mgr.pool.free(0)
        assert mgr.cache.names() == [] and mgr.cache.reserved_bytes == 0 and done


def test_short_read_names_the_tensor(adapter):
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as mgr:
        mgr.register("x", adapter)
        rd = SliceReader(mgr._adapters["x"].header)
        try:
            chunk = mgr.engine.chunks(mgr._adapters["x"].plan)[-1]
            os.truncate(adapter / W, chunk.reads[0][0] + 1 if chunk.reads else 9)
            with pytest.raises(AdapterDataError, match="truncated while reading.*|tensor '"):
                rd.read_chunk(chunk, torch.empty(chunk.nbytes, dtype=torch.uint8))
        finally:
            rd.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak_when_ring_allocation_fails(adapter, monkeypatch):
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, host_cache_bytes=0) as mgr:
        mgr.register("x", adapter)

        def boom(n):
            raise MemoryError("injected ring allocation failure")

        monkeypatch.setattr(mgr.arena, "alloc", boom)
        _run_fail = lambda: pytest.raises((MemoryError, AdapterActivationError))  # noqa: E731
        with _run_fail():
            _run(mgr)
        before = _fds()
        for _ in range(20):
            with _run_fail():
                _run(mgr)
        assert _fds() == before


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("slots", [(0, 1, 2), (2,), (3, 0, 2)])
def test_span_gather_matches_byte_by_byte_copies(step, slots, aligned):
    """One gather per copy group places every span slice where a byte-by-byte copy would: consecutive
    blocks (one contiguous destination), a single block, and blocks out of order (index_copy_); byte-wise
    and in wider words (offsets all divisible by 8 / the element size)."""
    from tp_lora.plan.packing import SpanCopy

    g = torch.Generator().manual_seed(step * 10 + len(slots))
    scratch = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
    nrows, ncols, isz, row_bytes, count, goff = 3, 4, 2, 200, 4, 16
    src = tuple((8 + 616 * j) if aligned else (7 + 611 * j) for j in range(len(slots)))
    cp = SpanCopy(goff, count, nrows, ncols, isz, step, row_bytes, src, slots,
                  tuple(range(len(slots))))
    assert cp.width == ((8 if step == 1 else 2) if aligned else 1)
    buf = torch.zeros(goff + count * cp.block_bytes + 8, dtype=torch.uint8)
    want = buf.clone()
    raw = scratch.tolist()
    for s, k in zip(src, slots):
        out = goff + k * cp.block_bytes
        for r in range(nrows):
            for c in range(ncols):
                at = s + r * row_bytes + c * step * isz
                want[out:out + isz] = torch.tensor(raw[at:at + isz], dtype=torch.uint8)
                out += isz
    SliceReader._gather_out(cp, buf, scratch)
    assert torch.equal(buf, want)

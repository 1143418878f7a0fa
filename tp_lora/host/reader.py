"""SliceReader: this rank's bytes of one adapter file, read into packed host buffers.

One open per load: every check and every read of the load goes through that one fd.

- Opened with O_NOFOLLOW | O_NONBLOCK: a link swapped in since registration is not followed (it could
  point out of the adapter folder), a FIFO does not block the loader thread.
- ``fstat`` on that fd: a regular file of the registered size. Its identity (device, inode, mtime) is
  compared with what registration recorded; a file replaced or rewritten since is loaded only if its
  header bytes, read from the same fd, are exactly those registered (the planned offsets then hold, and
  the finite check covers the data), with a warning naming the file. Refusing it outright would also
  refuse a file restored from a copy (the suite's repair-by-copy case loads with the same registration).
  The header is compared on every cold load unless the fd's (device, inode, size, mtime, ctime) equal
  the identity registration recorded for a file last written well before it was registered
  (``AdapterHeader.settled_identity``): then no write can have happened since, as for the data bytes,
  which only that comparison guards (the check is a few ms of sha256 for a 37k-tensor header).
- Short reads (a file truncated during the load) and changes during the load (size, mtime or ctime
  differ at the end: truncated and regrown to the same size) raise AdapterDataError naming the file and
  the tensor.

The reads are the packing's precomputed scatter runs (``os.preadv`` releases the GIL) and span reads
(one read into per-thread scratch, then the owned bytes gathered out of it: one torch op per copy group
of a read, which also runs without the GIL).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import hashlib
import logging
import os
import stat
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AdapterDataError
from ..format.adapter import AdapterHeader
from ..format.safetensors_header import file_identity, stat_identity
from ..plan.packing import Chunk, Part, SpanCopy
from . import native as native_mod
from . import uring
from .memory import ScratchPool
from .native import NativeReads

log = logging.getLogger(__name__)

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0))


_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _libc_preadv():
    """libc's preadv through ctypes, which drops the GIL for the call like ``os.preadv``, but takes a
    prebuilt iovec array: the per-piece Python (one memoryview per iovec: ~56k pieces in a rank of a
    sharded MoE) is gone from the readers' hot loop, where the GIL serialised it across 16 readers.
    None where there is no such libc call (the ``os.preadv`` path is used then)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).preadv
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    f.restype = ctypes.c_ssize_t
    return f


_PREADV = _libc_preadv()


def _RING_READV(ring: uring.Ring, fd: int, addr: np.ndarray, niov: np.ndarray, off: np.ndarray) -> np.ndarray:
    """One batch of READV requests through ``ring`` (a module-level name: the tests' read recorder
    wraps it)."""
    return ring.readv(fd, addr, niov, off)


def _NATIVE_READ(nat: NativeReads, ring_addr: int | None, fd: int, tab: "_IovTable", buf: int, scratch: int,
                 iov: int, res: np.ndarray) -> int:
    """One part's direct reads through the C loop (a module-level name, like ``_RING_READV``: the tests'
    read recorder wraps it). ``res`` [k] receives each read's result; returns the count short of their
    bytes, or -errno when the ring failed."""
    return nat.read_part(ring_addr, fd, tab.native[1], buf, scratch, iov, res.ctypes.data)


_BATCH_SHORT_EVERY = 0  # tests: the C batch reports every n-th part short, so the redo path runs
_BATCH_ORDER = None  # tests: callable(units) -> the order the C batch takes parts in (a permutation)


@dataclass(frozen=True)
class _IovTable:
    """The iovecs of a unit's scatter reads, relative to the chunk buffer or the scratch: built once per
    plan (numpy), rebased per load by one vectorised add. ``rel`` [pieces, 2] uint64 (offset, bytes),
    ``scratch`` [pieces] bool, ``reads`` (first row, rows, file offset, bytes) per read."""

    rel: np.ndarray
    scratch: np.ndarray
    reads: tuple[tuple[int, int, int, int], ...]
    buf_end: int  # bytes of the chunk buffer / the scratch the iovecs reach: checked before every call
    scratch_end: int
    # the reads without gathers out of the scratch (their scratch pieces are gaps, dropped: they may run
    # at once, in one io_uring submission, even onto the same junk bytes; reads with span gathers share
    # the scratch, so they run one after another): their indices, first iovec's byte offset in the
    # table, iovec counts, file offsets and bytes (each and in all)
    direct: np.ndarray
    direct_first: np.ndarray
    direct_n: np.ndarray
    direct_off: np.ndarray
    direct_want: np.ndarray
    direct_bytes: int
    rest: tuple[int, ...]  # the other reads (one preadv each, then their gathers), in order

    @staticmethod
    def build(reads) -> "_IovTable":
        rows, scr, meta, direct = [], [], [], []
        for i, (file_off, pieces, copies, _) in enumerate(reads):
            meta.append((len(rows), len(pieces), file_off, sum(n for _, n in pieces)))
            if not copies:
                direct.append(i)
            for o, n in pieces:
                rows.append((o if o >= 0 else -o - 1, n))
                scr.append(o < 0)
        rel = np.array(rows, dtype=np.uint64).reshape(-1, 2)
        ends = [(o + n, s) for (o, n), s in zip(rows, scr)]
        d = [meta[i] for i in direct]
        ds = set(direct)
        return _IovTable(rel, np.array(scr, dtype=bool), tuple(meta),
                         max([e for e, s in ends if not s] + [0]), max([e for e, s in ends if s] + [0]),
                         np.array(direct, dtype=np.int64), np.array([16 * m[0] for m in d], dtype=np.uint64),
                         np.array([m[1] for m in d], dtype=np.uint32), np.array([m[2] for m in d], dtype=np.uint64),
                         np.array([m[3] for m in d], dtype=np.int64), sum(m[3] for m in d),
                         tuple(i for i in range(len(meta)) if i not in ds))

    def check(self, buf: torch.Tensor, scratch: torch.Tensor | None) -> None:
        """The iovecs stay inside this load's buffers (they become raw pointers: checked before every use)."""
        if buf.numel() < self.buf_end or (self.scratch_end and (scratch is None or scratch.numel() < self.scratch_end)):
            raise AssertionError(f"read plan reaches byte {self.buf_end} / {self.scratch_end} of buffers of "
                                 f"{buf.numel()} / {0 if scratch is None else scratch.numel()} bytes")
        assert buf.is_contiguous() and buf.dtype == torch.uint8 and buf.device.type == "cpu"

    @property
    def native(self) -> tuple:
        """The table as native.c's ``struct tpl_table`` (and the arrays it points into), and its address:
        built once. The registration's preparer and a load may build it at once; the first one stored is
        the one both use (``functools.cached_property`` has no lock since Python 3.12: the loser's view,
        whose address a batch may already hold, would be freed)."""
        v = self.__dict__.get("_native_view")
        if v is None:
            scr = self.scratch.view(np.uint8)
            t = NativeReads.table(self.rel, scr, self.direct_first, self.direct_n, self.direct_off,
                                  self.direct_want)
            v = self.__dict__.setdefault("_native_view", ((t, scr), ctypes.addressof(t)))
        return v

    def rebased(self, buf: torch.Tensor, scratch: torch.Tensor | None) -> np.ndarray:
        """The iovecs for this load's buffers (raw pointers: the bounds are checked here, once)."""
        self.check(buf, scratch)
        buf_ptr, scratch_ptr = buf.data_ptr(), 0 if scratch is None else scratch.data_ptr()
        iov = self.rel.copy()
        iov[:, 0] += np.where(self.scratch, np.uint64(scratch_ptr), np.uint64(buf_ptr))
        return iov


_EMPTY_READS: tuple = ()


@dataclass
class PartBatch:
    """A cold load's parts, read in C by the reader pool's threads (native.c ``tpl_read_batch``, run by
    ``tpl_serve``): ``units`` [(chunk, part)] in load order, ``tables`` their iovec tables, ``scratch`` the junk bytes of
    every gap piece (one buffer for all: nothing is gathered out of it)."""

    units: list
    tables: list
    batch: object  # native.Batch
    scratch: torch.Tensor | None
    max_pieces: int
    max_k: int
    ends: np.ndarray | None = None  # [n] int64: where each part's iovecs end in its chunk buffer
    addrs: np.ndarray | None = None  # [n] uint64: each part's native table address
    scratch_need: int = 0  # bytes of scratch its gap pieces reach

    @property
    def n(self) -> int:
        return len(self.units)


def _table(u: Part, tables: dict) -> _IovTable:
    """The unit's iovec table from the plan's ``tables`` (built at its first use)."""
    key = id(u.reads) if u.reads else id(_EMPTY_READS)
    tab = tables.get(key)
    if tab is None:
        tab = tables.setdefault(key, _IovTable.build(u.reads))
    return tab


def _batch_layout(units: list, tables: dict) -> tuple | None:
    """(tables, scratch bytes, most iovecs, most reads, [the batch kept for the next load], each part's
    end in its chunk buffer, each table's native address) of a cached
    load's units [(chunk, part)], or None where a part is not all direct reads; memoised in the plan's
    ``tables`` (keyed by the units' identity: the packing is memoised too)."""
    key = ("batch", id(units[0][1]), len(units))
    got = tables.get(key)
    if got is None:
        tabs: list | None = []
        for _, u in units:
            if u.spans or (u.reads and _table(u, tables).rest):
                tabs = None
                break
            tabs.append(_table(u, tables))
        got = (None,) if tabs is None else (tabs, max((t.scratch_end for t in tabs), default=0),
                                            max((len(t.rel) for t in tabs), default=0),
                                            max((len(t.direct) for t in tabs), default=0), [],
                                            np.array([t.buf_end for t in tabs], dtype=np.int64),
                                            np.array([t.native[1] for t in tabs], dtype=np.uint64))
        # the registration's preparer and a load may build it at once: both use the first one stored (one
        # list of kept batches, one array of table addresses)
        got = tables.setdefault(key, got)
    return None if got[0] is None else got


class SliceReader:
    """Reads this rank's slices from a safetensors file (see the module docstring). Thread-safe: the
    reader threads of one load share it (pread has no file offset)."""

    def __init__(self, header: AdapterHeader, scratch: ScratchPool | None = None, iov_tables: dict | None = None,
                 *, check_header: bool = True, rings: uring.RingPool | None = None,
                 native: NativeReads | None = None):
        self.header = header
        self._rings = rings  # io_uring per reader thread (None: preadv only)
        self._native = native if _PREADV is not None else None  # the C read loop (None: Python's)
        self.ring_reads = 0  # reads done through io_uring submissions
        self.native_parts = 0  # units whose direct reads ran in the C loop
        self._scratch_pool = scratch if scratch is not None else ScratchPool()
        # per plan, owned by the engine (kept across loads); keyed by the id of a unit's reads tuple
        self._iov_tables = iov_tables if iov_tables is not None else {}
        self.path = header.weights_path
        self.fd = -1
        self.replaced = False  # the file's identity differs from the registered one (header identical)
        self.settled = False  # fstat equals the registered settled identity: the header check is not needed
        self.bytes_read = 0
        self.syscalls = 0
        self.last_batch: PartBatch | None = None  # the batch of this reader's last start_batch
        self._lock = threading.Lock()
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as e:
            if os.path.islink(self.path):
                raise self._err("the weights are now a symbolic link: links are not followed at load "
                                "(one could leave the adapter folder); register the adapter again") from None
            raise self._err(f"cannot open the weights for reading: {e}") from None
        self.fd = fd
        try:
            self._opened = self._check_identity(os.fstat(fd))
            if check_header:
                self.check_header()
        except BaseException:
            self.close()
            raise

    # -- checks ----------------------------------------------------------------------------------
    def _err(self, msg: str, tensor: str | None = None) -> AdapterDataError:
        if tensor is not None:
            msg = f"tensor {tensor!r}: {msg}"
        return AdapterDataError(msg, adapter=self.header.name, path=self.path)

    def _check_identity(self, st: os.stat_result) -> tuple[int, int, int]:
        h = self.header
        if not stat.S_ISREG(st.st_mode):
            raise self._err("the weights are no longer a regular file (a directory, FIFO or device)")
        if st.st_size != h.file_size:
            raise self._err(f"file size changed since registration: {h.file_size} -> {st.st_size} bytes")
        ident = h.file_identity
        self.replaced = ident is not None and file_identity(st) != tuple(ident)
        self.settled = h.settled_identity is not None and stat_identity(st) == tuple(h.settled_identity)
        if self.replaced:
            log.warning("adapter %r: %s was replaced or rewritten since registration (dev, ino, size, "
                        "mtime_ns %s -> %s); loading it only if its header is the registered one",
                        h.name, self.path, tuple(ident), file_identity(st))
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def check_header(self) -> None:
        """The planned offsets hold only if the header is byte-for-byte the one registered (a same-size
        rewrite with another layout would load other tensors' bytes). Read from this fd. The engine runs
        it beside the reads (``check_header=False`` at construction: the digest of a 37k-tensor header
        takes ~10 ms) and waits for it before the load can succeed. Nothing to do when the file is
        ``settled`` (``needs_header_check``)."""
        h = self.header
        if not self.needs_header_check:
            return
        # into an uninitialised buffer, hashed in place: the read and the hash release the GIL, a bytes
        # copy and a zero-filled bytearray would not (a 37k-tensor header is 5.4 MB: ~3-6 ms of the GIL,
        # taken from the loader thread at the start of a load)
        raw = np.empty(8 + h.header_bytes, dtype=np.uint8)
        self._pread_into(memoryview(raw), 0)
        if hashlib.sha256(raw).hexdigest() != h.header_digest:
            what = "it was replaced and its" if self.replaced else "its"
            raise self._err(f"the file changed since registration: {what} safetensors header differs (tensor "
                            f"layout or names); register the adapter again")

    @property
    def needs_header_check(self) -> bool:
        """The header must be read and compared: a digest was registered and this open's fstat is not the
        registered settled identity (``safetensors_header.settled_identity``: same device, inode, size,
        mtime and ctime of a file last written well before its registration)."""
        return bool(self.header.header_digest) and not self.settled

    def verify_unchanged(self) -> None:
        """After the last read: the file did not change while it was read (truncated and regrown to the
        same size, rewritten in place)."""
        st = os.fstat(self.fd)
        now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if now != self._opened:
            raise self._err(f"the file changed while it was read (size, mtime_ns, ctime_ns {self._opened} -> "
                            f"{now}); the data read cannot be trusted")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the batch: every part of a load, read in C by the reader pool (native.ReaderPool) -----------
    def batchable(self, units: list) -> bool:
        """Whether every part of ``units`` [(chunk, part)] can go through the C batch: the C loop is built
        and each part's reads are direct scatter reads (no gathers out of the scratch, no span reads,
        which need torch ops and so the GIL)."""
        return self._native is not None and bool(units) and self._batch_layout(units) is not None

    def _batch_layout(self, units: list) -> tuple | None:
        return _batch_layout(units, self._iov_tables)

    def _table(self, u: Part) -> "_IovTable":
        return _table(u, self._iov_tables)

    def start_batch(self, units: list) -> PartBatch:
        """The C batch of ``units`` (``batchable``): parts are published (``set_buffers``) as the loader
        takes their buffers (``set_buffers``), the batch is posted to the reader pool (native.ReaderPool); the loader
        ``redo``es parts whose status is not 0 and calls ``finish_batch`` once the pool is done with it,
        whatever happened."""
        tabs, need, pieces, k, kept, ends, addrs = self._batch_layout(units)
        scratch = self._scratch_pool.take(need) if need else None
        sptr = 0 if scratch is None else scratch.data_ptr()
        order = None if _BATCH_ORDER is None else _BATCH_ORDER(units)
        if kept:  # the plan's batch from its last load (loads of one engine run one at a time)
            b = kept[0].reset(sptr, self.fd, _BATCH_SHORT_EVERY, order)
        else:
            b = self._native.batch(len(units), sptr, self.fd, _BATCH_SHORT_EVERY, order)
            kept.append(b)
        self.last_batch = pb = PartBatch(units, tabs, b, scratch, pieces, k, ends, addrs, need)
        return pb

    def restart_batch(self, pb: PartBatch, start: int) -> None:
        """``pb`` again, readers taking only positions [start, n) (a refill of the parts the mapper
        copied to the device: device/mapper.py): its scratch taken again, every part published (their
        buffers are the ones its load set). Once no reader thread is in it."""
        pb.scratch = self._scratch_pool.take(pb.scratch_need) if pb.scratch_need else None
        sptr = 0 if pb.scratch is None else pb.scratch.data_ptr()
        pb.batch.reset(sptr, self.fd, 0, None, start=start)
        pb.batch.publish(pb.n)

    @staticmethod
    def table_of(u: Part, tables: dict) -> "_IovTable":
        """A unit's iovec table from a plan's ``tables`` (built at first use)."""
        return _table(u, tables)

    def set_buffers(self, pb: PartBatch, idx: list[int], buf: torch.Tensor) -> None:
        """The chunk buffer of parts ``idx`` (their iovecs become raw pointers in C: checked here, once
        for all of them: every part's iovecs end inside ``buf``, the scratch holds every gap piece)."""
        ix = np.asarray(idx, dtype=np.int64)
        if not len(ix):
            return
        end = int(pb.ends[ix].max())
        if buf.numel() < end or (pb.scratch_need and (pb.scratch is None or pb.scratch.numel() < pb.scratch_need)):
            raise AssertionError(f"read plan reaches byte {end} / {pb.scratch_need} of buffers of {buf.numel()} / "
                                 f"{0 if pb.scratch is None else pb.scratch.numel()} bytes")
        assert buf.is_contiguous() and buf.dtype == torch.uint8 and buf.device.type == "cpu"
        pb.batch.set_many(ix, pb.addrs[ix], buf.data_ptr())

    def redo(self, pb: PartBatch, i: int, buf: torch.Tensor) -> None:
        """Part ``i`` again, piece by piece (some of its reads came back short: a signal, a truncated
        file; or its ring failed), raising our error at EOF."""
        chunk, u = pb.units[i]
        for file_off, pieces, _, _ in u.reads:
            self._finish_short(chunk, buf, pb.scratch, pieces, file_off)

    def finish_batch(self, pb: PartBatch) -> None:
        """The batch's stats (the parts read), and its scratch back to the pool. Once no reader thread is
        in the batch any more."""
        st = pb.batch.status
        done = np.flatnonzero((st != native_mod.PENDING) & (st != native_mod.ON_DEVICE)).tolist()
        with self._lock:
            for i in done:
                t, u = pb.tables[i], pb.units[i][1]
                self.bytes_read += t.direct_bytes
                self.syscalls += u.syscalls
            self.native_parts += len(done)
            self.ring_reads += pb.batch.ring_reads
        if pb.scratch is not None:
            self._scratch_pool.give(pb.scratch)
            pb.scratch = None

    # -- reads -----------------------------------------------------------------------------------
    def read_chunk(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Fill a whole chunk's host buffer."""
        self.read_part(chunk, None, buf)

    def read_part(self, chunk: Chunk, part: Part | None, buf: torch.Tensor) -> None:
        """Fill one part of a chunk's buffer (``part`` None: the whole chunk): one preadv per scatter run
        (then the strided copies of the span slices it read into scratch), then the span reads."""
        u = chunk.whole if part is None else part
        need = u.scratch_bytes
        scratch = self._scratch_pool.take(need) if need else None
        try:
            total = self._read_unit(chunk, u, buf, scratch)
        finally:
            if scratch is not None:
                self._scratch_pool.give(scratch)
        with self._lock:
            self.bytes_read += total
            self.syscalls += u.syscalls

    @staticmethod
    def prepare(chunks: list[Chunk], tables: dict, native: NativeReads | None = None) -> None:
        """Build the iovec tables of ``chunks``' units into ``tables`` ahead of the first load (the 56k
        pieces of a sharded MoE rank take tens of ms of Python), with their C views and the layout of a
        cached load's batch (~20 us a part: 4 ms of a 190-part load's start otherwise), and, given
        ``native``, the batch object its loads reset (~0.1-0.2 ms of the first load's start)."""
        if _PREADV is None:
            return
        for c in chunks:
            for u in c.units():
                if u.reads and id(u.reads) not in tables:
                    tables.setdefault(id(u.reads), _IovTable.build(u.reads))
        units = [(c, p) for c in chunks for p in c.units()]
        layout = _batch_layout(units, tables) if units else None
        if layout is not None:
            for t in layout[0]:
                t.native  # noqa: B018 - the cached C view, built now
            kept = layout[4]
            if native is not None and not kept:  # (a load that got here first made its own: kept[0])
                kept.append(native.batch(len(units), 0, -1))

    def _read_unit(self, chunk: Chunk, u: Part, buf: torch.Tensor, scratch: torch.Tensor | None) -> int:
        """The unit's scatter reads (libc preadv on a prebuilt iovec table; ``os.preadv`` with one
        memoryview per piece where libc is not reachable through ctypes), each followed by its gathers,
        then its span reads. With the native loop, the table's rebase and every direct read (the ring's
        batch, or one preadv each) are one C call without the GIL."""
        tab = iov = None
        if _PREADV is not None and u.reads:
            tab = self._iov_tables.get(id(u.reads))
            if tab is None:
                tab = self._iov_tables.setdefault(id(u.reads), _IovTable.build(u.reads))
        total = 0
        todo = range(len(u.reads))
        ring = self._rings.ring() if self._rings is not None and tab is not None and len(tab.direct) > 1 else None
        if tab is not None and self._native is not None:
            iov = self._native_reads(chunk, u, tab, buf, scratch, ring)
            total += tab.direct_bytes
            todo = tab.rest
        elif tab is not None:
            iov = tab.rebased(buf, scratch)
            if ring is not None:
                total += self._ring_reads(ring, chunk, u, tab, iov, buf, scratch)
                todo = tab.rest
        for i in todo:
            file_off, pieces, copies, _ = u.reads[i]
            if tab is not None:
                first, n, _, want = tab.reads[i]
                got = self._libc_preadv(iov.ctypes.data + 16 * first, n, file_off)
            else:
                want = sum(n for _, n in pieces)
                got = os.preadv(self.fd, self._iovecs(buf, scratch, pieces), file_off)
            if got != want:  # short read (a signal, or the end of a truncated file): piece by piece
                self._finish_short(chunk, buf, scratch, pieces, file_off)
            total += want
            for cp in copies:
                self._gather_out(cp, buf, scratch)
        if u.spans:
            total += self._read_spans(chunk, u, buf, scratch)
        return total

    def _ring_reads(self, ring: uring.Ring, chunk: Chunk, u: Part, tab: _IovTable, iov: np.ndarray,
                    buf: torch.Tensor, scratch: torch.Tensor | None) -> int:
        """The unit's direct reads (no gathers) in one io_uring submission; a read that came back short
        (a signal, a truncated file) or failed is done again piece by piece, raising our error at EOF."""
        addr = tab.direct_first + np.uint64(iov.ctypes.data)
        res = _RING_READV(ring, self.fd, addr, tab.direct_n, tab.direct_off)
        if not np.array_equal(res, tab.direct_want):
            self._redo_short(chunk, u, tab, res, buf, scratch)
        with self._lock:
            self.ring_reads += len(res)
        return tab.direct_bytes

    def _redo_short(self, chunk: Chunk, u: Part, tab: _IovTable, res: np.ndarray, buf: torch.Tensor,
                    scratch: torch.Tensor | None) -> None:
        """Direct reads whose result ``res[j]`` is not their byte count (a signal, a truncated file, an
        error): done again piece by piece, raising our error at EOF."""
        for j in np.flatnonzero(res != tab.direct_want).tolist():
            file_off, pieces, _, _ = u.reads[int(tab.direct[j])]
            self._finish_short(chunk, buf, scratch, pieces, file_off)

    def _native_reads(self, chunk: Chunk, u: Part, tab: _IovTable, buf: torch.Tensor,
                      scratch: torch.Tensor | None, ring: uring.Ring | None) -> np.ndarray:
        """The table rebased and its direct reads done by one call of the C loop (through ``ring``, this
        thread's, when given, else one preadv each); reads that came back short are done again piece by
        piece. Returns the rebased iovecs (the other reads use them)."""
        nat = self._native
        tab.check(buf, scratch)
        k = len(tab.direct)
        iov, iov_ptr, res = nat.buffers(len(tab.rel), k)
        raddr = None if ring is None else NativeReads.ring_addr(ring)
        bptr, sptr = buf.data_ptr(), 0 if scratch is None else scratch.data_ptr()
        bad = _NATIVE_READ(nat, raddr, self.fd, tab, bptr, sptr, iov_ptr, res[:k])
        if bad < 0:  # the ring failed (it may hold reads in flight): drop it, read this part with preadv
            log.warning("io_uring_enter failed on a reader thread (%s): its ring is closed, this part read "
                        "again with preadv (the thread makes a new ring for its next part)", os.strerror(-bad))
            self._rings.discard(ring)
            bad = _NATIVE_READ(nat, None, self.fd, tab, bptr, sptr, iov_ptr, res[:k])
            ring = None
        if bad:
            self._redo_short(chunk, u, tab, res[:k], buf, scratch)
        with self._lock:
            self.native_parts += 1
            if ring is not None:
                self.ring_reads += k
        return iov[:len(tab.rel)]

    def _libc_preadv(self, iov_ptr: int, n: int, file_off: int) -> int:
        got = _PREADV(self.fd, iov_ptr, n, file_off)
        while got < 0 and ctypes.get_errno() == errno.EINTR:
            got = _PREADV(self.fd, iov_ptr, n, file_off)
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), self.path)
        return got

    @staticmethod
    def _iovecs(buf: torch.Tensor, scratch: torch.Tensor | None, pieces) -> list[memoryview]:
        """One memoryview per piece: (offset >= 0) into the chunk buffer, else into the scratch."""
        mv = memoryview(buf.numpy()).cast("B")
        smv = memoryview(scratch.numpy()).cast("B") if scratch is not None else None
        return [mv[o:o + n] if o >= 0 else smv[-o - 1:n - o - 1] for o, n in pieces]

    def _finish_short(self, chunk: Chunk, buf: torch.Tensor, scratch: torch.Tensor | None, pieces,
                      file_off: int) -> None:
        """After a short preadv (a signal, the end of a truncated file): every piece again, one by one,
        raising our error at EOF."""
        pos = file_off
        for v, (o, n) in zip(self._iovecs(buf, scratch, pieces), pieces):
            self._pread_into(v, pos, chunk, max(o, 0))
            pos += n

    def _read_spans(self, chunk: Chunk, u: Part, buf: torch.Tensor, scratch: torch.Tensor | None) -> int:
        smv = memoryview(scratch.numpy()).cast("B")
        total = 0
        for sp in u.spans:
            self._pread_into(smv[:sp.nbytes], sp.file_offset, chunk, chunk.offsets[sp.ops[0]])
            total += sp.nbytes
            for cp in sp.copies:
                self._gather_out(cp, buf, scratch)
        return total

    @staticmethod
    def _gather_out(cp: SpanCopy, buf: torch.Tensor, scratch: torch.Tensor) -> None:
        """The span slices of one copy group out of the scratch, by one gather (torch releases the GIL
        inside the op: the readers' Python per slice was the serial part of a tiny-slice load).

        The source is a view of the scratch with one "row" per start offset (stride 1 on the first dim),
        so ``index_select`` picks each slice's start; the slices land in their packed blocks of the group.
        Both buffers are viewed in the widest integer type that every offset and length divides
        (``cp.width``): a byte-wise gather copies 2-8x more elements."""
        w = cp.width if (buf.data_ptr() | scratch.data_ptr()) % cp.width == 0 else 1
        dt = _WORD[w]
        sw = scratch[:scratch.numel() // w * w].view(dt)
        bw = buf[:buf.numel() // w * w].view(dt)
        if cp.step == 1:
            inner, strides = (cp.nrows, cp.ncols * cp.itemsize // w), (cp.row_bytes // w, 1)
        elif w == cp.itemsize:
            inner, strides = (cp.nrows, cp.ncols), (cp.row_bytes // w, cp.step)
        else:  # strided columns (fused-expert B: experts interleave at element granularity)
            inner = (cp.nrows, cp.ncols, cp.itemsize // w)
            strides = (cp.row_bytes // w, cp.step * cp.itemsize // w, 1)
        extent = 1 + sum((d - 1) * st for d, st in zip(inner, strides))
        src = torch.as_strided(sw, (sw.numel() - extent + 1,) + inner, (1,) + strides)
        g0 = cp.group_offset // w
        group = bw[g0:g0 + cp.group_count * cp.block_bytes // w].view((cp.group_count,) + inner)
        starts = [x // w for x in cp.src]
        rng = cp.slot_range
        if len(starts) == 1:
            group[cp.slots[0]].copy_(src[starts[0]])
        elif rng is not None:
            torch.index_select(src, 0, torch.tensor(starts, dtype=torch.int64), out=group[rng[0]:rng[0] + rng[1]])
        else:
            group.index_copy_(0, torch.tensor(cp.slots, dtype=torch.int64),
                              torch.index_select(src, 0, torch.tensor(starts, dtype=torch.int64)))

    def _tensor_at(self, chunk: Chunk, offset: int) -> str:
        i = max(0, bisect.bisect_right(chunk.offsets, offset) - 1)
        return chunk.ops[i].tensor if chunk.ops else "?"

    def _pread_into(self, mv: memoryview, offset: int, chunk: Chunk | None = None, dst: int = 0) -> None:
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise self._err(f"file truncated while reading: got {done} of {len(mv)} bytes at offset "
                                f"{offset}", tensor=None if chunk is None else self._tensor_at(chunk, dst))
            done += n

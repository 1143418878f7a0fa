"""io_uring through ctypes: many preadv-like reads of one part in ONE system call, without the GIL.

Why: a rank of a TP=8 layout owns a 1/8 column slice of every row of the row-parallel A factors
(o_proj, down_proj): reading only the owned bytes takes one read per row (21k for Llama-3.1-70B r128),
and a Python loop of ``preadv`` calls costs ~7 us of GIL-held Python each, serialised over 16 reader
threads, so the packing read whole row ranges instead (1.48x the owned bytes). Here a reader thread
writes a part's reads into its ring's submission queue with a few vectorised numpy stores and submits
them with one ``io_uring_enter``; for a file in the page cache the kernel copies each read inline, in
that thread, in parallel with the other readers.

``Ring`` is one io_uring instance (``IORING_OP_READV`` entries, one per read); ``RingPool`` keeps one
per reader thread, created on first use and closed with the engine. ``available()`` probes once whether
this kernel lets the process create a ring (containers' seccomp profiles often refuse io_uring); where
it does not, the reader keeps its preadv loop. Linux x86-64 and aarch64 only (the syscall numbers).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import sys
import threading
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

ReadBackend = Literal["auto", "io_uring", "preadv"]
READ_BACKENDS: tuple[str, ...] = ("auto", "io_uring", "preadv")

_NR = {"x86_64": (425, 426), "aarch64": (425, 426), "arm64": (425, 426)}  # io_uring_setup, io_uring_enter
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_ENTER_GETEVENTS = 1
_OP_READV = 1

_SQE = np.dtype([("opcode", "u1"), ("flags", "u1"), ("ioprio", "<u2"), ("fd", "<i4"), ("off", "<u8"),
                 ("addr", "<u8"), ("len", "<u4"), ("rw_flags", "<u4"), ("user_data", "<u8"),
                 ("buf_index", "<u2"), ("personality", "<u2"), ("splice_fd_in", "<i4"), ("addr3", "<u8"),
                 ("pad", "<u8")])
_CQE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])
assert _SQE.itemsize == 64 and _CQE.itemsize == 16


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                # io_sqring_offsets
                ("sq_head", ctypes.c_uint32), ("sq_tail", ctypes.c_uint32), ("sq_ring_mask", ctypes.c_uint32),
                ("sq_ring_entries", ctypes.c_uint32), ("sq_flags", ctypes.c_uint32),
                ("sq_dropped", ctypes.c_uint32), ("sq_array", ctypes.c_uint32), ("sq_resv1", ctypes.c_uint32),
                ("sq_user_addr", ctypes.c_uint64),
                # io_cqring_offsets
                ("cq_head", ctypes.c_uint32), ("cq_tail", ctypes.c_uint32), ("cq_ring_mask", ctypes.c_uint32),
                ("cq_ring_entries", ctypes.c_uint32), ("cq_overflow", ctypes.c_uint32),
                ("cq_cqes", ctypes.c_uint32), ("cq_flags", ctypes.c_uint32), ("cq_resv1", ctypes.c_uint32),
                ("cq_user_addr", ctypes.c_uint64)]


assert ctypes.sizeof(_Params) == 120


def _syscalls():
    if not sys.platform.startswith("linux"):
        return None
    nr = _NR.get(platform.machine())
    if nr is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.syscall
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_long
    return f, nr


_SYS = _syscalls()


class RingError(OSError):
    """io_uring could not be set up or used (the caller falls back to preadv)."""


class Ring:
    """One io_uring (``entries`` submission slots). Not thread-safe: one per reader thread."""

    def __init__(self, entries: int = 1024):
        if _SYS is None:
            raise RingError(errno.ENOSYS, "io_uring is not reachable here")
        call, (self._nr_setup, self._nr_enter) = _SYS
        self._call = call
        p = _Params()
        fd = call(ctypes.c_long(self._nr_setup), ctypes.c_long(entries), ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno()
            raise RingError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        self._maps: list[mmap.mmap] = []
        try:
            sq_size = p.sq_array + p.sq_entries * 4
            cq_size = p.cq_cqes + p.cq_entries * _CQE.itemsize
            prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            if p.features & _FEAT_SINGLE_MMAP:
                sq = cq = mmap.mmap(fd, max(sq_size, cq_size), flags=flags, prot=prot, offset=_OFF_SQ_RING)
                self._maps.append(sq)
            else:
                sq = mmap.mmap(fd, sq_size, flags=flags, prot=prot, offset=_OFF_SQ_RING)
                cq = mmap.mmap(fd, cq_size, flags=flags, prot=prot, offset=_OFF_CQ_RING)
                self._maps += [sq, cq]
            sqes = mmap.mmap(fd, p.sq_entries * _SQE.itemsize, flags=flags, prot=prot, offset=_OFF_SQES)
            self._maps.append(sqes)
        except (OSError, ValueError) as e:
            self.close()
            raise RingError(errno.EIO, f"io_uring mmap: {e}") from None

        def u32(m: mmap.mmap, off: int, n: int = 1) -> np.ndarray:
            return np.frombuffer(m, dtype="<u4", count=n, offset=off)

        self._sq_head, self._sq_tail = u32(sq, p.sq_head), u32(sq, p.sq_tail)
        self._sq_mask = int(u32(sq, p.sq_ring_mask)[0])
        self._sq_array = u32(sq, p.sq_array, p.sq_entries)
        # ring slot i always holds SQE i: the index array is the identity, written once here
        self._sq_array[:] = np.arange(p.sq_entries, dtype=np.uint32)
        self._cq_head, self._cq_tail = u32(cq, p.cq_head), u32(cq, p.cq_tail)
        self._cq_mask = int(u32(cq, p.cq_ring_mask)[0])
        self._cqes = np.frombuffer(cq, dtype=_CQE, count=p.cq_entries, offset=p.cq_cqes)
        # the SQEs as rows of 8 little-endian u64 words (the _SQE layout, see ``readv``): a batch is
        # written with at most two contiguous slice copies, no per-field fancy indexing (that Python ran
        # under the GIL, ~100 us a part, serialised over the readers)
        self._sq64 = np.frombuffer(sqes, dtype="<u8", count=p.sq_entries * 8).reshape(p.sq_entries, 8)
        self.entries = int(p.sq_entries)
        self.cq_entries = int(p.cq_entries)
        self.submits = 0  # io_uring_enter calls

    def close(self) -> None:
        for name in ("_native", "_sq_head", "_sq_tail", "_sq_array", "_cq_head", "_cq_tail", "_cqes", "_sq64"):
            self.__dict__.pop(name, None)  # numpy views pin the mmaps: drop them first
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with the process
                pass
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _enter(self, to_submit: int, min_complete: int) -> int:
        while True:
            n = self._call(ctypes.c_long(self._nr_enter), ctypes.c_long(self.fd), ctypes.c_long(to_submit),
                           ctypes.c_long(min_complete), ctypes.c_long(_ENTER_GETEVENTS), None, ctypes.c_long(0))
            self.submits += 1
            if n >= 0:
                return n
            e = ctypes.get_errno()
            if e not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                raise RingError(e, f"io_uring_enter: {os.strerror(e)}")
            if e != errno.EINTR:
                to_submit = 0  # the kernel took none: reap first, then resubmit below

    def readv(self, fd: int, addr: np.ndarray, niov: np.ndarray, off: np.ndarray) -> np.ndarray:
        """``len(addr)`` READV requests (iovec array address, iovec count, file offset) on ``fd``, all
        completed before return, in batches of at most the ring's size. Returns each request's result
        (bytes read, or -errno), in request order."""
        k = len(addr)
        rows = np.zeros((k, 8), dtype="<u8")
        rows[:, 0] = np.uint64(_OP_READV) | (np.uint64(fd & 0xFFFFFFFF) << np.uint64(32))
        rows[:, 1] = off
        rows[:, 2] = addr
        rows[:, 3] = niov  # len (u32) | rw_flags 0
        rows[:, 4] = np.arange(k, dtype=np.uint64)  # user_data: the request's index
        return self.submit(rows)

    def submit(self, rows: np.ndarray) -> np.ndarray:
        """Submit SQEs given as ``[k, 8]`` u64 rows (``_SQE`` layout; user_data = the row's index) and wait
        for all of them; returns each one's result in row order."""
        k = len(rows)
        res = np.empty(k, dtype=np.int64)
        done = 0
        batch = min(self.entries, self.cq_entries)
        sq_n, cq_n = self.entries, self.cq_entries
        while done < k:
            n = min(batch, k - done)
            tail = int(self._sq_tail[0])
            a = tail & self._sq_mask
            first = min(n, sq_n - a)
            self._sq64[a:a + first] = rows[done:done + first]
            if first < n:
                self._sq64[:n - first] = rows[done + first:done + n]
            self._sq_tail[0] = (tail + n) & 0xFFFFFFFF  # x86-64 / the syscall below order this store
            submitted, got = 0, 0
            while got < n:
                m = self._enter(n - submitted, n - got)
                submitted = min(n, submitted + m) if submitted < n else submitted
                head, ctail = int(self._cq_head[0]), int(self._cq_tail[0])
                ready = (ctail - head) & 0xFFFFFFFF
                if ready:
                    h = head & self._cq_mask
                    c1 = min(ready, cq_n - h)
                    for c in (self._cqes[h:h + c1], self._cqes[:ready - c1]):
                        if len(c):
                            res[c["user_data"].astype(np.int64)] = c["res"]
                    self._cq_head[0] = (head + ready) & 0xFFFFFFFF
                    got += ready
            done += n
        return res


_PROBE: list[bool] = []
_PROBE_LOCK = threading.Lock()


def available() -> bool:
    """Whether this process can create an io_uring (probed once: a ring of 8 entries, closed)."""
    with _PROBE_LOCK:
        if not _PROBE:
            try:
                Ring(8).close()
                _PROBE.append(True)
            except RingError as e:
                log.info("io_uring not available (%s); reads use preadv", e)
                _PROBE.append(False)
        return _PROBE[0]


class RingPool:
    """One ring per reader thread, made at its first use and closed together (engine close)."""

    def __init__(self, entries: int = 1024):
        self.entries = entries
        self._local = threading.local()
        self._all: list[Ring] = []
        self._lock = threading.Lock()

    def ring(self) -> Ring | None:
        r = getattr(self._local, "ring", None)
        if r is None:
            try:
                r = Ring(self.entries)
            except RingError as e:
                log.warning("io_uring setup failed on a reader thread (%s): this thread reads with preadv", e)
                r = False
            self._local.ring = r
            if r:
                with self._lock:
                    self._all.append(r)
        return r or None

    def discard(self, ring: Ring) -> None:
        """Close this thread's ``ring`` after a failure (it may hold reads in flight); the thread's next
        ``ring()`` makes a new one."""
        if getattr(self._local, "ring", None) is ring:
            self._local.ring = None
        with self._lock:
            if ring in self._all:
                self._all.remove(ring)
        ring.close()

    def close(self) -> None:
        with self._lock:
            rings, self._all = self._all, []
        for r in rings:
            r.close()

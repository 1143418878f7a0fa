"""The readers' per-part loop in C (``native.c``), compiled once per machine with the system C compiler.

Why: with 16 reader threads, the Python a part's reads need around their one system call (rebasing the
iovec table onto the load's buffers, writing the SQEs, reaping the completions: ~60-150 us a part) holds
the GIL, so the readers and the loader thread queue for it (docs/PERF_NOTES.md rows 23-33: the reads
alone stayed 1.2-1.4x the floor's pattern with that Python halved). Here a part's direct reads are one
ctypes call, which drops the GIL for its whole duration.

How it is built: like Triton's launcher stubs, at first use: ``cc -O2 -shared -fPIC native.c`` into the
cache folder (``$TP_LORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tp_lora``, else ``~/.cache/tp_lora``; a
temporary folder where none is writable), named by the source's digest and the machine, written
atomically (ranks of one node may build it at once). Where there is no compiler, the build fails or
``TP_LORA_NATIVE=0`` is set, ``load()`` returns None and the readers keep their Python loop, which reads
the same bytes into the same places (tested both ways).

The C code allocates nothing and keeps no state: the tables and buffers are the caller's, and their
bounds are checked in Python (``_IovTable.check``) before every call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
ABI = 3  # native.c's TPL_ABI
_ENV = "TP_LORA_NATIVE"


class _Ring(ctypes.Structure):
    """native.c's ``struct tpl_ring``: the addresses of one io_uring's mapped queues."""

    _fields_ = [("sq_tail", ctypes.c_void_p), ("sqes", ctypes.c_void_p), ("cq_head", ctypes.c_void_p),
                ("cq_tail", ctypes.c_void_p), ("cqes", ctypes.c_void_p), ("sq_mask", ctypes.c_uint32),
                ("sq_entries", ctypes.c_uint32), ("cq_mask", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("ring_fd", ctypes.c_int32), ("reserved", ctypes.c_uint32), ("submits", ctypes.c_uint64)]


class _Table(ctypes.Structure):
    """native.c's ``struct tpl_table``: a part's prebuilt reads (arrays owned by the ``_IovTable``)."""

    _fields_ = [("rel", ctypes.c_void_p), ("scr", ctypes.c_void_p), ("pieces", ctypes.c_int64),
                ("first", ctypes.c_void_p), ("niov", ctypes.c_void_p), ("off", ctypes.c_void_p),
                ("want", ctypes.c_void_p), ("k", ctypes.c_int64)]


class _Part(ctypes.Structure):
    """native.c's ``struct tpl_part``: one part of a batch (its table's address, its chunk buffer's)."""

    _fields_ = [("t", ctypes.c_void_p), ("buf", ctypes.c_uint64)]


class _Batch(ctypes.Structure):
    """native.c's ``struct tpl_batch``: one cold load's parts, read by every reader thread at once."""

    _fields_ = [("parts", ctypes.c_void_p), ("n", ctypes.c_int64), ("order", ctypes.c_void_p),
                ("scratch", ctypes.c_uint64),
                ("status", ctypes.c_void_p), ("t_start", ctypes.c_void_p), ("t_end", ctypes.c_void_p),
                ("worker", ctypes.c_void_p), ("claim", ctypes.c_uint64), ("ring_reads", ctypes.c_int64),
                ("avail", ctypes.c_int32), ("done", ctypes.c_int32), ("cancel", ctypes.c_int32),
                ("waiters", ctypes.c_int32), ("avail_waiters", ctypes.c_int32), ("short_every", ctypes.c_int32),
                ("fd", ctypes.c_int32), ("active", ctypes.c_int32), ("active_waiters", ctypes.c_int32),
                ("ring_failed", ctypes.c_int32)]


class _Pool(ctypes.Structure):
    """native.c's ``struct tpl_pool``: the reader threads kept in C between loads."""

    _fields_ = [("batch", ctypes.c_void_p), ("iov", ctypes.c_void_p), ("res", ctypes.c_void_p),
                ("seq", ctypes.c_int32), ("stop", ctypes.c_int32), ("waiters", ctypes.c_int32),
                ("reserved", ctypes.c_int32)]


PENDING = np.iinfo(np.int64).min  # native.c's TPL_PENDING: a part not read yet
#: the status of parts another thread copied to the device itself (``Batch.claim_back``, ``complete``): no
#: host bytes were read for them
ON_DEVICE = np.iinfo(np.int64).max


def _claim(start: int, limit: int) -> int:
    """native.c's claim word: readers take positions [start, limit)."""
    return (limit << 32) | start


class Batch:
    """One cold load's parts for ``tpl_read_batch`` (see native.c): every reader thread calls ``run``
    once and reads parts in order until none is left; the loader ``publish``es parts as their buffers
    are set, ``wait``s for completions and reads ``status`` [n] (``PENDING``, 0 ok, > 0 short, < 0 the
    ring failed: read the part again). ``t_start`` / ``t_end`` [n]: CLOCK_MONOTONIC ns (the clock of
    ``time.perf_counter`` on Linux), ``worker`` [n]: which ``run`` call read it. The tables and buffers
    the parts point to must outlive the batch (the caller checks their bounds before ``set``)."""

    def __init__(self, lib: "NativeReads", n: int, scratch: int, fd: int, short_every: int = 0,
                 order: list[int] | None = None):
        self._lib = lib
        self.n = n
        self._parts = (_Part * max(n, 1))()
        self._parts_u64 = np.frombuffer(self._parts, dtype=np.uint64).reshape(-1, 2)  # (table, buf) per part
        self.status = np.full(n, PENDING, dtype=np.int64)
        self.t_start = np.zeros(n, dtype=np.int64)
        self.t_end = np.zeros(n, dtype=np.int64)
        self.worker = np.full(n, -1, dtype=np.int32)
        self.order = None
        if order is not None:
            self.order = np.asarray(order, dtype=np.int64)
            assert sorted(self.order.tolist()) == list(range(n)), "order must be a permutation of the parts"
        self._c = _Batch(ctypes.addressof(self._parts), n, 0 if self.order is None else self.order.ctypes.data,
                         scratch, self.status.ctypes.data, self.t_start.ctypes.data, self.t_end.ctypes.data,
                         self.worker.ctypes.data, _claim(0, n), 0, 0, 0, 0, 0, 0, short_every, fd, 0, 0, 0)
        self.addr = ctypes.addressof(self._c)
        self._set = 0

    def reset(self, scratch: int, fd: int, short_every: int = 0, order: list[int] | None = None,
              start: int = 0) -> "Batch":
        """The same parts' batch for another load (a plan's batch is kept: building one costs ~0.1 ms of
        Python at the start of a load), readers taking positions from ``start`` (the parts before it are
        not read: a refill of the last ones). Only when no pool thread is in it."""
        assert self._c.active == 0, "a batch still being read cannot be reset"
        self.status.fill(PENDING)
        self.worker.fill(-1)
        c = self._c
        c.scratch, c.fd, c.short_every = scratch, fd, short_every
        c.claim = _claim(start, self.n)
        c.ring_reads = 0
        c.avail = c.done = c.cancel = c.ring_failed = 0
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        c.order = 0 if self.order is None else self.order.ctypes.data
        self._set = 0
        return self

    def set(self, i: int, table_addr: int, buf: int) -> None:
        """Part ``i``'s table and chunk buffer (before it is published)."""
        assert i >= self._set, "a published part cannot change"
        self._parts[i].t = table_addr
        self._parts[i].buf = buf

    def set_many(self, idx: np.ndarray, table_addrs: np.ndarray, buf: int) -> None:
        """Parts ``idx``'s tables and their one chunk buffer, in two array writes (``set`` per part costs
        microseconds each, at the start of a cold load, before its first read)."""
        if len(idx):
            assert int(idx.min()) >= self._set, "a published part cannot change"
            self._parts_u64[idx, 0] = table_addrs
            self._parts_u64[idx, 1] = buf

    def publish(self, avail: int) -> None:
        """Parts [0, avail) may be read now."""
        self._lib._publish(self.addr, avail)
        self._set = avail

    def claim_back(self, lo: int) -> int:
        """Take positions [lo, limit) from the back of the batch (no reader will read them) if no reader
        has taken ``lo`` yet: the old limit, or -1. The caller gives them a status (``complete``)."""
        return self._lib._claim_back(self.addr, lo)

    def complete(self, lo: int, hi: int, status: int, wid: int = -2) -> None:
        """Positions [lo, hi), claimed by ``claim_back``, get ``status`` (``ON_DEVICE``, or 1: the loader
        reads them itself); the loader is woken."""
        self._lib._complete(self.addr, lo, hi, status, wid)

    def run(self, ring_addr: int | None, fd: int, iov: int, res: int, wid: int) -> int:
        """A reader thread's share (returns when no part is left): 0, or -errno when the ring failed."""
        return self._lib._read_batch(self.addr, ring_addr, fd, iov, res, wid)

    def wait(self, seen: int, timeout_s: float) -> int:
        """Block (without the GIL) until more than ``seen`` parts have a status, or the timeout: the count."""
        return self._lib._wait(self.addr, seen, int(timeout_s * 1e9))

    def cancel(self) -> None:
        self._lib._cancel(self.addr)

    @property
    def ring_reads(self) -> int:
        return self._c.ring_reads

    @property
    def ring_failed(self) -> int:
        return self._c.ring_failed

    @property
    def active(self) -> int:
        """Pool threads not yet done with this batch (``ReaderPool.post``)."""
        return self._c.active


class _Cuda(ctypes.Structure):
    """native.c's ``struct tpl_cuda``: the CUDA runtime's entry points the mapper's chunk calls."""

    _fields_ = [("host_register", ctypes.c_void_p), ("memcpy_async", ctypes.c_void_p),
                ("stream_wait_event", ctypes.c_void_p), ("event_record", ctypes.c_void_p)]


def cuda_runtime() -> "_Cuda | None":
    """The entry points of the CUDA runtime this process loaded (torch's ``libcudart``, found in
    ``/proc/self/maps``), or None where there is none to find (a static runtime, not Linux): the mapper
    then issues its chunk from Python."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libcudart.so" in ln}
    except OSError:
        return None
    for p in sorted(paths):
        try:
            lib = ctypes.CDLL(p)
            fns = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in
                   ("cudaHostRegister", "cudaMemcpyAsync", "cudaStreamWaitEvent", "cudaEventRecord")]
        except (OSError, AttributeError):
            continue
        view = _Cuda(*fns)
        view._lib = lib  # keep the library loaded as long as its entry points are used
        return view
    return None


class ReaderPool:
    """Reader threads kept inside C between loads (native.c ``tpl_serve``): each sleeps on a futex until
    the loader ``post``s a batch, reads its share of the parts, and sleeps again; so a load starts every
    reader by one wake-up, none of them touching the GIL. Each thread's io_uring is made in that thread
    (``rings``, before it enters C); its iovec and result buffers are grown by the loader while the pool
    is idle (``post`` sizes them for the batch)."""

    def __init__(self, lib: "NativeReads", threads: int, rings=None, name: str = "tp_lora-batch"):
        self._lib = lib
        self.threads = threads
        self._iov_ptrs = (ctypes.c_uint64 * threads)()
        self._res_ptrs = (ctypes.c_uint64 * threads)()
        self._iov: list[np.ndarray | None] = [None] * threads
        self._res: list[np.ndarray | None] = [None] * threads
        self._c = _Pool(0, ctypes.addressof(self._iov_ptrs), ctypes.addressof(self._res_ptrs), 0, 0, 0, 0)
        self.addr = ctypes.addressof(self._c)
        self.ring_failures = 0  # threads whose ring failed (they read with preadv since)
        self._pid = os.getpid()  # a forked child has none of these threads
        self._grow(1024, 1024)
        self._busy: Batch | None = None
        ready = threading.Barrier(threads + 1)
        self._threads = [threading.Thread(target=self._serve, args=(w, rings, ready), daemon=True,
                                          name=f"{name}_{w}") for w in range(threads)]
        for t in self._threads:
            t.start()
        try:
            ready.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass

    def _serve(self, wid: int, rings, ready: threading.Barrier) -> None:
        ring = rings.ring() if rings is not None else None
        raddr = None if ring is None else NativeReads.ring_addr(ring)
        try:
            ready.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        if self._lib._serve(self.addr, raddr, wid):
            self.ring_failures += 1
            log.warning("io_uring_enter failed on batch reader thread %d: it reads with preadv since", wid)

    def _grow(self, pieces: int, k: int) -> None:
        for w in range(self.threads):
            iov, res = self._iov[w], self._res[w]
            if iov is None or len(iov) < pieces:
                self._iov[w] = iov = np.empty((max(pieces, 1024), 2), dtype=np.uint64)
                self._iov_ptrs[w] = iov.ctypes.data
            if res is None or len(res) < k:
                self._res[w] = res = np.empty(max(k, 1024), dtype=np.int64)
                self._res_ptrs[w] = res.ctypes.data

    def usable(self) -> bool:
        """Every thread is alive in this process (not a forked child, not closed)."""
        return os.getpid() == self._pid and not self._c.stop and all(t.is_alive() for t in self._threads)

    def post(self, batch: Batch, pieces: int, k: int) -> None:
        """Start ``batch`` on every thread; ``pieces`` / ``k``: its largest part's iovecs and reads. One
        batch at a time: ``wait_idle`` before the next."""
        assert self._busy is None, "the previous batch is still being read"
        self._grow(pieces, k)
        batch._c.active = self.threads
        self._busy = batch
        self._lib._post(self.addr, batch.addr)

    def wait_idle(self, timeout_s: float = 30.0) -> int:
        """Block (without the GIL) until every thread is done with the batch posted: 0, else the threads
        still in it (after ``timeout_s``; the batch must then be kept alive: it stays posted)."""
        b = self._busy
        if b is None:
            return 0
        left = self._lib._wait_idle(b.addr, int(timeout_s * 1e9))
        if left == 0:
            self._busy = None
        return left

    def close(self) -> None:
        """Stop every thread (each first finishes the batch it is in) and join them."""
        if self._busy is not None:
            self._busy.cancel()
            self.wait_idle(10.0)
        self._lib._stop(self.addr)
        for t in self._threads:
            t.join(timeout=10)


_P, _I32, _I64, _U64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64
_SIGNATURES = (  # native.c's entry points: (name without "tpl_", argument types, result type)
    ("read_part", [_P, _I32, _P, _U64, _U64, _P, _P], _I64),
    ("read_batch", [_P, _P, _I32, _P, _P, _I32], _I64),
    ("wait", [_P, _I32, _I64], _I32),
    ("claim_back", [_P, _I64], _I64),
    ("complete", [_P, _I64, _I64, _I64, _I32], None),
    ("map_chunk", [_P, _P, _I32, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _U64, _P, _P, _P, _I64, _P, _P],
     _I64),
    ("publish", [_P, _I32], None),
    ("cancel", [_P], None),
    ("serve", [_P, _P, _I32], _I64),
    ("post", [_P, _P], None),
    ("wait_idle", [_P, _I64], _I32),
    ("stop", [_P], None),
)


class NativeReads:
    """The bound C library (one per process, see ``load``)."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        # plain ints for every pointer: ctypes converts them without building objects per call
        for name, args, res in _SIGNATURES:
            f = getattr(lib, "tpl_" + name)
            f.argtypes, f.restype = args, res
            setattr(self, "_" + name, f)
        self._local = threading.local()

    def batch(self, n: int, scratch: int, fd: int, short_every: int = 0, order: list[int] | None = None) -> Batch:
        """A batch of ``n`` parts of the file ``fd`` (see ``Batch``); ``scratch``: the gap pieces' junk
        buffer's address; ``order``: the order parts are taken in (tests)."""
        return Batch(self, n, scratch, fd, short_every, order)

    def map_chunk(self, batch: Batch, cuda: "_Cuda", fd: int, lo: int, hi: int, span_off: int, map_len: int,
                  reg_len: int, dst: np.ndarray, src: np.ndarray, nbytes: np.ndarray, buf: int, stream: int,
                  wait_ev: int, done_ev: int, vec: np.ndarray) -> tuple[int, int]:
        """native.c ``tpl_map_chunk``: (result, mapping address); see there. ``dst`` / ``src`` / ``nbytes``
        int64 [k]; ``vec`` uint8, at least one byte per page of ``reg_len``."""
        for a in (dst, src, nbytes):
            assert a.dtype == np.int64 and a.flags.c_contiguous and len(a) == len(dst)
        assert vec.dtype == np.uint8 and len(vec) >= -(-reg_len // 4096) and reg_len >= map_len > 0
        addr = ctypes.c_uint64(0)
        rc = self._map_chunk(batch.addr, ctypes.addressof(cuda), fd, lo, hi, span_off, map_len, reg_len,
                             dst.ctypes.data, src.ctypes.data, nbytes.ctypes.data, len(dst), buf, stream or None,
                             wait_ev or None, done_ev, int(ON_DEVICE), vec.ctypes.data, ctypes.byref(addr))
        return int(rc), int(addr.value)

    def pool(self, threads: int, rings=None) -> ReaderPool:
        """``threads`` reader threads kept in C (see ``ReaderPool``)."""
        return ReaderPool(self, threads, rings)

    @staticmethod
    def table(rel: np.ndarray, scratch: np.ndarray, first: np.ndarray, niov: np.ndarray, off: np.ndarray,
              want: np.ndarray) -> _Table:
        """The C view of a part's table; the arrays must outlive it (the ``_IovTable`` holds both)."""
        for a, dt in ((rel, np.uint64), (scratch, np.uint8), (first, np.uint64), (niov, np.uint32),
                      (off, np.uint64), (want, np.int64)):
            assert a.dtype == dt and a.flags.c_contiguous, (a.dtype, dt)
        assert rel.shape == (len(scratch), 2) and len(first) == len(niov) == len(off) == len(want)
        return _Table(rel.ctypes.data, scratch.ctypes.data, len(scratch), first.ctypes.data, niov.ctypes.data,
                      off.ctypes.data, want.ctypes.data, len(first))

    @staticmethod
    def ring_addr(ring) -> int:
        """The address of the C view of a ``uring.Ring``, made at the first call and kept by the ring (so
        it lives exactly as long as the mappings it points into)."""
        view = ring.__dict__.get("_native")
        if view is None:
            view = ring._native = _Ring(ring._sq_tail.ctypes.data, ring._sq64.ctypes.data,
                                        ring._cq_head.ctypes.data, ring._cq_tail.ctypes.data,
                                        ring._cqes.ctypes.data, ring._sq_mask, ring.entries, ring._cq_mask,
                                        ring.cq_entries, ring.fd, 0, 0)
        return ctypes.addressof(view)

    def buffers(self, pieces: int, k: int) -> tuple[np.ndarray, int, np.ndarray]:
        """This thread's iovec ``[pieces, 2]`` buffer, its address, and result ``[k]`` buffer (grown, never
        shrunk): a part's iovecs live until its last read and the gathers after it."""
        loc = self._local
        iov = getattr(loc, "iov", None)
        if iov is None or len(iov) < pieces:
            loc.iov = iov = np.empty((max(pieces, 1024), 2), dtype=np.uint64)
            loc.iov_ptr = iov.ctypes.data
        res = getattr(loc, "res", None)
        if res is None or len(res) < k:
            loc.res = res = np.empty(max(k, 1024), dtype=np.int64)
        return iov, loc.iov_ptr, res

    def read_part(self, ring_addr: int | None, fd: int, table_addr: int, buf: int, scratch: int, iov: int,
                  res: int) -> int:
        """Rebase the table at ``table_addr`` onto the buffers, then its direct reads (through the ring, or
        one preadv each when ``ring_addr`` is None). Returns the count of reads short of their bytes, or
        -errno if io_uring_enter failed (that ring must be dropped)."""
        return self._read_part(ring_addr, fd, table_addr, buf, scratch, iov, res)


def _cache_dir() -> Path:
    env = os.environ.get("TP_LORA_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "tp_lora" if xdg else Path.home() / ".cache" / "tp_lora"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def build(dest_dir: Path | None = None) -> Path:
    """Compile ``native.c`` (if its library for this source and machine is not built yet) and return the
    library's path. Raises OSError (no compiler, a failed build, no writable folder)."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + platform.machine().encode()).hexdigest()[:16]
    name = f"tp_lora_native-{tag}-{platform.machine()}.so"
    dirs = [dest_dir] if dest_dir is not None else [_cache_dir(), Path(tempfile.gettempdir()) / "tp_lora"]
    for d in dirs:
        if (d / name).exists():
            return d / name
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (cc, gcc or clang; or $CC)")
    err = None
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", dir=d)
            os.close(fd)
        except OSError as e:
            err = e
            continue
        try:
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                raise OSError(f"{cc} failed ({r.returncode}): {r.stderr.strip()[:500]}")
            os.replace(tmp, d / name)  # atomic: ranks of a node may build at once
            return d / name
        except subprocess.TimeoutExpired:
            raise OSError(f"{cc} took over 120 s") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"no writable folder for the native reader's library ({err})")


_LOADED: list[NativeReads | None] = []
_LOCK = threading.Lock()


def load() -> NativeReads | None:
    """The native read loop, built and loaded once per process; None where it cannot be (not Linux,
    ``TP_LORA_NATIVE=0``, no compiler, a failed build: logged once) - the readers' Python loop then runs."""
    with _LOCK:
        if not _LOADED:
            _LOADED.append(_load())
        return _LOADED[0]


def _load() -> NativeReads | None:
    if os.environ.get(_ENV, "1") == "0":
        log.info("native reader off (%s=0): reads use the Python loop", _ENV)
        return None
    if not sys.platform.startswith("linux"):
        return None
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
        if lib.tpl_abi() != ABI:
            raise OSError(f"{path} has ABI {lib.tpl_abi()}, expected {ABI}")
        return NativeReads(lib, path)
    except OSError as e:
        log.info("native reader not available (%s): reads use the Python loop", e)
        return None

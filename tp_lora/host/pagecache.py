"""Copies to the device straight from the page cache: a file's cached pages pinned in place.

Why: a cold load reads every byte from the page cache into pinned memory (one CPU copy per byte, ~35-40
GB/s with 16 threads on the H200 host), then DMAs it. Registering a read-only shared mapping of the file
with ``cudaHostRegister(..., cudaHostRegisterReadOnly)`` pins the page cache's own pages, and the copy
engine reads them with no CPU copy at all. One thread registers 64 MiB ranges at ~45 GB/s
(docs/PERF_NOTES.md rows 52-53), so a load whose readers take parts from the front while this takes whole
chunks from the back moves the file at up to the H2D's rate: the two meet where their claims cross.

What this module holds (no CUDA streams, no engine state):
- ``copies_of``: a chunk's copies (staging offset, file offset, bytes) from its parts' read tables, the
  page-aligned file span they need, or None where the chunk does not suit (span gathers, too many
  pieces, a span far larger than its bytes);
- ``Span``: an mmap of that file range, its residency (``mincore``: a range not wholly in the page cache
  is left to the readers, which read a disk in parallel, where registering would fault it in serially),
  its registration and its release.

The CPU never reads the mapping (a file truncated under it would raise SIGBUS): the device reads its
pinned pages, and the CPU path (tests) reads the same ranges with ``preadv``.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
#: cudaHostRegisterReadOnly: the device only reads the pages (a read-only mapping can be registered)
REGISTER_READ_ONLY = 0x08
#: most copies per chunk worth one registration (each is a cudaMemcpyAsync issued from Python, ~5 us)
MAX_COPIES = 512
#: largest registered span per chunk byte (registering costs per page, owned or not)
MAX_SPAN_RATIO = 1.5

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int


@dataclass(frozen=True)
class ChunkCopies:
    """A chunk's bytes as copies out of the file: ``dst`` [k] offsets in the chunk's (staging) buffer,
    ``src`` [k] file offsets, ``nbytes`` [k]; ``lo`` / ``hi`` the page-aligned file span they read
    (``hi`` may pass the end of the file: the mapping stops at its last page)."""

    dst: np.ndarray
    src: np.ndarray
    nbytes: np.ndarray
    lo: int
    hi: int

    @property
    def total(self) -> int:
        return int(self.nbytes.sum())


def copies_of(chunk_nbytes: int, tables: list, max_copies: int = MAX_COPIES,
              max_span_ratio: float = MAX_SPAN_RATIO) -> ChunkCopies | None:
    """The copies that fill a chunk of ``chunk_nbytes`` from the file, given its parts' read tables
    (``host/reader.py`` ``_IovTable``: each read is a file offset and iovecs into the chunk buffer or
    the scratch). Gap pieces (into the scratch) are skipped; runs contiguous in both the file and the
    buffer are joined. None: a table has reads with gathers out of the scratch, the copies do not cover
    the chunk's bytes exactly once, there are more than ``max_copies``, or the span exceeds
    ``max_span_ratio`` x the chunk's bytes."""
    dst: list[int] = []
    src: list[int] = []
    n: list[int] = []
    for t in tables:
        if t.rest:
            return None
        for first, rows, file_off, _ in t.reads:
            pos = file_off
            for r in range(first, first + rows):
                off, ln = int(t.rel[r, 0]), int(t.rel[r, 1])
                if not t.scratch[r] and ln:
                    if n and src[-1] + n[-1] == pos and dst[-1] + n[-1] == off:
                        n[-1] += ln
                    else:
                        dst.append(off)
                        src.append(pos)
                        n.append(ln)
                        if len(n) > max_copies:
                            return None
                pos += ln
    if not n:
        return None
    d = np.array(dst, dtype=np.int64)
    order = np.argsort(d, kind="stable")
    d, s, k = d[order], np.array(src, dtype=np.int64)[order], np.array(n, dtype=np.int64)[order]
    # every byte of the chunk once: the packed layout is dense, so the copies must tile [0, nbytes)
    if int(d[0]) != 0 or int(k.sum()) != chunk_nbytes or np.any(d[1:] != d[:-1] + k[:-1]):
        return None
    lo = int(s.min()) // PAGE * PAGE
    hi = -(-int((s + k).max()) // PAGE) * PAGE
    if hi - lo > max_span_ratio * chunk_nbytes + 2 * PAGE:
        return None
    return ChunkCopies(d, s, k, lo, hi)


class Span:
    """An mmap (read-only, shared) of bytes [lo, hi) of the file ``fd``; ``resident`` says whether all
    its pages are in the page cache; ``register`` pins them for the device (CUDA); ``close`` undoes
    both. ``tensor``: the mapping as a uint8 tensor, for the device's copies only."""

    def __init__(self, fd: int, lo: int, hi: int, file_size: int):
        assert lo % PAGE == 0 and hi > lo, (lo, hi)
        self.lo = lo
        self.length = min(hi, file_size) - lo  # the mapping's last page is whole (beyond EOF: zeros)
        self.pages_bytes = -(-self.length // PAGE) * PAGE
        self._mm = mmap.mmap(fd, self.length, mmap.MAP_SHARED, mmap.PROT_READ, offset=lo)
        self._arr = np.frombuffer(self._mm, dtype=np.uint8)
        self.ptr = self._arr.ctypes.data
        self.registered = False
        self._tensor: torch.Tensor | None = None

    def resident(self) -> bool:
        """Every page of the span is in the page cache now (``mincore``; a page may still be evicted
        later: registering then reads it back from the disk, slower but correct)."""
        vec = np.zeros(self.pages_bytes // PAGE, dtype=np.uint8)
        if _libc.mincore(self.ptr, self.length, vec.ctypes.data) != 0:
            return False
        return bool((vec & 1).all())

    def register(self) -> None:
        """Pin the span's pages for the device (``cudaHostRegister``, read-only). Raises OSError with the
        CUDA error code when the driver refuses (no read-only registration, a file system whose pages
        cannot be pinned, a range past the file's end after a truncation)."""
        rc = int(torch.cuda.cudart().cudaHostRegister(self.ptr, self.pages_bytes, REGISTER_READ_ONLY))
        if rc != 0:
            raise OSError(f"cudaHostRegister of {self.length} bytes of a file mapping failed with CUDA error {rc}")
        self.registered = True

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only: only the device reads it
                self._tensor = torch.from_numpy(self._arr)
        return self._tensor

    def close(self) -> None:
        """Unpin (once every copy that reads the span is done: the caller's job) and unmap."""
        if self.registered:
            _unregister(self.ptr)
            self.registered = False
        self._tensor = None
        self._arr = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
            pass


def _unregister(ptr: int) -> None:
    rc = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if rc != 0:
        log.warning("cudaHostUnregister of a file mapping failed with CUDA error %d", rc)


class MappedRange:
    """A mapping made and pinned by native.c's ``tpl_map_chunk``: ``close`` unpins and unmaps it (once
    every copy reading it is done: the caller's job)."""

    def __init__(self, addr: int, length: int, registered: bool = True):
        self.addr, self.length, self.registered = addr, length, registered

    def close(self) -> None:
        if self.addr:
            if self.registered:
                _unregister(self.addr)
            _libc.munmap(self.addr, self.length)
            self.addr = 0


def read_into(fd: int, cc: ChunkCopies, buf: torch.Tensor) -> None:
    """The CPU path of the same copies: each range read with ``preadv`` into ``buf`` (a CPU uint8
    tensor). Raises OSError on a short read (a truncated file)."""
    mv = memoryview(buf.numpy()).cast("B")
    for d, s, n in zip(cc.dst.tolist(), cc.src.tolist(), cc.nbytes.tolist()):
        got = 0
        while got < n:
            r = os.preadv(fd, [mv[d + got:d + n]], s + got)
            if r <= 0:
                raise OSError(f"short read at file offset {s + got}: {got} of {n} bytes")
            got += r

"""Host memory of the load path: the device handle, registered (pinned) buffers, and the arena.

The arena is the only owner of pinned host memory for adapter bytes: the pinned cache's entries and the
ring of streamed loads draw their buffers from it, and give them back. Slabs are reserved ahead (at
construction, or growing in the background while adapters are registered) and reused across adapters,
so pinning (mapping, faulting and registering pages: ~0.15 s per GiB on the H100/H200 hosts) is paid once
per process, not per load. Without CUDA the same code hands out plain host memory.

Accounting: ``in_use`` is the sum of the requested sizes of live blocks (== the planned bytes of cached
adapters plus the ring), ``free`` the bytes of free ranges, ``reserved`` the slab bytes (the difference
to in_use + free is alignment padding).
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import logging
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TPLoRAError

log = logging.getLogger(__name__)

PIN_MODES = ("caching", "register")
_ALIGN = 512  # block alignment in a slab: H2D copies start on a 512-byte boundary


class Device:
    """Where the pool lives, and the copy machinery that goes with it."""

    def __init__(self, device: torch.device | str, pin_mode: str = "caching"):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if pin_mode not in PIN_MODES:
            raise ValueError(f"pin_mode must be 'caching' or 'register', got {pin_mode!r}")
        self.pin_mode = pin_mode
        if self.is_cuda:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.copy_stream = torch.cuda.Stream(device=self.device)
        else:
            self.copy_stream = None

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        """One host buffer of exactly ``nbytes`` (pinned on CUDA), outside any arena."""
        if not self.is_cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        if self.pin_mode == "register":
            return register_host(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def compute_event(self) -> Any:
        """An event on the caller's current stream (the compute stream), or None on CPU."""
        if not self.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy_event(self) -> Any:
        """An event recorded on the copy stream now, or None on CPU."""
        if not self.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.copy_stream)
        return ev

    def wait_on_compute(self, event: Any) -> None:
        """Make the compute stream wait for a copy-stream event: no host-side synchronisation."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def sync_event(event: Any) -> None:
        if event is not None:
            event.synchronize()

    def touch(self, buf: torch.Tensor) -> None:
        """Copy pinned ``buf`` to the device once, in 8 MiB pieces into one scratch buffer, on a stream
        of its own (priority 0, CUDA's lowest), and wait: the arena's background reservation calls it
        for each new slab. On the H200 host the first load of a fresh process spent 0.1-1.2 ms longer
        on the device than later loads of the same bytes from the same (reused) arena pages (an 8B
        rank: ~4 ms); with the pages read once ahead that gap was 0.04-0.40 ms against 0.25-0.30
        without, the first activation 5.47-5.56 ms against 5.51-5.75 (three processes each, run z of
        docs/BENCHMARKS.md): a small gain, paid in the background (~5 ms of PCIe per 256 MiB slab).
        Nothing on CPU."""
        if not self.is_cuda or buf.numel() == 0:
            return
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(device=self.device, priority=0)
            with torch.cuda.stream(stream):
                scratch = torch.empty(min(_TOUCH_PIECE, buf.numel()), dtype=torch.uint8, device=self.device)
                for off in range(0, buf.numel(), scratch.numel()):
                    n = min(scratch.numel(), buf.numel() - off)
                    scratch[:n].copy_(buf[off:off + n], non_blocking=True)
            stream.synchronize()
            del scratch


#: fault pages in with a parallel fill before registering (measured on an H100 host: pinning 3-4x
#: faster); TP_LORA_PREFAULT=0 turns it off
PREFAULT = os.environ.get("TP_LORA_PREFAULT", "1") == "1"
#: read every slab reserved in the background once with the copy engine (``Device.touch``), so that the
#: first load from its pages does not pay their first DMA; TP_LORA_DMA_TOUCH=0 turns it off
DMA_TOUCH = os.environ.get("TP_LORA_DMA_TOUCH", "1") == "1"
_TOUCH_PIECE = 8 << 20
#: how long ``HostArena.alloc`` waits for a slab reserved in the background before it pins one itself (a
#: reservation that is late, or stuck, never stalls a load longer than this)
PENDING_WAIT_S = 2.0


def register_host(nbytes: int) -> torch.Tensor:
    """Plain host memory registered with cudaHostRegister: pinned bytes == requested bytes exactly (the
    caching pinned allocator rounds requests up to powers of two). Unregistered when the tensor dies:
    callers keep this very tensor (views alone do not keep it registered)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    # anonymous mapping with transparent huge pages: registering 2 MiB pages is far cheaper than
    # registering 4 KiB ones (fewer pages to fault in, lock and map)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    t = torch.frombuffer(mm, dtype=torch.uint8)
    if PREFAULT:
        # fault the pages in with torch's parallel fill (many threads take page faults at once), so
        # that registering only has to lock pages that are already there
        t.fill_(0)
    rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(rc) != 0:
        raise TPLoRAError(f"cudaHostRegister of {nbytes} bytes failed with code {int(rc)}")
    weakref.finalize(t, _unregister, t.data_ptr(), mm)
    return t


def _unregister(ptr: int, mm: object) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


@dataclass
class ArenaStats:
    reserved_bytes: int = 0  # slab bytes (pinned on CUDA)
    in_use_bytes: int = 0  # requested bytes of live blocks
    free_bytes: int = 0  # bytes of free ranges (reserved-but-free)
    slabs: int = 0
    reserve_s: float = 0.0  # time spent creating (pinning) slabs, summed over the threads doing it
    reserve_bg_s: float = 0.0  # part of reserve_s done in the background (ahead of the loads)
    grow_in_load: int = 0  # slabs created because a load found no free range (not reserved ahead)
    peak_in_use_bytes: int = 0


class _Slab:
    __slots__ = ("buf", "base", "size", "free", "live")

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.base = buf.data_ptr()
        self.size = buf.numel()
        self.free: list[tuple[int, int]] = [(0, self.size)]  # sorted (offset, bytes)
        self.live = 0


class HostArena:
    """Registered pinned host memory, reserved in slabs and reused; ``alloc``/``free`` blocks in it.

    ``limit_bytes`` is what the arena keeps reserved at most (the cache budget plus the streamed ring):
    a request that fits in no free range grows it by a slab even beyond the limit (correctness first:
    fragmentation can strand free bytes), and slabs above the limit are released once empty.
    ``reserve(nbytes)`` grows the reservation toward ``nbytes`` in the background.
    """

    def __init__(self, device: Device, limit_bytes: int, *, slab_bytes: int = 256 << 20,
                 reserve_bytes: int = 0, workers: int = 4):
        if limit_bytes < 0 or slab_bytes < _ALIGN:
            raise ValueError(f"bad arena sizes: limit {limit_bytes}, slab {slab_bytes}")
        self.device = device
        self.limit = limit_bytes
        self.slab_bytes = slab_bytes
        self._slabs: list[_Slab] = []
        self._blocks: dict[int, tuple[_Slab, int, int, int]] = {}  # data_ptr -> (slab, off, span, nbytes)
        self._lock = threading.Lock()
        self._grown = threading.Condition(self._lock)
        self._pending = 0  # slab bytes being created in the background
        self._target = 0
        self._pool = cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="tp_lora-arena")
        self._futures: list[cf.Future] = []
        self.stats = ArenaStats()
        if reserve_bytes:
            self.reserve(reserve_bytes)

    # -- reservation -----------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> list[cf.Future]:
        """Grow the reservation toward ``min(nbytes, limit)`` in the background; returns the futures."""
        want = min(nbytes, self.limit)
        futs: list[cf.Future] = []
        with self._lock:
            self._target = max(self._target, want)
            have = sum(s.size for s in self._slabs) + self._pending
            while have < want:
                n = min(self.slab_bytes, _round_up(want - have, 2 << 20))
                self._pending += n
                have += n
                futs.append(self._pool.submit(self._grow_bg, n))
            self._futures = [f for f in self._futures if not f.done()] + futs
        return futs

    def fit_bytes(self, sizes: list[int]) -> int:
        """Slab bytes that blocks of ``sizes`` need (first fit, largest first): what to reserve so that
        they never grow the arena inside a load. Bytes alone undercount: 41 MB chunks (a Llama-3.1-70B
        r128 layer) fill a 256 MiB slab only to 248 MB, and the 12% left over made later loads pin
        fresh slabs (~40 ms each)."""
        free: list[int] = []
        total = 0
        for n in sorted((_round_up(x, _ALIGN) for x in sizes if x > 0), reverse=True):
            if n > self.slab_bytes:
                total += _round_up(n, 2 << 20)
                continue
            for i, f in enumerate(free):
                if f >= n:
                    free[i] -= n
                    break
            else:
                free.append(self.slab_bytes - n)
        if free:
            # ``reserve`` cuts its last slab to the remainder: the emptiest bin needs only its used bytes
            # (a small adapter reserves a small slab, not 256 MiB)
            last = max(free)
            tail = min(self.slab_bytes, _round_up(self.slab_bytes - last, 2 << 20))
            total += (len(free) - 1) * self.slab_bytes + tail
        return total

    def wait_reserved(self) -> None:
        """Block until background reservations are done (benchmarks: report reservation time apart)."""
        for f in list(self._futures):
            f.result()

    def _new_slab(self, n: int) -> _Slab:
        t0 = time.perf_counter()
        buf = self.device.alloc_host(n)
        dt = time.perf_counter() - t0
        slab = _Slab(buf)
        with self._lock:
            self.stats.reserve_s += dt
        return slab

    def _grow_bg(self, n: int) -> None:
        t0 = time.perf_counter()
        try:
            slab = self._new_slab(n)
            if DMA_TOUCH:
                self.device.touch(slab.buf)  # before the slab can serve a load (see Device.touch)
        except BaseException:
            with self._lock:
                self._pending -= n
                self._grown.notify_all()
            raise
        with self._lock:
            self._pending -= n
            self.stats.reserve_bg_s += time.perf_counter() - t0
            self._add(slab)
            self._grown.notify_all()

    def _add(self, slab: _Slab) -> None:
        self._slabs.append(slab)
        self.stats.slabs = len(self._slabs)
        self.stats.reserved_bytes += slab.size
        self.stats.free_bytes += slab.size

    # -- blocks ----------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> torch.Tensor:
        """A block of exactly ``nbytes`` (a view of a slab); give it back with ``free``. Where no free range
        fits and a slab is being reserved in the background, waits for it (at most ``PENDING_WAIT_S``),
        else pins a slab now."""
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        span = _round_up(nbytes, _ALIGN)
        deadline = time.monotonic() + PENDING_WAIT_S
        with self._lock:
            while True:
                got = self._take(span, nbytes)
                if got is not None:
                    return got
                left = deadline - time.monotonic()
                if self._pending == 0 or left <= 0:
                    break  # nothing on its way, or it is late (a stuck reservation): pin one here
                self._grown.wait(left)  # a background slab is on its way: use it rather than pin another
        slab = self._new_slab(self.slab_bytes if span <= self.slab_bytes else _round_up(span, 2 << 20))
        with self._lock:
            self.stats.grow_in_load += 1
            self._add(slab)
            got = self._take(span, nbytes)
            assert got is not None
            return got

    def _take(self, span: int, nbytes: int) -> torch.Tensor | None:
        best: tuple[int, _Slab, int] | None = None
        for slab in self._slabs:
            for i, (off, n) in enumerate(slab.free):
                if n >= span and (best is None or n < best[0]):
                    best = (n, slab, i)
        if best is None:
            return None
        n, slab, i = best
        off, _ = slab.free[i]
        if n == span:
            del slab.free[i]
        else:
            slab.free[i] = (off + span, n - span)
        slab.live += 1
        t = slab.buf[off:off + nbytes]
        self._blocks[t.data_ptr()] = (slab, off, span, nbytes)
        st = self.stats
        st.in_use_bytes += nbytes
        st.free_bytes -= span
        st.peak_in_use_bytes = max(st.peak_in_use_bytes, st.in_use_bytes)
        return t

    def free(self, t: torch.Tensor | None) -> None:
        """Give a block back (ranges coalesce); an empty slab above the limit is released."""
        if t is None or t.numel() == 0:
            return
        with self._lock:
            rec = self._blocks.pop(t.data_ptr(), None)
            if rec is None:
                raise ValueError("free() of a buffer this arena did not hand out (or freed twice)")
            slab, off, span, nbytes = rec
            self.stats.in_use_bytes -= nbytes
            self.stats.free_bytes += span
            slab.live -= 1
            fr = slab.free
            i = bisect.bisect_left(fr, (off, 0))
            fr.insert(i, (off, span))
            if i + 1 < len(fr) and fr[i][0] + fr[i][1] == fr[i + 1][0]:
                fr[i] = (fr[i][0], fr[i][1] + fr[i + 1][1])
                del fr[i + 1]
            if i > 0 and fr[i - 1][0] + fr[i - 1][1] == fr[i][0]:
                fr[i - 1] = (fr[i - 1][0], fr[i - 1][1] + fr[i][1])
                del fr[i]
            if slab.live == 0 and self.stats.reserved_bytes - slab.size >= max(self.limit, self._target):
                self._slabs.remove(slab)
                self.stats.slabs = len(self._slabs)
                self.stats.reserved_bytes -= slab.size
                self.stats.free_bytes -= slab.size

    def snapshot(self) -> ArenaStats:
        with self._lock:
            return ArenaStats(**vars(self.stats))

    def huge_page_bytes(self) -> int | None:
        """Bytes of the slabs backed by transparent huge pages now (``/proc/self/smaps``; None where it
        cannot be read). Diagnostics, not on any load's path (it reads the whole smaps file): registering
        and reading 4 KiB pages costs more than 2 MiB ones, and whether the kernel gave the arena huge pages
        depends on its THP mode and on how fragmented memory was when the slab was faulted in."""
        with self._lock:
            ranges = [(sl.base, sl.size) for sl in self._slabs]
        try:
            with open("/proc/self/smaps") as f:
                text = f.read()
        except OSError:
            return None
        return smaps_huge_bytes(text, ranges)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def smaps_huge_bytes(smaps: str, ranges: list[tuple[int, int]]) -> int:
    """``AnonHugePages`` of the mappings in ``smaps`` (``/proc/<pid>/smaps`` text) that overlap the address
    ranges ``[(start, nbytes)]``, each mapping's count scaled by the share of it inside the ranges (a slab
    mapped with ``MADV_HUGEPAGE`` merges only with mappings advised alike, such as other slabs)."""
    total, cur = 0.0, None
    for line in smaps.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and ":" not in head:
            try:
                lo, hi = (int(x, 16) for x in head.split("-"))
            except ValueError:
                cur = None
                continue
            inside = sum(max(0, min(hi, a + n) - max(lo, a)) for a, n in ranges)
            cur = inside / (hi - lo) if inside and hi > lo else None
        elif cur is not None and head == "AnonHugePages:":
            total += cur * int(line.split()[1]) * 1024
    return int(total)


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


class ScratchPool:
    """Pageable scratch buffers of the readers (gap bytes and span reads land there before the owned
    bytes are gathered out), kept across loads and faulted in ahead.

    A reader thread takes one per part and gives it back; at most ``read_workers`` are out at once. They
    were thread-local and allocated at a thread's first span read, so a process's first cold activation
    paid the page faults of up to 8 MiB per reader (~16 x 8 MiB on a 16-core host) inside the load.
    ``reserve(nbytes, count)`` (called when a plan is registered) allocates and touches them ahead."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated_bytes = 0

    @staticmethod
    def _new(nbytes: int) -> torch.Tensor:
        t = torch.empty(nbytes, dtype=torch.uint8)
        t.zero_()  # fault the pages in now, not inside a read
        return t

    def reserve(self, nbytes: int, count: int) -> None:
        """At least ``count`` buffers of >= ``nbytes`` bytes (free ones smaller are replaced)."""
        if nbytes <= 0:
            return
        with self._lock:
            have = sum(1 for t in self._free if t.numel() >= nbytes)
            small = [t for t in self._free if t.numel() < nbytes]
            self._free = [t for t in self._free if t.numel() >= nbytes]
            self.allocated_bytes -= sum(t.numel() for t in small)
        new = [self._new(nbytes) for _ in range(max(0, count - have))]
        with self._lock:
            self._free.extend(new)
            self.allocated_bytes += nbytes * len(new)

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            best = None
            for i, t in enumerate(self._free):
                if t.numel() >= nbytes and (best is None or t.numel() < self._free[best].numel()):
                    best = i
            if best is not None:
                return self._free.pop(best)
        t = self._new(nbytes)
        with self._lock:
            self.allocated_bytes += nbytes
        return t

    def give(self, t: torch.Tensor) -> None:
        with self._lock:
            self._free.append(t)

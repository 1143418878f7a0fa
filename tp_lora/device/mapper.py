"""The mapper: a cold load's last chunks copied to the device straight from the page cache.

Beside the C batch's readers (which take parts from the front of a cached cold load), one thread takes
whole chunks from the back (``Batch.claim_back``): it maps the chunk's file span, checks that its pages
are in the page cache, pins them in place (``host/pagecache.py``) and copies the chunk's bytes into one of
its own device staging buffers, on its own stream, with no CPU copy. It then gives the chunk's parts the
status ``native.ON_DEVICE`` (``Batch.complete``): the loader thread places the chunk from that buffer
after the copies' event, as it places a chunk the readers filled. The two sides meet where their claims
cross, so neither share is tuned: on the H200 host, 16 readers and this thread moved 3.3 GB in 69 ms
against 96 ms for the readers alone (docs/PERF_NOTES.md row 53).

The cache entry's host buffers of those chunks are filled after the load (``TransferEngine._refill``):
the activation does not wait for them, and the entry is complete (a later load of it warm) once they are.

A chunk the mapper cannot copy (its span not in the page cache, no read-only registration, the driver
refusing) stops it: parts it has not claimed stay the readers'. A chunk it claimed and then failed on
gets status 1 and the loader reads it itself (the short-read path), and the engine maps nothing more
(one warning). On CPU (tests: ``map_reads="on"``) the same claims and statuses run, the copies being
``preadv`` into a CPU staging buffer.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch

from ..host import native
from ..host.pagecache import PAGE, ChunkCopies, MappedRange, Span, read_into

log = logging.getLogger(__name__)

MapReads = Literal["auto", "on", "off"]
MAP_READS: tuple[str, ...] = get_args(MapReads)
#: "auto" maps only plans at least this large (below it, the readers alone finish in a few ms and the
#: registration, the refill and the unregistration cost more than they save)
MAP_MIN_BYTES = 512 << 20
#: the mapper's device staging buffers (chunk-sized): registration of chunk n+1 overlaps chunk n's copy
MAP_STAGINGS = 2


@dataclass
class MapRun:
    """One load's mapper work: ``placed`` chunk id -> (staging buffer, copies' event); ``low``: the first
    position it claimed (positions [low, n) are its own); ``spans``: the mappings to release once the
    copies are done (``event``)."""

    placed: dict = field(default_factory=dict)
    low: int = -1
    spans: list = field(default_factory=list)
    event: Any = None
    bytes: int = 0
    chunks: int = 0
    claimed_failed: bool = False
    seconds: float = 0.0
    wait_s: float = 0.0  # waiting for a staging buffer the loader had not placed from yet
    register_s: float = 0.0  # pinning the spans' pages
    issue_s: float = 0.0  # issuing the copies
    future: cf.Future | None = None

    def took(self, lo: int, chunk, span, event: Any) -> None:
        """Chunk ``chunk`` (positions from ``lo``) is the mapper's: ``span`` to release after ``event``."""
        self.spans.append(span)
        if event is not None:
            self.event = event
        self.low = lo
        self.bytes += chunk.nbytes
        self.chunks += 1

    def release(self) -> None:
        """Wait for the copies that read the spans, then unpin and unmap them."""
        if self.event is not None:
            self.event.synchronize()
        for s in self.spans:
            s.close()
        self.spans = []


class Mapper:
    """The engine's mapper thread, its stream and its staging buffers (see the module docstring)."""

    def __init__(self, device, chunk_bytes: int, mode: MapReads):
        if mode not in MAP_READS:
            raise ValueError(f"map_reads must be one of {MAP_READS}, got {mode!r}")
        self.device, self.chunk_bytes, self.mode = device, chunk_bytes, mode
        self.disabled: str | None = None  # why mapping stopped for good (a registration failed)
        self._ex = cf.ThreadPoolExecutor(1, thread_name_prefix="tp_lora-map")
        self._free: queue.Queue = queue.Queue()
        self.stream = torch.cuda.Stream(device=device.device) if device.is_cuda else None
        self._made = False
        self.stagings = MAP_STAGINGS  # staging buffers, made at the first mapped load (benchmarks vary it)
        # on CUDA, a chunk is one C call without the GIL (native.c ``tpl_map_chunk``) where the C loop is
        # built and the process's CUDA runtime is found; else the same steps in Python
        self.native = native.load() if device.is_cuda else None
        self.cuda = native.cuda_runtime() if self.native is not None else None
        self.c_chunks = self.cuda is not None
        self._done: dict[int, Any] = {}  # staging buffer address -> its copies' event (reused)
        self._vec = np.zeros(0, dtype=np.uint8)
        # tests: ``start`` returns once the mapper has claimed this many chunks (or stopped), so that a
        # tiny load's readers cannot take every part first
        self.head_start = 0

    def wanted(self, plan_bytes: int) -> bool:
        """Whether a cached cold load of ``plan_bytes`` runs the mapper beside its readers."""
        if self.mode == "off" or self.disabled is not None:
            return False
        if self.mode == "on":
            return True
        return self.device.is_cuda and plan_bytes >= MAP_MIN_BYTES

    def _stagings(self) -> None:
        if self._made:
            return
        self._made = True
        for _ in range(self.stagings):
            if self.device.is_cuda:
                with torch.cuda.stream(self.stream):
                    buf = torch.empty(self.chunk_bytes, dtype=torch.uint8, device=self.device.device)
                    ev = torch.cuda.Event()
                    ev.record(self.stream)  # made now: the C call records it by its handle
                    self._done[buf.data_ptr()] = ev
            else:
                buf = torch.empty(self.chunk_bytes, dtype=torch.uint8)
            self._free.put((buf, None))

    def give_back(self, buf: torch.Tensor, event: Any) -> None:
        """The loader placed the chunk in ``buf`` (``event``: after that placement)."""
        self._free.put((buf, event))

    def start(self, batch, fd: int, file_size: int, ranges: list, copies: dict,
              cancelled: threading.Event) -> MapRun:
        """Run the mapper for one load: ``ranges`` [(lo, hi, chunk)] each chunk's positions in the batch,
        in load order; ``copies`` chunk index -> ``ChunkCopies`` or None (the chunk does not suit)."""
        self._stagings()
        run = MapRun()
        ready = threading.Event() if self.head_start else None
        run.future = self._ex.submit(self._run, run, batch, fd, file_size, ranges, copies, cancelled, ready)
        if ready is not None:
            ready.wait(10)
        return run

    @staticmethod
    def _stopped(batch, cancelled: threading.Event) -> bool:
        """The load failed or ended: its batch is cancelled (the loader does so first, whatever happened)."""
        return cancelled.is_set() or bool(batch._c.cancel)

    def _take(self, batch, cancelled: threading.Event):
        while True:
            if self._stopped(batch, cancelled):
                return None
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                pass

    def _run(self, run: MapRun, batch, fd: int, file_size: int, ranges: list, copies: dict,
             cancelled: threading.Event, ready: threading.Event | None = None) -> None:
        t0 = time.perf_counter()
        cuda = self.device.is_cuda
        ctx = torch.cuda.stream(self.stream) if cuda else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for lo, hi, chunk in reversed(ranges):
                if self._stopped(batch, cancelled) or self.disabled is not None:
                    return
                cc: ChunkCopies | None = copies.get(chunk.index)
                if cc is None or chunk.nbytes > self.chunk_bytes:
                    return
                if cuda and self.c_chunks:
                    if not self._chunk_in_c(run, batch, fd, file_size, lo, hi, chunk, cc, cancelled):
                        return
                    continue
                try:
                    span = Span(fd, cc.lo, cc.hi, file_size)
                except (OSError, ValueError) as e:  # a file system that cannot map it
                    self._disable(e, self._stopped(batch, cancelled))
                    return
                if not span.resident():
                    span.close()
                    return
                if batch.claim_back(lo) != hi:
                    span.close()  # a reader took this chunk's first part (or the claim ran out): theirs
                    return
                got = None
                try:
                    tw = time.perf_counter()
                    got = self._take(batch, cancelled)
                    run.wait_s += time.perf_counter() - tw
                    if got is None:
                        raise OSError("the load was cancelled")
                    buf, ev = got
                    if cuda:
                        tr = time.perf_counter()
                        span.register()
                        ti = time.perf_counter()
                        run.register_s += ti - tr
                        if ev is not None:
                            self.stream.wait_event(ev)  # the last placement from this buffer is done
                        src = span.tensor
                        base = cc.lo
                        for d, s, n in zip(cc.dst.tolist(), cc.src.tolist(), cc.nbytes.tolist()):
                            buf[d:d + n].copy_(src[s - base:s - base + n], non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(self.stream)
                        run.issue_s += time.perf_counter() - ti
                    else:
                        read_into(fd, cc, buf)
                        done = None
                except BaseException as e:  # noqa: BLE001 - the loader reads this chunk itself
                    if cuda:
                        self.stream.synchronize()  # copies already issued may read the span still
                    if got is not None:
                        self._free.put(got)
                    span.close()
                    run.claimed_failed = True
                    batch.complete(lo, hi, 1)
                    self._disable(e, self._stopped(batch, cancelled))
                    return
                run.placed[id(chunk)] = (buf, done)
                run.took(lo, chunk, span, done)
                batch.complete(lo, hi, native.ON_DEVICE)
                if ready is not None and run.chunks >= self.head_start:
                    ready.set()
        finally:
            if ready is not None:
                ready.set()
            if ctx is not None:
                ctx.__exit__(None, None, None)
            run.seconds = time.perf_counter() - t0

    def _chunk_in_c(self, run: MapRun, batch, fd: int, file_size: int, lo: int, hi: int, chunk, cc: ChunkCopies,
                    cancelled: threading.Event) -> bool:
        """One chunk through native.c ``tpl_map_chunk`` (a staging buffer taken first); False: stop."""
        tw = time.perf_counter()
        got = self._take(batch, cancelled)
        run.wait_s += time.perf_counter() - tw
        if got is None:
            return False
        buf, ev = got
        map_len = min(cc.hi, file_size) - cc.lo
        reg_len = -(-map_len // PAGE) * PAGE
        if len(self._vec) < reg_len // PAGE:
            self._vec = np.zeros(reg_len // PAGE, dtype=np.uint8)
        done = self._done[buf.data_ptr()]
        # before the call: the loader looks the chunk up as soon as its statuses say ON_DEVICE
        run.placed[id(chunk)] = (buf, done)
        tr = time.perf_counter()
        rc, addr = self.native.map_chunk(batch, self.cuda, fd, lo, hi, cc.lo, map_len, reg_len, cc.dst, cc.src,
                                         cc.nbytes, buf.data_ptr(), self.stream.cuda_stream,
                                         0 if ev is None else ev.cuda_event, done.cuda_event, self._vec)
        run.register_s += time.perf_counter() - tr
        if rc == 1:
            run.took(lo, chunk, MappedRange(addr, map_len), done)
            return True
        del run.placed[id(chunk)]
        if rc < 0 and addr:
            self.stream.synchronize()  # copies issued before the failure may read the mapping still
            MappedRange(addr, map_len).close()
        self._free.put(got)
        if rc <= -100000:
            run.claimed_failed = True
            self._disable(OSError(f"CUDA error {-rc - 100000} pinning or copying a page-cache range"),
                          self._stopped(batch, cancelled))
        elif rc < 0:
            self._disable(OSError(-rc, os.strerror(-rc)), self._stopped(batch, cancelled))
        return False

    def _disable(self, e: BaseException, stopped: bool) -> None:
        if stopped:
            return
        self.disabled = f"{type(e).__name__}: {e}"
        log.warning("copies straight from the page cache are off from now on (%s); the readers read "
                    "every chunk", self.disabled)

    def close(self) -> None:
        self._ex.shutdown(wait=True)

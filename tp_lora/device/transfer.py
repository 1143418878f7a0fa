"""The transfer pipeline: streams, events and the copies of one load (see docs/ARCHITECTURE.md).

One load moves this rank's slices of one adapter into one pool slot:

    pinner threads:  take each chunk's host buffer from the arena ahead of use (the cache entry's
                     buffer when the adapter is cached, a ring buffer when streamed)
    reader threads:  fill the buffer part by part (host/reader.py: a part's direct reads in one io_uring
                     submission, or scatter preads; span reads through scratch)
    loader thread:   one H2D copy per part (parts already read: one for all of them) on the copy stream;
                     once a chunk is complete, its placement into the slot, cast to the pool dtype and
                     value-checked (device/place.py: one Triton launch per chunk on CUDA)

A cached cold load whose parts are all direct reads takes the C batch instead (``_copy_batch``): the
engine's reader pool (host/native.py ``ReaderPool``: threads that stay in C between loads) reads every
part without the GIL, the loader thread takes the chunks' buffers from the arena, and copies parts in the
order they complete, into one of two device staging buffers.

A warm load (chunks complete in the pinned cache) is one H2D per chunk plus its placement. Host
memory in flight beyond the cache is bounded: a streamed (uncached) adapter goes through a ring of
``ring_slots`` buffers. Without CUDA the same code runs with plain host memory and a CPU "device": no
path that pins or touches CUDA streams is reachable.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import AdapterDataError, AdapterError
from ..format.adapter import AdapterHeader
from ..format.dtypes import SAFETENSORS_FLOAT
from ..host.memory import Device, HostArena, ScratchPool
from ..host.pinned_cache import CacheEntry, PinnedCache
from ..host import native, uring
from ..host.reader import SliceReader
from ..plan.memo import PerPlan
from ..plan.packing import (DEFAULT_COST, RING_COST, Chunk, Part, ReadMode, check_read_mode, pack, read_counts,
                             stream_units)
from ..plan.planner import SlicePlan
from ..host.pagecache import copies_of
from .mapper import Mapper, MapReads, MapRun
from .place import LoadCheck, PlacementMode, Placer
from .pool import GpuPool
from .stats import LoadStats

log = logging.getLogger(__name__)


__all__ = ["Device", "LoadJob", "LoadResult", "LoadStats", "LoadTrace", "SliceReader", "TransferEngine",
           "default_read_workers"]


def default_read_workers() -> int:
    """One reader per core this process may run on (page cache -> pinned reads scale with threads:
    5.3 GB/s with 1, 37 GB/s with 16 on the H200 host)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass
class LoadJob:
    header: AdapterHeader
    plan: SlicePlan
    slot: int
    after: Any = None  # compute-stream event: earlier batches' reads of the slot must finish first
    check_finite: bool = True
    submitted: float = 0.0  # perf_counter at submission (stats: time queued)
    fault: Any = None  # test hook: callable(stage, chunk_index) that may raise


@dataclass
class LoadResult:
    event: Any  # copy-stream event at the end of the load (None on CPU)
    stats: LoadStats
    bad_values: Any = None  # device bool tensor: some value was NaN/Inf
    bad_detail: str | None = None  # which tensor, and its value, when a value does not fit the pool dtype
    returned_at: float = 0.0  # perf_counter when the loader thread handed it back (the wake-up's start)


@dataclass
class LoadTrace:
    """One cold load's timeline (``TransferEngine.trace``; benchmarks): seconds from the start of ``run``.

    ``reads``: per unit read, (reader thread ident, unit index, picked up, buffer ready, read done,
    syscalls); ``loader``: ("wait" | "issue", start, end, unit index) of the loader thread;
    ``marks``: (label, time) of the loader's steps before the first read can start (what delays it);
    ``end``: the load's enqueue end; ``units``: units in the load."""

    adapter: str
    units: int = 0
    reads: list = field(default_factory=list)
    loader: list = field(default_factory=list)
    marks: list = field(default_factory=list)
    end: float = 0.0


class _Cancelled(Exception):
    """Internal: a pipeline stage stopped because the load failed elsewhere."""


# ------------------------------------------------------------------------------------------------
# sinks: where a cold load's bytes land on the host
# ------------------------------------------------------------------------------------------------
class _CacheSink:
    """A cached load: each chunk's buffer is the cache entry's (taken from the arena), kept after."""

    def __init__(self, engine: "TransferEngine", entry: CacheEntry, chunks: list[Chunk], stats: LoadStats):
        self.engine, self.entry, self.chunks, self.stats = engine, entry, chunks, stats
        # units ahead of the copy (LoRAConfig.read_ahead): keep every reader busy
        self.window = engine.read_ahead

    def units(self) -> list[tuple[Chunk, Part, bool, Any]]:
        """(chunk, part, last part of its chunk, buffer key): the parts of one chunk share its buffer."""
        return [(c, p, p is us[-1], ("chunk", c.index)) for c in self.chunks for us in (c.units(),) for p in us]

    def buffer(self, chunk: Chunk, cancelled: threading.Event) -> torch.Tensor:  # pinner thread
        if cancelled.is_set():
            raise _Cancelled()
        t = time.perf_counter()
        buf = self.engine.cache.alloc_chunk(self.entry, chunk.index)
        with self.engine._stat_lock:
            self.stats.alloc_s += time.perf_counter() - t
            self.stats.bytes_pinned += buf.numel() if self.engine.device.is_cuda else 0
        return buf

    def copied(self, buf: torch.Tensor) -> None:
        pass

    def finish(self, ok: bool) -> None:
        # also on failure: a dropped entry's buffers go back to the arena only once the H2D reading them is done
        self.engine.cache.finish(self.entry, ok, self.engine.device.copy_event())


class _RingSink:
    """A streamed load: ``ring_slots`` reused buffers; a slot is refilled once its H2D is done."""

    def __init__(self, engine: "TransferEngine", chunks: list[Chunk], stats: LoadStats):
        self.engine, self.chunks, self.stats = engine, chunks, stats
        self.window = engine.ring_slots
        need = max((c.nbytes for c in chunks), default=0)
        self.free: queue.Queue = queue.Queue()
        for b in engine._ring_buffers(need, stats):
            self.free.put((b, None))

    def units(self) -> list[tuple[Chunk, Part, bool, Any]]:
        # whole chunks (row pieces of one chunk share its index): each gets its own ring buffer
        return [(c, c.whole, True, ("unit", i)) for i, c in enumerate(self.chunks)]

    def buffer(self, chunk: Chunk, cancelled: threading.Event) -> torch.Tensor:  # pinner thread
        while True:
            if cancelled.is_set():
                raise _Cancelled()
            try:
                buf, ev = self.free.get(timeout=0.05)
                break
            except queue.Empty:
                pass
        Device.sync_event(ev)  # the H2D that last read this ring slot is done
        return buf

    def copied(self, buf: torch.Tensor) -> None:
        eng = self.engine
        eng.peak_inflight_bytes = max(eng.peak_inflight_bytes, eng.ring_slots * buf.numel())
        self.free.put((buf, eng.device.copy_event()))

    def finish(self, ok: bool) -> None:
        pass


def _start_threads(ex: cf.ThreadPoolExecutor, n: int, first) -> None:
    """Make ``ex`` start all ``n`` of its threads now (each runs ``first`` if given, then waits for the
    others, so that no thread takes two of the start-up tasks)."""
    gate = threading.Barrier(n + 1)

    def wait() -> None:
        if first is not None:
            first()
        try:
            gate.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass

    futs = [ex.submit(wait) for _ in range(n)]
    try:
        gate.wait(timeout=5)
    except threading.BrokenBarrierError:
        pass
    cf.wait(futs)


class TransferEngine:
    """Runs loads one at a time (the manager's loader thread calls ``run``).

    Cold pipeline, per unit (a part of a chunk) in order: a pinner thread takes the chunk's host buffer,
    ``read_workers`` reader threads fill units from the file (io_uring and preadv release the GIL, so reads
    of several units run in parallel), and the loader thread issues one H2D copy per unit plus, once a
    chunk is complete, its placement (``Placer``). At most ``read_ahead`` (default ``read_workers + 1``)
    units are ahead of the copy (``ring_slots`` when streamed), so host memory in flight stays bounded.
    """

    def __init__(self, device: Device, pool: GpuPool, cache: PinnedCache, *, chunk_bytes: int,
                 ring_slots: int, read_workers: int | None, pin_workers: int, part_bytes: int | None,
                 read_mode: ReadMode, arena: HostArena | None = None, placement: PlacementMode = "auto",
                 read_ahead: int | None = None, read_backend: uring.ReadBackend = "auto",
                 native_reads: bool = True, map_reads: MapReads = "off"):
        # the knobs come from a LoRAConfig, which holds their defaults and checked their bounds (the one
        # place for both); these asserts guard the internal contract only
        assert chunk_bytes >= 1 and ring_slots >= 2 and pin_workers >= 1, (chunk_bytes, ring_slots, pin_workers)
        assert read_workers is None or read_workers >= 1, read_workers
        self.device, self.pool, self.cache = device, pool, cache
        self.chunk_bytes = chunk_bytes
        self.ring_slots = ring_slots
        self.read_workers = read_workers if read_workers is not None else default_read_workers()
        self.pin_workers = pin_workers
        self.read_ahead = read_ahead if read_ahead is not None else self.read_workers + 1
        check_read_mode(read_mode)
        self.read_mode: ReadMode = read_mode
        if read_backend not in uring.READ_BACKENDS:
            raise ValueError(f"read_backend must be one of {uring.READ_BACKENDS}, got {read_backend!r}")
        if read_backend == "io_uring" and not uring.available():
            raise ValueError("read_backend='io_uring' but this process cannot create an io_uring (kernel or "
                             "seccomp profile); use 'auto' or 'preadv'")
        use_ring = read_backend == "io_uring" or (read_backend == "auto" and uring.available())
        self.rings = uring.RingPool() if use_ring else None  # one ring per reader thread
        self.cost = RING_COST if use_ring else DEFAULT_COST  # what read_mode "auto" weighs
        # each part's direct reads in one C call without the GIL (None: the readers' Python loop)
        self.native = native.load() if native_reads else None
        # with the C loop, a cached cold load whose parts are all direct reads goes to reader threads that
        # stay in C between loads (``_copy_batch``); False (benchmarks): one reader task per part
        self.batch_reads = True
        self.batch_pool: native.ReaderPool | None = None  # made with the readers (_spawn_readers)
        # the cold pipeline's unit: a chunk (the cache, H2D-when-warm and placement unit) is read and
        # copied part by part, so a few large chunks still pipeline finely
        # (smaller parts for small plans were measured and rejected: docs/PERF_NOTES.md row 25)
        self.part_bytes = part_bytes if part_bytes is not None else max(4096, chunk_bytes // 8)
        self._part_fixed = part_bytes is not None
        self.arena = arena
        # device staging buffers (chunk-sized), ``STAGINGS`` of them: chunk n of a load goes through
        # buffer n % STAGINGS (the C batch: whichever is free), so chunk n+1's H2D overlaps chunk n's
        # placement, which runs on its own stream (``overlap_place``; False: both on the copy stream)
        self._stagings: list[torch.Tensor] = []
        self._placed: dict[int, Any] = {}  # staging buffer address -> event after its last placement
        self.overlap_place = True
        self.place_stream = torch.cuda.Stream(device=device.device) if device.is_cuda else None
        self._ring: list[torch.Tensor] = []
        self._memo = PerPlan()  # per plan: pool coverage, scaling tables, placement tables
        self.placer = Placer(pool, placement, self._memo)
        self._readers = cf.ThreadPoolExecutor(self.read_workers, thread_name_prefix="tp_lora-read")
        self._pinner = cf.ThreadPoolExecutor(self.pin_workers, thread_name_prefix="tp_lora-pin")
        # its own thread: plans prepared at register never queue ahead of a load's buffers
        self._preparer = cf.ThreadPoolExecutor(1, thread_name_prefix="tp_lora-prepare")
        self._stat_lock = threading.Lock()
        self.scratch = ScratchPool()  # the readers' gap/span scratch, kept across loads
        self.peak_inflight_bytes = 0  # host bytes in flight beyond the cache, high-water mark
        # benchmarks: a list makes every cold load append its timeline (``LoadTrace``); None costs nothing
        self.trace: list[LoadTrace] | None = None
        # a cached cold load's last chunks copied to the device straight from the page cache, beside the
        # readers (device/mapper.py); the cache entry's copy of them is read after the load (``_refill``)
        self.mapper = Mapper(device, chunk_bytes, map_reads)
        self._filler = cf.ThreadPoolExecutor(1, thread_name_prefix="tp_lora-refill")
        self._fill: cf.Future | None = None
        # refills after loads (``_refill``): how many, their bytes and seconds, and how many failed
        self.refills = {"refills": 0, "bytes": 0, "seconds": 0.0, "failed": 0}
        self._spawn_readers()
        if device.is_cuda:
            self._warm_up()

    def _spawn_readers(self) -> None:
        """Start every reader and pinner thread now: executors start them lazily, inside the first load
        (a pinner thread's start was in the first activation's header check)."""
        _start_threads(self._readers, self.read_workers,
                       self.rings.ring if self.rings is not None else None)  # each reader's io_uring, now
        _start_threads(self._pinner, self.pin_workers, None)
        if self.native is not None:
            self.batch_pool = self.native.pool(self.read_workers, self.rings)

    def settle_fill(self) -> None:
        """Wait for the last load's refill (its cache entry's chunks that were copied to the device
        straight from the page cache): the reader pool reads one batch at a time."""
        f = self._fill
        if f is not None:
            f.result()
            self._fill = None

    def close(self) -> None:
        self.settle_fill()
        self._filler.shutdown(wait=True)
        self.mapper.close()
        self._preparer.shutdown(wait=True, cancel_futures=True)
        if self.batch_pool is not None:
            self.batch_pool.close()  # before the rings: its threads read through theirs
        self._readers.shutdown(wait=True)
        self._pinner.shutdown(wait=True)
        self._free_ring()
        if self.rings is not None:
            self.rings.close()

    @property
    def inflight_bound(self) -> int:
        """Host bytes a streamed load may hold beyond the cache (the ring)."""
        return self.ring_slots * self.chunk_bytes

    def chunks(self, plan: SlicePlan) -> list[Chunk]:
        """The chunks this engine moves ``plan`` in (cached and warm loads)."""
        return pack(plan, self.chunk_bytes, self.part_for(plan), self.read_mode, self.cost)

    def part_for(self, plan: SlicePlan) -> int:
        """The cold pipeline's part size for ``plan``: ``part_bytes`` when configured; else chunk_bytes / 8,
        or, for a plan small enough that its parts would leave readers idle, about four parts per reader
        (at least 1 MiB) when the C batch reads it (a part there costs an atomic add, not a Python task):
        every reader gets work, and the last part's H2D, the load's tail, is short. (With one Python task
        per part, smaller parts were slower: docs/PERF_NOTES.md row 25.)"""
        if self._part_fixed or not self.batch_reads or self.native is None:
            return self.part_bytes
        return max(min(self.part_bytes, 1 << 20), min(self.part_bytes, plan.nbytes // (4 * self.read_workers)))

    def expect(self, plan: SlicePlan, registered: list[SlicePlan]) -> None:
        """Registration hook, so that the first load of ``plan`` costs what later ones do: pack the plan
        and its pool coverage in the background (37k slices of a sharded MoE take ~0.8 s of Python to
        pack), fault in the readers' scratch, and grow the arena toward what the ``registered`` adapters'
        chunks (and the ring) need, counted in slabs as the arena will place them."""
        if self.arena is not None:  # a first estimate now (bytes); _prepare tops it up in slabs
            self.arena.reserve(sum(p.nbytes for p in registered) + self.inflight_bound)
        self._preparer.submit(self._prepare, plan, list(registered))

    def wait_prepared(self) -> None:
        """Block until the plans registered so far are prepared (benchmarks, tests)."""
        self._preparer.submit(lambda: None).result()
        if self.arena is not None:
            self.arena.wait_reserved()

    def _prepare(self, plan: SlicePlan, registered: list[SlicePlan]) -> None:
        chunks = self.chunks(plan)
        self._memo.get(plan, ("counts", False, self.chunk_bytes), lambda: read_counts(chunks))
        plan.cache_keys()
        self._memo.get(plan, ("coverage", id(self.pool)), lambda: self.pool.coverage(plan.ops))
        SliceReader.prepare(chunks, self._memo.table(plan, "iov"), self.native)
        self.placer.prepare(plan, chunks)
        self.placer.warm_up({g.dtype for c in chunks for g in c.groups})
        self.pool.scaling_tables(plan.scalings, self.device.is_cuda, self._memo.table(plan, "scalings"))
        # the readers' scratch, faulted in now rather than in the first load
        self.scratch.reserve(max((u.scratch_bytes for c in chunks for u in c.units()), default=0),
                             self.read_workers)
        if self.arena is not None:
            sizes = [c.nbytes for p in registered for c in self.chunks(p)]
            self.arena.reserve(self.arena.fit_bytes(sizes + [self.chunk_bytes] * self.ring_slots))

    def _warm_up(self) -> None:
        """Load the kernels a load launches (H2D, strided cast copies from each stored dtype, the finite
        check), once per process at construction: CUDA loads kernels lazily, at their first launch, and
        that first launch would otherwise land in the first activation."""
        dev = self.device
        with torch.cuda.stream(dev.copy_stream):
            host = dev.alloc_host(4096)
            # the staging buffer and the finite check's temporaries at a chunk's size: their first
            # allocation (cudaMalloc) would otherwise land in the first load too
            full = self._staging_for(self.chunk_bytes)
            bool(torch.isfinite(full[:full.numel() // 2 * 2].view(torch.bfloat16)).all().item())
            staging = full[:4096]
            staging.copy_(host, non_blocking=True)
            oks = []
            for dt in {t for _, t in SAFETENSORS_FLOAT.values()}:
                src = staging[:64 * dt.itemsize].view(dt).view(2, 4, 8)
                dst = torch.empty(2, 8, 16, dtype=self.pool.dtype, device=dev.device)
                dst[:, :4, :8].copy_(src)
                dst.zero_()
                oks.append(torch.isfinite(src).all())
            bool((~torch.stack(oks).all()).item())
            dev.copy_stream.synchronize()

    def warm_thread(self) -> None:
        """Run once in the thread that will call ``run`` (the manager's loader thread), at construction:
        the thread's start and its first CUDA calls (its current device, the copy stream, an event) then
        cost nothing in the first activation (measured ~0.5-1 ms on the H200 host while a load's readers
        take every core)."""
        dev = self.device
        if dev.is_cuda:
            with torch.cuda.device(dev.device), torch.cuda.stream(dev.copy_stream):
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(dev.copy_stream)
                ev.synchronize()

    # -- host ring and device staging ------------------------------------------------------------
    def _ring_buffers(self, need: int, stats: LoadStats) -> list[torch.Tensor]:
        if len(self._ring) < self.ring_slots or any(b.numel() < need for b in self._ring):
            self._free_ring()
            n = max(need, self.chunk_bytes)
            alloc = self.arena.alloc if self.arena is not None else self.device.alloc_host
            self._ring = [alloc(n) for _ in range(self.ring_slots)]
            stats.bytes_pinned += sum(b.numel() for b in self._ring) if self.device.is_cuda else 0
        return self._ring

    def _free_ring(self) -> None:
        if self.arena is not None:
            for b in self._ring:
                self.arena.free(b)
        self._ring = []

    def _staging_for(self, nbytes: int) -> torch.Tensor:
        return self._staging_buffers(nbytes)[0][:nbytes]

    def _staging_buffers(self, nbytes: int) -> list[torch.Tensor]:
        """``STAGINGS`` device buffers of at least ``nbytes`` (made at construction, regrown for a chunk
        larger than ``chunk_bytes``: one slice bigger than a chunk)."""
        if len(self._stagings) < self.STAGINGS or any(b.numel() < nbytes for b in self._stagings):
            if self._stagings:  # rare (a slice larger than a chunk): no placement may still read the old
                self.place_stream.synchronize()
                self.device.copy_stream.synchronize()
                self._placed.clear()
            with torch.cuda.stream(self.device.copy_stream):
                self._stagings = [torch.empty(max(nbytes, self.chunk_bytes), dtype=torch.uint8,
                                              device=self.device.device) for _ in range(self.STAGINGS)]
        return list(self._stagings)

    # -- the load --------------------------------------------------------------------------------
    def run(self, job: LoadJob) -> LoadResult:
        self.settle_fill()
        t0 = time.perf_counter()
        plan, header = job.plan, job.header
        chunks = self.chunks(plan)
        sizes = tuple(c.nbytes for c in chunks)
        stats = LoadStats(adapter=header.name, bytes_planned=plan.nbytes, chunks=len(chunks),
                          readers=self.read_workers)
        entry = self.cache.lookup(header.name, header.fingerprint, sizes)
        dev = self.device
        stream_ctx = torch.cuda.stream(dev.copy_stream) if dev.is_cuda else contextlib.nullcontext()
        start_ev = end_ev = None
        chk: LoadCheck | None = None
        began: list[bool] = []
        try:
            with stream_ctx:
                def begin_device() -> None:
                    # the copy stream's first work of the load: after the batches that read the slot, and
                    # the load's start event (a cold load posts its reads first: host time they need not
                    # wait for, ~0.2 ms on the H200 host)
                    nonlocal start_ev, end_ev
                    if began:
                        return
                    began.append(True)
                    if dev.is_cuda:
                        if job.after is not None:
                            dev.copy_stream.wait_event(job.after)
                        start_ev = torch.cuda.Event(enable_timing=True)
                        end_ev = torch.cuda.Event(enable_timing=True)
                        start_ev.record(dev.copy_stream)

                def setup_slot() -> None:
                    # on the copy stream, before the load's first placement (a cold load starts its reads
                    # first: these launches are host time the readers need not wait for)
                    begin_device()
                    cov = self._memo.get(plan, ("coverage", id(self.pool)), lambda: self.pool.coverage(plan.ops))
                    self.pool.clear_slot(job.slot, cov)
                    # the slot is reserved (no batch can use it before activation): set its scalings here,
                    # on the copy stream, so activation issues no host-to-device copy on the compute stream
                    self.pool.set_scalings(job.slot, plan.scalings, non_blocking=True,
                                           memo=self._memo.table(plan, "scalings"))

                if entry is not None:
                    setup_slot()
                    stats.warm = True
                    # a warm load copies bytes that were checked when first read (a load that found
                    # NaN/Inf is evicted from the cache), so only cold loads check
                    chk = self.placer.begin(plan, chunks, False)
                    for i, (chunk, buf) in enumerate(zip(chunks, entry.buffers)):
                        assert buf is not None
                        self._h2d_and_place(job, chk, i, chunk, buf, stats)
                else:
                    chk = self._run_cold(job, chunks, sizes, stats, t0, setup_slot)
                    begin_device()  # (done by setup_slot already, before the first copy)
                if dev.is_cuda and self.overlap_place:
                    # the check's verdict on the stream its device bools were made on (no cross-stream
                    # use of their memory), then the copy stream waits for every placement
                    with torch.cuda.stream(self.place_stream):
                        bad: Any = self.placer.finish(chk)
                    self._join_place()
                else:
                    bad = self.placer.finish(chk)
                if dev.is_cuda:
                    end_ev.record(dev.copy_stream)
                stats.enqueue_s = time.perf_counter() - t0
        except BaseException:
            self._join_place()  # a placement still running must not outlive the load (the slot is reused)
            if entry is not None:
                self.cache.finish(entry, False)
            raise
        if entry is not None:
            self.cache.release(entry, end_ev)
        if job.submitted:
            stats.queued_s = t0 - job.submitted
        if dev.is_cuda:
            ts = time.perf_counter()
            end_ev.synchronize()  # this is the loader thread; the compute stream is not blocked
            stats.sync_s = time.perf_counter() - ts
            stats.h2d_s = start_ev.elapsed_time(end_ev) / 1e3
            if bad is not None:
                with torch.cuda.stream(dev.copy_stream):
                    bad = bool(bad.item())
        elif bad is not None:
            bad = bool(bad)
        stats.total_s = time.perf_counter() - t0
        if not dev.is_cuda:
            stats.h2d_s = stats.total_s - stats.read_s if not stats.warm else stats.total_s
        detail = self.placer.detail(chk) if bad else None
        return LoadResult(event=end_ev, stats=stats, bad_values=bad, bad_detail=detail)

    def _h2d_and_place(self, job: LoadJob, chk: LoadCheck, pos: int, chunk: Chunk, host: torch.Tensor,
                       stats: LoadStats, start: int = 0, end: int | None = None, place: bool = True,
                       staging: torch.Tensor | None = None) -> None:
        """H2D of bytes [start, end) of the chunk (all of it by default; ``pos``: its index in the load's
        chunk list) into a staging buffer (``staging``, else buffer ``pos % STAGINGS``); once the chunk's
        last bytes are there (``place``), its slices are placed into the slot (checked on a cold load), on
        the placement stream: the next chunk's H2D, into the other buffer, overlaps it."""
        end = chunk.nbytes if end is None else end
        cuda = self.device.is_cuda
        if cuda:
            if staging is None:
                staging = self._staging_buffers(chunk.nbytes)[pos % self.STAGINGS]
            dev_buf = staging[:chunk.nbytes]
            if end > start:
                ev = self._placed.pop(staging.data_ptr(), None)
                if ev is not None:  # its previous chunk's placement reads it still
                    self.device.copy_stream.wait_event(ev)
                dev_buf[start:end].copy_(host[start:end], non_blocking=True)
            src = dev_buf
        else:
            src = host[:chunk.nbytes]
        stats.bytes_copied += end - start
        if not place:
            return
        if job.fault is not None:
            job.fault("h2d", chunk.index)
        tp = time.perf_counter()
        if cuda and self.overlap_place:
            ps = self.place_stream
            ps.wait_stream(self.device.copy_stream)  # the chunk's H2D (and the slot's zeroing) first
            with torch.cuda.stream(ps):
                self.placer.place(chk, pos, chunk, src, job.slot, chk.check)
            ev = torch.cuda.Event()
            ev.record(ps)
            self._placed[staging.data_ptr()] = ev
        else:
            self.placer.place(chk, pos, chunk, src, job.slot, chk.check)
        stats.place_s += time.perf_counter() - tp

    def _pairs(self, plan: SlicePlan, chunks: list[Chunk], units: list) -> list:
        """A cached load's [(chunk, part)] (what the reader's batch takes), once per plan."""
        return self._memo.get(plan, ("cache_pairs", id(chunks)), lambda: [(c, p) for c, p, _, _ in units])

    def _join_place(self) -> None:
        """The copy stream waits for every placement issued (before the load's check and end event)."""
        if self.device.is_cuda and self.overlap_place:
            self.device.copy_stream.wait_stream(self.place_stream)
            self._placed.clear()

    # -- the batch path: one C call per reader thread, parts copied in the order they complete --------
    STAGINGS = 2  # device staging buffers of the batch path: chunks whose parts may be copied at once

    def _copy_batch(self, job: LoadJob, rd: SliceReader, sink: "_CacheSink", units: list, chk: LoadCheck,
                    pos: dict, stats: LoadStats, t0: float, trace: LoadTrace | None,
                    cancelled: threading.Event, after_post) -> MapRun | None:
        """A cached cold load through the C batch (host/native.c): the reader pool's threads, which stay
        in C between loads, take parts in order and read them without the GIL; this thread takes each
        chunk's buffer from the arena and publishes its parts (the pool starts on the first chunk's), then
        copies parts H2D in the order they complete (adjacent ones in one copy) into one of ``STAGINGS``
        device buffers, and places a chunk once all its parts are there. Parts whose reads came back short
        are read again here, piece by piece (raising at EOF). ``after_post``: the work that must precede
        the first placement but not the reads (the slot's zeroing and scalings, the header check).

        With the mapper on (``Mapper.wanted``), its thread takes whole chunks from the back of the batch
        and copies them to the device straight from the page cache; their parts come back with status
        ``native.ON_DEVICE`` and are placed from its staging buffer. Returns its ``MapRun`` (None: it did
        not run): the caller refills the cache entry's buffers of the chunks it copied."""
        header = job.header
        stats.batched = True
        pool = self.batch_pool
        pb = rd.start_batch(self._pairs(job.plan, sink.chunks, units))
        n = pb.n
        mark = (lambda what: trace.marks.append((what, time.perf_counter() - t0))) if trace is not None else None
        if mark:
            mark("batch")
        t0_ns = time.monotonic_ns() - int((time.perf_counter() - t0) * 1e9)
        posted = False
        mrun: MapRun | None = None

        def err(e: BaseException) -> BaseException:
            if isinstance(e, AdapterError):
                return e
            if isinstance(e, (OSError, ValueError, RuntimeError)):
                return AdapterDataError(f"reading slices failed: {type(e).__name__}: {e}",
                                        adapter=header.name, path=header.weights_path)
            return e

        try:
            # each chunk's buffer from the arena, its parts published at once; the pool starts on the
            # first chunk's parts while this thread takes the others' buffers
            bufs: dict[int, torch.Tensor] = {}
            members: dict[int, list[int]] = {}
            for i, (c, _, _, _) in enumerate(units):
                members.setdefault(id(c), []).append(i)
            i = 0
            while i < n:
                c = units[i][0]
                idx = members[id(c)]
                bufs[id(c)] = buf = sink.buffer(c, cancelled)
                rd.set_buffers(pb, idx, buf)
                i = idx[-1] + 1
                pb.batch.publish(i)
                if not posted:
                    if mark:
                        mark("published")
                    # posted once the first chunk's parts are out: woken earlier, the readers would spin
                    # for parts on the cores this thread needs to publish them (measured slower)
                    if self.mapper.wanted(job.plan.nbytes) and pb.batch.order is None:
                        # before the readers: its first claim, the last chunk, is then its own
                        mrun = self.mapper.start(pb.batch, rd.fd, header.file_size,
                                                 self._map_ranges(job.plan, units, members),
                                                 self._map_copies(job.plan, sink.chunks), cancelled)
                    pool.post(pb.batch, pb.max_pieces, pb.max_k)
                    posted = True
                    if mark:
                        mark("posted")
                    after_post()  # the slot's zeroing and scalings, the header check: while parts are read
                    if mark:
                        mark("setup")
            # per chunk: parts still to copy; whether its parts tile it (packed order: each part's bytes
            # are its own, copied as soon as read) or not (file order: the whole chunk once complete)
            left = {k: len(v) for k, v in members.items()}
            tiles = {}
            for k, v in members.items():
                rs = sorted((units[j][1].start, units[j][1].end) for j in v)
                tiles[k] = all(a[1] <= b[0] for a, b in zip(rs, rs[1:]))
            cuda = self.device.is_cuda
            free = self._staging_buffers(max(c.nbytes for c, _, _, _ in units)) if cuda else []
            staged: dict[int, torch.Tensor | None] = {}
            waiting: list[int] = []  # parts read, their chunk without a staging buffer yet
            status = pb.batch.status
            handled = np.zeros(n, dtype=bool)
            seen = copied = 0
            while copied < n:
                tw = time.perf_counter()
                # parts deferred for want of a staging buffer, and one free now: no waiting
                now = pb.batch.wait(seen, 0.0 if waiting and (free or not cuda) else 0.05)
                te = time.perf_counter()
                stats.wait_s += te - tw
                if trace is not None:
                    trace.loader.append(("wait", tw - t0, te - t0, -1))
                if now == seen and not waiting:
                    mapping = mrun is not None and not mrun.future.done()
                    if (not mapping and (pb.batch.active == 0 or not pool.usable())
                            and pb.batch.wait(seen, 0) == seen):
                        raise AdapterDataError(f"the reader threads stopped with {n - seen} of {n} parts "
                                               f"unread", adapter=header.name, path=header.weights_path)
                    continue
                seen = now
                ti = time.perf_counter()
                new = np.flatnonzero((status != native.PENDING) & ~handled)
                handled[new] = True
                todo = waiting + new.tolist()
                waiting = []
                by_chunk: dict[int, list[int]] = {}
                for j in todo:
                    by_chunk.setdefault(id(units[j][0]), []).append(j)
                for k, js in by_chunk.items():
                    c = units[js[0]][0]
                    buf = bufs[k]
                    if status[js[0]] == native.ON_DEVICE:  # the mapper's: already on the device
                        left[k] -= len(js)
                        copied += len(js)
                        if left[k] == 0:
                            self._place_mapped(job, chk, pos[id(c)], c, mrun, stats)
                        continue
                    if k not in staged:
                        if cuda and not free:
                            waiting.extend(js)
                            continue
                        staged[k] = free.pop(0) if cuda else None
                    try:
                        for j in js:
                            if status[j] != 0:
                                rd.redo(pb, j, buf)
                        left[k] -= len(js)
                        if job.fault is not None and left[k] == 0:
                            job.fault("read", c.index)
                    except BaseException as e:  # noqa: BLE001 - re-raised as our error
                        raise err(e) from e
                    if tiles[k]:
                        rs = sorted((units[j][1].start, units[j][1].end) for j in js)
                        runs: list[list[int]] = []
                        for a, b in rs:
                            if b <= a:
                                continue
                            if runs and runs[-1][1] == a:
                                runs[-1][1] = b
                            else:
                                runs.append([a, b])
                        for a, b in runs:
                            self._h2d_and_place(job, chk, pos[id(c)], c, buf, stats, a, b, place=False,
                                                staging=staged[k])
                            stats.h2d_calls += 1
                    if left[k] == 0:
                        if tiles[k]:
                            self._h2d_and_place(job, chk, pos[id(c)], c, buf, stats, 0, 0, staging=staged[k])
                        else:
                            self._h2d_and_place(job, chk, pos[id(c)], c, buf, stats, staging=staged[k])
                            stats.h2d_calls += 1
                        if cuda:
                            free.append(staged[k])  # reused after this chunk's placement (stream order)
                        del staged[k]
                    copied += len(js)
                te = time.perf_counter()
                stats.issue_s += te - ti
                if trace is not None:
                    trace.loader.append(("issue", ti - t0, te - t0, int(new[-1]) if len(new) else -1))
        finally:
            st = pb.batch
            st.cancel()
            if mrun is not None:
                self._end_map(mrun, stats)
            stuck = posted and pool.wait_idle(60.0)
            if stuck:
                # a reader stuck in a read for a minute: the batch stays posted (its buffers alive), and
                # later loads take the per-part path
                log.error("adapter %r: reader threads still in a read 60 s after the load ended; later "
                          "loads use one reader task per part", header.name)
                self.batch_pool = None
            else:
                self._batch_done(pb, units, stats, t0_ns, trace, rd)
        if stuck:
            raise AdapterDataError("reader threads did not finish their reads within 60 s",
                                   adapter=header.name, path=header.weights_path)
        return mrun

    # -- the mapper's chunks (device/mapper.py) --------------------------------------------------
    def _map_ranges(self, plan: SlicePlan, units: list, members: dict) -> list:
        """[(first position, end position, chunk)] of a cached load's chunks in the batch, once per plan."""
        def build() -> list:
            out = []
            for c in dict.fromkeys(u[0] for u in units):
                idx = members[id(c)]
                assert idx == list(range(idx[0], idx[-1] + 1)), "a chunk's parts are adjacent in a batch"
                out.append((idx[0], idx[-1] + 1, c))
            return out
        return self._memo.get(plan, ("map_ranges", id(units)), build)

    def _map_copies(self, plan: SlicePlan, chunks: list[Chunk]) -> dict:
        """chunk index -> its copies out of the file (``host/pagecache.copies_of``) or None, once per plan."""
        tables = self._memo.table(plan, "iov")
        return self._memo.get(plan, ("map_copies", id(chunks)), lambda: {
            c.index: copies_of(c.nbytes, [SliceReader.table_of(p, tables) for p in c.units()]) for c in chunks})

    def _place_mapped(self, job: LoadJob, chk: LoadCheck, pos: int, chunk: Chunk, mrun: MapRun,
                      stats: LoadStats) -> None:
        """Place a chunk the mapper copied to its staging buffer (after its copies' event), then give the
        buffer back to the mapper (after this placement)."""
        buf, ev = mrun.placed.pop(id(chunk))
        if job.fault is not None:
            job.fault("read", chunk.index)
            job.fault("h2d", chunk.index)
        tp = time.perf_counter()
        src = buf[:chunk.nbytes]
        if self.device.is_cuda:
            ps = self.place_stream if self.overlap_place else self.device.copy_stream
            ps.wait_stream(self.device.copy_stream)  # the slot's zeroing first
            ps.wait_event(ev)
            with torch.cuda.stream(ps):
                self.placer.place(chk, pos, chunk, src, job.slot, chk.check)
            done = torch.cuda.Event()
            done.record(ps)
        else:
            self.placer.place(chk, pos, chunk, src, job.slot, chk.check)
            done = None
        stats.place_s += time.perf_counter() - tp
        stats.bytes_mapped += chunk.nbytes
        stats.mapped_chunks += 1
        self.mapper.give_back(buf, done)

    def _end_map(self, mrun: MapRun, stats: LoadStats) -> None:
        """The mapper is done with this load (cancelled when the load failed): its staging buffers not
        placed go back to it."""
        assert mrun.future is not None
        try:
            mrun.future.result()
        except BaseException:  # noqa: BLE001 - it marks what it claimed; a failure here is its own bug
            log.exception("adapter %r: the mapper failed", stats.adapter)
        for buf, ev in list(mrun.placed.values()):
            if ev is not None:
                ev.synchronize()
            self.mapper.give_back(buf, None)
        mrun.placed.clear()
        stats.map_s, stats.map_wait_s = mrun.seconds, mrun.wait_s
        stats.map_register_s, stats.map_issue_s = mrun.register_s, mrun.issue_s

    def _batch_done(self, pb, units: list, stats: LoadStats, t0_ns: int, trace: LoadTrace | None,
                    rd: SliceReader) -> None:
        """A batch's stats and trace, and its scratch back (the pool is done with it)."""
        st = pb.batch
        if st.ring_failed:
            log.warning("adapter %r: io_uring failed on %d reader thread(s); they read with preadv since "
                        "(the parts they failed on were read again)", rd.header.name, st.ring_failed)
        done = np.flatnonzero(st.status != native.PENDING)
        stats.read_s += float((st.t_end[done] - st.t_start[done]).sum()) / 1e9
        if trace is not None:
            for j in done.tolist():
                a, b = (st.t_start[j] - t0_ns) / 1e9, (st.t_end[j] - t0_ns) / 1e9
                trace.reads.append((int(st.worker[j]), j, a, a, b, units[j][1].syscalls))
        rd.finish_batch(pb)

    def _copy_parts(self, job: LoadJob, rd: SliceReader, sink: "_CacheSink | _RingSink", units: list,
                    chk: LoadCheck, pos: dict, stats: LoadStats, t0: float, trace: LoadTrace | None,
                    cancelled: threading.Event, setup_slot, pending: deque, header: AdapterHeader) -> None:
        """A cold load part by part (streamed loads, loads with span reads, the Python loop): a pinner
        thread takes each chunk's buffer, one reader task per part, the loader copies parts in file order
        (``pending``: the caller waits for the tasks left in it whatever happens)."""
        setup_slot()
        lock = self._stat_lock

        def fill(i: int, chunk: Chunk, part: Part, last: bool, buf_f: cf.Future) -> torch.Tensor:  # readers
            tp = time.perf_counter()
            buf = buf_f.result()
            if cancelled.is_set():
                raise _Cancelled()
            t = time.perf_counter()
            rd.read_part(chunk, part, buf)
            if job.fault is not None and last:
                job.fault("read", chunk.index)
            te = time.perf_counter()
            with lock:
                stats.read_s += te - t
            if trace is not None:
                trace.reads.append((threading.get_ident(), i, tp - t0, t - t0, te - t0, part.syscalls))
            return buf

        buf_futs: dict[Any, cf.Future] = {}

        def submit(i: int) -> None:
            chunk, part, last, key = units[i]
            bf = buf_futs.get(key)
            if bf is None:
                bf = buf_futs[key] = self._pinner.submit(sink.buffer, chunk, cancelled)
            pending.append((chunk, part, last, bf, self._readers.submit(fill, i, chunk, part, last, bf)))

        nxt = min(sink.window, len(units))
        for i in range(nxt):
            submit(i)
        def result(rf: cf.Future) -> torch.Tensor:
            tw = time.perf_counter()
            try:
                return rf.result()
            except AdapterError:
                raise
            except (OSError, ValueError, RuntimeError) as e:
                raise AdapterDataError(f"reading slices failed: {type(e).__name__}: {e}",
                                       adapter=header.name, path=header.weights_path) from e
            finally:
                te = time.perf_counter()
                stats.wait_s += te - tw
                if trace is not None:
                    trace.loader.append(("wait", tw - t0, te - t0, -1))

        while pending:
            chunk, part, last, _, rf = pending.popleft()
            buf = result(rf)
            ti = time.perf_counter()
            start, end, taken = part.start, part.end, 1
            # the chunk's next parts, already read: one H2D for all of them (each H2D costs the loader
            # thread a few GIL round trips, and readers ahead of it mean it is the bottleneck)
            while not last and pending and pending[0][0] is chunk and pending[0][4].done():
                _, nxt_part, last, _, nrf = pending.popleft()
                result(nrf)
                taken += 1
                if nxt_part.end <= nxt_part.start:
                    continue
                if start < end and nxt_part.start != end:  # not adjacent: copy what we have first
                    self._h2d_and_place(job, chk, pos[id(chunk)], chunk, buf, stats, start, end, place=False)
                    start = nxt_part.start
                elif start >= end:
                    start = nxt_part.start
                end = nxt_part.end
            whole = start == 0 and end == chunk.nbytes
            if whole and last:
                self._h2d_and_place(job, chk, pos[id(chunk)], chunk, buf, stats)
            else:
                self._h2d_and_place(job, chk, pos[id(chunk)], chunk, buf, stats, start, end, place=last)
            te = time.perf_counter()
            stats.issue_s += te - ti
            if trace is not None:
                trace.loader.append(("issue", ti - t0, te - t0, nxt - len(pending) - 1))
            stats.h2d_calls += 1
            if last:
                sink.copied(buf)
            for _ in range(taken):
                if nxt < len(units):
                    submit(nxt)
                    nxt += 1

    def _run_cold(self, job: LoadJob, chunks: list[Chunk], sizes: tuple[int, ...],
                  stats: LoadStats, t0: float, setup_slot) -> LoadCheck:
        header = job.header
        marks = [("cold", time.perf_counter() - t0)] if self.trace is not None else None
        # opened before reserving cache budget: it raises if the file vanished or changed; closed in the
        # finally below whatever fails after (a ring allocation, a reader)
        rd = SliceReader(header, self.scratch, self._memo.table(job.plan, "iov"), check_header=False,
                         rings=self.rings, native=self.native)
        if marks is not None:
            marks.append(("opened", time.perf_counter() - t0))
        # the header's digest, checked beside the reads (submitted by the copy path once its reads are
        # going: it reads and hashes up to megabytes) and awaited before the load can succeed
        header_ok: list[cf.Future] = []

        def check_header() -> None:
            if not header_ok:
                if rd.needs_header_check:
                    stats.header_checked = True
                    header_ok.append(self._pinner.submit(rd.check_header))
                else:  # the file is as registered (settled identity): nothing to read
                    done: cf.Future = cf.Future()
                    done.set_result(None)
                    header_ok.append(done)
        sink: _CacheSink | _RingSink | None = None
        pending: deque = deque()
        cancelled = threading.Event()
        ok = False
        mrun: MapRun | None = None
        try:
            entry = self.cache.begin(header.name, header.fingerprint, sizes, job.plan.cache_keys())
            stats.streamed = entry is None
            if entry is not None:
                sink = _CacheSink(self, entry, chunks, stats)
            else:
                sink = _RingSink(self, stream_units(job.plan, self.chunk_bytes, self.part_bytes,
                                                    self.read_mode, self.cost), stats)
            if isinstance(sink, _CacheSink):  # the same list for every cached load of the plan
                units = self._memo.get(job.plan, ("cache_units", id(chunks)), sink.units)
            else:
                units = sink.units()
            trace = None
            if self.trace is not None:
                trace = LoadTrace(header.name, len(units), marks=marks or [])
                trace.marks.append(("sink", time.perf_counter() - t0))
                self.trace.append(trace)
            # the check's launches wait for the device setup, after the reads are posted
            chk = self.placer.begin(job.plan, sink.chunks, job.check_finite, arm=False)

            def setup() -> None:
                setup_slot()
                self.placer.arm(chk)
            if trace is not None:
                trace.marks.append(("check", time.perf_counter() - t0))
            pos = {id(c): i for i, c in enumerate(sink.chunks)}
            counts = self._memo.get(job.plan, ("counts", stats.streamed, self.chunk_bytes),
                                    lambda: read_counts(sink.chunks))
            stats.syscalls, stats.span_ops = counts.syscalls, counts.span_ops
            if (self.batch_reads and self.batch_pool is not None and isinstance(sink, _CacheSink)
                    and self.batch_pool.usable() and rd.batchable(self._pairs(job.plan, chunks, units))):
                mrun = self._copy_batch(job, rd, sink, units, chk, pos, stats, t0, trace, cancelled,
                                        lambda: (setup(), check_header()))
            else:
                check_header()
                self._copy_parts(job, rd, sink, units, chk, pos, stats, t0, trace, cancelled, setup,
                                 pending, header)
            check_header()
            header_ok[0].result()
            rd.verify_unchanged()
            ok = True
            if trace is not None:
                trace.end = time.perf_counter() - t0
            return chk
        finally:
            cancelled.set()
            try:
                for f in header_ok:
                    f.result()  # the reader's fd stays open until the check is done
            except BaseException:  # noqa: BLE001 - raised above when it matters
                pass
            for _, _, _, bf, rf in pending:  # let the stages of units not copied finish or stop
                for f in (rf, bf):
                    try:
                        f.result()
                    except BaseException:  # noqa: BLE001 - the load already failed
                        pass
            stats.bytes_read += rd.bytes_read
            stats.ring_reads += rd.ring_reads
            stats.native_parts += rd.native_parts
            if ok and mrun is not None and mrun.chunks and isinstance(sink, _CacheSink):
                # the cache entry's buffers of the chunks the mapper copied are read now, after the load
                # (the activation does not wait for them): the entry is complete once they are
                sink.entry.filling = threading.Event()
                self._fill = self._filler.submit(self._refill, rd, sink, mrun)
            else:
                if mrun is not None:
                    mrun.release()
                rd.close()
                if sink is not None:
                    sink.finish(ok)

    def _refill(self, rd: SliceReader, sink: _CacheSink, mrun: MapRun) -> None:
        """The refill thread, after a load whose mapper copied chunks to the device straight from the page
        cache: the C batch reads those chunks' parts (positions [mrun.low, n)) into the cache entry's
        buffers while the mappings are unpinned; the entry is complete if every part was read and the
        file did not change since the load opened it (else it is dropped, and a later load reads the
        file again; the slot the load filled is not touched)."""
        t = time.perf_counter()
        ok = False
        pool = self.batch_pool
        pb = rd.last_batch
        try:
            if pool is None or not pool.usable() or pb is None:
                raise AdapterDataError("no reader pool to refill the cache entry", adapter=rd.header.name)
            rd.restart_batch(pb, mrun.low)
            pool.post(pb.batch, pb.max_pieces, pb.max_k)
            mrun.release()  # unpin while the readers read
            if pool.wait_idle(60.0):
                self.batch_pool = None
                raise AdapterDataError("reader threads did not finish the refill within 60 s",
                                       adapter=rd.header.name)
            status = pb.batch.status
            for j in range(mrun.low, pb.n):
                if status[j] != 0:
                    c = pb.units[j][0]
                    rd.redo(pb, j, sink.entry.buffers[c.index])
            rd.finish_batch(pb)
            rd.verify_unchanged()
            ok = True
        except BaseException as e:  # noqa: BLE001 - the slot is loaded; only the cache entry is lost
            log.warning("adapter %r: refilling its cache entry failed (%s: %s); the entry is dropped and a "
                        "later load reads the file again", rd.header.name, type(e).__name__, e)
            if pb is not None and pb.scratch is not None:
                rd.finish_batch(pb)
        finally:
            mrun.release()
            with self._stat_lock:
                self.refills["refills"] += 1
                self.refills["bytes"] += mrun.bytes if ok else 0
                self.refills["seconds"] += time.perf_counter() - t
                self.refills["failed"] += not ok
            rd.close()
            sink.finish(ok)
            assert sink.entry.filling is not None
            sink.entry.filling.set()


"""The transfer pipeline: the only module with streams, events and pinned memory.

One load moves this rank's slices of one adapter into one pool slot:

    reader thread:   read+slice+pack chunk n+1 (pread from the file into a host buffer; pinned on CUDA)
    loader thread:   one H2D copy of chunk n on the copy stream, then one strided device copy per
                     (module, side) into the slot, casting to the pool dtype on the device

Host memory in flight beyond the cache is bounded: a streamed (uncached) adapter goes through a ring of
``ring_slots`` buffers. Without CUDA the same code runs with plain host memory and a CPU "device": no
path that pins or touches CUDA streams is reachable.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapter import FLOAT_DTYPES, AdapterHeader
from .errors import AdapterDataError, AdapterError, TPLoRAError
from .pinned_cache import CacheEntry, PinnedCache
from .planner import Chunk, SliceOp, SlicePlan
from .pool import GpuPool

log = logging.getLogger(__name__)

TORCH_DTYPES = {k: getattr(torch, v[1]) for k, v in FLOAT_DTYPES.items()}


class Device:
    """Where the pool lives, and the copy machinery that goes with it."""

    def __init__(self, device: torch.device | str, pin_mode: str = "caching"):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if pin_mode not in ("caching", "register"):
            raise ValueError(f"pin_mode must be 'caching' or 'register', got {pin_mode!r}")
        self.pin_mode = pin_mode
        if self.is_cuda:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.copy_stream = torch.cuda.Stream(device=self.device)
        else:
            self.copy_stream = None

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        if not self.is_cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        if self.pin_mode == "register":
            return _RegisteredBuffer.alloc(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def compute_event(self) -> Any:
        """An event on the caller's current stream (the compute stream), or None on CPU."""
        if not self.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def wait_on_compute(self, event: Any) -> None:
        """Make the compute stream wait for a copy-stream event: no host-side synchronisation."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def sync_event(event: Any) -> None:
        if event is not None:
            event.synchronize()


class _RegisteredBuffer:
    """Plain host memory registered with cudaHostRegister: pinned bytes == requested bytes exactly
    (the caching pinned allocator rounds requests up to powers of two)."""

    _keep: dict[int, torch.Tensor] = {}

    @staticmethod
    def alloc(nbytes: int) -> torch.Tensor:
        t = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
        if int(rc) != 0:
            raise TPLoRAError(f"cudaHostRegister of {nbytes} bytes failed with code {int(rc)}")
        import weakref

        ptr = t.data_ptr()
        weakref.finalize(t, lambda p=ptr: torch.cuda.cudart().cudaHostUnregister(p))
        return t[:nbytes]


@dataclass
class LoadStats:
    adapter: str
    warm: bool = False
    streamed: bool = False
    bytes_planned: int = 0
    bytes_read: int = 0
    bytes_pinned: int = 0
    bytes_copied: int = 0
    chunks: int = 0
    read_s: float = 0.0  # reader thread time (read + slice + pack, incl. allocation)
    alloc_s: float = 0.0  # host (pinned) allocation time inside read_s
    h2d_s: float = 0.0  # device time of the H2D copies + placement (events on CUDA)
    total_s: float = 0.0  # wall time of the load, from start to the end of the last device copy

    @property
    def h2d_gbps(self) -> float:
        return self.bytes_copied / self.h2d_s / 1e9 if self.h2d_s > 0 else 0.0


@dataclass
class LoadJob:
    header: AdapterHeader
    plan: SlicePlan
    slot: int
    after: Any = None  # compute-stream event: earlier batches' reads of the slot must finish first
    check_finite: bool = True
    fault: Any = None  # test hook: callable(stage, chunk_index) that may raise


@dataclass
class LoadResult:
    event: Any  # copy-stream event at the end of the load (None on CPU)
    stats: LoadStats
    bad_values: Any = None  # device bool tensor: some value was NaN/Inf


class SliceReader:
    """Reads this rank's slices from a safetensors file with pread: only owned bytes are read
    (full-row slices go straight into the host buffer; column slices read their row span)."""

    def __init__(self, header: AdapterHeader):
        self.header = header
        self.path = header.weights_path
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise AdapterDataError(f"cannot open the weights for reading: {e}", adapter=header.name,
                                   path=self.path) from None
        size = os.fstat(self.fd).st_size
        if size != header.file_size:
            os.close(self.fd)
            raise AdapterDataError(f"file size changed since registration: {header.file_size} -> {size} bytes",
                                   adapter=header.name, path=self.path)
        self.bytes_read = 0
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _pread_into(self, dst: torch.Tensor, offset: int) -> None:
        mv = memoryview(dst.numpy()).cast("B")
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise AdapterDataError(f"file truncated while reading: got {done} of {len(mv)} bytes at "
                                       f"offset {offset}", adapter=self.header.name, path=self.path)
            done += n
        self.bytes_read += len(mv)

    def read(self, op: SliceOp, dst: torch.Tensor) -> None:
        """Fill ``dst`` (uint8, ``op.nbytes``) with ``src[rows, cols]`` packed row-major."""
        rows, cols = op.src_shape
        isz = op.itemsize
        r0, r1 = op.rows
        c0, c1, step = op.cols
        row_bytes = cols * isz
        if c0 == 0 and c1 == cols and step == 1:
            self._pread_into(dst, op.src_offset + r0 * row_bytes)
            return
        if step == 1:
            # column slice: one pread per row, so only owned bytes are read
            w = op.ncols * isz
            d = dst.view(r1 - r0, w)
            for i in range(r1 - r0):
                self._pread_into(d[i], op.src_offset + (r0 + i) * row_bytes + c0 * isz)
            return
        # strided columns (fused-expert B: expert index fastest, so a rank's columns interleave with
        # other experts' at element granularity): read the row span once, then gather
        first, last = c0 * isz, (c0 + (op.ncols - 1) * step + 1) * isz
        span_rows = r1 - r0
        span = (span_rows - 1) * row_bytes + (last - first)
        if self._scratch.numel() < span:
            self._scratch = torch.empty(span, dtype=torch.uint8)
        buf = self._scratch[:span]
        self._pread_into(buf, op.src_offset + r0 * row_bytes + first)
        src = torch.as_strided(buf, (span_rows, op.ncols, isz), (row_bytes, step * isz, 1))
        dst.view(span_rows, op.ncols, isz).copy_(src)


class TransferEngine:
    """Runs loads one at a time (the manager's loader thread calls ``run``)."""

    def __init__(self, device: Device, pool: GpuPool, cache: PinnedCache, *, chunk_bytes: int = 16 << 20,
                 ring_slots: int = 3):
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.device, self.pool, self.cache = device, pool, cache
        self.chunk_bytes = chunk_bytes
        self.ring_slots = max(2, ring_slots)
        self._staging: torch.Tensor | None = None
        self._ring: list[torch.Tensor] = []
        self.peak_inflight_bytes = 0  # host bytes in flight beyond the cache, high-water mark

    @property
    def inflight_bound(self) -> int:
        """Host bytes a streamed load may hold beyond the cache (the ring)."""
        return self.ring_slots * self.chunk_bytes

    # -- device staging --------------------------------------------------------------------------
    def _staging_for(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            with torch.cuda.stream(self.device.copy_stream):
                self._staging = torch.empty(max(nbytes, self.chunk_bytes), dtype=torch.uint8,
                                            device=self.device.device)
        return self._staging[:nbytes]

    def _place(self, chunk: Chunk, src: torch.Tensor, slot: int, check_finite: bool,
               bad: torch.Tensor | None) -> torch.Tensor | None:
        """Strided copies (with the cast to the pool dtype) from a packed chunk into the slot."""
        for g in chunk.groups:
            dt = TORCH_DTYPES[g.dtype]
            r, c = g.shape
            part = src[g.byte_offset:g.byte_offset + g.nbytes].view(dt).view(g.count, r, c)
            dst = self.pool.block(g.module, g.side, slot)
            if g.flat_start + g.count > dst.shape[0] or r > dst.shape[1] or c > dst.shape[2]:
                raise AssertionError(f"planned block {g} does not fit pool buffer {tuple(dst.shape)}")
            dst[g.flat_start:g.flat_start + g.count, :r, :c].copy_(part)
            if check_finite:
                ok = torch.isfinite(part).all()
                bad = ~ok if bad is None else (bad | ~ok)
        return bad

    # -- the load --------------------------------------------------------------------------------
    def run(self, job: LoadJob) -> LoadResult:
        t0 = time.perf_counter()
        plan, header = job.plan, job.header
        chunks = plan.chunks(self.chunk_bytes)
        sizes = tuple(c.nbytes for c in chunks)
        stats = LoadStats(adapter=header.name, bytes_planned=plan.nbytes, chunks=len(chunks))
        entry = self.cache.lookup(header.name, header.fingerprint, sizes)
        dev = self.device
        stream_ctx = torch.cuda.stream(dev.copy_stream) if dev.is_cuda else _null()
        start_ev = end_ev = None
        bad = None
        try:
            with stream_ctx:
                if dev.is_cuda:
                    if job.after is not None:
                        dev.copy_stream.wait_event(job.after)
                    start_ev = torch.cuda.Event(enable_timing=True)
                    end_ev = torch.cuda.Event(enable_timing=True)
                    start_ev.record(dev.copy_stream)
                self.pool.clear_slot(job.slot)
                # the slot is reserved (no batch can use it before activation): set its scalings here,
                # on the copy stream, so activation issues no host-to-device copy on the compute stream
                self.pool.set_scalings(job.slot, plan.scalings, non_blocking=True)
                if entry is not None:
                    stats.warm = True
                    bad = self._run_warm(job, chunks, entry, stats)
                else:
                    bad = self._run_cold(job, chunks, sizes, stats)
                if dev.is_cuda:
                    end_ev.record(dev.copy_stream)
        except BaseException:
            if entry is not None:
                self.cache.finish(entry, False)
            raise
        if entry is not None:
            self.cache.release(entry, end_ev)
        if dev.is_cuda:
            end_ev.synchronize()  # this is the loader thread; the compute stream is not blocked
            stats.h2d_s = start_ev.elapsed_time(end_ev) / 1e3
            if bad is not None:
                with torch.cuda.stream(dev.copy_stream):
                    bad = bool(bad.item())
        stats.total_s = time.perf_counter() - t0
        if not dev.is_cuda:
            stats.h2d_s = stats.total_s - stats.read_s if not stats.warm else stats.total_s
        return LoadResult(event=end_ev, stats=stats, bad_values=bad)

    def _h2d_and_place(self, job: LoadJob, chunk: Chunk, host: torch.Tensor, stats: LoadStats,
                       bad: torch.Tensor | None) -> torch.Tensor | None:
        if self.device.is_cuda:
            dev_buf = self._staging_for(chunk.nbytes)
            dev_buf.copy_(host[:chunk.nbytes], non_blocking=True)
            src = dev_buf
        else:
            src = host[:chunk.nbytes]
        stats.bytes_copied += chunk.nbytes
        if job.fault is not None:
            job.fault("h2d", chunk.index)
        return self._place(chunk, src, job.slot, job.check_finite, bad)

    def _run_warm(self, job: LoadJob, chunks: list[Chunk], entry: CacheEntry, stats: LoadStats):
        bad = None
        for chunk, buf in zip(chunks, entry.buffers):
            assert buf is not None
            bad = self._h2d_and_place(job, chunk, buf, stats, bad)
        return bad

    def _run_cold(self, job: LoadJob, chunks: list[Chunk], sizes: tuple[int, ...], stats: LoadStats):
        header = job.header
        entry = self.cache.begin(header.name, header.fingerprint, sizes, tuple(job.plan.cache_keys()))
        stats.streamed = entry is None
        q: queue.Queue = queue.Queue(maxsize=self.ring_slots - 1 if entry is None else 2)
        free_ring: queue.Queue = queue.Queue()
        if entry is None:
            need = max(sizes, default=0)
            if any(b.numel() < need for b in self._ring) or len(self._ring) < self.ring_slots:
                self._ring = [self.device.alloc_host(max(need, self.chunk_bytes)) for _ in range(self.ring_slots)]
                stats.bytes_pinned += sum(b.numel() for b in self._ring) if self.device.is_cuda else 0
            for b in self._ring:
                free_ring.put((b, None))
        stop = threading.Event()

        def reader() -> None:
            rd = None
            try:
                rd = SliceReader(header)
                for chunk in chunks:
                    if stop.is_set():
                        return
                    t = time.perf_counter()
                    if entry is not None:
                        ta = time.perf_counter()
                        buf = self.cache.alloc_chunk(entry, chunk.index)
                        stats.alloc_s += time.perf_counter() - ta
                        stats.bytes_pinned += buf.numel() if self.device.is_cuda else 0
                    else:
                        buf, ev = free_ring.get()
                        Device.sync_event(ev)  # the H2D that last read this ring slot is done
                    before = rd.bytes_read
                    for op, off in zip(chunk.ops, chunk.offsets):
                        rd.read(op, buf[off:off + op.nbytes])
                    stats.bytes_read += rd.bytes_read - before
                    if job.fault is not None:
                        job.fault("read", chunk.index)
                    stats.read_s += time.perf_counter() - t
                    q.put((chunk, buf, None))
            except BaseException as e:  # noqa: BLE001 - handed to the loader thread
                q.put((None, None, e))
            finally:
                if rd is not None:
                    rd.close()

        th = threading.Thread(target=reader, name=f"tp_lora-read-{header.name}", daemon=True)
        th.start()
        bad = None
        ok = False
        try:
            for _ in chunks:
                chunk, buf, err = q.get()
                if err is not None:
                    if isinstance(err, AdapterError):
                        raise err
                    if isinstance(err, (OSError, ValueError, RuntimeError)):
                        raise AdapterDataError(f"reading slices failed: {type(err).__name__}: {err}",
                                               adapter=header.name, path=header.weights_path) from err
                    raise err
                if entry is None:
                    self.peak_inflight_bytes = max(self.peak_inflight_bytes,
                                                   self.ring_slots * buf.numel())
                bad = self._h2d_and_place(job, chunk, buf, stats, bad)
                if entry is None:
                    ev = None
                    if self.device.is_cuda:
                        ev = torch.cuda.Event()
                        ev.record(self.device.copy_stream)
                    free_ring.put((buf, ev))
            ok = True
        finally:
            stop.set()
            if not ok:
                # unblock the reader if it waits for a ring slot or a queue place, then join it
                while th.is_alive():
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                    free_ring.put((self._ring[0] if self._ring else torch.empty(0, dtype=torch.uint8), None))
                    th.join(timeout=0.05)
            th.join()
            if entry is not None:
                ev = None
                if self.device.is_cuda and ok:
                    ev = torch.cuda.Event()
                    ev.record(self.device.copy_stream)
                self.cache.finish(entry, ok, ev)
        return bad


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None

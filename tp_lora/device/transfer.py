"""The transfer pipeline: the only module with streams, events and pinned memory.

One load moves this rank's slices of one adapter into one pool slot (see docs/ARCHITECTURE.md):

    pinner threads:  allocate (pin) each chunk's host buffer ahead of use
    reader threads:  fill the chunk part by part with scatter preads of this rank's bytes
    loader thread:   one H2D copy per part on the copy stream; once a chunk is complete, one strided
                     device copy per (module, side) into the slot, casting to the pool dtype

A warm load (chunks complete in the pinned cache) is one H2D per chunk plus the placement copies. Host
memory in flight beyond the cache is bounded: a streamed (uncached) adapter goes through a ring of
``ring_slots`` buffers. Without CUDA the same code runs with plain host memory and a CPU "device": no
path that pins or touches CUDA streams is reachable.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import stat
import threading
import time
import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..format.adapter import AdapterHeader
from ..format.dtypes import safetensors_torch
from ..errors import AdapterDataError, AdapterError, TPLoRAError
from ..host.pinned_cache import PinnedCache
from ..plan.planner import Chunk, SliceOp, SlicePlan
from .pool import GpuPool

log = logging.getLogger(__name__)



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

    #: fault pages in with a parallel fill before registering (measured on an H100 host: pinning
    #: 3-4x faster); TP_LORA_PREFAULT=0 turns it off
    prefault = os.environ.get("TP_LORA_PREFAULT", "1") == "1"

    @staticmethod
    def alloc(nbytes: int) -> torch.Tensor:
        import mmap
        import weakref

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
        if _RegisteredBuffer.prefault:
            # fault the pages in with torch's parallel fill (many threads take page faults at once),
            # so that registering only has to lock pages that are already there
            t.fill_(0)
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
        if int(rc) != 0:
            raise TPLoRAError(f"cudaHostRegister of {nbytes} bytes failed with code {int(rc)}")
        # unregister when the tensor object dies (the finalizer also keeps the mapping alive until then);
        # callers keep this very tensor, not only views of it
        weakref.finalize(t, _unregister, t.data_ptr(), mm)
        return t


def _unregister(ptr: int, mm: object) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


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
    queued_s: float = 0.0  # from prefetch/activate submitting the job to the loader starting it
    enqueue_s: float = 0.0  # loader: from start to the last copy enqueued
    sync_s: float = 0.0  # loader: waiting for the copy stream to finish after the last enqueue
    wait_s: float = 0.0  # loader thread waiting for the next chunk to be read (cold)
    issue_s: float = 0.0  # loader thread issuing H2D + placement copies

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
    submitted: float = 0.0  # perf_counter at submission (stats: time queued)
    fault: Any = None  # test hook: callable(stage, chunk_index) that may raise


@dataclass
class LoadResult:
    event: Any  # copy-stream event at the end of the load (None on CPU)
    stats: LoadStats
    bad_values: Any = None  # device bool tensor: some value was NaN/Inf


class SliceReader:
    """Reads this rank's slices from a safetensors file with scatter preads (the planner's read runs):
    only owned bytes are read, except the documented span reads of strided fused-expert columns."""

    def __init__(self, header: AdapterHeader):
        self.header = header
        self.path = header.weights_path
        try:
            # O_NONBLOCK: a FIFO swapped in since registration must not block the loader thread forever
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise AdapterDataError(f"cannot open the weights for reading: {e}", adapter=header.name,
                                   path=self.path) from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise AdapterDataError("the weights are no longer a regular file (a directory, FIFO or device)",
                                   adapter=header.name, path=self.path)
        size = st.st_size
        if size != header.file_size:
            os.close(self.fd)
            raise AdapterDataError(f"file size changed since registration: {header.file_size} -> {size} bytes",
                                   adapter=header.name, path=self.path)
        try:
            self._check_header()
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes_read = 0
        self._lock = threading.Lock()  # several reader threads share one fd (pread has no file offset)

    def _check_header(self) -> None:
        """The file may have been rewritten since registration with the same size: the planned offsets
        are only valid if every planned tensor still has the dtype, shape and offsets it had then
        (header bytes only; a rewrite with another layout would otherwise load other tensors' bytes)."""
        from ..format.safetensors_header import read_safetensors_header

        h = self.header
        if h.header_digest:
            # fast path: the header bytes are exactly those registered (one read + one hash, instead of
            # parsing tens of thousands of entries again on every cold load)
            import hashlib

            raw = os.pread(self.fd, 8 + h.header_bytes, 0)
            if hashlib.sha256(raw).hexdigest() == h.header_digest:
                return
        try:
            tensors, _, _ = read_safetensors_header(self.path, adapter=h.name)
        except AdapterError as e:
            raise AdapterDataError(f"the file changed since registration: {e.reason}", adapter=h.name,
                                   path=self.path) from None
        for t in h.targets:
            for info in (t.A, t.B):
                if tensors.get(info.key) != info:
                    now = tensors.get(info.key)
                    raise AdapterDataError(
                        f"the file changed since registration: tensor {info.key!r} was {info.dtype} "
                        f"{list(info.shape)} at [{info.start}, {info.end}), now "
                        f"{'missing' if now is None else f'{now.dtype} {list(now.shape)} at [{now.start}, {now.end})'}",
                        adapter=h.name, path=self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_chunk(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Fill a chunk's host buffer: one scatter preadv per contiguous file run, then the strided
        (fused-expert) slices."""
        self._read_runs(chunk, chunk.reads, chunk.gathers, buf)

    def read_part(self, chunk: Chunk, part: Any, buf: torch.Tensor) -> None:
        """Fill one part of a chunk's buffer (``part`` None: the whole chunk)."""
        if part is None:
            self.read_chunk(chunk, buf)
        else:
            self._read_runs(chunk, part.reads, part.gathers, buf)

    def _read_runs(self, chunk: Chunk, reads: Any, gathers: Any, buf: torch.Tensor) -> None:
        mv = memoryview(buf.numpy()).cast("B")
        total = 0
        for file_off, pieces in reads:
            iov = [mv[o:o + n] for o, n in pieces]
            want = sum(n for _, n in pieces)
            if os.preadv(self.fd, iov, file_off) != want:
                # short read (signal, end of a truncated file): finish piece by piece, raising at EOF
                pos = file_off
                for o, n in pieces:
                    self._pread_into_mv(mv[o:o + n], pos)
                    pos += n
            total += want
        with self._lock:
            self.bytes_read += total
        for i in gathers:
            op = chunk.ops[i]
            off = chunk.offsets[i]
            self._gather(op, buf[off:off + op.nbytes])

    def _pread_into_mv(self, mv: memoryview, offset: int) -> None:
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise AdapterDataError(f"file truncated while reading: got {done} of {len(mv)} bytes at "
                                       f"offset {offset}", adapter=self.header.name, path=self.path)
            done += n

    def _gather(self, op: SliceOp, dst: torch.Tensor) -> None:
        """Strided columns (fused-expert B: the expert index varies fastest, so a rank's columns
        interleave with other experts' at element granularity): read the row span once, then gather
        ``src[rows, start:stop:step]`` packed row-major into ``dst`` (uint8, ``op.nbytes``)."""
        rows, cols = op.src_shape
        isz = op.itemsize
        r0, r1 = op.rows
        c0, _, step = op.cols
        row_bytes = cols * isz
        first, last = c0 * isz, (c0 + (op.ncols - 1) * step + 1) * isz
        span_rows = r1 - r0
        span = (span_rows - 1) * row_bytes + (last - first)
        buf = torch.empty(span, dtype=torch.uint8)
        self._pread_into_mv(memoryview(buf.numpy()).cast("B"), op.src_offset + r0 * row_bytes + first)
        with self._lock:
            self.bytes_read += span
        src = torch.as_strided(buf, (span_rows, op.ncols, isz), (row_bytes, step * isz, 1))
        dst.view(span_rows, op.ncols, isz).copy_(src)


class _Cancelled(Exception):
    """Internal: a pipeline stage stopped because the load failed elsewhere."""


class TransferEngine:
    """Runs loads one at a time (the manager's loader thread calls ``run``).

    Cold pipeline, per chunk in order: a pinner thread allocates the chunk's host buffer (pinned on
    CUDA; the cache's buffer when the adapter is cached, a ring buffer when streamed), ``read_workers``
    reader threads fill buffers from the file (pread releases the GIL, so reads of several chunks run in
    parallel), and the loader thread issues one H2D copy per chunk plus one placement copy per
    (module, side). At most ``read_workers + 1`` chunks are ahead of the copy (``ring_slots`` when
    streamed), so host memory in flight stays bounded.
    """

    def __init__(self, device: Device, pool: GpuPool, cache: PinnedCache, *, chunk_bytes: int = 16 << 20,
                 ring_slots: int = 3, read_workers: int = 4, pin_workers: int = 1,
                 part_bytes: int | None = None):
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.device, self.pool, self.cache = device, pool, cache
        self.chunk_bytes = chunk_bytes
        self.ring_slots = max(2, ring_slots)
        self.read_workers = max(1, read_workers)
        self.pin_workers = max(1, pin_workers)
        # the cold pipeline's unit: a chunk (the cache, H2D-when-warm and placement unit) is read and
        # copied part by part, so a few large chunks still pipeline finely
        self.part_bytes = part_bytes if part_bytes is not None else max(4096, chunk_bytes // 8)
        self._staging: torch.Tensor | None = None
        self._ring: list[torch.Tensor] = []
        self._readers = cf.ThreadPoolExecutor(self.read_workers, thread_name_prefix="tp_lora-read")
        self._pinner = cf.ThreadPoolExecutor(self.pin_workers, thread_name_prefix="tp_lora-pin")
        self._stat_lock = threading.Lock()
        self.peak_inflight_bytes = 0  # host bytes in flight beyond the cache, high-water mark

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        self._pinner.shutdown(wait=True)

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

    def _place_views(self, chunk: Chunk, src: torch.Tensor, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for g in chunk.groups:
            dt = safetensors_torch(g.dtype)
            r, c = g.shape
            row0 = getattr(chunk, "row0", 0)  # a _Piece: rows [row0, row0 + r) of its slice
            part = src[g.byte_offset:g.byte_offset + g.nbytes].view(dt).view(g.count, r, c)
            dst = self.pool.block(g.module, g.side, slot)
            if g.flat_start + g.count > dst.shape[0] or row0 + r > dst.shape[1] or c > dst.shape[2]:
                raise AssertionError(f"planned block {g} does not fit pool buffer {tuple(dst.shape)}")
            pairs.append((dst[g.flat_start:g.flat_start + g.count, row0:row0 + r, :c], part))
        return pairs

    def _place(self, chunk: Chunk, src: torch.Tensor, slot: int, check_finite: bool,
               oks: list[torch.Tensor], memo: dict | None = None) -> None:
        """Strided copies (with the cast to the pool dtype) from a packed chunk into the slot.

        On CUDA the source is the staging buffer, so the (destination, source) views are the same for
        every load of this plan into this slot: they are memoised, and a warm activation only launches
        copies (the launch rate, not Python, then bounds small chunks)."""
        if memo is not None and not hasattr(chunk, "row0"):
            key = ("place", id(self.pool), slot, src.data_ptr(), chunk.index, self.chunk_bytes)
            pairs = memo.get(key)
            if pairs is None:
                pairs = memo[key] = self._place_views(chunk, src, slot)
        else:
            pairs = self._place_views(chunk, src, slot)
        mixed = len({g.dtype for g in chunk.groups}) > 1
        for dst, part in pairs:
            dst.copy_(part)
            if check_finite and mixed:
                oks.append(torch.isfinite(part).all())
        if check_finite and not mixed and chunk.nbytes:
            # one dtype: the chunk is packed without padding, so one check covers every slice
            oks.append(torch.isfinite(src[:chunk.nbytes].view(safetensors_torch(chunk.groups[0].dtype))).all())

    # -- the load --------------------------------------------------------------------------------
    def run(self, job: LoadJob) -> LoadResult:
        t0 = time.perf_counter()
        plan, header = job.plan, job.header
        chunks = plan.chunks(self.chunk_bytes, self.part_bytes)
        sizes = tuple(c.nbytes for c in chunks)
        stats = LoadStats(adapter=header.name, bytes_planned=plan.nbytes, chunks=len(chunks))
        entry = self.cache.lookup(header.name, header.fingerprint, sizes)
        dev = self.device
        stream_ctx = torch.cuda.stream(dev.copy_stream) if dev.is_cuda else _null()
        start_ev = end_ev = None
        oks: list[torch.Tensor] = []
        try:
            with stream_ctx:
                if dev.is_cuda:
                    if job.after is not None:
                        dev.copy_stream.wait_event(job.after)
                    start_ev = torch.cuda.Event(enable_timing=True)
                    end_ev = torch.cuda.Event(enable_timing=True)
                    start_ev.record(dev.copy_stream)
                cov = plan._memo.get(("coverage", id(self.pool)))
                if cov is None:
                    cov = plan._memo[("coverage", id(self.pool))] = self.pool.coverage(plan.ops)
                self.pool.clear_slot(job.slot, cov)
                # the slot is reserved (no batch can use it before activation): set its scalings here,
                # on the copy stream, so activation issues no host-to-device copy on the compute stream
                self.pool.set_scalings(job.slot, plan.scalings, non_blocking=True, memo=plan._memo)
                if entry is not None:
                    stats.warm = True
                    for chunk, buf in zip(chunks, entry.buffers):
                        assert buf is not None
                        self._h2d_and_place(job, chunk, buf, stats, oks)
                else:
                    self._run_cold(job, chunks, sizes, stats, oks)
                bad: Any = ~torch.stack(oks).all() if oks else None
                if dev.is_cuda:
                    end_ev.record(dev.copy_stream)
                stats.enqueue_s = time.perf_counter() - t0
        except BaseException:
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
        return LoadResult(event=end_ev, stats=stats, bad_values=bad)

    def _h2d_and_place(self, job: LoadJob, chunk: Chunk, host: torch.Tensor, stats: LoadStats,
                       oks: list[torch.Tensor], start: int = 0, end: int | None = None,
                       place: bool = True) -> None:
        """H2D of bytes [start, end) of the chunk (all of it by default) into the staging buffer; once
        the chunk's last bytes are there (``place``), its slices are placed into the slot."""
        end = chunk.nbytes if end is None else end
        if self.device.is_cuda:
            dev_buf = self._staging_for(chunk.nbytes)
            if end > start:
                dev_buf[start:end].copy_(host[start:end], non_blocking=True)
            src = dev_buf
        else:
            src = host[:chunk.nbytes]
        stats.bytes_copied += end - start
        if not place:
            return
        if job.fault is not None:
            job.fault("h2d", chunk.index)
        # a warm load copies bytes that were checked when first read (a load that found NaN/Inf is
        # evicted from the cache), so only cold loads check
        self._place(chunk, src, job.slot, job.check_finite and not stats.warm, oks,
                    memo=job.plan._memo if self.device.is_cuda else None)

    def _ring_pieces(self, plan: SlicePlan, chunks: list[Chunk]) -> list[Chunk]:
        """A streamed load holds at most ``ring_slots`` host buffers of ``chunk_bytes``: a chunk larger than
        that (a single slice bigger than a chunk) is cut into row ranges, each read, copied and placed on
        its own, so ``inflight_bound`` holds (unless one row alone exceeds ``chunk_bytes``)."""
        out: list[Chunk] = []
        for ch in chunks:
            if ch.nbytes <= self.chunk_bytes or len(ch.ops) != 1:
                out.append(ch)
                continue
            op = ch.ops[0]
            rows = max(1, self.chunk_bytes // max(1, op.ncols * op.itemsize))
            for i in range(0, op.nrows, rows):
                sub = dataclasses.replace(op, rows=(op.rows[0] + i, op.rows[0] + min(op.nrows, i + rows)))
                c = plan._make_chunk(ch.index, [sub])  # the planner's packing and read runs of the piece
                out.append(_Piece(**{f.name: getattr(c, f.name) for f in dataclasses.fields(Chunk)}, row0=i))
        return out

    def _run_cold(self, job: LoadJob, chunks: list[Chunk], sizes: tuple[int, ...], stats: LoadStats,
                  oks: list[torch.Tensor]) -> None:
        header = job.header
        rd = SliceReader(header)  # before reserving cache budget: it raises if the file vanished or changed
        entry = self.cache.begin(header.name, header.fingerprint, sizes, tuple(job.plan.cache_keys()))
        stats.streamed = entry is None
        free_ring: queue.Queue = queue.Queue()
        if entry is None:
            chunks = self._ring_pieces(job.plan, chunks)
            need = max((c.nbytes for c in chunks), default=0)
            if len(self._ring) < self.ring_slots or any(b.numel() < need for b in self._ring):
                self._ring = [self.device.alloc_host(max(need, self.chunk_bytes)) for _ in range(self.ring_slots)]
                stats.bytes_pinned += sum(b.numel() for b in self._ring) if self.device.is_cuda else 0
            for b in self._ring:
                free_ring.put((b, None))
        # units ahead of the copy: the ring bounds a streamed load; a cached one keeps the readers busy
        window = self.read_workers + 1 if entry is not None else self.ring_slots
        cancelled = threading.Event()
        lock = self._stat_lock

        def get_buf(chunk: Chunk) -> torch.Tensor:  # pinner thread
            if cancelled.is_set():
                raise _Cancelled()
            if entry is not None:
                t = time.perf_counter()
                buf = self.cache.alloc_chunk(entry, chunk.index)
                with lock:
                    stats.alloc_s += time.perf_counter() - t
                    stats.bytes_pinned += buf.numel() if self.device.is_cuda else 0
                return buf
            while True:
                try:
                    buf, ev = free_ring.get(timeout=0.05)
                    break
                except queue.Empty:
                    if cancelled.is_set():
                        raise _Cancelled() from None
            Device.sync_event(ev)  # the H2D that last read this ring slot is done
            return buf

        def fill(chunk: Chunk, part: Any, buf_f: cf.Future) -> torch.Tensor:  # reader threads
            buf = buf_f.result()
            if cancelled.is_set():
                raise _Cancelled()
            t = time.perf_counter()
            rd.read_part(chunk, part, buf)
            if job.fault is not None and (part is None or part is chunk.parts[-1]):
                job.fault("read", chunk.index)
            with lock:
                stats.read_s += time.perf_counter() - t
            return buf

        # pipeline units: the parts of each chunk (cached loads), whole chunks when streamed
        units: list[tuple[Chunk, Any, bool]] = []
        for c in chunks:
            if entry is not None and c.parts:
                units += [(c, p, p is c.parts[-1]) for p in c.parts]
            else:
                units.append((c, None, True))
        buf_futs: dict[int, cf.Future] = {}
        pending: deque = deque()

        def submit(i: int) -> None:
            chunk, part, last = units[i]
            # the parts of one chunk share its buffer; whole-chunk units (streamed ring buffers, whose
            # row pieces may share a chunk index) each get their own
            key = ("chunk", chunk.index) if part is not None else ("unit", i)
            bf = buf_futs.get(key)
            if bf is None:
                bf = buf_futs[key] = self._pinner.submit(get_buf, chunk)
            pending.append((chunk, part, last, bf, self._readers.submit(fill, chunk, part, bf)))

        nxt = min(window, len(units))
        for i in range(nxt):
            submit(i)
        ok = False
        try:
            while pending:
                chunk, part, last, _, rf = pending.popleft()
                tw = time.perf_counter()
                try:
                    buf = rf.result()
                except AdapterError:
                    raise
                except (OSError, ValueError, RuntimeError) as e:
                    raise AdapterDataError(f"reading slices failed: {type(e).__name__}: {e}",
                                           adapter=header.name, path=header.weights_path) from e
                ti = time.perf_counter()
                stats.wait_s += ti - tw
                if entry is None:
                    self.peak_inflight_bytes = max(self.peak_inflight_bytes, self.ring_slots * buf.numel())
                if part is None:
                    self._h2d_and_place(job, chunk, buf, stats, oks)
                else:
                    self._h2d_and_place(job, chunk, buf, stats, oks, part.start, part.end, place=last)
                stats.issue_s += time.perf_counter() - ti
                if entry is None:
                    ev = None
                    if self.device.is_cuda:
                        ev = torch.cuda.Event()
                        ev.record(self.device.copy_stream)
                    free_ring.put((buf, ev))
                if nxt < len(units):
                    submit(nxt)
                    nxt += 1
            ok = True
        finally:
            cancelled.set()
            for _, _, _, bf, rf in pending:  # let the stages of chunks not copied finish or stop
                for f in (rf, bf):
                    try:
                        f.result()
                    except BaseException:  # noqa: BLE001 - the load already failed
                        pass
            stats.bytes_read += rd.bytes_read
            rd.close()
            if entry is not None:
                ev = None
                if self.device.is_cuda and ok:
                    ev = torch.cuda.Event()
                    ev.record(self.device.copy_stream)
                self.cache.finish(entry, ok, ev)


@dataclass(frozen=True)
class _Piece(Chunk):
    """Rows [row0, row0 + nrows) of a chunk's single slice (streamed loads of slices > chunk_bytes)."""

    row0: int = 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None

"""What one load did: bytes (planned, read, pinned, copied) and where the time went."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoadStats:
    adapter: str
    warm: bool = False
    streamed: bool = False
    bytes_planned: int = 0  # bytes owned by this rank (== what the cache holds for it)
    bytes_read: int = 0  # bytes read from the file (> planned where span reads were cheaper)
    bytes_pinned: int = 0  # pinned (arena) bytes this load took for cache entries and the ring
    bytes_copied: int = 0
    chunks: int = 0
    syscalls: int = 0  # reads issued (preadv of scatter runs + span reads)
    ring_reads: int = 0  # of syscalls: reads submitted through io_uring (a part's direct reads at once)
    native_parts: int = 0  # units whose direct reads ran in the C loop (host/native.py), without the GIL
    batched: bool = False  # read by the C batch: one call per reader thread, parts copied as they complete
    header_checked: bool = False  # a cold load read and hashed the header (the file is not settled)
    span_ops: int = 0  # slices read as spans (strided columns, or short rows by the cost model)
    readers: int = 0  # reader threads of the pipeline
    read_s: float = 0.0  # reader thread time (read + slice + pack, incl. allocation)
    alloc_s: float = 0.0  # host (pinned) allocation time inside read_s
    h2d_s: float = 0.0  # device time of the H2D copies + placement (events on CUDA)
    total_s: float = 0.0  # wall time of the load, from start to the end of the last device copy
    queued_s: float = 0.0  # from prefetch/activate submitting the job to the loader starting it
    enqueue_s: float = 0.0  # loader: from start to the last copy enqueued
    sync_s: float = 0.0  # loader: waiting for the copy stream to finish after the last enqueue
    wait_s: float = 0.0  # loader thread waiting for the next chunk to be read (cold)
    issue_s: float = 0.0  # loader thread issuing H2D + placement copies
    h2d_calls: int = 0  # H2D copies a cold load issued (parts already read are copied together)
    place_s: float = 0.0  # of issue_s: issuing the placements (one kernel launch per chunk on CUDA)
    bytes_mapped: int = 0  # copied to the device straight from the page cache (device/mapper.py), no host copy
    mapped_chunks: int = 0
    map_s: float = 0.0  # the mapper thread's time in this load (map, check residency, pin, issue copies)
    map_wait_s: float = 0.0  # of map_s: waiting for a staging buffer (the loader had not placed from it yet)
    map_register_s: float = 0.0  # of map_s: pinning the page-cache pages in place
    map_issue_s: float = 0.0  # of map_s: issuing the copies

    @property
    def h2d_gbps(self) -> float:
        return self.bytes_copied / self.h2d_s / 1e9 if self.h2d_s > 0 else 0.0

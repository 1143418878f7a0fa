"""ManagerStats and their recorder: counters written by the engine and loader threads, read from any
thread (a metrics exporter calls ``stats()`` while the engine registers and activates).

All writes and the snapshot take one lock; the snapshot copies lists, so a reader never iterates a
container another thread mutates ("dictionary changed size during iteration").
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

from ..device.transfer import LoadStats


@dataclass
class ManagerStats:
    rank: int
    registered: int = 0
    active: list[str] = field(default_factory=list)
    loads: int = 0
    warm_loads: int = 0
    cold_loads: int = 0
    streamed_loads: int = 0
    failed_loads: int = 0
    bytes_planned: int = 0
    bytes_full: int = 0  # what pinning whole tensors on every rank would cost
    bytes_read: int = 0
    bytes_pinned: int = 0
    bytes_copied: int = 0
    h2d_s: float = 0.0
    read_s: float = 0.0
    pinned_bytes_now: int = 0
    pinned_planned_now: int = 0
    pinned_reserved_bytes: int = 0  # arena slabs (pinned on CUDA), reserved ahead and reused
    pinned_free_bytes: int = 0  # reserved but free
    pinned_reserve_s: float = 0.0  # time spent reserving (pinning) them, mostly in the background
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    slot_evictions: int = 0
    activations: int = 0
    failed_activations: int = 0
    collectives: int = 0
    peak_inflight_bytes: int = 0
    inflight_bound: int = 0
    in_doubt: list[str] = field(default_factory=list)  # adapters waiting for attach_group to resolve them
    activation_s: list[tuple[str, bool, float]] = field(default_factory=list)  # (name, warm, seconds)
    load_stats: list[dict] = field(default_factory=list)

    @property
    def h2d_gbps(self) -> float:
        return self.bytes_copied / self.h2d_s / 1e9 if self.h2d_s > 0 else 0.0


class StatsRecorder:
    """The manager's counters behind one lock."""

    def __init__(self, rank: int):
        self._lock = threading.Lock()
        self._s = ManagerStats(rank=rank)

    def load(self, s: LoadStats) -> None:
        with self._lock:
            st = self._s
            st.loads += 1
            st.warm_loads += s.warm
            st.cold_loads += not s.warm
            st.streamed_loads += s.streamed
            st.bytes_planned += s.bytes_planned
            st.bytes_read += s.bytes_read
            st.bytes_pinned += s.bytes_pinned
            st.bytes_copied += s.bytes_copied
            st.h2d_s += s.h2d_s
            st.read_s += s.read_s
            st.load_stats.append(dataclasses.asdict(s))
            del st.load_stats[:-256]

    def failed_load(self) -> None:
        with self._lock:
            self._s.failed_loads += 1

    def activation(self, ok: bool, collectives: int, done: list[tuple[str, bool, float]] = ()) -> None:
        with self._lock:
            st = self._s
            st.collectives = collectives
            if not ok:
                st.failed_activations += 1
            st.activations += len(done)
            st.activation_s.extend(done)
            del st.activation_s[:-4096]

    def publish(self, registered: int, active: list[str], in_doubt: list[str], bytes_full: int) -> None:
        """The manager's view after each state change (so a reader never walks the adapter table)."""
        with self._lock:
            st = self._s
            st.registered, st.active, st.in_doubt, st.bytes_full = registered, active, in_doubt, bytes_full

    def snapshot(self, **live: float) -> ManagerStats:
        with self._lock:
            st = dataclasses.replace(self._s, **live)
            st.active, st.in_doubt = list(self._s.active), list(self._s.in_doubt)
            st.activation_s, st.load_stats = list(self._s.activation_s), list(self._s.load_stats)
            return st

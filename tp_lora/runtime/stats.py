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
class ActivationPhases:
    """Where one successful activation's time went on this rank (seconds, ``time.perf_counter``).

    ``start_s``: validation, slot choice and submitting the loads; ``await_s``: waiting for this rank's
    loads; ``agree_s``: the verdict (and, with peers, commit) exchange; ``commit_s``: committing the
    slots; they add up to ``total_s``. ``load_s``: the loads this call waited for, one after another on
    the loader thread (a prefetched one may have begun before the call); ``queued_s``: how long the first
    of them waited, from its submission (inside ``start_s``) until the loader thread took it up;
    ``wake_s``: from the last load's hand-back on the loader thread to the calling thread's wake-up. What
    ``total_s`` has beyond ``load_s`` is what the activation protocol costs an engine per call: the
    handoffs to the loader thread and back, the checks around a load, the exchanges."""

    adapters: list[str]
    start_s: float
    await_s: float
    agree_s: float
    commit_s: float
    total_s: float
    load_s: float
    queued_s: float
    wake_s: float = 0.0


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
    activation_phases: list[ActivationPhases] = field(default_factory=list)  # the latest 256 that committed

    @property
    def h2d_gbps(self) -> float:
        return self.bytes_copied / self.h2d_s / 1e9 if self.h2d_s > 0 else 0.0


class StatsRecorder:
    """The manager's counters behind one lock."""

    def __init__(self, rank: int):
        self._lock = threading.Lock()
        self._s = ManagerStats(rank=rank)
        self._loads: list[LoadStats] = []

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
            self._loads.append(s)  # made a dict at the next snapshot: not on the loader's critical path
            if len(self._loads) > 512:
                del self._loads[:-256]

    def failed_load(self) -> None:
        with self._lock:
            self._s.failed_loads += 1

    def activation(self, ok: bool, collectives: int, done: list[tuple[str, bool, float]] = (),
                   phases: ActivationPhases | None = None) -> None:
        with self._lock:
            st = self._s
            st.collectives = collectives
            if not ok:
                st.failed_activations += 1
            st.activations += len(done)
            st.activation_s.extend(done)
            del st.activation_s[:-4096]
            if phases is not None:
                st.activation_phases.append(phases)
                del st.activation_phases[:-256]

    def publish(self, registered: int, active: list[str], in_doubt: list[str], bytes_full: int) -> None:
        """The manager's view after each state change (so a reader never walks the adapter table)."""
        with self._lock:
            st = self._s
            st.registered, st.active, st.in_doubt, st.bytes_full = registered, active, in_doubt, bytes_full

    def snapshot(self, **live: float) -> ManagerStats:
        with self._lock:
            if self._loads:
                self._s.load_stats.extend(dataclasses.asdict(x) for x in self._loads[-256:])
                self._loads.clear()
                del self._s.load_stats[:-256]
            st = dataclasses.replace(self._s, **live)
            st.active, st.in_doubt = list(self._s.active), list(self._s.in_doubt)
            st.activation_s, st.load_stats = list(self._s.activation_s), list(self._s.load_stats)
            st.activation_phases = list(self._s.activation_phases)
            return st

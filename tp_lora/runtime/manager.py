"""LoRAManager: the engine-facing API, one per rank process.

    register(name, path)   header + plan only, no tensor bytes, no collective
    prefetch(name)         background load: slot reserved now, pinned cache + copy stream; no collective
    activate(names)        wait for this rank's loads, then ONE collective: all ranks commit or all roll back
    prepare_batch(...)     BatchInfo for the layer ops; holds slot references until released
    stats()                this rank's counters; aggregate_stats() gathers them (a collective, off the load path)

Calls must come from one engine thread, in the same order on every rank (as an engine's scheduler does):
slot allocation is deterministic, and activation checks that every rank picked the same slot.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .activation import Collective, RankVerdict, agree, raise_for
from ..format.adapter import AdapterHeader
from ..plan.validate import AdapterSource
from ..format.dtypes import serving_dtype, serving_names
from .batch import BatchInfo, build_batch
from ..errors import (AdapterActivationError, AdapterError, AdapterStateError, ConfigError,
                     TPLoRAError)
from ..plan.model import ModelSpec
from ..format.modules import POOL_MODULES
from ..plan.layout import RankLayout
from ..plan.parallel import ParallelSpec
from ..host.pinned_cache import PinnedCache
from ..plan.planner import SlicePlan, plan_rank
from ..device.pool import GpuPool
from ..device.transfer import Device, LoadJob, LoadResult, LoadStats, TransferEngine
from ..host.memory import HostArena

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Per-rank manager settings."""

    max_loras: int = 4
    """GPU slots: adapters usable in batches at once."""
    max_lora_rank: int = 64
    """Slot rank; smaller adapters are zero-padded, larger ones are refused at register."""
    target_modules: tuple[str, ...] = POOL_MODULES
    """Pool modules to allocate (canonical names; those the model lacks are skipped)."""
    host_cache_bytes: int = 8 << 30
    """Budget of the pinned host cache (this rank's slices of cached adapters)."""
    dtype: str = "bfloat16"
    """Serving dtype of the pool; adapters in other float dtypes are cast on the device."""
    device: str = "cpu"
    chunk_bytes: int = 64 << 20
    """Cache and placement unit: a warm activation is one H2D copy per chunk (64 MiB copies reach the
    PCIe peak; 4 MiB ones about half of it) and one device copy per (module, side) in it."""
    part_bytes: int | None = None
    """Cold pipeline unit (default chunk_bytes / 8): read+pack of part n+1 overlaps the H2D of part n."""
    ring_slots: int = 3
    """Host buffers for streamed (uncached) adapters: in-flight bound = ring_slots * chunk_bytes."""
    read_workers: int | None = None
    """Reader threads of the cold pipeline (preadv releases the GIL: parts are read in parallel); None:
    one per core this process may run on."""
    read_mode: str = "auto"
    """How slices of many short rows are read: "exact" (only owned bytes, one syscall per row), "span"
    (the row range once, then sliced), "auto" (a cost model per slice). The cache holds owned bytes only."""
    pin_workers: int = 2
    """Threads allocating (pinning) chunk buffers ahead of the readers."""
    activation_timeout_s: float = 60.0
    check_finite: bool = True
    """Reject adapters holding NaN/Inf (checked on the device as data arrives)."""
    allow_pickle: bool = False
    pin_mode: str = "register"
    """CUDA host memory for the cache: "register" (anonymous huge-page mapping + cudaHostRegister:
    pinned bytes == requested bytes, ~2x faster to pin here) or "caching" (torch's pinned caching
    allocator, which rounds each request up to a power of two)."""

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ConfigError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.host_cache_bytes < 0:
            raise ConfigError(f"host_cache_bytes must be >= 0, got {self.host_cache_bytes}")
        if self.read_mode not in ("auto", "exact", "span"):
            raise ConfigError(f"read_mode must be 'auto', 'exact' or 'span', got {self.read_mode!r}")
        if self.read_workers is not None and self.read_workers < 1:
            raise ConfigError(f"read_workers must be >= 1, got {self.read_workers}")
        if self.chunk_bytes < 4096:
            raise ConfigError(f"chunk_bytes must be >= 4096, got {self.chunk_bytes}")
        if self.dtype not in serving_names():
            raise ConfigError(f"dtype {self.dtype!r} is not one of {serving_names()}")
        bad = [m for m in self.target_modules if m not in POOL_MODULES]
        if bad:
            raise ConfigError(f"unknown target module(s) {bad}; known: {list(POOL_MODULES)}")
        if self.activation_timeout_s <= 0:
            raise ConfigError("activation_timeout_s must be > 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return serving_dtype(self.dtype)


@dataclass
class _Adapter:
    name: str
    path: str
    header: AdapterHeader
    plan: SlicePlan
    generation: int
    state: str = "registered"  # registered | loading | active
    slot: int | None = None
    future: cf.Future | None = None
    error: str = ""
    activations: int = 0


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
    activation_s: list[tuple[str, bool, float]] = field(default_factory=list)  # (name, warm, seconds)
    load_stats: list[dict] = field(default_factory=list)

    @property
    def h2d_gbps(self) -> float:
        return self.bytes_copied / self.h2d_s / 1e9 if self.h2d_s > 0 else 0.0


class LoRAManager:
    """Per-rank LoRA runtime. See the module docstring for the call contract."""

    def __init__(self, config: LoRAConfig, model: ModelSpec, parallel: ParallelSpec | RankLayout, *,
                 group: Any = None):
        self.layout = RankLayout.of(model, parallel)  # validated once, here
        self.config, self.model, self.parallel = config, model, self.layout.parallel
        self.device = Device(config.device, pin_mode=config.pin_mode)
        self.pool = GpuPool(model, self.layout, max_loras=config.max_loras, max_rank=config.max_lora_rank,
                            modules=config.target_modules, dtype=config.torch_dtype, device=self.device.device)
        # pinned host memory: one arena (cache budget + streamed ring), reserved ahead and reused
        self.arena = HostArena(self.device, config.host_cache_bytes + max(2, config.ring_slots) * config.chunk_bytes,
                               slab_bytes=max(config.chunk_bytes, 256 << 20), workers=config.pin_workers)
        self.cache = PinnedCache(config.host_cache_bytes, self.arena.alloc, Device.sync_event, free=self.arena.free)
        self.engine = TransferEngine(self.device, self.pool, self.cache, chunk_bytes=config.chunk_bytes,
                                     ring_slots=config.ring_slots, read_workers=config.read_workers,
                                     pin_workers=config.pin_workers, part_bytes=config.part_bytes,
                                     read_mode=config.read_mode, arena=self.arena)
        self.collective = Collective(group, self.device.device, config.activation_timeout_s)
        self.rank = self.collective.rank
        self._adapters: dict[str, _Adapter] = {}
        self._loader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tp_lora-load-r{self.rank}")
        self._stats = ManagerStats(rank=self.rank)
        self._stats_lock = threading.Lock()
        self._closed = False
        #: test hook: callable(adapter, stage, chunk_index) that may raise, to inject faults mid-transfer
        self.fault_hook: Callable[[str, str, int], None] | None = None
        log.debug("[rank %d] LoRAManager: %d slots x %d MiB, modules %s", self.rank, config.max_loras,
                  self.pool.slot_bytes() >> 20, list(self.pool.modules))

    # ---------------------------------------------------------------------------------------------
    # registration
    # ---------------------------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike[str], *, replace: bool = False) -> SlicePlan:
        """Read the header, validate it against the model, plan this rank's slices. No tensor bytes."""
        self._check_open()
        if not isinstance(name, str) or not name or "/" in name:
            raise AdapterStateError(f"adapter name must be a non-empty string without '/', got {name!r}")
        header = AdapterSource.open(path, self.model, name=name, max_rank=self.config.max_lora_rank,
                                    allow_pickle=self.config.allow_pickle)
        plan = plan_rank(header, self.model, self.layout, pool_modules=set(self.pool.modules))
        old = self._adapters.get(name)
        if old is not None:
            if old.header.fingerprint == header.fingerprint and not replace:
                return old.plan
            if not replace:
                raise AdapterStateError(f"adapter {name!r} is already registered from {old.path} with other "
                                        f"contents; pass replace=True to replace it")
            self.unregister(name)
        # the generation names the registered contents (not a count of register calls): ranks whose
        # register calls failed differently still agree once they hold the same files
        gen = int(header.fingerprint[:5], 16)
        self._adapters[name] = _Adapter(name, str(path), header, plan, gen)
        self.engine.expect(plan, sum(a.plan.nbytes for a in self._adapters.values()))
        with self._stats_lock:
            self._stats.registered = len(self._adapters)
        log.debug("[rank %d] registered %s: %d slices, %d bytes", self.rank, name, len(plan.ops), plan.nbytes)
        return plan

    def unregister(self, name: str) -> None:
        a = self._get(name)
        if a.slot is not None and self.pool.refcount[a.slot]:
            raise AdapterStateError(f"adapter {name!r} is used by {self.pool.refcount[a.slot]} running "
                                    f"batch(es); release them first")
        self._settle(a)
        if a.slot is not None and self.pool.slot_name[a.slot] == name:
            self.pool.free(a.slot)
        self.cache.evict(name)
        del self._adapters[name]
        with self._stats_lock:
            self._stats.registered = len(self._adapters)

    def registered(self) -> list[str]:
        return list(self._adapters)

    def is_active(self, name: str) -> bool:
        a = self._adapters.get(name)
        return a is not None and a.state == "active"

    def slot_of(self, name: str) -> int | None:
        a = self._adapters.get(name)
        return a.slot if a is not None and a.state == "active" else None

    def plan(self, name: str) -> SlicePlan:
        return self._get(name).plan

    # ---------------------------------------------------------------------------------------------
    # loading
    # ---------------------------------------------------------------------------------------------
    def prefetch(self, name: str) -> cf.Future:
        """Start this rank's load of ``name`` into a GPU slot in the background; return at once.

        Reserves a slot now (free first, else the least recently used slot no batch holds; that
        adapter is evicted). Raises NoFreeSlotError if every slot is busy.
        """
        self._check_open()
        a = self._get(name)
        if a.state in ("active", "loading"):
            assert a.future is not None or a.state == "active"
            return a.future if a.future is not None else _done_future(None)
        slot, victim = self.pool.choose_slot()
        if victim is not None:
            v = self._adapters.get(victim)
            if v is not None:
                v.state, v.slot, v.future = "registered", None, None
            log.debug("[rank %d] slot %d: evicting %s for %s", self.rank, slot, victim, name)
        after = self.device.compute_event()  # batches that read the slot before must finish first
        self.pool.reserve(slot, name)
        a.state, a.slot, a.error = "loading", slot, ""
        hook = self.fault_hook
        job = LoadJob(header=a.header, plan=a.plan, slot=slot, after=after,
                      check_finite=self.config.check_finite,
                      fault=(lambda stage, i, _n=name: hook(_n, stage, i)) if hook else None)
        job.submitted = time.perf_counter()
        a.future = self._loader.submit(self._run_load, job)
        return a.future

    def _run_load(self, job: LoadJob) -> LoadResult:
        try:
            res = self.engine.run(job)
        except BaseException:
            with self._stats_lock:
                self._stats.failed_loads += 1
            raise
        self._record_load(res.stats)
        return res

    def _record_load(self, s: LoadStats) -> None:
        with self._stats_lock:
            st = self._stats
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

    def _settle(self, a: _Adapter) -> None:
        """Wait for an in-flight load of ``a`` (its result is not used)."""
        if a.future is not None and a.state == "loading":
            try:
                a.future.result()
            except BaseException:  # noqa: BLE001
                pass

    # ---------------------------------------------------------------------------------------------
    # activation: the one collective
    # ---------------------------------------------------------------------------------------------
    def activate(self, names: str | Sequence[str]) -> dict[str, int]:
        """Make ``names`` usable in batches on every rank. Returns adapter -> slot.

        Waits for this rank's loads, then one all-reduce. All ranks commit, or all roll back (slots
        freed, adapters back to registered) and raise the same AdapterActivationError. Adapters
        already active are untouched.
        """
        self._check_open()
        names = [names] if isinstance(names, str) else list(names)
        if len(set(names)) != len(names):
            raise AdapterStateError(f"duplicate names in activate({names})")
        t0 = time.perf_counter()
        verdicts: list[RankVerdict] = []
        started: list[_Adapter] = []
        results: dict[str, LoadResult] = {}
        # the adapters of this call that are already active must not become eviction victims of the others
        # (a reference for the duration of the slot choices; the same on every rank)
        held = [a.slot for n in names if (a := self._adapters.get(n)) is not None and a.state == "active"
                and a.slot is not None]
        for s in held:
            self.pool.acquire(s)
        try:
            for n in names:
                a = self._adapters.get(n)
                if a is None:
                    verdicts.append(RankVerdict(False, -1, 0, f"adapter {n!r} is not registered on this rank"))
                    continue
                if a.state == "active":
                    verdicts.append(RankVerdict(True, a.slot if a.slot is not None else -1, a.generation,
                                                fingerprint=_fingerprint(a)))
                    continue
                try:
                    if a.state != "loading":
                        self.prefetch(n)
                    started.append(a)
                except TPLoRAError as e:
                    verdicts.append(RankVerdict(False, -1, a.generation, _short(e)))
                    continue
                verdicts.append(RankVerdict(True, a.slot, a.generation, fingerprint=_fingerprint(a)))
        finally:
            for s in held:
                self.pool.release(s)
        started_names = {a.name for a in started}
        # wait for this rank's transfers (the loader thread; the compute stream is not blocked)
        for i, n in enumerate(names):
            a = self._adapters.get(n)
            if a is None or n not in started_names:
                continue
            try:
                res = a.future.result()
                results[n] = res
                if res.bad_values is not None and bool(res.bad_values):
                    raise_bad = (f"AdapterDataError: NaN/Inf values in {os.path.basename(a.header.weights_path)} "
                                 f"(check_finite=True)")
                    verdicts[i] = RankVerdict(False, a.slot, a.generation, raise_bad)
                    self.cache.evict(n)  # do not keep known-bad data pinned (a retry reads the file again)
            except BaseException as e:  # noqa: BLE001 - every failure becomes a verdict
                verdicts[i] = RankVerdict(False, a.slot if a.slot is not None else -1, a.generation,
                                          _short(e))
                a.error = str(e)
        try:
            agreement = agree(self.collective, names, verdicts)
        except AdapterActivationError:
            self._rollback(started)
            with self._stats_lock:
                self._stats.failed_activations += 1
                self._stats.collectives = self.collective.calls
            raise
        with self._stats_lock:
            self._stats.collectives = self.collective.calls
        if not agreement.ok:
            self._rollback(started)
            with self._stats_lock:
                self._stats.failed_activations += 1
            log.warning("[rank %d] %s", self.rank, agreement.message(names))
            raise_for(agreement, names)
        out: dict[str, int] = {}
        dt = time.perf_counter() - t0
        for n in names:
            a = self._adapters[n]
            if n in started_names:
                res = results[n]
                self.device.wait_on_compute(res.event)  # an event wait on the compute stream only
                self.pool.commit(a.slot)
                a.state, a.future = "active", None
                a.activations += 1
                with self._stats_lock:
                    self._stats.activations += 1
                    self._stats.activation_s.append((n, res.stats.warm, dt))
                    del self._stats.activation_s[:-4096]
            out[n] = a.slot
        return out

    def _rollback(self, started: list[_Adapter]) -> None:
        for a in started:
            self._settle(a)
            if a.slot is not None and self.pool.slot_name[a.slot] == a.name:
                self.pool.free(a.slot)
            a.state, a.slot, a.future = "registered", None, None

    # ---------------------------------------------------------------------------------------------
    # batches
    # ---------------------------------------------------------------------------------------------
    def prepare_batch(self, adapters: Sequence[str | None],
                      tokens_per_request: Sequence[int] | None = None) -> BatchInfo:
        """Batch metadata for requests using ``adapters`` (None = base model), in order.

        Every named adapter must be active. The returned BatchInfo holds a reference on each slot it
        uses until ``release()`` (or the end of a ``with`` block).
        """
        adapters = list(adapters)
        tokens = [1] * len(adapters) if tokens_per_request is None else [int(t) for t in tokens_per_request]
        if len(tokens) != len(adapters):
            raise AdapterStateError(f"{len(adapters)} requests but {len(tokens)} token counts")
        if any(t < 0 for t in tokens):
            raise AdapterStateError(f"negative token count in {tokens}")
        slots: list[int] = []
        for n in adapters:
            if n is None:
                slots.append(-1)
                continue
            a = self._adapters.get(n)
            if a is None or a.state != "active":
                raise AdapterStateError(f"adapter {n!r} is not active on rank {self.rank}; activate() it first")
            slots.append(a.slot)
        used = sorted({s for s in slots if s >= 0})
        for s in used:
            self.pool.acquire(s)

        def release() -> None:
            for s in used:
                self.pool.release(s)

        ranks = {s: self._adapters[self.pool.slot_name[s]].plan.max_rank for s in used}
        return build_batch(slots, adapters, tokens, ranks, self.pool.device, release)

    # ---------------------------------------------------------------------------------------------
    # stats
    # ---------------------------------------------------------------------------------------------
    def stats(self) -> ManagerStats:
        with self._stats_lock:
            st = dataclasses.replace(self._stats)
            st.active = [n for n, a in self._adapters.items() if a.state == "active"]
            st.bytes_full = sum(a.plan.full_bytes for a in self._adapters.values())
            cs = self.cache.stats
            st.pinned_bytes_now = cs.pinned_bytes
            st.pinned_planned_now = cs.planned_bytes
            ar = self.arena.snapshot()
            st.pinned_reserved_bytes, st.pinned_free_bytes, st.pinned_reserve_s = (
                ar.reserved_bytes, ar.free_bytes, ar.reserve_s)
            st.cache_hits, st.cache_misses, st.cache_evictions = cs.hits, cs.misses, cs.evictions
            st.slot_evictions = self.pool.evictions
            st.peak_inflight_bytes = self.engine.peak_inflight_bytes
            st.inflight_bound = self.engine.inflight_bound
            st.activation_s = list(self._stats.activation_s)
            st.load_stats = list(self._stats.load_stats)
            return st

    def aggregate_stats(self) -> list[ManagerStats] | None:
        """Every rank's stats on rank 0 (None elsewhere). A collective: call on all ranks together."""
        mine = self.stats()
        if self.collective.world == 1:
            return [mine]
        import torch.distributed as dist

        out: list[Any] = [None] * self.collective.world
        dist.all_gather_object(out, dataclasses.asdict(mine), group=self.collective.group)
        if self.rank != 0:
            return None
        return [ManagerStats(**d) for d in out]

    # ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loader.shutdown(wait=True)
            self.engine.close()
            self.arena.close()

    def __enter__(self) -> "LoRAManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise AdapterStateError("the LoRAManager is closed")

    def _get(self, name: str) -> _Adapter:
        a = self._adapters.get(name)
        if a is None:
            raise AdapterStateError(f"adapter {name!r} is not registered on rank {self.rank}; registered: "
                                    f"{sorted(self._adapters)}")
        return a


def _fingerprint(a: _Adapter) -> int:
    """20 bits of the adapter's fingerprint: activation checks that every rank registered the same files."""
    return int(a.header.fingerprint[:5], 16)


def _short(e: BaseException) -> str:
    # the reason travels in a fixed-size field of the collective: name the file, not its (long) folder,
    # so that the problem itself is not cut off (the adapter name is in the activation error already)
    if isinstance(e, AdapterError) and e.path is not None:
        msg = f"{type(e).__name__}: {os.path.basename(e.path)}: {e.reason}"
    else:
        msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= 150 else msg[:147] + "..."


def _done_future(value: Any) -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_result(value)
    return f

"""LoRAManager: the engine-facing API, one per rank process.

    register(name, path)   header + plan + content fingerprint (a few MiB sampled), no collective
    prefetch(name)         background load: slot reserved now, pinned cache + copy stream; no collective
    activate(names)        wait for this rank's loads (bounded by load_timeout_s), then the agreement:
                           a verdict exchange and a commit exchange; all ranks commit or all roll back
    prepare_batch(...)     BatchInfo for the layer ops; holds slot references until released
    attach_group(group)    after a broken group: bind a new one and reconcile the active set on every rank
    stats()                this rank's counters (safe from any thread); aggregate_stats() gathers them

Calls must come from one engine thread, in the same order on every rank (as an engine's scheduler does):
slot allocation is deterministic, and activation checks that every rank picked the same slot, holds
the same bytes (content fingerprint) and was asked for the same ordered list.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Sequence

from . import activation as act
from .activation import LOCAL, Collective, Decision, Entry, ExchangeFailed, RankMessage
from .batch import BatchInfo, build_batch
from .config import LoRAConfig
from .stats import ActivationPhases, ManagerStats, StatsRecorder
from ..device.pool import GpuPool
from ..device.transfer import Device, LoadJob, LoadResult, TransferEngine
from ..errors import (AdapterDataError, AdapterError, AdapterInDoubtError, AdapterStateError,
                      CollectiveTimeoutError, ConfigError, LoadTimeoutError, PoolError, TPLoRAError)
from ..format.adapter import AdapterHeader
from ..format.fingerprint import FileIdentity, fingerprint_file
from ..host.memory import HostArena
from ..host.pinned_cache import PinnedCache
from ..plan.layout import RankLayout
from ..plan.model import ModelSpec
from ..plan.parallel import ParallelSpec
from ..plan.planner import SlicePlan, plan_rank
from ..plan.validate import AdapterSource

log = logging.getLogger(__name__)

__all__ = ["AdapterState", "LoRAConfig", "LoRAManager", "ManagerStats", "LOCAL"]

#: a load cancelled after its deadline gets this long to stop at its next chunk boundary before its
#: slot is quarantined (state CANCELLING) until it does
_CANCEL_GRACE_S = 2.0


class AdapterState(str, Enum):
    """Where one adapter stands on this rank (a ``str`` Enum: compares equal to its value)."""

    REGISTERED = "registered"  # header + plan known; no slot
    LOADING = "loading"  # a slot is reserved, a load is queued or running (prefetch / activate)
    ACTIVE = "active"  # committed on every rank: usable in batches
    IN_DOUBT = "in_doubt"  # loaded, the commit exchange did not complete here: attach_group resolves it
    CANCELLING = "cancelling"  # its load missed the deadline and has not stopped yet: slot quarantined


_HOLDS_SLOT = (AdapterState.LOADING, AdapterState.ACTIVE, AdapterState.IN_DOUBT, AdapterState.CANCELLING)


@dataclass(eq=False)
class _Adapter:
    name: str
    path: str
    header: AdapterHeader  # its ``fingerprint`` is the content fingerprint (the pinned cache keys on it)
    plan: SlicePlan
    identity: FileIdentity  # the weights file as registered: a load refuses a file changed since
    fingerprint: int  # 62 bits of config + header + sampled tensor bytes: the one agreement check
    pool: GpuPool = field(repr=False)
    state: AdapterState = AdapterState.REGISTERED
    future: cf.Future | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    event: Any = None  # copy-stream event of its completed load (an in-doubt adapter commits on it)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "slot":  # derived from the pool; None is accepted (and changes nothing) for old callers
            if value is not None:
                raise AttributeError("an adapter's slot is owned by the pool (GpuPool.slot_name)")
            return
        if key == "state":
            value = AdapterState(value)  # a plain "registered" etc. becomes the Enum member
        object.__setattr__(self, key, value)

    @property
    def slot(self) -> int | None:
        """Its slot, from the pool (the one owner of "which adapter is in which slot")."""
        if self.state not in _HOLDS_SLOT:
            return None
        try:
            return self.pool.slot_name.index(self.name)
        except ValueError:
            return None


@dataclass
class _Call:
    """One activate call on this rank: what it started and what it concluded locally."""

    names: list[str]  # as given (str() of non-strings, for the message)
    entries: list[Entry]
    started: list[_Adapter] = field(default_factory=list)
    results: dict[str, LoadResult] = field(default_factory=dict)
    call_reason: str = ""
    overflow: bool = False
    t0: float = 0.0
    stamps: list[float] = field(default_factory=list)  # perf_counter after start, await, agree
    evicted: list[str] = field(default_factory=list)  # active adapters its loads evicted on this rank
    exchanged: bool = False  # its verdict exchange completed (or failed with the group marked broken)
    lru_held: dict[int, int] = field(default_factory=dict)  # slot -> last use before this call held it


class LoRAManager:
    """Per-rank LoRA runtime. See the module docstring for the call contract."""

    def __init__(self, config: LoRAConfig, model: ModelSpec, parallel: ParallelSpec | RankLayout, *,
                 group: Any = None):
        if not isinstance(config, LoRAConfig):
            raise ConfigError(f"config must be a LoRAConfig, got {type(config).__name__}")
        self.layout = RankLayout.of(model, parallel)  # validated once, here
        self.config, self.model, self.parallel = config, model, self.layout.parallel
        self.device = Device(config.device, pin_mode=config.pin_mode)
        try:
            self.pool = GpuPool(model, self.layout, max_loras=config.max_loras, max_rank=config.max_lora_rank,
                                modules=config.target_modules, dtype=config.torch_dtype,
                                device=self.device.device)
        except (RuntimeError, MemoryError) as e:  # the allocator: too many slots x rank for the device
            raise PoolError(f"cannot allocate the GPU pool for max_loras={config.max_loras}, max_lora_rank="
                            f"{config.max_lora_rank} on {config.device}: {type(e).__name__}: "
                            f"{str(e)[:200]}") from None
        # pinned host memory: one arena (cache budget + streamed ring), reserved ahead and reused
        self.arena = HostArena(self.device, config.host_cache_bytes + config.ring_slots * config.chunk_bytes,
                               slab_bytes=max(config.chunk_bytes, 256 << 20), workers=config.pin_workers)
        self.cache = PinnedCache(config.host_cache_bytes, self.arena.alloc, Device.sync_event, free=self.arena.free)
        self.engine = TransferEngine(self.device, self.pool, self.cache, chunk_bytes=config.chunk_bytes,
                                     ring_slots=config.ring_slots, read_workers=config.read_workers,
                                     pin_workers=config.pin_workers, part_bytes=config.part_bytes,
                                     read_mode=config.read_mode, arena=self.arena,
                                     placement=config.placement, read_ahead=config.read_ahead,
                                     read_backend=config.read_backend, native_reads=config.native_reads,
                                     map_reads=config.map_reads)
        self.collective = Collective(group, self.device.device, config.activation_timeout_s)
        self.rank = self.collective.rank
        self._adapters: dict[str, _Adapter] = {}
        self._loader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tp_lora-load-r{self.rank}")
        # the loader thread started now (the executor starts it lazily, at the first prefetch) and warmed;
        # and the compute stream's first event: neither then lands in the first activation
        self._loader.submit(self.engine.warm_thread).result()
        self.device.compute_event()
        self._stats = StatsRecorder(self.rank)
        self._closed = False
        self._reconcile_needed: str | None = None
        self._evictions: list[str] | None = None  # collects evictions of active adapters during activate
        #: test hook: callable(adapter, stage, chunk_index) that may raise, to inject faults mid-transfer
        self.fault_hook: Callable[[str, str, int], None] | None = None
        log.debug("[rank %d] LoRAManager: %d slots x %d MiB, modules %s", self.rank, config.max_loras,
                  self.pool.slot_bytes() >> 20, list(self.pool.modules))

    # ---------------------------------------------------------------------------------------------
    # registration
    # ---------------------------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike[str], *, replace: bool = False) -> SlicePlan:
        """Read the header, validate it against the model, plan this rank's slices, and fingerprint the
        content (``fingerprint_sample_bytes`` of tensor data). No collective.

        Registering the same unchanged file again returns the existing plan. Another file, or the same
        file changed since (identity or contents), needs ``replace=True``: the old registration, its
        slot and its cached bytes are dropped."""
        self._check_open()
        self._reap()
        if not isinstance(name, str) or not name or "/" in name:
            raise AdapterStateError(f"adapter name must be a non-empty string without '/', got {name!r}")
        header = AdapterSource.open(path, self.model, name=name, max_rank=self.config.max_lora_rank,
                                    allow_pickle=self.config.allow_pickle)
        try:
            ident, content = fingerprint_file(header.weights_path, header.header_bytes, header.header_digest,
                                              self.config.fingerprint_sample_bytes)
        except (OSError, ValueError, EOFError) as e:
            raise AdapterDataError(f"cannot fingerprint the weights: {type(e).__name__}: {e}", adapter=name,
                                   path=header.weights_path) from None
        full = hashlib.sha256(f"{header.fingerprint}:{content}".encode()).hexdigest()
        header = dataclasses.replace(header, fingerprint=full)
        fp = int(full[:16], 16) & ((1 << 62) - 1)
        old = self._adapters.get(name)
        if old is not None:
            if old.fingerprint == fp and old.identity == ident and not replace:
                return old.plan
            if not replace:
                what = old.identity.differs(ident) if old.fingerprint == fp else "contents differ"
                raise AdapterStateError(f"adapter {name!r} is already registered from {old.path} with other "
                                        f"contents ({what}); pass replace=True to replace it")
            self.unregister(name)
        plan = plan_rank(header, self.model, self.layout, pool_modules=set(self.pool.modules))
        self._adapters[name] = _Adapter(name, str(path), header, plan, ident, fp, self.pool)
        self.engine.expect(plan, [a.plan for a in self._adapters.values()])
        self._publish()
        log.debug("[rank %d] registered %s: %d slices, %d bytes", self.rank, name, len(plan.ops), plan.nbytes)
        return plan

    def unregister(self, name: str) -> None:
        """Forget ``name``: its slot is freed and zeroed (A, B and scalings), its cached bytes dropped."""
        self._reap()
        a = self._get(name)
        s = a.slot
        if s is not None and self.pool.refcount[s]:
            raise AdapterStateError(f"adapter {name!r} is used by {self.pool.refcount[s]} running "
                                    f"batch(es); release them first")
        if a.state is AdapterState.IN_DOUBT:
            raise AdapterStateError(f"adapter {name!r} is in doubt after an incomplete commit; call "
                                    f"attach_group() on every rank to resolve it first")
        if a.state is AdapterState.LOADING:
            a.cancel.set()  # its result is not wanted any more
            if not self._settle(a, wait=_CANCEL_GRACE_S):
                a.state = AdapterState.CANCELLING
        if a.state is AdapterState.CANCELLING:
            self._settle(a, wait=_CANCEL_GRACE_S)
            if a.state is AdapterState.CANCELLING:
                raise AdapterStateError(f"adapter {name!r}: its timed-out load has not stopped yet; retry later")
        self._drop_slot(a)
        self.cache.evict(name)
        del self._adapters[name]
        self._publish()

    def registered(self) -> list[str]:
        return list(self._adapters)

    def is_active(self, name: str) -> bool:
        a = self._adapters.get(name)
        return a is not None and a.state is AdapterState.ACTIVE

    def slot_of(self, name: str) -> int | None:
        a = self._adapters.get(name)
        return a.slot if a is not None and a.state is AdapterState.ACTIVE else None

    def adapter_state(self, name: str) -> AdapterState:
        return self._get(name).state

    def plan(self, name: str) -> SlicePlan:
        return self._get(name).plan

    def header(self, name: str) -> AdapterHeader:
        """The validated header (``weights_path``, targets, ``fingerprint``) of a registered adapter."""
        return self._get(name).header

    # ---------------------------------------------------------------------------------------------
    # loading
    # ---------------------------------------------------------------------------------------------
    def prefetch(self, name: str) -> cf.Future:
        """Start this rank's load of ``name`` into a GPU slot in the background; return at once.

        Reserves a slot now (free first, else the least recently used slot no batch holds; that
        adapter is evicted). Raises NoFreeSlotError if every slot is busy.
        """
        self._check_open()
        self._reap()
        a = self._get(name)
        if a.state is AdapterState.ACTIVE:
            return _done_future(None)
        if a.state is AdapterState.LOADING:
            assert a.future is not None
            return a.future
        job = self._reserve(a)
        self._publish()
        self._submit(a, job)
        assert a.future is not None
        return a.future

    def _reserve(self, a: _Adapter) -> LoadJob:
        """The first half of a load: a slot for ``a`` (evicting its least recently used holder), state
        LOADING, the job; ``_submit`` hands it to the loader thread. ``activate`` submits its loads last,
        right before it waits, so that the loader thread does not queue for the GIL behind the call."""
        name = a.name
        if a.state in (AdapterState.IN_DOUBT, AdapterState.CANCELLING):
            raise AdapterStateError(f"adapter {name!r} is {a.state.value} on rank {self.rank}; "
                                    + ("attach_group() resolves it" if a.state is AdapterState.IN_DOUBT
                                       else "its timed-out load is still stopping"))
        slot, victim = self.pool.choose_slot()
        if victim is not None:
            v = self._adapters.get(victim)
            if v is not None:
                if v.state is AdapterState.ACTIVE and self._evictions is not None:
                    self._evictions.append(victim)
                v.state, v.future = AdapterState.REGISTERED, None
            log.debug("[rank %d] slot %d: evicting %s for %s", self.rank, slot, victim, name)
        after = self.device.compute_event()  # batches that read the slot before must finish first
        self.pool.reserve(slot, name)
        a.state, a.cancel, a.event, a.future = AdapterState.LOADING, threading.Event(), None, None
        hook, cancel = self.fault_hook, a.cancel

        def check(stage: str, i: int, _n: str = name) -> None:  # loader/reader threads, per chunk
            if cancel.is_set():
                raise LoadTimeoutError("load cancelled (its deadline passed or the activation was "
                                       "interrupted)", adapter=_n, path=a.header.weights_path)
            if hook is not None:
                hook(_n, stage, i)

        return LoadJob(header=a.header, plan=a.plan, slot=slot, after=after,
                       check_finite=self.config.check_finite, fault=check)

    def _submit(self, a: _Adapter, job: LoadJob) -> None:
        job.submitted = time.perf_counter()
        a.future = self._loader.submit(self._run_load, a, job)

    def _run_load(self, a: _Adapter, job: LoadJob) -> LoadResult:
        """Loader thread. The file must be the registered one before and after the transfer (a rewrite
        during the load changes its mtime or inode): otherwise the load fails and is never served."""
        try:
            self._check_identity(a, "since registration")
            res = self.engine.run(job)
            self._check_identity(a, "during the load")
        except BaseException:
            self._stats.failed_load()
            raise
        self._stats.load(res.stats)
        res.returned_at = time.perf_counter()
        return res

    def _check_identity(self, a: _Adapter, when: str) -> None:
        path = a.header.weights_path
        try:
            st = os.stat(path)
        except OSError as e:
            raise AdapterDataError(f"cannot open the weights for reading: {e}", adapter=a.name, path=path) from None
        if not stat.S_ISREG(st.st_mode):
            raise AdapterDataError("the weights are no longer a regular file (a directory, FIFO or device)",
                                   adapter=a.name, path=path)
        now = FileIdentity.of_stat(st)
        if now.size != a.identity.size:
            raise AdapterDataError(f"file size changed {when}: {a.identity.size} -> {now.size} bytes",
                                   adapter=a.name, path=path)
        diff = a.identity.differs(now)
        if diff:
            raise AdapterDataError(f"the file changed {when} ({diff}); register it again with replace=True "
                                   f"to use the new contents", adapter=a.name, path=path)

    def _settle(self, a: _Adapter, wait: float | None) -> bool:
        """Wait up to ``wait`` seconds (None: no bound) for ``a``'s load to end; True when it did."""
        f = a.future
        if f is None:
            return True
        try:
            f.result(timeout=wait)
        except cf.TimeoutError:
            if not f.done():
                return False
        except Exception:  # noqa: BLE001 - its failure was reported already
            pass
        if a.state is AdapterState.CANCELLING:  # stopped at last: release the quarantined slot
            self._drop_slot(a)
        return True

    def _reap(self) -> None:
        """Release the slots of timed-out loads that have stopped since (engine thread, each call)."""
        for a in list(self._adapters.values()):
            if a.state is AdapterState.CANCELLING and a.future is not None and a.future.done():
                self._settle(a, wait=0)

    def _drop_slot(self, a: _Adapter) -> None:
        """Free and zero ``a``'s slot if it holds one; ``a`` becomes REGISTERED."""
        s = a.slot
        if s is not None:
            self.pool.free(s)
        a.state, a.future, a.event = AdapterState.REGISTERED, None, None

    # ---------------------------------------------------------------------------------------------
    # activation: start / await / agree / commit-or-rollback
    # ---------------------------------------------------------------------------------------------
    def activate(self, names: str | Sequence[str]) -> dict[str, int]:
        """Make ``names`` usable in batches on every rank. Returns adapter -> slot.

        Waits for this rank's loads (at most ``load_timeout_s``), then the agreement (verdict, then
        commit). All ranks commit, or all roll back (slots freed and zeroed, adapters back to
        registered) and raise the same AdapterActivationError. Adapters already active are untouched.
        Every rank must pass the same names in the same order. A timeout raises CollectiveTimeoutError
        and leaves the group broken (``attach_group``); KeyboardInterrupt / SystemExit propagate after
        this rank rolled back (its peers time out).
        """
        self._check_open()
        self._reap()
        self.collective.check_usable("activate")
        if self._reconcile_needed:
            raise AdapterStateError(f"activate on rank {self.rank}: {self._reconcile_needed}; call "
                                    f"attach_group() on every rank first")
        call = _Call(names=[], entries=[], t0=time.perf_counter())
        try:
            self._start(call, names)
            call.stamps.append(time.perf_counter())
            self._await(call)
            call.stamps.append(time.perf_counter())
            decision = self._agree(call)
            call.stamps.append(time.perf_counter())
        except BaseException as e:
            # an interrupt, or anything raised before this rank's verdict was exchanged: the peers wait
            # for it in vain (they time out), so this group is not usable any more either
            if self.collective.distributed and (not isinstance(e, TPLoRAError) or not call.exchanged):
                self.collective.abandon(f"activation abandoned on rank {self.rank} ({type(e).__name__})")
            self._rollback(call)  # (adapters in doubt are kept: only loads in flight are undone)
            if not isinstance(e, TPLoRAError):
                self._stats.activation(False, self.collective.calls)
            raise
        if not decision.ok:
            self._rollback(call)
            self._stats.activation(False, self.collective.calls)
            log.warning("[rank %d] %s", self.rank, decision.message)
            err = act.activation_error(decision, call.names)
            if decision.lists_differ:
                # holding this call's active adapters counted as a use (LRU), and the ranks held different
                # ones: undo it, so the next slot choice is the same on every rank again
                for s, t in call.lru_held.items():
                    self.pool.last_used[s] = t
            if (decision.state_differs or decision.evictions_differ) and not self.collective.broken:
                # the ranks would leave this call holding different active sets: one more exchange (the
                # same on every rank, since every rank reached this same decision) makes them equal
                try:
                    self._reconcile("activate")
                except TPLoRAError as e:
                    raise e from err
            raise err
        return self._commit(call)

    def _start(self, call: _Call, names: str | Sequence[str]) -> None:
        """Validate the call and start this rank's loads; every problem becomes part of the message, so
        that every rank learns it (a rank that raised here alone would leave its peers to time out)."""
        try:
            raw = [names] if isinstance(names, str) else list(names)
        except TypeError:
            raw = [names]  # not a list at all: refused below, like any other non-string name
        shown = [n if isinstance(n, str) else repr(n) for n in raw]
        call.names = shown
        if not all(isinstance(n, str) for n in raw):
            call.call_reason = f"adapter names must be strings, got {shown}"
        elif len(set(raw)) != len(raw):
            call.call_reason = f"duplicate names in activate({shown})"
        elif len(raw) > self.config.max_loras:
            call.call_reason = f"{len(raw)} names but only max_loras={self.config.max_loras} slots"
            call.overflow = True
        if call.call_reason:
            call.entries = [Entry(n, True, -1, 0) for n in shown]
            return
        # the adapters of this call that are already active must not become eviction victims of the others
        # (a reference for the duration of the slot choices; the same on every rank)
        held = [a.slot for n in raw if (a := self._adapters.get(n)) is not None
                and a.state is AdapterState.ACTIVE and a.slot is not None]
        call.lru_held = {s: self.pool.last_used[s] for s in held}
        for s in held:
            self.pool.acquire(s)
        self._evictions = call.evicted
        jobs: list[tuple[_Adapter, LoadJob]] = []
        try:
            for n in raw:
                a = self._adapters.get(n)
                if a is None:
                    call.entries.append(Entry(n, False, -1, 0, f"adapter {n!r} is not registered on this rank"))
                    continue
                if a.state is AdapterState.ACTIVE:
                    call.entries.append(Entry(n, True, _slot(a), a.fingerprint))
                    continue
                try:
                    if a.state is not AdapterState.LOADING:
                        jobs.append((a, self._reserve(a)))
                    call.started.append(a)
                except TPLoRAError as e:
                    call.entries.append(Entry(n, False, -1, a.fingerprint, _short(e)))
                    continue
                call.entries.append(Entry(n, True, _slot(a), a.fingerprint))
        finally:
            self._evictions = None
            for s in held:
                self.pool.release(s)
        if jobs:
            self._publish()
            for a, job in jobs:  # the last thing before the wait (see _reserve)
                self._submit(a, job)

    def _await(self, call: _Call) -> None:
        """Wait for this rank's loads (the loader thread; the compute stream is not blocked), within
        ``load_timeout_s``; a load past it is cancelled and fails this rank's verdict."""
        deadline = time.monotonic() + self.config.load_timeout_s
        index = {e.name: i for i, e in enumerate(call.entries)}
        for a in call.started:
            i = index[a.name]
            assert a.future is not None
            try:
                res = a.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except cf.TimeoutError:
                if not a.future.done():
                    a.cancel.set()
                    e = LoadTimeoutError(f"load did not finish within load_timeout_s="
                                         f"{self.config.load_timeout_s:g}s on rank {self.rank}",
                                         adapter=a.name, path=a.header.weights_path)
                    call.entries[i] = Entry(a.name, False, _slot(a), a.fingerprint, _short(e))
                    continue
                call.entries[i] = Entry(a.name, False, _slot(a), a.fingerprint, "TimeoutError")
                continue
            except Exception as e:  # noqa: BLE001 - every load failure becomes a verdict
                if isinstance(e, AdapterDataError) and "changed" in e.reason:
                    self.cache.evict(a.name)  # whatever it cached may mix two versions of the file
                call.entries[i] = Entry(a.name, False, _slot(a), a.fingerprint, _short(e))
                continue
            call.results[a.name] = res
            if res.bad_values is not None and bool(res.bad_values):
                what = (f"{res.bad_detail} in {os.path.basename(a.header.weights_path)}" if res.bad_detail
                        else f"NaN/Inf values in {os.path.basename(a.header.weights_path)} (check_finite=True)")
                call.entries[i] = Entry(a.name, False, _slot(a), a.fingerprint, f"AdapterDataError: {what}")
                self.cache.evict(a.name)  # do not keep known-bad data pinned (a retry reads the file again)

    def _agree(self, call: _Call) -> Decision:
        """The verdict exchange and, after an all-ok verdict with something to commit, the commit
        exchange. Raises CollectiveTimeoutError (rolled back) or AdapterInDoubtError (in doubt)."""
        coll, S = self.collective, self.config.max_loras
        flags = (act.FLAG_CALL if call.call_reason else 0) | (act.FLAG_OVERFLOW if call.overflow else 0)
        if not coll.distributed:
            # no peer: the verdict is this rank's own message, decided as it is (nothing to encode, send or
            # compare across ranks; names and reasons are not cut to the wire's fields), and it commits
            if coll.hook is not None:
                coll.hook(act.KIND_VERDICT)
            call.exchanged = True
            coll.epoch += 2
            return act.decide([RankMessage(act.KIND_VERDICT, coll.epoch, len(call.names), 0, 0, flags,
                                           call.call_reason, call.entries)])
        msg = RankMessage(act.KIND_VERDICT, coll.epoch, len(call.names), act.digest62(*call.names),
                          self._state_digest(), flags, call.call_reason, call.entries,
                          evicted=act.digest62(*sorted(call.evicted)))
        coll.epoch += 1
        try:
            out = coll.exchange(act.encode(msg, coll.rank, coll.world, S), act.KIND_VERDICT)
            call.exchanged = True
        except ExchangeFailed as e:
            call.exchanged = True  # (the group is broken already)
            self._rollback(call)
            self._stats.activation(False, coll.calls)
            raise act.timeout_error(f"activation of {call.names} on rank {coll.rank}: {e}; no adapter was "
                                    f"activated on this rank (the group is broken: attach_group)",
                                    call.names) from None
        decision = act.decide(act.decode(out, coll.world, S))
        if decision.out_of_step:
            coll.abandon("ranks out of step")
        if not decision.ok or not call.started:
            return decision  # nothing to commit here means nothing on any rank (the states agree)
        try:
            out2 = coll.exchange(act.encode(RankMessage(act.KIND_COMMIT, coll.epoch, 0, 0, 0, 0, ""),
                                            coll.rank, coll.world, S), act.KIND_COMMIT)
            msgs = act.decode(out2, coll.world, S)
            if any((m.kind, m.epoch) != (act.KIND_COMMIT, coll.epoch) for m in msgs):
                coll.abandon("a peer sent something else than the commit")
                raise ExchangeFailed("a peer sent something else than the commit")
        except (ExchangeFailed, KeyboardInterrupt, SystemExit) as e:
            coll.abandon(f"the commit exchange did not complete ({type(e).__name__})")
            self._hold_in_doubt(call)
            self._stats.activation(False, coll.calls)
            if not isinstance(e, ExchangeFailed):
                raise
            raise AdapterInDoubtError(
                f"activation of {call.names} on rank {coll.rank}: every rank had loaded it, but the commit "
                f"exchange did not complete ({e}); a peer may have committed, so the adapters stay loaded "
                f"and unusable (in doubt) until attach_group() resolves them on every rank",
                adapters=call.names, failed_ranks={}) from None
        coll.epoch += 1
        return decision

    def _commit(self, call: _Call) -> dict[str, int]:
        dt = time.perf_counter() - call.t0
        done = []
        for a in call.started:
            res = call.results[a.name]
            self.device.wait_on_compute(res.event)  # an event wait on the compute stream only
            self.pool.commit(_slot(a))
            a.state, a.future, a.event = AdapterState.ACTIVE, None, None
            done.append((a.name, res.stats.warm, dt))
        self._publish()
        out = {e.name: _slot(self._adapters[e.name]) for e in call.entries}
        t_start, t_await, t_agree = call.stamps
        end = time.perf_counter()
        phases = ActivationPhases(adapters=[a.name for a in call.started], start_s=t_start - call.t0,
                                  await_s=t_await - t_start, agree_s=t_agree - t_await, commit_s=end - t_agree,
                                  total_s=end - call.t0,
                                  load_s=sum(call.results[a.name].stats.total_s for a in call.started),
                                  queued_s=call.results[call.started[0].name].stats.queued_s
                                  if call.started else 0.0,
                                  wake_s=max(0.0, t_await - max(r.returned_at for r in call.results.values()))
                                  if call.results else 0.0)
        self._stats.activation(True, self.collective.calls, done, phases)
        return out

    def _hold_in_doubt(self, call: _Call) -> None:
        for a in call.started:
            a.state, a.future, a.event = AdapterState.IN_DOUBT, None, call.results[a.name].event
        self._publish()

    def _rollback(self, call: _Call) -> None:
        """Undo this rank's part of a failed call: cancel its loads, free and zero their slots. A load
        that does not stop within the grace period keeps its slot quarantined (CANCELLING)."""
        for a in call.started:
            if a.state is not AdapterState.LOADING:
                continue
            if a.future is not None and not a.future.done():
                a.cancel.set()
            if self._settle(a, wait=_CANCEL_GRACE_S):
                self._drop_slot(a)
            else:
                a.state = AdapterState.CANCELLING
                log.warning("[rank %d] the load of %s did not stop after its cancellation; slot %s stays "
                            "quarantined until it does", self.rank, a.name, a.slot)
        self._publish()

    def _state_digest(self) -> int:
        """What this rank serves (or holds in doubt): every rank must agree before any activation."""
        rows = sorted((a.name, a.slot, a.fingerprint, a.state.value) for a in self._adapters.values()
                      if a.state in (AdapterState.ACTIVE, AdapterState.IN_DOUBT))
        return act.digest62(*rows)

    # ---------------------------------------------------------------------------------------------
    # re-attach
    # ---------------------------------------------------------------------------------------------
    def attach_group(self, group: Any = None) -> dict[str, int]:
        """Bind a new process group (after a timeout broke the old one, or after the ranks' active sets
        were found to differ) and reconcile on it. Call on every rank, with a group of the same world
        size and this rank's same index (``None``: the current default group). Returns the adapters
        active afterwards (adapter -> slot), identical on every rank.

        Reconcile (one exchange of every rank's slot table): an adapter stays or becomes active iff
        every rank holds it, in the same slot with the same content fingerprint, active or in doubt;
        anywhere else it is rolled back (slot freed and zeroed). Prefetches in flight are dropped (their
        cached bytes stay). The LRU order restarts the same on every rank. If an adapter that must be
        rolled back is held by a running batch on some rank, every rank raises the same
        AdapterStateError and nothing changes: release the batches and attach again.
        """
        self._check_open()
        self._reap()
        for a in list(self._adapters.values()):
            if a.state is AdapterState.LOADING:
                a.cancel.set()
                if self._settle(a, wait=_CANCEL_GRACE_S):
                    self._drop_slot(a)
                else:
                    a.state = AdapterState.CANCELLING
        self.collective.rebind(group)
        return self._reconcile("attach_group")

    def _reconcile(self, where: str) -> dict[str, int]:
        """One exchange of every rank's slot table on the current group, then the same rule everywhere
        (see attach_group). Returns the adapters active afterwards."""
        coll, S = self.collective, self.config.max_loras
        entries = []
        for s in range(S):
            n = self.pool.slot_name[s]
            a = self._adapters.get(n) if n is not None else None
            if a is None or a.state not in (AdapterState.ACTIVE, AdapterState.IN_DOUBT):
                entries.append(Entry("", True, -1, 0))
                continue
            code = act.SLOT_ACTIVE if a.state is AdapterState.ACTIVE else act.SLOT_IN_DOUBT
            entries.append(Entry(n, True, s, (a.fingerprint << 2 | code) & ((1 << 62) - 1),
                                 "held" if self.pool.refcount[s] else ""))
        msg = RankMessage(act.KIND_STATE, 0, S, 0, 0, 0, "", entries)
        try:
            # peers may first spend up to the cancellation grace settling their own loads
            out = coll.exchange(act.encode(msg, coll.rank, coll.world, S), act.KIND_STATE,
                                self.config.activation_timeout_s + _CANCEL_GRACE_S)
        except ExchangeFailed as e:
            raise act.timeout_error(f"{where} (reconcile) on rank {coll.rank}: {e}", []) from None
        msgs = act.decode(out, coll.world, S)
        if any(m.kind != act.KIND_STATE for m in msgs):
            coll.abandon(f"a peer sent something else than its slot table at {where}")
            raise act.timeout_error(f"{where} (reconcile) on rank {coll.rank}: ranks are out of step (a peer "
                                    f"did not reconcile); create a new group and attach_group again", [])
        keep, drop, busy = _reconcile(msgs)
        if busy:
            self._reconcile_needed = f"{where} could not roll back adapters held by running batches"
            raise AdapterStateError(f"{where} (reconcile): {busy}; release those batches and call "
                                    f"attach_group() on every rank")
        for s in range(S):
            n = self.pool.slot_name[s]
            a = self._adapters.get(n) if n is not None else None
            if a is None or a.state not in (AdapterState.ACTIVE, AdapterState.IN_DOUBT):
                continue
            if s in keep:
                if a.state is AdapterState.IN_DOUBT:
                    self.device.wait_on_compute(a.event)
                    self.pool.commit(s)
                    a.state, a.event = AdapterState.ACTIVE, None
                    log.warning("[rank %d] %s: %s committed (it was in doubt)", self.rank, where, n)
            elif s in drop:
                log.warning("[rank %d] %s: %s rolled back (not held alike on every rank)", self.rank, where, n)
                self._drop_slot(a)
        self.pool.reset_lru()
        self._reconcile_needed = None
        self._publish()
        return {a.name: _slot(a) for a in self._adapters.values() if a.state is AdapterState.ACTIVE}

    # ---------------------------------------------------------------------------------------------
    # batches
    # ---------------------------------------------------------------------------------------------
    def prepare_batch(self, adapters: Sequence[str | None],
                      tokens_per_request: Sequence[int] | None = None) -> BatchInfo:
        """Batch metadata for requests using ``adapters`` (None = base model), in order.

        Every named adapter must be active. Everything is validated before any slot reference is
        taken; the returned BatchInfo holds a reference on each slot it uses until ``release()`` (or
        the end of a ``with`` block).
        """
        adapters = list(adapters)
        tokens = [1] * len(adapters) if tokens_per_request is None else list(tokens_per_request)
        if len(tokens) != len(adapters):
            raise AdapterStateError(f"{len(adapters)} requests but {len(tokens)} token counts")
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) and not (hasattr(t, "__index__")):
                raise AdapterStateError(f"tokens_per_request must hold integers, got {t!r}")
        tokens = [int(t) for t in tokens]
        if any(t < 0 for t in tokens):
            raise AdapterStateError(f"negative token count in tokens_per_request {tokens}")
        if sum(tokens) > _MAX_BATCH_TOKENS:
            raise AdapterStateError(f"tokens_per_request sums to {sum(tokens)} tokens, more than "
                                    f"{_MAX_BATCH_TOKENS} in one batch")
        slots: list[int] = []
        for n in adapters:
            if n is None:
                slots.append(-1)
                continue
            a = self._adapters.get(n) if isinstance(n, str) else None
            if a is None or a.state is not AdapterState.ACTIVE:
                why = (" (in doubt: attach_group() resolves it)" if a is not None and
                       a.state is AdapterState.IN_DOUBT else "; activate() it first")
                raise AdapterStateError(f"adapter {n!r} is not active on rank {self.rank}{why}")
            slots.append(_slot(a))
        used = sorted({s for s in slots if s >= 0})
        ranks = {s: self._adapters[self.pool.slot_name[s]].plan.max_rank for s in used}
        for s in used:
            self.pool.acquire(s)

        def release() -> None:
            for s in used:
                self.pool.release(s)

        try:
            return build_batch(slots, adapters, tokens, ranks, self.pool.device, release)
        except BaseException:
            release()
            raise

    # ---------------------------------------------------------------------------------------------
    # stats
    # ---------------------------------------------------------------------------------------------
    def stats(self) -> ManagerStats:
        """A snapshot of this rank's counters; safe to call from any thread."""
        cs = self.cache.stats
        ar = self.arena.snapshot()
        return self._stats.snapshot(pinned_bytes_now=cs.pinned_bytes, pinned_planned_now=cs.planned_bytes,
                                    pinned_reserved_bytes=ar.reserved_bytes, pinned_free_bytes=ar.free_bytes,
                                    pinned_reserve_s=ar.reserve_s,
                                    cache_hits=cs.hits, cache_misses=cs.misses, cache_evictions=cs.evictions,
                                    slot_evictions=self.pool.evictions,
                                    peak_inflight_bytes=self.engine.peak_inflight_bytes,
                                    inflight_bound=self.engine.inflight_bound)

    def _publish(self) -> None:
        ads = list(self._adapters.values())
        self._stats.publish(len(ads), [a.name for a in ads if a.state is AdapterState.ACTIVE],
                            [a.name for a in ads if a.state is AdapterState.IN_DOUBT],
                            sum(a.plan.full_bytes for a in ads))

    def aggregate_stats(self) -> list[ManagerStats] | None:
        """Every rank's stats on rank 0 (None elsewhere). A collective: call on all ranks together."""
        mine = self.stats()
        if self.collective.world == 1:
            return [mine]
        self.collective.check_usable("aggregate_stats")
        import torch.distributed as dist

        out: list[Any] = [None] * self.collective.world
        dist.all_gather_object(out, dataclasses.asdict(mine), group=self.collective.group)
        if self.rank != 0:
            return None
        return [ManagerStats(**{**d, "activation_phases": [ActivationPhases(**p) for p in d["activation_phases"]]})
                for d in out]

    # ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for a in self._adapters.values():
                a.cancel.set()
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
        a = self._adapters.get(name) if isinstance(name, str) else None
        if a is None:
            raise AdapterStateError(f"adapter {name!r} is not registered on rank {self.rank}; registered: "
                                    f"{sorted(self._adapters)}")
        return a


_MAX_BATCH_TOKENS = 1 << 31


def _slot(a: _Adapter) -> int:
    s = a.slot
    return -1 if s is None else s


def _reconcile(msgs: list[RankMessage]) -> tuple[set[int], set[int], str]:
    """(slots kept, slots rolled back, why a rollback is blocked) from every rank's slot table (pure)."""
    keep, drop, busy = set(), set(), []
    W = len(msgs)
    for s in range(len(msgs[0].entries)):
        rows = [(m.name_digests[s], m.entries[s].fingerprint >> 2) for m in msgs]
        held_any = any(m.entries[s].name for m in msgs)
        if not held_any:
            continue
        if len(set(rows)) == 1 and all(m.entries[s].name for m in msgs):
            keep.add(s)
            continue
        drop.add(s)
        held = [r for r in range(W) if msgs[r].entries[s].reason == "held"]
        if held:
            names = sorted({m.entries[s].name for m in msgs if m.entries[s].name})
            busy.append(f"slot {s} ({names}) must be rolled back but running batches hold it on rank(s) {held}")
    return keep, drop, "; ".join(busy)


def _short(e: BaseException) -> str:
    # the reason travels in a fixed-size field of the message: name the file, not its (long) folder,
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

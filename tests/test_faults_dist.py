"""Injected faults on real gloo process groups (CPU, world sizes 2 and 4), and a 2 000-operation stress run.

Each rank works on its own private copy of the adapter folders, so a fault can hit one rank only: a file
that vanishes between register and activate, a NaN written into one rank's copy, an exception raised
mid-transfer by ``LoRAManager.fault_hook`` (cold read, cold and warm H2D), a rank killed with
``os._exit`` right before activation, a pinned-cache budget too small for the adapters in flight, and every
GPU slot held by running batches. For each: every surviving rank raises the same error within the
configured timeout, no slot, cache reservation or pinned byte leaks, and the serving adapters stay
bit-identical (slot checksums).

The stress run applies the same seeded sequence of register / prefetch / activate / batch / release /
unregister operations on 4 ranks, injects faults on one rank at a time, and after every step compares each
rank's manager with a model of the expected state (slots, refcounts, LRU, adapter states, verdicts).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from support.distributed import run_distributed

TIMEOUT_S = 3.0  # activation_timeout_s of the fault tests
STRESS_OPS = 2000
STRESS_SEED = 20240917
STRESS_NAMES = [f"st{i}" for i in range(8)]
WEIGHTS = "adapter_model.safetensors"


# --------------------------------------------------------------------------------------------------
# helpers that run in the rank processes
# --------------------------------------------------------------------------------------------------
def _private_copy(root: str, rank: int) -> Path:
    mine = Path(root) / f"rank{rank}"
    if mine.exists():
        shutil.rmtree(mine)
    shutil.copytree(Path(root) / "shared", mine)
    return mine


def _manager(rank: int, world: int, preset: str = "tiny-moe", **kw: Any) -> Any:
    from support.runtime_ref import new_manager
    from tp_lora.plan.model import ModelSpec

    cfg = dict(max_loras=3, max_lora_rank=8, chunk_bytes=4096, host_cache_bytes=1 << 20,
               activation_timeout_s=TIMEOUT_S, dtype="bfloat16")
    cfg.update(kw)
    model = ModelSpec.from_preset(preset)
    ep = world if model.is_moe and world <= 2 else (2 if model.is_moe else 1)
    return new_manager(model, world, rank, ep, **cfg)


def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn``; return what it raised (type, message, failed ranks) and how long it took."""
    t = time.monotonic()
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - recorded for the parent to check
        return {"exc": type(e).__name__, "msg": str(e), "failed": sorted(getattr(e, "failed_ranks", {}) or {}),
                "elapsed": time.monotonic() - t}
    return {"exc": None, "msg": "", "failed": [], "elapsed": time.monotonic() - t, "value": value}


def _leaks(mgr: Any) -> list[str]:
    """Everything that should be zero when no load is in flight."""
    out = []
    cache = mgr.cache
    loading = {n for n, a in mgr._adapters.items() if a.state == "loading"}
    with cache._lock:
        entries = list(cache._entries.values())
    for e in entries:
        if e.inflight and e.name not in loading:
            out.append(f"cache entry {e.name} still in flight")
        if not e.complete and e.name not in loading:
            out.append(f"incomplete cache entry {e.name}")
    complete = sum(e.nbytes for e in entries if e.complete)
    if not loading:
        if cache.reserved_bytes != complete:
            out.append(f"cache reserves {cache.reserved_bytes} bytes, complete entries hold {complete}")
        st = mgr.stats()
        if st.pinned_bytes_now != st.pinned_planned_now:
            out.append(f"pinned bytes {st.pinned_bytes_now} != planned bytes of complete entries "
                       f"{st.pinned_planned_now}")
    if cache.reserved_bytes > cache.budget:
        out.append(f"cache reserves {cache.reserved_bytes} > budget {cache.budget}")
    for s, n in enumerate(mgr.pool.slot_name):
        a = mgr._adapters.get(n) if n is not None else None
        if n is not None and (a is None or a.slot != s or a.state not in ("active", "loading")):
            out.append(f"slot {s} holds {n!r}, which is not active/loading there")
        if n is None and (mgr.pool.reserved[s] or mgr.pool.refcount[s]):
            out.append(f"free slot {s} is reserved or referenced")
        if n is None and any(bool(sc[s].any()) for sc in mgr.pool.scaling.values()):
            out.append(f"free slot {s} has non-zero scalings")
    return out


def _serving_ok(mgr: Any, serving: dict[str, tuple[int, str]]) -> list[str]:
    bad = []
    for n, (slot, digest) in serving.items():
        if mgr.slot_of(n) != slot:
            bad.append(f"{n} moved from slot {slot} to {mgr.slot_of(n)}")
        elif mgr.pool.checksum(slot) != digest:
            bad.append(f"{n} changed in slot {slot}")
    return bad


def _nan_into(path: Path, tensor_key: str) -> None:
    """Write a NaN (of the tensor's dtype) over its first element (same size, same header)."""
    b = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", b[:8])
    ent = json.loads(b[8:8 + n])[tensor_key]
    off = 8 + n + ent["data_offsets"][0]
    nan = {"BF16": struct.pack("<H", 0x7FC0), "F16": struct.pack("<H", 0x7E00), "F32": struct.pack("<f", float("nan")),
           "F64": struct.pack("<d", float("nan"))}[ent["dtype"]]
    b[off:off + len(nan)] = nan
    _rewrite_keeping_mtime(path, bytes(b))


def _rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place (same inode) and put its mtime back: corruption the registration's file
    identity cannot see (the data checks must), or a restore that leaves the identity as registered."""
    st = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


# --------------------------------------------------------------------------------------------------
# the fault scenarios (one spawn per world size runs them all)
# --------------------------------------------------------------------------------------------------
def _faults_worker(rank: int, world: int, root: str) -> dict[str, Any]:
    from tp_lora.errors import NoFreeSlotError

    mine = _private_copy(root, rank)
    last = world - 1
    mgr = _manager(rank, world)
    rec: dict[str, Any] = {}
    for n in ("s0", "s1"):
        mgr.register(n, mine / n)
    mgr.activate(["s0", "s1"])
    held = mgr.prepare_batch(["s0"])  # s0 serves a running batch throughout; s1 is active and idle
    serving = {n: (mgr.slot_of(n), mgr.pool.checksum(mgr.slot_of(n))) for n in ("s0", "s1")}

    def after(key: str) -> None:
        rec[key]["leaks"] = _leaks(mgr)
        rec[key]["serving"] = _serving_ok(mgr, serving)

    # 0. one rank's copy has a corrupt header: register raises there only (no collective, nothing allocated);
    #    the activation the engine then issues on every rank fails everywhere, naming that rank
    #    (its own name: a name whose registration failed on one rank keeps different registration
    #    generations across ranks afterwards, see docs/HOSTILE.md)
    if rank == 1:
        hdr = mine / "hdr" / WEIGHTS
        hdr.write_bytes(hdr.read_bytes()[:100])
    reg = _attempt(lambda: mgr.register("hdr", mine / "hdr"))
    rec["header corrupt on one rank"] = _attempt(lambda: mgr.activate("hdr"))
    rec["header corrupt on one rank"]["register"] = reg["exc"]
    after("header corrupt on one rank")
    if rank != 1:
        mgr.unregister("hdr")

    # 1. the file vanishes on the last rank between register and activate
    mgr.register("vanish", mine / "vanish")
    if rank == last:
        (mine / "vanish" / WEIGHTS).unlink()
    rec["file vanishes"] = _attempt(lambda: mgr.activate("vanish"))
    after("file vanishes")
    mgr.unregister("vanish")

    # 2. a rank raises mid-transfer: cold read (rank 0, second chunk), cold H2D (last rank, last chunk)
    for key, name, frank, stage in (("raise mid-read", "midread", 0, "read"),
                                    ("raise mid-h2d", "midh2d", last, "h2d")):
        mgr.register(name, mine / name)
        nchunks = len(mgr.plan(name).chunks(mgr.config.chunk_bytes))
        at = 1 if stage == "read" and nchunks > 1 else nchunks - 1

        def hook(adapter: str, st: str, i: int, _n: str = name, _s: str = stage, _at: int = at) -> None:
            if adapter == _n and st == _s and i == _at:
                raise RuntimeError(f"injected {_s} fault at chunk {i}")

        mgr.fault_hook = hook if rank == frank else None
        rec[key] = _attempt(lambda: mgr.activate(name))
        rec[key]["chunks"] = nchunks
        mgr.fault_hook = None
        after(key)
        # the same adapter loads fine afterwards (warm on ranks that completed their fill)
        rec[key]["retry"] = _attempt(lambda: mgr.activate(name))["exc"]
        mgr.unregister(name)
        after(key)

    # 3. a fault during a warm load (from the pinned cache): fill the cache via a failed activation (the
    #    failure is on another rank), then fail the warm H2D on rank 0
    mgr.register("warm", mine / "warm")
    mgr.fault_hook = ((lambda a, st, i: (_ for _ in ()).throw(RuntimeError("injected peer fault")))
                      if rank == last else None)
    first = _attempt(lambda: mgr.activate("warm"))
    cached_on_0 = mgr.cache.contains("warm")
    mgr.fault_hook = ((lambda a, st, i: (_ for _ in ()).throw(RuntimeError("injected warm h2d fault"))
                       if st == "h2d" else None) if rank == 0 else None)
    rec["raise mid-warm-h2d"] = _attempt(lambda: mgr.activate("warm"))
    rec["raise mid-warm-h2d"].update(first=first["failed"], cached=cached_on_0 if rank == 0 else True,
                                     still_cached=mgr.cache.contains("warm") if rank == 0 else True)
    mgr.fault_hook = None
    after("raise mid-warm-h2d")
    mgr.unregister("warm")

    # 4. NaN in one rank's private copy only (data-level: seen when the data is first read)
    mgr.register("nan1", mine / "nan1")
    if rank == 1:
        _nan_into(mine / "nan1" / WEIGHTS, Q_A)
    rec["NaN on one rank"] = _attempt(lambda: mgr.activate("nan1"))
    after("NaN on one rank")
    mgr.unregister("nan1")

    # 5. the pinned cache budget is exhausted by adapters in flight: rank 0 has no budget at all, rank 1
    #    room for one, the others for two; three adapters are prefetched (queued) and activated together,
    #    then a streamed load fails mid-read on rank 0
    from tp_lora.plan.planner import plan_rank
    from tp_lora.plan.validate import AdapterSource
    one = plan_rank(AdapterSource.open(mine / "b1", mgr.model), mgr.model, mgr.parallel).nbytes
    budget = {0: 0, 1: int(1.5 * one)}.get(rank, int(2.5 * one))
    small = _manager(rank, world, host_cache_bytes=budget, ring_slots=2)
    for n in ("b1", "b2", "b3", "b4"):
        small.register(n, mine / n)
        mgr.register(n, mine / n)
    for n in ("b1", "b2", "b3"):
        small.prefetch(n)
    r5 = _attempt(lambda: small.activate(["b1", "b2", "b3"]))
    st = small.stats()
    # the streamed/cached data is bit-identical to a load through the large cache
    same = []
    for n in ("b1", "b2", "b3"):
        if small.is_active(n):
            slot_ref = mgr.activate(n)[n]
            same.append(small.pool.checksum(small.slot_of(n)) == mgr.pool.checksum(slot_ref))
            mgr.unregister(n)
    small.fault_hook = ((lambda a, s, i: (_ for _ in ()).throw(RuntimeError("injected streamed read fault"))
                         if s == "read" else None) if rank == 0 else None)
    r5b = _attempt(lambda: small.activate("b4"))
    small.fault_hook = None
    r5.update(pinned=st.pinned_bytes_now, budget=budget, streamed=st.streamed_loads, same=same,
              peak_inflight=st.peak_inflight_bytes, inflight_bound=st.inflight_bound, leaks=_leaks(small),
              serving=_serving_ok(mgr, serving))
    rec["cache budget exhausted"] = r5
    rec["streamed load fails"] = r5b | {"leaks": _leaks(small), "serving": _serving_ok(mgr, serving)}
    for n in ("b1", "b2", "b3", "b4"):
        small.unregister(n)
    mgr.unregister("b4")
    rec["cache budget exhausted"]["pinned_after_unregister"] = small.stats().pinned_bytes_now
    small.close()

    # 6. every slot is held by running batches
    mgr.register("s2", mine / "s2")
    mgr.register("x", mine / "x")
    mgr.activate("s2")
    busy = mgr.prepare_batch(["s1", "s2", None])
    digests = {n: mgr.pool.checksum(mgr.slot_of(n)) for n in ("s0", "s1", "s2")}
    try:
        mgr.prefetch("x")
        pre = None
    except NoFreeSlotError as e:
        pre = type(e).__name__
    rec["all slots held"] = _attempt(lambda: mgr.activate("x"))
    rec["all slots held"]["prefetch"] = pre
    rec["all slots held"]["leaks"] = _leaks(mgr)
    rec["all slots held"]["serving"] = [n for n, d in digests.items() if mgr.pool.checksum(mgr.slot_of(n)) != d]
    busy.release()
    rec["all slots held"]["after_release"] = _attempt(lambda: mgr.activate("x"))["exc"]

    # the end: nothing left behind
    held.release()
    for n in list(mgr.registered()):
        mgr.unregister(n)
    st = mgr.stats()
    rec["end"] = {"pinned": st.pinned_bytes_now, "reserved": mgr.cache.reserved_bytes,
                  "slots": list(mgr.pool.slot_name), "refcount": list(mgr.pool.refcount),
                  "failed_activations": st.failed_activations, "collectives": st.collectives}
    mgr.close()
    return rec


def _kill_worker(rank: int, world: int, root: str, victim: int, how: str) -> dict[str, Any]:
    """``how``: "exit_before" (os._exit right before activate, a load in flight), "exit_mid_transfer" (the
    victim's loader thread exits the process in the middle of its activation), "stall" (the victim's load
    hangs past the timeout, then the process exits: the others must give up after one timeout)."""
    mine = _private_copy(root, rank)
    mgr = _manager(rank, world)
    mgr.register("s0", mine / "s0")
    mgr.activate("s0")
    held = mgr.prepare_batch(["s0"])
    serving = {"s0": (mgr.slot_of("s0"), mgr.pool.checksum(mgr.slot_of("s0")))}
    mgr.register("k", mine / "k")
    if rank == victim:
        if how == "exit_before":
            mgr.prefetch("k")  # its load is in flight when the process dies
            os._exit(17)
        if how == "exit_mid_transfer":
            mgr.fault_hook = lambda a, s, i: os._exit(17) if i == 1 else None
        else:
            mgr.fault_hook = lambda a, s, i: (time.sleep(TIMEOUT_S + 1.5), os._exit(17)) if i == 0 else None
        mgr.activate("k")
        raise AssertionError("the victim survived its own death")
    rec = _attempt(lambda: mgr.activate("k"))
    rec["leaks"] = _leaks(mgr)
    rec["serving"] = _serving_ok(mgr, serving)
    rec["active"] = mgr.is_active("k")
    # the group is unusable after a lost peer: later activations fail fast, they do not hang
    again = _attempt(lambda: mgr.activate("k"))
    rec["again"] = (again["exc"], round(again["elapsed"], 3))
    rec["leaks_again"] = _leaks(mgr)
    held.release()
    mgr.unregister("k")
    mgr.unregister("s0")
    rec["pinned_end"] = mgr.stats().pinned_bytes_now
    mgr.close()
    return rec


# --------------------------------------------------------------------------------------------------
# the stress run
# --------------------------------------------------------------------------------------------------
class PoolModel:
    """The expected state: slot policy (free slot first, else the least recently used slot that no batch
    holds and no load reserves), refcounts, LRU clock, adapter states."""

    def __init__(self, slots: int):
        self.S = slots
        self.slot_name: list[str | None] = [None] * slots
        self.ref = [0] * slots
        self.reserved = [False] * slots
        self.last = [0] * slots
        self.clock = 0
        self.state: dict[str, str] = {}
        self.slot: dict[str, int | None] = {}

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def choose(self) -> tuple[int, str | None] | None:
        for i, n in enumerate(self.slot_name):
            if n is None and not self.reserved[i]:
                return i, None
        victims = [i for i in range(self.S) if self.ref[i] == 0 and not self.reserved[i]]
        if not victims:
            return None
        i = min(victims, key=lambda j: (self.last[j], j))
        return i, self.slot_name[i]

    def prefetch(self, n: str) -> bool:
        """False: NoFreeSlotError."""
        if self.state[n] in ("active", "loading"):
            return True
        c = self.choose()
        if c is None:
            return False
        i, victim = c
        if victim is not None and victim in self.state:
            self.state[victim], self.slot[victim] = "registered", None
        self.slot_name[i], self.reserved[i], self.last[i] = n, True, self.tick()
        self.state[n], self.slot[n] = "loading", i
        return True

    def free(self, n: str) -> None:
        s = self.slot.get(n)
        if s is not None and self.slot_name[s] == n:
            self.slot_name[s], self.reserved[s] = None, False
        self.state[n], self.slot[n] = "registered", None

    def activate(self, names: list[str], fault_on: str | None) -> tuple[bool, str | None, bool]:
        """(ok, reason kind, whether the fault fires): 'structural' failures (not registered, no free slot)
        fail on every rank, 'fault' only on the faulty rank."""
        structural = False
        started: list[str] = []
        held = [self.slot[n] for n in names if self.state.get(n) == "active"]
        for s in held:
            self.ref[s] += 1
            self.last[s] = self.tick()
        for n in names:
            if n not in self.state:
                structural = True
                continue
            if self.state[n] == "active":
                continue
            if self.state[n] != "loading" and not self.prefetch(n):
                structural = True
                continue
            started.append(n)
        for s in held:
            self.ref[s] -= 1
        fault = fault_on is not None and fault_on in started
        if structural or fault:
            for n in started:
                self.free(n)
            return False, "structural" if structural else "fault", fault
        for n in started:
            s = self.slot[n]
            self.reserved[s], self.last[s] = False, self.tick()
            self.state[n] = "active"
        return True, None, False

    def acquire(self, slots: list[int]) -> None:
        for s in sorted(set(slots)):
            self.ref[s] += 1
            self.last[s] = self.tick()

    def release(self, slots: list[int]) -> None:
        for s in sorted(set(slots)):
            self.ref[s] -= 1


def _stress_worker(rank: int, world: int, root: str, seed: int, n_ops: int) -> dict[str, Any]:
    from tp_lora.errors import AdapterActivationError, AdapterStateError, NoFreeSlotError

    import logging

    logging.getLogger("tp_lora").setLevel(logging.ERROR)  # hundreds of expected rollbacks: keep the log quiet
    t0 = time.monotonic()
    mine = _private_copy(root, rank)
    S = 3
    kw = dict(max_loras=S, max_lora_rank=4, target_modules=("q", "v", "o"), activation_timeout_s=30.0)
    # a reference load of every adapter (no faults) gives the digest each slot must show when active
    ref = _manager(rank, world, "tiny-dense", **kw)
    digest: dict[str, str] = {}
    for n in STRESS_NAMES:
        ref.register(n, mine / n)
        digest[n] = ref.pool.checksum(ref.activate(n)[n])
        ref.unregister(n)
    ref.close()
    from tp_lora.plan.validate import AdapterSource
    from tp_lora.plan.planner import plan_rank
    sizes = sorted(plan_rank(AdapterSource.open(mine / n, ref.model), ref.model, ref.parallel).nbytes
                   for n in STRESS_NAMES)
    # a budget of the median adapter: the larger half is streamed, the smaller ones evict each other
    mgr = _manager(rank, world, "tiny-dense", host_cache_bytes=sizes[len(sizes) // 2], **kw)
    model = PoolModel(S)
    rng = random.Random(seed)
    batches: list[tuple[Any, list[int]]] = []
    log: list[tuple[int, str, str]] = []  # (step, op, error message) - compared across ranks
    faults: dict[str, int] = {}
    counts: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    originals: dict[str, bytes] = {n: (mine / n / WEIGHTS).read_bytes() for n in STRESS_NAMES}

    def fail(step: int, what: str) -> None:
        raise AssertionError(f"rank {rank} step {step}: {what}")

    for step in range(n_ops):
        op = rng.choices(["register", "prefetch", "activate", "batch", "release", "unregister"],
                         weights=[14, 12, 33, 12, 18, 11])[0]
        counts[op] = counts.get(op, 0) + 1
        if op == "register":
            n = rng.choice(STRESS_NAMES)
            mgr.register(n, mine / n)
            if n not in model.state:
                model.state[n], model.slot[n] = "registered", None
        elif op == "prefetch":
            regs = sorted(model.state)
            if not regs:
                continue
            n = rng.choice(regs)
            try:
                mgr.prefetch(n)
                raised = False
            except NoFreeSlotError:
                raised = True
            if model.prefetch(n) == raised:
                fail(step, f"prefetch({n}): raised={raised}, model disagrees")
        elif op == "activate":
            pool = sorted(model.state) if model.state and rng.random() < 0.85 else STRESS_NAMES
            names = rng.sample(pool, min(len(pool), rng.choice([1, 1, 2])))
            fault_rank = fault_kind = fault_on = None
            cand = [n for n in names if model.state.get(n) == "registered"]
            if cand and rng.random() < 0.6:
                fault_on = rng.choice(cand)
                fault_rank = rng.randrange(world)
                fault_kind = rng.choice(["hook_h2d", "hook_read", "vanish", "nan", "truncate"])
            restore = None
            if fault_rank == rank:
                p = mine / fault_on / WEIGHTS
                if fault_kind != "hook_h2d":
                    mgr.cache.evict(fault_on)  # make the load cold, so the file is read
                if fault_kind in ("hook_h2d", "hook_read"):
                    stage = fault_kind[5:]
                    mgr.fault_hook = (lambda a, s, i, _n=fault_on, _s=stage:
                                      (_ for _ in ()).throw(RuntimeError(f"injected {_s} fault"))
                                      if a == _n and s == _s else None)
                elif fault_kind == "vanish":
                    p.rename(p.with_suffix(".gone"))
                    restore = lambda p=p: p.with_suffix(".gone").rename(p)  # noqa: E731
                elif fault_kind == "nan":
                    _nan_into(p, Q_A)  # q's A is read in full by every rank
                    restore = lambda p=p, b=originals[fault_on]: _rewrite_keeping_mtime(p, b)  # noqa: E731
                else:
                    _rewrite_keeping_mtime(p, originals[fault_on][:-10])
                    restore = lambda p=p, b=originals[fault_on]: _rewrite_keeping_mtime(p, b)  # noqa: E731
            expect_ok, why, fired = model.activate(names, fault_on)
            try:
                mgr.activate(names)
                err = None
            except AdapterActivationError as e:
                err = e
            finally:
                mgr.fault_hook = None
                if restore is not None:
                    restore()
            outcomes[why or "ok"] = outcomes.get(why or "ok", 0) + 1
            if fired:
                faults[fault_kind] = faults.get(fault_kind, 0) + 1
            if expect_ok != (err is None):
                fail(step, f"activate({names}) fault={fault_kind}@{fault_rank} on {fault_on}: expected "
                           f"ok={expect_ok} ({why}), got {err}")
            if err is not None:
                want = set(range(world)) if why == "structural" else {fault_rank}
                if set(err.failed_ranks) != want:
                    fail(step, f"activate({names}): failed ranks {sorted(err.failed_ranks)}, expected "
                               f"{sorted(want)}: {err}")
                log.append((step, "activate", str(err)))
        elif op == "batch":
            act = sorted(n for n, s in model.state.items() if s == "active")
            if not act:
                continue
            names = rng.sample(act, min(len(act), rng.choice([1, 2])))
            b = mgr.prepare_batch(names + [None])
            slots = [model.slot[n] for n in names]
            model.acquire(slots)
            batches.append((b, slots))
        elif op == "release":
            if not batches:
                continue
            b, slots = batches.pop(rng.randrange(len(batches)))
            b.release()
            model.release(slots)
        elif op == "unregister":
            regs = sorted(model.state)
            if not regs:
                continue
            n = rng.choice(regs)
            s = model.slot[n]
            busy = model.state[n] == "active" and s is not None and model.ref[s] > 0
            try:
                mgr.unregister(n)
                raised = False
            except AdapterStateError as e:
                raised = True
                log.append((step, "unregister", str(e).split(";")[0]))
            if raised != busy:
                fail(step, f"unregister({n}): raised={raised}, held={busy}")
            if not busy:
                if s is not None and model.slot_name[s] == n:
                    model.slot_name[s], model.reserved[s] = None, False
                del model.state[n], model.slot[n]
        # ---- compare with the model ----
        if sorted(mgr.registered()) != sorted(model.state):
            fail(step, f"registered {sorted(mgr.registered())} != model {sorted(model.state)}")
        for n, stt in model.state.items():
            a = mgr._adapters[n]
            if a.state != stt or (stt != "registered" and a.slot != model.slot[n]):
                fail(step, f"{op}: {n} is {a.state}@{a.slot}, model {stt}@{model.slot[n]}")
            if stt == "active" and mgr.pool.checksum(a.slot) != digest[n]:
                fail(step, f"{n} in slot {a.slot} is not bit-identical to its reference load")
        if (mgr.pool.slot_name != model.slot_name or mgr.pool.refcount != model.ref
                or mgr.pool.reserved != model.reserved):
            fail(step, f"pool {mgr.pool.slot_name} {mgr.pool.refcount} {mgr.pool.reserved} != model "
                       f"{model.slot_name} {model.ref} {model.reserved}")
        leaks = _leaks(mgr)
        if leaks:
            fail(step, f"after {op}: {leaks}")

    for b, slots in batches:
        b.release()
    for n in list(mgr.registered()):
        mgr.unregister(n)
    st = mgr.stats()
    out = {"counts": counts, "faults": faults, "outcomes": outcomes, "log": log, "pinned_end": st.pinned_bytes_now,
           "reserved_end": mgr.cache.reserved_bytes, "slots_end": list(mgr.pool.slot_name),
           "refcount_end": list(mgr.pool.refcount), "failed_activations": st.failed_activations,
           "activations": st.activations, "cache_evictions": st.cache_evictions,
           "streamed": st.streamed_loads, "peak_inflight": st.peak_inflight_bytes,
           "inflight_bound": st.inflight_bound, "elapsed": time.monotonic() - t0}
    mgr.close()
    return out


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tp_lora.plan.model import ModelSpec
    from tp_lora.job.synthetic import write_synthetic_adapter

    root = tmp_path_factory.mktemp("faults")
    moe = ModelSpec.from_preset("tiny-moe")
    for i, n in enumerate(["s0", "s1", "s2", "x", "vanish", "midread", "midh2d", "warm", "nan1", "k",
                           "b1", "b2", "b3", "b4", "hdr"]):
        write_synthetic_adapter(root / "shared" / n, moe, rank=4, seed=i, targets=("q", "k", "v", "o", "experts"))
    dense = ModelSpec.from_preset("tiny-dense")
    for i, n in enumerate(STRESS_NAMES):
        write_synthetic_adapter(root / "shared" / n, dense, rank=(2, 4, 3, 1)[i % 4], seed=100 + i,
                                targets=("q", "v", "o") if i % 2 else ("q", "v"), dtype=("bf16", "fp32")[i % 2])
    return root


def _same_everywhere(recs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    first = recs[0][key]
    for r, rec in enumerate(recs):
        got = rec[key]
        assert got["exc"] == first["exc"] and got["msg"] == first["msg"], f"{key}: rank {r} differs:\n{got}\n{first}"
    return first


@pytest.mark.parametrize("world", [2, 4])
def test_faults(adapters: Path, world: int) -> None:
    recs = run_distributed(_faults_worker, world, str(adapters), timeout=180)
    last = world - 1
    expect = {
        "header corrupt on one rank": ([1], "is not registered on this rank"),
        "file vanishes": ([last], "cannot open the weights"),
        "raise mid-read": ([0], "injected read fault at chunk 1"),
        "raise mid-h2d": ([last], "injected h2d fault"),
        "raise mid-warm-h2d": ([0], "injected warm h2d fault"),
        "NaN on one rank": ([1], "NaN/Inf values in adapter_model.safetensors"),
        "streamed load fails": ([0], "injected streamed read fault"),
        "all slots held": (list(range(world)), "NoFreeSlotError"),
    }
    for key, (failed, text) in expect.items():
        r = _same_everywhere(recs, key)
        assert r["exc"] == "AdapterActivationError", (key, r)
        assert r["failed"] == failed and text in r["msg"], (key, r)
        for rank, rec in enumerate(recs):
            assert rec[key]["elapsed"] < TIMEOUT_S, (key, rank, rec[key]["elapsed"])
            assert rec[key]["leaks"] == [] and rec[key]["serving"] == [], (key, rank, rec[key])
    for key in ("raise mid-read", "raise mid-h2d"):
        assert all(rec[key]["retry"] is None and rec[key]["chunks"] > 1 for rec in recs), key
    w = recs[0]["raise mid-warm-h2d"]
    assert w["first"] == [last] and w["cached"] and w["still_cached"], w
    assert all(rec["all slots held"]["prefetch"] == "NoFreeSlotError" for rec in recs), [r["all slots held"] for r in recs]
    assert all(rec["all slots held"]["after_release"] is None for rec in recs)
    for rank, rec in enumerate(recs):
        b = rec["cache budget exhausted"]
        assert b["exc"] is None and b["same"] == [True] * 3, (rank, b)
        assert b["pinned"] <= b["budget"] and b["peak_inflight"] <= b["inflight_bound"], (rank, b)
        assert b["leaks"] == [] and b["serving"] == [] and b["pinned_after_unregister"] == 0, (rank, b)
        if rank == 0:
            assert b["streamed"] == 3  # no budget at all: everything streamed through the ring
        end = rec["end"]
        assert end["pinned"] == 0 and end["reserved"] == 0, (rank, end)
        assert end["slots"] == [None] * 3 and end["refcount"] == [0] * 3, (rank, end)
        assert end["failed_activations"] == 8, (rank, end)
        assert rec["header corrupt on one rank"]["register"] == ("AdapterFormatError" if rank == 1 else None)


@pytest.mark.parametrize("world,how", [(2, "exit_before"), (4, "exit_before"), (2, "exit_mid_transfer"),
                                       (4, "exit_mid_transfer"), (2, "stall"), (4, "stall")])
def test_rank_killed_during_activation(adapters: Path, world: int, how: str) -> None:
    victim = world - 1
    t = time.monotonic()
    recs = run_distributed(_kill_worker, world, str(adapters), victim, how, timeout=60, may_exit=(victim,))
    assert recs[victim] is None
    for rank, rec in enumerate(recs[:victim]):
        assert rec["exc"] in ("CollectiveTimeoutError", "AdapterActivationError"), (rank, rec)
        assert rec["elapsed"] <= TIMEOUT_S + 1.0, (rank, rec["elapsed"])
        assert not rec["active"] and rec["leaks"] == [] and rec["serving"] == [], (rank, rec)
        assert rec["again"][0] == "CollectiveTimeoutError" and rec["again"][1] < 1.0, (rank, rec)
        assert rec["leaks_again"] == [] and rec["pinned_end"] == 0, (rank, rec)
    assert time.monotonic() - t < 60


def test_stress_2000_ops_4_ranks(adapters: Path) -> None:
    recs = run_distributed(_stress_worker, 4, str(adapters), STRESS_SEED, STRESS_OPS, timeout=240)
    for rank, rec in enumerate(recs):
        assert rec["log"] == recs[0]["log"], f"rank {rank} saw different errors"
        assert rec["pinned_end"] == 0 and rec["reserved_end"] == 0, (rank, rec)
        assert rec["slots_end"] == [None] * 3 and rec["refcount_end"] == [0] * 3, (rank, rec)
        assert rec["peak_inflight"] <= rec["inflight_bound"]
    r0 = recs[0]
    assert sum(r0["counts"].values()) == STRESS_OPS
    n_faults = sum(r0["faults"].values())
    assert n_faults >= 50 and len(r0["faults"]) == 5, r0["faults"]
    assert r0["streamed"] > 0 and r0["cache_evictions"] > 0, r0
    print(f"\nstress: {STRESS_OPS} ops {r0['counts']}, {n_faults} faults injected {r0['faults']}, "
          f"activations {r0['outcomes']}, "
          f"{r0['activations']} activations, {r0['failed_activations']} rolled back, "
          f"{r0['cache_evictions']} cache evictions, {r0['streamed']} streamed loads, leaks 0, "
          f"{max(r['elapsed'] for r in recs):.1f}s")


def test_activate_does_not_evict_its_own_names(tmp_path: Path) -> None:
    """Regression (found by the stress model): activate([a, c]) with a active and LRU chose a's slot for
    c, returned {a: None} and left a inactive."""
    from tp_lora.plan.model import ModelSpec
    from tp_lora.job.synthetic import write_synthetic_adapter

    mgr = _manager(0, 1, "tiny-dense", max_loras=2)
    dense = ModelSpec.from_preset("tiny-dense")
    for i, n in enumerate("abc"):
        mgr.register(n, write_synthetic_adapter(tmp_path / n, dense, rank=2, seed=i, targets=("q",)))
    mgr.activate("a")
    mgr.activate("b")
    out = mgr.activate(["a", "c"])
    assert out["a"] == 0 and out["c"] == 1 and mgr.is_active("a") and mgr.is_active("c")
    assert not mgr.is_active("b")
    mgr.close()

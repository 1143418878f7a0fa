"""The per-plan caches (``tp_lora.plan.memo.PerPlan``): one value per (plan, key), dropped with the plan,
and a plan's finalizer safe wherever the garbage collector runs it."""

from __future__ import annotations

import gc
import threading

from tp_lora.plan.memo import PerPlan


class _Plan:
    pass


def test_one_value_per_plan_and_key_dropped_with_the_plan() -> None:
    memo = PerPlan()
    p, q = _Plan(), _Plan()
    calls = []
    assert memo.get(p, "k", lambda: calls.append(1) or "v1") == "v1"
    assert memo.get(p, "k", lambda: calls.append(2) or "v2") == "v1"
    assert memo.get(q, "k", lambda: "w") == "w"
    assert calls == [1] and len(memo) == 2
    t = memo.table(p, "views")
    assert memo.table(p, "views") is t
    del p
    gc.collect()
    assert len(memo) == 1


def test_a_dead_plans_finalizer_inside_a_lookup_does_not_deadlock() -> None:
    """A plan in a reference cycle is freed by the cyclic collector at any allocation, on any thread,
    also while that thread is inside ``get``'s locked section: its finalizer must not need the lock (it
    did, and the thread hung there forever: a rank that never reached its activation's exchange)."""
    memo = PerPlan()
    p = _Plan()
    p.cycle = p
    memo.get(p, "k", lambda: 1)
    del p
    done = threading.Event()

    def lookup_in_progress() -> None:
        with memo._lock:   # where get() allocates: the collector may run the finalizer here
            gc.collect()
        done.set()

    threading.Thread(target=lookup_in_progress, daemon=True).start()
    assert done.wait(10), "the plan's finalizer deadlocked on the memo's lock"
    assert len(memo) == 0

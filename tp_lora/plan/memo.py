"""Caches of values derived from a SlicePlan, each kept by the module that derives them.

A plan is immutable and lives as long as its adapter is registered; what other modules compute from it
(the packing into chunks, the pool coverage, the placement views) is memoised so that a warm activation
does not walk thousands of slices again. The cache lives with its owner, not inside the plan: nobody
writes another module's state. Entries die with the plan (a weak reference), so ids are never reused
for a stale entry.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")


class PerPlan:
    """``memo.get(plan, key, make)``: ``make()`` once per (plan, key), dropped when the plan dies."""

    def __init__(self) -> None:
        self._d: dict[int, dict[Hashable, Any]] = {}
        self._lock = threading.Lock()

    def get(self, plan: object, key: Hashable, make: Callable[[], T]) -> T:
        pid = id(plan)
        with self._lock:
            d = self._d.get(pid)
            if d is not None and key in d:
                return d[key]
        value = make()  # outside the lock: packing a large plan must not stall other plans' lookups
        with self._lock:
            d = self._d.get(pid)
            if d is None:
                d = self._d[pid] = {}
                weakref.finalize(plan, self._forget, pid)
            return d.setdefault(key, value)

    def table(self, plan: object, key: Hashable) -> dict:
        """A mutable dict owned by the caller, one per (plan, key) (e.g. memoised device views)."""
        return self.get(plan, key, dict)

    def _forget(self, pid: int) -> None:
        # The plan's finalizer. It runs wherever the garbage collector frees a dead plan (a plan in a
        # reference cycle dies at any allocation of any thread), also inside ``get``'s locked section on
        # this very thread: taking ``_lock`` here deadlocked that thread forever (seen as a rank hanging
        # in its activation, 2026-12-03). A dict's pop is atomic on its own, and only a dead plan's
        # entry is popped, which no lookup can want any more.
        self._d.pop(pid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

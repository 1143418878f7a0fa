"""PinnedCache: per-rank host cache of this rank's packed slices, one entry per adapter.

Lazy: an entry is created and filled at the adapter's first transfer, chunk by chunk, by the pipeline.
A later activation of a complete entry is pure H2D. Budgeted in bytes; whole adapters are evicted LRU
when not in flight. An adapter larger than the budget (or one that cannot fit because other adapters
are in flight) is streamed through a bounded ring instead, and the stats say so.

The cache holds host buffers it gets from an allocator (the pinned arena on CUDA, plain memory on CPU)
and gives them back to it when an entry goes (``free``); it never pins anything itself, so it has no
CUDA code. Its budget is a budget of the arena: the arena's in-use bytes are the cache's plus the ring.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class CacheEntry:
    name: str
    fingerprint: str
    chunk_sizes: tuple[int, ...]
    keys: tuple[str, ...]  # cache keys (<adapter>/<canonical>) of the slices it holds
    buffers: list[torch.Tensor | None]
    complete: bool = False
    inflight: int = 0
    last_used: int = 0
    last_event: Any = None  # device event of the last H2D that read these buffers
    # set while the engine fills some of its buffers after the load that began it (device/mapper.py):
    # the entry is in flight until then; ``evict`` waits for it
    filling: threading.Event | None = None

    @property
    def nbytes(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers if b is not None)


@dataclass
class CacheStats:
    budget_bytes: int
    pinned_bytes: int = 0  # bytes of host buffers held by entries (== planned bytes of cached adapters)
    planned_bytes: int = 0  # planned bytes of the complete entries
    entries: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    streamed_loads: int = 0  # adapters loaded without caching (too large / no room)
    streamed_names: list[str] = field(default_factory=list)


class PinnedCache:
    def __init__(self, budget_bytes: int, alloc: Callable[[int], torch.Tensor],
                 wait_event: Callable[[Any], None] = lambda ev: None,
                 free: Callable[[torch.Tensor], None] | None = None):
        if budget_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {budget_bytes}")
        self.budget = budget_bytes
        self._alloc = alloc
        self._wait_event = wait_event
        self._free = free
        self._entries: dict[str, CacheEntry] = {}
        self._reserved = 0  # bytes promised to entries (complete or being filled)
        self._lock = threading.RLock()
        self._clock = 0
        self.stats = CacheStats(budget_bytes=budget_bytes)

    # -- lookup ----------------------------------------------------------------------------------
    def lookup(self, name: str, fingerprint: str, chunk_sizes: tuple[int, ...]) -> CacheEntry | None:
        """A complete entry for exactly this adapter and plan, marked in flight; else None (a miss)."""
        with self._lock:
            e = self._entries.get(name)
            if e is not None and e.complete and e.fingerprint == fingerprint and e.chunk_sizes == chunk_sizes:
                e.inflight += 1
                self._clock += 1
                e.last_used = self._clock
                self.stats.hits += 1
                return e
            if e is not None and e.inflight == 0 and (e.fingerprint != fingerprint or
                                                      e.chunk_sizes != chunk_sizes):
                self._drop(e)  # stale: another file under the same name, or another chunking
            self.stats.misses += 1
            return None

    def begin(self, name: str, fingerprint: str, chunk_sizes: tuple[int, ...],
              keys: tuple[str, ...]) -> CacheEntry | None:
        """Reserve budget for a new entry (evicting LRU entries not in flight). None: stream it."""
        total = sum(chunk_sizes)
        with self._lock:
            old = self._entries.get(name)
            if old is not None:
                if old.inflight:
                    return None  # another load of the same name is filling it: stream this one
                self._drop(old)
            if total > self.budget or not self._make_room(total):
                self.stats.streamed_loads += 1
                self.stats.streamed_names.append(name)
                del self.stats.streamed_names[:-32]
                return None
            self._clock += 1
            e = CacheEntry(name, fingerprint, tuple(chunk_sizes), keys, [None] * len(chunk_sizes),
                           inflight=1, last_used=self._clock)
            self._entries[name] = e
            self._reserved += total
            return e

    def alloc_chunk(self, entry: CacheEntry, index: int) -> torch.Tensor:
        """The host buffer of chunk ``index`` (allocated, i.e. pinned, now: lazily, at first transfer)."""
        buf = self._alloc(entry.chunk_sizes[index])
        with self._lock:
            entry.buffers[index] = buf
            self.stats.pinned_bytes += buf.numel()
        return buf

    def finish(self, entry: CacheEntry, ok: bool, event: Any = None) -> None:
        """End a fill (ok: the entry is complete) or a warm read; release the in-flight mark."""
        with self._lock:
            entry.inflight -= 1
            if event is not None:
                entry.last_event = event
            if not entry.complete:
                if ok and all(b is not None for b in entry.buffers):
                    entry.complete = True
                    self.stats.planned_bytes += entry.nbytes
                    self.stats.entries += 1
                elif entry.inflight == 0:
                    self._drop(entry)

    def release(self, entry: CacheEntry, event: Any = None) -> None:
        self.finish(entry, True, event)

    # -- eviction --------------------------------------------------------------------------------
    def evict(self, name: str, fill_wait_s: float = 60.0) -> bool:
        """Drop ``name`` if cached and not in flight (unregister, or a file that changed). An entry whose
        buffers are still being filled after its load (``filling``) is waited for first, up to
        ``fill_wait_s`` (outside the lock: the fill ends by ``finish``)."""
        with self._lock:
            e = self._entries.get(name)
            filling = e.filling if e is not None else None
        if filling is not None and not filling.is_set():
            filling.wait(fill_wait_s)
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.inflight:
                return False
            self._drop(e)
            return True

    def _make_room(self, need: int) -> bool:
        victims = sorted((e for e in self._entries.values() if e.inflight == 0 and e.complete),
                         key=lambda e: e.last_used)
        if self.budget - self._reserved + sum(v.nbytes for v in victims) < need:
            return False  # even evicting every idle entry would not make room: keep them, stream this one
        for v in victims:
            if self.budget - self._reserved >= need:
                break
            self._drop(v)
            self.stats.evictions += 1
        return True

    def _drop(self, e: CacheEntry) -> None:
        if e.last_event is not None:
            self._wait_event(e.last_event)  # an H2D may still read these buffers
        self.stats.pinned_bytes -= e.allocated_bytes
        if self._free is not None:
            for b in e.buffers:
                if b is not None:
                    self._free(b)
        if e.complete:
            self.stats.planned_bytes -= e.nbytes
            self.stats.entries -= 1
        e.buffers = [None] * len(e.buffers)
        self._reserved -= e.nbytes
        if self._entries.get(e.name) is e:
            del self._entries[e.name]

    # -- introspection ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if e.complete]

    def keys(self, name: str) -> tuple[str, ...]:
        with self._lock:
            e = self._entries.get(name)
            return e.keys if e is not None and e.complete else ()

    def contains(self, name: str) -> bool:
        with self._lock:
            e = self._entries.get(name)
            return e is not None and e.complete

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

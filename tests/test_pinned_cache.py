"""PinnedCache: lazy, per-rank, byte-budgeted, LRU over whole adapters, streaming fallback.

Unit tests drive the cache with a counting allocator; manager tests check the promises end to end:
register reads and allocates nothing, pinned bytes == planned bytes, a warm activation reads 0 bytes
and pins 0 new bytes, the budget holds with LRU eviction, an adapter larger than the budget is streamed
within ``engine.inflight_bound``.
"""

from __future__ import annotations

import pytest
import torch

from support.runtime_ref import ALL_DENSE, ReadRecorder, expected_slot, make_adapter, new_manager, slot_diff
from tp_lora.errors import ConfigError
from tp_lora.host.pinned_cache import PinnedCache


class Alloc:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, n: int) -> torch.Tensor:
        self.calls.append(n)
        return torch.empty(n, dtype=torch.uint8)


def _fill(c: PinnedCache, name: str, sizes: tuple[int, ...], fp: str = "f") -> bool:
    e = c.begin(name, fp, sizes, (f"{name}/k",))
    if e is None:
        return False
    for i in range(len(sizes)):
        c.alloc_chunk(e, i)
    c.finish(e, True)
    return True


# ------------------------------------------------------------------------------------------------
# unit
# ------------------------------------------------------------------------------------------------
def test_fill_hit_and_byte_accounting():
    al = Alloc()
    c = PinnedCache(1000, al)
    assert c.lookup("a", "f", (100, 200)) is None and c.stats.misses == 1
    e = c.begin("a", "f", (100, 200), ("a/x",))
    assert e is not None and al.calls == []  # budget reserved, nothing allocated yet
    assert c.reserved_bytes == 300 and c.stats.pinned_bytes == 0 and not c.contains("a")
    c.alloc_chunk(e, 0)
    assert al.calls == [100] and c.stats.pinned_bytes == 100 and c.stats.planned_bytes == 0
    c.alloc_chunk(e, 1)
    c.finish(e, True)
    assert c.contains("a") and c.names() == ["a"] and c.keys("a") == ("a/x",)
    assert c.stats.pinned_bytes == c.stats.planned_bytes == 300 and c.stats.entries == 1
    hit = c.lookup("a", "f", (100, 200))
    assert hit is e and hit.inflight == 1 and c.stats.hits == 1
    c.release(hit)
    assert hit.inflight == 0 and al.calls == [100, 200]


def test_budget_lru_evicts_whole_adapters_not_in_flight():
    c = PinnedCache(1000, Alloc())
    assert _fill(c, "a", (200, 200)) and _fill(c, "b", (400,))
    e = c.lookup("a", "f", (200, 200))  # a is now more recent than b
    c.release(e)
    assert _fill(c, "c", (300, 100))  # 400 + 400 + 400 > 1000: evicts b (LRU), not a
    assert sorted(c.names()) == ["a", "c"] and c.stats.evictions == 1
    assert c.stats.pinned_bytes == c.stats.planned_bytes == 800 <= c.budget
    held = c.lookup("a", "f", (200, 200))  # a in flight: never a victim
    assert _fill(c, "d", (500,))  # evicts c (the only one not in flight)
    assert sorted(c.names()) == ["a", "d"]
    # a (400, in flight) + e (700) > 1000 even without d: stream e, and keep d (evicting it is useless)
    assert not _fill(c, "e", (700,))
    assert c.stats.streamed_loads == 1 and c.stats.streamed_names == ["e"]
    assert sorted(c.names()) == ["a", "d"] and c.stats.evictions == 2
    c.release(held)
    assert c.stats.pinned_bytes == 900 and c.reserved_bytes == 900
    # a's last use (the lookup) is older than d's fill: a goes first, then d (500 free is not enough)
    assert _fill(c, "e", (600,))
    assert c.names() == ["e"] and c.stats.pinned_bytes == 600 and c.stats.evictions == 4


def test_larger_than_budget_streams_and_keeps_everything():
    c = PinnedCache(500, Alloc())
    assert _fill(c, "a", (300,))
    assert not _fill(c, "big", (400, 200))
    assert c.names() == ["a"] and c.stats.pinned_bytes == 300 and c.stats.evictions == 0
    assert c.stats.streamed_names == ["big"]


def test_failed_fill_is_dropped_and_stale_entries_replaced():
    al = Alloc()
    c = PinnedCache(1000, al)
    e = c.begin("a", "f1", (100, 100), ())
    c.alloc_chunk(e, 0)
    c.finish(e, False)
    assert c.names() == [] and c.stats.pinned_bytes == 0 and c.reserved_bytes == 0
    assert _fill(c, "a", (100, 100), fp="f1")
    # another file under the same name, or another chunking: a miss, and the stale entry goes
    assert c.lookup("a", "f2", (100, 100)) is None
    assert c.names() == [] and c.stats.pinned_bytes == 0 and c.reserved_bytes == 0
    assert _fill(c, "a", (100, 100), fp="f1")
    assert c.lookup("a", "f1", (200,)) is None and c.reserved_bytes == 0
    # evict(): refused while in flight
    assert _fill(c, "a", (100, 100), fp="f1")
    h = c.lookup("a", "f1", (100, 100))
    assert not c.evict("a")
    c.release(h)
    assert c.evict("a") and c.stats.pinned_bytes == 0 and not c.evict("a")


def test_negative_budget_rejected():
    with pytest.raises(ValueError):
        PinnedCache(-1, Alloc())
    with pytest.raises(ConfigError):
        new_manager("tiny-dense", host_cache_bytes=-1)


# ------------------------------------------------------------------------------------------------
# through the manager
# ------------------------------------------------------------------------------------------------
def _count_alloc(mgr) -> list[int]:
    calls: list[int] = []
    real = mgr.cache._alloc

    def alloc(n):
        calls.append(n)
        return real(n)

    mgr.cache._alloc = alloc
    return calls


def test_register_is_lazy(adir, monkeypatch):
    path = make_adapter(adir, "lazy", "tiny-moe", rank=8, dtype="bf16", fused_experts=True, seed=1)
    with new_manager("tiny-moe", tp=2, rank=1, ep=2, max_loras=2) as mgr:
        allocs = _count_alloc(mgr)
        zero = mgr.pool.checksum(0)
        rec = ReadRecorder(monkeypatch)
        plan = mgr.register("x", path)
        # register reads only the header and the content fingerprint's sample (issue 14), allocates nothing
        from tp_lora.format.fingerprint import sample_offsets
        h = mgr.header("x")
        sample = sample_offsets(h.file_size, 8 + h.header_bytes, h.header_digest, mgr.config.fingerprint_sample_bytes)
        assert sum(n for _, n in rec.reads) <= 8 + h.header_bytes + sum(n for _, n in sample) and allocs == []
        st = mgr.stats()
        assert st.pinned_bytes_now == st.pinned_planned_now == 0 and st.loads == 0 and st.bytes_read == 0
        assert mgr.cache.names() == [] and mgr.cache.reserved_bytes == 0
        assert mgr.pool.slot_name == [None, None] and mgr.pool.checksum(0) == mgr.pool.checksum(1) == zero
        assert st.registered == 1 and st.bytes_full == plan.full_bytes > plan.nbytes
        mgr.activate("x")
        assert rec.nbytes >= plan.nbytes and sum(allocs) == mgr.stats().pinned_bytes_now


@pytest.mark.parametrize("rank", [8, 4])
def test_pinned_bytes_equal_planned_bytes(adir, rank):
    paths = [make_adapter(adir, f"pp{rank}-{i}", preset, rank=rank, dtype=dt, targets=tg, seed=30 + i)
             for i, (preset, dt, tg) in enumerate([("tiny-dense", "bf16", ALL_DENSE), ("tiny-dense", "fp32", ("q", "o")),
                                                   ("tiny-dense", "fp16", ("embed", "down"))])]
    with new_manager("tiny-dense", tp=2, rank=1, max_loras=1, max_lora_rank=8) as mgr:
        allocs = _count_alloc(mgr)
        planned = 0
        for i, p in enumerate(paths):
            planned += mgr.register(f"a{i}", p).nbytes
            mgr.activate(f"a{i}")
            st = mgr.stats()
            assert st.pinned_bytes_now == st.pinned_planned_now == planned == sum(allocs)
        assert sorted(mgr.cache.names()) == ["a0", "a1", "a2"]


def test_pinned_bytes_equal_planned_bytes_odd_sizes(adir):
    # rank 3, bf16: the embed A slice of rank 1 is 3 x 122 x 2 = 732 bytes (not a multiple of 16)
    p = make_adapter(adir, "odd3", "tiny-dense", rank=3, dtype="bf16", targets=ALL_DENSE, seed=40)
    with new_manager("tiny-dense", tp=2, rank=1, max_loras=1) as mgr:
        plan = mgr.register("a", p)
        mgr.activate("a")
        st = mgr.stats()
        assert st.pinned_bytes_now == st.pinned_planned_now == plan.nbytes


def test_warm_activation_reads_and_pins_nothing(adir, monkeypatch):
    a = make_adapter(adir, "warm-a", "tiny-qwen2-moe", rank=8, dtype="bf16", seed=2)
    b = make_adapter(adir, "warm-b", "tiny-qwen2-moe", rank=4, dtype="fp32", seed=3)
    with new_manager("tiny-qwen2-moe", tp=2, rank=0, max_loras=1, dtype="bfloat16") as mgr:
        mgr.register("a", a)
        mgr.register("b", b)
        mgr.activate("a")
        sum_a = mgr.pool.checksum(0)
        mgr.activate("b")  # evicts a from the pool; both stay in the host cache
        allocs = _count_alloc(mgr)
        pinned = mgr.stats().pinned_bytes_now
        rec = ReadRecorder(monkeypatch)
        mgr.activate("a")
        monkeypatch.undo()
        assert rec.reads == [] and allocs == []
        st = mgr.stats()
        assert st.pinned_bytes_now == pinned and st.warm_loads == 1 and st.cache_hits == 1
        ls = st.load_stats[-1]
        assert ls["warm"] and ls["bytes_read"] == 0 and ls["bytes_pinned"] == 0
        assert ls["bytes_copied"] > 0
        assert mgr.pool.checksum(0) == sum_a
        assert slot_diff(mgr.pool, 0, expected_slot(a, mgr.model, 2, 0, 1, mgr.pool)) == []


def test_budget_respected_with_lru_of_whole_adapters(adir):
    paths = {n: make_adapter(adir, f"lru-{n}", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=50 + i)
             for i, n in enumerate("abc")}
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1) as probe:
        size = probe.register("a", paths["a"]).nbytes
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, host_cache_bytes=2 * size + size // 2) as mgr:
        for n, p in paths.items():
            assert mgr.register(n, p).nbytes == size
        seen = []
        for n, want in [("a", ["a"]), ("b", ["a", "b"]), ("a", ["a", "b"]), ("c", ["a", "c"]), ("b", ["b", "c"])]:
            mgr.activate(n)
            assert sorted(mgr.cache.names()) == want, (n, mgr.cache.names())
            st = mgr.stats()
            assert st.pinned_bytes_now == st.pinned_planned_now == size * len(want) <= mgr.config.host_cache_bytes
            seen.append(st.load_stats[-1]["warm"])
            assert slot_diff(mgr.pool, 0, expected_slot(paths[n], mgr.model, 2, 0, 1, mgr.pool)) == []
        assert seen == [False, False, True, False, False]
        st = mgr.stats()
        assert st.cache_evictions == 2 and st.streamed_loads == 0
        # unregister drops the adapter's host bytes
        mgr.activate("c")
        mgr.unregister("b")
        assert mgr.cache.names() == ["c"] and mgr.stats().pinned_bytes_now == size


@pytest.mark.parametrize("chunk_bytes", [4096, 8192])
def test_adapter_larger_than_budget_is_streamed_within_inflight_bound(adir, chunk_bytes):
    # fp32 rank 16: the embed A slice alone is 16 x 128 x 4 = 8192 bytes (> a 4096-byte chunk)
    small = make_adapter(adir, "st-small", "tiny-dense", rank=4, dtype="bf16", targets=("q",), seed=60)
    big = make_adapter(adir, "st-big", "tiny-dense", rank=16, dtype="fp32", targets=ALL_DENSE, seed=61)
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, max_lora_rank=16, chunk_bytes=chunk_bytes,
                     ring_slots=3, host_cache_bytes=20000, read_mode="exact") as mgr:
        ps = mgr.register("small", small).nbytes
        pb = mgr.register("big", big)
        assert pb.nbytes > 20000 and max(op.nbytes for op in pb.ops) >= 8192
        for i, n in enumerate(["small", "big", "small", "big"]):
            mgr.activate(n)
            st = mgr.stats()
            ls = st.load_stats[-1]
            assert ls["streamed"] == (n == "big") and ls["warm"] == (i == 2)
            assert mgr.cache.names() == ["small"] and st.pinned_bytes_now == ps  # nothing evicted for big
            assert st.inflight_bound == 3 * chunk_bytes
            assert st.peak_inflight_bytes <= st.inflight_bound
            if n == "big":
                assert ls["bytes_read"] == pb.nbytes and st.peak_inflight_bytes > 0
            want = expected_slot(big if n == "big" else small, mgr.model, 2, 0, 1, mgr.pool)
            assert slot_diff(mgr.pool, 0, want) == []
        assert st.streamed_loads == 2 and mgr.cache.stats.streamed_names == ["big", "big"]

"""HostArena (host/memory.py): blocks of exact sizes in reused slabs, ranges coalesce, reservation ahead
(in the background), slabs above the limit released once empty; through the manager: the cache draws
from the arena, pinned in use == planned bytes of cached adapters, and a later adapter reuses freed
bytes (the reservation does not grow per load)."""

from __future__ import annotations

import pytest
import torch

from support.runtime_ref import ALL_DENSE, expected_slot, make_adapter, new_manager, slot_diff
from tp_lora.host.memory import Device, HostArena


def _arena(limit=1 << 16, slab=1 << 14):
    return HostArena(Device("cpu"), limit, slab_bytes=slab, workers=2)


def test_blocks_exact_sizes_reuse_and_coalesce():
    a = _arena()
    x = a.alloc(1000)
    y = a.alloc(3000)
    st = a.snapshot()
    assert x.numel() == 1000 and y.numel() == 3000 and st.in_use_bytes == 4000 and st.slabs == 1
    assert st.reserved_bytes == 1 << 14 and st.grow_in_load == 1  # nothing reserved ahead: grown in the load
    x.fill_(1)
    y.fill_(2)
    assert int(x.sum()) == 1000 and int(y.sum()) == 6000  # disjoint
    a.free(x)
    a.free(y)
    st = a.snapshot()
    assert st.in_use_bytes == 0 and st.free_bytes == st.reserved_bytes == 1 << 14  # coalesced back
    z = a.alloc(1 << 14)  # the whole slab again: only possible if the ranges coalesced
    assert a.snapshot().slabs == 1
    a.free(z)
    with pytest.raises(ValueError):
        a.free(z)  # twice
    with pytest.raises(ValueError):
        a.free(torch.empty(10, dtype=torch.uint8))  # not ours
    a.close()


def test_reservation_counted_in_slabs_never_grows_in_the_load():
    """Blocks of 0.4 slab fill a slab only to 0.8: a reservation of their byte sum runs short (the
    arena grows inside a load, pinning fresh memory there), one of ``fit_bytes`` does not."""
    sizes = [int(0.4 * (1 << 14))] * 10
    for by_bytes in (True, False):
        a = _arena(limit=1 << 20)
        a.reserve(sum(sizes) if by_bytes else a.fit_bytes(sizes))
        a.wait_reserved()
        blocks = [a.alloc(n) for n in sizes]
        assert (a.snapshot().grow_in_load > 0) == by_bytes
        for b in blocks:
            a.free(b)
        a.close()
    a = _arena()
    big = _arena(slab=8 << 20)  # slabs of 8 MiB; reservations round to 2 MiB
    assert big.fit_bytes([]) == 0 and big.fit_bytes([8 << 20]) == 8 << 20
    assert big.fit_bytes([1000]) == 2 << 20  # a small need: a small last slab, not a whole one
    assert big.fit_bytes([20 << 20]) == 20 << 20  # larger than a slab: its own, rounded as alloc rounds it
    # largest first: 5M + 3M | 5M -> one full slab and the emptiest bin (5M) rounded to 6M
    assert big.fit_bytes([5 << 20, 5 << 20, 3 << 20]) == (8 << 20) + (6 << 20)
    big.close()
    a.close()


def test_reserve_ahead_in_background_and_release_above_limit():
    a = _arena(limit=1 << 15, slab=1 << 14)
    futs = a.reserve(1 << 20)  # capped at the limit
    a.wait_reserved()
    assert len(futs) == 2 and all(f.done() for f in futs)
    st = a.snapshot()
    assert st.reserved_bytes == 1 << 15 and st.reserve_s >= 0 and st.reserve_bg_s >= 0
    blocks = [a.alloc(1 << 14) for _ in range(2)]
    assert a.snapshot().grow_in_load == 0  # both came from the reservation
    extra = a.alloc(1 << 14)  # beyond the limit: grown anyway (correctness first) ...
    assert a.snapshot().reserved_bytes == 3 << 14
    a.free(extra)  # ... and released once empty
    assert a.snapshot().reserved_bytes == 1 << 15
    for b in blocks:
        a.free(b)
    assert a.snapshot().reserved_bytes == 1 << 15  # within the limit: kept for reuse
    a.close()


@pytest.fixture(scope="module")
def adir(tmp_path_factory):
    return tmp_path_factory.mktemp("arena_adapters")


def test_cache_draws_from_the_arena_and_reuses_it(adir):
    paths = [make_adapter(adir, f"ar{i}", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=30 + i)
             for i in range(3)]
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=1, chunk_bytes=4096) as mgr:
        plans = [mgr.register(f"a{i}", p) for i, p in enumerate(paths)]
        mgr.engine.wait_prepared()  # the reservation is topped up (in slabs) once the plans are packed
        reserved0 = mgr.stats().pinned_reserved_bytes
        assert reserved0 >= sum(p.nbytes for p in plans)  # reserved while registering, ahead of any load
        for i, p in enumerate(paths):
            mgr.activate(f"a{i}")
            st = mgr.stats()
            assert st.pinned_bytes_now == st.pinned_planned_now == sum(pl.nbytes for pl in plans[:i + 1])
            ar = mgr.arena.snapshot()
            assert ar.in_use_bytes == st.pinned_bytes_now  # cache entries are arena blocks
            assert st.pinned_free_bytes == ar.free_bytes and st.pinned_reserved_bytes == reserved0
            assert slot_diff(mgr.pool, 0, expected_slot(p, mgr.model, 2, 0, 1, mgr.pool)) == []
        assert mgr.arena.snapshot().grow_in_load == 0
        mgr.unregister("a0")  # its blocks go back ...
        assert mgr.arena.snapshot().in_use_bytes == plans[1].nbytes + plans[2].nbytes
        mgr.register("a0", paths[0])
        mgr.activate("a0")  # ... and are reused: the reservation did not grow
        assert mgr.stats().pinned_reserved_bytes == reserved0


def test_a_stuck_background_reservation_does_not_stall_alloc(monkeypatch):
    """A slab reserved in the background that never comes (its pinning or its device touch hangs): alloc
    waits for it at most ``PENDING_WAIT_S``, then pins a slab itself; the late slab joins the arena
    when it comes."""
    import threading
    import time

    from tp_lora.host import memory

    monkeypatch.setattr(memory, "PENDING_WAIT_S", 0.2)
    a = _arena(limit=1 << 15, slab=1 << 14)
    gate = threading.Event()
    real = a._new_slab

    def stuck(n):
        if threading.current_thread().name.startswith("tp_lora-arena"):
            gate.wait(30)
        return real(n)
    monkeypatch.setattr(a, "_new_slab", stuck)
    a.reserve(1 << 14)
    t = time.monotonic()
    x = a.alloc(1000)
    waited = time.monotonic() - t
    assert 0.15 <= waited < 5 and x.numel() == 1000 and a.snapshot().grow_in_load == 1
    gate.set()
    a.wait_reserved()
    assert a.snapshot().slabs == 2
    a.free(x)
    a.close()


def test_smaps_huge_bytes_counts_only_the_ranges_share() -> None:
    """The arena's THP diagnostics: AnonHugePages of the mappings that overlap its slabs, each scaled by
    the share of the mapping inside them; other mappings and malformed lines are not counted."""
    from tp_lora.host.memory import smaps_huge_bytes

    text = "\n".join([
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 ",   # 4 MiB: the slab, 2 MiB of it huge
        "Size:               4096 kB",
        "AnonHugePages:      2048 kB",
        "7f0000400000-7f0000c00000 rw-p 00000000 00:00 0 ",   # 8 MiB, half inside the second range
        "AnonHugePages:      8192 kB",
        "7f1000000000-7f1000200000 rw-p 00000000 00:00 0 ",   # outside every range
        "AnonHugePages:      2048 kB",
        "zzzz-yyyy rw-p 00000000 00:00 0 ",
        "AnonHugePages:      2048 kB",
    ])
    ranges = [(0x7f0000000000, 4 << 20), (0x7f0000400000, 4 << 20)]
    assert smaps_huge_bytes(text, ranges) == (2 << 20) + (4 << 20)
    assert smaps_huge_bytes(text, []) == 0

"""GpuPool: buffer shapes, deterministic slot allocation, LRU, refcounts, zero padding, and
load -> evict -> reload cycles that must give bit-identical slot contents (CPU pool, world 1).

Slot contents are compared with ``runtime_ref.expected_slot``: built from the full safetensors tensors and
the one TP reference (tests/support/tp_reference.py; no planner), so a wrong slice, destination, cast or stray write fails.
"""

from __future__ import annotations

import random

import pytest
import torch

from support.runtime_ref import ALL_DENSE, expected_slot, make_adapter, new_manager, slot_diff, slot_is_zero
from tp_lora.errors import AdapterActivationError, NoFreeSlotError, PoolError
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.device.pool import GpuPool

ALL_MODULES = ("q", "k", "v", "o", "gate", "up", "down", "shared.gate", "shared.up", "shared.down",
               "experts.w1", "experts.w3", "experts.w2", "embed", "lm_head")


def _pool(preset="tiny-dense", tp=1, rank=0, ep=1, S=3, R=8, dtype=torch.float32):
    return GpuPool(ModelSpec.from_preset(preset), ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep),
                   max_loras=S, max_rank=R, modules=ALL_MODULES, dtype=dtype, device="cpu")


# ------------------------------------------------------------------------------------------------
# shapes (hand-computed from the presets)
# ------------------------------------------------------------------------------------------------
def test_shapes_dense_tp2():
    # tiny-dense: h=64, 4 heads x 16, 2 kv heads, I=128, vocab 250 -> padded 256 -> 128 per rank
    p = _pool("tiny-dense", tp=2, rank=1, S=3, R=8)
    want = {"q": ((8, 64), (32, 8)), "k": ((8, 64), (16, 8)), "v": ((8, 64), (16, 8)),
            "o": ((8, 32), (64, 8)), "gate": ((8, 64), (64, 8)), "up": ((8, 64), (64, 8)),
            "down": ((8, 64), (64, 8)), "embed": ((8, 128), (64, 8)), "lm_head": ((8, 64), (128, 8))}
    assert set(p.shapes) == set(want)
    for m, (a, b) in want.items():
        L = 1 if m in ("embed", "lm_head") else 2
        assert tuple(p.A[m].shape) == (3, L) + a, m
        assert tuple(p.B[m].shape) == (3, L) + b, m
        assert tuple(p.scaling[m].shape) == (3, L, 1)
        assert p.scaling[m].dtype == torch.float32 and p.A[m].dtype == torch.float32
    assert p.slot_bytes() == sum(p.A[m][0].numel() * 4 + p.B[m][0].numel() * 4 for m in want)


def test_shapes_moe_tp4_ep2_and_kv_replication():
    # tiny-moe: 8 experts, moe I=32; tp=4, ep=2 -> moe_tp=2: 4 local experts, 16 rows each.
    # kv heads 2 < tp 4: one (replicated) kv head per rank. All layers MoE: no dense gate/up/down.
    p = _pool("tiny-moe", tp=4, rank=3, ep=2, S=2, R=4)
    assert set(p.shapes) == {"q", "k", "v", "o", "experts.w1", "experts.w3", "experts.w2", "embed", "lm_head"}
    assert tuple(p.B["q"].shape) == (2, 2, 16, 4)
    assert tuple(p.B["k"].shape) == (2, 2, 16, 4)
    assert tuple(p.A["o"].shape) == (2, 2, 4, 16)
    assert tuple(p.A["experts.w1"].shape) == (2, 2, 4, 4, 64)
    assert tuple(p.B["experts.w3"].shape) == (2, 2, 4, 16, 4)
    assert tuple(p.A["experts.w2"].shape) == (2, 2, 4, 4, 16)
    assert tuple(p.B["experts.w2"].shape) == (2, 2, 4, 64, 4)
    assert tuple(p.scaling["experts.w2"].shape) == (2, 2, 4)
    assert tuple(p.A["embed"].shape) == (2, 1, 4, 64)  # 256 / 4
    # qwen2-moe: shared expert I=64 over tp=2
    q = _pool("tiny-qwen2-moe", tp=2, rank=0, ep=2, S=1, R=4)
    assert tuple(q.B["shared.gate"].shape) == (1, 2, 32, 4)
    assert tuple(q.A["shared.down"].shape) == (1, 2, 4, 32)
    assert tuple(q.A["experts.w1"].shape) == (1, 2, 4, 4, 64)  # ep=2: 4 local experts, moe_tp=1
    assert tuple(q.B["experts.w1"].shape) == (1, 2, 4, 32, 4)


def test_pool_rejects_bad_sizes():
    with pytest.raises(PoolError):
        _pool(S=0)
    with pytest.raises(PoolError):
        _pool(R=0)


# ------------------------------------------------------------------------------------------------
# slot allocation: deterministic, LRU, refcounts
# ------------------------------------------------------------------------------------------------
def _drive(pool: GpuPool, seed: int, steps: int = 300) -> list:
    """A random sequence of pool calls; returns every observable decision."""
    rng = random.Random(seed)
    log = []
    for i in range(steps):
        op = rng.choice(["load", "load", "acquire", "release", "free"])
        if op == "load":
            try:
                slot, victim = pool.choose_slot()
            except NoFreeSlotError:
                log.append(("full",))
                continue
            evicted = pool.reserve(slot, f"a{i}")
            assert evicted == victim
            if rng.random() < 0.1:
                pool.free(slot)  # a rolled-back load
                log.append(("rollback", slot))
            else:
                pool.commit(slot)
                log.append(("load", slot, victim))
        else:
            used = [s for s in range(pool.max_loras) if pool.slot_name[s] is not None]
            if not used:
                continue
            s = rng.choice(used)
            if op == "acquire":
                pool.acquire(s)
            elif op == "release" and pool.refcount[s]:
                pool.release(s)
            elif op == "free" and not pool.refcount[s]:
                pool.free(s)
            log.append((op, s))
    return log


def test_allocation_is_deterministic():
    kinds = set()
    for seed in range(5):
        a, b = _pool(S=3), _pool(S=3)
        la, lb = _drive(a, seed), _drive(b, seed)
        assert la == lb
        assert a.slot_name == b.slot_name and a.refcount == b.refcount
        kinds |= {x[0] for x in la}
        assert any(x[0] == "load" and x[2] is not None for x in la)  # evictions happened
    assert {"full", "rollback", "acquire", "release", "free"} <= kinds  # the walk covered every path


def test_free_slots_first_then_lru_victim_never_held_or_reserved():
    p = _pool(S=3)
    # free slots are taken in index order
    for i, n in enumerate("abc"):
        s, v = p.choose_slot()
        assert (s, v) == (i, None)
        p.reserve(s, n)
        if n != "c":
            p.commit(s)
    # c is still loading (reserved): never a victim; a is the least recently used
    assert p.choose_slot() == (0, "a")
    p.acquire(0)  # a batch uses a: now b is the LRU, and a is held
    assert p.choose_slot() == (1, "b")
    p.acquire(1)
    with pytest.raises(NoFreeSlotError, match="held"):
        p.choose_slot()  # a, b held; c reserved
    p.commit(2)
    assert p.choose_slot() == (2, "c")
    p.acquire(2)
    with pytest.raises(NoFreeSlotError):
        p.choose_slot()
    p.release(1)
    assert p.choose_slot() == (1, "b")
    # a freed slot is preferred over any victim
    p.release(2)
    p.free(2)
    assert p.choose_slot() == (2, None)
    assert p.slot_name == ["a", "b", None]
    # evictions are counted at reserve
    ev = p.evictions
    assert p.reserve(1, "d") == "b" and p.evictions == ev + 1


def test_refcount_misuse_raises():
    p = _pool(S=2)
    p.reserve(0, "a")
    p.commit(0)
    with pytest.raises(PoolError):
        p.release(0)
    p.acquire(0)
    p.acquire(0)
    with pytest.raises(PoolError, match="never evicted"):
        p.reserve(0, "b")
    with pytest.raises(PoolError):
        p.free(0)
    p.release(0)
    p.release(0)
    with pytest.raises(PoolError):
        p.release(0)
    p.free(0)
    assert p.slot_name == [None, None]


def test_checksum_sees_every_buffer_of_its_slot_only():
    p = _pool("tiny-qwen2-moe", tp=2, rank=1, S=3, R=4, dtype=torch.bfloat16)
    base = [p.checksum(s) for s in range(3)]
    assert base[0] == base[1] == base[2]
    for m in p.shapes:
        for buf in (p.A[m], p.B[m], p.scaling[m]):
            flat = buf[1].view(-1)
            flat[-1] = 1.0
            assert p.checksum(1) != base[1], m
            assert p.checksum(0) == base[0] and p.checksum(2) == base[2]
            flat[-1] = 0.0
            assert p.checksum(1) == base[1]
    p.A["q"][2, 0, 0, 0] = 2.0
    p.clear_slot(2)
    assert p.checksum(2) == base[2] and slot_is_zero(p, 2)


# ------------------------------------------------------------------------------------------------
# through the manager: bit-identical reloads, zero padding, held slots
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["warm", "streamed", "evicting"])
def test_load_evict_reload_bit_identical(adir, cache):
    a = make_adapter(adir, "a8", "tiny-moe", rank=8, dtype="bf16", fused_experts=True,
                     targets=("q", "k", "v", "o", "experts", "embed", "lm_head"), seed=1)
    b = make_adapter(adir, "b4", "tiny-moe", rank=4, dtype="fp16", targets=("q", "v", "experts"), seed=2)
    budget = {"warm": 1 << 30, "streamed": 0, "evicting": None}[cache]
    mgr = new_manager("tiny-moe", tp=4, rank=2, ep=2, max_loras=1, host_cache_bytes=budget or 1,
                      dtype="bfloat16")
    with mgr:
        pa, pb = mgr.register("a", a).nbytes, mgr.register("b", b).nbytes
        if cache == "evicting":  # room for the larger one only: every load evicts the other
            mgr.close()
            mgr = new_manager("tiny-moe", tp=4, rank=2, ep=2, max_loras=1, dtype="bfloat16",
                              host_cache_bytes=max(pa, pb) + 64)
            mgr.register("a", a), mgr.register("b", b)
        ref = {"a": expected_slot(a, mgr.model, 4, 2, 2, mgr.pool), "b": expected_slot(b, mgr.model, 4, 2, 2, mgr.pool)}
        sums: dict[str, str] = {}
        for n in "abababa":
            assert mgr.activate(n) == {n: 0}
            assert slot_diff(mgr.pool, 0, ref[n]) == []
            sums.setdefault(n, mgr.pool.checksum(0))
            assert mgr.pool.checksum(0) == sums[n]
            assert mgr.is_active(n) and not mgr.is_active("b" if n == "a" else "a")
        st = mgr.stats()
        assert st.loads == 7 and st.slot_evictions == 6
        assert st.warm_loads == {"warm": 5, "streamed": 0, "evicting": 0}[cache]
        assert st.streamed_loads == {"warm": 0, "streamed": 7, "evicting": 0}[cache]
        assert sums["a"] != sums["b"]
    mgr.close()


def test_smaller_rank_into_used_slot_is_zero_padded(adir):
    big = make_adapter(adir, "big8", "tiny-dense", rank=8, dtype="fp32", targets=ALL_DENSE, seed=3)
    small = make_adapter(adir, "small2", "tiny-dense", rank=2, dtype="fp32", targets=("q", "v"), seed=4)
    with new_manager("tiny-dense", tp=2, rank=1, max_loras=1) as mgr:
        mgr.register("big", big)
        mgr.register("small", small)
        mgr.activate("big")
        assert all(mgr.pool.A[m][0].abs().sum() > 0 for m in mgr.pool.shapes)  # every module written
        mgr.activate("small")  # evicts big from the only slot
        p = mgr.pool
        assert slot_diff(p, 0, expected_slot(small, mgr.model, 2, 1, 1, p)) == []
        for m in ("q", "v"):
            assert not p.A[m][0, :, 2:, :].any() and not p.B[m][0, :, :, 2:].any(), m
            assert p.A[m][0, :, :2, :].abs().min() > 0 and p.B[m][0, :, :, :2].abs().min() > 0


def test_untargeted_modules_zero_with_zero_scaling(adir):
    big = make_adapter(adir, "big8", "tiny-dense", rank=8, dtype="fp32", targets=ALL_DENSE, seed=3)
    small = make_adapter(adir, "small2", "tiny-dense", rank=2, dtype="fp32", targets=("q", "v"), seed=4)
    with new_manager("tiny-dense", tp=2, rank=1, max_loras=1) as mgr:
        mgr.register("big", big)
        mgr.register("small", small)
        mgr.activate("big")
        mgr.activate("small")
        p = mgr.pool
        for m in p.shapes:
            if m in ("q", "v"):
                # synthetic default alpha = 2 * r: scaling 2.0 on every layer
                assert torch.equal(p.scaling[m][0], torch.full_like(p.scaling[m][0], 2.0)), m
                continue
            assert not p.A[m][0].any() and not p.B[m][0].any(), m
            assert not p.scaling[m][0].any(), m


def test_held_slots_are_never_evicted(adir):
    names = {n: make_adapter(adir, f"h{n}", "tiny-dense", rank=4, dtype="bf16", targets=("q", "o"), seed=10 + i)
             for i, n in enumerate("abc")}
    with new_manager("tiny-dense", tp=2, rank=0, max_loras=2) as mgr:
        for n, p in names.items():
            mgr.register(n, p)
        assert mgr.activate(["a", "b"]) == {"a": 0, "b": 1}
        sums = [mgr.pool.checksum(0), mgr.pool.checksum(1)]
        batch = mgr.prepare_batch(["a", None, "b"], [2, 1, 3])
        assert batch.token_slots.tolist() == [0, 0, -1, 1, 1, 1]
        assert mgr.pool.refcount == [1, 1]
        with pytest.raises(NoFreeSlotError):
            mgr.prefetch("c")
        with pytest.raises(AdapterActivationError, match="NoFreeSlotError"):
            mgr.activate("c")
        assert [mgr.pool.checksum(0), mgr.pool.checksum(1)] == sums
        assert mgr.is_active("a") and mgr.is_active("b") and not mgr.is_active("c")
        batch2 = mgr.prepare_batch(["b"])
        batch.release()
        batch.release()  # idempotent
        assert mgr.pool.refcount == [0, 1]
        # a is free of references (and the LRU one): c takes its slot; b (held) is untouched
        assert mgr.activate("c") == {"c": 0}
        assert mgr.pool.checksum(1) == sums[1] and not mgr.is_active("a")
        batch2.release()
        assert mgr.pool.refcount == [0, 0]


def test_lru_victim_follows_batch_use(adir):
    names = {n: make_adapter(adir, f"l{n}", "tiny-dense", rank=4, dtype="bf16", targets=("q",), seed=20 + i)
             for i, n in enumerate("abc")}
    with new_manager("tiny-dense", max_loras=2) as mgr:
        for n, p in names.items():
            mgr.register(n, p)
        mgr.activate("a")
        mgr.activate("b")
        with mgr.prepare_batch(["a"]):  # a used after b: b is now the least recently used
            pass
        assert mgr.activate("c") == {"c": 1}
        assert mgr.is_active("a") and not mgr.is_active("b")

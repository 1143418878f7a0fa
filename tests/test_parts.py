"""Cold loads pipelined by parts of a chunk (chunk = cache/placement unit, part = read/H2D unit)."""

from __future__ import annotations

import pytest

from support.runtime_ref import ALL_DENSE, expected_slot, make_adapter, new_manager, slot_diff


@pytest.mark.parametrize("preset,tp,ep,fused", [("tiny-dense", 2, 1, False), ("tiny-moe", 4, 2, True),
                                                ("tiny-moe", 2, 2, False)])
def test_parts_cold_and_warm_equal_reference(adir, preset, tp, ep, fused):
    targets = ALL_DENSE if preset == "tiny-dense" else ("q", "k", "v", "o", "experts", "embed", "lm_head")
    path = make_adapter(adir, f"{preset}-{fused}", preset, rank=8, dtype="bf16", targets=targets, seed=5,
                        fused_experts=fused)
    for rank in range(tp):
        with new_manager(preset, tp=tp, rank=rank, ep=ep, max_loras=1, max_lora_rank=8,
                         chunk_bytes=1 << 16, part_bytes=4096, dtype="float32") as mgr:
            plan = mgr.register("a", path)
            mgr.register("b", path)
            chunks = plan.chunks(mgr.engine.chunk_bytes, mgr.engine.part_bytes)
            assert any(len(c.parts) > 1 for c in chunks), "the test must exercise several parts per chunk"
            # parts tile each chunk exactly, in order
            for c in chunks:
                assert c.parts[0].start == 0 and c.parts[-1].end == c.nbytes
                assert all(a.end == b.start for a, b in zip(c.parts, c.parts[1:]))
            want = expected_slot(path, mgr.model, tp, rank, ep, mgr.pool)
            for name in ("a", "b", "a"):  # cold, cold (evicts a from the slot), warm from the cache
                mgr.activate(name)
                assert slot_diff(mgr.pool, 0, want) == []
            st = mgr.stats()
            assert [x["warm"] for x in st.load_stats] == [False, False, True]
            if fused:  # fused-expert B columns interleave experts: span reads (documented)
                assert st.load_stats[0]["bytes_read"] > plan.nbytes
            else:
                assert st.load_stats[0]["bytes_read"] == plan.nbytes  # every planned byte read once
            assert st.pinned_bytes_now == st.pinned_planned_now == 2 * plan.nbytes

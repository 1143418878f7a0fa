"""Packing (plan/packing.py): chunks, parts, scatter runs and span reads, and the read strategies.

Cold loads pipelined by parts of a chunk (chunk = cache/placement unit, part = read/H2D unit) equal the
reference for every read mode; "exact" reads every owned byte once and nothing else (strided spans
aside), "span"/"auto" read what the packing says (bytes read == the packing's count) while the cache still
holds only owned bytes.
"""

from __future__ import annotations

import pytest

from support.runtime_ref import ALL_DENSE, ReadRecorder, expected_slot, make_adapter, new_manager, slot_diff
from tp_lora.plan.validate import AdapterSource
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.packing import ReadCost, pack, read_counts, span_of, stream_units
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.plan.planner import plan_rank


@pytest.fixture
def adir(tmp_path_factory):
    return tmp_path_factory.mktemp("parts")


@pytest.mark.parametrize("preset,tp,ep,fused", [("tiny-dense", 2, 1, False), ("tiny-moe", 4, 2, True),
                                                ("tiny-moe", 2, 2, False), ("tiny-moe", 4, 1, False)])
@pytest.mark.parametrize("read_mode,backend", [("exact", "preadv"), ("auto", "preadv"), ("span", "preadv"),
                                               ("exact", "io_uring"), ("auto", "io_uring")])
def test_parts_cold_and_warm_equal_reference(adir, preset, tp, ep, fused, read_mode, backend):
    from tp_lora.host import uring

    if backend == "io_uring" and not uring.available():
        pytest.skip("this kernel / seccomp profile refuses io_uring")
    targets = ALL_DENSE if preset == "tiny-dense" else ("q", "k", "v", "o", "experts", "embed", "lm_head")
    path = make_adapter(adir, f"{preset}-{fused}", preset, rank=8, dtype="bf16", targets=targets, seed=5,
                        fused_experts=fused)
    for rank in range(tp):
        with new_manager(preset, tp=tp, rank=rank, ep=ep, max_loras=1, max_lora_rank=8,
                         chunk_bytes=1 << 16, part_bytes=4096, dtype="float32", read_mode=read_mode,
                         read_backend=backend) as mgr:
            plan = mgr.register("a", path)
            mgr.register("b", path)
            chunks = mgr.engine.chunks(plan)
            assert any(len(c.parts) > 1 for c in chunks), "the test must exercise several parts per chunk"
            # parts tile each chunk exactly, in order
            for c in (c for c in chunks if c.parts):  # a chunk smaller than a part is one part
                assert c.parts[0].start == 0 and c.parts[-1].end == c.nbytes
                assert all(a.end == b.start for a, b in zip(c.parts, c.parts[1:]))
            want = expected_slot(path, mgr.model, tp, rank, ep, mgr.pool)
            for name in ("a", "b", "a"):  # cold, cold (evicts a from the slot), warm from the cache
                mgr.activate(name)
                assert slot_diff(mgr.pool, 0, want) == []
            st = mgr.stats()
            assert [x["warm"] for x in st.load_stats] == [False, False, True]
            counts = read_counts(mgr.engine.chunks(plan))
            assert st.load_stats[0]["bytes_read"] == counts.read  # what the packing says, nothing else
            assert st.load_stats[0]["syscalls"] == counts.syscalls
            if fused:  # fused-expert B columns interleave experts: span reads (documented)
                assert st.load_stats[0]["bytes_read"] > plan.nbytes
            elif read_mode == "exact":
                assert st.load_stats[0]["bytes_read"] == plan.nbytes  # every planned byte read once
            elif backend == "preadv":  # tiny row slices (o/down A at tp=2) are cheaper as spans by the cost model
                assert st.load_stats[0]["bytes_read"] > plan.nbytes and counts.span_ops > 0
            if backend == "io_uring" and read_mode == "exact":  # several direct reads a part: batched
                assert st.load_stats[0]["ring_reads"] > 0
            assert st.pinned_bytes_now == st.pinned_planned_now == 2 * plan.nbytes


@pytest.mark.parametrize("preset,tp,ep,fused", [("tiny-moe", 4, 2, True), ("tiny-dense", 4, 1, False)])
def test_os_preadv_fallback_reads_the_same(adir, monkeypatch, preset, tp, ep, fused):
    """Where libc's preadv is not reachable through ctypes the reader uses os.preadv (one memoryview per
    iovec): the same slots, the same byte and syscall counts."""
    from tp_lora.host import reader

    targets = ALL_DENSE if preset == "tiny-dense" else ("q", "k", "v", "o", "experts")
    path = make_adapter(adir, f"fb-{preset}-{fused}", preset, rank=8, dtype="bf16", targets=targets, seed=6,
                        fused_experts=fused)
    if reader._PREADV is not None:
        monkeypatch.setattr(reader, "_PREADV", None)
    for rank in (0, tp - 1):
        with new_manager(preset, tp=tp, rank=rank, ep=ep, max_loras=1, max_lora_rank=8,
                         chunk_bytes=1 << 16, part_bytes=4096, dtype="float32", read_mode="auto") as mgr:
            plan = mgr.register("a", path)
            mgr.activate("a")
            assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, tp, rank, ep, mgr.pool)) == []
            counts = read_counts(mgr.engine.chunks(plan))
            ls = mgr.stats().load_stats[0]
            assert (ls["bytes_read"], ls["syscalls"]) == (counts.read, counts.syscalls)


# ------------------------------------------------------------------------------------------------
# packing units (pure)
# ------------------------------------------------------------------------------------------------
def _plan(adir, preset, tp, rank, ep=1, **kw):
    path = make_adapter(adir, f"unit-{preset}-{sorted(kw.items())}", preset, rank=8, dtype="bf16", seed=3, **kw)
    model = ModelSpec.from_preset(preset)
    header = AdapterSource.open(path, model, name="u")
    return path, plan_rank(header, model, ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep))


def test_modes_read_counts_and_cost_model(adir):
    _, plan = _plan(adir, "tiny-dense", 4, 1, targets=ALL_DENSE)
    partial = [op for op in plan.ops if op.cols[0] > 0 or op.cols[1] < op.src_shape[1]]
    assert partial and all(op.nrows > 1 for op in partial)  # o/down A: short rows at tp=4
    exact, span, auto = (read_counts(pack(plan, 1 << 20, 4096, m)) for m in ("exact", "span", "auto"))
    assert exact.owned == span.owned == auto.owned == plan.nbytes
    assert exact.read == plan.nbytes and exact.span_ops == 0
    assert span.span_ops == len(partial) and span.read > plan.nbytes and span.syscalls < exact.syscalls
    # the span of a slice covers its rows from the first owned byte of the first row to the last of the last
    for op in partial:
        f, n = span_of(op)
        row = op.src_shape[1] * op.itemsize
        assert n == (op.nrows - 1) * row + op.ncols * op.itemsize and f >= op.src_offset
    # auto picks per slice: tiny rows -> span; with syscalls free it reads exactly
    assert auto.span_ops == len(partial)
    free_sys = ReadCost(syscall_s=0.0, copy_s=0.0)
    assert read_counts(pack(plan, 1 << 20, 4096, "auto", free_sys)).read == plan.nbytes
    assert all(not free_sys.prefers_span(op) for op in partial)
    assert all(ReadCost().prefers_span(op) for op in partial)
    with pytest.raises(ValueError, match="read_mode"):
        pack(plan, 1 << 20, None, "bogus")  # type: ignore[arg-type]


def test_pack_is_memoised_per_plan_and_streams_cut_rows(adir):
    _, plan = _plan(adir, "tiny-dense", 2, 0, targets=ALL_DENSE)
    a = pack(plan, 4096, None, "auto")
    assert pack(plan, 4096, None, "auto") is a and plan.chunks(4096) is a  # the planner's shortcut
    assert pack(plan, 4096, None, "exact") is not a
    units = stream_units(plan, 512, None, "exact")
    assert all(u.nbytes <= 512 for u in units if u.ops[0].ncols * u.ops[0].itemsize <= 512)
    big = [u for u in units if u.row0 > 0]
    assert big, "a slice larger than a ring buffer is cut into row pieces"
    # the pieces of one slice tile its rows in order
    by_key: dict = {}
    for u in units:
        if len(u.ops) == 1:
            by_key.setdefault(u.ops[0].key, []).append(u)
    for key, us in by_key.items():
        if len(us) > 1:
            rows = [u.ops[0].rows for u in us]
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
            assert [u.row0 for u in us] == [r[0] - rows[0][0] for r in rows]


def test_fused_spans_merge_in_span_modes(adir):
    _, plan = _plan(adir, "tiny-moe", 4, 0, ep=2, fused_experts=True,
                    targets=("q", "o", "experts", "embed"))
    exact, auto = (read_counts(pack(plan, 1 << 20, None, m)) for m in ("exact", "auto"))
    def bytes_read_twice(mode):
        n = 0
        for c in pack(plan, 1 << 20, None, mode):
            iv = [(s.file_offset, s.file_offset + s.nbytes) for s in c.spans]
            for f, pieces, _, _ in c.reads:
                iv.append((f, f + sum(k for _, k in pieces)))
            iv.sort()
            n += sum(max(0, a[1] - b[0]) for a, b in zip(iv, iv[1:]))
        return n

    # overlapping spans of the experts of one fused tensor are read once, not once per expert (what
    # remains is the fused A rows that w1 and w3 both copy: two slices of the same bytes)
    assert bytes_read_twice("auto") < bytes_read_twice("exact")
    # spans are folded into the scatter reads outside exact mode: their slices are copied out after
    assert all(not c.spans for c in pack(plan, 1 << 20, None, "auto"))
    assert read_counts(pack(plan, 1 << 20, None, "auto")).span_ops >= read_counts(
        pack(plan, 1 << 20, None, "exact")).span_ops  # the strided ones, plus short rows by the cost model
    assert auto.syscalls < exact.syscalls
    assert exact.owned == auto.owned == plan.nbytes


@pytest.mark.parametrize("read_mode", ["exact", "span"])
def test_recorded_reads_match_the_packing(adir, monkeypatch, read_mode):
    path = make_adapter(adir, "rec", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=21)
    with new_manager("tiny-dense", tp=4, rank=2, max_loras=1, read_mode=read_mode) as mgr:
        plan = mgr.register("x", path)
        rec = ReadRecorder(monkeypatch)
        mgr.activate("x")
        monkeypatch.undo()
        data_start = 8 + mgr._adapters["x"].header.header_bytes
        counts = read_counts(mgr.engine.chunks(plan))
        assert sum(n for o, n in rec.reads if o >= data_start) == counts.read
        assert sum(o >= data_start for o, _ in rec.reads) == counts.syscalls
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 4, 2, 1, mgr.pool)) == []
        st = mgr.stats()
        assert st.pinned_bytes_now == st.pinned_planned_now == plan.nbytes  # owned bytes only


def test_file_order_units_for_sharded_moe(adir):
    """MoE at TP without EP: the slices of one expert are file neighbours but land in different parts of
    the module-sorted chunk; file-order units merge their reads (fewer syscalls), the last unit of a
    chunk copies the whole chunk, and the units still read every owned byte."""
    _, plan = _plan(adir, "tiny-moe", 4, 0, ep=1, targets=("q", "k", "v", "o", "experts"))
    exact, auto = pack(plan, 1 << 16, 4096, "exact"), pack(plan, 1 << 16, 4096, "auto")
    assert read_counts(auto).syscalls * 2 < read_counts(exact).syscalls
    fo = [c for c in auto if any(u.start == u.end for u in c.parts)]
    assert fo, "file-order units expected for a sharded MoE chunk"
    for c in fo:
        assert all(u.start == u.end == 0 for u in c.parts[:-1]) and (c.parts[-1].start, c.parts[-1].end) == (0, c.nbytes)
        # the units' reads cover exactly the chunk's reads
        assert sorted(r for u in c.parts for r in u.reads) == sorted(c.reads)
        assert sorted((s.file_offset, s.nbytes) for u in c.parts for s in u.spans) == \
            sorted((s.file_offset, s.nbytes) for s in c.spans)
    assert all(u.start < u.end for c in exact for u in c.parts)  # exact keeps packed-order parts

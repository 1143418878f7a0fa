"""Packing: how a rank's SlicePlan is cut into pipeline units and read from the file. Pure: no I/O.

    chunk   slices packed back to back: the cache unit, one H2D copy when warm, placed on the device by
            one strided copy per CopyGroup (same module, side, shape, consecutive destination blocks)
    part    the cold pipeline's unit (read, then H2D as it arrives): a byte range of a chunk, or, where
            that saves syscalls, a file-ordered share of the chunk's reads (H2D after the chunk's last)
    reads   scatter reads: (file offset, ((buffer offset, bytes), ...)), one ``preadv`` each, built once
            per plan (the hot loop only turns them into memoryviews and calls preadv, which drops the GIL)
    spans   coalesced span reads: one contiguous file range read into scratch memory, from which strided
            slices are copied to their packed place (fused-expert B columns interleave experts at element
            granularity; a column slice of a small tensor is many tiny rows)

Whether a step-1 slice of many short rows is read exactly (one syscall per row) or as a span (its whole
row range once, then one strided copy) is the cost model's choice (``ReadCost``, per slice): extra bytes
against saved syscalls. In both cases only owned bytes land in the chunk: the pinned cache holds exactly
the planned bytes, and the read counters report bytes read beside bytes owned.

``pack(plan, chunk_bytes, part_bytes, read_mode)`` is memoised here, per plan (a warm activation must not
re-pack 5000 slices); ``stream_units`` cuts chunks larger than a ring buffer into row pieces.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..format.dtypes import safetensors_itemsize
from ..format.modules import POOL_MODULES
from .memo import PerPlan

if TYPE_CHECKING:  # packing consumes plans; the planner imports this module for its chunks() shortcut
    from .planner import SliceOp, SlicePlan

ReadMode = Literal["auto", "exact", "span"]
READ_MODES: tuple[str, ...] = ("auto", "exact", "span")

IOV_MAX = 512
"""iovecs per preadv: well under Linux's 1024."""

MAX_SPAN_BYTES = 64 << 20
"""Neighbouring spans are merged up to this size (the scratch of one reader thread)."""

_MODULE_ORDER = {m: i for i, m in enumerate(POOL_MODULES)}

ScatterRead = tuple[int, tuple[tuple[int, int], ...], tuple["SpanCopy", ...], int]
"""(file offset, pieces, copies, scratch bytes): one preadv of a contiguous file range. A piece
(offset, bytes) with offset >= 0 lands in the chunk buffer; offset < 0 lands at scratch[-offset - 1]
(a gap between owned ranges, cheaper to read than another syscall, or a span). ``copies`` are the
strided copies of the span slices out of the scratch after the read, batched (``SpanCopy``)."""



SCRATCH_BYTES = 8 << 20
"""Most scratch one scatter read uses (a reader thread's scratch buffer)."""


@dataclass(frozen=True)
class ReadCost:
    """The per-slice cost model of reading exactly vs as a span (wall seconds of a load's readers).

    The readers run in parallel, but the Python around each call holds the GIL: per-call Python adds up
    serially, bytes are copied at the readers' aggregate bandwidth. Defaults from the H200 host
    (docs/PERF_NOTES.md): Rank 0 of Llama-3-70B TP=8 read exactly issued 11k preadv of 2 KiB rows and took
    4.8x the floor with 16 readers (about 8 us of wall time per call), while page cache -> memory runs at
    about 30 GB/s with 16 threads; copying span slices out of the scratch costs about 1 us a slice (one
    gather per copy group of a read).

    ``batched`` (the io_uring readers): reads without span gathers go in one submission per part, so they
    cost ``syscall_s`` each (one io_uring request, kernel time on every reader in parallel) and no
    Python; reads with gathers out of the scratch (spans) still run one by one in Python,
    ``scratch_call_s`` each. Exact pieces at most ``junk_gap()`` bytes apart are joined into one request
    whose gap iovecs all land on the same junk bytes of the reader's scratch (never read back: the chunk
    still receives only owned bytes, and the request stays in the batch); ``join_exact=False`` keeps one
    request per contiguous owned range (the 2026-12-02 behaviour, for the benchmark's comparison).
    Spans are merged as by the preadv readers.
    """

    syscall_s: float = 8e-6
    byte_s: float = 1 / 30e9
    copy_s: float = 1e-6
    scratch_call_s: float | None = None  # None: syscall_s
    batched: bool = False
    shared_spans: bool = False  # a span pays only its share of a merged read (measured worse: RING_COST)
    join_exact: bool = True  # batched: exact pieces joined through junk gaps (``junk_gap``)

    @property
    def scratch_s(self) -> float:
        return self.syscall_s if self.scratch_call_s is None else self.scratch_call_s

    def prefers_span(self, op: "SliceOp") -> bool:
        """Step-1 slice of ``op.nrows`` rows of ``ncols`` of ``src_shape[1]`` columns: span if cheaper.

        A span pays one scratch read, its gather and its bytes (``shared_spans``: only its share of a
        read merged with neighbouring spans, up to ``SCRATCH_BYTES``; the bench's comparison)."""
        exact = op.nrows * self.syscall_s + op.nbytes * self.byte_s
        n = span_of(op)[1]
        share = min(1.0, n / SCRATCH_BYTES) if self.shared_spans else 1.0
        span = self.scratch_s * share + self.copy_s + n * self.byte_s
        return span < exact

    def merge_gap(self) -> int:
        """Bytes of gap between two pieces (or spans) worth reading into scratch to save one read."""
        return int(self.scratch_s / self.byte_s)

    def junk_gap(self) -> int:
        """Batched readers: bytes of gap between two exact pieces worth reading (into junk) to save one
        request of the batch; -1: never (``join_exact`` off, or not batched)."""
        return int(self.syscall_s / self.byte_s) if self.batched and self.join_exact else -1


DEFAULT_COST = ReadCost()
"""The preadv readers: every read is a Python call (~7-8 us of it GIL-held, serialised over the readers)."""

RING_COST = ReadCost(syscall_s=0.37e-6, byte_s=1 / 37e9, scratch_call_s=8e-6, batched=True)
"""The io_uring readers (host/uring.py), from the reads alone on the H200 host with 16 readers
(docs/PERF_NOTES.md row 30): one request of a batch costs ~0.37 us of wall (joining the rows of a
Qwen3-30B-A3B rank of TP=8 saved 99k requests and 33 ms for 138 MB more; Llama-3-70B r64 and r128 ranks
of TP=8: 0.39-0.43 us per request saved), bytes go at ~37 GB/s (the floor's pattern). Row slices are not
read as spans: Llama-3.1-70B r128, rank of TP=8, reads 21k rows of 1.44 GB instead of 277 spans of
2.13 GB. Rows less than ``junk_gap()`` (13.7 kB) apart share one request, their gaps read onto junk
bytes: the 192-byte rows of the experts' down_proj A (1.3 kB gaps) join, the 2 KiB rows of a 70B
o_proj A (14 KiB gaps) sit at the break-even (measured equal) and stay one request each. Charging a span
only its share of a merged read (``shared_spans``) was measured and rejected: spans between direct reads
do not merge (the bytes between them are read directly), so a Qwen3-30B-A3B rank of TP=8 issued 6192
scratch reads one by one in Python and took 1.36 s instead of 0.16 s (docs/PERF_NOTES.md row 21)."""


@dataclass(frozen=True)
class CopyGroup:
    """A run of same-shaped slices, packed back to back, whose destinations are consecutive blocks:
    placed on the device by ONE strided copy (with the dtype cast)."""

    module: str
    side: str
    dtype: str
    shape: tuple[int, int]
    flat_start: int
    count: int
    byte_offset: int  # in the chunk

    @property
    def nbytes(self) -> int:
        return self.count * self.shape[0] * self.shape[1] * safetensors_itemsize(self.dtype)


@dataclass(frozen=True)
class SpanCopy:
    """Span slices of one scatter read that belong to one CopyGroup, copied out of the scratch by ONE
    gather (a torch op per slice, ~10-20 us of Python each under the GIL, serialised 16 readers: the
    tiny-slice MoE case had 6192 of them).

    Each slice is ``nrows`` rows of ``ncols`` elements of ``itemsize`` bytes, ``step`` elements apart, its
    rows ``row_bytes`` apart in the file; slice k starts at scratch offset ``src[k]`` and is the
    ``slots[k]``-th block of the group, whose blocks are packed back to back from chunk offset
    ``group_offset``. ``ops``: the slices' indices in the chunk's ops."""

    group_offset: int
    group_count: int
    nrows: int
    ncols: int
    itemsize: int
    step: int
    row_bytes: int
    src: tuple[int, ...]
    slots: tuple[int, ...]
    ops: tuple[int, ...]

    @property
    def block_bytes(self) -> int:
        return self.nrows * self.ncols * self.itemsize

    @property
    def width(self) -> int:
        """The widest word (8, 4, 2 or 1 bytes) that every offset and length of this copy divides."""
        unit = self.ncols * self.itemsize if self.step == 1 else self.itemsize
        g = self.row_bytes | unit | self.group_offset | self.block_bytes
        for s in self.src:
            g |= s
        for w in (8, 4, 2):
            if g % w == 0:
                return w
        return 1

    @property
    def slot_range(self) -> tuple[int, int] | None:
        """(first, count) when the slots are consecutive and ascending (one contiguous destination)."""
        k0 = self.slots[0]
        return (k0, len(self.slots)) if self.slots == tuple(range(k0, k0 + len(self.slots))) else None


@dataclass(frozen=True)
class SpanRead:
    """File bytes [file_offset, file_offset + nbytes) read once into scratch memory; then each slice in
    ``ops`` (indices into the chunk's ops) is copied out, strided, to its packed place in the chunk
    (``copies``: batched per copy group, as for scatter reads)."""

    file_offset: int
    nbytes: int
    ops: tuple[int, ...]
    copies: tuple[SpanCopy, ...] = ()


@dataclass(frozen=True)
class Part:
    """A unit of the cold pipeline: its reads, then the H2D of bytes [start, end) of the chunk buffer.

    Packed-order parts are runs of consecutive slices and tile the chunk; file-order units (see
    ``_file_order_units``) have empty ranges except the chunk's last, which copies the whole chunk."""

    start: int
    end: int
    reads: tuple[ScatterRead, ...]
    spans: tuple[SpanRead, ...]

    @functools.cached_property
    def syscalls(self) -> int:
        return len(self.reads) + len(self.spans)

    @functools.cached_property
    def scratch_bytes(self) -> int:
        """Scratch a reader needs for this unit (the largest of its reads' gap/span bytes)."""
        return max([x[3] for x in self.reads] + [sp.nbytes for sp in self.spans] + [0])


@dataclass(frozen=True)
class Chunk:
    """A unit of the pipeline: slices packed contiguously, moved by one H2D copy.

    ``row0`` > 0 only for a row piece of a chunk's single slice (streamed loads of a slice larger than a
    ring buffer): its rows land at [row0, row0 + nrows) of the destination block."""

    index: int
    ops: tuple["SliceOp", ...]
    offsets: tuple[int, ...]  # byte offset of each op in the chunk
    groups: tuple[CopyGroup, ...]
    nbytes: int
    reads: tuple[ScatterRead, ...] = ()
    """Scatter reads covering every op read exactly (step-1 columns, exact by the cost model)."""
    spans: tuple[SpanRead, ...] = ()
    """Span reads of the other ops (strided columns; many short rows where spans are cheaper)."""
    parts: tuple[Part, ...] = ()
    """Byte ranges of the chunk read (and copied to the device) as they arrive, so a large chunk still
    pipelines finely; empty = the chunk is one part."""
    row0: int = 0

    @functools.cached_property
    def whole(self) -> Part:
        """The chunk as one part (one object per chunk: loads key their memoised tables by a part's
        identity, and a new one per call made a one-part chunk's load rebuild its batch every time)."""
        return Part(0, self.nbytes, self.reads, self.spans)

    def units(self) -> tuple[Part, ...]:
        return self.parts if self.parts else (self.whole,)


@dataclass(frozen=True)
class ReadCounts:
    """What a plan's packing reads: bytes owned (== planned), bytes read from the file, syscalls."""

    owned: int
    read: int
    syscalls: int
    span_ops: int


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
_PACKED = PerPlan()


def pack(plan: "SlicePlan", chunk_bytes: int, part_bytes: int | None = None, read_mode: ReadMode = "auto",
         cost: ReadCost = DEFAULT_COST) -> list[Chunk]:
    """The plan's chunks (memoised per plan: a plan is immutable, and warm activations must not re-pack).

    Chunks hold at most ``chunk_bytes`` (or one larger slice) cut at slice boundaries in layer order (a
    chunk is a run of consecutive layers), each sorted so same-module slices are adjacent and land with
    one device copy per (module, side)."""
    check_read_mode(read_mode)
    key = ("chunks", chunk_bytes, part_bytes, read_mode, cost)
    return _PACKED.get(plan, key, lambda: _chunks(plan, chunk_bytes, part_bytes, read_mode, cost))


def stream_units(plan: "SlicePlan", chunk_bytes: int, part_bytes: int | None = None,
                 read_mode: ReadMode = "auto", cost: ReadCost = DEFAULT_COST) -> list[Chunk]:
    """The chunks of a streamed (uncached) load, each at most ``chunk_bytes`` (a ring buffer): a chunk of
    one slice larger than that is cut into row pieces, each read, copied and placed on its own (unless one
    row alone exceeds ``chunk_bytes``)."""
    def make() -> list[Chunk]:
        out: list[Chunk] = []
        for ch in pack(plan, chunk_bytes, part_bytes, read_mode, cost):
            if ch.nbytes <= chunk_bytes or len(ch.ops) != 1:
                out.append(ch)
                continue
            op = ch.ops[0]
            rows = max(1, chunk_bytes // max(1, op.ncols * op.itemsize))
            for i in range(0, op.nrows, rows):
                sub = dataclasses.replace(op, rows=(op.rows[0] + i, op.rows[0] + min(op.nrows, i + rows)))
                out.append(_make_chunk(plan, ch.index, [sub], None, read_mode, cost, row0=i))
        return out

    check_read_mode(read_mode)
    return _PACKED.get(plan, ("stream", chunk_bytes, part_bytes, read_mode, cost), make)


def read_counts(chunks: list[Chunk]) -> ReadCounts:
    """Bytes owned and read, syscalls, and slices read as spans, over the units of ``chunks``."""
    owned = read = sys = nspan = 0
    for ch in chunks:
        owned += sum(op.nbytes for op in ch.ops)
        for u in ch.units():
            read += sum(n for x in u.reads for _, n in x[1]) + sum(s.nbytes for s in u.spans)
            sys += u.syscalls
            nspan += sum(len(s.ops) for s in u.spans) + sum(len(c.ops) for x in u.reads for c in x[2])
    return ReadCounts(owned, read, sys, nspan)


def span_of(op: "SliceOp") -> tuple[int, int]:
    """(file offset, bytes) of the smallest contiguous file range holding every byte of ``op``."""
    cols = op.src_shape[1]
    isz = op.itemsize
    r0, r1 = op.rows
    c0, _, step = op.cols
    row_bytes = cols * isz
    first, last = c0 * isz, (c0 + (op.ncols - 1) * step + 1) * isz
    return op.src_offset + r0 * row_bytes + first, (r1 - r0 - 1) * row_bytes + (last - first)


# ------------------------------------------------------------------------------------------------
# internals
# ------------------------------------------------------------------------------------------------
def check_read_mode(read_mode: str) -> None:
    """ValueError unless ``read_mode`` is one of READ_MODES."""
    if read_mode not in READ_MODES:
        raise ValueError(f"read_mode must be one of {READ_MODES}, got {read_mode!r}")


def _chunks(plan: "SlicePlan", chunk_bytes: int, part_bytes: int | None, read_mode: ReadMode,
            cost: ReadCost) -> list[Chunk]:
    out: list[Chunk] = []
    cur: list["SliceOp"] = []
    size = 0
    # prefer cutting between layers: a layer split over two chunks would have the bytes between its
    # halves' file ranges read (as gaps) by both
    layer_bytes: dict[tuple[str, int], int] = {}
    for op in plan.ops:
        layer_bytes[_layer_key(op)] = layer_bytes.get(_layer_key(op), 0) + op.nbytes
    prev = None
    for op in plan.ops:
        k = _layer_key(op)
        if cur and ((size + op.nbytes > chunk_bytes) or
                    (k != prev and size + layer_bytes[k] > chunk_bytes and 2 * size >= chunk_bytes)):
            out.append(_make_chunk(plan, len(out), cur, part_bytes, read_mode, cost))
            cur, size = [], 0
        cur.append(op)
        size += op.nbytes
        prev = k
    if cur:
        out.append(_make_chunk(plan, len(out), cur, part_bytes, read_mode, cost))
    return out


def _layer_key(op: "SliceOp") -> tuple[str, int]:
    return ("embed" if op.module == "embed" else "lm_head" if op.module == "lm_head" else "layer", op.layer)


def _make_chunk(plan: "SlicePlan", index: int, ops: list["SliceOp"], part_bytes: int | None,
                read_mode: ReadMode, cost: ReadCost, row0: int = 0) -> Chunk:
    ordered = sorted(ops, key=lambda o: (_MODULE_ORDER[o.module], o.side, o.layer,
                                         -1 if o.local_expert is None else o.local_expert))
    offsets, groups = [], []
    member: list[tuple[int, int]] = []  # per op: (its CopyGroup's index, its block within the group)
    pos = 0
    for op in ordered:
        # align each slice to its element size so the device can view it in its dtype; a
        # single-dtype adapter (the usual case) gets no padding: pinned bytes == planned bytes
        pos = -(-pos // op.itemsize) * op.itemsize
        offsets.append(pos)
        flat = op.flat_index(plan.n_local_experts)
        g = groups[-1] if groups else None
        if (g is not None and g.module == op.module and g.side == op.side and g.dtype == op.dtype
                and g.shape == op.shape and g.flat_start + g.count == flat
                and g.byte_offset + g.nbytes == pos):
            groups[-1] = CopyGroup(g.module, g.side, g.dtype, g.shape, g.flat_start, g.count + 1,
                                   g.byte_offset)
        else:
            groups.append(CopyGroup(op.module, op.side, op.dtype, op.shape, flat, 1, pos))
        member.append((len(groups) - 1, groups[-1].count - 1))
        pos += op.nbytes
    span = [_read_as_span(op, read_mode, cost) for op in ordered]
    # "exact" reads no byte outside each slice's own span (strided slices: one span read each, as before
    # spans existed); the other modes merge neighbouring and overlapping spans
    gap = -1 if read_mode == "exact" else cost.merge_gap()
    def runs(idx: range) -> tuple[tuple[ScatterRead, ...], tuple[SpanRead, ...]]:
        r, sp = _read_runs(ordered, offsets, span, idx, gap, part_bytes, cost.batched, cost.junk_gap())
        return (tuple((f, p, _batch_copies(c, ordered, member, groups), sb) for f, p, c, sb in r),
                tuple(dataclasses.replace(x, copies=_batch_copies(
                    tuple((i, span_of(ordered[i])[0] - x.file_offset) for i in x.ops), ordered, member, groups))
                      for x in sp))

    reads, spans = runs(range(len(ordered)))
    parts: list[Part] = []
    if part_bytes is not None and pos > part_bytes:
        first = 0
        for i in range(len(ordered)):
            end = offsets[i] + ordered[i].nbytes
            if end - offsets[first] >= part_bytes or i == len(ordered) - 1:
                r, s = runs(range(first, i + 1))
                parts.append(Part(offsets[first], end, r, s))
                first = i + 1
        if read_mode != "exact":
            # packed-order parts may read the same gap bytes once per part; file-order units read the
            # chunk's merged runs once: keep the cheaper by the cost model
            fo = _file_order_units(reads, spans, part_bytes, pos)
            if _units_cost(fo, cost) < _units_cost(parts, cost):
                parts = fo
    return Chunk(index, tuple(ordered), tuple(offsets), tuple(groups), pos, reads, spans, tuple(parts), row0)


def _batch_copies(copies: tuple[tuple[int, int], ...], ops: list["SliceOp"], member: list[tuple[int, int]],
                  groups: list[CopyGroup]) -> tuple[SpanCopy, ...]:
    """(op index, scratch offset) copies of one scatter read -> one SpanCopy per (CopyGroup, source row
    layout), slices in block order (consecutive blocks: one contiguous destination, the common case)."""
    by: dict[tuple, list[tuple[int, int, int]]] = {}
    for i, soff in copies:
        op = ops[i]
        gi, k = member[i]
        key = (gi, op.nrows, op.ncols, op.itemsize, op.cols[2], op.src_shape[1] * op.itemsize)
        by.setdefault(key, []).append((k, soff, i))
    out = []
    for (gi, nrows, ncols, isz, step, row_bytes), items in by.items():
        items.sort()
        g = groups[gi]
        out.append(SpanCopy(g.byte_offset, g.count, nrows, ncols, isz, step, row_bytes,
                            tuple(s for _, s, _ in items), tuple(k for k, _, _ in items),
                            tuple(i for _, _, i in items)))
    return tuple(out)


def _units_cost(units: list[Part], cost: ReadCost) -> float:
    nbytes = sum(n for u in units for x in u.reads for _, n in x[1]) + sum(x.nbytes for u in units for x in u.spans)
    return sum(u.syscalls for u in units) * cost.syscall_s + nbytes * cost.byte_s


def _file_order_units(reads: tuple[ScatterRead, ...], spans: tuple[SpanRead, ...], part_bytes: int,
                      nbytes: int) -> list[Part]:
    """Read units in file order over the whole chunk. A chunk packs slices by module (one device copy per
    module and side), so the slices of one part are rarely file neighbours: per expert of a sharded MoE,
    ``down.B``, ``gate.A`` and ``gate.B``'s rows follow each other in the file but land in three parts.
    Read in file order instead, the chunk's scatter runs merge across modules (fewer syscalls); the
    price is that the chunk goes to the device in one H2D after its last unit (units before it have an
    empty H2D range; the loader takes units in order, so all of them are read by then)."""
    items = sorted([(f, "r", x) for x in reads for f in (x[0],)] + [(x.file_offset, "s", x) for x in spans],
                   key=lambda t: t[0])
    out: list[Part] = []
    cur_r: list[ScatterRead] = []
    cur_s: list[SpanRead] = []
    size = 0
    for _, kind, x in items:
        if kind == "r":
            cur_r.append(x)
            size += sum(n for _, n in x[1])
        else:
            cur_s.append(x)
            size += x.nbytes
        if size >= part_bytes:
            out.append(Part(0, 0, tuple(cur_r), tuple(cur_s)))
            cur_r, cur_s, size = [], [], 0
    if cur_r or cur_s or not out:
        out.append(Part(0, 0, tuple(cur_r), tuple(cur_s)))
    last = out[-1]
    out[-1] = Part(0, nbytes, last.reads, last.spans)
    return out


def _read_as_span(op: "SliceOp", read_mode: ReadMode, cost: ReadCost) -> bool:
    c0, c1, step = op.cols
    if step != 1:
        return True  # strided columns: element-granular interleave, never one syscall per element
    if op.nrows <= 1 or (c0 == 0 and c1 == op.src_shape[1]):
        return False  # one contiguous file range already
    return read_mode == "span" or (read_mode == "auto" and cost.prefers_span(op))


def _read_runs(ops: list["SliceOp"], offsets: list[int], as_span: list[bool], idx: range,
               gap: int, max_bytes: int | None = None,
               batched: bool = False, junk_gap: int = -1) -> tuple[tuple[ScatterRead, ...], tuple[SpanRead, ...]]:
    """Turn slices ``ops[idx]`` into few syscalls. Exact slices become (file range, chunk range) pieces
    (one per row when only some columns are owned); pieces whose file ranges touch are merged into one
    scatter read (preadv with one iovec per destination), and, when ``gap`` >= 0, pieces at most ``gap``
    bytes apart are joined by a scratch iovec for the gap. Span slices become span reads, neighbouring
    spans merged when at most ``gap`` bytes apart (reading the gap costs less than a syscall; -1: never).
    ``batched``: exact pieces and spans go in separate runs; exact pieces are joined where they touch or
    lie at most ``junk_gap`` bytes apart, the gaps read onto the same junk scratch bytes (their reads
    have no gathers: one io_uring submission takes them all)."""
    pieces: list[tuple[int, int, int]] = []  # (file offset, chunk offset, bytes)
    span_list: list[tuple[int, int, int]] = []  # (file offset, bytes, op index)
    for i in idx:
        op, off = ops[i], offsets[i]
        if as_span[i]:
            f, n = span_of(op)
            span_list.append((f, n, i))
            continue
        cols = op.src_shape[1]
        isz = op.itemsize
        r0, r1 = op.rows
        c0, c1, _ = op.cols
        row_bytes = cols * isz
        if c0 == 0 and c1 == cols:
            pieces.append((op.src_offset + r0 * row_bytes, off, op.nbytes))
        else:
            w = op.ncols * isz
            for j in range(r1 - r0):
                pieces.append((op.src_offset + (r0 + j) * row_bytes + c0 * isz, off + j * w, w))
    pieces.sort()
    span_list.sort()
    merged: list[tuple[int, int, list[int]]] = []
    for f, n, i in span_list:
        # bounded: the scratch a reader thread holds is one merged span
        # spans merge where they overlap or touch (the experts of one fused tensor share its rows); in
        # exact mode never (each strided slice reads its own span, as it always did); gaps are the scatter
        # runs' business below, so no exact piece ends up inside a merged span (it would be read twice)
        if (merged and gap >= 0 and f <= merged[-1][0] + merged[-1][1]
                and max(merged[-1][1], f + n - merged[-1][0]) <= MAX_SPAN_BYTES):
            s0, sn, members = merged[-1]
            merged[-1] = (s0, max(sn, f + n - s0), members + [i])
        else:
            merged.append((f, n, [i]))
    spans = [SpanRead(f, n, tuple(m)) for f, n, m in merged]
    if gap < 0:  # exact: scatter runs of touching pieces; each span read on its own
        return _scatter_runs([(f, o, n, None) for f, o, n in pieces], -1, ops, max_bytes), tuple(spans)
    if batched:
        exact = _scatter_runs([(f, o, n, None) for f, o, n in pieces], junk_gap, ops, max_bytes, junk=True)
        return exact + _scatter_runs([(sp.file_offset, -1, sp.nbytes, sp) for sp in spans], gap, ops,
                                     max_bytes), ()
    # otherwise spans become scratch pieces of the scatter runs, and small gaps are read into scratch
    items = [(f, o, n, None) for f, o, n in pieces] + [(sp.file_offset, -1, sp.nbytes, sp) for sp in spans]
    items.sort(key=lambda t: t[0])
    return _scatter_runs(items, gap, ops, max_bytes), ()


def _scatter_runs(items: list, gap: int, ops: list["SliceOp"], max_bytes: int | None,
                  junk: bool = False) -> tuple[ScatterRead, ...]:
    """Sorted (file offset, chunk offset, bytes, span or None) -> scatter reads (see ScatterRead). A run
    stops growing at ``max_bytes`` (the part size): several readers share a chunk's reads. ``junk``
    (runs without spans): every gap of a run lands at scratch offset 0 (its bytes are dropped), so the
    run's scratch is its largest gap, not their sum."""
    runs: list[list] = []  # [file offset, pieces, copies, scratch bytes, bytes]
    end = -1
    for f, o, n, sp in items:
        r = runs[-1] if runs else None
        g = f - end
        need = (max(r[3], g) if junk else r[3] + max(g, 0) + (n if sp is not None else 0)) if r else 0
        join = (r is not None and 0 <= g and (g == 0 or g <= gap) and len(r[1]) < IOV_MAX - 1
                and need <= SCRATCH_BYTES and (max_bytes is None or r[4] < max_bytes))
        if not join:
            r = [f, [], [], 0, 0]
            runs.append(r)
        elif g > 0 and junk:
            r[1].append((-1, g))  # the gap, onto the junk bytes at scratch offset 0 (dropped)
            r[3] = max(r[3], g)
        elif g > 0:
            r[1].append((-r[3] - 1, g))  # the gap, into scratch (dropped)
            r[3] += g
        if sp is None:
            last = r[1][-1] if r[1] else None
            if last is not None and last[0] >= 0 and last[0] + last[1] == o and g == 0:
                r[1][-1] = (last[0], last[1] + n)  # destination contiguous too: extend the iovec
            else:
                r[1].append((o, n))
        else:
            base = r[3]
            r[1].append((-base - 1, n))
            r[3] += n
            for i in sp.ops:
                r[2].append((i, base + span_of(ops[i])[0] - f))
        r[4] += n + (g if join and g > 0 else 0)
        end = f + n
    return tuple((f, tuple(p), tuple(c), sb) for f, p, c, sb, _ in runs)

"""plan_rank: which bytes of which tensor this rank needs, and where they go. Pure: no I/O, no
torch.distributed, no CUDA.

``plan_rank(header, model, parallel)`` applies the module-kind table (``format/modules.py``: column kinds
take A full and B's rows of this rank's output slice, row kinds A's columns of its input slice and B full)
with the slices of ``plan/layout.py``; only local experts are planned. Merged sources are split into
pool modules (``qkv`` -> q/k/v, ``gate_up`` -> gate/up, fused 3-D expert LoRA -> per-expert w1/w3/w2);
their shared A is copied to each part, so the layer ops see one layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import AdapterShapeError
from ..format.adapter import AdapterHeader, LoRATarget
from ..format.dtypes import safetensors_itemsize
from ..format.safetensors_header import TensorInfo
from ..format.modules import MODULES, POOL_MODULES, SOURCES
from ..format.naming import canonical_name
from .layout import RankLayout
from .model import ModelSpec
from .parallel import ParallelSpec

_MODULE_ORDER = {m: i for i, m in enumerate(POOL_MODULES)}


@dataclass(frozen=True)
class SliceOp:
    """Copy ``src[rows, cols]`` of one source tensor into one pool block.

    ``rows`` is [start, stop); ``cols`` is (start, stop, step). The slice lands at ``[:nrows, :ncols]``
    of the pool block (module, side, layer, local_expert) of the adapter's slot.
    """

    key: str  # canonical destination name; the cache key is "<adapter>/<key>"
    module: str
    side: str
    layer: int
    expert: int | None  # global expert id
    local_expert: int | None
    tensor: str  # source safetensors key
    dtype: str
    src_offset: int  # absolute file offset of the source tensor
    src_shape: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int, int]

    @property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def ncols(self) -> int:
        start, stop, step = self.cols
        return max(0, -(-(stop - start) // step))

    @property
    def shape(self) -> tuple[int, int]:
        return self.nrows, self.ncols

    @property
    def itemsize(self) -> int:
        return safetensors_itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.nrows * self.ncols * self.itemsize

    def flat_index(self, n_local_experts: int) -> int:
        """Index of the destination block in the pool buffer viewed as [layers * experts, ...]."""
        if self.local_expert is None:
            return self.layer
        return self.layer * n_local_experts + self.local_expert


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
class Chunk:
    """A unit of the pipeline: slices packed contiguously, moved by one H2D copy."""

    index: int
    ops: tuple[SliceOp, ...]
    offsets: tuple[int, ...]  # byte offset of each op in the chunk
    groups: tuple[CopyGroup, ...]
    nbytes: int
    reads: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()
    """Scatter reads: (file offset, ((chunk offset, bytes), ...)) — one preadv each, reading a
    contiguous run of the file into several places of the chunk. Covers every op with step-1 columns."""
    gathers: tuple[int, ...] = ()
    """Indices (into ``ops``) of strided-column slices, read by span + gather."""
    parts: tuple["Part", ...] = ()
    """Byte ranges of the chunk read (and copied to the device) as they arrive, so a large chunk still
    pipelines finely; empty = the chunk is one part."""


@dataclass(frozen=True)
class Part:
    """A run of consecutive slices of a chunk: the unit of the cold pipeline (read, then H2D)."""

    start: int  # byte range in the chunk buffer
    end: int
    reads: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    gathers: tuple[int, ...]  # indices into the chunk's ops


@dataclass(frozen=True)
class SlicePlan:
    """This rank's part of one adapter."""

    adapter: str
    tp_rank: int
    ep_rank: int
    ops: tuple[SliceOp, ...]  # in pack order
    scalings: dict[tuple[str, int, int | None], float]  # (module, layer, local_expert) -> scaling
    ranks: dict[tuple[str, int, int | None], int]
    n_local_experts: int
    full_bytes: int  # bytes of every tensor of the adapter (what pinning whole tensors costs per rank)
    max_rank: int
    modules: frozenset[str] = field(default_factory=frozenset)
    _memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def nbytes(self) -> int:
        # memoised: a warm activation must not walk thousands of slices (MoE plans have ~5000)
        if "nbytes" not in self._memo:
            self._memo["nbytes"] = sum(op.nbytes for op in self.ops)
        return self._memo["nbytes"]

    def cache_keys(self) -> list[str]:
        return [f"{self.adapter}/{op.key}" for op in self.ops]

    def chunks(self, chunk_bytes: int, part_bytes: int | None = None) -> list[Chunk]:
        """Memoised: a plan is immutable, and warm activations must not re-plan."""
        key = ("chunks", chunk_bytes, part_bytes)
        if key not in self._memo:
            self._memo[key] = self._chunks(chunk_bytes, part_bytes)
        return self._memo[key]

    def _chunks(self, chunk_bytes: int, part_bytes: int | None = None) -> list[Chunk]:
        """Split the ops into chunks of at most ``chunk_bytes`` (or one op, if larger) at op boundaries, in
        layer order (a chunk is a run of consecutive layers), each sorted so same-module slices are
        adjacent and land with one device copy per (module, side)."""
        out: list[Chunk] = []
        cur: list[SliceOp] = []
        size = 0
        for op in self.ops:
            if cur and size + op.nbytes > chunk_bytes:
                out.append(self._make_chunk(len(out), cur, part_bytes))
                cur, size = [], 0
            cur.append(op)
            size += op.nbytes
        if cur:
            out.append(self._make_chunk(len(out), cur, part_bytes))
        return out

    def _make_chunk(self, index: int, ops: list[SliceOp], part_bytes: int | None = None) -> Chunk:
        ordered = sorted(ops, key=lambda o: (_MODULE_ORDER[o.module], o.side, o.layer,
                                             -1 if o.local_expert is None else o.local_expert))
        offsets, groups = [], []
        pos = 0
        for op in ordered:
            # align each slice to its element size so the device can view it in its dtype; a
            # single-dtype adapter (the usual case) gets no padding: pinned bytes == planned bytes
            pos = -(-pos // op.itemsize) * op.itemsize
            offsets.append(pos)
            flat = op.flat_index(self.n_local_experts)
            g = groups[-1] if groups else None
            if (g is not None and g.module == op.module and g.side == op.side and g.dtype == op.dtype
                    and g.shape == op.shape and g.flat_start + g.count == flat
                    and g.byte_offset + g.nbytes == pos):
                groups[-1] = CopyGroup(g.module, g.side, g.dtype, g.shape, g.flat_start, g.count + 1,
                                       g.byte_offset)
            else:
                groups.append(CopyGroup(op.module, op.side, op.dtype, op.shape, flat, 1, pos))
            pos += op.nbytes
        reads, gathers = _read_runs(ordered, offsets)
        parts: list[Part] = []
        if part_bytes is not None and pos > part_bytes:
            first = 0
            for i in range(len(ordered)):
                end = offsets[i] + ordered[i].nbytes
                if end - offsets[first] >= part_bytes or i == len(ordered) - 1:
                    r, g = _read_runs(ordered[first:i + 1], offsets[first:i + 1])
                    parts.append(Part(offsets[first], end, r, tuple(first + j for j in g)))
                    first = i + 1
        return Chunk(index, tuple(ordered), tuple(offsets), tuple(groups), pos, reads, gathers, tuple(parts))


_IOV_MAX = 512  # well under Linux's 1024 iovecs per preadv


def _read_runs(ops: list[SliceOp], offsets: list[int]):
    """Turn a chunk's slices into few syscalls: every step-1 slice is a list of (file range, chunk
    range) pieces (one per row when only some columns are owned); pieces whose file ranges touch are
    merged into one scatter read (preadv with one iovec per destination)."""
    pieces: list[tuple[int, int, int]] = []  # (file offset, chunk offset, bytes)
    gathers: list[int] = []
    for i, (op, off) in enumerate(zip(ops, offsets)):
        rows, cols = op.src_shape
        isz = op.itemsize
        r0, r1 = op.rows
        c0, c1, step = op.cols
        row_bytes = cols * isz
        if step != 1:
            gathers.append(i)
        elif c0 == 0 and c1 == cols:
            pieces.append((op.src_offset + r0 * row_bytes, off, op.nbytes))
        else:
            w = op.ncols * isz
            for j in range(r1 - r0):
                pieces.append((op.src_offset + (r0 + j) * row_bytes + c0 * isz, off + j * w, w))
    pieces.sort()
    runs: list[tuple[int, list[tuple[int, int]]]] = []
    end = -1
    for f, o, n in pieces:
        if runs and f == end and len(runs[-1][1]) < _IOV_MAX:
            last = runs[-1][1][-1]
            if last[0] + last[1] == o:  # destination contiguous too: extend the iovec
                runs[-1][1][-1] = (last[0], last[1] + n)
            else:
                runs[-1][1].append((o, n))
        else:
            runs.append((f, [(o, n)]))
        end = f + n
    return tuple((f, tuple(p)) for f, p in runs), tuple(gathers)


def _pack_sort_key(op: SliceOp) -> tuple:
    # embed first, then layers in order, lm_head last: chunks are groups of consecutive layers
    stage = 0 if op.module == "embed" else (2 if op.module == "lm_head" else 1)
    return (stage, op.layer, _MODULE_ORDER[op.module], op.side,
            -1 if op.local_expert is None else op.local_expert)


def plan_rank(header: AdapterHeader, model: ModelSpec, parallel: ParallelSpec | RankLayout,
              *, pool_modules: frozenset[str] | set[str] | None = None) -> SlicePlan:
    """This rank's SlicePlan (``parallel`` may be the rank's RankLayout, built once by the caller).
    Raises AdapterShapeError if the adapter targets a module the pool lacks."""
    layout = RankLayout.of(model, parallel)
    local = layout.local_experts
    ops: list[SliceOp] = []
    scalings: dict[tuple[str, int, int | None], float] = {}
    ranks: dict[tuple[str, int, int | None], int] = {}

    def add(t: LoRATarget, module: str, side: str, src: TensorInfo, rows: tuple[int, int],
            cols: tuple[int, int, int], expert: int | None) -> None:
        if pool_modules is not None and module not in pool_modules:
            raise AdapterShapeError(f"targets module {module!r} (from {src.key!r}) but the pool serves only "
                                    f"{sorted(pool_modules)}", adapter=header.name, path=header.weights_path)
        le = None if expert is None else expert - local.start
        layer = 0 if MODULES[module].is_global else t.layer
        op = SliceOp(key=canonical_name(module, side, layer, expert), module=module, side=side, layer=layer,
                     expert=expert, local_expert=le, tensor=src.key, dtype=src.dtype, src_offset=src.start,
                     src_shape=(src.shape[0], src.shape[1]), rows=rows, cols=cols)
        k = (module, layer, le)
        scalings[k] = t.scaling
        ranks[k] = t.rank
        if op.nrows and op.ncols:
            ops.append(op)

    for t in header.targets:
        source = SOURCES.get(t.module)
        if source is None:  # pragma: no cover - the reader only yields the table's sources
            raise AssertionError(f"unplanned module {t.module}")
        a, b = t.A, t.B
        if source.fused_experts:  # A rows e*r .. e*r+r, B columns e, e+E, ... (peft's interleave)
            r, E = t.rank, t.num_experts
            experts: list[int | None] = list(local)
        else:
            experts = [t.expert] if t.expert is None or t.expert in local else []
        for e in experts:
            if source.fused_experts:
                assert e is not None
                a_rows, b_cols = (e * r, (e + 1) * r), (e, e + E * (r - 1) + 1, E)
            else:
                a_rows, b_cols = (0, a.shape[0]), (0, b.shape[1], 1)
            offset = 0  # members are stacked along the output dimension of B
            for member in source.members:
                kind = MODULES[member]
                out = model.dim(kind.out_dim)
                if kind.tp.splits_output:
                    s0, s1 = layout.span(kind.out_dim)
                    add(t, member, "A", a, a_rows, (0, a.shape[1], 1), e)
                    add(t, member, "B", b, (offset + s0, offset + s1), b_cols, e)
                else:
                    s0, s1 = layout.span(kind.in_dim)
                    add(t, member, "A", a, a_rows, (s0, s1, 1), e)
                    add(t, member, "B", b, (offset, offset + out), b_cols, e)
                offset += out

    ops.sort(key=_pack_sort_key)
    seen: set[str] = set()
    for op in ops:
        if op.key in seen:
            raise AdapterShapeError(f"two source tensors map to {op.key} (e.g. per-expert and fused expert "
                                    f"LoRA for the same expert)", adapter=header.name,
                                    path=header.weights_path)
        seen.add(op.key)
    return SlicePlan(adapter=header.name, tp_rank=layout.tp_rank, ep_rank=layout.ep_rank, ops=tuple(ops),
                     scalings=scalings, ranks=ranks, n_local_experts=layout.n_local_experts,
                     full_bytes=header.data_bytes, max_rank=header.max_rank,
                     modules=frozenset(k[0] for k in scalings))

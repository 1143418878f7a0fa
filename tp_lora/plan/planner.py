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
from functools import cached_property

from ..errors import AdapterShapeError
from ..format.adapter import AdapterHeader, LoRATarget
from ..format.dtypes import safetensors_itemsize
from ..format.safetensors_header import TensorInfo
from ..format.modules import MODULES, POOL_MODULES, SOURCES
from ..format.naming import canonical_name
from .layout import RankLayout
from .model import ModelSpec
from .parallel import ParallelSpec
from .packing import Chunk, CopyGroup, Part, pack  # noqa: F401 - packing moved there; re-exported

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

    # cached (a frozen dataclass keeps them in its __dict__): packing and loads read them per slice
    @cached_property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0]

    @cached_property
    def ncols(self) -> int:
        start, stop, step = self.cols
        return max(0, -(-(stop - start) // step))

    @cached_property
    def shape(self) -> tuple[int, int]:
        return self.nrows, self.ncols

    @cached_property
    def itemsize(self) -> int:
        return safetensors_itemsize(self.dtype)

    @cached_property
    def nbytes(self) -> int:
        return self.nrows * self.ncols * self.itemsize

    def flat_index(self, n_local_experts: int) -> int:
        """Index of the destination block in the pool buffer viewed as [layers * experts, ...]."""
        if self.local_expert is None:
            return self.layer
        return self.layer * n_local_experts + self.local_expert


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

    def cache_keys(self) -> tuple[str, ...]:
        # memoised: 37k keys of a sharded MoE rank took ~25 ms to format at every cold load
        if "cache_keys" not in self._memo:
            self._memo["cache_keys"] = tuple(f"{self.adapter}/{op.key}" for op in self.ops)
        return self._memo["cache_keys"]

    def chunks(self, chunk_bytes: int, part_bytes: int | None = None, read_mode: str = "auto") -> list[Chunk]:
        """This plan's chunks: a shortcut for ``packing.pack`` (memoised there, per plan)."""
        return pack(self, chunk_bytes, part_bytes, read_mode)  # type: ignore[arg-type]


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

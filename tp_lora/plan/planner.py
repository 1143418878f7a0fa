"""ShardPlanner: which bytes of which tensor this rank needs, and where they go. Pure: no I/O, no
torch.distributed, no CUDA.

``plan_rank(header, model, parallel)`` implements DESIGN.md's TP table:

| module | A ``[r, in]`` | B ``[out, r]`` |
|---|---|---|
| q, k, v (column) | full | rows of this rank's heads (kv heads replicated when tp > kv heads) |
| gate, up, shared.gate/up (column) | full | rows of this rank's intermediate slice |
| o, down, shared.down (row) | columns of this rank's input slice | full |
| embed (vocab-parallel) | columns of this rank's vocab range | full |
| lm_head (vocab-parallel column) | full | rows of this rank's vocab range |
| experts.w1/w3 (local experts only) | full | rows of this rank's MoE-TP slice |
| experts.w2 (local experts only) | columns of this rank's MoE-TP slice | full |

Merged sources are split into pool modules (``qkv`` -> q/k/v, ``gate_up`` -> gate/up, fused 3-D expert
LoRA -> per-expert w1/w3/w2); their shared A is copied to each part, so the layer ops see one layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..format.adapter import AdapterHeader, LoRATarget, TensorInfo, FLOAT_DTYPES
from ..errors import AdapterShapeError
from .model import ModelSpec
from ..format.naming import GLOBAL_MODULES, POOL_MODULES, canonical_name
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
        return FLOAT_DTYPES[self.dtype][0]

    @property
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

    def cache_keys(self) -> list[str]:
        return [f"{self.adapter}/{op.key}" for op in self.ops]

    def chunks(self, chunk_bytes: int, part_bytes: int | None = None, read_mode: str = "auto") -> list[Chunk]:
        """This plan's chunks: a shortcut for ``packing.pack`` (memoised there, per plan)."""
        return pack(self, chunk_bytes, part_bytes, read_mode)  # type: ignore[arg-type]


def _pack_sort_key(op: SliceOp) -> tuple:
    # embed first, then layers in order, lm_head last: chunks are groups of consecutive layers
    stage = 0 if op.module == "embed" else (2 if op.module == "lm_head" else 1)
    return (stage, op.layer, _MODULE_ORDER[op.module], op.side,
            -1 if op.local_expert is None else op.local_expert)


def plan_rank(header: AdapterHeader, model: ModelSpec, parallel: ParallelSpec,
              *, pool_modules: frozenset[str] | set[str] | None = None) -> SlicePlan:
    """This rank's SlicePlan. Raises AdapterShapeError if the adapter targets a module the pool lacks."""
    parallel.validate(model)
    ops: list[SliceOp] = []
    scalings: dict[tuple[str, int, int | None], float] = {}
    ranks: dict[tuple[str, int, int | None], int] = {}
    local = parallel.local_experts(model)
    n_local = len(local) if model.is_moe else 0
    hd = model.head_dim
    tp, tpr = parallel.tp_size, parallel.tp_rank

    def add(t: LoRATarget, module: str, side: str, src: TensorInfo, rows: tuple[int, int],
            cols: tuple[int, int, int], expert: int | None = None) -> None:
        if pool_modules is not None and module not in pool_modules:
            raise AdapterShapeError(f"targets module {module!r} (from {src.key!r}) but the pool serves only "
                                    f"{sorted(pool_modules)}", adapter=header.name, path=header.weights_path)
        le = None if expert is None else expert - local.start
        layer = 0 if module in GLOBAL_MODULES else t.layer
        op = SliceOp(key=canonical_name(module, side, layer, expert), module=module, side=side, layer=layer,
                     expert=expert, local_expert=le, tensor=src.key, dtype=src.dtype, src_offset=src.start,
                     src_shape=(src.shape[0], src.shape[1]), rows=rows, cols=cols)
        k = (module, layer, le)
        scalings[k] = t.scaling
        ranks[k] = t.rank
        if op.nrows and op.ncols:
            ops.append(op)

    def full(src: TensorInfo) -> tuple[tuple[int, int], tuple[int, int, int]]:
        return (0, src.shape[0]), (0, src.shape[1], 1)

    def col_parallel(t: LoRATarget, module: str, rows: tuple[int, int], b_row_offset: int = 0,
                     expert: int | None = None) -> None:
        ra, ca = full(t.A)
        add(t, module, "A", t.A, ra, ca, expert)
        add(t, module, "B", t.B, (rows[0] + b_row_offset, rows[1] + b_row_offset), (0, t.B.shape[1], 1),
            expert)

    def row_parallel(t: LoRATarget, module: str, cols: tuple[int, int], expert: int | None = None) -> None:
        add(t, module, "A", t.A, (0, t.A.shape[0]), (cols[0], cols[1], 1), expert)
        rb, cb = full(t.B)
        add(t, module, "B", t.B, rb, cb, expert)

    heads = parallel.heads_range(model)
    q_rows = (heads.start * hd, heads.stop * hd)
    kvh = parallel.kv_heads_range(model)
    kv_rows = (kvh.start * hd, kvh.stop * hd)
    i_rows = parallel.shard(model.intermediate_size, tp, tpr)
    s_rows = parallel.shard(model.shared_expert_intermediate_size, tp, tpr) if model.is_moe else (0, 0)
    m_rows = (parallel.shard(model.moe_intermediate_size, parallel.moe_tp_size, parallel.moe_tp_rank)
              if model.is_moe else (0, 0))
    v0, v1 = parallel.vocab_range(model)

    for t in header.targets:
        m = t.module
        if m == "q":
            col_parallel(t, "q", q_rows)
        elif m in ("k", "v"):
            col_parallel(t, m, kv_rows)
        elif m == "qkv":
            col_parallel(t, "q", q_rows)
            col_parallel(t, "k", kv_rows, model.q_size)
            col_parallel(t, "v", kv_rows, model.q_size + model.kv_size)
        elif m == "o":
            row_parallel(t, "o", q_rows)
        elif m in ("gate", "up"):
            col_parallel(t, m, i_rows)
        elif m == "gate_up":
            col_parallel(t, "gate", i_rows)
            col_parallel(t, "up", i_rows, model.intermediate_size)
        elif m == "down":
            row_parallel(t, "down", i_rows)
        elif m in ("shared.gate", "shared.up"):
            col_parallel(t, m, s_rows)
        elif m == "shared.down":
            row_parallel(t, m, s_rows)
        elif m in ("experts.w1", "experts.w3"):
            if t.expert in local:
                col_parallel(t, m, m_rows, expert=t.expert)
        elif m == "experts.w2":
            if t.expert in local:
                row_parallel(t, m, m_rows, expert=t.expert)
        elif m == "experts.gate_up":
            r, E = t.rank, t.num_experts
            for e in local:
                a_rows = (e * r, (e + 1) * r)
                b_cols = (e, e + E * (r - 1) + 1, E)
                for mod, off in (("experts.w1", 0), ("experts.w3", model.moe_intermediate_size)):
                    add(t, mod, "A", t.A, a_rows, (0, t.A.shape[1], 1), e)
                    add(t, mod, "B", t.B, (m_rows[0] + off, m_rows[1] + off), b_cols, e)
        elif m == "experts.down":
            r, E = t.rank, t.num_experts
            for e in local:
                add(t, "experts.w2", "A", t.A, (e * r, (e + 1) * r), (m_rows[0], m_rows[1], 1), e)
                add(t, "experts.w2", "B", t.B, (0, t.B.shape[0]), (e, e + E * (r - 1) + 1, E), e)
        elif m == "embed":
            add(t, "embed", "A", t.A, (0, t.A.shape[0]), (v0, v1, 1))
            add(t, "embed", "B", t.B, *full(t.B))
        elif m == "lm_head":
            add(t, "lm_head", "A", t.A, *full(t.A))
            add(t, "lm_head", "B", t.B, (v0, v1), (0, t.B.shape[1], 1))
        else:  # pragma: no cover - the reader only yields the modules above
            raise AssertionError(f"unplanned module {m}")

    ops.sort(key=_pack_sort_key)
    seen: set[str] = set()
    for op in ops:
        if op.key in seen:
            raise AdapterShapeError(f"two source tensors map to {op.key} (e.g. per-expert and fused expert "
                                    f"LoRA for the same expert)", adapter=header.name,
                                    path=header.weights_path)
        seen.add(op.key)
    return SlicePlan(adapter=header.name, tp_rank=tpr, ep_rank=parallel.ep_rank, ops=tuple(ops),
                     scalings=scalings, ranks=ranks, n_local_experts=n_local,
                     full_bytes=header.data_bytes, max_rank=header.max_rank,
                     modules=frozenset(k[0] for k in scalings))

"""``TritonBackend``: the LoRA ops as segmented Triton kernels (docs/KERNELS.md).

Dense op, decode regime (<= 512 tokens): one launch of the fused kernel (K chunks spread over as many
programs per block as the used blocks leave SMs for; they meet on the device); prefill: two launches
(shrink, expand). On Hopper the fused kernel is a programmatic dependent of the kernel before it and the
expand of its shrink (``pdl``, ``triton_kernels.pdl_ok``). Expert op:
one fused launch over the blocks of all routed rows of all local experts up to ``EXPERT_FUSED_ROWS`` routed
rows, above it the wide regime (``expert_regime``: ``EXPERT_WIDE_BLOCK_M`` rows per block, two launches or
the fused one) (blocks built on the device once per layer and cached in the ``ExpertRouting``).
Embedding: a gather-shrink and an expand. Pools of a max rank above ``FUSED_MAX_RANK`` take the two-launch path for
every op. Nothing in a forward reads device memory on the host.

CUDA graphs: ``TritonBackend(max_tokens=T)`` keeps its metadata in static buffers sized for T tokens and
launches the capacity grid. Capture a forward with ``LoRAOps(pool, batch, backend)``; for the next batch
(other adapters, base-only rows, fewer tokens padded to the captured shape) construct
``LoRAOps(pool, next_batch, backend)`` again, which rewrites the buffers in place, then replay. The pool's
A/B/scaling buffers never move, so adapters loaded between replays are seen too.
"""

from __future__ import annotations

import torch

from ..device.pool import GpuPool
from ..runtime.batch import BatchInfo
from . import triton_kernels as K
from .layer import BackendError, ExpertRouting, TorchBackend
from .meta import DenseMeta


class TritonBackend:
    """Triton kernels on CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``, for tests).

    ``max_tokens``: None (eager: metadata sized per batch) or the static token capacity (CUDA graphs).
    float64 activations fall back to ``TorchBackend`` (no float64 tensor-core path).
    """

    def __init__(self, max_tokens: int | None = None):
        self.max_tokens = max_tokens
        self.meta: DenseMeta | None = None
        self._pool_id: int | None = None
        self._torch = TorchBackend()
        self._view_cache: dict[tuple[str, int], tuple] = {}
        self._blocks_seg: dict = {}      # the launches' block-table arguments (``K.block_segment``, ...)
        self._scratch = K.FusedScratch()

    def prepare(self, pool: GpuPool, batch: BatchInfo) -> None:
        if self.meta is None or self._pool_id != id(pool):
            self.meta = DenseMeta(pool.max_loras, pool.max_rank, pool.device, capacity=self.max_tokens)
            self._pool_id = id(pool)
            self._view_cache = {}
            self._scratch = K.FusedScratch()
            m = self.meta
            if m.capacity is not None and self._fused(pool) and not m.prefill:
                # static mode: the fused kernel's scratch for the pool's largest K, before any graph capture
                needs = [K.FusedScratch.need(s.a_shape[1], m.block_m, pool.max_rank, pool.device)
                         for name, s in pool.shapes.items() if name != "embed"]
                self._scratch.reserve(max([e for e, _ in needs] + [0]), max([b for _, b in needs] + [0]),
                                      pool.device)
            if m.capacity is not None:
                # static mode: the two-launch shrink's split-reduction counters, before any capture
                n = max([K.reduce_counters_needed(s.a_shape[1], m.grid_blocks, m.block_m, pool.max_rank)
                         for name, s in pool.shapes.items() if name != "embed"] + [0])
                if n:
                    self._scratch.reduce_counters(n, pool.device)
        self.meta.update(batch)
        self._blocks_seg = {}            # new tables (eager metadata is reallocated per batch)

    def _views(self, pool: GpuPool, module: str, layer: int) -> tuple:
        """A ``[S, (E,) R, in]``, B ``[S, (E,) out, R]``, scaling ``[S(, E)]`` of one layer (views of the
        pool's buffers, which never move) and their launch arguments: the fused launch's
        (``K.factor_segment``) and the two-launch path's (``shrink_factor_segment``,
        ``expand_factor_segment``). Made once per backend: slicing and keying cost host time per call."""
        key = (module, layer)
        v = self._view_cache.get(key)
        if v is None:
            sc = pool.scaling[module][:, layer]
            expert = module.startswith("experts.")
            A, B, sc = pool.A[module][:, layer], pool.B[module][:, layer], sc if expert else sc[:, 0]
            ea, eb, es = (A.stride(1), B.stride(1), sc.stride(1)) if expert else (None, None, None)
            v = (A, B, sc, K.factor_segment(A, B, sc, expert),
                 (K.shrink_factor_segment(A, ea), K.expand_factor_segment(B, eb, sc, es)))
            self._view_cache[key] = v
        return v

    def _meta(self, pool: GpuPool) -> DenseMeta:
        if self.meta is None or self._pool_id != id(pool):
            raise BackendError("TritonBackend used before prepare(pool, batch) for this pool (construct "
                               "LoRAOps with the backend first)")
        return self.meta

    @staticmethod
    def _supported(x: torch.Tensor) -> bool:
        return x.dtype in K.SUPPORTED_DTYPES

    @staticmethod
    def _fused(pool: GpuPool) -> bool:
        return pool.max_rank <= K.FUSED_MAX_RANK

    def _dense_blocks(self, m: DenseMeta) -> tuple:
        return (m.perm, m.blk_start, m.blk_len, m.blk_slot, m.blk_slot)

    def linear(self, pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor,
               out: torch.Tensor) -> None:
        if not self._supported(x):
            return self._torch.linear(pool, batch, layer, module, x, out)
        m = self._meta(pool)
        blocks = self._dense_blocks(m)
        A, B, sc, seg, (sseg, eseg) = self._views(pool, module, layer)
        if self._fused(pool) and not m.prefill and K.FUSED_DENSE:
            K.fused(x, A, B, sc, out, blocks, m.nblk, m.grid_blocks, m.block_m, m.slot_rank, pool.max_rank,
                    expert=False, scratch=self._scratch,
                    records=m.blk_rec if m.block_m == K.REC_ROWS else None, factors=seg,
                    block_cache=self._blocks_seg)
            return
        P = K.shrink(x, A, None, blocks, m.nblk, m.grid_blocks, m.block_m, m.slot_rank, pool.max_rank,
                     self._scratch, factors=sseg, block_cache=self._blocks_seg)
        K.expand(P, B, None, sc, None, out, blocks, m.grid_blocks, m.block_m, m.slot_rank, x.dtype,
                 pool.max_rank, factors=eseg, block_cache=self._blocks_seg)

    def embedding(self, pool: GpuPool, batch: BatchInfo, token_ids: torch.Tensor, out: torch.Tensor) -> None:
        if not self._supported(out):
            return self._torch.embedding(pool, batch, token_ids, out)
        m = self._meta(pool)
        blocks = self._dense_blocks(m)
        per = pool.layout.vocab_per_rank
        A = pool.A["embed"][:, 0]             # [S, R, per]
        P = K.embed_shrink(token_ids, A, pool.parallel.tp_rank * per, blocks, m.grid_blocks, m.block_m,
                           m.slot_rank, pool.max_rank)
        K.expand(P, pool.B["embed"][:, 0], None, pool.scaling["embed"][:, 0, 0], None, out, blocks,
                 m.grid_blocks, m.block_m, m.slot_rank, out.dtype, pool.max_rank)

    def expert_blocks(self, pool: GpuPool, routing: ExpertRouting) -> tuple:
        """The routing's (expert, slot) blocks, built on the device once and cached in ``routing``."""
        key = ("triton", id(pool))
        if key not in routing.cache:
            m = self._meta(pool)
            E = len(pool.layout.local_experts)
            bm, _ = K.expert_regime(routing.num_rows)
            blocks, nb, nblk = K.route_blocks(routing.token_index, routing.local_expert, m.token_slots, E,
                                              pool.max_loras, bm)
            routing.cache[key] = (blocks, nb, nblk, bm)
        return routing.cache[key]

    def experts(self, pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor,
                routing: ExpertRouting, out: torch.Tensor) -> None:
        if not self._supported(x):
            return self._torch.experts(pool, batch, layer, module, x, routing, out)
        m = self._meta(pool)
        blocks, nb, nblk, bm = self.expert_blocks(pool, routing)
        A, B, sc, seg, (sseg, eseg) = self._views(pool, module, layer)   # [S, E, R, in], [S, E, out, R], [S, E]
        segs = routing.cache.setdefault(("triton-seg", id(pool)), {})
        if K.expert_regime(routing.num_rows)[1] and self._fused(pool):
            K.fused(x, A, B, sc, out, blocks, nblk, nb, bm, m.slot_rank, pool.max_rank, expert=True, scratch=None,
                    factors=seg, block_cache=segs)
            return
        P = K.shrink(x, A, A.stride(1), blocks, nblk, nb, bm, m.slot_rank, pool.max_rank, factors=sseg,
                     block_cache=segs)
        K.expand(P, B, B.stride(1), sc, sc.stride(1), out, blocks, nb, bm, m.slot_rank, x.dtype, pool.max_rank,
                 factors=eseg, block_cache=segs)

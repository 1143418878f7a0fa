"""TP-aware LoRA layer ops for a mixed-adapter batch: add ``scaling * (x @ A^T) @ B^T`` per token.

The engine calls these at each LoRA point of its forward (docs/ARCHITECTURE.md, "Layer-op contract").
Tokens are grouped by slot once per batch (BatchInfo.slot_tokens), so a dense op is, per adapter present
in the batch, one gather, two small matmuls and one index_add; an expert op handles all the batch's
adapters at once with two einsums masked per routed row (no host synchronisation per expert). Never a
loop over tokens. Row-parallel and vocab-parallel deltas are partial sums, completed by the layer's own
all-reduce, exactly as the base layer's output is.

The arithmetic goes through a ``LoRABackend``; ``TorchBackend`` is plain torch (CPU and GPU). A fused
kernel (e.g. Triton segmented GEMM) plugs in by implementing the same two methods.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..runtime.batch import BatchInfo
from ..device.pool import GpuPool


class LoRABackend(Protocol):
    def delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        """``scaling * (x @ A^T) @ B^T`` for x ``[n, in]``, A ``[R, in]``, B ``[out, R]``."""

    def embed_delta(self, after_a: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        """``scaling * after_a @ B^T`` for after_a ``[n, R]`` (the gathered embedding-A columns)."""


class TorchBackend:
    def delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        return ((x @ A.to(dt).t()) @ B.to(dt).t()) * scaling.to(dt)

    def embed_delta(self, after_a: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        dt = after_a.dtype
        return (after_a @ B.to(dt).t()) * scaling.to(dt)


class LoRAOps:
    """The layer ops for one batch. Modules the pool does not hold add nothing."""

    def __init__(self, pool: GpuPool, batch: BatchInfo, backend: LoRABackend | None = None):
        self.pool, self.batch = pool, batch
        self.backend = backend or TorchBackend()
        self._local_experts = pool.layout.local_experts

    def _add(self, out: torch.Tensor, idx: torch.Tensor, d: torch.Tensor) -> None:
        out.index_add_(0, idx, d.to(out.dtype))

    # -- dense --------------------------------------------------------------------------------------
    def column(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Column-parallel (q/k/v, gate/up, shared.gate/up, lm_head at layer 0): ``out[T, out_local]``."""
        if module not in self.pool.A:
            return
        for s, idx in self.batch.slot_tokens.items():
            A = self.pool.A[module][s, layer]
            B = self.pool.B[module][s, layer]
            sc = self.pool.scaling[module][s, layer, 0]
            self._add(out, idx, self.backend.delta(x.index_select(0, idx), A, B, sc))

    def row(self, layer: int, module: str, x_local: torch.Tensor, out: torch.Tensor) -> None:
        """Row-parallel (o, down, shared.down): ``x_local`` is this rank's input slice; ``out`` is the
        partial sum that the layer's all-reduce completes."""
        self.column(layer, module, x_local, out)

    def embedding(self, token_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Vocab-parallel embedding: tokens outside this rank's vocab shard add 0 here (another rank
        adds them); the embedding's all-reduce completes the sum."""
        if "embed" not in self.pool.A:
            return
        per = self.pool.layout.vocab_per_rank
        start = self.pool.parallel.tp_rank * per
        for s, idx in self.batch.slot_tokens.items():
            A = self.pool.A["embed"][s, 0]  # [R, per]
            B = self.pool.B["embed"][s, 0]  # [hidden, R]
            sc = self.pool.scaling["embed"][s, 0, 0]
            local = token_ids.index_select(0, idx) - start
            valid = (local >= 0) & (local < per)
            after_a = A.t().index_select(0, local.clamp(0, per - 1)).to(out.dtype)
            after_a = after_a * valid.unsqueeze(1).to(out.dtype)
            self._add(out, idx, self.backend.embed_delta(after_a, B, sc))

    # -- experts ------------------------------------------------------------------------------------
    def _expert(self, layer: int, module: str, expert: int, x: torch.Tensor, token_index: torch.Tensor,
                out: torch.Tensor) -> None:
        """All slots of the batch at once, masked per row: no data-dependent shapes, so no host
        synchronisation per expert (a per-slot ``nonzero`` would stall the stream for every expert)."""
        if module not in self.pool.A or not self.batch.slot_tokens:
            return
        if expert not in self._local_experts:
            raise ValueError(f"expert {expert} is not local to this rank (local: {self._local_experts})")
        le = expert - self._local_experts.start
        ids = self.batch.slot_ids
        if ids is None:
            ids = torch.tensor(sorted(self.batch.slot_tokens), dtype=torch.int64, device=x.device)
        A = self.pool.A[module][:, layer, le].index_select(0, ids)  # [S_b, R, in]
        B = self.pool.B[module][:, layer, le].index_select(0, ids)  # [S_b, out, R]
        sc = self.pool.scaling[module][:, layer, le].index_select(0, ids)  # [S_b]
        row_slots = self.batch.token_slots.index_select(0, token_index)  # [n]
        w = (row_slots[:, None] == ids[None, :]).to(x.dtype) * sc.to(x.dtype)[None, :]  # [n, S_b]
        xa = torch.einsum("ni,sri->nsr", x, A.to(x.dtype)) * w[:, :, None]  # rows of other slots -> 0
        out += torch.einsum("nsr,sor->no", xa, B.to(x.dtype)).to(out.dtype)

    def expert_column(self, layer: int, module: str, expert: int, x: torch.Tensor, token_index: torch.Tensor,
                      out: torch.Tensor) -> None:
        """Expert gate/up (``experts.w1``/``experts.w3``) of one local expert, for its routed tokens:
        row i of ``x``/``out`` is batch token ``token_index[i]``."""
        self._expert(layer, module, expert, x, token_index, out)

    def expert_row(self, layer: int, module: str, expert: int, x: torch.Tensor, token_index: torch.Tensor,
                   out: torch.Tensor) -> None:
        """Expert down (``experts.w2``): ``x`` is this rank's MoE-TP slice of the expert's hidden
        activations; the partial sum is completed by the MoE all-reduce."""
        self._expert(layer, module, expert, x, token_index, out)

"""TP-aware LoRA layer ops for a mixed-adapter batch: add ``scaling * (x @ A^T) @ B^T`` per token.

The engine calls these at each LoRA point of its forward (docs/ARCHITECTURE.md, "Layer-op contract";
docs/KERNELS.md for the kernels). Row-parallel and vocab-parallel deltas are partial sums, completed by the
layer's own all-reduce, exactly as the base layer's output is.

The arithmetic goes through a ``LoRABackend``, chosen per batch by ``default_backend`` unless given:

* ``TritonBackend`` (``ops/triton_backend.py``, the default on CUDA when Triton imports): segmented
  shrink/expand kernels over static device metadata; no host synchronisation; a decode step is capturable in
  a CUDA graph (build the backend with ``max_tokens=`` and reuse it for every batch).
* ``TorchBackend`` (the default on CPU, and the reference the kernels are tested against): per slot of the
  batch one gather, two matmuls and one index_add for a dense op; per routed row its own slot's (and
  expert's) factors for the expert op.

Row isolation holds in both: a row's delta is computed from its own adapter's factors only, and rows of
other adapters or without adapter are selected away (``torch.where`` / not in any kernel block), never
multiplied by 0, so one adapter's inf/NaN cannot reach another request's rows.
``TP_LORA_BACKEND=torch|triton`` overrides the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from ..device.pool import GpuPool
from ..errors import TPLoRAError
from ..runtime.batch import BatchInfo


class BackendError(TPLoRAError):
    """The requested LoRA backend cannot run here (e.g. Triton asked for without CUDA)."""


@dataclass
class ExpertRouting:
    """The routed rows of one MoE layer on this rank, shared by its w1/w3/w2 ops.

    ``token_index[i]``: the batch token of routed row i; ``local_expert[i]``: its expert as a local index
    (0 .. E_local-1). Any order (grouping by expert, as fused-MoE kernels sort them, is best for the base
    GEMM; the LoRA kernels sort by (expert, slot) themselves, on the device). Backends cache their per-layer
    metadata in ``cache``.
    """
    token_index: torch.Tensor
    local_expert: torch.Tensor
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.token_index.numel())


class LoRABackend(Protocol):
    """What a backend implements. Every method adds into ``out`` in place."""

    def prepare(self, pool: GpuPool, batch: BatchInfo) -> None:
        """Once per batch, before any op (host planning and non-blocking copies only)."""

    def linear(self, pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor,
               out: torch.Tensor) -> None:
        """Dense module: x ``[T, in_local]``, out ``[T, out_local]`` (any row/column strides)."""

    def embedding(self, pool: GpuPool, batch: BatchInfo, token_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Vocab-parallel embedding delta: token_ids ``[T]``, out ``[T, hidden]``."""

    def experts(self, pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor,
                routing: ExpertRouting, out: torch.Tensor) -> None:
        """All routed rows of all local experts: x ``[N, in_local]``, out ``[N, out_local]``."""


def _row_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, sc: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
    """Per row its own factors: A ``[n, R, in]``, B ``[n, out, R]``, sc ``[n]``; rows with ``valid`` False
    give exactly 0 (selected away, so a NaN of theirs stays theirs)."""
    dt = x.dtype
    xa = torch.einsum("ni,nri->nr", x, A.to(dt))
    d = torch.einsum("nr,nor->no", xa, B.to(dt)) * sc.to(dt)[:, None]
    return torch.where(valid[:, None], d, torch.zeros((), dtype=dt, device=d.device))


class TorchBackend:
    """Plain torch (CPU and GPU)."""

    def delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        """``scaling * (x @ A^T) @ B^T`` for x ``[n, in]``, A ``[R, in]``, B ``[out, R]``."""
        dt = x.dtype
        return ((x @ A.to(dt).t()) @ B.to(dt).t()) * scaling.to(dt)

    def embed_delta(self, after_a: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        """``scaling * after_a @ B^T`` for after_a ``[n, R]`` (the gathered embedding-A columns)."""
        dt = after_a.dtype
        return (after_a @ B.to(dt).t()) * scaling.to(dt)

    def prepare(self, pool: GpuPool, batch: BatchInfo) -> None:
        return None

    def linear(self, pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor,
               out: torch.Tensor) -> None:
        for s, idx in batch.slot_tokens.items():
            A = pool.A[module][s, layer]
            B = pool.B[module][s, layer]
            sc = pool.scaling[module][s, layer, 0]
            out.index_add_(0, idx, self.delta(x.index_select(0, idx), A, B, sc).to(out.dtype))

    def embedding(self, pool: GpuPool, batch: BatchInfo, token_ids: torch.Tensor, out: torch.Tensor) -> None:
        per = pool.layout.vocab_per_rank
        start = pool.parallel.tp_rank * per
        for s, idx in batch.slot_tokens.items():
            A = pool.A["embed"][s, 0]  # [R, per]
            B = pool.B["embed"][s, 0]  # [hidden, R]
            sc = pool.scaling["embed"][s, 0, 0]
            local = token_ids.index_select(0, idx) - start
            valid = (local >= 0) & (local < per)
            after_a = A.t().index_select(0, local.clamp(0, per - 1)).to(out.dtype)
            after_a = torch.where(valid.unsqueeze(1), after_a, torch.zeros((), dtype=out.dtype,
                                                                           device=out.device))
            out.index_add_(0, idx, self.embed_delta(after_a, B, sc).to(out.dtype))

    def experts(self, pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor,
                routing: ExpertRouting, out: torch.Tensor) -> None:
        if not batch.slot_tokens or routing.num_rows == 0:
            return
        row_slots = batch.token_slots.index_select(0, routing.token_index)
        valid = row_slots >= 0
        s = row_slots.clamp(min=0)
        e = routing.local_expert.to(torch.int64)
        A = pool.A[module][:, layer][s, e]          # [n, R, in]: each row its own slot's expert factors
        B = pool.B[module][:, layer][s, e]          # [n, out, R]
        sc = pool.scaling[module][:, layer][s, e]   # [n]
        out += _row_delta(x, A, B, sc, valid).to(out.dtype)


def default_backend(device: torch.device | str) -> LoRABackend:
    """``TritonBackend`` on CUDA when Triton imports, else ``TorchBackend``; ``TP_LORA_BACKEND`` overrides."""
    want = os.environ.get("TP_LORA_BACKEND", "").strip().lower()
    dev = torch.device(device)
    if want not in ("", "torch", "triton"):
        raise BackendError(f"TP_LORA_BACKEND={want!r}: expected 'torch' or 'triton'")
    if want == "torch" or (want == "" and dev.type != "cuda"):
        return TorchBackend()
    if dev.type != "cuda":
        raise BackendError(f"TP_LORA_BACKEND=triton needs a CUDA pool; this pool is on {dev}")
    try:
        from .triton_backend import TritonBackend
    except ImportError as e:  # Triton missing on a CUDA machine: fall back, loudly only when asked for
        if want == "triton":
            raise BackendError(f"TP_LORA_BACKEND=triton but Triton does not import: {e}") from e
        return TorchBackend()
    return TritonBackend()


class LoRAOps:
    """The layer ops for one batch. Modules the pool does not hold add nothing.

    ``backend``: None picks ``default_backend(pool.device)``. Pass one ``TritonBackend(max_tokens=...)``
    for every batch to replay a captured CUDA graph: constructing ``LoRAOps`` rewrites its static metadata
    in place (outside the graph), and the captured kernels read it.
    """

    def __init__(self, pool: GpuPool, batch: BatchInfo, backend: LoRABackend | None = None):
        self.pool, self.batch = pool, batch
        self.backend = backend if backend is not None else default_backend(pool.device)
        self._local_experts = pool.layout.local_experts
        self.backend.prepare(pool, batch)

    # -- dense --------------------------------------------------------------------------------------
    def column(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Column-parallel (q/k/v, gate/up, shared.gate/up, lm_head at layer 0): ``out[T, out_local]``."""
        if module not in self.pool.A or not self.batch.slot_tokens:
            return
        self.backend.linear(self.pool, self.batch, layer, module, x, out)

    def row(self, layer: int, module: str, x_local: torch.Tensor, out: torch.Tensor) -> None:
        """Row-parallel (o, down, shared.down): ``x_local`` is this rank's input slice; ``out`` is the
        partial sum that the layer's all-reduce completes."""
        self.column(layer, module, x_local, out)

    def column_parts(self, layer: int, modules: Sequence[str], x: torch.Tensor, out: torch.Tensor) -> None:
        """A merged column linear (qkv: ``("q", "k", "v")``, gate_up: ``("gate", "up")``): ``out[T, sum of
        the parts' local widths]``, each part's delta added into its own column range (views; no copy)."""
        pos = 0
        for m in modules:
            width = self._width(m)
            self.column(layer, m, x, out[:, pos:pos + width])
            pos += width
        if pos != out.shape[1]:
            raise ValueError(f"merged output has {out.shape[1]} columns; parts {list(modules)} have {pos}")

    def _width(self, module: str) -> int:
        if module in self.pool.shapes:
            return self.pool.shapes[module].b_shape[0]
        from ..device.pool import module_shapes   # a part this pool does not hold: its width from the spec
        shp = module_shapes(self.pool.model, self.pool.parallel, 1, {module})
        if module not in shp:
            raise ValueError(f"module {module!r} does not exist in this model")
        return shp[module].b_shape[0]

    def embedding(self, token_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Vocab-parallel embedding: tokens outside this rank's vocab shard add 0 here (another rank
        adds them); the embedding's all-reduce completes the sum."""
        if "embed" not in self.pool.A or not self.batch.slot_tokens:
            return
        self.backend.embedding(self.pool, self.batch, token_ids, out)

    def lm_head(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Vocab-parallel lm_head: ``out[T, vocab_per_rank]`` before the all-gather."""
        self.column(0, "lm_head", x, out)

    # -- experts ------------------------------------------------------------------------------------
    def expert_routing(self, token_index: torch.Tensor, experts: torch.Tensor) -> ExpertRouting:
        """Routing of one MoE layer's routed rows: ``experts`` are GLOBAL expert ids, all local to this rank
        (not checked on the device: that would synchronise)."""
        return ExpertRouting(token_index, (experts - self._local_experts.start).to(torch.int32))

    def experts_column(self, layer: int, module: str, x: torch.Tensor, routing: ExpertRouting,
                       out: torch.Tensor) -> None:
        """gate/up (``experts.w1`` / ``experts.w3``) of ALL routed rows of all local experts at once:
        x ``[N, hidden]``, out ``[N, I_local]``, row i routed as ``routing`` says."""
        if module not in self.pool.A or not self.batch.slot_tokens or routing.num_rows == 0:
            return
        self.backend.experts(self.pool, self.batch, layer, module, x, routing, out)

    def experts_row(self, layer: int, module: str, x: torch.Tensor, routing: ExpertRouting,
                    out: torch.Tensor) -> None:
        """down (``experts.w2``) of all routed rows: x ``[N, I_local]`` (this rank's MoE-TP slice), out
        ``[N, hidden]`` (partial sum completed by the MoE all-reduce)."""
        self.experts_column(layer, module, x, routing, out)

    def _one_expert(self, expert: int, token_index: torch.Tensor) -> ExpertRouting:
        if expert not in self._local_experts:
            raise ValueError(f"expert {expert} is not local to this rank (local: {self._local_experts})")
        le = torch.full_like(token_index, expert - self._local_experts.start, dtype=torch.int32)
        return ExpertRouting(token_index, le)

    def expert_column(self, layer: int, module: str, expert: int, x: torch.Tensor, token_index: torch.Tensor,
                      out: torch.Tensor) -> None:
        """Expert gate/up (``experts.w1``/``experts.w3``) of one local expert, for its routed tokens:
        row i of ``x``/``out`` is batch token ``token_index[i]``. Prefer ``experts_column`` (one launch pair
        for all experts of a layer)."""
        if module not in self.pool.A or not self.batch.slot_tokens:
            return
        self.experts_column(layer, module, x, self._one_expert(expert, token_index), out)

    def expert_row(self, layer: int, module: str, expert: int, x: torch.Tensor, token_index: torch.Tensor,
                   out: torch.Tensor) -> None:
        """Expert down (``experts.w2``): ``x`` is this rank's MoE-TP slice of the expert's hidden
        activations; the partial sum is completed by the MoE all-reduce."""
        self.expert_column(layer, module, expert, x, token_index, out)

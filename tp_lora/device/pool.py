"""GpuPool: per-rank device buffers with ``max_loras`` fixed adapter slots, LRU, refcounts.

Layout (docs/ARCHITECTURE.md): per pool module, A ``[S, L, (E_local,) R, in_local]`` and B
``[S, L, (E_local,) out_local, R]`` in the serving dtype, plus float32 scalings ``[S, L, max(E_local,1)]``.
A slot's region of each buffer is contiguous (slot is the leading dim), and a module's blocks for
consecutive layers/experts are consecutive, so a chunk's slices of one module form one copy group. All
A/B buffers are views of one flat allocation (``flat``): the placement kernel addresses every group of a
chunk as offsets into it, in one launch. Slot allocation is a pure function of the call sequence: every
rank picks the same slot.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..errors import NoFreeSlotError, PoolError
from ..plan.model import ModelSpec
from ..format.modules import MODULES
from ..plan.layout import RankLayout
from ..plan.parallel import ParallelSpec

_ALIGN = 256  # bytes: every A/B buffer of the pool starts on this boundary of its flat allocation


@dataclass(frozen=True)
class ModuleShape:
    module: str
    layers: int  # 1 for embed / lm_head
    experts: int  # 0 for non-expert modules
    a_shape: tuple[int, int]  # (R, in_local)
    b_shape: tuple[int, int]  # (out_local, R)

    @property
    def blocks(self) -> int:
        return self.layers * max(self.experts, 1)


def module_shapes(model: ModelSpec, parallel: ParallelSpec | RankLayout, max_rank: int,
                  modules: tuple[str, ...] | list[str] | set[str]) -> dict[str, ModuleShape]:
    """Local buffer shapes of the pool modules that exist in this model (pure), from the module table:
    A ``(R, in_local)``, B ``(out_local, R)`` where the TP kind's split dimension is this rank's slice."""
    layout = RankLayout.of(model, parallel)
    out: dict[str, ModuleShape] = {}
    for m, kind in MODULES.items():
        if m not in modules or not model.has_scope(kind.scope):
            continue
        col = kind.tp.splits_output
        d_out = layout.local(kind.out_dim) if col else model.dim(kind.out_dim)
        d_in = model.dim(kind.in_dim) if col else layout.local(kind.in_dim)
        out[m] = ModuleShape(m, 1 if kind.is_global else model.num_hidden_layers,
                             layout.n_local_experts if kind.per_expert else 0, (max_rank, d_in), (d_out, max_rank))
    return out


class GpuPool:
    """Device buffers and slot bookkeeping. Not thread-safe: the manager serialises calls."""

    def __init__(self, model: ModelSpec, parallel: ParallelSpec | RankLayout, *, max_loras: int, max_rank: int,
                 modules: tuple[str, ...] | list[str] | set[str], dtype: torch.dtype,
                 device: torch.device | str):
        if max_loras < 1:
            raise PoolError(f"max_loras must be >= 1, got {max_loras}")
        if max_rank < 1:
            raise PoolError(f"max_lora_rank must be >= 1, got {max_rank}")
        self.layout = RankLayout.of(model, parallel)
        self.model, self.parallel = model, self.layout.parallel
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.shapes = module_shapes(model, self.layout, max_rank, set(modules))
        S = max_loras
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.scaling: dict[str, torch.Tensor] = {}
        # every A/B buffer is a view of one flat allocation (each start aligned to _ALIGN bytes): the
        # placement kernel addresses all of a chunk's destinations as offsets into it, in one launch
        dims: list[tuple[str, str, tuple[int, ...]]] = []
        for m, s in self.shapes.items():
            lead = (S, s.layers) + ((s.experts,) if s.experts else ())
            dims += [(m, "A", lead + s.a_shape), (m, "B", lead + s.b_shape)]
        align = max(1, _ALIGN // torch.empty((), dtype=dtype).element_size())
        starts, total = [], 0
        for _, _, shape in dims:
            starts.append(total)
            total += -(-math.prod(shape) // align) * align
        self.flat = torch.zeros(max(total, 1), dtype=dtype, device=self.device)
        for (m, side, shape), o in zip(dims, starts):
            (self.A if side == "A" else self.B)[m] = self.flat[o:o + math.prod(shape)].view(shape)
        for m, s in self.shapes.items():
            self.scaling[m] = torch.zeros((S, s.layers, max(s.experts, 1)), dtype=torch.float32,
                                          device=self.device)
        self.slot_name: list[str | None] = [None] * S
        self.refcount = [0] * S
        self.last_used = [0] * S
        self.reserved = [False] * S  # being loaded: never an eviction victim
        self._dirty: list[set[tuple[str, str]]] = [set() for _ in range(S)]  # (module, A|B|S) written
        self._clock = 0
        self.evictions = 0

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def slot_bytes(self) -> int:
        return sum(self.A[m][0].numel() * self.A[m].element_size() +
                   self.B[m][0].numel() * self.B[m].element_size() for m in self.shapes)

    # -- slot allocation (deterministic) ----------------------------------------------------------
    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def choose_slot(self) -> tuple[int, str | None]:
        """The slot the next load will use and the adapter it evicts (None if free). Does not modify."""
        for i, n in enumerate(self.slot_name):
            if n is None and not self.reserved[i]:
                return i, None
        victims = [i for i in range(self.max_loras)
                   if self.refcount[i] == 0 and not self.reserved[i]]
        if not victims:
            busy = {self.slot_name[i]: self.refcount[i] for i in range(self.max_loras)}
            raise NoFreeSlotError(
                f"all {self.max_loras} GPU slots are held by running batches or loads in flight "
                f"(slot refcounts: {busy}); finish batches and retry")
        i = min(victims, key=lambda j: (self.last_used[j], j))
        return i, self.slot_name[i]

    def reserve(self, slot: int, name: str) -> str | None:
        """Take ``slot`` for ``name`` (evicting its previous adapter). Returns the evicted name."""
        if self.refcount[slot]:
            raise PoolError(f"slot {slot} holds {self.slot_name[slot]!r} with {self.refcount[slot]} running "
                            f"batch references: never evicted")
        evicted = self.slot_name[slot]
        if evicted is not None:
            self.evictions += 1
        self.slot_name[slot] = name
        self.reserved[slot] = True
        self.last_used[slot] = self.tick()
        return evicted

    def commit(self, slot: int) -> None:
        self.reserved[slot] = False
        self.last_used[slot] = self.tick()

    def free(self, slot: int) -> None:
        """Forget the slot's adapter (rollback or unregister) and zero all of it (A, B and scalings):
        nothing of a previous tenant, NaN from a rejected load included, stays in a free slot."""
        if self.refcount[slot]:
            raise PoolError(f"slot {slot} ({self.slot_name[slot]!r}) is referenced by a running batch")
        self.slot_name[slot] = None
        self.reserved[slot] = False
        for m in self.shapes:
            self.A[m][slot].zero_()
            self.B[m][slot].zero_()
            self.scaling[m][slot].zero_()
        self._dirty[slot] = set()

    def reset_lru(self) -> None:
        """Restart the LRU order (ties go to the lowest slot): after a reconcile, every rank's order is
        the same again whatever each one saw before."""
        self._clock = 0
        self.last_used = [0] * self.max_loras

    def acquire(self, slot: int) -> None:
        self.refcount[slot] += 1
        self.last_used[slot] = self.tick()

    def release(self, slot: int) -> None:
        if self.refcount[slot] <= 0:
            raise PoolError(f"slot {slot} released more often than acquired")
        self.refcount[slot] -= 1

    # -- data ------------------------------------------------------------------------------------
    def clear_slot(self, slot: int, covered: dict[tuple[str, str], bool] | None = None) -> None:
        """Zero the slot: padding rows/columns and untargeted modules must add zero.

        ``covered[(module, side)]`` True means the next load overwrites every element of that buffer
        (every block, full rank, full width), so zeroing it first would be wasted launches."""
        # without ``covered`` (a plain "zero this slot") everything is zeroed; with it (the transfer
        # engine), buffers that nobody wrote since allocation or the last clear are skipped too
        dirty = self._dirty[slot] if covered is not None else {(m, x) for m in self.shapes for x in "ABS"}
        for m in self.shapes:
            for side, buf in (("A", self.A[m]), ("B", self.B[m])):
                if (m, side) in dirty and not (covered and covered.get((m, side))):
                    buf[slot].zero_()
            if (m, "S") in dirty and not (covered and covered.get((m, "A")) and covered.get((m, "B"))):
                self.scaling[m][slot].zero_()
        # what the coming load may write: the buffers it touches, and (conservatively) every scaling row,
        # since its scalings can name modules it holds no slice of on this rank
        written = set(covered) if covered is not None else {(m, x) for m in self.shapes for x in ("A", "B")}
        self._dirty[slot] = written | {(m, "S") for m in self.shapes}

    def coverage(self, ops) -> dict[tuple[str, str], bool]:
        """Which (module, side) buffers a plan's slices overwrite completely (pure bookkeeping)."""
        area: dict[tuple[str, str], int] = {}
        for op in ops:
            area[(op.module, op.side)] = area.get((op.module, op.side), 0) + op.nrows * op.ncols
        out = {}
        for (m, side), n in area.items():
            if m in self.shapes:
                buf = (self.A if side == "A" else self.B)[m]
                out[(m, side)] = n == buf[0].numel()
        return out

    def flat_offset(self, view: torch.Tensor) -> int:
        """Element offset of ``view``'s first element in ``flat`` (a view of an A/B buffer)."""
        return (view.data_ptr() - self.flat.data_ptr()) // self.flat.element_size()

    def block(self, module: str, side: str, slot: int) -> torch.Tensor:
        """The slot's buffer of ``module``/``side`` viewed as ``[blocks, D0, D1]``."""
        buf = (self.A if side == "A" else self.B)[module][slot]
        return buf.view(-1, buf.shape[-2], buf.shape[-1])

    def scaling_tables(self, scalings: dict[tuple[str, int, int | None], float], pinned: bool = False,
                       memo: dict | None = None) -> dict[str, torch.Tensor]:
        """Host tables ``[layers, experts or 1]`` float32 per module of a plan's scalings, built with one
        indexed write per module (an element-wise fill of a sharded MoE's 18k scalings took ~0.1-0.2 s,
        inside the first activation) and kept in ``memo`` (the plan's): built once, at register."""
        key = ("scalings", id(self), pinned)
        host: dict[str, torch.Tensor] | None = memo.get(key) if memo is not None else None
        if host is not None:
            return host
        cols: dict[str, tuple[list[int], list[int], list[float]]] = {}
        for (m, layer, le), val in scalings.items():
            if m in self.scaling:
                c = cols.setdefault(m, ([], [], []))
                c[0].append(layer)
                c[1].append(0 if le is None else le)
                c[2].append(float(val))
        host = {}
        for m, (layers, les, vals) in cols.items():
            t = torch.zeros(self.scaling[m].shape[1:], dtype=torch.float32)
            t[torch.tensor(layers), torch.tensor(les)] = torch.tensor(vals, dtype=torch.float32)
            host[m] = t.pin_memory() if pinned else t
        if memo is not None:
            memo[key] = host
        return host

    def set_scalings(self, slot: int, scalings: dict[tuple[str, int, int | None], float],
                     non_blocking: bool = False, memo: dict | None = None) -> None:
        """One copy per module (not one per element: on a GPU that would be thousands of tiny copies).
        ``memo`` (the plan's) keeps the host tables, so a warm activation does not rebuild them."""
        cuda_async = non_blocking and self.device.type == "cuda"
        for m, t in self.scaling_tables(scalings, cuda_async, memo).items():
            self.scaling[m][slot].copy_(t, non_blocking=cuda_async)

    def checksum(self, slot: int) -> str:
        """A digest of everything the slot holds (tests: serving adapters stay bit-identical)."""
        h = hashlib.sha256()
        for m in self.shapes:
            for t in (self.A[m][slot], self.B[m][slot], self.scaling[m][slot]):
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

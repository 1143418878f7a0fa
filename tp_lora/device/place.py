"""Placement: a packed chunk on the device -> its slices' blocks in a pool slot, cast and value-checked.

A chunk holds its slices back to back, grouped in ``CopyGroup``s (same module, side, shape, consecutive
destination blocks). Each group lands in ``pool.block(module, side, slot)[flat_start:+count, row0:+r, :c]``
cast to the pool dtype, and a cold load checks the values as they will be served: no NaN/Inf, and no
finite value beyond the pool dtype's range (1e5 into float16).

Two ways, the same bytes in the slot:

* **kernel** (CUDA with Triton; the default there): ONE launch per chunk and stored dtype copies every
  group of the chunk, casts, and records each group's largest |value| (NaN counts as inf) for the check.
  Per chunk the loader thread issues one launch instead of one strided copy per group plus a finite check
  (Llama-3-70B r64, rank of TP=8: ~100 groups a chunk, ~40 ms of the loader thread per load; the loader's
  launches were the pipeline's serial part). The tables it reads (per group: source offset, destination
  offset in the pool's flat allocation, shape and strides; per tile of ``BLOCK`` elements: its group) are
  built once per (plan, chunk list, pool) on the host and uploaded once.
* **copies** (CPU; float64 files; ``placement="copies"``): one strided ``copy_`` per group and torch
  reductions for the check. The CPU suite runs the kernel under Triton's interpreter against it.

After the last chunk, ``finish`` returns one device bool (some value is bad) without a host sync; only a
failed load reads the per-group peaks back to name the tensor group (``detail``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..format.dtypes import safetensors_torch
from ..format.modules import MODULES
from ..plan.memo import PerPlan
from ..plan.packing import Chunk, CopyGroup
from .pool import GpuPool

log = logging.getLogger(__name__)

PlacementMode = Literal["auto", "kernel", "copies"]
PLACEMENT_MODES: tuple[str, ...] = ("auto", "kernel", "copies")

KERNEL_DTYPES = ("F16", "BF16", "F32")
"""Stored dtypes the kernel places (float64 files, rare, take the copies: its peaks are float32)."""

BLOCK = 4096
"""Elements one kernel program copies (8 KiB of bf16)."""

_ALIGN_ELEMS = 64  # warm-up buffers: as aligned as the staging buffer and the pool (Triton specialises on it)
_COLS = 10  # table columns: src_off, dst_base, dst_slot_stride, n, c, r, s0, s1, first_tile, peak index

def _kernel():
    """The jitted kernel (``place_kernel``), imported at its first use: Triton decides when it is
    imported whether kernels are compiled or interpreted (``TRITON_INTERPRET``), and this module is
    imported long before (by the transfer engine); the CPU tests set the variable after that."""
    from .place_kernel import place_kernel

    return place_kernel


# Triton's interpreter patches triton.language while a kernel runs, process-wide: two threads running
# kernels at once (the preparer's warm-up beside a load) break each other there. On a GPU launches are
# thread-safe and take no lock.
_INTERPRET_LOCK = threading.Lock()


def _launch_guard():
    return _INTERPRET_LOCK if os.environ.get("TRITON_INTERPRET", "0") == "1" else contextlib.nullcontext()


def cast_limit(src: torch.dtype, dst: torch.dtype) -> float | None:
    """Largest |value| ``dst`` holds when a cast from ``src`` can overflow it, else None (no check)."""
    lo = torch.finfo(dst).max
    return float(lo) if torch.finfo(src).max > lo else None


def triton_present() -> bool:
    """Triton is installed (found, not imported: see ``_kernel``)."""
    return importlib.util.find_spec("triton") is not None


def kernel_available(device: torch.device) -> bool:
    """The kernel runs here: CUDA with Triton, or CPU tensors under Triton's interpreter (tests)."""
    if not triton_present():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class _Launch:
    dtype: str
    tiles: slice  # this launch's rows of the tile -> group table
    groups: slice  # its rows of the group table


@dataclass
class _ChunkTables:
    launches: list[_Launch] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)  # indices in chunk.groups placed by torch copies


@dataclass
class _PlanTables:
    """The kernel's tables for one (plan, chunk list, pool): host rows built once, uploaded once."""

    chunks: dict[int, _ChunkTables]  # by chunk position in the list
    table: torch.Tensor  # [G, _COLS] int64 (device)
    tile_group: torch.Tensor  # [tiles] int32 (device): each tile's row in ``table``
    limits: torch.Tensor  # [G] float32 (device): a group is bad when its peak exceeds this
    peaks: torch.Tensor  # [G] float32 (device): per load, zeroed at its start
    groups: list[tuple[CopyGroup, float | None]]  # per row: the group, its cast limit (None: none)


@dataclass
class LoadCheck:
    """One load's value checks in flight: the kernel's peaks, the copies' device bools and peaks."""

    check: bool
    tables: _PlanTables | None = None
    oks: list[torch.Tensor] = field(default_factory=list)
    peaks: list[tuple[CopyGroup, torch.Tensor, float]] = field(default_factory=list)
    used: bool = False  # some kernel launch ran with CHECK


class Placer:
    """Places chunks into slots (see the module docstring). One per transfer engine; loads run one at
    a time, so a plan's peaks buffer is reused across its loads."""

    def __init__(self, pool: GpuPool, mode: PlacementMode = "auto", memo: PerPlan | None = None):
        if mode not in PLACEMENT_MODES:
            raise ValueError(f"placement must be one of {PLACEMENT_MODES}, got {mode!r}")
        self.pool = pool
        can = kernel_available(pool.device)
        if mode == "kernel" and not can:
            raise ValueError(f"placement='kernel' needs Triton and a CUDA pool (pool on {pool.device}, "
                             f"triton {'present' if triton_present() else 'missing'})")
        self.kernel = can and (mode == "kernel" or (mode == "auto" and pool.device.type == "cuda"))
        self._memo = memo if memo is not None else PerPlan()
        self._warm: set[tuple[str, bool]] = set()
        self._warm_finish = False

    # -- tables ------------------------------------------------------------------------------------
    def prepare(self, plan: object, chunks: list[Chunk]) -> None:
        """Build (and upload) the kernel's tables of ``chunks`` now rather than in the first load."""
        if self.kernel:
            self._tables(plan, chunks)

    def _tables(self, plan: object, chunks: list[Chunk]) -> _PlanTables:
        return self._memo.get(plan, ("place", id(self.pool), id(chunks)), lambda: self._build(chunks))

    def _build(self, chunks: list[Chunk]) -> _PlanTables:
        pool = self.pool
        rows: list[list[int]] = []
        tile_rows: list[np.ndarray] = []
        limits: list[float] = []
        groups: list[tuple[CopyGroup, float | None]] = []
        per_chunk: dict[int, _ChunkTables] = {}
        ntiles = 0
        for ci, chunk in enumerate(chunks):
            ct = per_chunk[ci] = _ChunkTables()
            by_dtype: dict[str, list[int]] = {}
            for gi, g in enumerate(chunk.groups):
                isz = torch.empty((), dtype=safetensors_torch(g.dtype)).element_size()
                if g.dtype in KERNEL_DTYPES and g.byte_offset % isz == 0:
                    by_dtype.setdefault(g.dtype, []).append(gi)
                else:
                    ct.copies.append(gi)
            for dt, gis in by_dtype.items():
                g_lo, t_lo = len(rows), ntiles
                isz = torch.empty((), dtype=safetensors_torch(dt)).element_size()
                lim = cast_limit(safetensors_torch(dt), pool.dtype)
                for gi in gis:
                    g = chunk.groups[gi]
                    dst = _dst_view(pool, chunk, g, 0)
                    r, c = g.shape
                    n = g.count * r * c
                    tiles = -(-n // BLOCK)
                    slot_stride = (pool.A if g.side == "A" else pool.B)[g.module].stride(0)
                    rows.append([g.byte_offset // isz, pool.flat_offset(dst), slot_stride, n, c, r,
                                 dst.stride(0), dst.stride(1), ntiles - t_lo, len(rows)])
                    tile_rows.append(np.full(tiles, len(rows) - 1, dtype=np.int32))
                    ntiles += tiles
                    limits.append(lim if lim is not None else float(torch.finfo(torch.float32).max))
                    groups.append((g, lim))
                ct.launches.append(_Launch(dt, slice(t_lo, ntiles), slice(g_lo, len(rows))))
        dev = pool.device
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _COLS)
        tg = torch.from_numpy(np.concatenate(tile_rows)) if tile_rows else torch.zeros(0, dtype=torch.int32)
        assert len(rows) < 2 ** 31 and ntiles < 2 ** 31, (len(rows), ntiles)
        return _PlanTables(per_chunk, table.to(dev), tg.to(dev), torch.tensor(limits, dtype=torch.float32).to(dev),
                           torch.zeros(len(rows), dtype=torch.float32, device=dev), groups)

    def warm_up(self, dtypes) -> None:
        """Compile (or load from Triton's cache) the kernel for each stored dtype in ``dtypes`` with and
        without the check, by a one-element launch into scratch: compiling inside the first load would
        cost it a second or more."""
        if not self.kernel:
            return
        dev = self.pool.device
        tab = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.int64, device=dev)
        tg = torch.zeros(1, dtype=torch.int32, device=dev)
        peaks = torch.zeros(1, dtype=torch.float32, device=dev)
        dst = torch.empty(_ALIGN_ELEMS, dtype=self.pool.dtype, device=dev)
        for dt in dtypes:
            if dt not in KERNEL_DTYPES:
                continue
            src = torch.zeros(_ALIGN_ELEMS, dtype=safetensors_torch(dt), device=dev)
            for check in (False, True):
                key = (dt, check)
                if key not in self._warm:
                    with _launch_guard():
                        _kernel()[(1,)](src, dst, tab, tg, peaks, 0, 0, CHECK=check, BLOCK=BLOCK,
                                            RNE_BF16=self._rne(dt), num_warps=4)
                    self._warm.add(key)
        if self._warm and not self._warm_finish:
            # ``finish``'s comparison of the peaks with the limits (float32): CUDA loads a kernel at its
            # first launch, which would otherwise land at the end of the first load
            ok = (peaks <= torch.ones_like(peaks)).all()
            bool((~torch.stack([ok, ok]).all()).item())
            self._warm_finish = True

    def _rne(self, dtype: str) -> bool:
        return (dtype != "BF16" and self.pool.dtype == torch.bfloat16
                and os.environ.get("TRITON_INTERPRET", "0") == "1")

    # -- a load ------------------------------------------------------------------------------------
    def begin(self, plan: object, chunks: list[Chunk], check: bool, arm: bool = True) -> LoadCheck:
        """Start a load of ``chunks`` (on the copy stream, where every launch of the load goes).
        ``arm=False``: its device work (zeroing the value check's peaks) is left to ``arm``, called before
        the first placement (a cold load posts its reads first)."""
        st = LoadCheck(check)
        if self.kernel:
            st.tables = self._tables(plan, chunks)
        if arm:
            self.arm(st)
        return st

    def arm(self, st: LoadCheck) -> None:
        """The load's device-side start: the value check's peaks zeroed (on the current stream)."""
        if st.check and st.tables is not None and st.tables.peaks.numel():
            st.tables.peaks.zero_()

    def place(self, st: LoadCheck, chunk_pos: int, chunk: Chunk, src: torch.Tensor, slot: int,
              check: bool) -> None:
        """Place chunk ``chunk_pos`` of the load's list from ``src`` (its packed bytes, uint8, on the
        pool's device) into ``slot``; ``check``: record the values for ``finish`` (cold loads)."""
        if st.tables is None:
            self._copies(st, chunk, range(len(chunk.groups)), src, slot, check)
            return
        ct = st.tables.chunks[chunk_pos]
        for ln in ct.launches:
            sdt = safetensors_torch(ln.dtype)
            isz = torch.empty((), dtype=sdt).element_size()
            srcv = src[:src.numel() // isz * isz].view(sdt)
            tiles = ln.tiles.stop - ln.tiles.start
            if tiles:
                with _launch_guard():
                    _kernel()[(tiles,)](srcv, self.pool.flat, st.tables.table, st.tables.tile_group,
                                            st.tables.peaks, ln.tiles.start, slot, CHECK=bool(check),
                                            BLOCK=BLOCK, RNE_BF16=self._rne(ln.dtype), num_warps=4)
                st.used |= bool(check)
        if ct.copies:
            self._copies(st, chunk, ct.copies, src, slot, check)

    def _copies(self, st: LoadCheck, chunk: Chunk, which, src: torch.Tensor, slot: int, check: bool) -> None:
        groups = [chunk.groups[i] for i in which]
        mixed = len({g.dtype for g in chunk.groups}) > 1 or len(groups) != len(chunk.groups)
        for g in groups:
            dt = safetensors_torch(g.dtype)
            r, c = g.shape
            part = src[g.byte_offset:g.byte_offset + g.nbytes].view(dt).view(g.count, r, c)
            _dst_view(self.pool, chunk, g, slot).copy_(part)
            if check and mixed:
                st.oks.append(torch.isfinite(part).all())
            limit = cast_limit(part.dtype, self.pool.dtype) if check else None
            if limit is not None:
                # finite in the file but not in the pool dtype (1e5 into float16, 1e300 F64 into float32):
                # the values are checked as they will be served, after the cast
                peak = part.abs().amax()  # in the stored dtype: F64's 1e300 stays 1e300
                st.oks.append(peak <= limit)
                st.peaks.append((g, peak, limit))
        if check and not mixed and chunk.nbytes:
            # one dtype: the chunk is packed without padding, so one check covers every slice
            st.oks.append(torch.isfinite(src[:chunk.nbytes].view(safetensors_torch(chunk.groups[0].dtype))).all())

    def finish(self, st: LoadCheck) -> torch.Tensor | None:
        """A device bool: some value of the load is bad (None: nothing was checked). No host sync."""
        oks = list(st.oks)
        if st.used and st.tables is not None:
            oks.append((st.tables.peaks <= st.tables.limits).all())
        return ~torch.stack(oks).all() if oks else None

    def detail(self, st: LoadCheck) -> str | None:
        """After a failed check (reads device values: the failure path only): the first tensor group whose
        finite values do not fit the pool dtype, with its largest |value|; None for NaN/Inf."""
        found: list[tuple[CopyGroup, float, float]] = [(g, float(p), lim) for g, p, lim in st.peaks]
        if st.used and st.tables is not None:
            peaks = st.tables.peaks.cpu().tolist()
            found += [(g, p, lim) for (g, lim), p in zip(st.tables.groups, peaks) if lim is not None]
        for g, v, limit in found:
            if v == v and v != float("inf") and not v <= limit:
                per = self.pool.layout.n_local_experts if MODULES[g.module].per_expert else 1
                first, last = g.flat_start // per, (g.flat_start + g.count - 1) // per
                where = f"layer {first}" if first == last else f"layers {first}-{last}"
                # short: it travels in the activation message's fixed-size reason field
                return (f"{g.module}.{g.side} ({where}, {g.dtype}) has |value| {v:.4g} > "
                        f"{str(self.pool.dtype).replace('torch.', '')} max {limit:.4g} after the cast")
        return None


def _dst_view(pool: GpuPool, chunk: Chunk, g: CopyGroup, slot: int) -> torch.Tensor:
    """Group ``g``'s destination in ``slot``: ``[count, r, c]`` of the module's ``[blocks, D0, D1]``."""
    r, c = g.shape
    dst = pool.block(g.module, g.side, slot)
    row0 = chunk.row0  # a row piece: rows [row0, row0 + r) of its slice
    if g.flat_start + g.count > dst.shape[0] or row0 + r > dst.shape[1] or c > dst.shape[2]:
        raise AssertionError(f"planned block {g} does not fit pool buffer {tuple(dst.shape)}")
    return dst[g.flat_start:g.flat_start + g.count, row0:row0 + r, :c]

"""Static batch metadata for the segmented LoRA kernels: what each kernel program works on.

A kernel program handles one *block*: up to ``block_m`` rows that all use the same slot (and, for the
expert op, the same local expert). Rows are addressed through a permutation (rows sorted by slot, or by
(expert, slot)), so the activations are never copied or reordered; rows without an adapter are in no block
and are never read or written. Blocks are the unit of row isolation: a program reads only its slot's
weights and writes only its own rows, so nothing of one adapter (huge values, inf, NaN) can reach a row of
another (no masking by multiplication anywhere).

Dense ops: the blocks follow from host-side facts only (each request's slot and token count, known when the
batch is built), so they are planned on the host once per batch (``plan_dense_blocks``, pure) and copied
into one packed device buffer with one non-blocking copy from pinned memory. In static mode (``DenseMeta``
with a fixed capacity) the buffers keep their addresses across batches and the grid is the capacity, so a forward
captured in a CUDA graph replays with a new batch after ``update``; unused blocks have slot -1 and return
at once.

Expert ops: which rows go to which expert is decided on the device by the router, so the blocks are built
on the device with shapes fixed by the number of routed rows: no host synchronisation, capturable. The
backend uses a counting sort in five Triton launches (``triton_kernels.route_blocks``); ``expert_blocks``
here is the same contract in torch ops (a stable sort, a scatter-add count, cumulative sums, a search),
kept as the tested reference and for backends without Triton.
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import torch

from ..errors import TPLoRAError
from ..runtime.batch import BatchInfo

BLOCK_M_DECODE = 16     # rows per block up to PREFILL_TOKENS tokens (the smallest tile tl.dot takes)
BLOCK_M_PREFILL = 64    # rows per block above: fewer re-reads of the adapters' factors
PREFILL_TOKENS = 512


class MetaCapacityError(TPLoRAError):
    """A batch does not fit the static metadata buffers (CUDA-graph mode)."""


def block_m_for(num_tokens: int) -> int:
    """Rows per block: 16 up to ``PREFILL_TOKENS`` tokens (decode regime), 64 above (prefill regime).
    Within a regime a row's arithmetic never depends on the rest of the batch (bit for bit); across the
    two regimes the kernels differ, so a row may round differently (within the stated tolerance)."""
    return BLOCK_M_DECODE if num_tokens <= PREFILL_TOKENS else BLOCK_M_PREFILL


def max_dense_blocks(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Upper bound of the blocks of any batch of ``num_tokens`` tokens over ``num_slots`` slots: each slot's
    last block may be partial."""
    return -(-num_tokens // block_m) + num_slots


@dataclass(frozen=True)
class DensePlan:
    """Host-side plan of one batch (CPU int32 tensors).

    ``perm[i]``: the batch token at sorted position i (tokens grouped by slot, in token order within a
    slot; tokens without adapter are left out). Block b covers ``perm[blk_start[b] : blk_start[b] +
    blk_len[b]]``, all of slot ``blk_slot[b]``.
    """
    perm: torch.Tensor
    blk_start: torch.Tensor
    blk_len: torch.Tensor
    blk_slot: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return int(self.blk_slot.numel())


def _plan_lists(batch: BatchInfo, block_m: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(perm, blk_start, blk_len, blk_slot) of ``batch`` as Python lists (see ``DensePlan``)."""
    by_slot: dict[int, list[tuple[int, int]]] = {}
    for s, start, n in zip(batch.request_slots, batch.seg_starts, batch.seg_lens):
        if s >= 0 and n > 0:
            by_slot.setdefault(s, []).append((start, n))
    perm: list[int] = []
    starts: list[int] = []
    lens: list[int] = []
    slots: list[int] = []
    for s in sorted(by_slot):
        first = len(perm)
        for start, n in by_slot[s]:
            perm.extend(range(start, start + n))
        total = len(perm) - first
        for off in range(0, total, block_m):
            starts.append(first + off)
            lens.append(min(block_m, total - off))
            slots.append(s)
    return perm, starts, lens, slots


def plan_dense_blocks(batch: BatchInfo, block_m: int) -> DensePlan:
    """Blocks of ``batch`` from its host-side request slots and lengths (pure; no device access)."""
    i32 = torch.int32
    return DensePlan(*(torch.tensor(v, dtype=i32) for v in _plan_lists(batch, block_m)))


def slot_rank_table(batch: BatchInfo, num_slots: int, max_rank: int) -> torch.Tensor:
    """[num_slots] int32: each batch slot's rank (capped by the pool's), 0 for slots not in the batch, so a
    kernel never computes on the zero padding above a smaller adapter's rank."""
    return torch.tensor(_rank_list(batch, num_slots, max_rank), dtype=torch.int32)


def _rank_list(batch: BatchInfo, num_slots: int, max_rank: int) -> list[int]:
    t = [0] * num_slots
    for s, r in batch.slot_ranks.items():
        t[s] = min(int(r), max_rank)
    return t


# The packed metadata: these int32 segments, in this order, each starting on a 16-byte boundary (Triton
# specialises pointers on that alignment), in one device buffer filled by one copy per batch.
# blk_rec (16-row blocks only): per block REC_INTS int32, [slot, rank, rows, start, its REC_ROWS rows (0
# past the block)]: the fused kernel reads a block's slot, rank and rows in one round trip.
_SEGMENTS = ("perm", "blk_start", "blk_len", "blk_slot", "token_slots", "slot_rank", "nblk", "blk_rec")
REC_ROWS = 16
REC_INTS = 4 + REC_ROWS


def _layout(tokens: int, blocks: int, slots: int, block_m: int) -> dict[str, tuple[int, int]]:
    """Segment name -> (offset, length) in int32 elements, for ``tokens`` token and ``blocks`` block entries
    (records only for ``block_m == REC_ROWS``)."""
    sizes = dict(perm=max(tokens, 1), blk_start=blocks, blk_len=blocks, blk_slot=blocks,
                 token_slots=max(tokens, 1), slot_rank=slots, nblk=1,
                 blk_rec=max(blocks, 1) * REC_INTS if block_m == REC_ROWS else 4)
    out, off = {}, 0
    for name in _SEGMENTS:
        out[name] = (off, sizes[name])
        off += -(-sizes[name] // 4) * 4
    return out


class DenseMeta:
    """Device buffers of the dense blocks, the per-token slots and the per-slot ranks: int32 views
    (``perm``, ``blk_start``, ``blk_len``, ``blk_slot``, ``token_slots``, ``slot_rank``, ``nblk``, and for
    16-row blocks ``blk_rec``, each block's slot, rank, length, start and rows in one record) of one
    packed device buffer, written per batch by one non-blocking copy from one pinned host buffer.

    ``capacity=None`` (eager): a buffer sized to each batch, grid = the batch's blocks. ``capacity=T``
    (static, for CUDA graphs): a buffer for up to T tokens, allocated once; ``update`` rewrites it in place
    (same addresses) and the grid is always the capacity's block bound. ``nblk`` (1 int32): the used
    blocks, which come first in the table (the fused kernel reads it on the device). ``prefill``: the
    regime (over ``PREFILL_TOKENS`` tokens, or capacity), which picks the block size and the kernels.
    """

    def __init__(self, num_slots: int, max_rank: int, device: torch.device, capacity: int | None = None):
        self.num_slots, self.max_rank, self.device = num_slots, max_rank, torch.device(device)
        self.capacity = capacity
        self.num_tokens = 0
        self.prefill = capacity is not None and capacity > PREFILL_TOKENS
        self.block_m = block_m_for(capacity) if capacity is not None else BLOCK_M_DECODE
        self.grid_blocks = 0
        self.buffer: torch.Tensor | None = None
        if capacity is not None:
            self.grid_blocks = max_dense_blocks(capacity, num_slots, self.block_m)
            self._allocate(capacity, self.grid_blocks)

    def _allocate(self, tokens: int, blocks: int) -> None:
        self._lay = _layout(tokens, blocks, self.num_slots, self.block_m)
        off, n = self._lay["blk_rec"]
        self.buffer = torch.empty(off + -(-n // 4) * 4, dtype=torch.int32, device=self.device)
        for name, (o, n) in self._lay.items():
            setattr(self, name, self.buffer[o:o + n])

    def update(self, batch: BatchInfo) -> None:
        """Point the buffers at ``batch``: host planning, then one non-blocking copy (no sync)."""
        T = batch.num_tokens
        if self.capacity is None:
            self.prefill = T > PREFILL_TOKENS
            self.block_m = block_m_for(T)
        elif T > self.capacity:
            raise MetaCapacityError(f"batch of {T} tokens exceeds the static LoRA metadata capacity of "
                                    f"{self.capacity} tokens (CUDA-graph mode); build the backend with a "
                                    f"larger max_tokens")
        perm, starts, lens, slots = _plan_lists(batch, self.block_m)
        if self.capacity is None:
            self.grid_blocks = len(slots)
            self._allocate(T, len(slots))
        lay = self._lay
        host = [0] * self.buffer.numel()

        def put(name: str, vals: list[int], fill: int = 0) -> None:
            o, n = lay[name]
            assert len(vals) <= n, (name, len(vals), n)
            host[o:o + n] = vals + [fill] * (n - len(vals))

        tok: list[int] = []
        for s, n in zip(batch.request_slots, batch.seg_lens):
            tok.extend([s] * n)
        put("perm", perm)
        put("blk_start", starts)
        put("blk_len", lens)
        put("blk_slot", slots, -1)         # unused blocks: slot -1
        put("token_slots", tok, -1)
        ranks = _rank_list(batch, self.num_slots, self.max_rank)
        put("slot_rank", ranks)
        put("nblk", [len(slots)])
        if self.block_m == REC_ROWS:
            rec: list[int] = []
            pad = [0] * REC_ROWS
            for st, n, s in zip(starts, lens, slots):
                rec += [s, ranks[s], n, st]
                rec += perm[st:st + n]
                rec += pad[n:]
            put("blk_rec", rec)     # unused blocks: zeros (never read: the kernel stops at nblk)
        src = torch.frombuffer(array.array("i", host), dtype=torch.int32)
        if self.device.type == "cuda":
            # a fresh pinned block per batch (torch's host allocator reuses it only after this copy is done)
            pinned = torch.empty(src.numel(), dtype=torch.int32, pin_memory=True)
            pinned.copy_(src)
            src = pinned
        self.buffer.copy_(src, non_blocking=True)
        self.num_tokens = T


@dataclass
class ExpertBlocks:
    """Device-built blocks of routed rows: rows sorted by (local expert, slot); -1 slot = unused block."""
    perm: torch.Tensor       # [N] int32 routed-row index at each sorted position
    blk_start: torch.Tensor  # [NB] int32
    blk_len: torch.Tensor    # [NB] int32
    blk_slot: torch.Tensor   # [NB] int32 (-1: nothing to do)
    blk_expert: torch.Tensor  # [NB] int32 local expert
    block_m: int


def expert_blocks(row_slots: torch.Tensor, row_experts: torch.Tensor, num_experts: int, num_slots: int,
                  block_m: int) -> ExpertBlocks:
    """Blocks for routed rows with slot ``row_slots[i]`` (-1: no adapter) and local expert
    ``row_experts[i]``, on the rows' device, with no host synchronisation (all shapes follow from N).

    Every non-empty (expert, slot) group of g rows gets ceil(g / block_m) blocks; there are at most
    ceil(N / block_m) + min(N, groups) of them, the static grid.
    """
    N = int(row_slots.numel())
    dev = row_slots.device
    G = num_experts * num_slots
    valid = row_slots >= 0
    key = torch.where(valid, row_experts.long() * num_slots + row_slots.long(), G)
    perm = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(G + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, key, torch.ones_like(key))[:G]
    nblk = (counts + block_m - 1) // block_m
    blk_end = torch.cumsum(nblk, 0)
    grp_start = torch.cumsum(counts, 0) - counts
    NB = -(-N // block_m) + min(N, G)
    b = torch.arange(NB, device=dev, dtype=torch.int64)
    g = torch.searchsorted(blk_end, b, right=True)
    used = g < G
    gc = g.clamp(max=G - 1)
    first = blk_end[gc] - nblk[gc]
    start = grp_start[gc] + (b - first) * block_m
    length = torch.minimum(counts[gc] - (b - first) * block_m, torch.full_like(b, block_m))
    i32 = torch.int32
    return ExpertBlocks(perm=perm, blk_start=start.to(i32), blk_len=torch.where(used, length, 0).to(i32),
                        blk_slot=torch.where(used, gc % num_slots, -1).to(i32),
                        blk_expert=(gc // num_slots).to(i32), block_m=block_m)

"""Triton kernels of the LoRA delta: a segmented shrink (``x @ A^T``) and a segmented expand
(``out += s * p @ B^T``), both over the blocks of ``ops/meta.py``.

One program = one block (<= BLOCK_M rows of one slot, and of one local expert for the expert op) times one
tile of the other dimension:

* shrink: grid (rank blocks of 16, blocks, K splits). A program computes ``x[rows, k-range] @ A[slot, r0:r0+16,
  k-range]^T`` in float32 and writes it to the partial buffer ``P[split, row, r]``. Programs whose rank block
  starts at or above the slot's rank return at once: no load and no arithmetic on the zero padding above a
  smaller adapter's rank. The K split is a function of K alone (never of the batch), so a row's result is
  the same bits whatever else is in the batch.
* expand: grid (N tiles, blocks). Sums P over the splits in a fixed order, multiplies by ``B[slot, n-tile,
  r]^T`` one rank block at a time up to the slot's rank, scales by the slot's scaling in float32 and adds
  into ``out[rows]`` (read, add in float32, one rounding to out's dtype, write).

A program reads only its block's slot's weights and writes only its block's rows; rows without an adapter
are in no block. Unused blocks (slot -1) return at once, which is what makes a static grid (CUDA graphs)
cheap. Activations choose the compute dtype: bf16/fp16 operands with float32 accumulation, or float32 with
IEEE float32 products (``input_precision="ieee"``: no TF32).

The embedding's shrink is a gather (``_embed_shrink_kernel``): ``P[t, r] = A[slot, r, id_t - shard_start]``
for ids inside this rank's vocab shard and exactly 0 (``tl.where``, not a product) for the others.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_R = 16
# Under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) the kernels replace tl.dot by an
# elementwise product and a sum in float32: the interpreter's bf16/fp16 tl.dot is wrong (Triton 3.9 reads
# the 16-bit operands as integers), and its float32 tl.dot is numpy's matmul, whose BLAS rounds a row
# differently depending on its position in the tile (which would hide real row-dependence bugs in tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _shrink_kernel(x_ptr, sxm, sxk, a_ptr, sas, sae, sar, sak, p_ptr, sps, spm, spr,
                   perm_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr, blk_exp_ptr, rank_ptr,
                   K, K_PER_SPLIT,
                   HAS_EXPERT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    slot = tl.load(blk_slot_ptr + pid_b)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    start = tl.load(blk_start_ptr + pid_b)
    n = tl.load(blk_len_ptr + pid_b)
    offs_m = tl.arange(0, BLOCK_M)
    mrow = offs_m < n
    rows = tl.load(perm_ptr + start + offs_m, mask=mrow, other=0).to(tl.int64)
    a_base = a_ptr + slot.to(tl.int64) * sas
    if HAS_EXPERT:
        a_base += tl.load(blk_exp_ptr + pid_b).to(tl.int64) * sae
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mr = offs_r < rank
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mk = offs_k < k_hi
        xt = tl.load(x_ptr + rows[:, None] * sxm + offs_k[None, :] * sxk, mask=mrow[:, None] & mk[None, :],
                     other=0.0)
        at = tl.load(a_base + offs_r[None, :] * sar + offs_k[:, None] * sak, mask=mk[:, None] & mr[None, :],
                     other=0.0)
        at = at.to(xt.dtype)
        if UPCAST:  # interpreter: see INTERPRET
            acc += tl.sum(xt.to(tl.float32)[:, :, None] * at.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            acc += tl.dot(xt, at, input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    tl.store(p_ptr + pid_s * sps + rows[:, None] * spm + offs_r[None, :] * spr, acc,
             mask=mrow[:, None] & mr[None, :])


@triton.jit
def _embed_shrink_kernel(ids_ptr, a_ptr, sas, sar, sav, p_ptr, spm, spr,
                         perm_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr, rank_ptr, vocab_start, per,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    slot = tl.load(blk_slot_ptr + pid_b)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    start = tl.load(blk_start_ptr + pid_b)
    n = tl.load(blk_len_ptr + pid_b)
    offs_m = tl.arange(0, BLOCK_M)
    mrow = offs_m < n
    rows = tl.load(perm_ptr + start + offs_m, mask=mrow, other=0).to(tl.int64)
    local = tl.load(ids_ptr + rows, mask=mrow, other=0).to(tl.int64) - vocab_start
    inside = mrow & (local >= 0) & (local < per)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mr = offs_r < rank
    a_base = a_ptr + slot.to(tl.int64) * sas
    a = tl.load(a_base + offs_r[None, :] * sar + local[:, None] * sav, mask=inside[:, None] & mr[None, :],
                other=0.0)
    a = tl.where(inside[:, None], a.to(tl.float32), 0.0)
    tl.store(p_ptr + rows[:, None] * spm + offs_r[None, :] * spr, a, mask=mrow[:, None] & mr[None, :])


@triton.jit
def _expand_kernel(p_ptr, sps, spm, spr, b_ptr, sbs, sbe, sbn, sbr, sc_ptr, scs, sce, out_ptr, som, son,
                   perm_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr, blk_exp_ptr, rank_ptr, N,
                   SPLITS: tl.constexpr,
                   HAS_EXPERT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, CDT: tl.constexpr,
                   BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    slot = tl.load(blk_slot_ptr + pid_b)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rank <= 0:
        return
    start = tl.load(blk_start_ptr + pid_b)
    n = tl.load(blk_len_ptr + pid_b)
    offs_m = tl.arange(0, BLOCK_M)
    mrow = offs_m < n
    rows = tl.load(perm_ptr + start + offs_m, mask=mrow, other=0).to(tl.int64)
    b_base = b_ptr + slot.to(tl.int64) * sbs
    sc_off = slot.to(tl.int64) * scs
    if HAS_EXPERT:
        e = tl.load(blk_exp_ptr + pid_b).to(tl.int64)
        b_base += e * sbe
        sc_off += e * sce
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mr = offs_r < rank
        pmask = mrow[:, None] & mr[None, :]
        p = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in tl.static_range(SPLITS):   # unrolled: the partial loads are in flight together
            p += tl.load(p_ptr + s * sps + rows[:, None] * spm + offs_r[None, :] * spr, mask=pmask, other=0.0)
        bt = tl.load(b_base + offs_n[None, :] * sbn + offs_r[:, None] * sbr, mask=mr[:, None] & mn[None, :],
                     other=0.0)
        pc = p.to(CDT)
        bc = bt.to(CDT)
        if UPCAST:
            acc += tl.sum(pc.to(tl.float32)[:, :, None] * bc.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            acc += tl.dot(pc, bc, input_precision="ieee")
        else:
            acc += tl.dot(pc, bc)
    acc = acc * tl.load(sc_ptr + sc_off)
    omask = mrow[:, None] & mn[None, :]
    optr = out_ptr + rows[:, None] * som + offs_n[None, :] * son
    o = tl.load(optr, mask=omask, other=0.0)
    tl.store(optr, (o.to(tl.float32) + acc).to(o.dtype), mask=omask)


_CDT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_CDT)


def split_size(K: int, prefill: bool) -> int:
    """Columns of K per shrink program: a function of K and the regime only (never of the batch's
    content). Decode: short chunks keep a few blocks parallel over many splits; prefill has many blocks,
    so longer chunks (fewer partials for the expand to sum)."""
    if prefill:
        return 1024 if K <= 8192 else 2048
    return 512 if K <= 4096 else 1024


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _blocks(meta):
    return meta.perm, meta.blk_start, meta.blk_len, meta.blk_slot


def shrink(x: torch.Tensor, A: torch.Tensor, expert_stride: int | None, blocks, grid_blocks: int,
           block_m: int, slot_rank: torch.Tensor, max_rank: int) -> torch.Tensor:
    """P ``[splits, rows, R_pad]`` float32 with ``P.sum(0)[row, :rank] = x[row] @ A[slot(, e), :rank]^T``.

    x ``[rows, K]``; A ``[S, R, K]`` or ``[S, E, R, K]`` (any strides; ``expert_stride`` is A.stride(1) for
    the expert form, None for dense). Entries of P outside the blocks' rows or above a slot's rank are never
    written (and never read by ``expand``).
    """
    rows, K = x.shape
    prefill = block_m > 16
    ks = split_size(K, prefill)
    splits = max(1, -(-K // ks))
    r_pad = max(BLOCK_R, -(-max_rank // BLOCK_R) * BLOCK_R)
    P = torch.empty((splits, rows, r_pad), dtype=torch.float32, device=x.device)
    if grid_blocks == 0 or rows == 0:
        return P
    perm, bs, bl, bslot, bexp = blocks
    sr, sk = A.stride(-2), A.stride(-1)
    grid = (r_pad // BLOCK_R, grid_blocks, splits)
    _shrink_kernel[grid](x, x.stride(0), x.stride(1), A, A.stride(0), expert_stride or 0, sr, sk,
                         P, P.stride(0), P.stride(1), P.stride(2), perm, bs, bl, bslot, bexp, slot_rank,
                         K, ks, HAS_EXPERT=expert_stride is not None, IEEE=x.dtype == torch.float32,
                         UPCAST=INTERPRET,
                         BLOCK_M=block_m, BLOCK_R=BLOCK_R, BLOCK_K=_pow2(K, 16, 128 if prefill else 256),
                         num_warps=4)
    return P


def embed_shrink(token_ids: torch.Tensor, A: torch.Tensor, vocab_start: int, blocks, grid_blocks: int,
                 block_m: int, slot_rank: torch.Tensor, max_rank: int) -> torch.Tensor:
    """P ``[1, T, R_pad]``: the embedding-A column of each token's id (0 outside this rank's shard).
    A ``[S, R, per]``."""
    T = token_ids.shape[0]
    r_pad = max(BLOCK_R, -(-max_rank // BLOCK_R) * BLOCK_R)
    P = torch.empty((1, T, r_pad), dtype=torch.float32, device=token_ids.device)
    if grid_blocks == 0 or T == 0:
        return P
    perm, bs, bl, bslot, _ = blocks
    _embed_shrink_kernel[(r_pad // BLOCK_R, grid_blocks)](
        token_ids, A, A.stride(0), A.stride(1), A.stride(2), P, P.stride(1), P.stride(2),
        perm, bs, bl, bslot, slot_rank, vocab_start, A.shape[-1], BLOCK_M=block_m, BLOCK_R=BLOCK_R,
        num_warps=4)
    return P


def expand(P: torch.Tensor, B: torch.Tensor, expert_stride: int | None, scaling: torch.Tensor,
           scaling_expert_stride: int | None, out: torch.Tensor, blocks, grid_blocks: int, block_m: int,
           slot_rank: torch.Tensor, compute_dtype: torch.dtype) -> None:
    """``out[row] += scaling[slot(, e)] * P.sum(0)[row, :rank] @ B[slot(, e), :, :rank]^T`` for the blocks'
    rows. B ``[S, N, R]`` or ``[S, E, N, R]``; scaling ``[S]`` or ``[S, E]`` (float32); out ``[rows, N]``."""
    rows, N = out.shape
    if grid_blocks == 0 or rows == 0 or N == 0:
        return
    perm, bs, bl, bslot, bexp = blocks
    bn = _pow2(N, 16, 128)
    grid = (triton.cdiv(N, bn), grid_blocks)
    _expand_kernel[grid](P, P.stride(0), P.stride(1), P.stride(2), B, B.stride(0), expert_stride or 0,
                         B.stride(-2), B.stride(-1), scaling, scaling.stride(0), scaling_expert_stride or 0,
                         out, out.stride(0), out.stride(1), perm, bs, bl, bslot, bexp, slot_rank, N,
                         SPLITS=P.shape[0], HAS_EXPERT=expert_stride is not None,
                         IEEE=compute_dtype == torch.float32, UPCAST=INTERPRET, CDT=_CDT[compute_dtype],
                         BLOCK_M=block_m,
                         BLOCK_N=bn, BLOCK_R=BLOCK_R, num_warps=4)


# -- expert routing metadata on the device (a counting sort by (expert, slot)) ----------------------------------
@triton.jit
def _route_count_kernel(tok_ptr, exp_ptr, token_slots_ptr, key_ptr, counts_ptr, N, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    t = tl.load(tok_ptr + offs, mask=m, other=0)
    s = tl.load(token_slots_ptr + t, mask=m, other=-1)
    e = tl.load(exp_ptr + offs, mask=m, other=0)
    key = tl.where(m & (s >= 0), e * S + s, -1)
    tl.store(key_ptr + offs, key, mask=m)
    tl.atomic_add(counts_ptr + key, 1, mask=key >= 0)


@triton.jit
def _route_scan_kernel(counts_ptr, grp_start_ptr, blk_first_ptr, blk_slot_ptr, G, NB, BM: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_NB: tl.constexpr):
    offs = tl.arange(0, BLOCK_G)
    m = offs < G
    c = tl.load(counts_ptr + offs, mask=m, other=0)
    nblk = (c + BM - 1) // BM
    tl.store(grp_start_ptr + offs, tl.cumsum(c, 0) - c, mask=m)
    tl.store(blk_first_ptr + offs, tl.cumsum(nblk, 0) - nblk, mask=m)
    for b0 in range(0, NB, BLOCK_NB):
        ob = b0 + tl.arange(0, BLOCK_NB)
        tl.store(blk_slot_ptr + ob, tl.full((BLOCK_NB,), -1, tl.int32), mask=ob < NB)


@triton.jit
def _route_place_kernel(key_ptr, grp_start_ptr, cursor_ptr, perm_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(key_ptr + offs, mask=offs < N, other=-1)
    m = key >= 0
    k = tl.where(m, key, 0)
    pos = tl.atomic_add(cursor_ptr + k, 1, mask=m)   # order inside a group is free: rows are independent
    st = tl.load(grp_start_ptr + k, mask=m, other=0)
    tl.store(perm_ptr + st + pos, offs, mask=m)


@triton.jit
def _route_blocks_kernel(counts_ptr, grp_start_ptr, blk_first_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr,
                         blk_exp_ptr, S, BM: tl.constexpr):
    g = tl.program_id(0)
    c = tl.load(counts_ptr + g)
    if c == 0:
        return
    st = tl.load(grp_start_ptr + g)
    b = tl.load(blk_first_ptr + g)
    for j in range(0, tl.cdiv(c, BM)):
        tl.store(blk_start_ptr + b + j, st + j * BM)
        tl.store(blk_len_ptr + b + j, tl.minimum(c - j * BM, BM))
        tl.store(blk_slot_ptr + b + j, g % S)
        tl.store(blk_exp_ptr + b + j, g // S)


def route_blocks(token_index: torch.Tensor, local_expert: torch.Tensor, token_slots: torch.Tensor,
                 num_experts: int, num_slots: int, block_m: int) -> tuple:
    """The (expert, slot) blocks of routed rows in five launches (a counting sort; no host sync): same
    contract as ``meta.expert_blocks`` (rows of a group may come in any order). Returns the block tuple
    for ``shrink``/``expand`` and the static block count."""
    N = int(token_index.numel())
    dev = token_index.device
    G = num_experts * num_slots
    NB = -(-N // block_m) + min(N, G)
    i32 = torch.int32
    work = torch.zeros(2 * G, dtype=i32, device=dev)
    counts, cursor = work[:G], work[G:]
    key = torch.empty(max(N, 1), dtype=i32, device=dev)
    grp = torch.empty(2 * G, dtype=i32, device=dev)
    grp_start, blk_first = grp[:G], grp[G:]
    perm = torch.empty(max(N, 1), dtype=i32, device=dev)
    blk = torch.empty((4, max(NB, 1)), dtype=i32, device=dev)
    blk_start, blk_len, blk_slot, blk_exp = blk[0], blk[1], blk[2], blk[3]
    if N == 0:
        blk_slot.fill_(-1)
        return (perm, blk_start, blk_len, blk_slot, blk_exp), 0
    B = 256
    _route_count_kernel[(triton.cdiv(N, B),)](token_index, local_expert, token_slots, key, counts, N, num_slots,
                                              BLOCK=B)
    _route_scan_kernel[(1,)](counts, grp_start, blk_first, blk_slot, G, NB, BM=block_m,
                             BLOCK_G=triton.next_power_of_2(G), BLOCK_NB=1024)
    _route_place_kernel[(triton.cdiv(N, B),)](key, grp_start, cursor, perm, N, BLOCK=B)
    _route_blocks_kernel[(G,)](counts, grp_start, blk_first, blk_start, blk_len, blk_slot, blk_exp, num_slots,
                               BM=block_m)
    return (perm, blk_start, blk_len, blk_slot, blk_exp), NB

"""Triton kernels of the LoRA delta over the blocks of ``ops/meta.py``.

A *block* is at most ``BLOCK_M`` rows that share one slot (and one local expert for the expert op).

* ``fused`` (dense modules and the experts of a layer; one launch): K is cut into chunks (``fused_chunks``,
  a function of K). In the decode regime the used blocks (read on the device) decide how many programs
  share a block, ``G = min(chunks, SMs // blocks)``: program s of a block computes the float32 partials
  ``x[rows, chunk] @ A[slot]^T`` of chunks s, s + G, ..., the block's programs meet at its arrival counter
  (the grid is at most one program per SM, so all are resident), each sums all chunk partials in chunk
  order, rounds once to the compute dtype and computes the N tiles s, s + G, ... of ``out[rows, tile] += s
  * p @ B[slot, tile, :rank]^T`` (read, add in float32, one rounding, write; the first tile's loads are
  issued before the K work). With one program per block (many blocks, the expert op, the interpreter) the
  program sums the same chunk partials in the same order itself: ``G`` decides which program computes
  what, never how, so a row's bits do not depend on the rest of the batch. No second launch; the grid is
  static (CUDA-graph safe). Dense 16-row blocks are read from their records (``meta.DenseMeta.blk_rec``:
  slot, rank, length and rows in one round trip).
* Rank tile: a slot of rank <= 16 uses a 16-wide tile, others one tile of the pool's max rank (next power of
  two, <= ``FUSED_MAX_RANK``): the whole rank at once, so x is read once per block. Loads are masked at the
  slot's rank: nothing above a slot's rank is ever read (NaN planted there never reaches an output).
* ``shrink`` / ``expand`` (two launches, a float32 partial buffer P; the embedding, and pools of max rank
  above ``FUSED_MAX_RANK``): the shrink ``grid = (rank blocks of 16, blocks, K splits)`` returns at once
  above the slot's rank; the expand sums the splits in a fixed order.
* ``_embed_shrink_kernel``: the embedding's shrink is a gather, ``P[t, r] = A[slot, r, id_t - start]`` for
  ids inside this rank's vocab shard and exactly 0 (``tl.where``, not a product) for the others.

A program reads only its block's slot's factors and writes only its block's rows; rows without an adapter
are in no block. Activations choose the compute dtype: bf16/fp16 operands with float32 accumulation, or
float32 with IEEE float32 products (``input_precision="ieee"``: no TF32).

Launches go through ``_Launcher``: after the first launch of a specialisation (which compiles through
``JITFunction.run``) the compiled kernel is launched through its handle, skipping Triton's per-call binding.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .meta import REC_INTS, REC_ROWS  # noqa: E402,F401 - a dense block's record (meta.DenseMeta.blk_rec)

BLOCK_R = 16
R16: tl.constexpr = tl.constexpr(16)   # the narrow rank tile, as a constexpr the kernels may read
# Under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) the kernels replace tl.dot by an
# elementwise product and a sum in float32: the interpreter's bf16/fp16 tl.dot is wrong (Triton 3.9 reads
# the 16-bit operands as integers), and its float32 tl.dot is numpy's matmul, whose BLAS rounds a row
# differently depending on its position in the tile (which would hide real row-dependence bugs in tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch compiled kernels through their handle (set TP_LORA_TRITON_DIRECT=0 to always go through
# JITFunction.run, e.g. to rule the fast path out when debugging).
DIRECT = os.environ.get("TP_LORA_TRITON_DIRECT", "1") != "0" and not INTERPRET
FUSED_MAX_RANK = 128    # pools of a larger max rank take the two-launch path
EXPERT_FUSED_ROWS = 4096   # the fused expert op up to this many routed rows (decode); two launches above
# Above EXPERT_FUSED_ROWS routed rows (the wide regime): rows per (expert, slot) block, and whether the fused
# kernel (one program per block, the whole K) runs there too instead of the two launches.
EXPERT_WIDE_BLOCK_M = 32   # H200 sweep 2026-12-02h: 2048 tokens r64 1 adapter 394 -> 303 us, 8 adapters 558 -> 500
EXPERT_WIDE_FUSED = True   # H200 sweep 2026-12-02g: 2048 tokens 1.4-2.5x faster than two launches
FUSED_DENSE = True      # dense ops of the decode regime through the fused kernel (else two launches)

class Tuning(dict):
    """A tuning table: a plain dict to read and to set (``scripts/bench_ops.py --sweep``, tests). Every change
    bumps the shared ``version``, which keys the launch geometry memoised per op shape (``_fused_geometry``),
    so a changed key takes effect at the next launch."""

    version = 0

    def _bump(self) -> None:
        Tuning.version += 1

    def __setitem__(self, key, value) -> None:
        self._bump()
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self._bump()
        super().__delitem__(key)

    def update(self, *args, **kwargs) -> None:
        self._bump()
        super().update(*args, **kwargs)

    def __ior__(self, other):
        self._bump()
        return super().__ior__(other)

    def clear(self) -> None:
        self._bump()
        super().clear()

    def pop(self, *args):
        self._bump()
        return super().pop(*args)

    def popitem(self):
        self._bump()
        return super().popitem()

    def setdefault(self, key, default=None):
        self._bump()
        return super().setdefault(key, default)


# Tuning of the fused kernel (H200, docs/KERNELS.md); a dict (``Tuning``) so scripts/bench_ops.py --sweep can vary it.
# chunk_k: K columns per chunk of the K split (summed in chunk order, so the split never changes a row's bits);
# prefetch: the first N tile's B and out loads issued before the K work.
# max_chunks: at most this many K chunks (q: 16 of 256 columns; down: 28 of 512; 32 from the H200 sweep of
# 2026-12-02g: down_proj r16 at decode 11.8 -> 9.4 us a module in a step, q unchanged); programs_per_sm: the grid of
# the unsplit dense kernel; the expert_* keys tune the expert op (expert_programs_per_sm 0: one program per
# block of the static table, no persistent loop).
# records: dense blocks read from DenseMeta's per-block records (one round trip; H200 sweep of 2026-12-02b:
# 0.1-0.5 us per module faster in a decode step on 7 of 9 decode cases, within 0.1 us on the other two).
# hoist: the table path's rows and expert id loaded before the rank test (off: not timed for the expert op,
# which keeps its previous load order). num_stages 4 (same sweep: 0.4-2.7 us faster on down_proj, within
# 0.4 us on q_proj). These only move loads, never change what is computed.
# pdl: the kernel is launched as a programmatic dependent of the kernel before it (the base GEMM) and waits
# for it before it reads anything (``pdl_ok``): only its launch overlaps that kernel's tail. H200 sweep
# 2026-12-03d, decode (32 tokens) per module in a 32-layer graph: 0.1-0.5 us faster on all ten cases.
FUSED_CONFIG = Tuning(block_n=256, block_k=128, chunk_k=256, max_chunks=32, num_warps=8, num_stages=4,
                    programs_per_sm=2, prefetch=True, records=True, hoist=False, expert_warps=4, expert_stages=3,
                    expert_block_n=256, expert_prefetch=True, expert_programs_per_sm=2, expert_wide_block_n=128,
                    pdl=True)
FUSED_STAGES_MAX_RT = 64   # num_stages above 3 only up to this rank tile, 2-byte activations (fused_stages)
# The two-launch path's tiles (decode / prefill regime where they differ).
# prefill_split: K columns per shrink program in the prefill regime (0: split_size's rule); expand_block_n:
# the expand's N tile for pools of rank tile 16, expand_block_n_wide for wider rank tiles.
# shrink_rows: rows per shrink program in the prefill regime (0: the whole block; a smaller power of two cuts a
# block into sub-blocks, more programs for the same bytes of x); p_low: with one K split, P is stored in the
# compute dtype (the expand rounds it to that dtype anyway: the same bits, half the bytes).
# reduce: with several K splits the shrink sums them (the last split program of a block to finish), so the
# expand reads one P (dense ops; counters in the backend's scratch); reduce_unroll: its split loads unrolled
# (in flight together, SPLITS tiles of registers). prefill_splits: K splits of the prefill shrink (the split
# the next power of two above K / this; 0: split_size's fixed columns). pdl: the expand is launched as a
# programmatic dependent of its shrink (Hopper and later: ``pdl_ok``): its programs start while the shrink's
# last ones run and read their block's metadata before they wait for it (``griddepcontrol``). H200 sweep
# 2026-12-03b, 2048 tokens, per module in a 32-layer graph: 1.5-4% faster on all eight cases (the shrink
# too as a dependent of the kernel before it, waiting first: no faster, sweep 2026-12-03d).
# Defaults from the H200 sweep of 2026-12-02q (docs/KERNELS.md): reduce + p_low + 4 prefill splits + 4 shrink
# stages, 2048 tokens: q 2-3% faster, down r16 / r64 / mixed 12 / 17 / 13%. shrink_warps / expand_warps: for
# pools of rank tile 16, the ``_wide`` ones for wider tiles (H200 sweep 2026-12-03f, groups 6-7, 2048 tokens,
# per module in a 32-layer graph: 8 shrink warps at rank tile 16 and 8 expand warps at the wide tiles
# 0.6-1.5 us faster on all eight cases; 8 shrink warps at the wide tiles or 8 expand warps at 16 slower;
# pools above FUSED_MAX_RANK, whose decode-regime ops take these launches too, were not timed).
# expand_tiles / expand_tiles_wide: N tiles one expand program walks (P and the block's metadata read once,
# the next tile's loads ahead; pools up to FUSED_MAX_RANK); H200 sweep 2026-12-04b, group 9, 2048 tokens, per
# module in a 32-layer graph: 4 tiles with 4 warps at the wide rank tiles 3.7-4.9 us faster (q r64 37.3 ->
# 32.9, down mixed 32 adapters 57.2 -> 53.0), 1 tile at rank tile 16 (2-8 tiles 0.2-4 us slower there);
# expand_warps_wide 8 -> 4 with it.
TWO_LAUNCH_CONFIG = Tuning(shrink_block_k=(256, 128), shrink_warps=8, shrink_warps_wide=4, shrink_stages=4,
                         expand_block_n=128, expand_block_n_wide=128, expand_warps=4, expand_warps_wide=4,
                         prefill_split=0, shrink_rows=0, p_low=True, reduce=True, reduce_unroll=False,
                         prefill_splits=4, pdl=True, expand_tiles=1, expand_tiles_wide=4)



@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` in float32: tensor cores (IEEE float32 products for float32 operands), or under the
    interpreter an elementwise product and a sum (see INTERPRET)."""
    if UPCAST:
        r = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _block_rows(perm_ptr, blk_start_ptr, blk_len_ptr, b, r0, BLOCK_M: tl.constexpr):
    """Rows ``r0 .. r0 + BLOCK_M`` of block ``b`` (int64, through the permutation) and their mask (the block
    prologue every kernel shares; ``r0`` > 0 only for a shrink program of a sub-block)."""
    start = tl.load(blk_start_ptr + b)
    n = tl.load(blk_len_ptr + b)
    offs_m = r0 + tl.arange(0, BLOCK_M)
    mrow = offs_m < n
    rows = tl.load(perm_ptr + start + offs_m, mask=mrow, other=0).to(tl.int64)
    return rows, mrow


@triton.jit
def _block_slot_rank(blk_slot_ptr, rank_ptr, b):
    """Block ``b``'s slot and that slot's rank in this batch (0 for an unused block, slot -1)."""
    slot = tl.load(blk_slot_ptr + b)
    rank = tl.load(rank_ptr + tl.maximum(slot, 0))
    return slot, tl.where(slot >= 0, rank, 0)


@triton.jit
def _xa(x_ptr, sxm, sxk, a_base, sar, sak, rows, mrow, offs_r, mr, k_lo, k_hi, KC, pchunk, pmask,
        MODE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr, BR: tl.constexpr, PS: tl.constexpr):
    """``x[rows, k_lo:k_hi] @ A[offs_r, k_lo:k_hi]^T`` in float32, ``[BLOCK_M, BR]`` (A's rows masked at the
    slot's rank by ``mr``, x's at the block's rows by ``mrow``): the one K loop of the fused and the shrink
    kernels. MODE 0: one accumulation over the range. MODE 1 / 2: in chunks of ``KC`` columns (a multiple
    of BLOCK_K; k_lo on a chunk boundary), each accumulated from zero in one pipelined loop over the whole
    range; MODE 1 returns the chunks' sum in chunk order, MODE 2 writes chunk c's partial to ``pchunk + c *
    PS`` (masked by ``pmask``) and returns zeros. Both give a chunk the same bits."""
    acc = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mk = offs_k < k_hi
        xt = tl.load(x_ptr + rows[:, None] * sxm + offs_k[None, :] * sxk, mask=mrow[:, None] & mk[None, :],
                     other=0.0)
        at = tl.load(a_base + offs_r[None, :] * sar + offs_k[:, None] * sak, mask=mk[:, None] & mr[None, :],
                     other=0.0)
        acc += _mm(xt, at.to(xt.dtype), IEEE, UPCAST)
        if MODE != 0:
            end = ((k + BLOCK_K) % KC == 0) | (k + BLOCK_K >= k_hi)     # the last tile of a chunk
            if MODE == 1:
                p += tl.where(end, acc, 0.0)     # p + 0 is p: the chunks' sum in chunk order
            else:
                tl.store(pchunk + (k // KC) * PS, acc, mask=pmask & end)
            acc = tl.where(end, 0.0, acc)
    if MODE == 0:
        p = acc
    return p


@triton.jit
def _tile_in(b_base, sbn, sbr, offs_r, mr, out_ptr, som, son, rows, mrow, t, N, BLOCK_N: tl.constexpr):
    """N tile ``t``'s inputs: ``B[slot, tile, :rank]^T`` ``[BR, BLOCK_N]``, the block's out rows ``[BLOCK_M,
    BLOCK_N]``, their pointers and mask."""
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    bt = tl.load(b_base + offs_n[None, :] * sbn + offs_r[:, None] * sbr, mask=mr[:, None] & mn[None, :], other=0.0)
    omask = mrow[:, None] & mn[None, :]
    optr = out_ptr + rows[:, None] * som + offs_n[None, :] * son
    return bt, tl.load(optr, mask=omask, other=0.0), optr, omask


@triton.jit
def _out_tile(pc, bt, o, scale, optr, omask, IEEE: tl.constexpr, UPCAST: tl.constexpr, CDT: tl.constexpr):
    """``out[rows, tile] = o + scale * pc @ bt`` (float32, one rounding): one helper for the prefetched first
    tile and the later ones, so a tile's bits never depend on which program (how many per block) takes it."""
    acc = _mm(pc, bt.to(CDT), IEEE, UPCAST) * scale
    tl.store(optr, (o.to(tl.float32) + acc).to(o.dtype), mask=omask)


@triton.jit
def _fused_block(x_ptr, sxm, sxk, a_base, sar, sak, b_base, sbn, sbr, scale, out_ptr, som, son, rows, mrow,
                 rank, K, N, KC, s, G, b, p_ptr, arrive_ptr, depart_ptr, CH: tl.constexpr,
                 PREFETCH: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, CDT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RT: tl.constexpr,
                 BR: tl.constexpr):
    """Program ``s`` of the ``G`` programs of block ``b`` (rank tile ``BR`` >= rank). K is cut into ``CH``
    chunks of ``KC`` columns; each chunk's partial ``x[rows, chunk] @ A^T`` is accumulated from zero, and the
    block's p is the chunks' sum in chunk order, rounded once to the compute dtype: the same bits whatever
    ``G`` is. ``G > 1``: program s computes its contiguous share of the chunks in one pipelined loop,
    writes their partials to ``p_ptr`` and the block's programs meet at its arrival counter (all are
    resident: at most one program per SM), then each sums all chunks; ``G = 1``: one program sums them as
    it goes. Then p times B for the N tiles s, s + G, ...; with ``PREFETCH`` the first tile's B and out
    loads are issued before the K work (they do not depend on p). The last program to leave resets the
    block's counters for the next launch."""
    offs_r = tl.arange(0, BR)
    mr = offs_r < rank
    if PREFETCH:
        bt0, o0, optr0, omask0 = _tile_in(b_base, sbn, sbr, offs_r, mr, out_ptr, som, son, rows, mrow, s, N,
                                          BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    tile = offs_m[:, None] * RT + offs_r[None, :]
    pmask = mrow[:, None] & mr[None, :]
    if G > 1:
        # program s: the contiguous chunks [s * CH // G, (s + 1) * CH // G), one pipelined loop
        pbase = p_ptr + b.to(tl.int64) * (CH * BLOCK_M * RT) + tile
        c_lo = (s * CH) // G
        c_hi = ((s + 1) * CH) // G
        _xa(x_ptr, sxm, sxk, a_base, sar, sak, rows, mrow, offs_r, mr, c_lo * KC, tl.minimum(K, c_hi * KC), KC,
            pbase, pmask, 2, IEEE, UPCAST, BLOCK_M, BLOCK_K, BR, BLOCK_M * RT)
        tl.debug_barrier()                                   # every thread's partials are written ...
        # ... before the block's counter counts them; the last to arrive sees G at once (no extra poll)
        n = tl.atomic_add(arrive_ptr + b, 1, sem="acq_rel") + 1
        while n < G:
            n = tl.atomic_add(arrive_ptr + b, 0, sem="acquire")
        tl.debug_barrier()
        p = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
        for c in tl.static_range(CH):      # chunk order (the same bits for every G); unrolled: loads in flight
            p += tl.load(pbase + c * (BLOCK_M * RT), mask=pmask, other=0.0, cache_modifier=".cg")
    else:
        p = _xa(x_ptr, sxm, sxk, a_base, sar, sak, rows, mrow, offs_r, mr, 0, K, KC, p_ptr, pmask, 1, IEEE,
                UPCAST, BLOCK_M, BLOCK_K, BR, BLOCK_M * RT)
    pc = p.to(CDT)
    t_first = s
    if PREFETCH:
        _out_tile(pc, bt0, o0, scale, optr0, omask0, IEEE, UPCAST, CDT)
        t_first = s + G
    for t in range(t_first, tl.cdiv(N, BLOCK_N), G):
        bt, o, optr, omask = _tile_in(b_base, sbn, sbr, offs_r, mr, out_ptr, som, son, rows, mrow, t, N, BLOCK_N)
        _out_tile(pc, bt, o, scale, optr, omask, IEEE, UPCAST, CDT)
    if G > 1:
        tl.debug_barrier()
        d = tl.atomic_add(depart_ptr + b, 1, sem="acq_rel")
        if d == G - 1:        # the last to leave: nobody waits on this block any more
            tl.atomic_xchg(arrive_ptr + b, 0)
            tl.atomic_xchg(depart_ptr + b, 0)


@triton.jit
def _fused_kernel(x_ptr, sxm, sxk, a_ptr, sas, sae, sar, sak, b_ptr, sbs, sbe, sbn, sbr, sc_ptr, scs, sce,
                  out_ptr, som, son, perm_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr, blk_exp_ptr, rank_ptr,
                  nblk_ptr, rec_ptr, p_ptr, arrive_ptr, depart_ptr, K, N, KC, R,
                  CH: tl.constexpr, REC: tl.constexpr, HOIST: tl.constexpr, PREFETCH: tl.constexpr,
                  HAS_EXPERT: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr, CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, RT: tl.constexpr, WAIT: tl.constexpr):
    if WAIT:   # launched as a programmatic dependent of whatever kernel came before: nothing read before it
        tl.extra.cuda.gdc_wait()
    # R: programs that may meet (resident together: the grid is at most one per SM then; 1 = never meet).
    # The used blocks (read on the device) decide how many programs share one: G = min(CH, R // blocks);
    # G = 1: program j takes blocks j, j + grid, ...
    pid = tl.program_id(0)
    nbu = tl.load(nblk_ptr)             # used blocks (the first nbu of the table), written on the device
    G = tl.maximum(1, tl.minimum(CH, R // tl.maximum(nbu, 1)))
    if G > 1:
        W = R // G
        j = pid // G
        s = pid % G
        if pid >= W * G:
            j = nbu                     # no block for this program
    else:
        W = tl.num_programs(0)
        j = pid
        s = 0
    # REC > 0 (dense, 16-row blocks): block b's record [slot, rank, rows, start, 16 rows] of REC int32 gives
    # everything in one round trip (no slot -> rank, start -> perm dependent loads before x and A).
    # HOIST: the rows (and the expert id) are loaded with the slot, before the rank test, not after it.
    # Both only change when loads are issued, never what is computed.
    for b in range(j, nbu, W):
        if REC > 0:
            rb = rec_ptr + b * REC
            slot = tl.load(rb)
            rank = tl.load(rb + 1)
            offs_m = tl.arange(0, BLOCK_M)
            mrow = offs_m < tl.load(rb + 2)
            rows = tl.load(rb + 4 + offs_m).to(tl.int64)    # all BLOCK_M entries written (0 past the block)
        else:
            slot, rank = _block_slot_rank(blk_slot_ptr, rank_ptr, b)
            if HOIST:
                rows, mrow = _block_rows(perm_ptr, blk_start_ptr, blk_len_ptr, b, 0, BLOCK_M)
        if HAS_EXPERT:
            if HOIST:
                e = tl.load(blk_exp_ptr + b).to(tl.int64)
        if rank > 0:
            if REC == 0:
                if not HOIST:
                    rows, mrow = _block_rows(perm_ptr, blk_start_ptr, blk_len_ptr, b, 0, BLOCK_M)
            a_base = a_ptr + slot.to(tl.int64) * sas
            b_base = b_ptr + slot.to(tl.int64) * sbs
            sc_off = slot.to(tl.int64) * scs
            if HAS_EXPERT:
                if not HOIST:
                    e = tl.load(blk_exp_ptr + b).to(tl.int64)
                a_base += e * sae
                b_base += e * sbe
                sc_off += e * sce
            scale = tl.load(sc_ptr + sc_off)
            if RT <= R16:
                _fused_block(x_ptr, sxm, sxk, a_base, sar, sak, b_base, sbn, sbr, scale, out_ptr, som, son, rows,
                             mrow, rank, K, N, KC, s, G, b, p_ptr, arrive_ptr, depart_ptr, CH, PREFETCH, IEEE,
                             UPCAST, CDT, BLOCK_M, BLOCK_N, BLOCK_K, RT, R16)
            else:
                if rank <= R16:     # a slot's rank picks its tile: 16, or the pool's whole max rank
                    _fused_block(x_ptr, sxm, sxk, a_base, sar, sak, b_base, sbn, sbr, scale, out_ptr, som, son,
                                 rows, mrow, rank, K, N, KC, s, G, b, p_ptr, arrive_ptr, depart_ptr, CH, PREFETCH,
                                 IEEE, UPCAST, CDT, BLOCK_M, BLOCK_N, BLOCK_K, RT, R16)
                else:
                    _fused_block(x_ptr, sxm, sxk, a_base, sar, sak, b_base, sbn, sbr, scale, out_ptr, som, son,
                                 rows, mrow, rank, K, N, KC, s, G, b, p_ptr, arrive_ptr, depart_ptr, CH, PREFETCH,
                                 IEEE, UPCAST, CDT, BLOCK_M, BLOCK_N, BLOCK_K, RT, RT)


@triton.jit
def _shrink_tile(x_ptr, sxm, sxk, a_base, sar, sak, p_ptr, sps, spm, spr, q_ptr, sqm, sqr, cnt_ptr, rows, mrow,
                 rank, r0, k_lo, k_hi, pid_s, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BR: tl.constexpr, SPLITS: tl.constexpr, REDUCE: tl.constexpr,
                 UNROLL: tl.constexpr):
    """Split ``pid_s``'s partial of ``x[rows] @ A^T`` to ``P[pid_s]``. ``REDUCE``: the last of the
    ``SPLITS`` programs of this (rank tile, block) to arrive at its counter (``cnt_ptr``) sums all partials
    in split order (the order the expand would sum them in: the same bits) into ``Q`` (the compute dtype)
    and resets the counter. Nobody waits (no residency needed): the others just leave."""
    offs_r = r0 + tl.arange(0, BR)
    mr = offs_r < rank
    pmask = mrow[:, None] & mr[None, :]
    acc = _xa(x_ptr, sxm, sxk, a_base, sar, sak, rows, mrow, offs_r, mr, k_lo, k_hi, k_hi, p_ptr, pmask, 0, IEEE,
              UPCAST, BLOCK_M, BLOCK_K, BR, 1)
    pptr = p_ptr + rows[:, None] * spm + offs_r[None, :] * spr
    if REDUCE:
        tl.store(pptr + pid_s * sps, acc, mask=pmask)
        tl.debug_barrier()                               # every thread's partial is written before the count
        n = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if n == SPLITS - 1:                              # the last to arrive: all partials are visible
            tl.debug_barrier()
            p = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
            if UNROLL:           # split order; unrolled: the loads in flight together (registers: SPLITS tiles)
                for j in tl.static_range(SPLITS):
                    p += tl.load(pptr + j * sps, mask=pmask, other=0.0, cache_modifier=".cg")
            else:
                for j in range(SPLITS):
                    p += tl.load(pptr + j * sps, mask=pmask, other=0.0, cache_modifier=".cg")
            tl.store(q_ptr + rows[:, None] * sqm + offs_r[None, :] * sqr, p, mask=pmask)
            tl.atomic_xchg(cnt_ptr, 0)                   # zero for the next launch (or graph replay)
    else:
        tl.store(pptr + pid_s * sps, acc, mask=pmask)


@triton.jit
def _shrink_kernel(x_ptr, sxm, sxk, a_ptr, sas, sae, sar, sak, p_ptr, sps, spm, spr, q_ptr, sqm, sqr, cnt_ptr,
                   perm_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr, blk_exp_ptr, rank_ptr, nblk_ptr,
                   K, K_PER_SPLIT, GB, RTILES,
                   HAS_EXPERT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                   SUB: tl.constexpr, RT: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
                   REDUCE: tl.constexpr, UNROLL: tl.constexpr, GDC: tl.constexpr):
    # One program per work item (rank tile, block, sub-block, K split) of the *used* blocks (the first
    # ``nblk`` of the table, read on the device), numbered from program 0 with the split fastest; programs
    # past the last item return. The grid stays the table's static bound (CUDA graphs), but the items are
    # its first programs, which the hardware places one per SM before it doubles any up: a grid with the
    # used blocks' programs scattered among unused ones put two working programs on some SMs and none on
    # others (H200, q 2048 tokens: the SMs active 38% of the kernel's time). SUB programs share a block
    # along its rows (BLOCK_M rows each): more programs for the same bytes of x.
    if GDC:   # the expand (a programmatic dependent) may start once every program of this grid got here
        tl.extra.cuda.gdc_launch_dependents()
    w = tl.program_id(0)
    per_r = tl.load(nblk_ptr) * (SUB * SPLITS)           # items per rank tile
    if w >= per_r * RTILES:
        return
    pid_r = w // per_r
    rem = w % per_r
    pid_s = rem % SPLITS
    sub = (rem // SPLITS) % SUB
    pid_b = rem // (SPLITS * SUB)
    slot, rank = _block_slot_rank(blk_slot_ptr, rank_ptr, pid_b)
    r0 = pid_r * RT
    if r0 >= rank:
        return                 # every split of this (rank tile, block) returns: its counter is never touched
    rows, mrow = _block_rows(perm_ptr, blk_start_ptr, blk_len_ptr, pid_b, sub * BLOCK_M, BLOCK_M)
    a_base = a_ptr + slot.to(tl.int64) * sas
    if HAS_EXPERT:
        a_base += tl.load(blk_exp_ptr + pid_b).to(tl.int64) * sae
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    cnt = cnt_ptr + pid_r * (GB * SUB) + pid_b * SUB + sub     # one counter per (rank tile, sub-block)
    if RT <= R16:
        _shrink_tile(x_ptr, sxm, sxk, a_base, sar, sak, p_ptr, sps, spm, spr, q_ptr, sqm, sqr, cnt, rows, mrow,
                     rank, r0, k_lo, k_hi, pid_s, IEEE, UPCAST, BLOCK_M, BLOCK_K, R16, SPLITS, REDUCE, UNROLL)
    else:
        if rank - r0 <= R16:   # the rest of the slot's rank fits the narrow tile
            _shrink_tile(x_ptr, sxm, sxk, a_base, sar, sak, p_ptr, sps, spm, spr, q_ptr, sqm, sqr, cnt, rows,
                         mrow, rank, r0, k_lo, k_hi, pid_s, IEEE, UPCAST, BLOCK_M, BLOCK_K, R16, SPLITS, REDUCE, UNROLL)
        else:
            _shrink_tile(x_ptr, sxm, sxk, a_base, sar, sak, p_ptr, sps, spm, spr, q_ptr, sqm, sqr, cnt, rows,
                         mrow, rank, r0, k_lo, k_hi, pid_s, IEEE, UPCAST, BLOCK_M, BLOCK_K, RT, SPLITS, REDUCE, UNROLL)


@triton.jit
def _embed_shrink_kernel(ids_ptr, a_ptr, sas, sar, sav, p_ptr, spm, spr,
                         perm_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr, rank_ptr, vocab_start, per,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    slot, rank = _block_slot_rank(blk_slot_ptr, rank_ptr, pid_b)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    rows, mrow = _block_rows(perm_ptr, blk_start_ptr, blk_len_ptr, pid_b, 0, BLOCK_M)
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
def _expand_acc(p_ptr, sps, spm, spr, b_base, sbn, sbr, rows, mrow, rank, offs_n, mn, SPLITS: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, CDT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BR: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BR):
        offs_r = r0 + tl.arange(0, BR)
        mr = offs_r < rank
        pmask = mrow[:, None] & mr[None, :]
        p = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
        for s in tl.static_range(SPLITS):   # unrolled: the partial loads are in flight together
            p += tl.load(p_ptr + s * sps + rows[:, None] * spm + offs_r[None, :] * spr, mask=pmask, other=0.0)
        bt = tl.load(b_base + offs_n[None, :] * sbn + offs_r[:, None] * sbr, mask=mr[:, None] & mn[None, :],
                     other=0.0)
        acc += _mm(p.to(CDT), bt.to(CDT), IEEE, UPCAST)
    return acc


@triton.jit
def _expand_walk(p_ptr, sps, spm, spr, b_base, sbn, sbr, sc, out_ptr, som, son, rows, mrow, rank, n0, N,
                 SPLITS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, CDT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BR: tl.constexpr, NT: tl.constexpr):
    """``out[rows, n0 : n0 + NT * BLOCK_N] += sc * p @ B^T`` tile by tile, for a slot whose rank fits one
    ``BR``-wide rank tile (``rank <= BR``): the block's P ``[BLOCK_M, BR]`` is loaded once, and each tile's
    product, scaling and rounding are those of ``_expand_acc`` (the same bits). The next tile's B and out
    loads are issued before this tile's product and store (the tiles are disjoint)."""
    offs_r = tl.arange(0, BR)
    mr = offs_r < rank
    pmask = mrow[:, None] & mr[None, :]
    p = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        p += tl.load(p_ptr + s * sps + rows[:, None] * spm + offs_r[None, :] * spr, mask=pmask, other=0.0)
    p = p.to(CDT)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    bt = tl.load(b_base + offs_n[None, :] * sbn + offs_r[:, None] * sbr, mask=mr[:, None] & mn[None, :], other=0.0)
    o = tl.load(out_ptr + rows[:, None] * som + offs_n[None, :] * son, mask=mrow[:, None] & mn[None, :], other=0.0)
    for j in tl.static_range(NT):
        if j + 1 < NT:
            offs_n2 = n0 + (j + 1) * BLOCK_N + tl.arange(0, BLOCK_N)
            mn2 = offs_n2 < N
            bt2 = tl.load(b_base + offs_n2[None, :] * sbn + offs_r[:, None] * sbr, mask=mr[:, None] & mn2[None, :],
                          other=0.0)
            o2 = tl.load(out_ptr + rows[:, None] * som + offs_n2[None, :] * son, mask=mrow[:, None] & mn2[None, :],
                         other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc += _mm(p, bt.to(CDT), IEEE, UPCAST)
        acc = acc * sc
        tl.store(out_ptr + rows[:, None] * som + offs_n[None, :] * son, (o.to(tl.float32) + acc).to(o.dtype),
                 mask=mrow[:, None] & mn[None, :])
        if j + 1 < NT:
            offs_n = offs_n2
            mn = mn2
            bt = bt2
            o = o2


@triton.jit
def _expand_kernel(p_ptr, sps, spm, spr, b_ptr, sbs, sbe, sbn, sbr, sc_ptr, scs, sce, out_ptr, som, son,
                   perm_ptr, blk_start_ptr, blk_len_ptr, blk_slot_ptr, blk_exp_ptr, rank_ptr, N,
                   SPLITS: tl.constexpr, HAS_EXPERT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RT: tl.constexpr,
                   GDC: tl.constexpr, NT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    slot, rank = _block_slot_rank(blk_slot_ptr, rank_ptr, pid_b)
    if rank <= 0:
        return
    rows, mrow = _block_rows(perm_ptr, blk_start_ptr, blk_len_ptr, pid_b, 0, BLOCK_M)
    b_base = b_ptr + slot.to(tl.int64) * sbs
    sc_off = slot.to(tl.int64) * scs
    if HAS_EXPERT:
        e = tl.load(blk_exp_ptr + pid_b).to(tl.int64)
        b_base += e * sbe
        sc_off += e * sce
    if NT > 1:
        # NT N tiles a program (``expand_tiles``): the block's metadata and P read once, the next tile's B
        # and out loads issued before this tile's product and store
        if GDC:
            tl.extra.cuda.gdc_wait()
        sc = tl.load(sc_ptr + sc_off)
        if RT <= R16:
            _expand_walk(p_ptr, sps, spm, spr, b_base, sbn, sbr, sc, out_ptr, som, son, rows, mrow, rank,
                         pid_n * NT * BLOCK_N, N, SPLITS, IEEE, UPCAST, CDT, BLOCK_M, BLOCK_N, R16, NT)
        else:
            if rank <= R16:
                _expand_walk(p_ptr, sps, spm, spr, b_base, sbn, sbr, sc, out_ptr, som, son, rows, mrow, rank,
                             pid_n * NT * BLOCK_N, N, SPLITS, IEEE, UPCAST, CDT, BLOCK_M, BLOCK_N, R16, NT)
            else:
                _expand_walk(p_ptr, sps, spm, spr, b_base, sbn, sbr, sc, out_ptr, som, son, rows, mrow, rank,
                             pid_n * NT * BLOCK_N, N, SPLITS, IEEE, UPCAST, CDT, BLOCK_M, BLOCK_N, RT, NT)
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    omask = mrow[:, None] & mn[None, :]
    optr = out_ptr + rows[:, None] * som + offs_n[None, :] * son
    if GDC:
        # a programmatic dependent of the shrink, started while it still runs: the block's metadata read,
        # wait for the shrink to complete and its stores to be visible before P (and out: reading out
        # before the wait took HBM bandwidth from the shrink, 2026-12-03b)
        tl.extra.cuda.gdc_wait()
    if RT <= R16:
        acc = _expand_acc(p_ptr, sps, spm, spr, b_base, sbn, sbr, rows, mrow, rank, offs_n, mn, SPLITS, IEEE,
                          UPCAST, CDT, BLOCK_M, BLOCK_N, R16)
    else:
        if rank <= R16:
            acc = _expand_acc(p_ptr, sps, spm, spr, b_base, sbn, sbr, rows, mrow, rank, offs_n, mn, SPLITS, IEEE,
                              UPCAST, CDT, BLOCK_M, BLOCK_N, R16)
        else:
            acc = _expand_acc(p_ptr, sps, spm, spr, b_base, sbn, sbr, rows, mrow, rank, offs_n, mn, SPLITS, IEEE,
                              UPCAST, CDT, BLOCK_M, BLOCK_N, RT)
    acc = acc * tl.load(sc_ptr + sc_off)
    o = tl.load(optr, mask=omask, other=0.0)
    tl.store(optr, (o.to(tl.float32) + acc).to(o.dtype), mask=omask)


_CDT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_CDT)


_T = torch.Tensor


def _int_key(a: int) -> int:
    return ((a & 15) == 0) | (a == 1) << 1 | (not -0x80000000 <= a <= 0x7FFFFFFF) << 2 | (a >= 1 << 63) << 3


class _IntKeys(dict):
    """``_int_key`` memoised (strides and sizes repeat on every launch; a dict lookup is cheaper than the
    four comparisons); bounded: cleared when it holds ``_INT_KEYS_MAX`` values."""

    def __missing__(self, a: int) -> int:
        if len(self) >= _INT_KEYS_MAX:
            self.clear()
        k = self[a] = _int_key(a)
        return k


_INT_KEYS_MAX = 1 << 16
_INT_KEYS = _IntKeys()


def _key(args: tuple, _ik=_INT_KEYS) -> tuple:
    """What Triton specialises launch arguments on (a superset of it): a tensor's dtype and 16-byte
    alignment; an int's divisibility by 16, value 1 and type (int32 / int64 / uint64 by range; ``args``:
    tensors and ints only). Host time on every launch: ints first by exact type (the common case)."""
    return tuple([_ik[a] if type(a) is int else
                  ((a.data_ptr() & 15) == 0, a.dtype) if isinstance(a, _T) else _int_key(a)
                  for a in args])


class Segment(NamedTuple):
    """Launch arguments that stay the same over many launches, in signature order, with their
    specialisation key (``_key``) computed once: a layer's factors and their strides (``factor_segment``),
    a batch's block tables (``block_segment``). Its tensors must never move (the pool's buffers and the
    metadata's never do); whoever caches a segment keeps its tensors alive with it."""

    args: tuple
    key: tuple


def factor_segment(A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, expert: bool) -> Segment:
    """A, B, scaling of one layer's module and their strides, as ``fused`` passes them (the expert form
    with its expert strides)."""
    e_a, e_b, e_s = (A.stride(1), B.stride(1), scaling.stride(1)) if expert else (0, 0, 0)
    args = (A, A.stride(0), e_a, A.stride(-2), A.stride(-1), B, B.stride(0), e_b, B.stride(-2), B.stride(-1),
            scaling, scaling.stride(0), e_s)
    return Segment(args, _key(args))


def block_segment(blocks: tuple, slot_rank: torch.Tensor, nblk: torch.Tensor,
                  records: torch.Tensor | None) -> Segment:
    """The block tables, the slots' ranks, the used-block count and the records (``nblk`` in their place
    when they are not read), as ``fused`` passes them."""
    args = (*blocks, slot_rank, nblk, records if records is not None else nblk)
    return Segment(args, _key(args))


def shrink_factor_segment(A: torch.Tensor, expert_stride: int | None) -> Segment:
    """A and its strides as ``shrink`` passes them."""
    args = (A, A.stride(0), expert_stride or 0, A.stride(-2), A.stride(-1))
    return Segment(args, _key(args))


def expand_factor_segment(B: torch.Tensor, expert_stride: int | None, scaling: torch.Tensor,
                          scaling_expert_stride: int | None) -> Segment:
    """B, scaling and their strides as ``expand`` passes them."""
    args = (B, B.stride(0), expert_stride or 0, B.stride(-2), B.stride(-1), scaling, scaling.stride(0),
            scaling_expert_stride or 0)
    return Segment(args, _key(args))


class _Launcher:
    """``kernel[grid](*args, **constexprs)``, but after the first launch of a specialisation through the
    compiled kernel's handle: ``JITFunction.run`` binds and specialises every argument on each call (tens of
    microseconds of host time per launch); the key here covers everything it specialises on (``_key``), so
    the cached binary is the one Triton would pick. ``args`` are the runtime arguments in signature order,
    ``consts`` the constexpr ones (they follow them in the signature)."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict[tuple, object] = {}
        self.checked = False

    def __call__(self, grid: tuple, args: tuple, consts: dict, num_warps: int = 4, num_stages: int = 3,
                 pdl: bool = False, tail: tuple | None = None, key: tuple | None = None) -> None:
        # pdl: a programmatic dependent launch (a compile option: the handle's launcher sets the attribute);
        # tail: ``(tuple(consts.values()), num_warps, num_stages, pdl)`` and key: ``_key(args)``, when the
        # caller has them (memoised: ``_fused_geometry``, ``Segment``)
        if not DIRECT:
            self.fn[grid](*args, **consts, **_opts(num_warps, num_stages, pdl))
            return
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if tail is None:
            tail = (tuple(consts.values()), num_warps, num_stages, pdl)
        key = (_key(args) if key is None else key, tail, args[0].device.index)
        k = self.cache.get(key)
        if k is None:
            opts = _opts(num_warps, num_stages, pdl)
            if not self.checked:   # constexprs must follow the runtime args in the signature, in this order
                names = list(self.fn.arg_names)
                assert names == names[:len(args)] + list(consts), (names, list(consts))
                self.checked = True
            k = self.fn[grid](*args, **consts, **opts)
            if k is not None and hasattr(k, "__getitem__"):
                self.cache[key] = k
            return
        k[grid](*args, *consts.values())


def _opts(num_warps: int, num_stages: int, pdl: bool) -> dict:
    """The compile options of a launch (``launch_pdl`` only when set: the same cache keys as before it)."""
    return dict(num_warps=num_warps, num_stages=num_stages, **({"launch_pdl": True} if pdl else {}))


_fused = _Launcher(_fused_kernel)
_shrink = _Launcher(_shrink_kernel)
_embed_shrink = _Launcher(_embed_shrink_kernel)
_expand = _Launcher(_expand_kernel)
_SMS: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


_PDL: dict[int, bool] = {}


def pdl_ok(device: torch.device, on: bool | None = None) -> bool:
    """Whether a launch on ``device`` is a programmatic dependent launch: ``on`` (default: ``pdl``, the
    expand as a dependent of its shrink) is set, the kernels are compiled (not the interpreter) and the GPU
    has grid dependency control (compute capability 9.0 and later). A function of the configuration and the
    device only, so a CUDA graph captures the same launches it replays."""
    if not (TWO_LAUNCH_CONFIG["pdl"] if on is None else on) or INTERPRET or device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL:
        _PDL[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL[idx]


def split_size(K: int, prefill: bool) -> int:
    """Columns of K per shrink program (two-launch path): a function of K and the regime only (never of
    the batch's content). Decode: short chunks keep a few blocks parallel over many splits. Prefill: K in
    ``prefill_splits`` splits (each the next power of two above K / that, >= 256 columns: q of Llama-3-8B 4 x
    1024, down 4 x 4096, the last one shorter), which the shrink sums itself (``reduce``); else fixed
    columns (2048 / 4096, fewer partials for the expand to sum when it sums them)."""
    if prefill:
        if TWO_LAUNCH_CONFIG["prefill_split"]:
            return TWO_LAUNCH_CONFIG["prefill_split"]
        if TWO_LAUNCH_CONFIG["prefill_splits"]:
            return max(256, _next_pow2(-(-K // TWO_LAUNCH_CONFIG["prefill_splits"])))
        return 2048 if K <= 8192 else 4096   # H200 sweeps 2026-12-02g/h: q 1024 -> 2048 5-13% faster
    return 512 if K <= 4096 else 1024


def shrink_rows(block_m: int) -> int:
    """Rows per shrink program for blocks of ``block_m`` rows (prefill regime): ``shrink_rows`` of
    ``TWO_LAUNCH_CONFIG`` when it is a power of two (>= 16) below the block, else the whole block."""
    r = int(TWO_LAUNCH_CONFIG["shrink_rows"])
    return r if 16 <= r < block_m and block_m % r == 0 and r & (r - 1) == 0 else block_m


def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``). Plain integer arithmetic: Triton's
    ``next_power_of_2`` is a constexpr function whose call wrapper costs microseconds of host time, and
    these run on every launch."""
    return 1 << max(n - 1, 0).bit_length()


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(max(n, 1))))


def expert_regime(routed_rows: int) -> tuple[int, bool]:
    """(rows per (expert, slot) block, fused kernel?) of the expert op for a layer of ``routed_rows`` routed
    rows: a function of the routing's size only, never of its content (bits equal within a regime)."""
    if routed_rows <= EXPERT_FUSED_ROWS:
        return BLOCK_R, True
    return EXPERT_WIDE_BLOCK_M, EXPERT_WIDE_FUSED


def fused_stages(dtype: torch.dtype, rt: int) -> int:
    """Pipeline stages of the dense fused kernel: the tuned ``num_stages`` where it was timed (2-byte
    activations, rank tiles up to ``FUSED_STAGES_MAX_RT``), else at most 3, the depth every tile had
    before: each stage holds an x and an A tile in shared memory (fp32 at rank tile 128: 72 KiB a stage,
    so four stages would not fit in an H100's 227 KiB)."""
    n = FUSED_CONFIG["num_stages"]
    return n if dtype.itemsize <= 2 and rt <= FUSED_STAGES_MAX_RT else min(n, 3)


SHRINK_SMEM = 224 * 1024   # shared memory the shrink's pipeline stages may take (H100/H200: 227 KiB a block)


def shrink_stages(dtype: torch.dtype, block_m: int, block_k: int, rt: int) -> int:
    """Pipeline stages of the shrink: the tuned ``shrink_stages``, fewer where that many x and A tiles
    (``block_m x block_k`` and ``block_k x rt`` of ``dtype``, a stage each) would not fit ``SHRINK_SMEM``
    (float32 at rank tile 128 in the prefill regime: 96 KiB a stage), at least one."""
    per = (block_m + rt) * block_k * dtype.itemsize
    return max(1, min(int(TWO_LAUNCH_CONFIG["shrink_stages"]), SHRINK_SMEM // per))


def rank_tile(max_rank: int) -> int:
    """The wide rank tile for a pool: its max rank rounded up to a power of two (16 .. FUSED_MAX_RANK). A
    slot of rank <= 16 uses the 16-wide tile."""
    return _pow2(max_rank, BLOCK_R, max(BLOCK_R, FUSED_MAX_RANK))


def fused_chunks(K: int) -> tuple[int, int]:
    """(chunks, K columns per chunk) of the fused kernel's K split: a function of K only. A chunk is the
    unit of the split (its partial is summed with the others in chunk order), so a row's bits never depend
    on how many programs share its block. At most ``max_chunks`` (``FUSED_CONFIG``) chunks (every program of a block
    loads all partials at once), each ``chunk_k`` columns or the next power of two above K / that."""
    K = max(K, 1)
    kc = max(FUSED_CONFIG["chunk_k"], _next_pow2(-(-K // FUSED_CONFIG["max_chunks"])))
    kc = max(16, min(_next_pow2(K), kc))
    return -(-K // kc), kc


def fused_meet(device: torch.device, split: bool) -> int:
    """Programs that may meet on a block (resident together, at most one per SM): the device's SM count
    with ``split`` (the decode regime), else 1 (one program per block); always 1 under the interpreter
    (its programs run one after another, so they could never meet)."""
    return _sms(device) if split and not INTERPRET and device.type == "cuda" else 1


class FusedScratch:
    """The split fused kernel's float32 chunk partials (``[blocks, chunks, 16, RT]``) and per-block arrival /
    departure counters (zero between launches: the kernel resets what it used). A block is split only
    while at most half the SMs' worth of blocks are used, so ``SMs // 2`` blocks bound it. Allocated once
    and grown when a larger K or rank needs it (outside any CUDA-graph capture: ``reserve`` it first).
    Also the counters of the two-launch shrink's split reduction (``reduce_counters``).
    One scratch per stream of use: two ops running concurrently must not share one."""

    def __init__(self) -> None:
        self.p: torch.Tensor | None = None
        self.cnt: torch.Tensor | None = None
        self.red: torch.Tensor | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    def reserve(self, p_elems: int, blocks: int, device: torch.device) -> None:
        if self.p is None or self.p.numel() < p_elems or self.p.device != device:
            self.p = torch.empty(max(p_elems, 1), dtype=torch.float32, device=device)
        if self.cnt is None or self.cnt.numel() < 2 * blocks or self.cnt.device != device:
            self.cnt = torch.zeros(2 * max(blocks, 1), dtype=torch.int32, device=device)
            n = self.cnt.numel() // 2
            self._views = (self.cnt[:n], self.cnt[n:])

    def reduce_counters(self, n: int, device: torch.device) -> torch.Tensor:
        """At least ``n`` int32 counters of the shrink's split reduction, zero between launches (the kernel
        resets what it used); grown here when needed (outside any capture: reserve them first)."""
        if self.red is None or self.red.numel() < n or self.red.device != device:
            self.red = torch.zeros(max(n, 1), dtype=torch.int32, device=device)
        return self.red

    def counters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(arrivals, departures): views made once (slicing costs host time)."""
        assert self._views is not None
        return self._views

    @staticmethod
    def need(K: int, block_m: int, max_rank: int, device: torch.device) -> tuple[int, int]:
        """(float32 elements, blocks) the split kernel needs for an op of K columns."""
        meet = fused_meet(device, True)
        ch, _ = fused_chunks(K)
        if meet < 2 or ch < 2:
            return 0, 0
        return (meet // 2) * ch * block_m * rank_tile(max_rank), meet // 2


def fused(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, out: torch.Tensor,
          blocks: tuple, nblk: torch.Tensor, grid_blocks: int, block_m: int, slot_rank: torch.Tensor,
          max_rank: int, expert: bool, scratch: FusedScratch | None, records: torch.Tensor | None = None,
          factors: Segment | None = None, block_cache: dict | None = None) -> None:
    """``out[row] += s[slot(, e)] * (x[row] @ A[slot(, e), :rank]^T) @ B[slot(, e), :, :rank]^T`` for the
    blocks' rows, in one launch. x ``[rows, K]``, out ``[rows, N]`` (any strides); A ``[S, R, K]`` / ``[S,
    E, R, K]``, B ``[S, N, R]`` / ``[S, E, N, R]``, scaling ``[S]`` / ``[S, E]`` float32 (``expert``
    selects the second forms); ``nblk`` a 1-element int32 device tensor: the used blocks (a prefix of the
    table); ``grid_blocks``: the table's static length. ``scratch`` given (decode regime, dense): K chunks
    spread over several programs per block that meet through it, as many as the used blocks leave SMs for;
    None: one program per block. ``records``: the dense blocks' records (``meta.DenseMeta.blk_rec``, 16-row
    blocks; read instead of the tables when the ``records`` tuning is on). Requires ``max_rank <=
    FUSED_MAX_RANK``. Host time per launch (an eager engine pays it for every module of every layer):
    ``factors`` (``factor_segment`` of A, B, scaling, made once per layer by the caller) and
    ``block_cache`` (a dict where the blocks' ``block_segment`` is kept, by the tables' identities; the
    caller empties it when the tables are replaced) skip rebuilding and re-keying those arguments."""
    rows, K = x.shape
    N = out.shape[1]
    if grid_blocks == 0 or rows == 0 or N == 0:
        return
    dev = x.device
    ch, kc, meet, grid, need, use_rec, consts, tail = _fused_geometry(
        K, N, grid_blocks, block_m, max_rank, expert, x.dtype, dev, scratch is not None, records is not None)
    if meet > 1:
        scratch.reserve(need[0], need[1], dev)
        P, (arrive, depart) = scratch.p, scratch.counters()
    else:
        P, arrive, depart = scaling, nblk, nblk      # not read with one program per block
    if factors is None:
        factors = factor_segment(A, B, scaling, expert)
    bkey = ("blocks", use_rec, id(blocks[0]), id(blocks[3]), id(slot_rank), id(nblk), id(records))
    bseg = _cached(block_cache, bkey, lambda: block_segment(blocks, slot_rank, nblk, records if use_rec else None))
    xs = (x, x.stride(0), x.stride(1))
    outs = (out, out.stride(0), out.stride(1))
    rest = (P, arrive, depart, K, N, kc, meet)
    _fused((grid,), xs + factors.args + outs + bseg.args + rest, consts, num_warps=tail[1],
           num_stages=tail[2], pdl=tail[3], tail=tail,
           key=_key(xs) + factors.key + _key(outs) + bseg.key + _key(rest) if DIRECT else None)


_GEOMETRY: dict[tuple, tuple] = {}
_GEOMETRY_MAX = 4096   # distinct op shapes memoised (an engine has a handful; cleared when exceeded)


def _fused_geometry(K: int, N: int, grid_blocks: int, block_m: int, max_rank: int, expert: bool,
                    dtype: torch.dtype, device: torch.device, split: bool, has_rec: bool) -> tuple:
    """Everything of a fused launch that the op's shape decides, not its tensors: (chunks, K columns per
    chunk, programs meeting on a block, grid, the split's scratch need, records used?, the constexprs, the
    launcher's key tail). Memoised per shape and tuning (``Tuning.version``, and the module-level switches
    read here): computing it costs more host time than the launch itself, on every layer of every step."""
    key = (K, N, grid_blocks, block_m, max_rank, expert, dtype, device, split, has_rec, Tuning.version,
           FUSED_MAX_RANK, FUSED_STAGES_MAX_RT, INTERPRET)
    g = _GEOMETRY.get(key)
    if g is not None:
        return g
    cfg = FUSED_CONFIG
    # one chunk (the whole K) where the kernel never splits: the expert op, the prefill regime
    ch, kc = fused_chunks(K) if split else (1, max(K, 1))
    rt = rank_tile(max_rank)
    meet = fused_meet(device, split) if ch > 1 else 1
    need = (0, 0)
    if meet > 1:
        need = FusedScratch.need(K, block_m, max_rank, device)
        meet = min(meet, grid_blocks * ch)
        grid = meet                                  # one program per SM at most: all resident, they can meet
    else:
        pps = cfg["expert_programs_per_sm" if expert else "programs_per_sm"]
        grid = grid_blocks if INTERPRET or device.type != "cuda" or pps <= 0 else \
            max(1, min(grid_blocks, pps * _sms(device)))
    use_rec = has_rec and bool(cfg["records"]) and not expert
    if use_rec:
        assert block_m == REC_ROWS, block_m
    pdl = pdl_ok(device, bool(cfg["pdl"]))
    consts = dict(CH=ch, REC=REC_INTS if use_rec else 0, HOIST=bool(cfg["hoist"]),
                  PREFETCH=bool(cfg["expert_prefetch" if expert else "prefetch"]),
                  HAS_EXPERT=expert, IEEE=dtype == torch.float32,
                  UPCAST=INTERPRET, CDT=_CDT[dtype], BLOCK_M=block_m,
                  BLOCK_N=_pow2(N, 16, cfg["block_n"] if not expert else
                                cfg["expert_block_n"] if block_m <= 16 else cfg["expert_wide_block_n"]),
                  BLOCK_K=_pow2(min(K, kc), 16, cfg["block_k"]), RT=rt, WAIT=pdl)
    warps = cfg["expert_warps" if expert else "num_warps"]
    stages = cfg["expert_stages"] if expert else fused_stages(dtype, rt)
    tail = (tuple(consts.values()), warps, stages, pdl)
    g = (ch, kc, meet, grid, need, use_rec, consts, tail)
    _memo_geometry(key, g)
    return g


def shrink(x: torch.Tensor, A: torch.Tensor, expert_stride: int | None, blocks, nblk: torch.Tensor,
           grid_blocks: int, block_m: int, slot_rank: torch.Tensor, max_rank: int,
           scratch: "FusedScratch | None" = None, factors: Segment | None = None,
           block_cache: dict | None = None) -> torch.Tensor:
    """P ``[splits, rows, R_pad]`` float32 with ``P.sum(0)[row, :rank] = x[row] @ A[slot(, e), :rank]^T``
    (in x's dtype when the expand reads one split and ``p_low`` is set: the expand rounds P to it anyway).
    With ``scratch`` (its counters) and several K splits, the shrink sums the splits itself (``reduce``:
    the last split program of a block to finish adds them in split order) and returns ``[1, rows, R_pad]``:
    the expand then reads P once instead of once per split, for each of its N tiles.

    x ``[rows, K]``; A ``[S, R, K]`` or ``[S, E, R, K]`` (any strides; ``expert_stride`` is A.stride(1) for
    the expert form, None for dense); ``nblk`` a 1-element int32 device tensor: the used blocks (a prefix
    of the table of ``grid_blocks``). One program per (rank tile, used block or sub-block of
    ``shrink_rows`` rows, K split), the first programs of the static grid; the rank tile is the pool's
    (``rank_tile``), 16 wide where the slot's rest of rank fits.
    Entries of P outside the blocks' rows or above a slot's rank are never written (and never read by
    ``expand``). ``factors`` (``shrink_factor_segment``) and ``block_cache``: as for ``fused``.
    """
    rows, K = x.shape
    dev = x.device
    grid, ks, splits, r_pad, reduce, p_dt, q_dt, consts, tail = _shrink_geometry(
        K, grid_blocks, block_m, max_rank, expert_stride is not None, x.dtype, dev, scratch is not None)
    P = torch.empty((splits, rows, r_pad), dtype=p_dt, device=dev)
    Q = torch.empty((1, rows, r_pad), dtype=q_dt, device=dev) if reduce else P
    if grid_blocks == 0 or rows == 0:
        return Q
    cnt = scratch.reduce_counters(grid[0] * grid[1], dev) if reduce else slot_rank
    if factors is None:
        factors = shrink_factor_segment(A, expert_stride)
    tables = _tables(blocks, slot_rank, block_cache, nblk)
    xs = (x, x.stride(0), x.stride(1))
    pq = (P, rows * r_pad, r_pad, 1, Q, r_pad, 1, cnt)      # P, Q contiguous: their strides from the shape
    rest = (K, ks, grid_blocks, grid[0])
    _shrink((grid[0] * grid[1] * grid[2],), xs + factors.args + pq + tables.args + rest, consts,
            num_warps=tail[1], num_stages=tail[2], pdl=tail[3], tail=tail,
            key=_key(xs) + factors.key + _key(pq) + tables.key + _key(rest) if DIRECT else None)
    return Q


def _shrink_geometry(K: int, grid_blocks: int, block_m: int, max_rank: int, expert: bool, dtype: torch.dtype,
                     device: torch.device, has_scratch: bool) -> tuple:
    """What the op's shape decides of a shrink launch (grid, split columns, splits, P's padded rank, the
    reduction, P's and Q's dtypes, constexprs, the launcher's key tail), memoised like ``_fused_geometry``."""
    key = ("shrink", K, grid_blocks, block_m, max_rank, expert, dtype, device, has_scratch, Tuning.version,
           FUSED_MAX_RANK, INTERPRET)
    g = _GEOMETRY.get(key)
    if g is not None:
        return g
    prefill = block_m > 16
    grid, ks, sub_m, rt = shrink_grid(K, grid_blocks, block_m, max_rank)
    splits, r_pad = grid[2], grid[0] * rt
    reduce = splits > 1 and has_scratch and bool(TWO_LAUNCH_CONFIG["reduce"])
    low_dt = dtype if bool(TWO_LAUNCH_CONFIG["p_low"]) else torch.float32
    bk = _pow2(K, 16, TWO_LAUNCH_CONFIG["shrink_block_k"][prefill])
    consts = dict(HAS_EXPERT=expert, IEEE=dtype == torch.float32, UPCAST=INTERPRET,
                  BLOCK_M=sub_m, SUB=block_m // sub_m, RT=rt,
                  BLOCK_K=bk, SPLITS=splits, REDUCE=reduce, UNROLL=bool(TWO_LAUNCH_CONFIG["reduce_unroll"]),
                  GDC=pdl_ok(device))
    warps = TWO_LAUNCH_CONFIG["shrink_warps" if rt <= BLOCK_R else "shrink_warps_wide"]
    stages = shrink_stages(dtype, sub_m, bk, rt)
    g = (grid, ks, splits, r_pad, reduce, low_dt if splits == 1 else torch.float32, low_dt, consts,
         (tuple(consts.values()), warps, stages, False))
    _memo_geometry(key, g)
    return g


def _memo_geometry(key: tuple, g: tuple) -> None:
    if len(_GEOMETRY) >= _GEOMETRY_MAX:
        _GEOMETRY.clear()
    _GEOMETRY[key] = g


def _cached(cache: dict | None, key: tuple, make) -> Segment:
    """``make()``'s segment from ``cache`` (a backend's or a routing's dict) under ``key``, made and kept
    there the first time. Keys name tensors by identity: the cached segment holds those tensors, so no id
    is reused while it is there."""
    seg = cache.get(key) if cache is not None else None
    if seg is None:
        seg = make()
        if cache is not None:
            cache[key] = seg
    return seg


def _tables(blocks: tuple, slot_rank: torch.Tensor, cache: dict | None,
            nblk: torch.Tensor | None = None) -> Segment:
    """The block tables and the slots' ranks as the two-launch kernels take them (and the used blocks'
    count after them, for the shrink)."""
    def make() -> Segment:
        args = (*blocks, slot_rank) + ((nblk,) if nblk is not None else ())
        return Segment(args, _key(args))
    return _cached(cache, ("tables", id(blocks[0]), id(blocks[3]), id(blocks[4]), id(slot_rank),
                           None if nblk is None else id(nblk)), make)


def shrink_grid(K: int, grid_blocks: int, block_m: int, max_rank: int) -> tuple[tuple, int, int, int]:
    """The shrink's work-item bounds ``(rank tiles, blocks x sub-blocks, K splits)`` (the launch is their
    product, one program per item, items over the used blocks first), its K columns per split, rows per
    program and rank tile, for an op of K columns over ``grid_blocks`` blocks of ``block_m`` rows."""
    prefill = block_m > 16
    ks = split_size(K, prefill)
    rt = rank_tile(max_rank)
    sub_m = shrink_rows(block_m) if prefill else block_m
    return (-(-max(max_rank, 1) // rt), grid_blocks * (block_m // sub_m), max(1, -(-K // ks))), ks, sub_m, rt


def reduce_counters_needed(K: int, grid_blocks: int, block_m: int, max_rank: int) -> int:
    """Counters the shrink's split reduction needs for an op of K columns over ``grid_blocks`` blocks of
    ``block_m`` rows: one per (rank tile, block or sub-block); 0 with one split."""
    grid = shrink_grid(K, grid_blocks, block_m, max_rank)[0]
    return grid[0] * grid[1] if TWO_LAUNCH_CONFIG["reduce"] and grid[2] > 1 else 0


def embed_shrink(token_ids: torch.Tensor, A: torch.Tensor, vocab_start: int, blocks, grid_blocks: int,
                 block_m: int, slot_rank: torch.Tensor, max_rank: int) -> torch.Tensor:
    """P ``[1, T, R_pad]``: the embedding-A column of each token's id (0 outside this rank's shard).
    A ``[S, R, per]``."""
    T = token_ids.shape[0]
    rt = rank_tile(max_rank)
    r_pad = -(-max(max_rank, 1) // rt) * rt
    P = torch.empty((1, T, r_pad), dtype=torch.float32, device=token_ids.device)
    if grid_blocks == 0 or T == 0:
        return P
    perm, bs, bl, bslot, _ = blocks
    _embed_shrink((r_pad // BLOCK_R, grid_blocks),
                  (token_ids, A, A.stride(0), A.stride(1), A.stride(2), P, P.stride(1), P.stride(2),
                   perm, bs, bl, bslot, slot_rank, vocab_start, A.shape[-1]),
                  dict(BLOCK_M=block_m, BLOCK_R=BLOCK_R))
    return P


def expand(P: torch.Tensor, B: torch.Tensor, expert_stride: int | None, scaling: torch.Tensor,
           scaling_expert_stride: int | None, out: torch.Tensor, blocks, grid_blocks: int, block_m: int,
           slot_rank: torch.Tensor, compute_dtype: torch.dtype, max_rank: int, factors: Segment | None = None,
           block_cache: dict | None = None) -> None:
    """``out[row] += scaling[slot(, e)] * P.sum(0)[row, :rank] @ B[slot(, e), :, :rank]^T`` for the blocks'
    rows. B ``[S, N, R]`` or ``[S, E, N, R]``; scaling ``[S]`` or ``[S, E]`` (float32); out ``[rows, N]``.
    ``factors`` (``expand_factor_segment``) and ``block_cache``: as for ``fused``."""
    rows, N = out.shape
    if grid_blocks == 0 or rows == 0 or N == 0:
        return
    grid, consts, tail = _expand_geometry(N, grid_blocks, block_m, max_rank, P.shape[0], expert_stride is not None,
                                          compute_dtype, out.device)
    if factors is None:
        factors = expand_factor_segment(B, expert_stride, scaling, scaling_expert_stride)
    tables = _tables(blocks, slot_rank, block_cache)
    ps = (P, P.stride(0), P.stride(1), P.stride(2))
    outs = (out, out.stride(0), out.stride(1))
    rest = (N,)
    _expand(grid, ps + factors.args + outs + tables.args + rest, consts, num_warps=tail[1], num_stages=tail[2],
            pdl=tail[3], tail=tail,
            key=_key(ps) + factors.key + _key(outs) + tables.key + _key(rest) if DIRECT else None)


def _expand_geometry(N: int, grid_blocks: int, block_m: int, max_rank: int, splits: int, expert: bool,
                     dtype: torch.dtype, device: torch.device) -> tuple:
    """What the op's shape decides of an expand launch (grid, constexprs, key tail), memoised."""
    key = ("expand", N, grid_blocks, block_m, max_rank, splits, expert, dtype, device, Tuning.version,
           FUSED_MAX_RANK, INTERPRET)
    g = _GEOMETRY.get(key)
    if g is not None:
        return g
    rt = rank_tile(max_rank)
    bn = _pow2(N, 16, TWO_LAUNCH_CONFIG["expand_block_n" if rt <= BLOCK_R else "expand_block_n_wide"])
    gdc = pdl_ok(device)
    consts = dict(SPLITS=splits, HAS_EXPERT=expert, IEEE=dtype == torch.float32,
                  UPCAST=INTERPRET, CDT=_CDT[dtype], BLOCK_M=block_m, BLOCK_N=bn, RT=rt, GDC=gdc)
    # one stage: one rank tile per slot, nothing to pipeline (and the split partials' stages of a
    # 64-row, 64-rank tile would exceed the shared memory)
    warps = TWO_LAUNCH_CONFIG["expand_warps" if rt <= BLOCK_R else "expand_warps_wide"]
    # N tiles a program: only where every slot's rank fits one rank tile (the walk loads P once)
    nt = (max(1, int(TWO_LAUNCH_CONFIG["expand_tiles" if rt <= BLOCK_R else "expand_tiles_wide"]))
          if max_rank <= FUSED_MAX_RANK else 1)
    nt = min(nt, -(-N // bn))
    consts["NT"] = nt
    g = ((-(-N // (bn * nt)), grid_blocks), consts, (tuple(consts.values()), warps, 1, gdc))
    _memo_geometry(key, g)
    return g


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
def _route_scan_kernel(counts_ptr, grp_start_ptr, blk_first_ptr, blk_slot_ptr, nblk_ptr, G, NB, BM: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_NB: tl.constexpr):
    offs = tl.arange(0, BLOCK_G)
    m = offs < G
    c = tl.load(counts_ptr + offs, mask=m, other=0)
    nblk = (c + BM - 1) // BM
    tl.store(grp_start_ptr + offs, tl.cumsum(c, 0) - c, mask=m)
    tl.store(blk_first_ptr + offs, tl.cumsum(nblk, 0) - nblk, mask=m)
    tl.store(nblk_ptr, tl.sum(nblk, 0))     # the used blocks: a prefix of the table
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
    for the kernels, the static block count and a 1-element int32 device tensor with the used blocks (the
    first ones of the table; the rest have slot -1)."""
    N = int(token_index.numel())
    dev = token_index.device
    G = num_experts * num_slots
    NB = -(-N // block_m) + min(N, G)
    # one allocation for all the tables (each part 16-byte aligned), one zeroing for the counters: the
    # host time of allocations is most of an eager layer's routing
    up = lambda n: -(-n // 4) * 4   # noqa: E731
    n_key, nb = max(N, 1), max(NB, 1)
    o_key = up(2 * G + 1)
    o_grp = o_key + up(n_key)
    o_perm = o_grp + up(2 * G)
    o_blk = o_perm + up(n_key)
    buf = torch.empty(o_blk + 4 * nb, dtype=torch.int32, device=dev)
    work = buf[:2 * G + 1]
    work.zero_()
    counts, cursor, nblk = work[:G], work[G:2 * G], work[2 * G:]
    key = buf[o_key:o_key + n_key]
    grp_start, blk_first = buf[o_grp:o_grp + G], buf[o_grp + G:o_grp + 2 * G]
    perm = buf[o_perm:o_perm + n_key]
    blk = buf[o_blk:].view(4, nb)
    blk_start, blk_len, blk_slot, blk_exp = blk[0], blk[1], blk[2], blk[3]
    if N == 0:
        blk_slot.fill_(-1)
        return (perm, blk_start, blk_len, blk_slot, blk_exp), 0, nblk
    B = 256
    _route_count((-(-N // B),), (token_index, local_expert, token_slots, key, counts, N, num_slots),
                 dict(BLOCK=B))
    _route_scan((1,), (counts, grp_start, blk_first, blk_slot, nblk, G, NB),
                dict(BM=block_m, BLOCK_G=_next_pow2(G), BLOCK_NB=1024))
    _route_place((-(-N // B),), (key, grp_start, cursor, perm, N), dict(BLOCK=B))
    _route_fill((G,), (counts, grp_start, blk_first, blk_start, blk_len, blk_slot, blk_exp, num_slots),
                dict(BM=block_m))
    return (perm, blk_start, blk_len, blk_slot, blk_exp), NB, nblk


_route_count = _Launcher(_route_count_kernel)
_route_scan = _Launcher(_route_scan_kernel)
_route_place = _Launcher(_route_place_kernel)
_route_fill = _Launcher(_route_blocks_kernel)

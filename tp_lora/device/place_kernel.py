"""The placement kernel (device/place.py): one launch copies, casts and value-checks a chunk's groups.

Its own module so that Triton is imported only when a placement first needs it (see ``place._kernel``).
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["tile0", "slot"])
def place_kernel(src, dst, tab, tile_group, peaks, tile0, slot, CHECK: tl.constexpr, BLOCK: tl.constexpr,
                 RNE_BF16: tl.constexpr):
    """Program ``t``: elements [k * BLOCK, (k + 1) * BLOCK) of its group ``g = tile_group[tile0 + t]``
    (``k``: the tile's index in its group). ``slot`` and ``tile0`` are not specialised on: one binary
    per (stored dtype, pool dtype, CHECK), compiled ahead of the first load (``Placer.warm_up``).

    Group element ``e`` (source ``src[src_off + e]``, packed ``[count, r, c]``) goes to
    ``dst[dst_base + slot * dst_slot_stride + (e // (r c)) s0 + (e // c % r) s1 + e % c]``.

    ``RNE_BF16`` (the interpreter only, float32 / float16 into bfloat16): round to nearest even by integer
    arithmetic, as torch and the GPU's ``cvt.rn`` do (the interpreter's cast truncates)."""
    t = tl.program_id(0)
    g = tl.load(tile_group + tile0 + t)
    row = tab + g.to(tl.int64) * 10
    src_off = tl.load(row)
    base = tl.load(row + 1) + slot * tl.load(row + 2)
    n = tl.load(row + 3)
    c = tl.load(row + 4)
    r = tl.load(row + 5)
    s0 = tl.load(row + 6)
    s1 = tl.load(row + 7)
    k = t - tl.load(row + 8)
    e = k * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = e < n
    x = tl.load(src + src_off + e, mask=m, other=0.0)
    if (s1 == c) & (s0 == r * c):  # the group's destination is contiguous: one run
        off = e
    else:
        rows = e // c
        blk = rows // r
        off = blk * s0 + (rows - blk * r) * s1 + (e - rows * c)
    if RNE_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)  # exact from F16 / F32
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), float("nan"))
    else:
        y = x.to(dst.dtype.element_ty)
    tl.store(dst + base + off, y, mask=m)
    if CHECK:
        a = tl.abs(x.to(tl.float32))
        a = tl.where(a == a, a, float("inf"))  # NaN counts as inf: bad whatever the limit
        a = tl.where(m, a, 0.0)
        tl.atomic_max(peaks + tl.load(row + 9), tl.max(a, axis=0))

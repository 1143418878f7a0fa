"""Digest of the fused kernel's PTX for a few specialisations, compiled ahead of time for sm_90 on any
machine (no GPU needed: Triton compiles for a named target). Two versions of the kernel source whose
digests agree generate the same instructions (debug labels and line info left out), so a refactor that
keeps them costs nothing on the GPU.

Usage: ``PYTHONPATH=. python3 scripts/ptx_digest.py [OUT]`` (prints one line per specialisation: dtype,
chunks, prefetch, expert, rank tile, records, hoist, rows per block, SHA-1 of the normalised PTX body, its length).
"""

from __future__ import annotations

import hashlib
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tp_lora.ops import triton_kernels as K

# (chunks, prefetch, expert op, rank tile, N tile, warps, records, hoist, rows per block): dense q / down
# shapes (blocks from their records or the tables), the expert op (16- and 64-row blocks), no prefetch
SPECS = [(16, True, False, 64, 256, 8, True, True, 16), (14, True, False, 16, 256, 8, True, True, 16),
         (14, True, False, 16, 256, 8, False, False, 16), (1, True, True, 16, 256, 4, False, True, 16),
         (1, True, True, 64, 128, 4, False, True, 64), (16, False, False, 64, 256, 8, False, True, 16)]


def _normalised_body(ptx: str) -> str:
    body = ptx.split(".visible", 1)[1].split("\n}\n", 1)[0]
    keep = [re.sub(r"\$L__tmp\d+", "TMP", line) for line in body.split("\n")
            if not line.strip().startswith((".loc", ".file", "//")) and not re.fullmatch(r"\$L__tmp\d+:", line.strip())]
    return "\n".join(keep)


def digests() -> list[str]:
    fn = K._fused_kernel
    names = list(fn.arg_names)
    out = []
    for dt in ("bf16", "fp32"):
        ptrs = {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "b_ptr": "*" + dt, "sc_ptr": "*fp32", "out_ptr": "*" + dt,
                "p_ptr": "*fp32"}
        for ch, pre, exp, rt, bn, warps, rec, hoist, bm in SPECS:
            consts = dict(CH=ch, REC=K.REC_INTS if rec else 0, HOIST=hoist, PREFETCH=pre, HAS_EXPERT=exp,
                          IEEE=dt == "fp32", UPCAST=False, CDT=tl.bfloat16 if dt == "bf16" else tl.float32,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, RT=rt, WAIT=False)
            sig = {n: "constexpr" if n in consts else ptrs.get(n, "*i32" if n.endswith("_ptr") else "i32")
                   for n in names}
            cx = {(names.index(n),): v for n, v in consts.items()}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=3))
            body = _normalised_body(k.asm["ptx"])
            out.append(f"{dt} {ch} {pre} {exp} {rt} rec={rec} hoist={hoist} bm={bm} "
                       f"{hashlib.sha1(body.encode()).hexdigest()} {len(body)}")
    return out


if __name__ == "__main__":
    lines = digests()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

"""Registers, stack (spills) and shared memory of the fused kernel's specialisations, compiled ahead of time
for sm_90 on any machine (no GPU needed: Triton compiles for a named target and ships ``cuobjdump``). Used to
screen tiles before spending GPU time on them (a compile that spills registers to the stack is a lead, not
a verdict: the rank-64 decode tiles spill 600 bytes, and the spill-free ones timed no faster, docs/KERNELS.md).

Usage: ``PYTHONPATH=. python3 scripts/kernel_regs.py SPEC [SPEC ...]``, SPEC =
``dtype,chunks,rank_tile,block_n,block_k,warps,stages,prefetch[,block_m]`` (dtype bf16 / fp32; prefetch 0 /
1; block_m 16 unless given), e.g. ``bf16,16,64,256,128,8,4,1``. Prints per SPEC
``(registers a thread, stack bytes a thread, shared bytes)``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tp_lora.ops import triton_kernels as K


def resources(dt: str, ch: int, rt: int, bn: int, bk: int, warps: int, stages: int, prefetch: bool,
              bm: int = 16) -> tuple[int, int, int]:
    """(registers, stack bytes, shared bytes) of the dense fused kernel (tables, no records) for sm_90."""
    fn = K._fused_kernel
    names = list(fn.arg_names)
    ptrs = {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "b_ptr": "*" + dt, "sc_ptr": "*fp32", "out_ptr": "*" + dt,
            "p_ptr": "*fp32"}
    consts = dict(CH=ch, REC=0, HOIST=False, PREFETCH=prefetch, HAS_EXPERT=False, IEEE=dt == "fp32",
                  UPCAST=False, CDT=tl.bfloat16 if dt == "bf16" else tl.float32, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, RT=rt, WAIT=False)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in names}
    cx = {(names.index(n),): v for n, v in consts.items()}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {res.stdout[-300:]}")
    return int(m.group(1)), int(m.group(2)), int(k.metadata.shared)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for spec in sys.argv[1:]:
        dt, ch, rt, bn, bk, w, st, pre, *bm = spec.split(",")
        r = resources(dt, int(ch), int(rt), int(bn), int(bk), int(w), int(st), pre == "1",
                      int(bm[0]) if bm else 16)
        print(spec, r, flush=True)


if __name__ == "__main__":
    main()

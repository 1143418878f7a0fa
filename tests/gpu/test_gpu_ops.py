"""LoRAOps on CUDA with a bf16 pool vs the float64 per-token reference of tests/test_ops.py.

Same checks as the CPU tests (mixed slots, -1 tokens, empty requests, vocab-parallel embedding with
out-of-shard tokens, routed expert rows, untouched no-adapter rows), run on the GPU. Skipped without CUDA.

Tolerance. The reference is computed in float64 from the values the GPU actually holds (the bf16 pool
entries and the bf16 activations, read back), so storage rounding is not error; what remains is the
rounding inside the op. bf16 has 8 significant bits, unit roundoff u = 2**-8. With bf16 activations the
op rounds (1) x @ A^T to bf16 (fp32 accumulation inside the GEMM, negligible), (2) the product with B^T,
(3) the scaling to bf16 and (4) the product with it, and (5) out + delta. Each step adds at most u times the
magnitude of what it rounds, and every intermediate is bounded by
``mag = |out| + |s| * |B| @ (|A| @ |x|)`` (elementwise), so |error| <= 5u * mag to first order. We allow
8u * mag = 2**-5 * mag per element: room for second-order terms, far below the O(mag) error of a wrong
slot, scaling, expert or row. With float32 activations the pool is upcast and only the GEMMs round; we
allow 8 * 2**-11 * mag, which holds even if TF32 (10-bit mantissa, u = 2**-11) is enabled for matmuls.
"""

from __future__ import annotations

import pytest
import torch

from test_ops import DENSE, MOE, QWEN2_MOE, check_dense_ops, check_embedding, check_expert_ops

from tp_lora.plan.parallel import ParallelSpec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU op checks)")]

U_BF16 = 2.0 ** -8
U_TF32 = 2.0 ** -11


def tol_bf16(ref: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    return 8 * U_BF16 * mag


def tol_fp32_act(ref: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    return 8 * U_TF32 * mag


ACT = [(torch.bfloat16, tol_bf16), (torch.float32, tol_fp32_act)]
ACT_IDS = ["bf16-act", "fp32-act"]


@pytest.mark.parametrize("act,tol", ACT, ids=ACT_IDS)
@pytest.mark.parametrize("spec,tp,rank,ep", [(DENSE, 2, 1, 1), (MOE, 4, 3, 2), (QWEN2_MOE, 2, 0, 1)],
                         ids=["dense-tp2", "moe-tp4-ep2", "qwen2moe-tp2"])
def test_gpu_column_and_row(spec, tp, rank, ep, act, tol) -> None:
    check_dense_ops(spec, ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep), device="cuda",
                    pool_dtype=torch.bfloat16, act_dtype=act, tol=tol)


@pytest.mark.parametrize("act,tol", ACT, ids=ACT_IDS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gpu_embedding(tp, act, tol) -> None:
    check_embedding(DENSE, tp, device="cuda", pool_dtype=torch.bfloat16, act_dtype=act, tol=tol)


@pytest.mark.parametrize("act,tol", ACT, ids=ACT_IDS)
@pytest.mark.parametrize("tp,rank,ep", [(1, 0, 1), (2, 1, 2), (4, 2, 2)], ids=["tp1", "tp2-ep2", "tp4-ep2"])
def test_gpu_experts(tp, rank, ep, act, tol) -> None:
    check_expert_ops(MOE, ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep), device="cuda",
                     pool_dtype=torch.bfloat16, act_dtype=act, tol=tol)

"""Probe: run one op case a few times so that Nsight Compute can profile its kernels (not a benchmark).

``python3 scripts/probe_ncu.py CASE`` with CASE ``module:rank:adapters:tokens`` (module q / down / moe),
e.g. ``ncu --clock-control none --kernel-name regex:_shrink --launch-skip 3 --launch-count 1 python3
scripts/probe_ncu.py q:16:8:2048``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
spec_ = importlib.util.spec_from_file_location("bench_ops", ROOT / "scripts" / "bench_ops.py")
bo = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(bo)

from tp_lora.device.pool import GpuPool  # noqa: E402
from tp_lora.ops.layer import LoRAOps  # noqa: E402
from tp_lora.ops.triton_backend import TritonBackend  # noqa: E402
from tp_lora.plan.model import ModelSpec  # noqa: E402
from tp_lora.plan.parallel import ParallelSpec  # noqa: E402


def main() -> None:
    module, kind, adapters, T = sys.argv[1].split(":")
    adapters, T = int(adapters), int(T)
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    dev = torch.device("cuda")
    ranks, mr = bo.rank_list(kind)
    rng = random.Random(0)
    if module == "moe":
        mspec = dataclasses.replace(ModelSpec.from_preset("qwen3-30b-a3b"), num_hidden_layers=1)
        pool = GpuPool(mspec, ParallelSpec(), max_loras=bo.SLOTS, max_rank=mr,
                       modules=("experts.w1", "experts.w3", "experts.w2"), dtype=bo.DT, device=dev)
        bo.fill_pool(pool, ranks, seed=2)
        batch = bo.make_batch(T, adapters, ranks, dev, rng)
        E, k, h, im = mspec.num_experts, mspec.num_experts_per_tok, mspec.hidden_size, mspec.moe_intermediate_size
        top_e = torch.topk(torch.randn(T, E, device=dev), k, dim=-1).indices.flatten()
        order = torch.argsort(top_e, stable=True)
        tok, exp = order // k, top_e[order]
        n = tok.numel()
        x = torch.randn(n, h, device=dev, dtype=bo.DT)
        out = torch.randn(n, im, device=dev, dtype=bo.DT)
        ops = LoRAOps(pool, batch, TritonBackend(max_tokens=T))
        r = ops.expert_routing(tok, exp)

        def op() -> None:
            ops.experts_column(0, "experts.w1", x, r, out)
    else:
        spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=1)
        pool = GpuPool(spec, ParallelSpec(), max_loras=bo.SLOTS, max_rank=mr, modules=("q", "down"),
                       dtype=bo.DT, device=dev)
        bo.fill_pool(pool, ranks, seed=1)
        batch = bo.make_batch(T, adapters, ranks, dev, rng)
        K_, N = (4096, 4096) if module == "q" else (14336, 4096)
        x = torch.randn(T, K_, device=dev, dtype=bo.DT)
        out = torch.randn(T, N, device=dev, dtype=bo.DT)
        W = torch.randn(N, K_, device=dev, dtype=bo.DT) * 0.02
        ops = LoRAOps(pool, batch, TritonBackend(max_tokens=T))

        def op() -> None:
            torch.matmul(x, W.t(), out=out)
            ops.column(0, module, x, out)
    for _ in range(calls):
        op()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

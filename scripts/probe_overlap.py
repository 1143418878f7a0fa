"""Probe: the LoRA delta on a second stream beside the base matmul (graph branches), then one add, against
the module run serially (base matmul, then the delta added into its out), per module in an L-layer CUDA
graph, as ``bench_ops.py``'s ``module_step_s``.

Per case (us per module): base alone, serial module, overlapped module (side stream: zero a scratch, delta
into it; main: base matmul; join; out += scratch), overlapped without the zeroing (the cost a write-mode
delta would have), and the marginal costs over the base. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_ops as bo  # noqa: E402
from tp_lora.device.pool import GpuPool  # noqa: E402
from tp_lora.ops.layer import LoRAOps  # noqa: E402
from tp_lora.ops.triton_backend import TritonBackend  # noqa: E402
from tp_lora.plan.model import ModelSpec  # noqa: E402
from tp_lora.plan.parallel import ParallelSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    L, DT = args.layers, bo.DT
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=L)
    rng = random.Random(0)
    side = torch.cuda.Stream()
    res = []
    for kind in ("16", "64"):
        ranks, max_rank = bo.rank_list(kind)
        pool = GpuPool(spec, ParallelSpec(), max_loras=bo.SLOTS, max_rank=max_rank, modules=("q", "down"),
                       dtype=DT, device=dev)
        bo.fill_pool(pool, ranks, seed=1)
        for module, (Kd, N) in (("q", (4096, 4096)), ("down", (14336, 4096))):
            Ws = [torch.randn(N, Kd, device=dev, dtype=DT) * 0.02 for _ in range(L)]
            for T in (32, 256, 2048):
                for adapters in (1, 8):
                    batch = bo.make_batch(T, adapters, ranks, dev, rng)
                    ops = LoRAOps(pool, batch, TritonBackend(max_tokens=T))
                    xs = [torch.randn(T, Kd, device=dev, dtype=DT) for _ in range(L)]
                    os_ = [torch.empty(T, N, device=dev, dtype=DT) for _ in range(L)]
                    ts = [torch.zeros(T, N, device=dev, dtype=DT) for _ in range(L)]

                    def serial(l):
                        torch.matmul(xs[l], Ws[l].t(), out=os_[l])
                        ops.column(l, module, xs[l], os_[l])

                    def overlap(l, zero=True):
                        main_s = torch.cuda.current_stream()
                        side.wait_stream(main_s)
                        with torch.cuda.stream(side):
                            if zero:
                                ts[l].zero_()
                            ops.column(l, module, xs[l], ts[l])
                        torch.matmul(xs[l], Ws[l].t(), out=os_[l])
                        main_s.wait_stream(side)
                        os_[l].add_(ts[l])

                    serial(0)
                    ref = os_[0].clone()
                    overlap(0)
                    torch.cuda.synchronize()
                    rel = float((os_[0].float() - ref.float()).norm() / ref.float().norm())
                    g = dict(base=bo.step([lambda l=l: torch.matmul(xs[l], Ws[l].t(), out=os_[l])
                                           for l in range(L)]),
                             serial=bo.step([lambda l=l: serial(l) for l in range(L)]),
                             overlap=bo.step([lambda l=l: overlap(l) for l in range(L)]),
                             overlap_nozero=bo.step([lambda l=l: overlap(l, False) for l in range(L)]))
                    samples = {k: [] for k in g}
                    for _ in range(3):
                        for k, fn in g.items():
                            samples[k].append(bo.bench(fn, rep_ms=100) / L)
                    t = {k: sorted(v)[1] for k, v in samples.items()}
                    row = dict(module=module, rank=kind, adapters=adapters, tokens=T, rel=rel,
                               **{k + "_s": v for k, v in t.items()})
                    for k in ("serial", "overlap", "overlap_nozero"):
                        row[k + "_marginal_over_base"] = (t[k] - t["base"]) / t["base"]
                    res.append(row)
                    print(f"{module:5} r{kind:3} a{adapters:<2} T{T:<5} base {t['base']*1e6:6.1f} "
                          f"serial {t['serial']*1e6:6.1f} overlap {t['overlap']*1e6:6.1f} "
                          f"nozero {t['overlap_nozero']*1e6:6.1f} | marginal serial "
                          f"{row['serial_marginal_over_base']:.3f} overlap {row['overlap_marginal_over_base']:.3f} "
                          f"nozero {row['overlap_nozero_marginal_over_base']:.3f} rel {rel:.1e}", flush=True)
                    del xs, os_, ts, g
        del pool
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                              layers=L, rows=res), indent=1))


if __name__ == "__main__":
    main()

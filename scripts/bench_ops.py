"""Benchmark of the LoRA layer ops on one GPU: Triton backend vs the base layer, the torch path and SGLang.

Dense cases (Llama-3-8B shapes: q_proj 4096->4096, down_proj 14336->4096): tokens 32 / 256 / 2048, ranks
16 / 64 and a mixed-rank pool (half the adapters r16, half r64, max rank 64), 1 / 8 / 32 adapters in the
batch, a pool of 32 slots, bf16. Per case, medians (``triton.testing.do_bench``) in seconds:

* ``base_s`` / ``base_graph_s``: the base linear ``x @ W^T`` eagerly / replayed from a CUDA graph;
* ``ours_s`` / ``ours_graph_s``: ``LoRAOps.column`` with the Triton backend (eager metadata / static
  metadata, replayed from a CUDA graph);
* ``torch_path_s``: the same op through ``TorchBackend`` (the torch path);
* ``torch_path_graph_s`` / ``sglang_graph_s``: the same two, replayed from a CUDA graph (dense only);
* ``sglang_s``: SGLang's chunked SGMV shrink + expand Triton kernels (from the sglang wheel, loaded here with
  stand-ins for the two names they import; never a dependency), same pool buffers, their chunk-size rule;
* ``lora_over_base`` = ours_s / base_s, ``graph_over_base`` = ours_graph_s / base_graph_s.
* ``ours_host_s`` / ``base_host_s``: host time per eager call (launches only, ``host_time``): what an eager
  engine's CPU spends per op; ``ours_s`` is bound by it wherever it exceeds the kernel's device time.
* ``base_step_s`` / ``ours_step_s``: per module in a captured decode step: ONE CUDA graph holding
  ``layers_in_step`` layers' worth of the op (each layer its own base weight, its own pool layer of LoRA
  factors, its own x and out, so nothing is reused from L2 across layers), replayed and timed like the
  others, divided by ``layers_in_step``; ``step_over_base`` = ours_step_s / base_step_s. The one-op graphs
  above each carry the graph-launch floor (~4.3 us here); an engine replays a whole decode step, which pays it
  once.
* ``module_step_s``: the module as an engine runs it, in the same kind of graph: each layer's base matmul
  into its out, then the delta added to that out; measured alternately with ``base_step_s``
  (``MODULE_ROUNDS`` times each, medians). ``module_marginal_over_base`` = (module_step_s - base_step_s) /
  base_step_s: what the delta adds to the module, which is below ``step_over_base`` where the delta's reads
  of x and out hit the L2 the base matmul just filled and its launch overlaps the matmul's tail.

MoE cases (Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, expert intermediate 768): the LoRA of one
layer's experts (w1, w3, w2 over all routed rows, incl. building the (expert, slot) blocks) vs the base
experts' grouped GEMM of the same three projections on the same routing (``torch._grouped_mm`` when it runs,
else a per-expert loop: ``base_kind`` says which); ``torch_path_s`` is the torch path called per expert, as
the reference model calls it.

Usage: ``python3 scripts/bench_ops.py --out docs/bench/ops_h200.json [--sglang-wheel PATH] [--quick]
[--profile FILE] [--sweep FILE [--sweep-group N]] [--host FILE]``. Writes the JSON (and ``OUT.partial`` after every
case, so a run cut short keeps its numbers), a PNG beside it, and prints a table. ``--quick``: 8 adapters,
32 and 2048 tokens, r16 and the mixed pool, MoE r16. ``--profile``: host time per eager call (handle
launches vs ``JITFunction.run``) and torch.profiler tables. ``--sweep``: graphed times of the kernel
configurations of ``SWEEP_GROUPS`` on their cases (plus the graphed-replay floor and the metadata host
time), then stop. ``--host``: host time per eager call at decode, ours beside the base linear's, then stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import random
import sys
import types
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tp_lora.device.pool import GpuPool  # noqa: E402
from tp_lora.ops.layer import LoRAOps, TorchBackend  # noqa: E402
from tp_lora.ops.meta import plan_dense_blocks  # noqa: E402
from tp_lora.ops.triton_backend import TritonBackend  # noqa: E402
from tp_lora.plan.model import ModelSpec  # noqa: E402
from tp_lora.plan.parallel import ParallelSpec  # noqa: E402
from tp_lora.runtime.batch import build_batch  # noqa: E402

SLOTS = 32
DT = torch.bfloat16
MODULE_ROUNDS = 3   # alternations of base_step_s and module_step_s


def bench(fn: Callable[[], Any], rep_ms: int = 60) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=15, rep=rep_ms, return_mode="median")) / 1e3


def graphed(fn: Callable[[], Any]) -> Callable[[], None]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# -- SGLang's kernels, for comparison only -------------------------------------------------------------------
def load_sglang(wheel: str | None) -> Any:
    """SGLang's chunked SGMV shrink/expand modules from its wheel, with stand-ins for the batch-info
    dataclass and the caching decorator they import. None if the wheel is not there."""
    if not wheel or not Path(wheel).exists():
        return None

    @dataclasses.dataclass
    class LoRABatchInfo:   # the fields the two kernels read
        use_cuda_graph: bool
        bs: int
        num_segments: int
        seg_indptr: torch.Tensor
        weight_indices: torch.Tensor
        lora_ranks: torch.Tensor
        scalings: torch.Tensor
        max_len: int
        seg_lens: torch.Tensor | None
        permutation: torch.Tensor

    def cached_triton_kernel(key_fn):   # their decorator caches compiled kernels by key: identity here
        return lambda f: f

    for name in ("sglang", "sglang.srt", "sglang.srt.lora"):
        sys.modules.setdefault(name, types.ModuleType(name))
    utils = types.ModuleType("sglang.srt.lora.utils")
    utils.LoRABatchInfo = LoRABatchInfo
    srt_utils = types.ModuleType("sglang.srt.utils")
    srt_utils.cached_triton_kernel = cached_triton_kernel
    sys.modules["sglang.srt.lora.utils"] = utils
    sys.modules["sglang.srt.utils"] = srt_utils
    mods = types.SimpleNamespace(LoRABatchInfo=LoRABatchInfo)
    with zipfile.ZipFile(wheel) as z:
        for part in ("shrink", "expand"):
            src = z.read(f"sglang/srt/lora/triton_ops/chunked_sgmv_{part}.py").decode()
            spec = importlib.util.spec_from_loader(f"sglang_chunked_{part}", loader=None)
            mod = importlib.util.module_from_spec(spec)
            tmp = Path("/tmp") / f"sglang_chunked_sgmv_{part}.py"   # triton.jit needs a source file
            tmp.write_text(src)
            spec = importlib.util.spec_from_file_location(f"sglang_chunked_{part}", tmp)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            setattr(mods, part, mod)
    return mods


def sglang_chunk(num_tokens: int) -> int:
    """SGLang's chunk-size rule (ChunkedSgmvLoRABackend._determine_chunk_size_for_tokens)."""
    return 128 if num_tokens >= 256 else 32 if num_tokens >= 64 else 16


def sglang_op(sg: Any, pool: GpuPool, batch: Any, module: str, x: torch.Tensor, out: torch.Tensor,
              ranks: torch.Tensor) -> Callable[[], None]:
    chunk = sglang_chunk(batch.num_tokens)
    plan = plan_dense_blocks(batch, chunk)
    dev = x.device
    indptr = torch.zeros(plan.num_blocks + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(plan.blk_len, 0)
    info = sg.LoRABatchInfo(use_cuda_graph=False, bs=plan.num_blocks, num_segments=plan.num_blocks,
                            seg_indptr=indptr.to(dev), weight_indices=plan.blk_slot.to(dev),
                            lora_ranks=ranks.to(dev), scalings=pool.scaling[module][:, 0, 0].contiguous(),
                            max_len=chunk, seg_lens=plan.blk_len.to(dev), permutation=plan.perm.to(dev))
    # their kernels want contiguous [S, R, K] / [S, N, R] factors: a copy of layer 0 (the pool holds the
    # decode-step layers too, so its layer-0 view is strided); the same bytes per slot are read
    A = pool.A[module][:, 0].contiguous()
    B = pool.B[module][:, 0].contiguous()
    N = B.shape[1]
    offsets = torch.tensor([0, N], dtype=torch.int32, device=dev)

    def run() -> None:
        p = sg.shrink.chunked_sgmv_lora_shrink_forward(x, A, info, 1)
        sg.expand.chunked_sgmv_lora_expand_forward(p, B, info, offsets, N, out)
    return run


# -- pools and batches -----------------------------------------------------------------------------------------
def fill_pool(pool: GpuPool, ranks: list[int], seed: int) -> None:
    g = torch.Generator(device=pool.device).manual_seed(seed)
    for m in pool.modules:
        for s, r in enumerate(ranks):
            A, B = pool.A[m][s], pool.B[m][s]
            A[..., :r, :] = (torch.randn(A[..., :r, :].shape, generator=g, device=pool.device) * 0.02).to(DT)
            B[..., :r] = (torch.randn(B[..., :r].shape, generator=g, device=pool.device) * 0.02).to(DT)
        pool.scaling[m].uniform_(0.5, 2.0, generator=g)


def make_batch(T: int, adapters: int, ranks: list[int], dev: torch.device, rng: random.Random) -> Any:
    """32 requests of T/32 tokens (T >= 32), each of one of ``adapters`` slots (all used)."""
    n_req = min(32, T)
    lens = [T // n_req + (1 if i < T % n_req else 0) for i in range(n_req)]
    chosen = rng.sample(range(SLOTS), adapters)
    slots = [chosen[i % adapters] for i in range(n_req)]
    rng.shuffle(slots)
    return build_batch(slots, [f"a{s}" for s in slots], lens, {s: ranks[s] for s in set(slots)}, dev, None)


def rank_list(kind: str) -> tuple[list[int], int]:
    if kind == "mixed":
        return [16 if s % 2 == 0 else 64 for s in range(SLOTS)], 64
    r = int(kind)
    return [r] * SLOTS, r


# -- dense --------------------------------------------------------------------------------------------------------
def step(fns: list[Callable[[], Any]]) -> Callable[[], None]:
    """One CUDA graph replaying ``fns`` (one per layer) in order: a decode step's worth of one op."""
    return graphed(lambda: [f() for f in fns])


def dense_cases(args: argparse.Namespace, sg: Any) -> list[dict]:
    dev = torch.device("cuda")
    L = args.step_layers
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=max(1, L))
    par = ParallelSpec()
    rows = []
    rng = random.Random(0)
    tokens = (32, 2048) if args.quick else (32, 256, 2048)
    for rank_kind in (("16", "mixed") if args.quick else ("16", "64", "mixed")):
        ranks, max_rank = rank_list(rank_kind)
        pool = GpuPool(spec, par, max_loras=SLOTS, max_rank=max_rank, modules=("q", "down"), dtype=DT, device=dev)
        fill_pool(pool, ranks, seed=1)
        rank_t = torch.tensor(ranks, dtype=torch.int32)
        for module, (K, N) in (("q", (4096, 4096)), ("down", (14336, 4096))):
            W = torch.randn(N, K, device=dev, dtype=DT) * 0.02
            Ws = [W] + [torch.randn(N, K, device=dev, dtype=DT) * 0.02 for _ in range(L - 1)]  # a step's layers
            for T in tokens:
                for adapters in ((8,) if args.quick else (1, 8, 32)):
                    if rank_kind == "mixed" and adapters == 1:
                        continue
                    batch = make_batch(T, adapters, ranks, dev, rng)
                    x = torch.randn(T, K, device=dev, dtype=DT)
                    out = torch.randn(T, N, device=dev, dtype=DT)
                    base_out = torch.empty(T, N, device=dev, dtype=DT)
                    base = lambda: torch.matmul(x, W.t(), out=base_out)  # noqa: E731
                    ops = LoRAOps(pool, batch, TritonBackend())
                    ours = lambda: ops.column(0, module, x, out)  # noqa: E731
                    gb = TritonBackend(max_tokens=T)
                    ops_g = LoRAOps(pool, batch, gb)
                    ours_g = graphed(lambda: ops_g.column(0, module, x, out))
                    ops_t = LoRAOps(pool, batch, TorchBackend())
                    torch_path = lambda: ops_t.column(0, module, x, out)  # noqa: E731
                    # exactness on this very case: ours vs the torch path (bf16 bound of docs/KERNELS.md)
                    o1, o2 = out.clone(), out.clone()
                    ops.column(0, module, x, o1)
                    ops_t.column(0, module, x, o2)
                    d1, d2 = (o1.float() - out.float()), (o2.float() - out.float())
                    rel = float((d1 - d2).norm() / d2.norm())
                    # SGLang's exactness on the same pristine out (the benches below add thousands of deltas
                    # into out: a delta added to that in bf16 rounds away, which made every earlier run
                    # report sglang_rel_diff_vs_torch = 1.0)
                    sg_run = rel_sg = None
                    if sg is not None:
                        o3 = out.clone()
                        sg_run = sglang_op(sg, pool, batch, module, x, o3, rank_t)
                        sg_run()
                        rel_sg = float(((o3.float() - out.float()) - d2).norm() / d2.norm())
                    row = dict(kind="dense", module=module, shape=f"{K}->{N}", rank=rank_kind, adapters=adapters,
                               tokens=T, base_s=bench(base), base_graph_s=bench(graphed(base)),
                               ours_s=bench(ours), ours_graph_s=bench(ours_g),
                               torch_path_s=bench(torch_path, rep_ms=40), rel_diff_vs_torch=rel,
                               ours_host_s=host_time(ours, calls=100), base_host_s=host_time(base, calls=100))
                    if sg_run is not None:
                        row["sglang_s"] = bench(sg_run)
                        row["sglang_graph_s"] = bench(graphed(sg_run))
                        row["sglang_rel_diff_vs_torch"] = rel_sg
                    else:
                        row["sglang_s"] = row["sglang_graph_s"] = None
                    row["torch_path_graph_s"] = bench(graphed(torch_path), rep_ms=40)
                    if L > 0:
                        # the decode-step measurement: L layers' worth of the op in one graph
                        xs = [torch.randn(T, K, device=dev, dtype=DT) for _ in range(L)]
                        outs = [torch.randn(T, N, device=dev, dtype=DT) for _ in range(L)]
                        bos = [torch.empty(T, N, device=dev, dtype=DT) for _ in range(L)]
                        base_fns = [lambda l=l: torch.matmul(xs[l], Ws[l].t(), out=bos[l]) for l in range(L)]
                        ours_fns = [lambda l=l: ops_g.column(l, module, xs[l], outs[l]) for l in range(L)]
                        module_fns = [lambda l=l: (torch.matmul(xs[l], Ws[l].t(), out=bos[l]),
                                                   ops_g.column(l, module, xs[l], bos[l])) for l in range(L)]
                        row["layers_in_step"] = L
                        row["ours_step_s"] = bench(step(ours_fns), rep_ms=100) / L
                        # base alone and base + delta (the module) alternately, medians: their difference
                        # is small beside either, so both are sampled in the same stretch of the run
                        g_base, g_module = step(base_fns), step(module_fns)
                        bs, ms = [], []
                        for _ in range(MODULE_ROUNDS):
                            bs.append(bench(g_base, rep_ms=100) / L)
                            ms.append(bench(g_module, rep_ms=100) / L)
                        row["base_step_s"] = sorted(bs)[len(bs) // 2]
                        row["module_step_s"] = sorted(ms)[len(ms) // 2]
                        del xs, outs, bos
                    finish(row)
                    rows.append(row)
                    print_row(row)
                    checkpoint(rows)
        del pool
        torch.cuda.empty_cache()
    return rows


# -- MoE ------------------------------------------------------------------------------------------------------------
def grouped_base(x: torch.Tensor, Ws: list[torch.Tensor], offs: torch.Tensor, counts: list[int]) -> tuple:
    """The three base projections of the experts on rows sorted by expert: grouped GEMM, or a loop."""
    try:
        y = torch._grouped_mm(x, Ws[0].transpose(-2, -1), offs=offs)
        torch.cuda.synchronize()

        def run() -> None:
            g = torch._grouped_mm(x, Ws[0].transpose(-2, -1), offs=offs)
            u = torch._grouped_mm(x, Ws[1].transpose(-2, -1), offs=offs)
            torch._grouped_mm(g, Ws[2].transpose(-2, -1), offs=offs)
            del u
        del y
        return run, "torch._grouped_mm"
    except Exception as e:  # noqa: BLE001 - record and fall back
        print(f"torch._grouped_mm unavailable ({type(e).__name__}: {e}); base = per-expert loop")
        spans = []
        pos = 0
        for c in counts:
            spans.append((pos, pos + c))
            pos += c

        def loop() -> None:
            for j, (a, b) in enumerate(spans):
                if b > a:
                    g = x[a:b] @ Ws[0][j].t()
                    x[a:b] @ Ws[1][j].t()
                    g @ Ws[2][j].t()
        return loop, "per-expert loop"


def moe_cases(args: argparse.Namespace) -> list[dict]:
    dev = torch.device("cuda")
    spec = dataclasses.replace(ModelSpec.from_preset("qwen3-30b-a3b"), num_hidden_layers=1)
    par = ParallelSpec()
    E, k, h, im = spec.num_experts, spec.num_experts_per_tok, spec.hidden_size, spec.moe_intermediate_size
    rows = []
    rng = random.Random(1)
    mods = ("experts.w1", "experts.w3", "experts.w2")
    W1 = torch.randn(E, im, h, device=dev, dtype=DT) * 0.02
    W3 = torch.randn(E, im, h, device=dev, dtype=DT) * 0.02
    W2 = torch.randn(E, h, im, device=dev, dtype=DT) * 0.02
    for rank_kind in (("16",) if args.quick else ("16", "64")):
        ranks, max_rank = rank_list(rank_kind)
        pool = GpuPool(spec, par, max_loras=SLOTS, max_rank=max_rank, modules=mods, dtype=DT, device=dev)
        fill_pool(pool, ranks, seed=2)
        for T in ((32, 2048) if args.quick else (32, 512, 2048)):
            for adapters in ((8,) if args.quick else (1, 8, 32)):
                batch = make_batch(T, adapters, ranks, dev, rng)
                logits = torch.randn(T, E, device=dev)
                top_e = torch.topk(logits, k, dim=-1).indices           # [T, k]
                flat = top_e.flatten()
                order = torch.argsort(flat, stable=True)
                tok = (order // k)                                       # rows sorted by expert
                exp = flat[order]
                counts = torch.bincount(flat, minlength=E)
                offs = torch.cumsum(counts, 0).to(torch.int32)
                N = tok.numel()
                xr = torch.randn(N, h, device=dev, dtype=DT)
                g = torch.randn(N, im, device=dev, dtype=DT)
                u = torch.randn(N, im, device=dev, dtype=DT)
                hid = torch.randn(N, im, device=dev, dtype=DT)
                y = torch.randn(N, h, device=dev, dtype=DT)
                base, base_kind = grouped_base(xr, [W1, W3, W2], offs, counts.tolist())

                def lora(ops: LoRAOps) -> Callable[[], None]:
                    def run() -> None:
                        r = ops.expert_routing(tok, exp)
                        ops.experts_column(0, "experts.w1", xr, r, g)
                        ops.experts_column(0, "experts.w3", xr, r, u)
                        ops.experts_row(0, "experts.w2", hid, r, y)
                    return run
                ops = LoRAOps(pool, batch, TritonBackend())
                ops_g = LoRAOps(pool, batch, TritonBackend(max_tokens=T))
                ops_t = LoRAOps(pool, batch, TorchBackend())
                spans, pos = [], 0
                for c in counts.tolist():
                    spans.append((pos, pos + c))
                    pos += c

                def torch_path() -> None:
                    for e, (a, b) in enumerate(spans):
                        if b > a:
                            ti = tok[a:b]
                            ops_t.expert_column(0, "experts.w1", e, xr[a:b], ti, g[a:b])
                            ops_t.expert_column(0, "experts.w3", e, xr[a:b], ti, u[a:b])
                            ops_t.expert_row(0, "experts.w2", e, hid[a:b], ti, y[a:b])
                # exactness on this case: fused kernels vs the torch path (w1)
                g0 = g.clone()
                g1, g2 = g.clone(), g.clone()
                r1 = ops.expert_routing(tok, exp)
                ops.experts_column(0, "experts.w1", xr, r1, g1)
                ops_t.experts_column(0, "experts.w1", xr, ops_t.expert_routing(tok, exp), g2)
                d2 = g2.float() - g0.float()
                rel = float(((g1.float() - g0.float()) - d2).norm() / d2.norm())
                row = dict(kind="moe", module="experts.w1+w3+w2", shape=f"E{E} top{k} {h}/{im}", rank=rank_kind,
                           adapters=adapters, tokens=T, routed_rows=N, base_kind=base_kind,
                           base_s=bench(base), base_graph_s=bench(graphed(base)), ours_s=bench(lora(ops)),
                           ours_graph_s=bench(graphed(lora(ops_g))),
                           torch_path_s=(bench(torch_path, rep_ms=200) if not args.quick or T <= 32 else None),
                           sglang_s=None, sglang_graph_s=None, torch_path_graph_s=None,
                           rel_diff_vs_torch=rel)
                finish(row)
                rows.append(row)
                print_row(row)
                checkpoint(_CHECKPOINT.get("dense", []) + rows)
        del pool
        torch.cuda.empty_cache()
    return rows


_CHECKPOINT: dict[str, Any] = {}


def checkpoint(rows: list[dict]) -> None:
    """Write the cases measured so far (``--out`` + ``.partial``): a run cut short keeps its numbers."""
    path = _CHECKPOINT.get("path")
    if path is not None:
        path.write_text(json.dumps(dict(meta=_CHECKPOINT.get("meta"), cases=rows), indent=1))


def finish(row: dict) -> None:
    row["lora_over_base"] = row["ours_s"] / row["base_s"]
    row["graph_over_base"] = row["ours_graph_s"] / row["base_graph_s"]
    if row.get("base_step_s"):
        row["step_over_base"] = row["ours_step_s"] / row["base_step_s"]
    if row.get("module_step_s"):
        row["module_marginal_over_base"] = (row["module_step_s"] - row["base_step_s"]) / row["base_step_s"]
    row["speedup_vs_torch_path"] = (row["torch_path_s"] / row["ours_s"]) if row.get("torch_path_s") else None
    row["sglang_over_ours"] = (row["sglang_s"] / row["ours_s"]) if row.get("sglang_s") else None
    row["sglang_graph_over_ours_graph"] = (row["sglang_graph_s"] / row["ours_graph_s"]
                                           if row.get("sglang_graph_s") else None)
    row["graph_speedup_vs_torch_path"] = (row["torch_path_graph_s"] / row["ours_graph_s"]
                                          if row.get("torch_path_graph_s") else None)


HEAD = (f"{'kind':5} {'module':16} {'rank':5} {'ad':>3} {'tokens':>6} {'base us':>8} {'ours us':>8} "
        f"{'ours/base':>9} {'graph/base':>10} {'vs torch':>9} {'sglang us':>9} {'sg/ours':>7} {'rel':>8} "
        f"{'g-torch/g-ours':>14} {'g-sg/g-ours':>11} {'step b us':>9} {'step o us':>9} {'step/base':>9} {'module us':>9} {'marginal':>8}")


def print_row(r: dict) -> None:
    us = lambda v: f"{v * 1e6:8.1f}" if v else f"{'-':>8}"  # noqa: E731
    print(f"{r['kind']:5} {r['module']:16} {r['rank']:5} {r['adapters']:3d} {r['tokens']:6d} {us(r['base_s'])} "
          f"{us(r['ours_s'])} {r['lora_over_base']:9.3f} {r['graph_over_base']:10.3f} "
          f"{(r['speedup_vs_torch_path'] or float('nan')):8.1f}x {us(r.get('sglang_s')):>9} "
          f"{(r['sglang_over_ours'] or float('nan')):7.2f} {r['rel_diff_vs_torch']:8.1e} "
          f"{(r['graph_speedup_vs_torch_path'] or float('nan')):14.1f} "
          f"{(r['sglang_graph_over_ours_graph'] or float('nan')):11.2f} {us(r.get('base_step_s'))} "
          f"{us(r.get('ours_step_s'))} {(r.get('step_over_base') or float('nan')):9.3f} "
          f"{us(r.get('module_step_s')):>9} {r.get('module_marginal_over_base', float('nan')):8.3f}", flush=True)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    for ax, kind in zip(axes, ("dense", "moe")):
        sel = [r for r in rows if r["kind"] == kind]
        labels = [f"{r['module'][:4]} r{r['rank']} a{r['adapters']} T{r['tokens']}" for r in sel]
        xs = range(len(sel))
        ax.bar([i - 0.3 for i in xs], [r["lora_over_base"] for r in sel], 0.2, label="ours eager / base eager")
        ax.bar([i - 0.1 for i in xs], [r["graph_over_base"] for r in sel], 0.2, label="ours graph / base graph")
        if kind == "dense":
            ax.bar([i + 0.1 for i in xs], [(r["sglang_s"] or 0) / r["base_s"] for r in sel], 0.2,
                   label="sglang eager / base eager")
            ax.bar([i + 0.3 for i in xs], [max(r.get("module_marginal_over_base") or 0, 1e-3) for r in sel], 0.2,
                   label="(base + ours) - base, in the step / base")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(f"{kind}: LoRA delta time / base layer time (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def moe_decode_case(dev: torch.device, ranks: list[int], max_rank: int, rng: random.Random) -> tuple:
    """One MoE layer's w1 at decode (Qwen3-30B-A3B: 32 tokens x top-8 over 128 experts, 8 adapters):
    (pool, batch, eager ops, token index, experts, x of the routed rows, out)."""
    spec = dataclasses.replace(ModelSpec.from_preset("qwen3-30b-a3b"), num_hidden_layers=1)
    pool = GpuPool(spec, ParallelSpec(), max_loras=SLOTS, max_rank=max_rank, modules=("experts.w1",), dtype=DT,
                   device=dev)
    fill_pool(pool, ranks, 3)
    batch = make_batch(32, 8, ranks, dev, rng)
    tok = torch.arange(32, device=dev).repeat_interleave(8)
    exp = torch.randint(0, 128, (256,), device=dev)
    xr = torch.randn(256, 2048, device=dev, dtype=DT)
    g = torch.randn(256, 768, device=dev, dtype=DT)
    return pool, batch, LoRAOps(pool, batch, TritonBackend()), tok, exp, xr, g


def profile_host(path: Path) -> None:
    """Where the eager time goes on the host: torch.profiler over a few eager calls of a dense and an MoE
    op, the top CPU entries written to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    dev = torch.device("cuda")
    rng = random.Random(5)
    lines = []
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=1)
    ranks, mr = rank_list("16")
    pool = GpuPool(spec, ParallelSpec(), max_loras=SLOTS, max_rank=mr, modules=("down",), dtype=DT, device=dev)
    fill_pool(pool, ranks, 3)
    batch = make_batch(32, 8, ranks, dev, rng)
    x = torch.randn(32, 14336, device=dev, dtype=DT)
    out = torch.randn(32, 4096, device=dev, dtype=DT)
    ops = LoRAOps(pool, batch, TritonBackend())
    for _ in range(5):
        ops.column(0, "down", x, out)
    torch.cuda.synchronize()
    import time
    t0 = time.perf_counter()
    for _ in range(200):
        ops.column(0, "down", x, out)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    lines.append(f"dense down r16 a8 T32: host time per eager call {(t1 - t0) / 200 * 1e6:.1f} us")
    from tp_lora.ops import triton_kernels as K
    K.DIRECT = False        # the same through JITFunction.run, for comparison
    t0 = time.perf_counter()
    for _ in range(200):
        ops.column(0, "down", x, out)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    K.DIRECT = True
    lines.append(f"  ... launched through JITFunction.run instead: {(t1 - t0) / 200 * 1e6:.1f} us")
    t0 = time.perf_counter()
    for _ in range(200):
        LoRAOps(pool, batch, TritonBackend())
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    lines.append(f"  LoRAOps(pool, batch, TritonBackend()) per batch (eager metadata): {(t1 - t0) / 200 * 1e6:.1f} us")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            ops.column(0, "down", x, out)
        torch.cuda.synchronize()
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    del pool
    pool, batch, ops, tok, exp, xr, g = moe_decode_case(dev, ranks, mr, rng)
    run = lambda: ops.experts_column(0, "experts.w1", xr, ops.expert_routing(tok, exp), g)  # noqa: E731
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        run()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    lines.append(f"moe w1 r16 a8 T32: host time per eager call {(t1 - t0) / 100 * 1e6:.1f} us")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14))
    path.write_text("\n".join(lines))
    print("\n".join(lines[:4] + [l for l in lines if l.startswith("moe")]))


def host_time(fn: Callable[[], Any], calls: int = 300) -> float:
    """Seconds of host time per call of ``fn`` (launches only: the GPU is synchronised before, never during;
    what an eager engine's CPU spends per op, whatever the GPU's own time)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    import time
    for _ in range(3):        # best of 3 rounds: the host's scheduling noise only ever adds
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
        torch.cuda.synchronize()
    return best


def host_cases(path: Path) -> None:
    """``--host``: host time per eager call at decode (32 tokens) of the dense op (q, down; r16 with 1 / 8
    / 32 adapters, the mixed pool with 8) and the expert op (MoE w1, r16, 8 adapters, routing built per
    call as an engine does per layer), beside the base linear's (``torch.matmul(out=)``) and the same op
    through ``JITFunction.run`` (``TP_LORA_TRITON_DIRECT=0``'s path). Table + JSON to ``path``."""
    from tp_lora.ops import triton_kernels as K
    dev = torch.device("cuda")
    rng = random.Random(7)
    rows = []
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=1)
    for rank_kind in ("16", "mixed"):
        ranks, mr = rank_list(rank_kind)
        pool = GpuPool(spec, ParallelSpec(), max_loras=SLOTS, max_rank=mr, modules=("q", "down"), dtype=DT,
                       device=dev)
        fill_pool(pool, ranks, 3)
        for module, (Kd, N) in (("q", (4096, 4096)), ("down", (14336, 4096))):
            W = torch.randn(N, Kd, device=dev, dtype=DT) * 0.02
            x = torch.randn(32, Kd, device=dev, dtype=DT)
            out = torch.randn(32, N, device=dev, dtype=DT)
            bo = torch.empty(32, N, device=dev, dtype=DT)
            base_host = host_time(lambda: torch.matmul(x, W.t(), out=bo))
            for adapters in ((1, 8, 32) if rank_kind == "16" else (8,)):
                batch = make_batch(32, adapters, ranks, dev, rng)
                ops = LoRAOps(pool, batch, TritonBackend())
                ours = host_time(lambda: ops.column(0, module, x, out))
                K.DIRECT = False
                jit = host_time(lambda: ops.column(0, module, x, out), calls=100)
                K.DIRECT = True
                rows.append(dict(kind="dense", module=module, rank=rank_kind, adapters=adapters, tokens=32,
                                 ours_host_s=ours, jit_run_host_s=jit, base_host_s=base_host,
                                 host_over_base=ours / base_host))
        del pool
    ranks, mr = rank_list("16")
    pool, batch, ops, tok, exp, xr, g = moe_decode_case(dev, ranks, mr, rng)
    routing = ops.expert_routing(tok, exp)
    fresh = lambda: ops.experts_column(0, "experts.w1", xr, ops.expert_routing(tok, exp), g)  # noqa: E731
    reuse = lambda: ops.experts_column(0, "experts.w1", xr, routing, g)  # noqa: E731
    rows.append(dict(kind="moe", module="experts.w1", rank="16", adapters=8, tokens=32,
                     ours_host_s=host_time(fresh, calls=100), ours_reused_routing_host_s=host_time(reuse)))
    meta_host = host_time(lambda: LoRAOps(pool, batch, TritonBackend()), calls=100)
    lines = [f"{'kind':5} {'module':10} {'rank':5} {'adapters':>8} | {'ours us':>8} {'jit.run us':>10} "
             f"{'base us':>8} {'ours/base':>9}"]
    for r in rows:
        lines.append(f"{r['kind']:5} {r['module']:10} {r['rank']:5} {r['adapters']:>8} | "
                     f"{r['ours_host_s'] * 1e6:8.1f} {r.get('jit_run_host_s', float('nan')) * 1e6:10.1f} "
                     f"{r.get('base_host_s', float('nan')) * 1e6:8.1f} {r.get('host_over_base', float('nan')):9.2f}")
    lines.append(f"moe, the routing's blocks already built (2nd and 3rd projection of a layer): "
                 f"{rows[-1]['ours_reused_routing_host_s'] * 1e6:.1f} us")
    lines.append(f"LoRAOps(pool, batch, TritonBackend()) per batch (eager metadata, MoE pool): "
                 f"{meta_host * 1e6:.1f} us")
    print("\n".join(lines), flush=True)
    path.write_text(json.dumps(dict(meta=dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), device=torch.cuda.get_device_name(), command=" ".join(sys.argv),
        lora_ops_construction_s=meta_host), cases=rows), indent=1))
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")


# (cases, configurations) groups: dense decode cases with the fused kernel's tuning (their lines "... step":
# per module in a decode-step graph), MoE cases with the expert op's tuning and regimes, dense prefill cases
# with the two-launch tiles. Config keys starting with "_" set module constants of tp_lora.ops.triton_kernels,
# "two." keys TWO_LAUNCH_CONFIG, the others FUSED_CONFIG.
_RED = {"two.reduce": True, "two.p_low": True}   # the shrink sums its K splits; P in the compute dtype
_DECODE_CASES = [("q", "16", 1, 32), ("q", "16", 8, 32), ("q", "16", 32, 32), ("q", "mixed", 8, 32),
                 ("q", "64", 32, 32), ("down", "16", 1, 32), ("down", "16", 8, 32), ("down", "mixed", 32, 32),
                 ("down", "64", 32, 32)]
_PREFILL_CASES = [("q", "16", 1, 2048), ("q", "16", 8, 2048), ("q", "16", 32, 2048), ("q", "mixed", 8, 2048),
                  ("q", "64", 8, 2048), ("down", "16", 8, 2048), ("down", "64", 8, 2048),
                  ("down", "mixed", 32, 2048)]
SWEEP_GROUPS = [
    (_DECODE_CASES,
     [dict(), dict(max_chunks=64), dict(max_chunks=32, chunk_k=128), dict(max_chunks=64, chunk_k=128)]),
    ([("moe", "16", 8, 32), ("moe", "16", 32, 512), ("moe", "64", 8, 512), ("moe", "16", 8, 2048),
      ("moe", "64", 1, 2048), ("moe", "64", 8, 2048)],
     [dict(), dict(_EXPERT_WIDE_BLOCK_M=32), dict(_EXPERT_FUSED_ROWS=1 << 30), dict(expert_stages=4),
      dict(expert_warps=8), dict(expert_block_n=128)]),
    (_PREFILL_CASES,
     [dict(), {**_RED, "two.reduce_unroll": True}, _RED, {**_RED, "two.prefill_splits": 4},
      {**_RED, "two.prefill_splits": 4, "two.shrink_stages": 4},
      {**_RED, "two.prefill_splits": 4, "two.shrink_stages": 4, "two.shrink_rows": 32},
      {**_RED, "two.prefill_splits": 8, "two.shrink_stages": 4},
      {**_RED, "two.prefill_splits": 4, "two.shrink_block_k": (256, 256)}]),
    # 3: the expert op at rank 64: its N tile and prefetch (sm_90 spills)
    ([("moe", "64", 8, 32), ("moe", "64", 8, 512), ("moe", "64", 1, 2048), ("moe", "64", 8, 2048)],
     [dict(), dict(expert_block_n=128), dict(expert_prefetch=False),
      dict(expert_block_n=128, expert_prefetch=False)]),
    # 4: the prefill regime's two launches: the expand a programmatic dependent of the shrink (Hopper PDL, the
    # default) against plain stream order
    (_PREFILL_CASES, [dict(), {"two.pdl": False}]),
    # 5: decode: the fused kernel a programmatic dependent of the kernel before it (waiting before any read;
    # the default) against plain stream order
    (_DECODE_CASES + [("moe", "16", 8, 32)], [dict(), {"pdl": False}]),
    # 6: the prefill shrink's programs per SM (its work items are the grid's first programs since 2026-12-03f):
    # more K splits, sub-blocks, warps, fewer stages (more programs resident); timed against the 4-warp
    # defaults of the day (docs/bench/ops_h200_sweep_2026-12-03f-g6.txt)
    (_PREFILL_CASES,
     [dict(), {"two.prefill_splits": 8}, {"two.shrink_rows": 32}, {"two.shrink_warps": 8},
      {"two.prefill_splits": 8, "two.shrink_stages": 3}, {"two.prefill_splits": 16},
      {"two.shrink_rows": 32, "two.prefill_splits": 8}, {"two.expand_block_n": 256},
      {"two.expand_block_n": 256, "two.expand_warps": 8}]),
    # 7: warps by rank tile (group 6: 8 shrink warps faster at rank tile 16, 8 expand warps at the wide ones;
    # its second configuration is the default since)
    (_PREFILL_CASES,
     [dict(), {"two.shrink_warps": 8, "two.expand_warps_wide": 8},
      {"two.shrink_warps": 8, "two.expand_warps_wide": 8, "two.shrink_rows": 32},
      {"two.shrink_warps": 16, "two.expand_warps_wide": 8},
      {"two.shrink_warps": 8, "two.expand_warps_wide": 8, "two.expand_block_n_wide": 256},
      {"two.shrink_warps": 8, "two.expand_warps_wide": 8, "two.shrink_warps_wide": 8}]),
    # 8: the prefill expand's N tile, narrower than the default 128 (more programs, fewer out bytes each; 256
    # was slower at the wide rank tiles: group 7)
    (_PREFILL_CASES,
     [dict(), {"two.expand_block_n_wide": 64}, {"two.expand_block_n_wide": 64, "two.expand_warps_wide": 4},
      {"two.expand_block_n": 64}, {"two.expand_block_n": 64, "two.expand_block_n_wide": 64}]),
    # 9: the prefill expand walking several N tiles a program (metadata and P read once, the next tile's loads
    # ahead of this tile's store): ncu 2026-12-04b, q at 2048 tokens, 8 adapters: the expand at 0.9-1.35 TB/s,
    # 2-4 programs per SM by registers, every program's loads one dependent chain
    (_PREFILL_CASES,
     [dict(), {"two.expand_tiles": 2}, {"two.expand_tiles": 4}, {"two.expand_tiles": 8},
      {"two.expand_tiles": 4, "two.expand_warps_wide": 4}]),
    # 10: the wide rank tiles' walk (group 9: 4 tiles, 4 warps kept) against its neighbours and the one-tile
    # expand of 2026-12-03f (8 warps)
    (_PREFILL_CASES,
     [dict(), {"two.expand_tiles_wide": 2}, {"two.expand_tiles_wide": 2, "two.expand_warps_wide": 8},
      {"two.expand_tiles_wide": 8}, {"two.expand_tiles_wide": 1, "two.expand_warps_wide": 8}]),
    # 11: the prefill shrink's stages (ncu 2026-12-03f, rank tile 64: 4 stages of 32 KiB leave one program an
    # SM by shared memory, 6% occupancy)
    (_PREFILL_CASES,
     [dict(), {"two.shrink_stages": 3}, {"two.shrink_stages": 2}, {"two.shrink_stages": 2, "two.shrink_warps_wide": 8},
      {"two.shrink_block_k": (256, 64)}]),
    # 12: the prefill shrink's items without the split reduction (ncu 2026-12-04d, q r64 8 adapters: one warp
    # a scheduler, DRAM 27%, the kernel one latency chain: metadata -> rows -> 8 K tiles -> partial store ->
    # arrival -> the last split's sum): the same 128 items as rows x K instead of K splits
    (_PREFILL_CASES,
     [dict(), {"two.prefill_splits": 1, "two.shrink_rows": 16}, {"two.prefill_splits": 2, "two.shrink_rows": 32},
      {"two.prefill_splits": 1, "two.shrink_rows": 32}, {"two.reduce_unroll": True},
      {"two.prefill_splits": 2, "two.shrink_rows": 32, "two.shrink_warps_wide": 8}]),
    # 13: the prefill shrink's K tile of 256 (half the loop's iterations, barriers and address set-ups; group
    # 12's profile: the loop ~44% of the kernel's stall samples, one warp a scheduler issuing every ~8 cycles)
    (_PREFILL_CASES,
     [dict(), {"two.shrink_block_k": (256, 256)}, {"two.shrink_block_k": (256, 256), "two.prefill_splits": 2},
      {"two.shrink_block_k": (256, 256), "two.shrink_warps_wide": 8},
      {"two.shrink_block_k": (256, 256), "two.prefill_splits": 2, "two.shrink_warps_wide": 8}]),
]


def _apply(K: Any, cfg: dict, default: dict, default_two: dict, saved: dict) -> None:
    """Reset the kernels' tuning to the defaults, then set ``cfg`` (see SWEEP_GROUPS)."""
    K.FUSED_CONFIG.clear()
    K.FUSED_CONFIG.update(default)
    K.TWO_LAUNCH_CONFIG.clear()
    K.TWO_LAUNCH_CONFIG.update(default_two)
    for n, v in saved.items():
        setattr(K, n, v)
    for key, v in cfg.items():
        if key.startswith("_"):
            setattr(K, key[1:], v)
        elif key.startswith("two."):
            K.TWO_LAUNCH_CONFIG[key[4:]] = v
        else:
            K.FUSED_CONFIG[key] = v


def _floor() -> list[str]:
    """What a graphed replay of almost nothing costs here (one tiny Triton kernel, one program; and two
    such kernels): the latency floor under every graphed number."""
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(p):
        tl.store(p, tl.load(p) + 1)
    t = torch.zeros(1, device="cuda")
    one = bench(graphed(lambda: _touch[(1,)](t)))
    two = bench(graphed(lambda: (_touch[(1,)](t), _touch[(1,)](t))))
    return [f"floor: graphed replay of 1 tiny kernel {one * 1e6:.1f} us, of 2 dependent ones {two * 1e6:.1f} us"]


def _meta_host(pool: GpuPool, batch: Any) -> list[str]:
    """Host time of the eager and the static metadata per batch (LoRAOps construction)."""
    import time
    lines = []
    for name, mk in (("eager", lambda: TritonBackend()), ("static", None)):
        be = TritonBackend(max_tokens=batch.num_tokens) if mk is None else None
        for _ in range(5):
            LoRAOps(pool, batch, be if be is not None else mk())
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            LoRAOps(pool, batch, be if be is not None else mk())
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        lines.append(f"metadata host time per batch ({name}, {batch.num_tokens} tokens): "
                     f"{(t1 - t0) / 200 * 1e6:.1f} us")
    return lines


def kernel_times(fn: Callable[[], Any], calls: int = 5) -> str:
    """Device time per call of each kernel ``fn`` launches (eager, torch.profiler), "name us, ...": where
    an op's time goes (the shrink or the expand)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    parts = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            parts.append((t / calls, e.key))
    return ", ".join(f"{k.strip('_')[:22]} {t:.1f}" for t, k in sorted(parts, reverse=True)[:4])


def _sweep_table(cases: list, res: dict, steps: dict, ktimes: dict, rels: dict, configs: list) -> list[str]:
    """The printed table of one sweep group: a line per case (graphed us per configuration), the step
    lines, the kernels' times, the worst relative difference from the torch path, the configurations."""
    lines = [f"{'case':24} {'base_g':>7} " + " ".join(f"{'c%d' % i:>7}" for i in range(len(configs)))]
    for name, *_, step_case, base_g in cases:
        lines.append(f"{name:24} {base_g * 1e6:7.1f} " + " ".join(f"{t * 1e6:7.1f}" for t in res[name]))
        if step_case is not None:
            lines.append(f"{name + ' step':24} {step_case[1] * 1e6:7.1f} " +
                         " ".join(f"{t * 1e6:7.1f}" for t in steps[name]))
        for i, kt in enumerate(ktimes[name]):
            lines.append(f"  {name} c{i} kernels (us): {kt}")
    lines.append(f"{'max rel diff vs torch':32} " +
                 " ".join(f"{max(rels[n][i] for n in rels):7.1e}" for i in range(len(configs))))
    return lines + [f"c{i}: {c}" for i, c in enumerate(configs)]


def sweep(path: Path, groups: list[int] | None = None, layers: int = 0, kernels: bool = False) -> None:
    """Graphed time of the ops for each configuration of ``SWEEP_GROUPS`` on its cases; exactness vs the
    torch path per case and configuration; the graphed-replay floor and the metadata host time. With
    ``layers`` > 0 also the per-module time of the dense cases in a decode step of that many layers (one
    graph, distinct weights, factors, x and out per layer; lines ``... step``). ``kernels``: also each
    kernel's device time per call (lines ``... kernels``, eager, torch.profiler). Writes a table to ``path``."""
    from tp_lora.ops import triton_kernels as K
    dev = torch.device("cuda")
    L = max(1, layers)
    spec = dataclasses.replace(ModelSpec.from_preset("llama-3-8b"), num_hidden_layers=L)
    mspec = dataclasses.replace(ModelSpec.from_preset("qwen3-30b-a3b"), num_hidden_layers=1)
    E, k, h, im = mspec.num_experts, mspec.num_experts_per_tok, mspec.hidden_size, mspec.moe_intermediate_size
    default, default_two = dict(K.FUSED_CONFIG), dict(K.TWO_LAUNCH_CONFIG)
    saved = {n: getattr(K, n) for n in ("FUSED_DENSE", "EXPERT_FUSED_ROWS", "FUSED_MAX_RANK",
                                        "EXPERT_WIDE_BLOCK_M", "EXPERT_WIDE_FUSED")}
    pools = {}
    mods = ("experts.w1", "experts.w3", "experts.w2")
    for kind in ("16", "64", "mixed"):
        ranks, mr = rank_list(kind)
        pools[kind] = (GpuPool(spec, ParallelSpec(), max_loras=SLOTS, max_rank=mr, modules=("q", "down"),
                               dtype=DT, device=dev), ranks)
        fill_pool(pools[kind][0], ranks, seed=1)
    ranks16, _ = rank_list("16")
    for kind in ("16", "64"):
        if groups is not None and not any(m == "moe" and k == kind for gi in groups
                                          for m, k, *_ in SWEEP_GROUPS[gi][0]):
            continue
        ranks, mr = rank_list(kind)
        pools["moe" + kind] = (GpuPool(mspec, ParallelSpec(), max_loras=SLOTS, max_rank=mr, modules=mods,
                                       dtype=DT, device=dev), ranks)
        fill_pool(pools["moe" + kind][0], ranks, seed=2)
    rng = random.Random(0)
    lines = _floor()
    lines += _meta_host(pools["16"][0], make_batch(32, 8, ranks16, dev, random.Random(9)))
    lines += _meta_host(pools["16"][0], make_batch(2048, 8, ranks16, dev, random.Random(9)))
    print("\n".join(lines), flush=True)
    for gi, (group_cases, configs) in enumerate(SWEEP_GROUPS):
        if groups is not None and gi not in groups:
            continue
        cases = []
        for module, kind, adapters, T in group_cases:
            if module == "moe":
                pool, ranks = pools["moe" + kind]
                batch = make_batch(T, adapters, ranks, dev, rng)
                top_e = torch.topk(torch.randn(T, E, device=dev), k, dim=-1).indices.flatten()
                order = torch.argsort(top_e, stable=True)
                tok, exp = order // k, top_e[order]
                n = tok.numel()
                xs = (torch.randn(n, h, device=dev, dtype=DT), torch.randn(n, im, device=dev, dtype=DT))
                outs = [torch.randn(n, im, device=dev, dtype=DT), torch.randn(n, im, device=dev, dtype=DT),
                        torch.randn(n, h, device=dev, dtype=DT)]

                def op(ops, outs, xs=xs, tok=tok, exp=exp):
                    r = ops.expert_routing(tok, exp)
                    ops.experts_column(0, "experts.w1", xs[0], r, outs[0])
                    ops.experts_column(0, "experts.w3", xs[0], r, outs[1])
                    ops.experts_row(0, "experts.w2", xs[1], r, outs[2])
                base_g = float("nan")
                step_case = None
            else:
                pool, ranks = pools[kind]
                K_, N = (4096, 4096) if module == "q" else (14336, 4096)
                batch = make_batch(T, adapters, ranks, dev, rng)
                x = torch.randn(T, K_, device=dev, dtype=DT)
                outs = [torch.randn(T, N, device=dev, dtype=DT)]
                W = torch.randn(N, K_, device=dev, dtype=DT) * 0.02
                bo = torch.empty(T, N, device=dev, dtype=DT)
                base_g = bench(graphed(lambda: torch.matmul(x, W.t(), out=bo)))
                step_case = None
                if layers > 0:
                    sx = [torch.randn(T, K_, device=dev, dtype=DT) for _ in range(L)]
                    so = [torch.randn(T, N, device=dev, dtype=DT) for _ in range(L)]
                    Ws = [torch.randn(N, K_, device=dev, dtype=DT) * 0.02 for _ in range(L)]
                    sbo = [torch.empty(T, N, device=dev, dtype=DT) for _ in range(L)]
                    base_step = bench(step([lambda l=l: torch.matmul(sx[l], Ws[l].t(), out=sbo[l])
                                            for l in range(L)]), rep_ms=60) / L
                    del Ws, sbo

                    def step_op(ops, sx=sx, so=so, module=module):
                        return step([lambda l=l: ops.column(l, module, sx[l], so[l]) for l in range(L)])
                    step_case = (step_op, base_step)

                def op(ops, outs, x=x, module=module):
                    ops.column(0, module, x, outs[0])
            ref = [o.clone() for o in outs]
            op(LoRAOps(pool, batch, TorchBackend()), ref)
            cases.append((f"{module} r{kind} a{adapters} T{T}", pool, batch, op, outs, ref, step_case, base_g))
        res = {c[0]: [] for c in cases}
        ktimes = {c[0]: [] for c in cases}
        steps = {c[0]: [] for c in cases if c[6] is not None}
        rels = {c[0]: [] for c in cases}
        for ci, cfg in enumerate(configs):
            _apply(K, cfg, default, default_two, saved)
            for name, pool, batch, op, outs, ref, step_case, _ in cases:
                ops = LoRAOps(pool, batch, TritonBackend(max_tokens=batch.num_tokens))
                got = [o.clone() for o in outs]
                try:
                    op(ops, got)
                except Exception as e:   # a tuning that does not compile here (e.g. shared memory): nan
                    if "OutOfResources" not in type(e).__name__:
                        raise
                    print(f"{name} {cfg}: {e}", flush=True)
                    rels[name].append(float("nan"))
                    res[name].append(float("nan"))
                    ktimes[name].append("out of resources")
                    if step_case is not None:
                        steps[name].append(float("nan"))
                    continue
                rels[name].append(max(float(((g - o).float() - (r - o).float()).norm() / (r - o).float().norm())
                                      for g, o, r in zip(got, outs, ref)))
                work = [o.clone() for o in outs]
                res[name].append(bench(graphed(lambda: op(ops, work)), rep_ms=40))
                if kernels:
                    ktimes[name].append(kernel_times(lambda: op(ops, work)))
                if step_case is not None:
                    steps[name].append(bench(step_case[0](ops), rep_ms=60) / L)
            # the table so far, after every configuration (a run cut short keeps what it measured)
            table = _sweep_table(cases, res, steps, ktimes, rels, configs[:ci + 1])
            path.write_text("\n".join(lines + table))
        _apply(K, {}, default, default_two, saved)
        lines += table
        path.write_text("\n".join(lines))
        print("\n".join(table), flush=True)
    del pools
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/bench/ops_h200.json")
    ap.add_argument("--sglang-wheel", default=None)
    ap.add_argument("--quick", action="store_true", help="a few cases only")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--step-layers", type=int, default=32,
                    help="layers in the decode-step graph of each dense case (0: no step measurement)")
    ap.add_argument("--profile", default=None, help="write a host-side profile to this file first")
    ap.add_argument("--sweep", default=None, help="write a sweep of the fused kernel's tuning to this file, "
                    "then stop")
    ap.add_argument("--sweep-group", type=int, action="append", default=None,
                    help="only this group of SWEEP_GROUPS (0: dense decode, 1: MoE, 2: dense prefill, "
                         "3: the expert op at rank 64, 4: prefill with the expand a programmatic "
                         "dependent (PDL), 5: decode with PDL); repeatable")
    ap.add_argument("--kernel-times", action="store_true",
                    help="with --sweep: also each kernel's device time per call (torch.profiler)")
    ap.add_argument("--host", default=None, help="write host time per eager call (ours, the base linear, "
                    "JITFunction.run) at decode to this JSON (+ .txt), then stop")
    args = ap.parse_args()
    if args.host:
        host_cases(Path(args.host))
        return
    if args.profile:
        profile_host(Path(args.profile))
    if args.sweep:
        sweep(Path(args.sweep), args.sweep_group, args.step_layers, args.kernel_times)
        return
    sg = load_sglang(args.sglang_wheel)
    torch.manual_seed(0)
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _CHECKPOINT.update(path=out.with_name(out.name + ".partial"),
                       meta=dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name()))
    print(HEAD)
    rows += dense_cases(args, sg)
    _CHECKPOINT["dense"] = list(rows)
    if not args.skip_moe:
        rows += moe_cases(args)
    import triton
    from tp_lora.ops import triton_kernels as K
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command=" ".join(sys.argv), sglang=("0.5.10.post1 chunked_sgmv (wheel)" if sg else None),
                dtype="bf16", pool_slots=SLOTS, fused_config=dict(K.FUSED_CONFIG),
                two_launch_config={k: list(v) if isinstance(v, tuple) else v for k, v in K.TWO_LAUNCH_CONFIG.items()},
                expert_regimes=dict(fused_rows=K.EXPERT_FUSED_ROWS, wide_block_m=K.EXPERT_WIDE_BLOCK_M,
                                    wide_fused=K.EXPERT_WIDE_FUSED),
                step_layers=args.step_layers)
    out.write_text(json.dumps(dict(meta=meta, cases=rows), indent=1))
    plot(rows, out.with_suffix(".png"))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""GPU benchmark of the adapter load path: ours vs the hardware peak vs the algorithms in use.

Run on one GPU (a rank of a larger layout is benchmarked alone: the load path has no collective before
activation, so one rank's path is the real per-rank path):

    PYTHONPATH=. python scripts/bench_load.py --out out/bench [--cases all|quick] [--repeats 5]

Prints a table and writes ``bench.json`` (+ ``bench.png`` with matplotlib) into --out. Every number is
the median of --repeats runs measured in this process, beside the peak measured in the same process.

Cases (synthetic PEFT adapters, bf16, real shapes from configs/models):
  llama8b-r16-tp1     Llama-3-8B r=16, q k v o gate up down, TP=1
  llama70b-r64-tp8    Llama-3-70B r=64, rank 0 of TP=8
  qwen3moe-r16-ep8    Qwen3-30B-A3B r=16, attention + all 128 experts, rank 0 of TP=8/EP=8
  llama31-70b-r128-tp1 / -tp8   Llama-3.1-70B r=128, all 7 linear modules (SGLang PR #20876's case)
Baselines (faithful small re-implementations, named as such):
  eager      pin every whole tensor at load on every rank, slice at transfer, per-tensor copies
             (SGLang before PR #20876)
  lazy       pin rank slices at first transfer, pipelined by layer, per-tensor copies (PR #20876)
  pageable   safetensors load_file, then per-tensor .to(device) of each slice
  peft       peft's own load_adapter into a Llama-3-8B-shaped model on the GPU (TP=1), and hotswap
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tp_lora.plan.validate import AdapterSource  # noqa: E402
from tp_lora.runtime.manager import LoRAConfig, LoRAManager  # noqa: E402
from tp_lora.plan.model import ModelSpec  # noqa: E402
from tp_lora.plan.parallel import ParallelSpec  # noqa: E402
from tp_lora.plan.planner import plan_rank  # noqa: E402
from tp_lora.job.synthetic import write_synthetic_adapter  # noqa: E402
from tp_lora.device.transfer import SliceReader  # noqa: E402

DEV = torch.device("cuda", 0)
GB = 1e9

CASES = {
    "llama8b-r16-tp1": dict(preset="llama-3-8b", rank=16, tp=1, ep=1),
    "llama70b-r64-tp8": dict(preset="llama-3-70b", rank=64, tp=8, ep=1),
    "qwen3moe-r16-ep8": dict(preset="qwen3-30b-a3b", rank=16, tp=8, ep=8),
    "llama31-70b-r128-tp1": dict(preset="llama-3.1-70b", rank=128, tp=1, ep=1),
    "llama31-70b-r128-tp8": dict(preset="llama-3.1-70b", rank=128, tp=8, ep=1),
}


def empty_host_cache() -> None:
    """Give cached pinned blocks back, so a 'cold' run really pins."""
    gc.collect()
    for fn in ("_host_emptyCache", "_cuda_emptyHostCache", "_accelerator_emptyHostCache"):
        f = getattr(torch._C, fn, None)
        if f is not None:
            try:
                f()
                return
            except Exception:  # noqa: BLE001
                pass


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def sync() -> None:
    torch.cuda.synchronize(DEV)


# ------------------------------------------------------------------------------------------------
# peak
# ------------------------------------------------------------------------------------------------
def measure_peak(repeats: int) -> dict:
    out = {}
    for size_name, n in (("64MiB", 64 << 20), ("1GiB", 1 << 30)):
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        pinned.random_(0, 255)
        pageable = torch.empty(n, dtype=torch.uint8)
        pageable.random_(0, 255)
        dst = torch.empty(n, dtype=torch.uint8, device=DEV)
        for name, src in (("h2d_pinned", pinned), ("h2d_pageable", pageable)):
            dst.copy_(src, non_blocking=True)
            sync()
            ts = []
            for _ in range(repeats):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                dst.copy_(src, non_blocking=True)
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            out[f"{name}_{size_name}_GBps"] = n / med(ts) / GB
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            p = pageable.pin_memory()
            ts.append(time.perf_counter() - t)
            del p
        out[f"pin_copy_{size_name}_GBps"] = n / med(ts) / GB
        del pinned, pageable, dst
    return out


# ------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------
def make_adapter(root: Path, name: str, c: dict) -> Path:
    # one file per (preset, rank): the TP=1 and TP=8 cases of a model read the same adapter
    p = root / f"{c['preset']}-r{c['rank']}"
    if (p / "adapter_model.safetensors").exists():
        return p
    spec = ModelSpec.from_preset(c["preset"])
    targets = ["q", "k", "v", "o", "experts"] if spec.is_moe else ["q", "k", "v", "o", "gate", "up", "down"]
    torch.manual_seed(0)
    write_synthetic_adapter(p, spec, rank=c["rank"], targets=targets, dtype="bf16", seed=1)
    return p


def page_cache(path: Path) -> None:
    with open(path / "adapter_model.safetensors", "rb") as f:
        while f.read(64 << 20):
            pass


# ------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------
def bench_ours(path: Path, c: dict, repeats: int, chunk_bytes: int, pin_mode: str, read_workers: int = 4,
               pin_workers: int = 1,
               part_bytes: int | None = None) -> dict:
    spec = ModelSpec.from_preset(c["preset"])
    par = ParallelSpec(tp_size=c["tp"], tp_rank=0, ep_size=c["ep"])
    cfg = LoRAConfig(max_loras=1, max_lora_rank=c["rank"], dtype="bfloat16", device="cuda:0",
                     host_cache_bytes=64 << 30, chunk_bytes=chunk_bytes, pin_mode=pin_mode,
                     read_workers=read_workers,
                     pin_workers=pin_workers, part_bytes=part_bytes)
    mgr = LoRAManager(cfg, spec, par)
    plan = mgr.register("a", path)
    mgr.register("b", path)
    nbytes = plan.nbytes
    cold, warm = [], []
    cold_stats = []
    for i in range(repeats):
        # cold: nothing pinned (cache dropped, pinned blocks returned), file in the page cache
        for n in ("a", "b"):
            mgr.cache.evict(n)
        empty_host_cache()
        page_cache(path)
        t = time.perf_counter()
        mgr.activate("a" if i % 2 == 0 else "b")
        cold.append(time.perf_counter() - t)
        cold_stats.append(mgr.stats().load_stats[-1])
    # warm: both cached; alternate so each activation evicts the other from the one slot
    mgr.activate("a")
    mgr.activate("b")
    for i in range(repeats + 1):
        t = time.perf_counter()
        mgr.activate("a" if i % 2 == 0 else "b")
        dt = time.perf_counter() - t
        if i:
            warm.append(dt)
    st = mgr.stats()
    warm_ls = [x for x in st.load_stats if x["warm"]][-repeats:]
    # stages alone
    stages = stage_times(mgr, "a", repeats)
    mgr_part_bytes = mgr.engine.part_bytes
    mgr.close()
    del mgr
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "bytes": nbytes, "full_bytes": plan.full_bytes, "slices": len(plan.ops),
        "chunks": len(plan.chunks(chunk_bytes)),
        "parts": sum(max(1, len(c.parts)) for c in plan.chunks(chunk_bytes, mgr_part_bytes)),
        "cold_s": med(cold), "warm_s": med(warm),
        "warm_GBps": nbytes / med(warm) / GB, "cold_GBps": nbytes / med(cold) / GB,
        "warm_h2d_s": med([x["h2d_s"] for x in warm_ls]),
        "cold_read_s": med([x["read_s"] for x in cold_stats]),
        "cold_alloc_s": med([x["alloc_s"] for x in cold_stats]),
        "cold_wait_s": med([x.get("wait_s", 0.0) for x in cold_stats]),
        "cold_issue_s": med([x.get("issue_s", 0.0) for x in cold_stats]),
        "cold_device_span_s": med([x["h2d_s"] for x in cold_stats]),
        "warm_device_span_s": med([x["h2d_s"] for x in warm_ls]),
        "warm_queued_s": med([x.get("queued_s", 0.0) for x in warm_ls]),
        "warm_enqueue_s": med([x.get("enqueue_s", 0.0) for x in warm_ls]),
        "warm_sync_s": med([x.get("sync_s", 0.0) for x in warm_ls]),
        "warm_total_s": med([x.get("total_s", 0.0) for x in warm_ls]),
        "pinned_bytes": st.pinned_bytes_now, "pinned_planned": st.pinned_planned_now,
        **stages,
    }


def stage_times(mgr: LoRAManager, name: str, repeats: int) -> dict:
    a = mgr._adapters[name]
    plan, header = a.plan, a.header
    chunks = plan.chunks(mgr.engine.chunk_bytes, mgr.engine.part_bytes)
    sizes = [c.nbytes for c in chunks]
    units = [(c, p, i) for i, c in enumerate(chunks) for p in (c.parts or (None,))]
    read, pin = [], []
    for _ in range(repeats):
        page_cache(Path(header.path))
        bufs = [torch.empty(s, dtype=torch.uint8) for s in sizes]
        for b in bufs:
            b.fill_(0)  # fault the pages in: measure reading, not page faults of fresh memory
        rd = SliceReader(header)
        t = time.perf_counter()
        # the same parallelism as the pipeline's readers
        with cf.ThreadPoolExecutor(mgr.config.read_workers) as ex:
            list(ex.map(lambda u: rd.read_part(u[0], u[1], bufs[u[2]]), units))
        read.append(time.perf_counter() - t)
        rd.close()
        del bufs
        empty_host_cache()
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(mgr.config.pin_workers) as ex:  # the pipeline's parallelism
            pb = list(ex.map(mgr.device.alloc_host, sizes))
        pin.append(time.perf_counter() - t)
        del pb
        empty_host_cache()
    return {"stage_read_s": med(read), "stage_pin_s": med(pin)}


# ------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------
def _targets(path: Path, c: dict):
    spec = ModelSpec.from_preset(c["preset"])
    par = ParallelSpec(tp_size=c["tp"], tp_rank=0, ep_size=c["ep"])
    header = AdapterSource.open(path, spec)
    plan = plan_rank(header, spec, par)
    return header, plan


def _dst_buffers(plan) -> dict:
    # destination: one device tensor per slice, bf16 (what a per-tensor engine pool holds)
    return {op.key: torch.empty(op.shape, dtype=torch.bfloat16, device=DEV) for op in plan.ops}


def _slice(t: torch.Tensor, op) -> torch.Tensor:
    r0, r1 = op.rows
    c0, c1, st = op.cols
    return t[r0:r1, c0:c1:st]


def baseline_eager(path: Path, c: dict) -> float:
    """Pin every whole tensor at load (every rank), slice at transfer, per-tensor copies."""
    from safetensors import safe_open

    header, plan = _targets(path, c)
    dst = _dst_buffers(plan)
    empty_host_cache()
    page_cache(path)
    sync()
    t = time.perf_counter()
    pinned = {}
    with safe_open(str(header.weights_path), framework="pt") as f:
        for k in f.keys():
            pinned[k] = f.get_tensor(k).pin_memory()
    for op in plan.ops:
        s = _slice(pinned[op.tensor], op)
        if not s.is_contiguous():
            s = s.contiguous()  # a host copy: what slicing a pinned whole tensor costs
        dst[op.key].copy_(s, non_blocking=True)
    sync()
    dt = time.perf_counter() - t
    del pinned, dst
    return dt


def baseline_lazy(path: Path, c: dict) -> float:
    """Pin rank slices at first transfer, pipelined by layer (n+1 sliced+pinned while n copies),
    per-tensor copies. The pinned slices are kept (they are the pinned host cache that later
    activations reuse), so their pinned memory is not recycled for the next layer."""
    from safetensors import safe_open

    header, plan = _targets(path, c)
    dst = _dst_buffers(plan)
    by_layer: dict[int, list] = {}
    for op in plan.ops:
        by_layer.setdefault(op.layer if op.module not in ("embed", "lm_head") else -1, []).append(op)
    layers = sorted(by_layer)
    empty_host_cache()
    page_cache(path)
    sync()
    t = time.perf_counter()
    with safe_open(str(header.weights_path), framework="pt") as f, cf.ThreadPoolExecutor(1) as ex:
        def prep(layer: int):
            return [(op, _slice_lazy(f, op).pin_memory()) for op in by_layer[layer]]

        cache = []
        fut = ex.submit(prep, layers[0])
        for i, layer in enumerate(layers):
            items = fut.result()
            if i + 1 < len(layers):
                fut = ex.submit(prep, layers[i + 1])
            for op, s in items:
                dst[op.key].copy_(s, non_blocking=True)
            cache.append(items)
    sync()
    dt = time.perf_counter() - t
    del dst, cache
    return dt


def _slice_lazy(f, op) -> torch.Tensor:
    sl = f.get_slice(op.tensor)
    r0, r1 = op.rows
    c0, c1, st = op.cols
    if st == 1:
        return sl[r0:r1, c0:c1]
    return sl[r0:r1, c0:c1][:, ::st].contiguous()


def baseline_pageable(path: Path, c: dict) -> float:
    """safetensors load_file, then per-tensor .to(device) of each slice (pageable memory)."""
    from safetensors.torch import load_file

    header, plan = _targets(path, c)
    dst = _dst_buffers(plan)
    page_cache(path)
    sync()
    t = time.perf_counter()
    sd = load_file(str(header.weights_path))
    for op in plan.ops:
        dst[op.key].copy_(_slice(sd[op.tensor], op).to(DEV))
    sync()
    dt = time.perf_counter() - t
    del sd, dst
    return dt


def baseline_peft(path: Path, repeats: int) -> dict:
    """peft's own load_adapter into a Llama-3-8B-shaped model on the GPU; and hotswap if present."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = ModelSpec.from_preset("llama-3-8b")
    cfg = LlamaConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                      num_key_value_heads=spec.num_key_value_heads, vocab_size=spec.vocab_size,
                      head_dim=spec.head_dim)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=DEV).to(torch.bfloat16)
    page_cache(path)
    t = time.perf_counter()
    pm = PeftModel.from_pretrained(model, str(path), adapter_name="a0")
    sync()
    first = time.perf_counter() - t
    loads = []
    for i in range(repeats):
        page_cache(path)
        sync()
        t = time.perf_counter()
        pm.load_adapter(str(path), adapter_name=f"a{i + 1}")
        sync()
        loads.append(time.perf_counter() - t)
        pm.delete_adapter(f"a{i + 1}")
    hot = []
    try:
        from peft.utils.hotswap import hotswap_adapter

        for _ in range(repeats):
            page_cache(path)
            sync()
            t = time.perf_counter()
            hotswap_adapter(pm, str(path), adapter_name="a0", torch_device="cuda:0")
            sync()
            hot.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001
        hot_err = f"{type(e).__name__}: {e}"
    else:
        hot_err = ""
    del pm, model
    gc.collect()
    torch.cuda.empty_cache()
    return {"peft_first_s": first, "peft_load_adapter_s": med(loads), "peft_hotswap_s": med(hot),
            "peft_hotswap_error": hot_err}


# ------------------------------------------------------------------------------------------------
# overlap: a GEMM loop on the compute stream while a cold load streams on the copy stream
# ------------------------------------------------------------------------------------------------
def bench_overlap(path: Path, c: dict, chunk_bytes: int) -> dict:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)

    def gemms(n: int) -> float:
        sync()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            a @ b
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / 1e3

    gemms(5)
    per = gemms(20) / 20
    spec = ModelSpec.from_preset(c["preset"])
    par = ParallelSpec(tp_size=c["tp"], tp_rank=0, ep_size=c["ep"])
    mgr = LoRAManager(LoRAConfig(max_loras=1, max_lora_rank=c["rank"], dtype="bfloat16", device="cuda:0",
                                 host_cache_bytes=64 << 30, chunk_bytes=chunk_bytes), spec, par)
    mgr.register("a", path)
    empty_host_cache()
    page_cache(path)
    n = 200
    alone = gemms(n)
    sync()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fut = mgr.prefetch("a")
    for _ in range(n):
        a @ b
    e.record()
    fut.result()
    e.synchronize()
    together = s.elapsed_time(e) / 1e3
    load_s = mgr.stats().load_stats[-1]["total_s"]
    mgr.close()
    return {"gemm_ms": per * 1e3, "gemm_loop_alone_s": alone, "gemm_loop_with_load_s": together,
            "slowdown": together / alone - 1, "load_total_s": load_s}


# ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--adapters", default="/tmp/tp_lora_bench_adapters")
    ap.add_argument("--cases", default="all", help="all, or comma-separated case names")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-bytes", type=int, default=64 << 20)
    ap.add_argument("--pin-mode", default="register", choices=["caching", "register"])
    ap.add_argument("--read-workers", type=int, default=4)
    ap.add_argument("--pin-workers", type=int, default=2)
    ap.add_argument("--part-bytes", type=int, default=None)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.adapters)
    root.mkdir(parents=True, exist_ok=True)
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": torch.cuda.get_device_name(DEV),
                 "torch": torch.__version__, "cuda": torch.version.cuda, "argv": sys.argv,
                 "chunk_bytes": args.chunk_bytes, "pin_mode": args.pin_mode, "repeats": args.repeats,
                 "read_workers": args.read_workers, "pin_workers": args.pin_workers,
}
    print(f"# {res['device']} torch {res['torch']} cuda {res['cuda']}", flush=True)
    res["peak"] = measure_peak(args.repeats)
    peak = res["peak"]["h2d_pinned_1GiB_GBps"]
    print("peak", json.dumps(res["peak"]), flush=True)
    res["cases"] = {}
    for name in cases:
        c = CASES[name]
        t = time.perf_counter()
        path = make_adapter(root, name, c)
        gen_s = time.perf_counter() - t
        r = {"case": c, "gen_s": gen_s}
        r["ours"] = bench_ours(path, c, args.repeats, args.chunk_bytes, args.pin_mode, args.read_workers,
                               args.pin_workers, args.part_bytes)
        if not args.no_baselines:
            for bname, fn in (("eager", baseline_eager), ("lazy", baseline_lazy),
                              ("pageable", baseline_pageable)):
                ts = [fn(path, c) for _ in range(max(1, args.repeats // 2))]
                r[bname + "_s"] = med(ts)
        if name == "llama8b-r16-tp1" and not args.no_peft:
            try:
                r["peft"] = baseline_peft(path, max(1, args.repeats // 2))
            except Exception as e:  # noqa: BLE001
                r["peft"] = {"error": f"{type(e).__name__}: {e}"}
        o = r["ours"]
        r["warm_frac_of_peak"] = o["warm_GBps"] / peak
        slowest = max(o["stage_read_s"], o["stage_pin_s"], o["warm_s"])
        r["cold_over_slowest_stage"] = o["cold_s"] / slowest
        res["cases"][name] = r
        print(f"{name}: {json.dumps(r, default=str)}", flush=True)
        (out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
    if "llama31-70b-r128-tp1" in cases or "llama8b-r16-tp1" in cases:
        oc = "llama31-70b-r128-tp1" if "llama31-70b-r128-tp1" in cases else "llama8b-r16-tp1"
        res["overlap"] = bench_overlap(make_adapter(root, oc, CASES[oc]), CASES[oc], args.chunk_bytes)
        res["overlap"]["case"] = oc
    (out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
    print_table(res)
    try:
        plot(res, out / "bench.png")
    except Exception as e:  # noqa: BLE001
        print("plot failed:", e)
    return 0


def print_table(res: dict) -> None:
    peak = res["peak"]["h2d_pinned_1GiB_GBps"]
    print(f"\npeak pinned H2D (1 GiB) {peak:.1f} GB/s; pageable {res['peak']['h2d_pageable_1GiB_GBps']:.1f}; "
          f"pin copy {res['peak']['pin_copy_1GiB_GBps']:.1f}")
    hdr = (f"{'case':<22}{'MiB':>8}{'warm ms':>9}{'%peak':>7}{'cold ms':>9}{'read':>7}{'pin':>7}"
           f"{'cold/slow':>10}{'eager':>8}{'lazy':>8}{'pageable':>9}{'x eager':>8}{'x lazy':>7}")
    print(hdr)
    for name, r in res["cases"].items():
        o = r["ours"]
        e, l, p = (r.get(k, float("nan")) for k in ("eager_s", "lazy_s", "pageable_s"))
        print(f"{name:<22}{o['bytes'] / 2**20:8.1f}{o['warm_s'] * 1e3:9.2f}{r['warm_frac_of_peak']:7.1%}"
              f"{o['cold_s'] * 1e3:9.1f}{o['stage_read_s'] * 1e3:7.1f}{o['stage_pin_s'] * 1e3:7.1f}"
              f"{r['cold_over_slowest_stage']:10.2f}{e * 1e3:8.1f}{l * 1e3:8.1f}{p * 1e3:9.1f}"
              f"{e / o['cold_s']:8.2f}{l / o['cold_s']:7.2f}")
        print(f"   cold: read(sum) {o['cold_read_s'] * 1e3:.1f} alloc {o['cold_alloc_s'] * 1e3:.1f} wait "
              f"{o['cold_wait_s'] * 1e3:.1f} issue {o['cold_issue_s'] * 1e3:.1f} device-span "
              f"{o['cold_device_span_s'] * 1e3:.1f} ms; warm device-span {o['warm_device_span_s'] * 1e3:.2f} ms, "
              f"queued {o['warm_queued_s'] * 1e3:.2f} enqueue {o['warm_enqueue_s'] * 1e3:.2f} sync "
              f"{o['warm_sync_s'] * 1e3:.2f} load-total {o['warm_total_s'] * 1e3:.2f} ms")
        if "peft" in r:
            print(f"   peft: {r['peft']}")
    if "overlap" in res:
        print("overlap:", res["overlap"])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["cases"])
    peak = res["peak"]["h2d_pinned_1GiB_GBps"]
    fig, ax = plt.subplots(figsize=(11, 5))
    series = [("ours warm", lambda r: r["ours"]["bytes"] / r["ours"]["warm_s"]),
              ("ours cold", lambda r: r["ours"]["bytes"] / r["ours"]["cold_s"]),
              ("lazy (PR #20876)", lambda r: r["ours"]["bytes"] / r.get("lazy_s", float("nan"))),
              ("eager (before)", lambda r: r["ours"]["bytes"] / r.get("eager_s", float("nan"))),
              ("pageable", lambda r: r["ours"]["bytes"] / r.get("pageable_s", float("nan")))]
    w = 0.16
    for i, (lab, f) in enumerate(series):
        ax.bar([j + (i - 2) * w for j in range(len(names))], [f(res["cases"][n]) / GB for n in names], w,
               label=lab)
    ax.axhline(peak, color="k", ls="--", label=f"pinned H2D peak {peak:.1f} GB/s")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15)
    ax.set_ylabel("effective GB/s of this rank's slice bytes")
    ax.set_title(f"adapter load, one rank — {res['device']}, torch {res['torch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

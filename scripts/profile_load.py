#!/usr/bin/env python3
"""Profile one cold and one warm activation of a synthetic adapter with torch.profiler (GPU).

    PYTHONPATH=. python scripts/profile_load.py --case qwen3moe-r16-ep8 --out out/profile [--first]

``--first``: the process's first activation too (what it pays that later cold loads do not).

Prints the top operators by self CPU time and by device time, and the copy stream's busy time vs the
wall time (how much of the load is launch-bound); writes a Chrome trace per phase into --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import CASES, empty_host_cache, make_adapter, page_cache  # noqa: E402
from tp_lora.runtime.manager import LoRAConfig, LoRAManager  # noqa: E402
from tp_lora.plan.model import ModelSpec  # noqa: E402
from tp_lora.plan.parallel import ParallelSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="llama8b-r16-tp1")
    ap.add_argument("--out", default="out/profile")
    ap.add_argument("--adapters", default="/tmp/tp_lora_bench_adapters")
    ap.add_argument("--chunk-bytes", type=int, default=64 << 20)
    ap.add_argument("--pin-mode", default="register")
    ap.add_argument("--read-mode", default="auto", choices=["auto", "exact", "span"])
    ap.add_argument("--first", action="store_true", help="also profile the process's first activation")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = CASES[args.case]
    path = make_adapter(Path(args.adapters), args.case, c)
    spec = ModelSpec.from_preset(c["preset"])
    mgr = LoRAManager(LoRAConfig(max_loras=1, max_lora_rank=c["rank"], dtype="bfloat16", device="cuda:0",
                                 host_cache_bytes=64 << 30, chunk_bytes=args.chunk_bytes,
                                 pin_mode=args.pin_mode, read_mode=args.read_mode),
                      spec, ParallelSpec(tp_size=c["tp"], tp_rank=0, ep_size=c["ep"]))
    mgr.register("a", path)
    mgr.register("b", path)
    mgr.engine.wait_prepared()  # pinned memory reserved ahead, as a server would have it
    from torch.profiler import ProfilerActivity, profile

    phases = ("first", "warm", "cold") if args.first else ("warm", "cold")
    if not args.first:
        mgr.activate("a")
        mgr.activate("b")  # both cached now
    for phase in phases:
        if phase == "first":
            page_cache(path)  # the load after it activates "b": both are cached for "warm"
        if phase == "cold":
            mgr.cache.evict("a")
            empty_host_cache()
            page_cache(path)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            mgr.activate("a")
            wall = time.perf_counter() - t
        ls = mgr.stats().load_stats[-1]
        print(f"\n=== {phase}: wall {wall * 1e3:.2f} ms, device span {ls['h2d_s'] * 1e3:.2f} ms, read "
              f"{ls['read_s'] * 1e3:.2f} ms (sum over readers), alloc {ls['alloc_s'] * 1e3:.2f} ms, "
              f"{ls['bytes_copied'] / 2**20:.1f} MiB in {ls['chunks']} chunks, {ls['bytes_read'] / 2**20:.1f} MiB "
              f"read in {ls['syscalls']} syscalls by {ls['readers']} readers")
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=14))
        print(ka.table(sort_by="self_device_time_total", row_limit=8))
        busy = sum(e.self_device_time_total for e in ka) / 1e3
        print(f"{phase}: device busy {busy:.2f} ms of wall {wall * 1e3:.2f} ms")
        prof.export_chrome_trace(str(out / f"trace_{args.case}_{phase}.json"))
        mgr.activate("b")
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

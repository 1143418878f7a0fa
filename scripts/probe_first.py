#!/usr/bin/env python3
"""What a first activation pays that later cold loads do not: two probes of one case (issue 16).

    PYTHONPATH=. python scripts/probe_first.py --case qwen3moe-r16-ep8 --stacks 0.0003 --out out/probe
    PYTHONPATH=. python scripts/probe_first.py --case llama8b-r16-tp1 --idle 1.0

``--stacks S``: every thread's Python stack, dumped every ``S`` seconds by faulthandler's watchdog (a C
thread that needs no GIL) during the first activation and one later cold one, into
``<out>/<case>-{first,cold}.dump``; prints, per dump, the threads that are not idle (a loader waiting
in a read of the header, a pinner thread hashing it...). A dump of ~40 threads takes ~1 ms: the
stacks are an order of events, not a timeline. Diagnosis only: the watchdog reads the other threads'
frames without the GIL, and that can crash the process (on the H200 host it killed all three probe
runs, each after its dumped first activation; on the CPU machine about one run in six).

``--idle S``: cold loads back to back against cold loads after ``S`` seconds of idle (the host's cores
asleep and clocked down, as before a first activation), alternating, medians of ``--repeats`` each.

``--before dma|clock``: right before the first activation, every arena slab copied to the device once
(``dma``: does the first DMA from fresh pinned pages cost the first load?) or 50 ms of bf16 matmuls
(``clock``: the GPU busy and clocked up); ``--no-gc``: Python's garbage collector off.
"""

from __future__ import annotations

import argparse
import faulthandler
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import CASES, TINY_CASES, _manager, make_adapter, page_cache  # noqa: E402

_IDLE = ("thread.py\", line 81 in _worker", "thread.py\", line 89 in _worker", "in _serve")


def busy_stacks(dump: str) -> list[list[str]]:
    """Per faulthandler dump, the top frames of every thread that is not parked (an executor worker
    waiting for work, a reader thread asleep in C)."""
    out = []
    for d in dump.split("Timeout (")[1:]:
        busy = []
        for t in d.split("\nThread ")[1:]:
            frames = [ln.strip() for ln in t.splitlines()[1:] if ln.strip().startswith("File")]
            if not frames or any(x in frames[0] for x in _IDLE):
                continue
            short = [re.sub(r'File ".*/([\w.]+)", line (\d+) in (\w+)', r"\1:\2 \3", f) for f in frames[:4]]
            busy.append(" < ".join(short))
        out.append(sorted(busy))
    return out


def _cold(mgr, path: Path, name: str) -> tuple[float, float]:
    for n in mgr.registered():
        mgr.cache.evict(n)
    page_cache(path)
    t = time.perf_counter()
    mgr.activate(name)
    return time.perf_counter() - t, mgr.stats().load_stats[-1]["total_s"]


def before(mgr, what: str) -> None:
    """``--before``: the arena's slabs read once by the copy engine, or the GPU kept busy for 50 ms."""
    import torch

    if what == "none" or not torch.cuda.is_available():
        return
    t = time.perf_counter()
    if what == "dma":  # every page of every slab read once by the copy engine, into one 8 MiB buffer
        dev = mgr.device.device
        scratch = torch.empty(8 << 20, dtype=torch.uint8, device=dev)
        for slab in mgr.arena._slabs:  # noqa: SLF001 - a probe of the arena's pages
            for off in range(0, slab.size, scratch.numel()):
                n = min(scratch.numel(), slab.size - off)
                scratch[:n].copy_(slab.buf[off:off + n], non_blocking=True)
        torch.cuda.synchronize()
    else:
        a = torch.randn(4096, 4096, device=mgr.device.device, dtype=torch.bfloat16)
        while time.perf_counter() - t < 0.05:
            a @ a
        torch.cuda.synchronize()
    print(f"before the first activation: {what} took {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="llama8b-r16-tp1")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny presets")
    ap.add_argument("--adapters", default="/tmp/tp_lora_bench_adapters")
    ap.add_argument("--out", default="out/probe")
    ap.add_argument("--stacks", type=float, default=0.0, help="dump interval, seconds (0: no stacks)")
    ap.add_argument("--idle", type=float, default=0.0, help="idle pause before every other cold load, s")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--before", choices=["none", "dma", "clock"], default="none",
                    help="what runs right before the first activation (CUDA only)")
    ap.add_argument("--no-gc", action="store_true", help="Python's garbage collector off")
    args = ap.parse_args()
    if args.no_gc:
        import gc

        gc.disable()
    c = (TINY_CASES if args.tiny else CASES)[args.case]
    path = make_adapter(Path(args.adapters), args.case, c)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(chunk_bytes=64 << 20, pin_mode="caching", read_workers=None, pin_workers=2,
                            part_bytes=None, read_mode="auto", placement="auto", read_ahead=None,
                            read_backend="auto")
    mgr = _manager(c, ns)
    mgr.register("a", path)
    mgr.register("b", path)
    mgr.engine.wait_prepared()
    if args.idle:
        time.sleep(args.idle)
    for phase, name in (("first", "a"), ("cold", "b")):
        f = open(out / f"{args.case}-{phase}.dump", "w") if args.stacks else None
        if f is not None:
            faulthandler.dump_traceback_later(args.stacks, repeat=True, file=f)
        if phase == "first":
            page_cache(path)
            before(mgr, args.before)
            t = time.perf_counter()
            mgr.activate(name)
            wall, total = time.perf_counter() - t, mgr.stats().load_stats[-1]["total_s"]
        else:
            wall, total = _cold(mgr, path, name)
        if f is not None:
            faulthandler.cancel_dump_traceback_later()
            f.close()
        print(f"{args.case} {phase}: {wall * 1e3:.2f} ms (load {total * 1e3:.2f} ms)", flush=True)
        if f is not None:
            prev = None
            for k, busy in enumerate(busy_stacks((out / f"{args.case}-{phase}.dump").read_text())):
                if busy != prev:
                    print(f"  [{k}] " + "\n       ".join(busy or ["(all parked)"]))
                prev = busy
    if args.idle:
        runs: dict[str, list[tuple[float, float]]] = {"back to back": [], f"after {args.idle:g} s idle": []}
        keys = list(runs)
        for i in range(2 * args.repeats):
            idle = i % 2 == 1  # ("a" and "b" are the same file)
            if idle:
                time.sleep(args.idle)
            runs[keys[idle]].append(_cold(mgr, path, "a" if i % 2 == 0 else "b"))  # names alternate
        for k, v in runs.items():
            v.sort()
            wall, total = v[len(v) // 2]
            print(f"{args.case} cold {k}: {wall * 1e3:.2f} ms (load {total * 1e3:.2f} ms), median of {len(v)}")
    mgr.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

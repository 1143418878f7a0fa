#!/usr/bin/env python3
"""The cold path's reads alone, side by side in one process (issue 16): where a cold load's read time goes.

    PYTHONPATH=. python scripts/bench_reads.py --out out/reads [--cases llama31-70b-r128-tp8,qwen3moe-r16-ep8]
        [--readers 4,8,16] [--repeats 5]

For each case (the presets of ``bench_load.py``; synthetic adapter files made the same way) and each
reader count: the rank's packed units read by the engine's own readers (``SliceReader.read_part``) with
io_uring batches and with one libc ``preadv`` per read (the same reads: the ring cost model's packing),
and the floor's pattern (the same byte count in contiguous 8 MiB ``preadv`` pieces) without H2D. No
copies to the GPU: the numbers isolate the host side. Also reports the file system, the kernel, and
whether io_uring handed reads to kernel worker threads (``iou-wrk`` threads alive after the reads).
Writes ``reads.json`` into --out and prints a table (ms, medians).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_spec = importlib.util.spec_from_file_location("bench_load", Path(__file__).with_name("bench_load.py"))
BL = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BL)  # type: ignore[union-attr]



def _threads() -> dict:
    names = []
    for p in glob.glob(f"/proc/{os.getpid()}/task/*/comm"):
        try:
            names.append(open(p).read().strip())
        except OSError:
            pass
    return {"iou_wrk": sum(n.startswith("iou-wrk") for n in names), "threads": len(names)}


def floor_reads(path: Path, offset: int, nbytes: int, threads: int, repeats: int, alloc) -> float:
    host = alloc(nbytes)
    host.fill_(0)
    mv = memoryview(host.numpy()).cast("B")
    parts = BL._parts(offset, nbytes, 8 << 20)  # noqa: SLF001
    pool = cf.ThreadPoolExecutor(threads)
    ts = []
    for _ in range(repeats):
        BL.page_cache(path)
        fd = os.open(path / BL.W, os.O_RDONLY)
        t = time.perf_counter()
        list(pool.map(lambda p: os.preadv(fd, [mv[p[1]:p[1] + p[2]]], p[0]), parts))
        ts.append(time.perf_counter() - t)
        os.close(fd)
    pool.shutdown()
    return BL.med(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/reads")
    ap.add_argument("--adapters", default="/tmp/tp_lora_bench_adapters")
    ap.add_argument("--cases", default="llama31-70b-r128-tp8,qwen3moe-r16-ep8")
    ap.add_argument("--readers", default="4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    table = BL.TINY_CASES if args.tiny else BL.CASES
    root = Path(args.adapters)
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "kernel": platform.release(),
                 "python": sys.version.split()[0], "argv": sys.argv, "cases": {}}
    try:
        res["fs"] = subprocess.run(["df", "-T", str(root)], capture_output=True, text=True).stdout.split("\n")[1]
    except (OSError, IndexError):
        pass
    for name in args.cases.split(","):
        c = table[name]
        path = BL.make_adapter(root, name, c)
        r: dict = {}
        for n in [int(x) for x in args.readers.split(",")]:
            ns = argparse.Namespace(chunk_bytes=64 << 20, pin_mode="register", read_workers=n, pin_workers=2,
                                    part_bytes=None, read_mode="auto", placement="auto", read_ahead=None,
                                    read_backend="auto")
            mgr = BL._manager(c, ns)  # noqa: SLF001
            mgr.register("a", path)
            mgr.engine.wait_prepared()
            plan = mgr._adapters["a"].plan  # noqa: SLF001
            r["bytes"] = plan.nbytes
            if mgr.engine.rings is not None:
                r[f"ring_{n}_s"] = BL.reads_only(mgr, path, "a", args.repeats)
                r[f"ring_{n}_threads"] = _threads()
            r[f"preadv_{n}_s"] = BL.reads_only(mgr, path, "a", args.repeats, rings=None)
            data_start = 8 + mgr._adapters["a"].header.header_bytes  # noqa: SLF001
            r[f"floor_{n}_s"] = floor_reads(path, data_start, plan.nbytes, n, args.repeats, mgr.engine.device.alloc_host)
            mgr.close()
            print(name, n, {k: v for k, v in r.items() if k.endswith(f"_{n}_s")}, flush=True)
        res["cases"][name] = r
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reads.json").write_text(json.dumps(res, indent=2))
    print(f"\n{res.get('fs', '?')} | kernel {res['kernel']} | python {res['python']}")
    print(f"{'case':<24}{'readers':>8}{'ring':>9}{'preadv':>9}{'floor':>9}   (ms, reads alone, no H2D)")
    for name, r in res["cases"].items():
        for n in [int(x) for x in args.readers.split(",")]:
            g = lambda k: r.get(k, float("nan")) * 1e3  # noqa: E731
            print(f"{name:<24}{n:>8}{g(f'ring_{n}_s'):9.1f}{g(f'preadv_{n}_s'):9.1f}{g(f'floor_{n}_s'):9.1f}"
                  f"   iou-wrk {r.get(f'ring_{n}_threads', {}).get('iou_wrk', '-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

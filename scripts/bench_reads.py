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
``--join joined,exact``: the io_uring reads with rows closer than ``junk_gap()`` joined into one request
through junk gaps (the default cost model) and with one request per owned range (``join_exact=False``),
each with its bytes read and request count (``ring_{n}_s`` is the first listed variant).
``ring_python_{n}_s``: the default ring reads through the readers' Python loop instead of the C one
(``native_reads=False``, host/native.py).
``--probe 4096,16384,65536``: synthetic reads of one size spread over the file, per thread count, to tell a
per-thread cost (time falls with threads) from a shared one (constant summed over threads).
Writes ``reads.json`` into --out and prints a table (ms, medians).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
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

from tp_lora.plan.packing import read_counts  # noqa: E402



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


def probe(path: Path, threads: list[int], sizes: list[int], nreads: int, repeats: int) -> dict:
    """Synthetic reads of one size at spread offsets of the file, through one io_uring per thread in
    batches of 512 (the readers' submission shape): is a read's cost per thread (scales with threads) or
    shared (constant summed over threads)? Returns {f"{size}_{threads}_s": median wall seconds}."""
    import numpy as np

    from tp_lora.host import uring
    w = path / BL.W
    fsize = w.stat().st_size
    out: dict = {}
    for size in sizes:
        n = max(1, min(nreads, fsize // size))
        stride = fsize // n // 4096 * 4096 or size
        offs = (np.arange(n, dtype=np.uint64) * np.uint64(stride))
        import torch
        buf = torch.empty(n * size, dtype=torch.uint8)
        iov = np.stack([np.uint64(buf.data_ptr()) + np.arange(n, dtype=np.uint64) * np.uint64(size),
                        np.full(n, size, dtype=np.uint64)], axis=1)
        iov = np.ascontiguousarray(iov)
        addr = np.uint64(iov.ctypes.data) + np.uint64(16) * np.arange(n, dtype=np.uint64)
        ones = np.ones(n, dtype=np.uint32)
        for t in threads:
            pool = uring.RingPool()
            ex = cf.ThreadPoolExecutor(t)
            bounds = [(i * n // t, (i + 1) * n // t) for i in range(t)]
            fd = os.open(w, os.O_RDONLY)

            def run(b):
                ring = pool.ring()
                for a in range(b[0], b[1], 512):
                    z = min(b[1], a + 512)
                    ring.readv(fd, addr[a:z], ones[a:z], offs[a:z])

            list(ex.map(run, bounds))  # rings made, pages cached
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(ex.map(run, bounds))
                ts.append(time.perf_counter() - t0)
            os.close(fd)
            ex.shutdown()
            pool.close()
            out[f"{size}_{t}_s"] = BL.med(ts)
            out[f"{size}_{t}_reads"] = n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/reads")
    ap.add_argument("--adapters", default="/tmp/tp_lora_bench_adapters")
    ap.add_argument("--cases", default="llama31-70b-r128-tp8,qwen3moe-r16-ep8")
    ap.add_argument("--readers", default="4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--probe", default="", help="also the synthetic per-read probe on this case's file: "
                    "sizes in bytes, e.g. 4096,16384,65536 (threads from --readers)")
    ap.add_argument("--probe-reads", type=int, default=50000)
    ap.add_argument("--join", default="joined", help="ring cost variants, comma-separated: joined "
                    "(rows joined through junk gaps: the default) and/or exact (one request per owned range)")
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
            ring_cost = mgr.engine.cost
            variants = [v for v in args.join.split(",") if v]
            if mgr.engine.rings is not None:
                for j, v in enumerate(variants):
                    if v not in ("joined", "exact"):
                        raise SystemExit(f"--join: unknown variant {v!r}")
                    mgr.engine.cost = dataclasses.replace(ring_cost, join_exact=v == "joined")
                    mgr.register(v, path)
                    mgr.engine.wait_prepared()
                    cnt = read_counts(mgr.engine.chunks(mgr._adapters[v].plan))  # noqa: SLF001
                    t = BL.reads_only(mgr, path, v, args.repeats)
                    r[f"ring_{v}_{n}_s"], r[f"ring_{v}_bytes_read"], r[f"ring_{v}_requests"] = t, cnt.read, cnt.syscalls
                    if j == 0:
                        r[f"ring_{n}_s"] = t
                        r[f"ring_{n}_threads"] = _threads()
                mgr.engine.cost = ring_cost
            mgr.register("a", path)
            mgr.engine.wait_prepared()
            if mgr.engine.rings is not None and mgr.engine.native is not None:  # the same reads, Python loop
                r[f"ring_python_{n}_s"] = BL.reads_only(mgr, path, "a", args.repeats, native=None)
            mgr.engine.wait_prepared()
            plan = mgr._adapters["a"].plan  # noqa: SLF001
            r["bytes"] = plan.nbytes
            r[f"preadv_{n}_s"] = BL.reads_only(mgr, path, "a", args.repeats, rings=None)
            r["native_reads"] = mgr.engine.native is not None
            data_start = 8 + mgr._adapters["a"].header.header_bytes  # noqa: SLF001
            r[f"floor_{n}_s"] = floor_reads(path, data_start, plan.nbytes, n, args.repeats, mgr.engine.device.alloc_host)
            mgr.close()
            print(name, n, {k: v for k, v in r.items() if k.endswith(f"_{n}_s")}, flush=True)
        if args.probe:
            from tp_lora.host import uring
            if uring.available():
                r["probe"] = probe(path, [int(x) for x in args.readers.split(",")],
                                   [int(x) for x in args.probe.split(",")], args.probe_reads, args.repeats)
                print(name, "probe", r["probe"], flush=True)
        res["cases"][name] = r
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reads.json").write_text(json.dumps(res, indent=2))
    print(f"\n{res.get('fs', '?')} | kernel {res['kernel']} | python {res['python']}")
    print(f"{'case':<24}{'readers':>8}{'ring':>9}{'preadv':>9}{'floor':>9}   (ms, reads alone, no H2D)")
    for name, r in res["cases"].items():
        for n in [int(x) for x in args.readers.split(",")]:
            g = lambda k: r.get(k, float("nan")) * 1e3  # noqa: E731
            var = "".join(f"  {v} {g(f'ring_{v}_{n}_s'):.1f} ({r[f'ring_{v}_requests']} requests, "
                          f"{r[f'ring_{v}_bytes_read'] / max(r['bytes'], 1):.2f}x owned)"
                          for v in ("joined", "exact") if f"ring_{v}_{n}_s" in r)
            print(f"{name:<24}{n:>8}{g(f'ring_{n}_s'):9.1f}{g(f'preadv_{n}_s'):9.1f}{g(f'floor_{n}_s'):9.1f}"
                  f"   iou-wrk {r.get(f'ring_{n}_threads', {}).get('iou_wrk', '-')}"
                  f"  ring, Python loop {g(f'ring_python_{n}_s'):.1f}{var}")
        if "probe" in r:
            pr = r["probe"]
            for k in sorted({k.rsplit("_", 2)[0] for k in pr}, key=int):
                cells = "".join(f"{n}: {pr[f'{k}_{n}_s'] * 1e3:.1f} ms ({pr[f'{k}_{n}_s'] / pr[f'{k}_{n}_reads'] * 1e6:.2f} us/read) "
                                for n in [int(x) for x in args.readers.split(",")] if f"{k}_{n}_s" in pr)
                print(f"{name:<24} probe {int(k) >> 10} KiB reads, by threads: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

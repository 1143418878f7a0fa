"""Probe: copy a file that sits in the page cache to the GPU straight from the page cache.

The floor of issue 16 copies page-cache pages into pinned memory with ``pread`` (one CPU copy per byte),
then DMAs them. Registering a read-only shared mapping of the file with ``cudaHostRegister``
(``cudaHostRegisterReadOnly``) pins the page cache's own pages, so the copy engine reads them directly
and no CPU copies a byte. This script measures, in one process, on one file: the floor, whole-file
registration + one H2D, and registration of 64 MiB chunks by N threads with each chunk's H2D enqueued
as soon as it is registered. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import json
import mmap
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import Floor  # noqa: E402

GB = 1e9
READ_ONLY = 8  # cudaHostRegisterReadOnly
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_READ = 22


def cudart():
    return torch.cuda.cudart()


def register(ptr: int, n: int, flags: int) -> None:
    rc = cudart().cudaHostRegister(ptr, n, flags)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister({n}) -> {int(rc)}")


def unregister(ptr: int) -> None:
    rc = cudart().cudaHostUnregister(ptr)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostUnregister -> {int(rc)}")


def make_file(path: Path, nbytes: int) -> None:
    if path.exists() and path.stat().st_size == nbytes:
        return
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        left = nbytes
        i = 0
        while left:
            n = min(left, block.size)
            b = np.roll(block, i)[:n]
            f.write(b.tobytes())
            left -= n
            i += 1
        f.flush()
        os.fsync(f.fileno())


def mapped(path: Path, nbytes: int):
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    arr = np.frombuffer(mm, dtype=np.uint8)
    return mm, arr, arr.ctypes.data


def whole(path: Path, nbytes: int, dev: torch.Tensor, flags: int, populate: bool) -> dict:
    mm, arr, ptr = mapped(path, nbytes)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if populate:
        libc.madvise(ptr, nbytes, MADV_POPULATE_READ)
    t1 = time.perf_counter()
    register(ptr, nbytes, flags)
    t2 = time.perf_counter()
    host = torch.from_numpy(arr)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    unregister(ptr)
    t4 = time.perf_counter()
    del host, arr
    mm.close()
    return {"populate_s": t1 - t0, "register_s": t2 - t1, "h2d_s": t3 - t2, "total_s": t3 - t0,
            "unregister_s": t4 - t3}


def piped(path: Path, nbytes: int, dev: torch.Tensor, flags: int, threads: int, chunk: int,
          populate: bool, stream: torch.cuda.Stream, pool: cf.ThreadPoolExecutor) -> dict:
    mm, arr, ptr = mapped(path, nbytes)
    host = torch.from_numpy(arr)
    spans = [(o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)]

    def reg(i: int) -> int:
        o, n = spans[i]
        if populate:
            libc.madvise(ptr + o, n, MADV_POPULATE_READ)
        register(ptr + o, n, flags)
        return i

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    futs = [pool.submit(reg, i) for i in range(len(spans))]
    for fu in cf.as_completed(futs):
        o, n = spans[fu.result()]
        with torch.cuda.stream(stream):
            dev[o:o + n].copy_(host[o:o + n], non_blocking=True)
    t1 = time.perf_counter()
    stream.synchronize()
    t2 = time.perf_counter()
    list(pool.map(lambda s: unregister(ptr + s[0]), spans))
    t3 = time.perf_counter()
    del host, arr
    mm.close()
    return {"registered_s": t1 - t0, "total_s": t2 - t0, "unregister_s": t3 - t2}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="probe-pagecache.bin")
    ap.add_argument("--gb", type=float, default=3.31)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,4,8,16")
    ap.add_argument("--chunks-mib", default="16,64")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("probe_pagecache_dma: needs a CUDA device (it measures H2D copies)", file=sys.stderr)
        return 2
    path = Path(a.file)
    n = int(a.gb * GB) // 4096 * 4096
    make_file(path, n)
    with open(path, "rb") as f:  # in the page cache
        while f.read(64 << 20):
            pass
    res = {"meta": {"kernel": platform.release(), "bytes": n, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "rows": []}
    fs = os.popen(f"df -T {path.resolve().parent} | tail -1").read().split()
    res["meta"]["fs"] = fs[1] if len(fs) > 1 else "?"
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    fl = Floor(n, os.cpu_count() or 16)
    fl.run(path, 0)
    floors = [fl.run(path, 0) for _ in range(a.repeats)]
    fl.close()
    res["floor_s"] = statistics.median(floors)
    print(f"floor ({fl.threads} preads, pinned beforehand): {res['floor_s'] * 1e3:.1f} ms "
          f"({n / res['floor_s'] / GB:.1f} GB/s)", flush=True)
    ref = None
    for flags in (READ_ONLY, READ_ONLY | 1):
        try:
            whole(path, n, dev, flags, False)
        except RuntimeError as e:
            print(f"flags {flags}: {e}", flush=True)
            res["rows"].append({"flags": flags, "error": str(e)})
            continue
        if ref is None:
            ref = np.fromfile(path, dtype=np.uint8, count=1 << 20, offset=n - (1 << 20))
            got = dev[n - (1 << 20):].cpu().numpy()
            res["bytes_equal_tail"] = bool((ref == got).all())
            print("tail bytes equal:", res["bytes_equal_tail"], flush=True)
        for populate in (False, True):
            rs = [whole(path, n, dev, flags, populate) for _ in range(a.repeats)]
            row = {"mode": "whole", "flags": flags, "populate": populate,
                   **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
            res["rows"].append(row)
            print(f"whole flags={flags} populate={populate}: " + " ".join(
                f"{k}={v * 1e3:.1f}ms" for k, v in row.items() if k.endswith("_s")), flush=True)
        stream = torch.cuda.Stream()
        for th in [int(x) for x in a.threads.split(",")]:
            pool = cf.ThreadPoolExecutor(th)
            for ch in [int(x) << 20 for x in a.chunks_mib.split(",")]:
                for populate in (False, True):
                    piped(path, n, dev, flags, th, ch, populate, stream, pool)
                    rs = [piped(path, n, dev, flags, th, ch, populate, stream, pool) for _ in range(a.repeats)]
                    row = {"mode": "piped", "flags": flags, "threads": th, "chunk_mib": ch >> 20,
                           "populate": populate, **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
                    row["over_floor"] = row["total_s"] / res["floor_s"]
                    res["rows"].append(row)
                    print(f"piped flags={flags} threads={th} chunk={ch >> 20}MiB populate={populate}: "
                          f"total={row['total_s'] * 1e3:.1f}ms ({row['over_floor']:.2f}x floor) "
                          f"registered={row['registered_s'] * 1e3:.1f} unreg={row['unregister_s'] * 1e3:.1f}",
                          flush=True)
            pool.shutdown()
        break
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

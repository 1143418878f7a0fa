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
import threading
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


class Hybrid:
    """The floor's readers and one registering thread on one file at once: the readers ``pread``
    ``part``-byte pieces from the front into memory pinned beforehand and copy each to the device as it
    lands; the registering thread pins the page cache's own pages of ``chunk``-byte pieces from the back
    and copies them to the device from there. They meet where their claims cross, so neither fraction is
    tuned. ``refill`` copies every registered chunk back into the pinned buffer after its H2D (D2H on its
    own stream), as a cache holding pinned bytes of its own would have to."""

    def __init__(self, nbytes: int, readers: int, part: int = 8 << 20, chunk: int = 64 << 20):
        self.nbytes, self.readers, self.part, self.chunk = nbytes, readers, part, chunk
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.host.fill_(0)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.s_read, self.s_map, self.s_back = (torch.cuda.Stream() for _ in range(3))
        self.pool = cf.ThreadPoolExecutor(readers + 1)

    def run(self, path: Path, flags: int, refill: bool) -> dict:
        mm, arr, ptr = mapped(path, self.nbytes)
        mapped_t = torch.from_numpy(arr)
        hmv = memoryview(self.host.numpy()).cast("B")
        fd = os.open(path, os.O_RDONLY)
        lock = threading.Lock()
        st = {"front": 0, "back": self.nbytes, "read_b": 0, "map_b": 0, "regs": []}
        t_done = {}

        def claim_front() -> tuple[int, int] | None:
            with lock:
                o = st["front"]
                if o >= st["back"]:
                    return None
                n = min(self.part, st["back"] - o)
                st["front"] = o + n
                return o, n

        def claim_back() -> tuple[int, int] | None:
            with lock:
                b = st["back"]
                o = max(st["front"], b - self.chunk)
                o -= o % 4096
                if b - o < self.chunk // 2 or o < st["front"]:
                    return None
                st["back"] = o
                return o, b - o

        def reader() -> int:
            got = 0
            while (c := claim_front()) is not None:
                o, n = c
                r = os.preadv(fd, [hmv[o:o + n]], o)
                assert r == n, (r, n)
                with torch.cuda.stream(self.s_read):
                    self.dev[o:o + n].copy_(self.host[o:o + n], non_blocking=True)
                got += n
            return got

        def registrar() -> int:
            got = 0
            while (c := claim_back()) is not None:
                o, n = c
                register(ptr + o, n, flags)
                st["regs"].append(o)
                with torch.cuda.stream(self.s_map):
                    self.dev[o:o + n].copy_(mapped_t[o:o + n], non_blocking=True)
                if refill:
                    ev = torch.cuda.Event()
                    ev.record(self.s_map)
                    self.s_back.wait_event(ev)
                    with torch.cuda.stream(self.s_back):
                        self.host[o:o + n].copy_(self.dev[o:o + n], non_blocking=True)
                got += n
            return got

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        futs = [self.pool.submit(registrar)] + [self.pool.submit(reader) for _ in range(self.readers)]
        res = [f.result() for f in futs]
        self.s_read.synchronize()
        self.s_map.synchronize()
        t1 = time.perf_counter()
        self.s_back.synchronize()
        t2 = time.perf_counter()
        for o in st["regs"]:
            unregister(ptr + o)
        t3 = time.perf_counter()
        os.close(fd)
        del mapped_t, arr
        mm.close()
        return {"total_s": t1 - t0, "with_refill_s": t2 - t0, "unregister_s": t3 - t2,
                "mapped_fraction": res[0] / self.nbytes}

    def close(self) -> None:
        self.pool.shutdown()
        del self.host, self.dev


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="probe-pagecache.bin")
    ap.add_argument("--gb", type=float, default=3.31)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,4,8,16")
    ap.add_argument("--chunks-mib", default="16,64")
    ap.add_argument("--out", default=None)
    ap.add_argument("--hybrid", default="", help="reader counts for the hybrid rows (e.g. 16,12); "
                    "skips the whole-file and piped rows")
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
    if a.hybrid:
        for nr in [int(x) for x in a.hybrid.split(",")]:
            for ch in [int(x) << 20 for x in a.chunks_mib.split(",")]:
                hy = Hybrid(n, nr, chunk=ch)
                for refill in (False, True):
                    hy.run(path, READ_ONLY, refill)
                    rs = [hy.run(path, READ_ONLY, refill) for _ in range(a.repeats)]
                    row = {"mode": "hybrid", "readers": nr, "chunk_mib": ch >> 20, "refill": refill,
                           **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
                    row["over_floor"] = row["total_s"] / res["floor_s"]
                    row["with_refill_over_floor"] = row["with_refill_s"] / res["floor_s"]
                    res["rows"].append(row)
                    print(f"hybrid readers={nr} chunk={ch >> 20}MiB refill={refill}: "
                          f"total={row['total_s'] * 1e3:.1f}ms ({row['over_floor']:.2f}x floor) "
                          f"with refill={row['with_refill_s'] * 1e3:.1f}ms mapped={row['mapped_fraction']:.2f} "
                          f"unreg={row['unregister_s'] * 1e3:.1f}", flush=True)
                got = hy.dev[-(1 << 20):].cpu().numpy()
                ref = np.fromfile(path, dtype=np.uint8, count=1 << 20, offset=n - (1 << 20))
                row["bytes_equal_tail"] = bool((ref == got).all())
                mid = hy.host.numpy()
                whole_ref = np.fromfile(path, dtype=np.uint8)
                row["host_equal"] = bool((mid == whole_ref).all())
                row["dev_equal"] = bool((hy.dev.cpu().numpy() == whole_ref).all())
                print("equal: dev", row["dev_equal"], "host after refill", row["host_equal"], flush=True)
                del whole_ref
                hy.close()
        a.threads = ""
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
        for populate in ((False, True) if a.threads else ()):
            rs = [whole(path, n, dev, flags, populate) for _ in range(a.repeats)]
            row = {"mode": "whole", "flags": flags, "populate": populate,
                   **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
            res["rows"].append(row)
            print(f"whole flags={flags} populate={populate}: " + " ".join(
                f"{k}={v * 1e3:.1f}ms" for k, v in row.items() if k.endswith("_s")), flush=True)
        stream = torch.cuda.Stream()
        for th in [int(x) for x in a.threads.split(",") if x]:
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

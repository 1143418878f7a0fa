"""Probe (not a benchmark): page cache -> pinned host memory, ``preadv`` against a copy out of a shared mapping.

The cold TP=1 load is bound by the readers' page-cache copies (16 ``preadv`` threads: ~35-38 GB/s on the
H200 host, while the H2D runs at 54 GB/s). This measures, in one process, on one file in the page cache,
into the same pinned buffer:

* ``pread``: N threads of ``os.preadv`` of 8 MiB parts (the floor's and the readers' way);
* ``mmap``: the file mapped read-only and shared, N threads copying 8 MiB parts out of the mapping with
  numpy (``np.copyto``: glibc ``memcpy``, the GIL released), the mapping made per repeat (its page
  faults inside the timing), with or without ``MAP_POPULATE`` / ``MADV_POPULATE_READ`` first;
* each with the H2D of every 64 MiB as its parts complete (``--h2d``), the way a load would run.

``python3 scripts/probe_mmap_copy.py --gib 3.1 --threads 8,16 --repeats 5 --out OUT.json``
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import mmap
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

PART = 8 << 20
GROUP = 64 << 20
MADV_POPULATE_READ = 22


def make_file(path: Path, nbytes: int) -> None:
    block = np.random.default_rng(0).integers(0, 255, size=64 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
    with open(path, "rb") as f:   # into the page cache
        while f.read(64 << 20):
            pass


class H2D:
    """Copies each 64 MiB group of the pinned buffer to the device once all its parts have landed."""

    def __init__(self, host: torch.Tensor, dev: torch.Tensor | None):
        self.host, self.dev = host, dev
        n = host.numel()
        self.groups = [(g, min(g + GROUP, n)) for g in range(0, n, GROUP)]
        self.left = [-(-(b - a) // PART) for a, b in self.groups]
        self.lock = threading.Lock()
        self.stream = torch.cuda.Stream() if dev is not None else None

    def landed(self, off: int) -> None:
        if self.dev is None:
            return
        g = off // GROUP
        with self.lock:
            self.left[g] -= 1
            done = self.left[g] == 0
        if done:
            a, b = self.groups[g]
            with torch.cuda.stream(self.stream):
                self.dev[a:b].copy_(self.host[a:b], non_blocking=True)

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def run_pread(path: Path, host: torch.Tensor, threads: int, h2d: H2D) -> float:
    n = host.numel()
    mv = memoryview(host.numpy())
    fd = os.open(path, os.O_RDONLY)
    parts = list(range(0, n, PART))

    def work(off: int) -> None:
        end = min(off + PART, n)
        got = os.preadv(fd, [mv[off:end]], off)
        assert got == end - off
        h2d.landed(off)

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, parts))
    h2d.finish()
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


def run_mmap(path: Path, host: torch.Tensor, threads: int, h2d: H2D, populate: str) -> float:
    n = host.numel()
    dst = host.numpy()
    parts = list(range(0, n, PART))
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate == "map" else 0)
    mm = mmap.mmap(fd, n, flags=flags, prot=mmap.PROT_READ)
    src = np.frombuffer(mm, dtype=np.uint8)

    def work(off: int) -> None:
        end = min(off + PART, n)
        if populate == "madvise":
            mm.madvise(MADV_POPULATE_READ, off, end - off)
        np.copyto(dst[off:end], src[off:end])
        h2d.landed(off)

    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, parts))
    h2d.finish()
    dt = time.perf_counter() - t
    del src
    mm.close()
    os.close(fd)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=3.1)
    ap.add_argument("--threads", default="16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dir", default=None, help="where the file is written (default: a temporary folder)")
    args = ap.parse_args()
    nbytes = int(args.gib * (1 << 30))
    cuda = torch.cuda.is_available()
    tmp = tempfile.mkdtemp(dir=args.dir)
    path = Path(tmp) / "probe.bin"
    make_file(path, nbytes)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    host.fill_(1)   # the pinned pages touched once
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda") if cuda else None
    ref = np.fromfile(path, dtype=np.uint8, count=1 << 20)
    rows = []
    for threads in [int(x) for x in args.threads.split(",")]:
        for h2d_on in ([False, True] if cuda else [False]):
            for mode in ("pread", "mmap", "mmap+madvise", "mmap+populate"):
                ts = []
                for _ in range(args.repeats):
                    h = H2D(host, dev if h2d_on else None)
                    if mode == "pread":
                        ts.append(run_pread(path, host, threads, h))
                    else:
                        pop = {"mmap": "", "mmap+madvise": "madvise", "mmap+populate": "map"}[mode]
                        ts.append(run_mmap(path, host, threads, h, pop))
                    assert np.array_equal(host[:1 << 20].numpy(), ref), mode
                med = statistics.median(ts)
                rows.append(dict(mode=mode, threads=threads, h2d=h2d_on, median_s=med, all_s=ts,
                                 gb_s=nbytes / med / 1e9))
                print(f"{mode:15} threads {threads:3} h2d {int(h2d_on)}: {med * 1e3:8.1f} ms "
                      f"({nbytes / med / 1e9:5.1f} GB/s)  all {[round(x * 1e3, 1) for x in ts]}", flush=True)
    if cuda:
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        h = time.perf_counter() - t
        print(f"H2D alone: {h * 1e3:.1f} ms ({nbytes / h / 1e9:.1f} GB/s)")
        rows.append(dict(mode="h2d_alone", median_s=h))
    os.unlink(path)
    os.rmdir(tmp)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), argv=sys.argv, bytes=nbytes,
            cores=os.cpu_count(), device=torch.cuda.get_device_name() if cuda else "cpu", rows=rows), indent=1))


if __name__ == "__main__":
    main()

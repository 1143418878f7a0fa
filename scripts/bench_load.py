#!/usr/bin/env python3
"""Benchmark of the adapter load path: ours vs the machine's floor vs the loaders in use, same run.

    PYTHONPATH=. python scripts/bench_load.py --out out/bench [--cases all|NAME,...] [--repeats 3]
        [--peers] [--baselines] [--drop-caches] [--overlap]
    PYTHONPATH=. python scripts/bench_load.py --tiny --out /tmp/b      # CPU smoke mode (tiny presets)

Each case runs in a FRESH process (``--case-run``), so its first activation is a first activation in a
fresh process; everything compared with it (the floor, the peers, the baselines) runs in that same
process on the same file. Prints a table and writes ``bench.json`` (+ ``bench.png``) into --out.

Per case (JSON): ``cold_s`` (file in the page cache, cache entry dropped, arena kept: later cold loads),
``first_cold_s`` (first activation of the process; the arena was reserved in the background at register,
``reserve_s`` apart), ``warm_s`` (from the pinned cache), ``floor_s`` (the same byte count read with one
thread per core in 8 MiB preads into memory pinned beforehand, each 64 MiB H2D issued as its parts
arrive), ``cold_over_floor``, ``<peer>_s`` for each peer loading the whole file to the GPU:
``safetensors_s`` (``load_file(device=cuda)``), ``instanttensor_<backend>_s`` (its default O_DIRECT
backend, MMAP, URING_BUFFERED), ``fastsafetensors_s`` (``nogds=True``), ``runai_s`` (Run:ai model
streamer), beside the eager / lazy (SGLang PR #20876) baselines; with ``--drop-caches`` (root): the disk's
read bandwidth and our cold load with the page cache dropped, measured in the same process. Under
``ours``: ``arena_huge_first_bytes`` / ``arena_huge_bytes`` (the pinned arena's bytes on transparent huge
pages before the first load and at the end, of ``arena_reserved_bytes``) and ``thp_mode``.

Cases (synthetic PEFT adapters, bf16, real shapes from configs/models; a rank of a larger layout is
measured alone: the load path has no collective before activation):
  llama8b-r16-tp1, llama31-70b-r128-tp1, llama31-70b-r128-tp8 (rank 0), llama70b-r64-tp8 (rank 0),
  qwen3moe-r16-ep8 (rank 0 of TP=8/EP=8), qwen3moe-r16-tp8 (rank 0 of TP=8 without EP: tiny slices)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tp_lora.plan.validate import AdapterSource  # noqa: E402
from tp_lora.runtime.manager import LoRAConfig, LoRAManager  # noqa: E402
from tp_lora.plan.model import ModelSpec  # noqa: E402
from tp_lora.plan.packing import read_counts  # noqa: E402
from tp_lora.plan.parallel import ParallelSpec  # noqa: E402
from tp_lora.plan.planner import plan_rank  # noqa: E402
from tp_lora.job.synthetic import write_synthetic_adapter  # noqa: E402
from tp_lora.device.transfer import default_read_workers  # noqa: E402
from tp_lora.device.mapper import MAP_READS  # noqa: E402
from tp_lora.runtime.config import DEFAULTS  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda", 0) if CUDA else torch.device("cpu")
GB = 1e9
W = "adapter_model.safetensors"

CASES = {
    "llama8b-r16-tp1": dict(preset="llama-3-8b", rank=16, tp=1, ep=1),
    "llama31-70b-r128-tp1": dict(preset="llama-3.1-70b", rank=128, tp=1, ep=1),
    "llama31-70b-r128-tp8": dict(preset="llama-3.1-70b", rank=128, tp=8, ep=1),
    "llama70b-r64-tp8": dict(preset="llama-3-70b", rank=64, tp=8, ep=1),
    "qwen3moe-r16-ep8": dict(preset="qwen3-30b-a3b", rank=16, tp=8, ep=8),
    "qwen3moe-r16-tp8": dict(preset="qwen3-30b-a3b", rank=16, tp=8, ep=1),
}
TINY_CASES = {
    "tiny-dense-r8-tp1": dict(preset="tiny-dense", rank=8, tp=1, ep=1),
    "tiny-dense-r8-tp4": dict(preset="tiny-dense", rank=8, tp=4, ep=1),
    "tiny-moe-r8-tp4": dict(preset="tiny-moe", rank=8, tp=4, ep=1),
}
#: goal of cold / floor per case (the tiny-slice case: 1.5x the floor of the rank's bytes)
GOAL = {"qwen3moe-r16-tp8": 1.5}


def empty_host_cache() -> None:
    """Give torch's cached pinned blocks back (the baselines pin through it)."""
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
    if CUDA:
        torch.cuda.synchronize(DEV)


# ------------------------------------------------------------------------------------------------
# the machine: peak H2D, the floor, the disk
# ------------------------------------------------------------------------------------------------
def measure_peak(repeats: int) -> dict:
    if not CUDA:
        return {"h2d_pinned_1GiB_GBps": float("nan")}
    n = 1 << 30
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst.copy_(pinned, non_blocking=True)
    sync()
    ts = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(pinned, non_blocking=True)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del pinned, dst
    empty_host_cache()
    return {"h2d_pinned_1GiB_GBps": n / med(ts) / GB}


def _parts(offset: int, nbytes: int, part: int) -> list[tuple[int, int, int]]:
    """(file offset, buffer offset, bytes) of nbytes from offset in ``part``-byte pieces."""
    return [(offset + o, o, min(part, nbytes - o)) for o in range(0, nbytes, part)]


class Floor:
    """The same byte count read with ``threads`` preads into memory pinned beforehand, copied to the
    device in ``group``-byte H2D copies as soon as all parts of a group have arrived."""

    def __init__(self, nbytes: int, threads: int, part: int = 8 << 20, group: int = 64 << 20):
        self.nbytes, self.threads, self.part, self.group = nbytes, threads, part, group
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=CUDA)
        self.host.fill_(0)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=DEV) if CUDA else None
        self.stream = torch.cuda.Stream(DEV) if CUDA else None
        self.pool = cf.ThreadPoolExecutor(threads)

    def run(self, path: Path, offset: int) -> float:
        mv = memoryview(self.host.numpy()).cast("B")
        fd = os.open(path, os.O_RDONLY)
        parts = _parts(offset, self.nbytes, self.part)
        per_group = self.group // self.part
        left = {g: 0 for g in range(-(-len(parts) // per_group))}
        for i in range(len(parts)):
            left[i // per_group] += 1

        def read(i: int) -> int:
            f, o, n = parts[i]
            got = os.preadv(fd, [mv[o:o + n]], f)
            assert got == n, (got, n)
            return i

        sync()
        t = time.perf_counter()
        futs = [self.pool.submit(read, i) for i in range(len(parts))]
        for fu in cf.as_completed(futs):
            g = fu.result() // per_group
            left[g] -= 1
            if left[g] == 0 and CUDA:
                a, b = g * self.group, min(self.nbytes, (g + 1) * self.group)
                with torch.cuda.stream(self.stream):
                    self.dev[a:b].copy_(self.host[a:b], non_blocking=True)
        if CUDA:
            self.stream.synchronize()
        dt = time.perf_counter() - t
        os.close(fd)
        return dt

    def close(self) -> None:
        self.pool.shutdown()
        del self.host, self.dev
        empty_host_cache()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def disk_bandwidth(path: Path, threads: int) -> float:
    """Sequential read bandwidth of the disk holding ``path`` (page cache dropped first), GB/s."""
    size = path.stat().st_size
    drop_caches()
    buf = torch.empty(min(size, 8 << 20) * threads, dtype=torch.uint8)
    mv = memoryview(buf.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    parts = _parts(0, size, 8 << 20)

    def read(i: int) -> int:
        f, _, n = parts[i]
        slot = (i % threads) * (8 << 20)
        return os.preadv(fd, [mv[slot:slot + n]], f)

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as ex:
        got = sum(ex.map(read, range(len(parts))))
    dt = time.perf_counter() - t
    os.close(fd)
    assert got == size
    return size / dt / GB


def page_cache(path: Path) -> None:
    with open(path / W, "rb") as f:
        while f.read(64 << 20):
            pass


# ------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------
def make_adapter(root: Path, name: str, c: dict) -> Path:
    # one file per (preset, rank): the TP=1 and TP=8 cases of a model read the same adapter
    p = root / f"{c['preset']}-r{c['rank']}"
    if (p / W).exists():
        return p
    spec = ModelSpec.from_preset(c["preset"])
    targets = ["q", "k", "v", "o", "experts"] if spec.is_moe else ["q", "k", "v", "o", "gate", "up", "down"]
    torch.manual_seed(0)
    write_synthetic_adapter(p, spec, rank=c["rank"], targets=targets, dtype="bf16", seed=1)
    # written back now: the kernel's flusher would otherwise write the file's dirty pages out ~30 s later,
    # in the middle of whichever case runs then
    os.sync()
    return p


# ------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------
def _manager(c: dict, args: argparse.Namespace, **over) -> LoRAManager:
    spec = ModelSpec.from_preset(c["preset"])
    par = ParallelSpec(tp_size=c["tp"], tp_rank=0, ep_size=c["ep"])
    kw = dict(max_loras=1, max_lora_rank=c["rank"], dtype="bfloat16", device=str(DEV),
              host_cache_bytes=64 << 30, chunk_bytes=args.chunk_bytes, pin_mode=args.pin_mode,
              read_workers=args.read_workers, pin_workers=args.pin_workers, part_bytes=args.part_bytes,
              read_mode=args.read_mode, placement=args.placement, read_ahead=args.read_ahead,
              read_backend=args.read_backend, map_reads=getattr(args, "map_reads", DEFAULTS["map_reads"]))
    kw.update(over)
    mgr = LoRAManager(LoRAConfig(**kw), spec, par)
    if getattr(args, "map_stagings", None):
        mgr.engine.mapper.stagings = args.map_stagings
    if getattr(args, "map_python", False):
        mgr.engine.mapper.c_chunks = False
    return mgr


def _last_phases(mgr: LoRAManager) -> dict:
    ph = mgr.stats().activation_phases
    return dataclasses.asdict(ph[-1]) if ph else {}


def _median_phases(rows: list[dict]) -> dict:
    keys = [k for k in (rows[0] if rows else {}) if k.endswith("_s")]
    return {k: med([r[k] for r in rows]) for k in keys}


def _cold(mgr: LoRAManager, path: Path, name: str) -> tuple[float, dict]:
    for n in mgr.registered():
        mgr.cache.evict(n)  # the entry's blocks go back to the arena; the arena stays reserved
    page_cache(path)
    t = time.perf_counter()
    mgr.activate(name)
    return time.perf_counter() - t, mgr.stats().load_stats[-1]


def trace_summary(tr, total_s: float, readers: int) -> dict:
    """Where one cold load's time went (``TransferEngine.trace``): the readers' busy fraction over the
    load, when the first read started and the last ended, the loader's waits and issue time, the slowest
    unit; ``raw`` keeps the timeline (ms) for plots."""
    if tr is None or not tr.reads:
        return {}
    busy = sum(d - r for _, _, _, r, d, _ in tr.reads)
    first = min(r for _, _, _, r, _, _ in tr.reads)
    last = max(d for _, _, _, _, d, _ in tr.reads)
    slow = max(tr.reads, key=lambda x: x[4] - x[3])
    waits = [b - a for k, a, b, _ in tr.loader if k == "wait"]
    issues = [b - a for k, a, b, _ in tr.loader if k == "issue"]
    last_issue_end = max((b for k, _, b, _ in tr.loader if k == "issue"), default=0.0)
    tids = sorted({x[0] for x in tr.reads})
    ms = lambda v: round(v * 1e3, 4)  # noqa: E731
    return {
        "units": tr.units, "reader_threads_used": len(tids),
        "reader_busy_frac": busy / (readers * total_s) if total_s > 0 else float("nan"),
        "reader_busy_frac_in_reads": busy / (readers * (last - first)) if last > first else float("nan"),
        "first_read_start_s": first, "last_read_end_s": last, "after_last_read_s": total_s - last,
        "last_issue_end_s": last_issue_end, "buffer_wait_s": sum(r - p for _, _, p, r, _, _ in tr.reads),
        "loader_wait_s": sum(waits), "loader_issue_s": sum(issues), "loader_issues": len(issues),
        "max_issue_s": max(issues, default=0.0),
        "slowest_unit_s": slow[4] - slow[3], "slowest_unit_syscalls": slow[5],
        "unit_read_s_median": med([d - r for _, _, _, r, d, _ in tr.reads]),
        "marks_ms": {k: ms(v) for k, v in getattr(tr, "marks", [])},  # the loader's steps before the first read
        "raw": {"reads": [(tids.index(t), i, ms(p), ms(r), ms(d), n) for t, i, p, r, d, n in tr.reads],
                "loader": [(k, ms(a), ms(b), u) for k, a, b, u in tr.loader], "end_ms": ms(tr.end)},
    }


_ENGINE_RINGS = object()


def reads_only(mgr: LoRAManager, path: Path, name: str, repeats: int, rings=_ENGINE_RINGS,
               native=_ENGINE_RINGS) -> float:
    """The rank's reads alone (no H2D, no placement, no loader in the way): every unit of the plan read
    by the engine's own reader threads (same rings, iovec tables and scratch) into host buffers of the
    chunks' sizes, all submitted at once. Subtracted from a cold load, it says what the pipeline costs
    on top of the read pattern. ``rings``: the engine's (default), another
    ``RingPool``, or None (one preadv per read). ``native``: the engine's C read loop (default) or None
    (the readers' Python loop)."""
    from tp_lora.host.reader import SliceReader
    eng = mgr.engine
    eng.settle_fill()  # a refill after the last load would read beside these
    a = mgr._adapters[name]  # noqa: SLF001 - the registered plan and header
    chunks = eng.chunks(a.plan)
    bufs = [eng.device.alloc_host(max(c.nbytes, 1)) for c in chunks]
    ts = []
    for _ in range(repeats):
        page_cache(path)
        rd = SliceReader(a.header, eng.scratch, eng._memo.table(a.plan, "iov"), check_header=False,  # noqa: SLF001
                         rings=eng.rings if rings is _ENGINE_RINGS else rings,
                         native=eng.native if native is _ENGINE_RINGS else native)
        t = time.perf_counter()
        futs = [eng._readers.submit(rd.read_part, c, p, b) for c, b in zip(chunks, bufs) for p in c.units()]  # noqa: SLF001
        for f in futs:
            f.result()
        ts.append(time.perf_counter() - t)
        rd.close()
    del bufs
    return med(ts)


def _thp_mode() -> str | None:
    """The kernel's transparent huge page setting (the bracketed word of ``enabled``), or None."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def bench_ours(path: Path, c: dict, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    mgr = _manager(c, args)
    init_s = time.perf_counter() - t0
    plan = mgr.register("a", path)
    mgr.register("b", path)
    t = time.perf_counter()
    mgr.engine.wait_prepared()  # reported apart: a server registers well before the first activation
    reserve_wait_s = time.perf_counter() - t
    reserve_s = mgr.arena.snapshot().reserve_s
    huge_first = mgr.arena.huge_page_bytes()   # THP backing of the arena before the first load
    page_cache(path)
    if args.trace:
        mgr.engine.trace = []
    t = time.perf_counter()
    mgr.activate("a")  # the first activation of this process
    first = time.perf_counter() - t
    first_ls = mgr.stats().load_stats[-1]
    first_ph = _last_phases(mgr)
    first_trace = (trace_summary(mgr.engine.trace[0], first_ls["total_s"], mgr.engine.read_workers)
                   if args.trace and mgr.engine.trace else {})
    cold, cold_ls, cold_ph = [], [], []
    if args.trace:
        mgr.engine.trace = []
    for i in range(args.repeats):
        dt, ls = _cold(mgr, path, "b" if i % 2 == 0 else "a")
        cold.append(dt)
        cold_ls.append(ls)
        cold_ph.append(_last_phases(mgr))
    traces = mgr.engine.trace or []
    mgr.engine.trace = None
    # the median cold load's timeline
    mid = sorted(range(len(cold)), key=lambda i: cold[i])[len(cold) // 2]
    trace = trace_summary(traces[mid] if mid < len(traces) else None, cold_ls[mid]["total_s"],
                          mgr.engine.read_workers) if args.trace else {}
    reads_s = reads_only(mgr, path, "a", args.repeats) if args.trace else None
    mgr.activate("a")
    mgr.activate("b")
    warm, warm_ph = [], []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        mgr.activate("a" if i % 2 == 0 else "b")
        if i:
            warm.append(time.perf_counter() - t)
            warm_ph.append(_last_phases(mgr))
    st = mgr.stats()
    warm_ls = [x for x in st.load_stats if x["warm"]][-args.repeats:]
    ar = mgr.arena.snapshot()
    counts = read_counts(mgr.engine.chunks(plan))
    out = {
        "bytes": plan.nbytes, "full_bytes": plan.full_bytes, "file_bytes": (path / W).stat().st_size,
        "slices": len(plan.ops), "chunks": len(mgr.engine.chunks(plan)), "readers": mgr.engine.read_workers,
        "read_mode": args.read_mode, "bytes_owned": counts.owned, "bytes_read": cold_ls[-1]["bytes_read"],
        "syscalls": counts.syscalls, "span_ops": counts.span_ops,
        "init_s": init_s, "reserve_s": reserve_s, "reserve_wait_s": reserve_wait_s,
        "first_cold_s": first, "first_cold_load_total_s": first_ls["total_s"],
        "cold_s": med(cold), "cold_all_s": cold, "warm_s": med(warm), "warm_all_s": warm,
        "cold_read_s": med([x["read_s"] for x in cold_ls]), "cold_wait_s": med([x["wait_s"] for x in cold_ls]),
        "cold_issue_s": med([x["issue_s"] for x in cold_ls]), "cold_place_s": med([x["place_s"] for x in cold_ls]),
        "placement": "kernel" if mgr.engine.placer.kernel else "copies",
        "read_backend": "io_uring" if mgr.engine.rings is not None else "preadv",
        "native_reads": mgr.engine.native is not None,
        # copied to the device straight from the page cache (device/mapper.py), and refilled after
        "map_reads": args.map_reads, "bytes_mapped": med([x["bytes_mapped"] for x in cold_ls]),
        "first_bytes_mapped": first_ls["bytes_mapped"], "refills": dict(mgr.engine.refills),
        "map_in_c": mgr.engine.mapper.c_chunks, "map_disabled": mgr.engine.mapper.disabled,
        "cold_load_stats": cold_ls[-1],
        "first_load_stats": first_ls, "cold_alloc_s": med([x["alloc_s"] for x in cold_ls]),
        "cold_device_span_s": med([x["h2d_s"] for x in cold_ls]),
        "warm_device_span_s": med([x["h2d_s"] for x in warm_ls]),
        "pinned_in_use": st.pinned_bytes_now, "pinned_planned": st.pinned_planned_now,
        "pinned_reserved": st.pinned_reserved_bytes, "pinned_free": st.pinned_free_bytes,
        "arena_grow_in_load": ar.grow_in_load, "part_bytes": mgr.engine.part_for(plan),
        # the arena's bytes on transparent huge pages before the first load and at the end (a first load
        # slower than later ones from the same slabs would show here if the kernel collapsed pages later)
        "arena_reserved_bytes": ar.reserved_bytes, "arena_huge_first_bytes": huge_first,
        "arena_huge_bytes": mgr.arena.huge_page_bytes(), "thp_mode": _thp_mode(),
        "units": sum(len(ch.units()) for ch in mgr.engine.chunks(plan)),
        # where each activation's time went (ActivationPhases; medians over the cold / warm repeats)
        "first_phases": first_ph, "cold_phases": _median_phases(cold_ph), "warm_phases": _median_phases(warm_ph),
    }
    if args.trace:
        out["trace"] = trace
        out["first_trace"] = first_trace
        out["reads_only_s"] = reads_s
    out["mgr"] = mgr
    return out


def bench_mode(path: Path, c: dict, args: argparse.Namespace, repeats: int, cost=None, **over) -> float:
    """Later cold loads with other settings (a read mode, a placement, a read cost model: strategies side
    by side)."""
    batch = over.pop("batch_reads", True)
    overlap = over.pop("overlap_place", True)
    warm_out = over.pop("warm_out", None)
    mgr = _manager(c, args, **over)
    mgr.engine.batch_reads = batch  # False: one reader task per part (the C batch's predecessor)
    mgr.engine.overlap_place = overlap  # False: placements on the copy stream, after each chunk's H2D
    if cost is not None:
        mgr.engine.cost = cost  # before any register: the plans are packed by this model
    mgr.register("a", path)
    mgr.register("b", path)  # alternate: each activation evicts the other from the one slot, so it loads
    mgr.engine.wait_prepared()
    _cold(mgr, path, "a")
    ts = [_cold(mgr, path, "b" if i % 2 == 0 else "a")[0] for i in range(repeats)]
    if warm_out is not None:  # warm loads too (both adapters cached): appended to the list given
        mgr.activate("a")
        mgr.activate("b")
        for i in range(repeats + 1):
            t = time.perf_counter()
            mgr.activate("a" if i % 2 == 0 else "b")
            if i:
                warm_out.append(time.perf_counter() - t)
    mgr.close()
    return med(ts)


# ------------------------------------------------------------------------------------------------
# peers: each loads the whole file to the GPU (what they do; we read only the rank's bytes)
# ------------------------------------------------------------------------------------------------
def _timed(fn) -> float:
    sync()
    t = time.perf_counter()
    keep = fn()
    sync()
    dt = time.perf_counter() - t
    del keep
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return dt


def peer_safetensors(f: str):
    from safetensors.torch import load_file

    return load_file(f, device=str(DEV))


def peer_instanttensor(f: str, backend: str | None):
    from instanttensor import Backend, safe_open

    kw = {} if backend is None else {"backend": getattr(Backend, backend)}
    out = {}
    with safe_open(f, framework="pt", device=DEV.index or 0, **kw) as sf:
        for k, t in sf.tensors():
            out[k] = t
    return out


def peer_fastsafetensors(f: str):
    from fastsafetensors import SafeTensorsFileLoader

    loader = SafeTensorsFileLoader(None, device=str(DEV), nogds=True)
    loader.add_filenames({0: [f]})
    fb = loader.copy_files_to_device()
    out = {k: fb.get_tensor(k).clone() for k in loader.get_keys()}
    fb.close()
    loader.close()
    return out


def peer_runai(f: str):
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as s:
        s.stream_file(f)
        for k, t in s.get_tensors():
            out[k] = t.to(DEV, copy=True)
    return out


PEERS = {
    "safetensors": (peer_safetensors, "safetensors.torch.load_file(device=cuda)"),
    "instanttensor_default": (lambda f: peer_instanttensor(f, None),
                              "instanttensor safe_open, default backend (O_DIRECT: reads the disk)"),
    "instanttensor_mmap": (lambda f: peer_instanttensor(f, "MMAP"), "instanttensor backend=MMAP"),
    "instanttensor_uring_buffered": (lambda f: peer_instanttensor(f, "URING_BUFFERED"),
                                     "instanttensor backend=URING_BUFFERED"),
    "fastsafetensors": (peer_fastsafetensors, "fastsafetensors SafeTensorsFileLoader(nogds=True)"),
    "runai": (peer_runai, "runai_model_streamer SafetensorsStreamer (to CPU), .to(cuda)"),
}


def bench_peers(path: Path, repeats: int, names: list[str]) -> dict:
    out: dict = {}
    f = str(path / W)
    for name in names:
        fn, desc = PEERS[name]
        ts = []
        try:
            for _ in range(repeats):
                page_cache(path)
                ts.append(_timed(lambda: fn(f)))
                if ts[-1] > 1.5:
                    break  # slow peers: one run is enough to place them
            out[f"{name}_s"] = min(ts)
        except Exception as e:  # noqa: BLE001 - a peer that fails here is reported, not fatal
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        out[f"{name}_setting"] = desc
    return out


# ------------------------------------------------------------------------------------------------
# baselines (faithful small re-implementations; they need CUDA)
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
# one case, in this (fresh) process
# ------------------------------------------------------------------------------------------------
def case_run(name: str, c: dict, path: Path, args: argparse.Namespace) -> dict:
    r: dict = {"case": c, "pid": os.getpid()}
    o = bench_ours(path, c, args)
    mgr = o.pop("mgr")
    r["ours"] = o
    data_start = 8 + mgr._adapters["a"].header.header_bytes  # noqa: SLF001 - the file layout, for the floor
    mgr.close()
    del mgr
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    threads = args.floor_threads or default_read_workers()
    fl = Floor(o["bytes"], threads)
    fl.run(path / W, data_start)  # first touch of the floor's own memory is not the floor
    floors = []
    for _ in range(args.repeats):
        page_cache(path)
        floors.append(fl.run(path / W, data_start))
    fl.close()
    r["floor_s"] = med(floors)
    r["floor_threads"] = threads
    r["peak"] = measure_peak(3)
    r["cold_s"], r["first_cold_s"], r["warm_s"] = o["cold_s"], o["first_cold_s"], o["warm_s"]
    r["bytes_mapped"] = o["bytes_mapped"]
    r["cold_over_floor"] = o["cold_s"] / r["floor_s"]
    r["first_over_cold"] = o["first_cold_s"] / o["cold_s"]
    peak = r["peak"]["h2d_pinned_1GiB_GBps"]
    r["warm_frac_of_peak"] = o["bytes"] / o["warm_s"] / GB / peak if CUDA else float("nan")
    # before the peers: a peer that keeps the file mapped would keep its pages in the page cache
    if args.drop_caches:
        try:
            r["disk_GBps"] = disk_bandwidth(path / W, threads)
            mgr = _manager(c, args)
            mgr.register("a", path)
            mgr.engine.wait_prepared()
            drop_caches()
            t = time.perf_counter()
            mgr.activate("a")
            r["cold_dropped_s"] = time.perf_counter() - t
            read = mgr.stats().load_stats[-1]["bytes_read"]
            r["cold_dropped_bytes_read"] = read
            r["cold_dropped_over_disk"] = r["cold_dropped_s"] / (read / (r["disk_GBps"] * GB))
            # a file still mapped (a peer's mmap) keeps its pages: then the "disk" is the page cache
            r["drop_caches_effective"] = r["disk_GBps"] < 10
            mgr.close()
        except Exception as e:  # noqa: BLE001 - not root, no /proc: reported
            r["drop_caches_error"] = f"{type(e).__name__}: {e}"[:300]
    if args.modes:
        for m in args.modes.split(","):
            if m != args.read_mode:
                r[f"cold_{m}_s"] = bench_mode(path, c, args, max(1, args.repeats // 2), read_mode=m)
    variants = [(f"cold_place_{m}_s", dict(placement=m)) for m in args.placements.split(",") if m]
    variants += [(f"cold_ahead_{n}_s", dict(read_ahead=int(n))) for n in args.read_aheads.split(",") if n]
    variants += [(f"cold_backend_{b}_s", dict(read_backend=b)) for b in args.read_backends.split(",") if b]
    variants += [(f"cold_readers_{n}_s", dict(read_workers=int(n))) for n in args.read_workers_list.split(",") if n]
    variants += [(f"cold_part_{n}_s", dict(part_bytes=int(n))) for n in args.part_bytes_list.split(",") if n]
    if args.per_part:  # one reader task per part instead of the C batch (one call per reader thread)
        variants.append(("cold_per_part_s", dict(batch_reads=False)))
    serial_warm: list[float] = []
    if args.serial_place:  # placements on the copy stream (no overlap with the next chunk's H2D)
        variants.append(("cold_serial_place_s", dict(overlap_place=False, warm_out=serial_warm)))
    if args.map_ab:  # the readers alone: no chunk copied straight from the page cache (device/mapper.py)
        variants.append(("cold_nomap_s", dict(map_reads="off")))
    if args.python_reads:  # the readers' Python loop instead of the C one (host/native.py)
        variants.append(("cold_python_reads_s", dict(native_reads=False)))
    if args.ring_exact_rows:  # the io_uring readers, one request per owned row range (no junk-gap joins)
        import dataclasses
        from tp_lora.plan.packing import RING_COST
        variants.append(("cold_ring_exact_rows_s", dict(read_backend="io_uring",
                                                        cost=dataclasses.replace(RING_COST, join_exact=False))))
    for key, over in variants:
        try:
            r[key] = bench_mode(path, c, args, args.repeats, **over)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the case
            r[key.removesuffix("_s") + "_error"] = f"{type(e).__name__}: {e}"[:300]
    if serial_warm:
        r["warm_serial_place_s"] = med(serial_warm)
        if CUDA:
            r["warm_serial_place_frac_of_peak"] = o["bytes"] / r["warm_serial_place_s"] / GB / peak
    if args.peers and args.peer_file:
        names = list(PEERS) if args.peers == "all" else args.peers.split(",")
        r.update(bench_peers(path, 2, names))
    if args.baselines and CUDA:
        for bname, fn in (("eager", baseline_eager), ("lazy", baseline_lazy)):
            try:
                r[bname + "_s"] = fn(path, c)
            except Exception as e:  # noqa: BLE001
                r[bname + "_error"] = f"{type(e).__name__}: {e}"[:300]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--adapters", default="/tmp/tp_lora_bench_adapters")
    ap.add_argument("--cases", default="all", help="all, or comma-separated case names")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny presets, the same code paths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-bytes", type=int, default=64 << 20)
    ap.add_argument("--part-bytes", type=int, default=None)
    ap.add_argument("--pin-mode", default="register", choices=["caching", "register"])
    ap.add_argument("--read-workers", type=int, default=None, help="default: one per core")
    ap.add_argument("--pin-workers", type=int, default=2)
    ap.add_argument("--read-mode", default="auto", choices=["auto", "exact", "span"])
    ap.add_argument("--modes", default="", help="also time later cold loads with these read modes")
    ap.add_argument("--placement", default="auto", choices=["auto", "kernel", "copies"])
    ap.add_argument("--placements", default="", help="also time later cold loads with these placements")
    ap.add_argument("--read-ahead", type=int, default=None, help="LoRAConfig.read_ahead")
    ap.add_argument("--read-backend", default="auto", choices=["auto", "io_uring", "preadv"])
    ap.add_argument("--ring-exact-rows", action="store_true", help="also time io_uring with one request per owned row range (rows not joined through junk gaps)")
    ap.add_argument("--map-reads", default=DEFAULTS["map_reads"], choices=list(MAP_READS), help="LoRAConfig.map_reads")
    ap.add_argument("--map-stagings", type=int, default=None, help="the mapper's staging buffers")
    ap.add_argument("--map-python", action="store_true", help="the mapper's chunks issued from Python")
    ap.add_argument("--map-ab", action="store_true",
                    help="also time later cold loads with map_reads='off' (the readers alone)")
    ap.add_argument("--python-reads", action="store_true",
                    help="also time cold loads with the readers' Python loop (native_reads=False)")
    ap.add_argument("--read-backends", default="", help="also time later cold loads with these read backends")
    ap.add_argument("--serial-place", action="store_true",
                    help="also time cold and warm loads with placements on the copy stream (no overlap)")
    ap.add_argument("--per-part", action="store_true",
                    help="also time cold loads with one reader task per part instead of the C batch")
    ap.add_argument("--read-aheads", default="", help="also time later cold loads with these read_ahead")
    ap.add_argument("--floor-threads", type=int, default=None)
    ap.add_argument("--trace", action="store_true",
                    help="timeline of the median cold load (readers, loader) and the rank's reads alone")
    ap.add_argument("--read-workers-list", default="", help="also time later cold loads with these read_workers")
    ap.add_argument("--part-bytes-list", default="", help="also time later cold loads with these part_bytes")
    ap.add_argument("--peers", default="", help="'all' or comma-separated peers, once per file")
    ap.add_argument("--baselines", action="store_true", help="eager / lazy (PR #20876) baselines")
    ap.add_argument("--drop-caches", action="store_true", help="disk bandwidth + cold with the page cache dropped")
    ap.add_argument("--drop-cases", default="llama8b-r16-tp1,llama31-70b-r128-tp1,qwen3moe-r16-ep8")
    ap.add_argument("--overlap", action="store_true", help="GEMM slowdown while a cold load streams")
    ap.add_argument("--case-run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peer-file", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    table = TINY_CASES if args.tiny else CASES
    root = Path(args.adapters)
    if args.case_run:  # child: one case in a fresh process
        c = table[args.case_run]
        r = case_run(args.case_run, c, make_adapter(root, args.case_run, c), args)
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    cases = list(table) if args.cases == "all" else args.cases.split(",")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "device": torch.cuda.get_device_name(DEV) if CUDA else "cpu", "cores": default_read_workers(),
                 "torch": torch.__version__, "cuda": torch.version.cuda, "argv": sys.argv,
                 "chunk_bytes": args.chunk_bytes, "pin_mode": args.pin_mode, "repeats": args.repeats,
                 "read_mode": args.read_mode, "cases": {}}
    print(f"# {res['device']} torch {res['torch']} cuda {res['cuda']} cores {res['cores']}", flush=True)
    seen_files: set[str] = set()
    for name in cases:
        c = table[name]
        t = time.perf_counter()
        path = make_adapter(root, name, c)
        gen_s = time.perf_counter() - t
        child = [sys.executable, __file__, "--case-run", name, "--json", str(out / f".{name}.json")]
        for a in sys.argv[1:]:
            child.append(a)
        if str(path) not in seen_files:
            seen_files.add(str(path))
            child.append("--peer-file")  # peers load the whole file: once per file
        if not (args.drop_caches and name in args.drop_cases.split(",")):
            child = [a for a in child if a != "--drop-caches"]
        p = subprocess.run(child, capture_output=True, text=True)
        if p.returncode != 0:
            res["cases"][name] = {"error": p.stderr[-2000:]}
            print(f"{name}: FAILED\n{p.stderr[-2000:]}", flush=True)
            continue
        r = json.loads((out / f".{name}.json").read_text())
        (out / f".{name}.json").unlink()
        r["gen_s"] = gen_s
        res["cases"][name] = r
        print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'ours'}, default=str)}", flush=True)
        (out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
    if args.overlap and CUDA:
        oc = "llama31-70b-r128-tp1" if "llama31-70b-r128-tp1" in cases else cases[0]
        res["overlap"] = bench_overlap(make_adapter(root, oc, table[oc]), table[oc], args.chunk_bytes)
        res["overlap"]["case"] = oc
    (out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
    print_table(res)
    try:
        plot(res, out / "bench.png")
    except Exception as e:  # noqa: BLE001
        print("plot failed:", e)
    return 0


PEER_COLS = ["safetensors", "instanttensor_default", "instanttensor_mmap", "instanttensor_uring_buffered",
             "fastsafetensors", "runai"]


def print_table(res: dict) -> None:
    print(f"\n{res['device']}, {res['cores']} cores, {res['date']}; times in ms")
    hdr = (f"{'case':<22}{'MiB':>8}{'read MiB':>9}{'first':>8}{'cold':>8}{'floor':>8}{'c/floor':>8}"
           f"{'1st/c':>7}{'warm':>8}{'%peak':>7}" + "".join(f"{p[:12]:>13}" for p in PEER_COLS)
           + f"{'eager':>8}{'lazy':>8}")
    print(hdr)
    for name, r in res["cases"].items():
        if "error" in r:
            print(f"{name:<22} error")
            continue
        o = r["ours"]
        ms = lambda k: r.get(k, float("nan")) * 1e3  # noqa: E731
        print(f"{name:<22}{o['bytes'] / 2**20:8.1f}{o['bytes_read'] / 2**20:9.1f}{ms('first_cold_s'):8.1f}"
              f"{ms('cold_s'):8.1f}{ms('floor_s'):8.1f}{r['cold_over_floor']:8.2f}{r['first_over_cold']:7.2f}"
              f"{ms('warm_s'):8.2f}{r['warm_frac_of_peak']:7.1%}"
              + "".join(f"{ms(p + '_s'):13.1f}" for p in PEER_COLS) + f"{ms('eager_s'):8.1f}{ms('lazy_s'):8.1f}")
        extra = {k: v for k, v in r.items() if k.startswith(("cold_exact", "cold_span", "cold_auto", "disk",
                                                              "cold_dropped", "cold_place", "cold_ahead", "cold_ring",
                                                              "cold_backend", "cold_readers", "cold_part"))}
        if extra:
            print("   ", json.dumps(extra))
        for kind in ("cold", "warm"):
            ph = o.get(f"{kind}_phases")
            if ph:
                print(f"    {kind} activation: total {ph['total_s'] * 1e3:.2f} ms = load {ph['load_s'] * 1e3:.2f} + "
                      f"outside it {(ph['total_s'] - ph['load_s']) * 1e3:.2f} (start {ph['start_s'] * 1e3:.2f}, await "
                      f"{ph['await_s'] * 1e3:.2f} of which queued {ph['queued_s'] * 1e3:.2f} and wake "
                      f"{ph['wake_s'] * 1e3:.2f}, agree "
                      f"{ph['agree_s'] * 1e3:.2f}, commit {ph['commit_s'] * 1e3:.2f})")
        t = o.get("trace")
        if t:
            print(f"    trace: parts {o['part_bytes'] >> 10} KiB x {t['units']}, readers used {t['reader_threads_used']}, "
                  f"busy {t['reader_busy_frac']:.0%} of load ({t['reader_busy_frac_in_reads']:.0%} between first and "
                  f"last read), reads alone {o['reads_only_s'] * 1e3:.1f} ms, first read at "
                  f"{t['first_read_start_s'] * 1e3:.2f} ms, last read end {t['last_read_end_s'] * 1e3:.1f} ms, after it "
                  f"{t['after_last_read_s'] * 1e3:.1f} ms; loader wait {t['loader_wait_s'] * 1e3:.1f} / issue "
                  f"{t['loader_issue_s'] * 1e3:.1f} ms in {t['loader_issues']} (max {t['max_issue_s'] * 1e3:.2f}); slowest "
                  f"unit {t['slowest_unit_s'] * 1e3:.2f} ms ({t['slowest_unit_syscalls']} reads), median "
                  f"{t['unit_read_s_median'] * 1e3:.2f} ms; buffer wait {t['buffer_wait_s'] * 1e3:.1f} ms")
            if t.get("marks_ms"):
                print("    before the first read (ms from the load's start):",
                      ", ".join(f"{k} {v:.3f}" for k, v in t["marks_ms"].items()))
    if "overlap" in res:
        print("overlap:", res["overlap"])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in res["cases"].items() if "error" not in r]
    series = [("ours first (fresh process)", "first_cold_s"), ("ours cold", "cold_s"), ("floor", "floor_s"),
              ("ours warm", "warm_s"), ("safetensors", "safetensors_s"),
              ("InstantTensor best buffered", None), ("fastsafetensors", "fastsafetensors_s"),
              ("Run:ai", "runai_s")]
    fig, ax = plt.subplots(figsize=(12, 5))
    w = 0.8 / len(series)
    for i, (lab, key) in enumerate(series):
        vals = []
        for n in names:
            r = res["cases"][n]
            if key is None:
                v = min((r[k] for k in ("instanttensor_mmap_s", "instanttensor_uring_buffered_s") if k in r),
                        default=float("nan"))
            else:
                v = r.get(key, float("nan"))
            vals.append(v * 1e3)
        ax.bar([j + (i - len(series) / 2) * w for j in range(len(names))], vals, w, label=lab)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15)
    ax.set_ylabel("ms (log)")
    ax.set_title(f"adapter load, one rank — {res['device']}, {res['date']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How many times a node's ranks read each byte of an adapter file from storage (issue 16).

    PYTHONPATH=. python scripts/bench_node.py --out out/node [--cases llama8b-r16-tp1:8,qwen3moe-r16-ep8:8]

Each case is ``NAME:RANKS`` (a preset of ``bench_load.py``; the rank count is its TP size, with EP as the
preset has it). RANKS processes on this machine each build the rank's manager (device: CUDA if there is
one, else the CPU path: the same reader, packing and page-cache behaviour) and register the adapter.
Then, after one untimed activation (a process's first also loads code from disk), per mode: ``dropped`` (the file's pages evicted from the page cache with
``posix_fadvise(DONTNEED)``, the per-file form of drop_caches that needs no root) and ``cached``, all ranks
activate at once. Each reports the bytes it asked for (``bytes_read`` of its load stats) and what the
kernel fetched from storage for it (``read_bytes`` of ``/proc/self/io``). Summed over the ranks and
divided by the file's tensor bytes: ``asked_per_file_byte`` (replicated tensors are asked for by every
rank) and ``disk_per_file_byte`` (the goal: 1.0, each byte from storage once; readahead can add a little).
Writes ``node.json`` into --out and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", Path(__file__).with_name("bench_load.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("no read_bytes in /proc/self/io")


def _rank(c: dict, path: str, rank: int, ranks: int, modes: list[str], ready, go, out) -> None:
    import torch

    from tp_lora.plan.model import ModelSpec
    from tp_lora.plan.parallel import ParallelSpec
    from tp_lora.runtime.manager import LoRAConfig, LoRAManager

    torch.set_num_threads(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    spec = ModelSpec.from_preset(c["preset"])
    ep = ranks if c["ep"] > 1 else 1
    cfg = LoRAConfig(max_loras=1, max_lora_rank=c["rank"], dtype="bfloat16", device=dev,
                     host_cache_bytes=8 << 30, read_workers=max(1, (os.cpu_count() or 2) // ranks))
    mgr = LoRAManager(cfg, spec, ParallelSpec(tp_size=ranks, tp_rank=rank, ep_size=ep))
    res = {"rank": rank}
    try:
        for i, mode in enumerate(modes):
            name = f"{mode}{i}"
            mgr.register(name, path)
            mgr.engine.wait_prepared()
            ready.wait()  # every rank registered: the parent drops the file's pages (mode "dropped")
            go.wait()
            b = _io_read_bytes()
            t = time.perf_counter()
            mgr.activate(name)
            dt = time.perf_counter() - t
            ls = mgr.stats().load_stats[-1]
            res[mode] = {"disk_bytes": _io_read_bytes() - b, "asked_bytes": ls["bytes_read"],
                         "owned_bytes": ls["bytes_planned"], "activate_s": dt}
            mgr.cache.evict(name)  # the next mode loads cold (the cache is keyed by content)
    finally:
        mgr.close()
        out.put(res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/node")
    ap.add_argument("--adapters", default="/tmp/tp_lora_bench_adapters")
    ap.add_argument("--cases", default="llama8b-r16-tp1:8,qwen3moe-r16-ep8:8")
    ap.add_argument("--tiny", action="store_true", help="tiny presets (CI-sized)")
    args = ap.parse_args()
    BL = _bench_load()
    table = BL.TINY_CASES if args.tiny else BL.CASES
    root = Path(args.adapters)
    root.mkdir(parents=True, exist_ok=True)
    # "warmup" first (not reported): a process's first activation also loads code from disk
    modes = ["warmup", "dropped", "cached"]
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv,
                 "cores": os.cpu_count(), "cases": {}}
    ctx = mp.get_context("spawn")
    for item in args.cases.split(","):
        name, ranks = item.split(":")
        ranks = int(ranks)
        c = table[name]
        path = BL.make_adapter(root, name, c)
        w = path / BL.W
        with open(w, "rb") as f:  # the tensor bytes: the file less its 8-byte length and the JSON header
            tensor_bytes = w.stat().st_size - 8 - int.from_bytes(f.read(8), "little")
        ready, go, out = ctx.Barrier(ranks + 1), ctx.Barrier(ranks + 1), ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(c, str(path), r, ranks, modes, ready, go, out))
                 for r in range(ranks)]
        for p in procs:
            p.start()
        for mode in modes:
            ready.wait(timeout=600)
            if mode == "dropped":
                os.sync()
                fd = os.open(w, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            else:
                BL.page_cache(path)
            go.wait(timeout=600)
        per = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        per.sort(key=lambda r: r["rank"])
        r: dict = {"ranks": ranks, "file_bytes": w.stat().st_size, "tensor_bytes": tensor_bytes, "per_rank": per}
        for mode in modes[1:]:
            disk = sum(x[mode]["disk_bytes"] for x in per)
            asked = sum(x[mode]["asked_bytes"] for x in per)
            r[mode] = {"disk_bytes": disk, "asked_bytes": asked,
                       "disk_per_file_byte": disk / tensor_bytes, "asked_per_file_byte": asked / tensor_bytes,
                       "activate_s_max": max(x[mode]["activate_s"] for x in per)}
        res["cases"][item] = r
        print(item, json.dumps({m: r[m] for m in modes[1:]}), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "node.json").write_text(json.dumps(res, indent=2))
    print(f"\n{'case':<26}{'mode':>9}{'file MiB':>10}{'asked MiB':>11}{'disk MiB':>10}{'asked/B':>9}{'disk/B':>8}")
    for item, r in res["cases"].items():
        for mode in modes[1:]:
            m = r[mode]
            print(f"{item:<26}{mode:>9}{r['tensor_bytes'] / 2**20:10.1f}{m['asked_bytes'] / 2**20:11.1f}"
                  f"{m['disk_bytes'] / 2**20:10.1f}{m['asked_per_file_byte']:9.2f}{m['disk_per_file_byte']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

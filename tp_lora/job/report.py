"""The main job's report: build it as a plain dict (JSON-able), format it as a text table."""

from __future__ import annotations

import dataclasses
import datetime
import platform
from typing import Any

import torch

from ..runtime.manager import ManagerStats
from ..plan.model import ModelSpec
from ..plan.planner import SlicePlan


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def build_report(*, cfg: Any, spec: ModelSpec, world: int, device: torch.device,
                 stats: list[ManagerStats] | None, plans: dict[str, SlicePlan], verify: list[dict[str, Any]],
                 serve_s: float, tokens: int, batches: int, wall_s: float,
                 nodes: list[str] | None = None) -> dict[str, Any]:
    stats = stats or []
    ranks = []
    for st in stats:
        cold = [t for (_, warm, t) in st.activation_s if not warm]
        warm = [t for (_, warm, t) in st.activation_s if warm]
        lookups = st.cache_hits + st.cache_misses
        full_per_load = 0  # what the same loads would have pinned as whole tensors on every rank
        for ls in st.load_stats:
            p = plans.get(ls["adapter"])
            full_per_load += p.full_bytes if p is not None else 0
        ranks.append({
            "rank": st.rank,
            "loads": st.loads, "cold_loads": st.cold_loads, "warm_loads": st.warm_loads,
            "streamed_loads": st.streamed_loads, "failed_loads": st.failed_loads,
            "bytes_planned": st.bytes_planned, "bytes_read": st.bytes_read, "bytes_pinned": st.bytes_pinned,
            "bytes_copied": st.bytes_copied,
            "bytes_whole_tensors": full_per_load,
            "pinned_now": st.pinned_bytes_now, "pinned_planned_now": st.pinned_planned_now,
            "pinned_equals_planned": st.pinned_bytes_now == st.pinned_planned_now,
            "h2d_gbps": st.h2d_gbps,
            "activation_cold_p50_ms": _pct(cold, 50) * 1e3, "activation_cold_p99_ms": _pct(cold, 99) * 1e3,
            "activation_warm_p50_ms": _pct(warm, 50) * 1e3, "activation_warm_p99_ms": _pct(warm, 99) * 1e3,
            "activations": st.activations, "cache_hit_rate": (st.cache_hits / lookups) if lookups else 0.0,
            "cache_evictions": st.cache_evictions, "slot_evictions": st.slot_evictions,
            "collectives": st.collectives, "peak_inflight_bytes": st.peak_inflight_bytes,
            "inflight_bound": st.inflight_bound,
        })
    per_adapter = {n: {"rank_bytes": p.nbytes, "whole_bytes": p.full_bytes, "slices": len(p.ops),
                       "max_rank": p.max_rank} for n, p in plans.items()}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "torch": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "model": spec.name, "world_size": world, "tp_size": world, "ep_size": cfg.ep_size,
        "max_loras": cfg.max_loras, "adapters": len(plans), "batches": batches, "tokens": tokens,
        "serve_s": serve_s, "wall_s": wall_s, "tokens_per_s": tokens / serve_s if serve_s > 0 else 0.0,
        "per_adapter_rank0": per_adapter, "ranks": ranks,
        "nodes": {n: [r for r, m in enumerate(nodes or []) if m == n] for n in dict.fromkeys(nodes or [])},
        "verification": {
            "checked_batches": len(verify), "failed": sum(not v["ok"] for v in verify),
            "max_abs_err": max((v["max_abs_err"] for v in verify), default=0.0),
            "max_rel_err": max((v["max_rel_err"] for v in verify), default=0.0),
        },
        "config": _cfg_dict(cfg),
    }


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    try:
        return dataclasses.asdict(cfg)
    except TypeError:
        return {}


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"tp_lora serving report  {r['date']}  device={r['device']}  torch={r['torch']}",
        f"model={r['model']}  world={r['world_size']} (tp={r['tp_size']}, ep={r['ep_size']})  "
        f"slots={r['max_loras']}  adapters={r['adapters']}  batches={r['batches']}  tokens={r['tokens']}  "
        f"serve={r['serve_s']:.2f}s ({r['tokens_per_s']:.0f} tok/s)",
        "ranks per node: " + "  ".join(f"{n}: {rs}" for n, rs in r.get("nodes", {}).items()),
        "",
        "per rank (MiB)   loads cold/warm  planned   read  pinned  copied  whole-tensors  saved   "
        "pinned==plan  H2D GB/s  act cold p50/p99 ms  act warm p50/p99 ms  cache hit  evict slot/cache  colls",
    ]
    for x in r["ranks"]:
        saved = 1 - x["bytes_planned"] / x["bytes_whole_tensors"] if x["bytes_whole_tensors"] else 0.0
        lines.append(
            f"rank {x['rank']:<3}        {x['loads']:>4} {x['cold_loads']:>3}/{x['warm_loads']:<3}  "
            f"{_mib(x['bytes_planned']):>7} {_mib(x['bytes_read']):>6} {_mib(x['bytes_pinned']):>7} "
            f"{_mib(x['bytes_copied']):>7} {_mib(x['bytes_whole_tensors']):>13}  {saved:6.1%}  "
            f"{str(x['pinned_equals_planned']):>12}  {x['h2d_gbps']:8.2f}  "
            f"{x['activation_cold_p50_ms']:8.2f}/{x['activation_cold_p99_ms']:<8.2f}  "
            f"{x['activation_warm_p50_ms']:8.2f}/{x['activation_warm_p99_ms']:<8.2f}  "
            f"{x['cache_hit_rate']:8.1%}  {x['slot_evictions']:>6}/{x['cache_evictions']:<6}  {x['collectives']:>5}")
    v = r["verification"]
    lines += ["", f"verification vs single-process reference: {v['checked_batches']} batches checked, "
                  f"{v['failed']} failed, max abs err {v['max_abs_err']:.3g}, max rel err {v['max_rel_err']:.3g}"]
    return "\n".join(lines)

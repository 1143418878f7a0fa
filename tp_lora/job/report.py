"""The main job's report: built as a plain dict (JSON-able), formatted as aligned text tables.

Every column and JSON key is explained in docs/REPORT.md. Values that do not exist on this run are
``None`` in JSON and ``-`` in the text (no ``nan``): CUDA-only quantities (pinned bytes, H2D bandwidth) on a
CPU run, warm-activation latencies when no activation was warm.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from typing import Any, Sequence

import torch

from ..runtime.manager import ManagerStats
from ..plan.model import ModelSpec
from ..plan.parallel import ParallelSpec
from ..plan.planner import SlicePlan
from .console import format_table

#: What the verification compares (printed with the numbers, explained in docs/REPORT.md).
VERIFY_METRIC = "max |TP logits - reference logits| / max |reference logits| per checked batch"


def _pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``xs``; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def node_name(index: int) -> str:
    """The report's name of torchrun's node ``index`` (GROUP_RANK; 0 for a single process)."""
    return f"node{index}"


def build_report(*, cfg: Any, spec: ModelSpec, world: int, device: torch.device,
                 stats: list[ManagerStats] | None, plans: dict[str, SlicePlan], verify: list[dict[str, Any]],
                 serve_s: float, tokens: int, batches: int, wall_s: float, tolerance: float,
                 nodes: Sequence[tuple[int, str]] | None = None,
                 parallel: ParallelSpec | None = None) -> dict[str, Any]:
    """The report of one run. ``stats``: every rank's ManagerStats (rank 0 gathers them); ``nodes``: (node
    index, host) of each rank; ``verify``: one entry per checked batch (``run._verify``); ``parallel``: the
    layout the managers ran (default: the config's ``ep_size`` / ``moe_replicated``; the transformers engine
    passes the one it detected)."""
    ep_size = cfg.ep_size if parallel is None else parallel.ep_size
    moe_replicated = bool(cfg.moe_replicated if parallel is None else parallel.moe_replicated)
    stats = stats or []
    nodes = list(nodes or [])
    cuda = device.type == "cuda"
    ranks = []
    for st in stats:
        cold = [t for (_, warm, t) in st.activation_s if not warm]
        warm = [t for (_, warm, t) in st.activation_s if warm]
        lookups = st.cache_hits + st.cache_misses
        whole = 0  # what the same loads would have pinned as whole tensors on every rank
        for ls in st.load_stats:
            p = plans.get(ls["adapter"])
            whole += p.full_bytes if p is not None else 0
        ranks.append({
            "rank": st.rank,
            "node": node_name(nodes[st.rank][0]) if st.rank < len(nodes) else None,
            "loads": st.loads, "cold_loads": st.cold_loads, "warm_loads": st.warm_loads,
            "streamed_loads": st.streamed_loads, "failed_loads": st.failed_loads,
            "bytes_planned": st.bytes_planned, "bytes_read": st.bytes_read,
            "bytes_pinned": st.bytes_pinned if cuda else None,
            "bytes_copied": st.bytes_copied,
            "bytes_whole_tensors": whole,
            "saved_fraction": (1 - st.bytes_planned / whole) if whole else None,
            "host_cache_now": st.pinned_bytes_now, "host_cache_planned_now": st.pinned_planned_now,
            "host_cache_equals_planned": st.pinned_bytes_now == st.pinned_planned_now,
            "h2d_gbps": st.h2d_gbps if cuda and st.h2d_s > 0 else None,
            "activation_cold_p50_ms": _ms(_pct(cold, 50)), "activation_cold_p99_ms": _ms(_pct(cold, 99)),
            "activation_warm_p50_ms": _ms(_pct(warm, 50)), "activation_warm_p99_ms": _ms(_pct(warm, 99)),
            "activations": st.activations,
            "cache_hit_rate": (st.cache_hits / lookups) if lookups else None,
            "cache_evictions": st.cache_evictions, "slot_evictions": st.slot_evictions,
            "collectives": st.collectives, "peak_inflight_bytes": st.peak_inflight_bytes,
            "inflight_bound": st.inflight_bound,
        })
    per_adapter = {n: {"rank_bytes": p.nbytes, "whole_bytes": p.full_bytes, "slices": len(p.ops),
                       "max_rank": p.max_rank} for n, p in plans.items()}
    by_node: dict[str, dict[str, Any]] = {}
    for r, (index, host) in sorted(enumerate(nodes), key=lambda x: (x[1][0], x[0])):
        by_node.setdefault(node_name(index), {"host": host, "ranks": []})["ranks"].append(r)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "torch": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
        "device_type": device.type,
        "model": spec.name, "world_size": world, "tp_size": world, "ep_size": ep_size,
        "moe_replicated": moe_replicated,
        "max_loras": cfg.max_loras, "adapters": len(plans), "batches": batches, "tokens": tokens,
        "serve_s": serve_s, "wall_s": wall_s, "tokens_per_s": tokens / serve_s if serve_s > 0 else None,
        "per_adapter_rank0": per_adapter, "ranks": ranks, "nodes": by_node,
        "verification": {
            "metric": VERIFY_METRIC, "tolerance": tolerance,
            "checked_batches": len(verify), "failed": sum(not v["ok"] for v in verify),
            "max_rel_err": max((v["rel_err"] for v in verify), default=None),
            "max_abs_err": max((v["max_abs_err"] for v in verify), default=None),
            "max_abs_ref": max((v["max_abs_ref"] for v in verify), default=None),
        },
        "config": _cfg_dict(cfg),
    }


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    try:
        return dataclasses.asdict(cfg)
    except TypeError:
        return {}


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def format_report(r: dict[str, Any]) -> str:
    """The text report (rank 0 prints it); docs/REPORT.md explains each line and column."""
    cuda = r.get("device_type") == "cuda"
    nodes = "  ".join(f"{n} ({v['host']}): {v['ranks']}" for n, v in r.get("nodes", {}).items())
    lines = [
        f"tp_lora serving report  {r['date']}  device={r['device']}  torch={r['torch']}",
        f"model={r['model']}  world={r['world_size']} (tp={r['tp_size']}, ep={r['ep_size']}"
        f"{', experts replicated' if r.get('moe_replicated') else ''})  "
        f"slots={r['max_loras']}  adapters={r['adapters']}  batches={r['batches']}  tokens={r['tokens']}  "
        f"serve={r['serve_s']:.2f}s ({_f(r['tokens_per_s'], '.0f')} tok/s)",
        f"ranks per node: {nodes}",
        "",
        "loads and bytes per rank (MiB, summed over the run's loads; warm loads are served from the host "
        "cache, so read < planned)",
    ]
    head = ["rank", "node", "loads", "cold", "warm", "planned", "read from disk"]
    head += ["pinned"] if cuda else []
    head += ["copied to pool", "whole tensors", "saved", "host cache now", "cache = plan"]
    rows = []
    for x in r["ranks"]:
        row = [str(x["rank"]), x["node"] or "-", str(x["loads"]), str(x["cold_loads"]), str(x["warm_loads"]),
               _mib(x["bytes_planned"]), _mib(x["bytes_read"])]
        row += [_mib(x["bytes_pinned"])] if cuda else []
        row += [_mib(x["bytes_copied"]), _mib(x["bytes_whole_tensors"]), _f(x["saved_fraction"], ".1%"),
                _mib(x["host_cache_now"]), "yes" if x["host_cache_equals_planned"] else "NO"]
        rows.append(row)
    lines += format_table(head, rows, left=2)
    lines += ["", "activations per rank (latency in ms; cold = read from disk, warm = from the host cache)"]
    head = ["rank", "activations", "cold p50", "cold p99", "warm p50", "warm p99"]
    head += ["H2D GB/s"] if cuda else []
    head += ["cache hits", "slot evictions", "cache evictions", "collectives"]
    rows = []
    for x in r["ranks"]:
        row = [str(x["rank"]), str(x["activations"])]
        row += [_f(x[f"activation_{k}_ms"], ".2f") for k in ("cold_p50", "cold_p99", "warm_p50", "warm_p99")]
        row += [_f(x["h2d_gbps"], ".2f")] if cuda else []
        row += [_f(x["cache_hit_rate"], ".1%"), str(x["slot_evictions"]), str(x["cache_evictions"]),
                str(x["collectives"])]
        rows.append(row)
    lines += format_table(head, rows, left=1)
    if not cuda:
        lines.append("  (CPU run: no pinned memory and no host-to-device copies, so no pinned or H2D columns)")
    v = r["verification"]
    lines.append("")
    if v["checked_batches"] == 0:
        lines.append("verification vs single-process reference: off (workload.verify_every = 0)")
    else:
        lines.append(
            f"verification vs single-process reference: {v['checked_batches']} batches checked, "
            f"{v['failed']} failed: max |TP - ref| / max |ref| = {_f(v['max_rel_err'], '.3g')} "
            f"(tolerance {v['tolerance']:.3g}; max |TP - ref| = {_f(v['max_abs_err'], '.3g')}, "
            f"max |ref| = {_f(v['max_abs_ref'], '.3g')})")
    return "\n".join(lines)

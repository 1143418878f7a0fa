"""The main job: a multi-adapter serving run on the reference TP model, with a report.

    torchrun --nproc-per-node 2 -m tp_lora.run configs/demo.yaml [--json out.json] [--set key=value ...]
    tp-lora run demo                      # one process; a shipped run config by name, from any directory

Every rank builds its shard of the model and a LoRAManager; a seeded stream of requests mixes more
adapters than there are GPU slots, so adapters are prefetched, activated, evicted and re-activated from
the pinned cache. Every ``verify_every``-th batch is checked on rank 0 against a single-process (TP=1)
reference. Rank 0 prints the report (and writes it as JSON with ``--json``).
Without torchrun (no RANK in the environment) it runs as a single rank. The TP size is the world size
(every process is one TP rank). Exit status and error lines: ``tp_lora.job.console``; the report's
columns and JSON keys: docs/REPORT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..runtime.activation import LOCAL
from ..errors import ConfigError, LayoutError, TPLoRAError
from ..runtime.manager import LoRAConfig, LoRAManager
from ..plan.model import ModelSpec, load_model_spec
from ..format.dtypes import serving_dtype
from ..format.modules import POOL_MODULES
from ..ops.layer import LoRAOps
from ..plan.layout import RankLayout
from ..plan.parallel import ParallelSpec
from . import console
from .atomic import write_folder
from .report import build_report, format_report
from .runconfig import RunConfig, load_run_config, run_config_help, verify_tolerance
from .synthetic import check_targets, write_synthetic_adapter

log = logging.getLogger("tp_lora.run")



# --------------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------------
def pick_device(requested: str, gpus: int, local_rank: int, local_world: int) -> torch.device:
    """This rank's device: one GPU per rank on its node (NCCL cannot put two ranks on one GPU), else CPU.

    ``auto`` takes CUDA when the node has a GPU for each of its ranks and falls back to CPU (gloo) with a
    warning when it has fewer; ``cuda`` insists and says what to change. Pure: the caller passes what it
    sees (``torch.cuda.device_count()``, torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE)."""
    if requested == "cpu" or (requested == "auto" and gpus == 0):
        return torch.device("cpu")
    if gpus == 0:
        raise ConfigError("device: cuda, but no CUDA GPU is visible here (device: auto picks cuda when "
                          "present, else cpu)")
    if local_world > gpus:
        msg = (f"{local_world} ranks on this node but {gpus} GPU(s) visible; NCCL needs one GPU per rank: "
               f"start at most {gpus} per node (torchrun --nproc-per-node {gpus})")
        if requested == "cuda":
            raise ConfigError(f"device: cuda: {msg}, or use device: cpu")
        log.warning("device auto: %s; running on CPU with gloo instead", msg)
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(cfg: RunConfig, timeout_s: float) -> tuple[int, int, torch.device]:
    """(rank, world, device). gloo + CPU without CUDA, NCCL + one GPU per rank with it."""
    torchrun = "RANK" in os.environ
    local = int(os.environ.get("LOCAL_RANK", 0)) if torchrun else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if torchrun else 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = pick_device(cfg.device, gpus, local, local_world)
    if not torchrun:
        return 0, 1, dev
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(timeout_s, 60.0)),
                            **({"device_id": dev} if backend == "nccl" else {}))
    return rank, world, dev


def _barrier(world: int, dev: torch.device) -> None:
    if world > 1:
        if dev.type == "cuda":
            dist.barrier(device_ids=[dev.index])
        else:
            dist.barrier()


# --------------------------------------------------------------------------------------------------
# inputs: base weights and adapters (written once per node, atomically)
# --------------------------------------------------------------------------------------------------
def _cached_folder(final: Path, make) -> Path:
    """``final`` built once (atomically, see ``atomic.write_folder``); a ``.complete`` marker says it is whole."""
    if not (final / ".complete").exists():
        def build(tmp: Path) -> None:
            make(tmp)
            (tmp / ".complete").write_text("ok")

        write_folder(final, build)  # False: another node's rank 0 got there first (shared file system)
    return final


def prepare_inputs(cfg: RunConfig, spec: ModelSpec, local_rank: int, world: int,
                   dev: torch.device) -> tuple[Path, dict[str, Path]]:
    from ..reference.checkpoint import write_random_checkpoint

    root = cfg.cache_path
    base = Path(cfg.base_weights) if cfg.base_weights else root / f"base-{spec.name}-seed{cfg.seed}"
    names: dict[str, Path] = {}
    if cfg.adapters:
        names = {n: Path(p) for n, p in cfg.adapters.items()}
    else:
        s = cfg.synthetic
        for i in range(s.count):
            r = s.ranks[i % len(s.ranks)]
            names[f"syn{i}-r{r}"] = root / f"adapters-{spec.name}" / f"syn{i}-r{r}-{s.dtype}-seed{s.seed + i}"
    if local_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if not cfg.base_weights:
            _cached_folder(base, lambda d: write_random_checkpoint(spec, d, seed=cfg.seed))
        if not cfg.adapters:
            s = cfg.synthetic
            for i, (n, p) in enumerate(names.items()):
                r = s.ranks[i % len(s.ranks)]
                p.parent.mkdir(parents=True, exist_ok=True)
                _cached_folder(p, lambda d, r=r, i=i: write_synthetic_adapter(
                    d, spec, rank=r, targets=s.targets, dtype=s.dtype, seed=s.seed + i))
    _barrier(world, dev)
    return base, names


# --------------------------------------------------------------------------------------------------
# the serving loop
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Request:
    adapter: str | None
    tokens: torch.Tensor  # [n]


def make_workload(cfg: RunConfig, names: list[str], vocab: int, max_loras: int) -> list[list[Request]]:
    """Seeded batches; each batch uses at most ``max_loras`` distinct adapters (a slot each)."""
    w = cfg.workload
    rng = random.Random(w.seed)
    g = torch.Generator().manual_seed(w.seed)
    weights = [1.0 / (i + 1) for i in range(len(names))]  # Zipf-like popularity
    batches: list[list[Request]] = []
    left = w.requests
    while left > 0:
        n = min(w.batch_size, left)
        left -= n
        pool = rng.choices(names, weights=weights, k=max_loras) if names else []
        batch = []
        for _ in range(n):
            ad = None if (not pool or rng.random() < w.no_adapter_fraction) else rng.choice(pool)
            ln = rng.randint(w.tokens_min, w.tokens_max)
            batch.append(Request(ad, torch.randint(0, vocab, (ln,), generator=g)))
        batches.append(batch)
    return batches


def ensure_active(mgr: LoRAManager, need: set[str]) -> None:
    """Activate what a batch needs. ``activate`` holds the listed adapters that are already active
    while it chooses slots for the others, so passing all of them keeps them from being evicted."""
    if any(not mgr.is_active(n) for n in need):
        mgr.activate(sorted(need))


def _forward(model: Any, batch: list[Request], mgr: LoRAManager | None) -> torch.Tensor:
    ids = torch.cat([r.tokens for r in batch])
    pos = torch.cat([torch.arange(len(r.tokens)) for r in batch])
    lens = [len(r.tokens) for r in batch]
    if mgr is None:
        return model.forward(ids, pos, lens)
    with mgr.prepare_batch([r.adapter for r in batch], lens) as info:
        return model.forward(ids, pos, lens, lora=LoRAOps(mgr.pool, info))


class VerificationError(TPLoRAError):
    """The TP run's logits differ from the single-process reference by more than the tolerance."""


def job_layout(cfg: RunConfig, spec: ModelSpec, world: int, rank: int) -> RankLayout:
    """This rank's layout: TP over every process (tp_size = world size), EP from the config. Checked before
    any process group exists, so a bad layout is one clean error on every rank."""
    try:
        layout = RankLayout(spec, ParallelSpec(tp_size=world, tp_rank=rank, ep_size=cfg.ep_size,
                                               moe_replicated=cfg.moe_replicated))
    except LayoutError as e:
        how = ("torchrun --nproc-per-node N" if "RANK" in os.environ
               else "one process here; start N with torchrun --nproc-per-node N")
        raise LayoutError(f"{e}; the job's tp_size is its world size, the number of processes: {world} "
                          f"({how}); ep_size={cfg.ep_size} and moe_replicated={cfg.moe_replicated} come from the "
                          f"run config") from None
    return layout


def check_json_path(path: str | None) -> None:
    """Fail before the run, not after it, when the report cannot be written where asked."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--json {path}: is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--json {path}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"--json {path}: not writable")


def _write_json(path: str, report: dict[str, Any]) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def run(cfg: RunConfig, *, json_path: str | None = None, progress: bool | None = None) -> dict[str, Any] | None:
    """The whole job on this rank; returns the report on rank 0 (None elsewhere).

    Everything that can be checked without a process group (model, layout, --json path) is checked first;
    the process group is destroyed on every way out (also on NCCL, also with one rank under torchrun)."""
    if cfg.engine == "transformers":
        from ..integrations.transformers_job import run_transformers
        return run_transformers(cfg, json_path=json_path, progress=progress)
    from ..reference.model import TPModel

    torchrun = "RANK" in os.environ  # as init_distributed decides
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if torchrun else (0, 1)
    spec = load_model_spec(cfg.model)
    parallel = job_layout(cfg, spec, world, rank)
    if not cfg.adapters:
        check_targets(spec, cfg.synthetic.targets, "synthetic.targets")
    if rank == 0:
        check_json_path(json_path)
    tol = verify_tolerance(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    t_start = time.perf_counter()
    try:
        rank, world, dev = init_distributed(cfg, cfg.activation_timeout_s)
        base, adapters = prepare_inputs(cfg, spec, local_rank, world, dev)
        group = dist.group.WORLD if world > 1 else None
        dtype = serving_dtype(cfg.dtype)
        model = TPModel(spec, parallel, group, dtype=dtype, device=dev)
        model.load_hf_weights(base)
        lcfg = LoRAConfig(max_loras=cfg.max_loras, max_lora_rank=cfg.max_lora_rank,
                          target_modules=tuple(cfg.target_modules or POOL_MODULES),
                          host_cache_bytes=cfg.host_cache_bytes, dtype=cfg.dtype, device=str(dev),
                          chunk_bytes=cfg.chunk_bytes, activation_timeout_s=cfg.activation_timeout_s)
        mgr = LoRAManager(lcfg, spec, parallel, group=group)
        ref = ref_mgr = None
        if rank == 0 and cfg.workload.verify_every > 0:
            ref = TPModel(spec, ParallelSpec(tp_size=1, tp_rank=0), None, dtype=dtype, device=dev)
            ref.load_hf_weights(base)
            ref_mgr = LoRAManager(dataclasses.replace(lcfg, host_cache_bytes=0), spec,
                                  ParallelSpec(tp_size=1, tp_rank=0), group=LOCAL)
        batches, verify, tokens, serve_s = serve(cfg, mgr, ref, ref_mgr, adapters, spec.vocab_size,
                                                 lambda batch: _forward(model, batch, mgr), tol=tol,
                                                 show=rank == 0 and (sys.stderr.isatty() if progress is None
                                                                     else progress))
        stats = mgr.aggregate_stats()
        nodes = _gather_nodes(world)
        report = None
        if rank == 0:
            report = build_report(cfg=cfg, spec=spec, world=world, device=dev, stats=stats,
                                  plans={n: mgr.plan(n) for n in adapters}, verify=verify, tolerance=tol,
                                  serve_s=serve_s, tokens=tokens, batches=len(batches),
                                  wall_s=time.perf_counter() - t_start, nodes=nodes)
            print(format_report(report), flush=True)
            if json_path:
                _write_json(json_path, report)
        mgr.close()
        if ref_mgr is not None:
            ref_mgr.close()
        _barrier(world, dev)
        failed = [v for v in verify if not v["ok"]]
        if failed:  # after the barrier: the other ranks finish cleanly, rank 0 reports the failure
            worst = max(failed, key=lambda v: v["rel_err"])
            raise VerificationError(
                f"verification failed on {len(failed)} of {len(verify)} checked batches: max abs err / max "
                f"|reference| = {worst['rel_err']:.3g} > tolerance {tol:.3g} (adapters {worst['adapters']})")
        return report
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def serve(cfg: RunConfig, mgr: LoRAManager, ref: Any, ref_mgr: LoRAManager | None, adapters: dict[str, Path],
          vocab: int, forward: Any, *, tol: float, show: bool, desc: str = "serving"
          ) -> tuple[list[list[Request]], list[dict[str, Any]], int, float]:
    """Register the adapters (and with the reference manager), serve the workload through ``forward(batch)
    -> logits [T, vocab]``, verify every ``verify_every``-th batch against the reference. Shared by both
    engines (reference model, transformers). Returns (batches, verification entries, tokens, seconds)."""
    for n, p in adapters.items():
        mgr.register(n, p)
        if ref_mgr is not None:
            ref_mgr.register(n, p)
    batches = make_workload(cfg, list(adapters), vocab, cfg.max_loras)
    it: Any = batches
    if show:
        try:
            from tqdm import tqdm

            it = tqdm(batches, desc=desc, unit="batch")
        except ImportError:
            pass
    verify: list[dict[str, Any]] = []
    tokens = 0
    t_serve = time.perf_counter()
    for bi, batch in enumerate(it):
        ensure_active(mgr, {r.adapter for r in batch if r.adapter is not None})
        logits = forward(batch)
        tokens += sum(len(r.tokens) for r in batch)
        if ref is not None and bi % cfg.workload.verify_every == 0:
            verify.append(_verify(ref, ref_mgr, batch, logits, tol))
    return batches, verify, tokens, time.perf_counter() - t_serve


def _gather_nodes(world: int) -> list[tuple[int, str]]:
    """(node index, host) of each rank: torchrun's node rank (GROUP_RANK, 0 for one process) and the host
    name (Slurm's node name when Slurm started us)."""
    import socket

    me = (int(os.environ.get("GROUP_RANK", 0)), os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    if world == 1:
        return [me]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, me)
    return [(int(n), str(h)) for n, h in out]


def _verify(ref: Any, ref_mgr: LoRAManager, batch: list[Request], logits: torch.Tensor,
            tol: float) -> dict[str, Any]:
    """Logits of the TP run vs the single-process reference (adapters activated there one batch at a
    time; the reference pool has max_loras slots too).

    The metric is normwise: max |got - ref| / max |ref| over the batch's logits. An element-wise relative
    error means nothing on logits near zero (it is a ratio of two rounding errors there)."""
    need = sorted({r.adapter for r in batch if r.adapter is not None})
    ensure_active(ref_mgr, set(need))
    expect = _forward(ref, batch, ref_mgr).float()
    err = float((logits.float() - expect).abs().max())
    scale = float(expect.abs().max())
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    return {"requests": len(batch), "adapters": need, "max_abs_err": err, "max_abs_ref": scale,
            "rel_err": rel, "ok": rel <= tol}


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The main job's options (``python -m tp_lora.run`` and ``tp-lora run``)."""
    ap.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                    help=run_config_help())
    ap.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                    help="also write the report as JSON to FILE (keys: docs/REPORT.md); checked before the run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set workload.requests=100 (repeatable; VALUE is YAML)")
    ap.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                    help="progress bar on rank 0 (needs tqdm; auto: when stderr is a terminal)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the job for parsed arguments; failures propagate (``console.run_command`` ends the command)."""
    console.setup_logging(args.log_level)
    cfg = load_run_config(args.config, args.overrides)
    run(cfg, json_path=args.json_path, progress=None if args.progress == "auto" else args.progress == "on")
    return console.EXIT_OK


def build_parser(prog: str = "tp_lora.run") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, parents=[console.common_options()],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return console.run_command("tp_lora.run", lambda: run_from_args(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

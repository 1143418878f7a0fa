"""The main job on transformers' own TP model (``engine: transformers`` in the run config).

Same run as the reference engine (``tp_lora.job.run``): the same inputs (a local HF model folder in
``base_weights``, or the seeded tiny checkpoint written once; PEFT adapter folders or synthetic ones),
the same seeded workload, activations, report and verification, but every rank loads the model with
``from_pretrained(distributed_config=DistributedConfig(tp_size=world))`` (``ep_size=ep_size`` with EP;
``tp_plan=MOE_TP_PLAN`` when the config's ``moe_replicated: false`` asks for TP-sharded experts and this
transformers' default plan replicates them, as from 5.25) and tp_lora is attached to it (``tp_lora.integrations.transformers``). Every ``verify_every``-th batch is
checked on rank 0 against tp_lora's single-process reference model: two engines, one answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, LayoutError, TPLoRAError
from ..format.modules import POOL_MODULES
from ..job.report import build_report, format_report
from ..job.run import _barrier, _gather_nodes, init_distributed, prepare_inputs, serve
from ..format.dtypes import serving_dtype
from ..job.runconfig import RunConfig, verify_tolerance
from ..plan.model import load_model_spec
from ..plan.parallel import ParallelSpec
from ..runtime.activation import LOCAL
from ..runtime.manager import LoRAConfig, LoRAManager
from .transformers import MOE_TP_PLAN, attach, build_manager



def _load(base: Path, world: int, cfg: RunConfig, moe: bool, dtype: torch.dtype, dev: torch.device) -> Any:
    """The base model in transformers' TP over ``world`` ranks, its MoE experts laid out as the config says:
    EP groups (``ep_size`` > 1), whole on every rank (``moe_replicated``: transformers >= 5.25's default
    plan), or sharded over TP (``MOE_TP_PLAN`` where the default plan no longer shards them)."""
    import transformers

    kw: dict[str, Any] = dict(dtype=dtype, attn_implementation="eager")
    if world > 1:
        from transformers.distributed import DistributedConfig
        if cfg.ep_size > 1:
            kw["distributed_config"] = DistributedConfig(tp_size=world, ep_size=cfg.ep_size)
        elif moe and _default_plan_shards_experts(base) == cfg.moe_replicated:
            if cfg.moe_replicated:
                raise ConfigError(f"moe_replicated: true: transformers {transformers.__version__}'s default "
                                  f"TP plan of {base} shards the experts over TP (replicated experts are its "
                                  f"default from 5.25); set moe_replicated: false, or use ep_size")
            kw["distributed_config"] = DistributedConfig(tp_size=world, tp_plan=MOE_TP_PLAN)
        else:
            kw["distributed_config"] = DistributedConfig(tp_size=world)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, **kw)
    if world == 1:
        model = model.to(dev)
    return model.eval()


def _default_plan_shards_experts(base: Path) -> bool:
    """Whether this transformers' default TP plan of the model shards its fused experts over TP (<= 5.24)."""
    import transformers
    conf = transformers.AutoConfig.from_pretrained(base)
    return any(k.endswith("mlp.experts") for k in (getattr(conf, "base_model_tp_plan", None) or {}))


def _forward(model: Any, lora: Any, batch: list[Any], dev: torch.device) -> torch.Tensor:
    """Logits ``[T, vocab]`` of the batch's requests, concatenated (right padding: causal attention never
    lets a real token see a pad)."""
    lens = [len(r.tokens) for r in batch]
    S = max(lens)
    ids = torch.zeros(len(batch), S, dtype=torch.long)
    mask = torch.zeros(len(batch), S, dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, : lens[b]] = r.tokens
        mask[b, : lens[b]] = 1
    with torch.no_grad(), lora.requests([r.adapter for r in batch]):
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
    return torch.cat([logits[b, : lens[b]] for b in range(len(batch))])


def run_transformers(cfg: RunConfig, *, json_path: str | None = None,
                     progress: bool | None = None) -> dict[str, Any] | None:
    from ..reference.model import TPModel

    tol = verify_tolerance(cfg)
    rank, world, dev = init_distributed(cfg, cfg.activation_timeout_s)
    os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ["LOCAL_RANK"])
    t_start = time.perf_counter()
    try:
        spec = load_model_spec(cfg.model if not cfg.base_weights else cfg.base_weights)
        base, adapters = prepare_inputs(cfg, spec, local_rank, world, dev)
        dtype = serving_dtype(cfg.dtype)
        model = _load(base, world, cfg, spec.is_moe, dtype, dev)
        lcfg = LoRAConfig(max_loras=cfg.max_loras, max_lora_rank=cfg.max_lora_rank,
                          target_modules=tuple(cfg.target_modules or POOL_MODULES),
                          host_cache_bytes=cfg.host_cache_bytes, dtype=cfg.dtype, device=str(dev),
                          chunk_bytes=cfg.chunk_bytes, activation_timeout_s=cfg.activation_timeout_s)
        mgr = build_manager(model, lcfg)
        if world > 1 and spec.is_moe and mgr.parallel.moe_replicated != cfg.moe_replicated:
            mgr.close()
            how = "whole on every rank" if mgr.parallel.moe_replicated else "sharded over TP"
            raise LayoutError(f"transformers laid the experts out {how} but the run config says "
                              f"moe_replicated={cfg.moe_replicated}")
        lora = attach(model, mgr)
        ref = ref_mgr = None
        if rank == 0 and cfg.workload.verify_every > 0:
            ref = TPModel(mgr.model, ParallelSpec(tp_size=1, tp_rank=0), None, dtype=dtype, device=dev)
            ref.load_hf_weights(base)
            ref_mgr = LoRAManager(dataclasses.replace(lcfg, host_cache_bytes=0), mgr.model,
                                  ParallelSpec(tp_size=1, tp_rank=0), group=LOCAL)
        batches, verify, tokens, serve_s = serve(cfg, mgr, ref, ref_mgr, adapters, spec.vocab_size,
                                                 lambda batch: _forward(model, lora, batch, dev), tol=tol,
                                                 show=rank == 0 and (sys.stderr.isatty() if progress is None
                                                                     else progress),
                                                 desc="serving (transformers)")
        stats = mgr.aggregate_stats()
        nodes = _gather_nodes(world)
        report = None
        if rank == 0:
            report = build_report(cfg=cfg, spec=mgr.model, world=world, device=dev, stats=stats,
                                  plans={n: mgr.plan(n) for n in adapters}, verify=verify,
                                  serve_s=serve_s, tokens=tokens, batches=len(batches),
                                  wall_s=time.perf_counter() - t_start, tolerance=tol, nodes=nodes,
                                  parallel=mgr.parallel)
            report["engine"] = "transformers"
            print(format_report(report), flush=True)
            if json_path:
                Path(json_path).write_text(json.dumps(report, indent=2, default=str))
            failed = [v for v in verify if not v["ok"]]
            if failed:
                raise TPLoRAError(f"verification failed on {len(failed)} of {len(verify)} checked batches: "
                                  f"{failed[0]}")
        lora.detach()
        mgr.close()
        if ref_mgr is not None:
            ref_mgr.close()
        _barrier(world, dev)
        return report
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

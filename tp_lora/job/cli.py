"""``tp-lora`` command line: inspect how an adapter shards over a TP/EP layout, write synthetic adapters.

Subcommands (each one an entry of :data:`SUBCOMMANDS`):

``tp-lora plan ADAPTER_DIR --model PRESET_OR_HF_CONFIG --tp N [--ep N] [--json]``
    Read the adapter header (no tensor data), plan every rank, print per rank: source tensors read, slices,
    planned bytes, local experts, and bytes saved against pinning every whole tensor on every rank.

``tp-lora write-adapter OUT_DIR --model PRESET --rank R [--targets ...] [--dtype bf16|fp16|fp32] ...``
    Write a seeded synthetic PEFT adapter of the model's real shape (``synthetic.write_synthetic_adapter``).

Printing lives here and only here; the library itself never prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from ..plan.validate import AdapterSource
from ..errors import TPLoRAError
from ..plan.model import ModelSpec, load_model_spec
from ..plan.layout import RankLayout
from ..plan.parallel import ParallelSpec
from ..plan.planner import plan_rank

#: Modules ``write-adapter --targets`` accepts (canonical names plus ``experts``, ``embed``, ``lm_head``).
TARGET_CHOICES = ("q", "k", "v", "o", "gate", "up", "down", "shared.gate", "shared.up", "shared.down",
                  "experts", "embed", "lm_head")


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.50 KiB'``; negative numbers keep their sign."""
    sign = "-" if n < 0 else ""
    v = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{sign}{int(v)} B" if unit == "B" else f"{sign}{v:.2f} {unit}"
        v /= 1024
    raise AssertionError("unreachable")


def _experts_str(r: range) -> str:
    if len(r) == 0:
        return "-"
    return str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------
def plan_report(adapter_dir: str, model: ModelSpec, tp: int, ep: int = 1, *,
                max_rank: int | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """The data ``tp-lora plan`` prints: one entry per rank plus totals (a JSON-ready dict)."""
    header = AdapterSource.open(adapter_dir, model, max_rank=max_rank, allow_pickle=allow_pickle)
    base = ParallelSpec(tp_size=tp, ep_size=ep)
    ranks = []
    for par in base.all_ranks():
        layout = RankLayout(model, par)
        plan = plan_rank(header, model, layout)
        local = layout.local_experts
        ranks.append({
            "tp_rank": par.tp_rank,
            "ep_rank": par.ep_rank,
            "moe_tp_rank": par.moe_tp_rank,
            "tensors": len({op.tensor for op in plan.ops}),
            "slices": len(plan.ops),
            "planned_bytes": plan.nbytes,
            "full_bytes": plan.full_bytes,
            "saved_bytes": plan.full_bytes - plan.nbytes,
            "local_experts": [local.start, local.stop] if len(local) else None,
        })
    planned = sum(r["planned_bytes"] for r in ranks)
    full = sum(r["full_bytes"] for r in ranks)
    return {
        "adapter": header.name,
        "path": header.path,
        "model": model.name,
        "tp_size": tp,
        "ep_size": ep,
        "moe_tp_size": base.moe_tp_size,
        "adapter_tensors": 2 * len(header.targets),
        "adapter_bytes": header.data_bytes,
        "max_rank": header.max_rank,
        "modules": sorted(header.modules),
        "ranks": ranks,
        "totals": {
            "tensors": sum(r["tensors"] for r in ranks),
            "slices": sum(r["slices"] for r in ranks),
            "planned_bytes": planned,
            "full_bytes": full,
            "saved_bytes": full - planned,
        },
    }


def _print_plan(rep: dict[str, Any], out: Any) -> None:
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"adapter {rep['adapter']!r} ({rep['path']}): {rep['adapter_tensors']} tensors, "
      f"{format_bytes(rep['adapter_bytes'])}, max rank {rep['max_rank']}, modules {', '.join(rep['modules'])}")
    p(f"model {rep['model']!r}, tp_size={rep['tp_size']}, ep_size={rep['ep_size']}, "
      f"moe_tp_size={rep['moe_tp_size']}")
    cols = ("rank", "ep", "tensors", "slices", "planned", "local experts", "saved vs full", "saved %")
    rows = []
    for r in rep["ranks"]:
        le = r["local_experts"]
        rows.append((str(r["tp_rank"]), str(r["ep_rank"]), str(r["tensors"]), str(r["slices"]),
                     format_bytes(r["planned_bytes"]), _experts_str(range(*le)) if le else "-",
                     format_bytes(r["saved_bytes"]), _pct(r["saved_bytes"], r["full_bytes"])))
    t = rep["totals"]
    rows.append(("total", "", str(t["tensors"]), str(t["slices"]), format_bytes(t["planned_bytes"]), "",
                 format_bytes(t["saved_bytes"]), _pct(t["saved_bytes"], t["full_bytes"])))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda row: "  ".join(v.rjust(w) for v, w in zip(row, widths))  # noqa: E731
    p(line(cols))
    p("  ".join("-" * w for w in widths))
    for row in rows[:-1]:
        p(line(row))
    p("  ".join("-" * w for w in widths))
    p(line(rows[-1]))
    p(f"(full = every tensor of the adapter pinned whole on every rank: {format_bytes(t['full_bytes'])})")


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _add_plan(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ap = sub.add_parser("plan", help="show how an adapter shards over a TP/EP layout (header only)",
                        description="Plan every rank of a TP/EP layout for one adapter (reads only the "
                                    "safetensors header) and print per-rank slices and bytes.")
    ap.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT adapter folder")
    ap.add_argument("--model", required=True, metavar="PRESET_OR_HF_CONFIG",
                    help="preset name (configs/models), preset YAML, HF config.json or a folder holding one")
    ap.add_argument("--tp", type=int, required=True, metavar="N", help="tensor-parallel size")
    ap.add_argument("--ep", type=int, default=1, metavar="N", help="expert-parallel size inside TP (default 1)")
    ap.add_argument("--max-rank", type=int, default=None, metavar="R",
                    help="reject adapters of a LoRA rank above R (the pool's max_lora_rank)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="accept adapter_model.bin (loaded with torch.load(weights_only=True))")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return ap


def _run_plan(args: argparse.Namespace) -> int:
    model = load_model_spec(args.model)
    rep = plan_report(args.adapter_dir, model, args.tp, args.ep, max_rank=args.max_rank,
                      allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_plan(rep, sys.stdout)
    return 0


# --------------------------------------------------------------------------------------------------
# write-adapter
# --------------------------------------------------------------------------------------------------
def _add_write_adapter(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ap = sub.add_parser("write-adapter", help="write a seeded synthetic PEFT adapter of a model's shape",
                        description="Write adapter_config.json + adapter_model.safetensors as peft's "
                                    "save_pretrained does, with seeded random weights.")
    add_write_adapter_arguments(ap)
    return ap


def add_write_adapter_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``write-adapter`` options (shared with ``scripts/make_adapter.py``)."""
    ap.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    ap.add_argument("--model", required=True, metavar="PRESET",
                    help="preset name (configs/models), preset YAML, HF config.json or a folder holding one")
    ap.add_argument("--rank", type=int, required=True, metavar="R", help="LoRA rank r")
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*r)")
    ap.add_argument("--targets", nargs="+", choices=TARGET_CHOICES, default=None, metavar="MODULE",
                    help=f"modules to adapt (default: every linear module); choices: {', '.join(TARGET_CHOICES)}")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merged", action="store_true",
                    help="store q/k/v as one qkv_proj and gate/up as one gate_up_proj")
    ap.add_argument("--fused-experts", action="store_true",
                    help="store experts as peft target_parameters LoRA on the fused 3-D expert parameters")
    ap.add_argument("--rslora", action="store_true", help="use_rslora=true (scaling alpha/sqrt(r))")


def write_adapter_from_args(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic_adapter  # imports torch: only when writing

    if args.rank <= 0:
        raise SystemExit(f"error: --rank must be a positive integer, got {args.rank}")
    model = load_model_spec(args.model)
    if args.fused_experts and not model.is_moe:
        raise SystemExit(f"error: --fused-experts needs an MoE model; {model.name!r} is dense")
    out = write_synthetic_adapter(args.out_dir, model, rank=args.rank, alpha=args.alpha,
                                  targets=args.targets, dtype=args.dtype, seed=args.seed,
                                  merged=args.merged, fused_experts=args.fused_experts,
                                  use_rslora=args.rslora)
    header = AdapterSource.open(out, model)  # read it back: what we write must be a valid adapter
    print(f"wrote {out}: {2 * len(header.targets)} tensors, {format_bytes(header.data_bytes)}, "
          f"rank {header.max_rank}, modules {', '.join(sorted(header.modules))} (model {model.name!r})")
    return 0


# --------------------------------------------------------------------------------------------------
# run: the main job (a thin alias of `python -m tp_lora.run`; under torchrun use that module form)
# --------------------------------------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="the main job: a multi-adapter serving run with a report "
                                   "(as `python -m tp_lora.run`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _run_run(args: argparse.Namespace) -> int:
    from .run import main as run_main

    return run_main(args.rest)


# --------------------------------------------------------------------------------------------------
# subcommand registry
# --------------------------------------------------------------------------------------------------
#: name -> (adds the subparser, runs it). Each runner returns the exit status.
SUBCOMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
                             Callable[[argparse.Namespace], int]]] = {
    "plan": (_add_plan, _run_plan),
    "write-adapter": (_add_write_adapter, write_adapter_from_args),
    "run": (lambda sub: _add_run(sub), lambda args: _run_run(args)),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tp-lora", description="LoRA adapters for tensor/expert-parallel "
                                                             "inference engines.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, _run) in SUBCOMMANDS.items():
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _add, run = SUBCOMMANDS[args.command]
    try:
        return run(args)
    except TPLoRAError as e:
        print(f"tp-lora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

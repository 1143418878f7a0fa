"""``tp-lora`` command line: inspect how an adapter shards over a TP/EP layout, write synthetic adapters.

Subcommands (each one an entry of :data:`SUBCOMMANDS`):

``tp-lora plan ADAPTER_DIR --model PRESET_OR_HF_CONFIG --tp N [--ep N] [--json]``
    Read the adapter header (no tensor data), plan every rank, print per rank: source tensors read, slices,
    planned bytes, local experts, and bytes saved against pinning every whole tensor on every rank.

``tp-lora write-adapter OUT_DIR --model PRESET --rank R [--targets q,k,v] [--dtype bf16|fp16|fp32] ...``
    Write a seeded synthetic PEFT adapter of the model's real shape (``synthetic.write_synthetic_adapter``),
    atomically (a temporary folder renamed into place); an existing adapter is replaced only with --force.

``tp-lora run [CONFIG] [--set key=value ...] [--json FILE]``
    The main job on one process (as ``python -m tp_lora.run``; under torchrun use that module form).

Options go before or after the positional arguments; exit status 2 = usage error, 1 = runtime failure,
one line on stderr (``--debug`` for the traceback): ``console``. Printing lives in ``job/`` only; the
library itself never prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from ..plan.validate import AdapterSource
from ..plan.model import PRESET_DIR, ModelSpec, load_model_spec
from ..plan.layout import RankLayout
from ..plan.parallel import ParallelSpec
from ..plan.planner import plan_rank
from . import console
from .atomic import check_new_folder, write_folder
from .runconfig import TARGETS, check_adapter_folder

#: Modules ``write-adapter --targets`` accepts (canonical names plus ``experts``, ``router``, ``shared_gate``,
#: ``embed``, ``lm_head``).
TARGET_CHOICES = TARGETS


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def target_list(value: str) -> list[str]:
    """argparse type of ``--targets``: comma-separated module names (``q,k,v``). One value per option, so
    ``--targets experts OUT_DIR`` never takes OUT_DIR for a module."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGET_CHOICES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"{'unknown module(s) ' + ', '.join(bad) if bad else 'no module in ' + repr(value)}; "
            f"choose from {','.join(TARGET_CHOICES)} (comma-separated)")
    return names


def _presets() -> str:
    return ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


MODEL_HELP = "a preset name ({}), a preset YAML, an HF config.json or a folder holding one"


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
                max_rank: int | None = None, allow_pickle: bool = False,
                moe_replicated: bool = False) -> dict[str, Any]:
    """The data ``tp-lora plan`` prints: one entry per rank plus totals (a JSON-ready dict).
    ``moe_replicated``: every routed expert whole on every rank (``ParallelSpec.moe_replicated``)."""
    check_adapter_folder(adapter_dir, "ADAPTER_DIR")
    header = AdapterSource.open(adapter_dir, model, max_rank=max_rank, allow_pickle=allow_pickle)
    base = ParallelSpec(tp_size=tp, ep_size=ep, moe_replicated=moe_replicated)
    ranks = []
    for par in base.all_ranks():
        layout = RankLayout(model, par)
        plan = plan_rank(header, model, layout)
        local = layout.local_experts
        ranks.append({
            "tp_rank": par.tp_rank,
            "ep_rank": par.ep_rank,
            "moe_tp_rank": par.moe_tp_rank if model.is_moe else None,
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
        "moe_replicated": moe_replicated,
        "moe_tp_size": base.moe_tp_size if model.is_moe else None,
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
    moe = rep["moe_tp_size"] is not None
    p(f"adapter {rep['adapter']!r} ({rep['path']}): {rep['adapter_tensors']} tensors, "
      f"{format_bytes(rep['adapter_bytes'])}, max rank {rep['max_rank']}, modules {', '.join(rep['modules'])}")
    p(f"model {rep['model']!r}, tp_size={rep['tp_size']}, ep_size={rep['ep_size']}"
      + (f", moe_tp_size={rep['moe_tp_size']}" if moe else " (dense)")
      + (" (experts replicated: whole on every rank)" if rep.get("moe_replicated") else ""))
    cols = ["rank"] + (["ep"] if moe else []) + ["tensors", "slices", "planned"] + \
        (["local experts"] if moe else []) + ["saved vs full", "saved %"]
    rows = []
    for r in rep["ranks"]:
        le = r["local_experts"]
        rows.append([str(r["tp_rank"])] + ([str(r["ep_rank"])] if moe else [])
                    + [str(r["tensors"]), str(r["slices"]), format_bytes(r["planned_bytes"])]
                    + ([_experts_str(range(*le)) if le else "-"] if moe else [])
                    + [format_bytes(r["saved_bytes"]), _pct(r["saved_bytes"], r["full_bytes"])])
    t = rep["totals"]
    total = (["total"] + ([""] if moe else []) + [str(t["tensors"]), str(t["slices"]),
             format_bytes(t["planned_bytes"])] + ([""] if moe else [])
             + [format_bytes(t["saved_bytes"]), _pct(t["saved_bytes"], t["full_bytes"])])
    for line in console.format_table(cols, rows, footer=[total], indent=""):
        p(line)
    p(f"(full = every tensor of the adapter pinned whole on every rank: {format_bytes(t['full_bytes'])})")


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _add_plan(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ap = sub.add_parser("plan", help="show how an adapter shards over a TP/EP layout (header only)",
                        parents=[console.common_options()],
                        description="Plan every rank of a TP/EP layout for one adapter (reads only the "
                                    "safetensors header) and print per-rank slices and bytes.",
                        epilog="Module names are the pool's (q, k, v, o, gate, up, down, experts.w1/w3/w2 = "
                               "expert gate/up/down, ...): docs/REPORT.md maps them to PEFT's file names.")
    ap.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                    help="PEFT adapter folder (holding adapter_config.json and adapter_model.safetensors)")
    ap.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP.format(_presets()))
    ap.add_argument("--tp", type=positive_int, required=True, metavar="N", help="tensor-parallel size")
    ap.add_argument("--ep", type=positive_int, default=1, metavar="N",
                    help="expert-parallel size inside TP (default 1)")
    ap.add_argument("--moe-replicated", action="store_true",
                    help="every routed expert whole on every rank (transformers >= 5.25's default TP plan); "
                         "needs --ep 1 and a MoE model")
    ap.add_argument("--max-rank", type=positive_int, default=None, metavar="R",
                    help="reject adapters of a LoRA rank above R (the pool's max_lora_rank)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="accept adapter_model.bin (loaded with torch.load(weights_only=True))")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return ap


def _run_plan(args: argparse.Namespace) -> int:
    console.setup_logging(args.log_level)
    model = load_model_spec(args.model)
    rep = plan_report(args.adapter_dir, model, args.tp, args.ep, max_rank=args.max_rank,
                      allow_pickle=args.allow_pickle, moe_replicated=args.moe_replicated)
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
                        parents=[console.common_options()],
                        description="Write adapter_config.json + adapter_model.safetensors as peft's "
                                    "save_pretrained does, with seeded random weights. The folder appears "
                                    "complete or not at all (written under a temporary name, then renamed).")
    add_write_adapter_arguments(ap)
    return ap


def add_write_adapter_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``write-adapter`` options (shared with ``scripts/make_adapter.py``)."""
    ap.add_argument("out_dir", metavar="OUT_DIR",
                    help="folder to write: must not exist or be empty, unless --force")
    ap.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP.format(_presets()))
    ap.add_argument("--rank", type=positive_int, required=True, metavar="R", help="LoRA rank r")
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*r)")
    ap.add_argument("--targets", type=target_list, action="append", default=None, metavar="M1,M2,...",
                    help="comma-separated modules to adapt (repeatable; default: every linear module of the "
                         f"model but the router and the shared-expert gate); choose from {','.join(TARGET_CHOICES)}")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merged", action="store_true",
                    help="store q/k/v as one qkv_proj and gate/up as one gate_up_proj")
    ap.add_argument("--fused-experts", action="store_true",
                    help="store experts as peft target_parameters LoRA on the fused 3-D expert parameters")
    ap.add_argument("--rslora", action="store_true", help="use_rslora=true (scaling alpha/sqrt(r))")
    ap.add_argument("--force", action="store_true",
                    help="replace OUT_DIR if it holds an adapter (never a folder without adapter_config.json)")


def write_adapter_from_args(args: argparse.Namespace) -> int:
    """Check everything, write to a temporary folder, read it back, rename it to OUT_DIR."""
    from .synthetic import check_targets, write_synthetic_adapter  # imports torch: only when writing

    console.setup_logging(args.log_level)
    model = load_model_spec(args.model)
    if args.fused_experts and not model.is_moe:
        raise ConfigError(f"--fused-experts needs an MoE model; {model.name!r} is dense")
    targets = list(dict.fromkeys(t for group in args.targets for t in group)) if args.targets else None
    check_targets(model, targets, "--targets")
    out = Path(args.out_dir)
    check_new_folder(out, force=args.force, marker="adapter_config.json")
    header = None

    def make(tmp: Path) -> None:
        nonlocal header
        write_synthetic_adapter(tmp, model, rank=args.rank, alpha=args.alpha, targets=targets,
                                dtype=args.dtype, seed=args.seed, merged=args.merged,
                                fused_experts=args.fused_experts, use_rslora=args.rslora)
        header = AdapterSource.open(tmp, model)  # read it back: what we write must be a valid adapter

    write_folder(out, make, replace=args.force)
    print(f"wrote {out}: {2 * len(header.targets)} tensors, {format_bytes(header.data_bytes)}, "
          f"rank {header.max_rank}, modules {', '.join(sorted(header.modules))} (model {model.name!r})")
    return 0


# --------------------------------------------------------------------------------------------------
# run: the main job (a thin alias of `python -m tp_lora.run`; under torchrun use that module form)
# --------------------------------------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .run import __doc__ as run_doc, add_run_arguments

    ap = sub.add_parser("run", help="the main job on one process: a multi-adapter serving run with a report",
                        parents=[console.common_options()], description=run_doc,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    return ap


def _run_run(args: argparse.Namespace) -> int:
    from .run import run_from_args

    return run_from_args(args)


# --------------------------------------------------------------------------------------------------
# subcommand registry
# --------------------------------------------------------------------------------------------------
#: name -> (adds the subparser, runs it). Each runner returns the exit status.
SUBCOMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
                             Callable[[argparse.Namespace], int]]] = {
    "plan": (_add_plan, _run_plan),
    "write-adapter": (_add_write_adapter, write_adapter_from_args),
    "run": (_add_run, _run_run),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tp-lora", description="LoRA adapters for tensor/expert-parallel "
                                                             "inference engines.",
                                 epilog="`tp-lora COMMAND --help` for a command's options. Exit status: 0 ok, "
                                        "2 usage error, 1 runtime failure.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, _run) in SUBCOMMANDS.items():
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 ok, 2 usage error (argparse exits 2 itself), 1 runtime failure (``console``)."""
    args = build_parser().parse_args(argv)
    _add, run = SUBCOMMANDS[args.command]
    return console.run_command(f"tp-lora {args.command}", lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

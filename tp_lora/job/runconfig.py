"""RunConfig: the YAML run config of the main job (``configs/*.yaml``), validated field by field.

Every field has a default; unknown keys and wrong types are errors that name the key. CLI overrides use
``--set dotted.key=value`` (the value parsed as YAML). A config is a path, or the name of one shipped with
the package (``demo``, ``demo-moe``: ``tp_lora/configs/*.yaml``, the checkout's ``configs/``), so the demo
runs from any directory and from a non-editable install.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..errors import ConfigError
from ..runtime.config import DEFAULTS as LORA_DEFAULTS
from ..format.dtypes import serving_names
from ..plan.model import CONFIG_DIR

#: Default of ``workload.verify_tol`` per model dtype: max |TP - reference| / max |reference| allowed.
#: float32 differs by the order of reductions only; half precisions round every partial sum.
DEFAULT_VERIFY_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


#: Modules a synthetic adapter can target (``write_synthetic_adapter``, ``write-adapter --targets``): the
#: pool's names plus ``experts`` (every routed expert), ``embed`` and ``lm_head``.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "shared.gate", "shared.up", "shared.down", "experts",
           "router", "shared_gate", "embed", "lm_head")


@dataclass(kw_only=True)
class SyntheticAdapters:
    count: int = 4
    """Adapters to generate when no paths are given."""
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    """Ranks cycled over the generated adapters."""
    targets: list[str] | None = None
    """Canonical targets (q k v o gate up down experts router shared_gate embed lm_head ...); None = all
    linear modules but the router and the shared-expert gate (``default_targets``)."""
    dtype: str = "bf16"
    seed: int = 0


@dataclass(kw_only=True)
class Workload:
    requests: int = 48
    batch_size: int = 6
    tokens_min: int = 2
    tokens_max: int = 12
    no_adapter_fraction: float = 0.2
    seed: int = 0
    verify_every: int = 4
    """Check every N-th batch's logits against a single-process reference (0 = never)."""
    verify_tol: float | None = None
    """Pass when max |TP logits - reference logits| / max |reference logits| <= this (per checked batch);
    None = ``DEFAULT_VERIFY_TOL`` of the model dtype."""


@dataclass(kw_only=True)
class RunConfig:
    model: str = "tiny-dense"
    """A preset in configs/models, a preset YAML path, or an HF config.json (or its folder)."""
    engine: str = "reference"
    """reference (tp_lora's own TP model) or transformers (transformers' tp_plan="auto" with tp_lora attached;
    needs transformers >= 5.17)."""
    base_weights: str | None = None
    """HF save_pretrained folder of the base model; None = seeded random weights in cache_dir."""
    ep_size: int = 1
    """Expert-parallel groups inside TP (divides the world size): each group holds 1/ep of the experts."""
    moe_replicated: bool = False
    """Every routed expert whole on every rank (attention, dense MLP and shared expert still TP): the layout
    of transformers >= 5.25's default ``tp_plan="auto"``. False (the default): experts sharded over TP
    inside their EP group, vLLM's and SGLang's layout. Needs ep_size 1 and a MoE model."""
    device: str = "auto"
    """auto (cuda if present: NCCL, one GPU per rank; else CPU: gloo), cpu, or cuda."""
    dtype: str = "float32"
    """Model and pool dtype."""
    max_loras: int = 2
    max_lora_rank: int = 16
    target_modules: list[str] | None = None
    host_cache_bytes: int = 64 << 20
    chunk_bytes: int = LORA_DEFAULTS["chunk_bytes"]
    activation_timeout_s: float = LORA_DEFAULTS["activation_timeout_s"]
    adapters: dict[str, str] = field(default_factory=dict)
    """name -> PEFT adapter folder. Empty = synthetic adapters (below)."""
    synthetic: SyntheticAdapters = field(default_factory=SyntheticAdapters)
    workload: Workload = field(default_factory=Workload)
    cache_dir: str = "~/.cache/tp_lora"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.engine not in ("reference", "transformers"):
            raise ConfigError(f"engine must be reference or transformers, got {self.engine!r}")
        if self.ep_size < 1:
            raise ConfigError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.moe_replicated and self.ep_size != 1:
            raise ConfigError(f"moe_replicated: true needs ep_size 1 (replicated experts are on every rank), "
                              f"got ep_size={self.ep_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in serving_names(aliases=False):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        for k in ("max_loras", "max_lora_rank", "host_cache_bytes", "chunk_bytes"):
            if getattr(self, k) < (0 if k == "host_cache_bytes" else 1):
                raise ConfigError(f"{k} must be positive, got {getattr(self, k)}")
        w = self.workload
        if w.requests < 1 or w.batch_size < 1 or not 1 <= w.tokens_min <= w.tokens_max:
            raise ConfigError(f"workload: need requests >= 1, batch_size >= 1, 1 <= tokens_min <= tokens_max; "
                              f"got {dataclasses.asdict(w)}")
        if w.verify_every < 0 or (w.verify_tol is not None and not w.verify_tol > 0):
            raise ConfigError(f"workload: need verify_every >= 0 and verify_tol > 0 (or null), got "
                              f"verify_every={w.verify_every}, verify_tol={w.verify_tol}")
        if not 0.0 <= w.no_adapter_fraction <= 1.0:
            raise ConfigError(f"workload.no_adapter_fraction must be in [0, 1], got {w.no_adapter_fraction}")
        s = self.synthetic
        if not self.adapters and (s.count < 1 or not s.ranks or any(r < 1 for r in s.ranks)):
            raise ConfigError(f"synthetic: need count >= 1 and positive ranks, got {dataclasses.asdict(s)}")
        if not self.adapters and s.targets is not None and (not s.targets or set(s.targets) - set(TARGETS)):
            raise ConfigError(f"synthetic.targets: unknown or none {sorted(set(s.targets) - set(TARGETS))}; "
                              f"known: {', '.join(TARGETS)}")
        if not self.adapters and max(s.ranks) > self.max_lora_rank:
            raise ConfigError(f"synthetic.ranks {s.ranks} exceed max_lora_rank={self.max_lora_rank}")

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kw = {}
    for k, v in data.items():
        t = hints[k]
        kw[k] = _convert(t, v, f"{where}.{k}" if where else k)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _convert(t: Any, v: Any, where: str) -> Any:
    if dataclasses.is_dataclass(t):
        return _build(t, v, where)
    origin = getattr(t, "__origin__", None)
    args = getattr(t, "__args__", ())
    if type(None) in args:  # Optional
        if v is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], v, where)
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"{where}: expected a list, got {type(v).__name__} {v!r}")
        return [_convert(args[0], x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(v).__name__}")
        return {str(k): _convert(args[1], x, f"{where}.{k}") for k, x in v.items()}
    if t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(v).__name__} {v!r}")
        return float(v)
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: expected an integer, got {type(v).__name__} {v!r}")
        return v
    if t is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {type(v).__name__} {v!r}")
        return v
    if t is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true/false, got {v!r}")
        return v
    return v


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """``a.b=value`` -> data['a']['b'] = yaml(value)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value is not valid YAML: {e}") from None
    parts = key.strip().split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"--set {key}: {p} is not a mapping")
    cur[parts[-1]] = value


def verify_tolerance(cfg: RunConfig) -> float:
    """The verification tolerance in force: ``workload.verify_tol``, else the model dtype's default."""
    t = cfg.workload.verify_tol
    return DEFAULT_VERIFY_TOL[cfg.dtype] if t is None else t


def shipped_run_configs() -> list[str]:
    """Names of the run configs shipped with the package (``tp_lora/configs/*.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def run_config_help() -> str:
    return (f"run config: a YAML path, or a shipped one by name ({', '.join(shipped_run_configs())}); "
            "default: every field at its default")


def resolve_run_config(ref: str | os.PathLike[str]) -> Path:
    """A path to an existing file, else a shipped config by name (``demo`` or ``demo.yaml``)."""
    p = Path(ref)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if p.name == str(ref) and shipped.is_file():  # a bare name, not a path elsewhere
        return shipped
    hint = f"; the shipped one is {p.stem!r} (tp-lora run {p.stem})" if shipped.is_file() else ""
    raise ConfigError(f"run config {str(ref)!r} not found (from {os.getcwd()}); shipped configs: "
                      f"{shipped_run_configs()}{hint}")


def check_adapter_folder(path: str | os.PathLike[str], what: str) -> None:
    """A PEFT adapter is a folder (adapter_config.json + adapter_model.safetensors): name the folder to use
    when one of its files was given."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        hint = (f"; pass its folder {str(p.parent)!r}"
                if p.name in ("adapter_model.safetensors", "adapter_config.json", "adapter_model.bin") or
                p.suffix == ".safetensors" else "")
        raise ConfigError(f"{what} {str(path)!r} is a file, not an adapter folder (adapter_config.json + "
                          f"adapter_model.safetensors){hint}")
    if not p.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: no such folder")


def load_run_config(path: str | os.PathLike[str] | None, overrides: list[str] = ()) -> RunConfig:
    """The run config at ``path`` (or shipped by that name), ``--set`` overrides applied, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_run_config(path)
        if not p.is_file():
            raise ConfigError(f"run config {str(p)!r} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for o in overrides:
        apply_override(data, o)
    cfg = _build(RunConfig, data, "")
    for name, folder in cfg.adapters.items():
        check_adapter_folder(folder, f"adapters.{name}:")
    return cfg

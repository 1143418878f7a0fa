"""ModelSpec: the base model's shape, from a YAML preset or a Hugging Face ``config.json``.

The planner needs only shapes, never weights. Model-family knowledge (which HF config keys hold what)
lives here and in ``format/naming.py``; nothing downstream special-cases a family.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ConfigError
from ..format.modules import MODULES, SOURCES, Scope

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES

#: Shipped configs (package data; the checkout's top-level ``configs`` links here): presets and run configs.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESET_DIR = CONFIG_DIR / "models"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Shape of a decoder-only transformer (dense or MoE).

    All sizes are the full (unsharded) sizes of the base model.
    """

    name: str
    family: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    """Dense MLP width (for MoE models: the width of dense layers, if any)."""
    vocab_size: int
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    """Width of the shared expert MLP (Qwen2-MoE); 0 when the model has none."""
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    """Layers that use a dense MLP although the model is MoE (Qwen-MoE ``mlp_only_layers``)."""
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = False
    """Qwen3 normalises q and k per head before RoPE."""
    attention_bias: bool = False
    """Qwen2 has q/k/v biases in the base model (LoRA never touches them)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model {self.name!r}: unknown family {self.family!r}; known: {FAMILIES}")
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model {self.name!r}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.family in MOE_FAMILIES:
            if self.num_experts <= 0 or self.moe_intermediate_size <= 0 or self.num_experts_per_tok <= 0:
                raise ConfigError(
                    f"model {self.name!r}: MoE family {self.family!r} needs num_experts, "
                    f"num_experts_per_tok and moe_intermediate_size > 0")
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"model {self.name!r}: num_experts_per_tok={self.num_experts_per_tok} > "
                                  f"num_experts={self.num_experts}")
        elif self.num_experts:
            raise ConfigError(f"model {self.name!r}: dense family {self.family!r} with num_experts="
                              f"{self.num_experts}")
        if self.decoder_sparse_step <= 0:
            raise ConfigError(f"model {self.name!r}: decoder_sparse_step must be >= 1")

    # -- derived shapes -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer`` has routed experts (Qwen-MoE ``decoder_sparse_step``/``mlp_only_layers``)."""
        if not self.is_moe:
            return False
        if layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    def has_shared_expert(self, layer: int) -> bool:
        return self.is_moe_layer(layer) and self.shared_expert_intermediate_size > 0

    def dim(self, name: str) -> int:
        """Full size of a model dimension named in the module table (``format.modules.DIMS``)."""
        return {"hidden": self.hidden_size, "q": self.q_size, "kv": self.kv_size,
                "intermediate": self.intermediate_size, "shared": self.shared_expert_intermediate_size,
                "moe": self.moe_intermediate_size, "vocab": self.vocab_size, "experts": self.num_experts,
                "one": 1}[name]

    def has_scope(self, scope: Scope, layer: int | None = None) -> bool:
        """Whether the model (``layer`` None: any layer) has modules of ``scope`` (e.g. a dense MLP)."""
        if scope in (Scope.ATTENTION, Scope.GLOBAL):
            return True
        if layer is None:
            if scope is Scope.DENSE_MLP:
                return any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))
            return self.is_moe if scope in (Scope.EXPERTS, Scope.ROUTER) else self.shared_expert_intermediate_size > 0
        if scope is Scope.DENSE_MLP:
            return not self.is_moe_layer(layer)
        return self.is_moe_layer(layer) if scope in (Scope.EXPERTS, Scope.ROUTER) else self.has_shared_expert(layer)

    def linear_shape(self, module: str, layer: int = 0) -> tuple[int, int]:
        """(out_features, in_features) of the base linear a LoRA ``module`` (a source module) adapts."""
        src = SOURCES.get(module)
        if src is None:
            raise ConfigError(f"model {self.name!r}: unknown module {module!r}")
        return (sum(self.dim(MODULES[m].out_dim) for m in src.members), self.dim(src.kind.in_dim))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>") -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model field(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "mlp_only_layers" in d:
            d["mlp_only_layers"] = tuple(d["mlp_only_layers"] or ())
        try:
            return cls(**d)
        except TypeError as e:  # missing required field
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_preset(cls, name_or_path: str | os.PathLike[str]) -> "ModelSpec":
        """A preset name from ``configs/models`` (e.g. ``llama-3-8b``) or a path to a YAML file."""
        p = Path(name_or_path)
        # a name such as "llama-3.1-70b" has a dotted "suffix" too: only .yaml/.yml or an existing file is a path
        if p.suffix not in (".yaml", ".yml") and not p.is_file():
            p = PRESET_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            avail = sorted(x.stem for x in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
            raise ConfigError(f"model preset {str(name_or_path)!r} not found (looked at {p}); "
                              f"available presets: {avail}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of model fields, got {type(data).__name__}")
        return cls.from_dict(data, source=str(p))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike[str],
                       *, name: str | None = None) -> "ModelSpec":
        """Build from a Hugging Face ``config.json`` (a dict, a file, or a folder holding one)."""
        source = "<hf config>"
        if not isinstance(config, Mapping):
            p = Path(config)
            if p.is_dir():
                p = p / "config.json"
            source = str(p)
            try:
                config = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{source}: cannot read HF config: {e}") from None
        c = dict(config)
        mt = c.get("model_type")
        family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}.get(mt)
        if family is None:
            raise ConfigError(f"{source}: unsupported model_type {mt!r}; supported: {FAMILIES}")

        def req(key: str) -> Any:
            if key not in c:
                raise ConfigError(f"{source}: HF config lacks {key!r} (model_type {mt})")
            return c[key]

        heads = int(req("num_attention_heads"))
        hidden = int(req("hidden_size"))
        kw: dict[str, Any] = dict(
            name=name or c.get("_name_or_path") or mt,
            family=family,
            hidden_size=hidden,
            num_hidden_layers=int(req("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            intermediate_size=int(req("intermediate_size")),
            vocab_size=int(req("vocab_size")),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
                             or 10000.0),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            # Qwen2 always has q/k/v biases; Qwen2-MoE calls the flag ``qkv_bias``
            attention_bias=bool(c.get("attention_bias") if c.get("attention_bias") is not None
                                else c.get("qkv_bias", family in ("qwen2", "qwen2_moe"))),
        )
        if family == "mixtral":
            kw.update(num_experts=int(req("num_local_experts")),
                      num_experts_per_tok=int(req("num_experts_per_tok")),
                      moe_intermediate_size=int(req("intermediate_size")), norm_topk_prob=True)
        elif family in ("qwen2_moe", "qwen3_moe"):
            # transformers 5 writes Qwen3-MoE's expert count as ``num_local_experts`` (attribute_map)
            n_exp = c.get("num_experts") if c.get("num_experts") is not None else c.get("num_local_experts")
            if n_exp is None:
                req("num_experts")
            kw.update(num_experts=int(n_exp),
                      num_experts_per_tok=int(req("num_experts_per_tok")),
                      moe_intermediate_size=int(req("moe_intermediate_size")),
                      decoder_sparse_step=int(c.get("decoder_sparse_step", 1) or 1),
                      mlp_only_layers=tuple(c.get("mlp_only_layers") or ()),
                      norm_topk_prob=bool(c.get("norm_topk_prob", family == "qwen3_moe")))
            if family == "qwen2_moe":
                kw["shared_expert_intermediate_size"] = int(c.get("shared_expert_intermediate_size", 0))
        return cls(**kw)


def load_model_spec(ref: str | os.PathLike[str]) -> ModelSpec:
    """A preset name, a preset YAML path, an HF ``config.json`` path, or a folder holding one."""
    p = Path(ref)
    if p.is_dir() or p.suffix == ".json":
        return ModelSpec.from_hf_config(p)
    return ModelSpec.from_preset(ref)

"""Seeded synthetic PEFT adapters of a model's real shape, written as ``save_pretrained`` writes them.

Used by tests, benchmarks and the demo (which has no adapters to download). Keys and config follow
peft's format so that ``AdapterSource`` reads them exactly like real adapters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import save_file

from ..errors import ConfigError
from ..format.dtypes import serving_dtype
from ..plan.model import ModelSpec
from .runconfig import TARGETS

DENSE_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
_PEFT_PATH = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "qkv": "self_attn.qkv_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "gate_up": "mlp.gate_up_proj", "shared.gate": "mlp.shared_expert.gate_proj",
    "shared.up": "mlp.shared_expert.up_proj", "shared.down": "mlp.shared_expert.down_proj",
}




def unused_targets(model: ModelSpec, targets: Sequence[str],
                   layers: Iterable[int] | None = None) -> dict[str, str]:
    """Targets that would adapt nothing in ``model`` (on ``layers``), each with the reason."""
    ids = list(range(model.num_hidden_layers)) if layers is None else list(layers)
    out: dict[str, str] = {}
    for t in targets:
        if t in ("gate", "up", "down") and all(model.is_moe_layer(i) for i in ids):
            out[t] = "every layer is an MoE layer: no dense MLP"
        elif t.startswith("shared.") and not any(model.has_shared_expert(i) for i in ids):
            out[t] = "the model has no shared expert"
        elif t == "shared_gate" and not any(model.has_shared_expert(i) for i in ids):
            out[t] = "the model has no shared expert (no shared_expert_gate)"
        elif t in ("experts", "router") and not any(model.is_moe_layer(i) for i in ids):
            out[t] = "the model is dense: no routed experts" if not model.is_moe else "no MoE layer chosen"
        elif t in ("q", "k", "v", "o") and not ids:
            out[t] = "no layer chosen"
    return out


def check_targets(model: ModelSpec, targets: Sequence[str] | None, what: str) -> None:
    """Refuse targets that would adapt nothing in ``model`` (before anything is written)."""
    unused = unused_targets(model, targets or ())
    if unused:
        raise ConfigError(f"{what}: nothing to adapt in model {model.name!r} for "
                          + "; ".join(f"{t} ({why})" for t, why in unused.items()))


def default_targets(model: ModelSpec) -> tuple[str, ...]:
    """All linear modules: attention + dense MLP (dense layers) + experts (MoE layers)."""
    t = ["q", "k", "v", "o"]
    if not model.is_moe or any(not model.is_moe_layer(i) for i in range(model.num_hidden_layers)):
        t += ["gate", "up", "down"]
    if model.is_moe:
        t += ["experts"]
    if model.shared_expert_intermediate_size:
        t += ["shared.gate", "shared.up", "shared.down"]
    return tuple(t)


def write_synthetic_adapter(out_dir: str | os.PathLike[str], model: ModelSpec, *, rank: int = 16,
                            alpha: float | None = None, targets: Sequence[str] | None = None,
                            dtype: str | torch.dtype = "bf16", seed: int = 0, merged: bool = False,
                            fused_experts: bool = False, use_rslora: bool = False,
                            rank_pattern: dict[str, int] | None = None,
                            alpha_pattern: dict[str, float] | None = None,
                            std: float = 0.02, layers: Iterable[int] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir``; return the folder.

    ``targets`` uses canonical module names plus ``experts`` (all routed experts), ``embed``, ``lm_head``;
    ``router`` (``[num_experts, hidden]``, as peft's ``target_parameters=["mlp.gate.weight"]`` saves it on
    transformers 5's router; Mixtral's ``block_sparse_moe.gate`` linear) and ``shared_gate`` (Qwen2-MoE's
    ``mlp.shared_expert_gate``, ``[1, hidden]``) are written on MoE layers only.
    ``merged`` stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (Phi-3 style).
    ``fused_experts`` stores experts as peft ``target_parameters`` LoRA on the fused 3-D parameters
    (transformers 5 layout) instead of one LoRA per expert linear.
    """
    out = Path(out_dir)
    tdtype = serving_dtype(dtype) if isinstance(dtype, str) else dtype
    targets = tuple(targets or default_targets(model))
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ConfigError(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    rank_pattern = dict(rank_pattern or {})
    alpha_pattern = dict(alpha_pattern or {})
    alpha = float(2 * rank if alpha is None else alpha)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    pre = "base_model.model.model."

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(tdtype)

    def r_for(path: str) -> int:
        import re
        for pat, val in rank_pattern.items():
            if re.match(rf"(.*\.)?({pat})$", path):
                return int(val)
        return rank

    def linear(path: str, out_f: int, in_f: int) -> None:
        r = r_for(path)
        tensors[f"base_model.model.{path}.lora_A.weight"] = rnd(r, in_f)
        tensors[f"base_model.model.{path}.lora_B.weight"] = rnd(out_f, r)

    layer_ids = list(layers) if layers is not None else list(range(model.num_hidden_layers))
    target_modules: set[str] = set()
    target_parameters: list[str] = []
    for i in layer_ids:
        lp = f"model.layers.{i}"
        moe = model.is_moe_layer(i)
        mods = [m for m in targets if m in _PEFT_PATH]
        if merged:
            if {"q", "k", "v"} <= set(mods):
                mods = [m for m in mods if m not in ("q", "k", "v")] + ["qkv"]
            if {"gate", "up"} <= set(mods):
                mods = [m for m in mods if m not in ("gate", "up")] + ["gate_up"]
        for m in mods:
            if m in ("gate", "up", "down", "gate_up") and moe:
                continue
            if m.startswith("shared.") and not model.has_shared_expert(i):
                continue
            if m == "qkv":
                shape = (model.q_size + 2 * model.kv_size, model.hidden_size)
            elif m == "gate_up":
                shape = (2 * model.intermediate_size, model.hidden_size)
            else:
                shape = model.linear_shape(m)
            linear(f"{lp}.{_PEFT_PATH[m]}", *shape)
            target_modules.add(_PEFT_PATH[m].split(".")[-1])
        if "router" in targets and moe:
            if model.family == "mixtral":
                linear(f"{lp}.block_sparse_moe.gate", model.num_experts, model.hidden_size)
                target_modules.add("gate")
            else:
                linear(f"{lp}.mlp.gate", model.num_experts, model.hidden_size)
                if "mlp.gate.weight" not in target_parameters:
                    target_parameters.append("mlp.gate.weight")
        if "shared_gate" in targets and model.has_shared_expert(i):
            linear(f"{lp}.mlp.shared_expert_gate", 1, model.hidden_size)
            target_modules.add("shared_expert_gate")
        if "experts" in targets and moe:
            E, h, im = model.num_experts, model.hidden_size, model.moe_intermediate_size
            if fused_experts:
                r = rank
                base = f"base_model.model.{lp}.mlp.experts"
                tensors[f"{base}.base_layer.lora_A.weight"] = rnd(E * r, h)
                tensors[f"{base}.base_layer.lora_B.weight"] = rnd(2 * im, E * r)
                tensors[f"{base}.lora_A.weight"] = rnd(E * r, im)
                tensors[f"{base}.lora_B.weight"] = rnd(h, E * r)
                target_parameters += [p for p in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
                                      if p not in target_parameters]
            else:
                ex = "block_sparse_moe.experts" if model.family == "mixtral" else "mlp.experts"
                names = (("w1", "w3", "w2") if model.family == "mixtral"
                         else ("gate_proj", "up_proj", "down_proj"))
                for e in range(E):
                    linear(f"{lp}.{ex}.{e}.{names[0]}", im, h)
                    linear(f"{lp}.{ex}.{e}.{names[1]}", im, h)
                    linear(f"{lp}.{ex}.{e}.{names[2]}", h, im)
                target_modules.update(names)
    if "embed" in targets:
        tensors[f"{pre}embed_tokens.lora_embedding_A"] = rnd(r_for("model.embed_tokens"), model.vocab_size)
        tensors[f"{pre}embed_tokens.lora_embedding_B"] = rnd(model.hidden_size, r_for("model.embed_tokens"))
        target_modules.add("embed_tokens")
    if "lm_head" in targets:
        linear("lm_head", model.vocab_size, model.hidden_size)
        target_modules.add("lm_head")
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(target_modules), "target_parameters": target_parameters or None,
        "fan_in_fan_out": False, "use_dora": False, "bias": "none", "modules_to_save": None,
        "lora_dropout": 0.0, "init_lora_weights": False, "inference_mode": True,
        "base_model_name_or_path": model.name, "task_type": "CAUSAL_LM",
    }
    # an adapter without tensors is written as asked (tests need such folders); callers that must not write
    # one check the targets first (``check_targets``)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out

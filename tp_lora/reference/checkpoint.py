"""Hugging Face checkpoints for the reference model: per-rank slice reads, config dicts, random weights.

Reads go through ``safe_open(...).get_slice`` so a rank touches only the rows or columns it owns.
Family knowledge (which HF key holds what) is kept here, beside the reference model, not in core.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ConfigError
from ..plan.model import ModelSpec

Span = tuple[int, int]
"""[start, stop) along one dimension."""

# Names of the routed-expert tensors on disk, per layout. ``{p}`` is the MoE block prefix.
FUSED_EXPERTS = ("{p}experts.gate_up_proj", "{p}experts.down_proj")
"""transformers >= 5 fused layout: gate_up [E, 2*I, H] (gate rows first), down [E, H, I]."""
PER_EXPERT_NAMES = {
    "qwen": ("{p}experts.{e}.gate_proj.weight", "{p}experts.{e}.up_proj.weight",
             "{p}experts.{e}.down_proj.weight"),
    "mixtral": ("{p}experts.{e}.w1.weight", "{p}experts.{e}.w3.weight", "{p}experts.{e}.w2.weight"),
}
"""Per-expert layout (what ``save_pretrained`` writes, and older checkpoints): (gate, up, down)."""
MOE_PREFIXES = ("mlp.", "block_sparse_moe.")
"""Qwen-MoE and transformers-5 Mixtral use ``mlp.``; Mixtral checkpoints on the Hub use ``block_sparse_moe.``."""


class CheckpointReader:
    """Lazy reader of a safetensors checkpoint folder (single file or ``*.index.json`` shards).

    Every read checks the tensor's full shape against what the ModelSpec says, then reads only the
    requested span, so a mismatched checkpoint fails with the tensor's name, not with a wrong answer.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{self.folder}: no *.safetensors checkpoint found")
            weight_map = None
        self._stack = ExitStack()
        self._handles = {f: self._stack.enter_context(safe_open(str(self.folder / f), framework="pt"))
                         for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[k] = f
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise ConfigError(f"{index}: tensors listed but absent from their files: {missing[:5]}")

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def has(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str) -> Any:
        if name not in self._where:
            raise ConfigError(f"{self.folder}: checkpoint lacks tensor {name!r}")
        return self._handles[self._where[name]].get_slice(name)

    def read(self, name: str, full_shape: Sequence[int], *, index: int | None = None,
             rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        """Read ``name[index][rows, cols]`` after checking the full shape is ``full_shape``.

        ``index`` selects along a leading (expert) dimension; rows/cols then apply to the next two.
        """
        sl = self._slice(name)
        actual = tuple(sl.get_shape())
        if actual != tuple(full_shape):
            raise ConfigError(f"{self.folder}: tensor {name!r} has shape {list(actual)}, the model spec "
                              f"expects {list(full_shape)}")
        key: list[slice] = []
        if index is not None:
            key.append(slice(index, index + 1))
        key.append(slice(*rows) if rows is not None else slice(None))
        if cols is not None:
            key.append(slice(*cols))
        t = sl[tuple(key)]
        return t[0] if index is not None else t


def moe_layout(reader: CheckpointReader, layer: int) -> tuple[str, str]:
    """(prefix, layout) of layer's MoE block: layout is 'fused', 'qwen' or 'mixtral'."""
    base = f"model.layers.{layer}."
    for p in MOE_PREFIXES:
        pre = base + p
        if not reader.has(pre + "gate.weight"):
            continue
        if reader.has(FUSED_EXPERTS[0].format(p=pre)):
            return pre, "fused"
        for layout, names in PER_EXPERT_NAMES.items():
            if reader.has(names[0].format(p=pre, e=0)):
                return pre, layout
        raise ConfigError(f"{reader.folder}: layer {layer} has a router ({pre}gate.weight) but no expert "
                          f"weights in a known layout (fused {FUSED_EXPERTS[0].format(p=pre)!r} or "
                          f"per-expert {PER_EXPERT_NAMES['qwen'][0].format(p=pre, e=0)!r})")
    raise ConfigError(f"{reader.folder}: layer {layer} is an MoE layer in the model spec but the "
                      f"checkpoint has no router ({base}mlp.gate.weight)")


# -- HF config from a ModelSpec ---------------------------------------------------------------------
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_config_dict(spec: ModelSpec, **overrides: Any) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of ``spec``'s shape (``AutoConfig.for_model(**d)`` takes it).

    Lets tests and the demo build a real ``transformers`` model of a preset's shape without
    transformers being a dependency of the library.
    """
    if spec.family in ("qwen2",) and not spec.attention_bias:
        raise ConfigError(f"model {spec.name!r}: transformers' qwen2 always has q/k/v biases; set "
                          f"attention_bias: true")
    d: dict[str, Any] = dict(
        model_type=spec.family, architectures=[_ARCH[spec.family]],
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tie_word_embeddings, hidden_act="silu", max_position_embeddings=4096,
        attention_bias=spec.attention_bias, sliding_window=None, use_sliding_window=False,
        dtype="float32",
    )
    if spec.family == "mixtral":
        if spec.moe_intermediate_size != spec.intermediate_size:
            raise ConfigError(f"model {spec.name!r}: Mixtral has one MLP width; intermediate_size="
                              f"{spec.intermediate_size} != moe_intermediate_size={spec.moe_intermediate_size}")
        d.update(num_local_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok)
    elif spec.family in ("qwen2_moe", "qwen3_moe"):
        d.update(num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                 moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                 decoder_sparse_step=spec.decoder_sparse_step, mlp_only_layers=list(spec.mlp_only_layers))
        if spec.family == "qwen2_moe":
            d.update(shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
                     qkv_bias=spec.attention_bias)
    d.update(overrides)
    return d


# -- random checkpoints (demo without transformers) -------------------------------------------------
def hf_state_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full HF tensor names and shapes of ``spec`` (per-expert expert layout, as ``save_pretrained``)."""
    h, hd = spec.hidden_size, spec.head_dim
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h),
                                     "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        s["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (h,)
        s[p + "post_attention_layernorm.weight"] = (h,)
        for m, rows in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size)):
            s[p + f"self_attn.{m}_proj.weight"] = (rows, h)
            if spec.attention_bias:
                s[p + f"self_attn.{m}_proj.bias"] = (rows,)
        s[p + "self_attn.o_proj.weight"] = (h, spec.q_size)
        if spec.attention_bias and spec.family in ("llama", "qwen3", "qwen3_moe"):
            s[p + "self_attn.o_proj.bias"] = (h,)   # these families put the bias on o_proj too
        if spec.qk_norm:
            s[p + "self_attn.q_norm.weight"] = (hd,)
            s[p + "self_attn.k_norm.weight"] = (hd,)
        if spec.is_moe_layer(i):
            names = PER_EXPERT_NAMES["mixtral" if spec.family == "mixtral" else "qwen"]
            pre = p + "mlp."
            s[pre + "gate.weight"] = (spec.num_experts, h)
            im = spec.moe_intermediate_size
            for e in range(spec.num_experts):
                s[names[0].format(p=pre, e=e)] = (im, h)
                s[names[1].format(p=pre, e=e)] = (im, h)
                s[names[2].format(p=pre, e=e)] = (h, im)
            if spec.has_shared_expert(i):
                si = spec.shared_expert_intermediate_size
                s[pre + "shared_expert.gate_proj.weight"] = (si, h)
                s[pre + "shared_expert.up_proj.weight"] = (si, h)
                s[pre + "shared_expert.down_proj.weight"] = (h, si)
                s[pre + "shared_expert_gate.weight"] = (1, h)
        else:
            s[p + "mlp.gate_proj.weight"] = (spec.intermediate_size, h)
            s[p + "mlp.up_proj.weight"] = (spec.intermediate_size, h)
            s[p + "mlp.down_proj.weight"] = (h, spec.intermediate_size)
    return s


def write_random_checkpoint(spec: ModelSpec, folder: str | os.PathLike[str], *, seed: int = 0,
                            std: float = 0.02, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` + ``model.safetensors`` of seeded random weights in ``spec``'s shape.

    For the demo and for tests that need a base model without ``transformers``; norms are 1 + noise so
    that loading them is exercised.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_state_shapes(spec).items():
        t = torch.randn(shape, generator=g) * std
        if name.endswith("norm.weight"):
            t += 1.0
        tensors[name] = t.to(dtype).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_config_dict(spec, dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder

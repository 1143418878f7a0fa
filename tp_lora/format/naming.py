"""PEFT key -> canonical LoRA name, one table per model family.

The planner speaks only canonical names; everything family-specific about where PEFT puts a LoRA
tensor lives in the tables below.

Canonical *source* modules (what a PEFT tensor adapts):
``q k v o gate up down qkv gate_up`` (dense; ``qkv``/``gate_up`` are merged projections),
``experts.w1 experts.w3 experts.w2`` (one expert's gate/up/down, with an expert id),
``experts.fused`` (PEFT ``target_parameters`` LoRA on a fused 3-D expert parameter; whether it is the
gate_up or the down parameter is decided from the tensor shapes by the adapter reader),
``shared.gate shared.up shared.down`` (Qwen2-MoE shared expert), ``embed``, ``lm_head``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Per-family tables: module path inside a decoder layer -> canonical source module.
_ATTN = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "self_attn.qkv_proj": "qkv",
}
_DENSE_MLP = {
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
    "mlp.gate_up_proj": "gate_up",
}
_QWEN_EXPERT = {"gate_proj": "experts.w1", "up_proj": "experts.w3", "down_proj": "experts.w2"}
_MIXTRAL_EXPERT = {"w1": "experts.w1", "w3": "experts.w3", "w2": "experts.w2"}
_QWEN_SHARED = {
    "mlp.shared_expert.gate_proj": "shared.gate",
    "mlp.shared_expert.up_proj": "shared.up",
    "mlp.shared_expert.down_proj": "shared.down",
}


@dataclass(frozen=True)
class FamilyTable:
    layer_modules: dict[str, str]
    expert_prefixes: tuple[str, ...]  # "mlp.experts" / "block_sparse_moe.experts" per-expert layouts
    expert_names: dict[str, str]
    fused_expert_module: str | None  # module holding fused 3-D expert params (target_parameters)


FAMILY_TABLES: dict[str, FamilyTable] = {
    "llama": FamilyTable({**_ATTN, **_DENSE_MLP}, (), {}, None),
    "mistral": FamilyTable({**_ATTN, **_DENSE_MLP}, (), {}, None),
    "qwen2": FamilyTable({**_ATTN, **_DENSE_MLP}, (), {}, None),
    "qwen3": FamilyTable({**_ATTN, **_DENSE_MLP}, (), {}, None),
    "qwen3_moe": FamilyTable({**_ATTN, **_DENSE_MLP}, ("mlp.experts",), _QWEN_EXPERT, "mlp.experts"),
    "qwen2_moe": FamilyTable({**_ATTN, **_DENSE_MLP, **_QWEN_SHARED}, ("mlp.experts",), _QWEN_EXPERT,
                             "mlp.experts"),
    "mixtral": FamilyTable({**_ATTN}, ("block_sparse_moe.experts", "mlp.experts"),
                           {**_MIXTRAL_EXPERT, **_QWEN_EXPERT}, "mlp.experts"),
}

# Dense-model modules a pool can hold, in a fixed order (the planner and the pool iterate in it).
POOL_MODULES = ("q", "k", "v", "o", "gate", "up", "down", "shared.gate", "shared.up", "shared.down",
                "experts.w1", "experts.w3", "experts.w2", "embed", "lm_head")
EXPERT_MODULES = ("experts.w1", "experts.w3", "experts.w2")
ROW_PARALLEL = ("o", "down", "shared.down", "experts.w2")
GLOBAL_MODULES = ("embed", "lm_head")  # not per layer: stored at layer index 0

_KEY_RE = re.compile(
    r"^(?P<prefix>.*?)(?P<path>(?:model\.)?layers\.(?P<layer>\d+)\.(?P<module>.+?)|(?:model\.)?embed_tokens|lm_head)"
    r"\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?"
    r"(?P<weight>\.weight)?$", re.ASCII)  # ASCII: \d must not take other scripts' digits ("layers.١")


@dataclass(frozen=True)
class ParsedKey:
    """A PEFT tensor key, understood."""

    key: str
    module: str  # canonical source module
    side: str  # "A" or "B"
    layer: int  # 0 for embed / lm_head
    expert: int | None = None
    peft_module_path: str = ""  # e.g. "model.layers.0.self_attn.q_proj" (for rank/alpha patterns)

    @property
    def canonical(self) -> str:
        return canonical_name(self.module, self.side, self.layer, self.expert)


def canonical_name(module: str, side: str, layer: int, expert: int | None = None) -> str:
    if module in GLOBAL_MODULES:
        base = f"{module}.{side}"
    else:
        base = f"layers.{layer}.{module}.{side}"
    return base if expert is None else f"{base}#expert{expert}"


class UnknownKey(Exception):
    """Internal: a key that is not a LoRA tensor of a known module (the reader turns it into an error)."""


def parse_peft_key(key: str, family: str) -> ParsedKey:
    """Map one PEFT safetensors key to its canonical module; raise UnknownKey with the reason."""
    m = _KEY_RE.match(key)
    if not m:
        raise UnknownKey("not a LoRA A/B tensor key (expected '...<module>.lora_A.weight', "
                         "'...lora_B.weight' or '...lora_embedding_A/B')")
    kind = m.group("kind")
    side = "A" if kind.endswith("A") else "B"
    path = m.group("path")
    prefix = m.group("prefix")
    module_path = path if not prefix.startswith("base_model.model.") else path
    if m.group("layer") is None:
        if path.endswith("embed_tokens"):
            if not kind.startswith("lora_embedding"):
                raise UnknownKey("embed_tokens LoRA must be lora_embedding_A/B")
            return ParsedKey(key, "embed", side, 0, None, module_path)
        if kind.startswith("lora_embedding"):
            raise UnknownKey("lm_head LoRA must be lora_A/lora_B")
        return ParsedKey(key, "lm_head", side, 0, None, module_path)
    if kind.startswith("lora_embedding"):
        raise UnknownKey("lora_embedding_A/B outside embed_tokens")
    has_weight = m.group("weight") is not None or m.group("adapter") == "weight"
    if not has_weight:
        raise UnknownKey("lora_A/lora_B key without '.weight'")
    table = FAMILY_TABLES[family]
    layer = int(m.group("layer"))
    mod = m.group("module")
    if mod in table.layer_modules:
        return ParsedKey(key, table.layer_modules[mod], side, layer, None, module_path)
    for pref in table.expert_prefixes:
        em = re.fullmatch(re.escape(pref) + r"\.(\d+)\.(\w+)", mod, re.ASCII)
        if em and em.group(2) in table.expert_names:
            return ParsedKey(key, table.expert_names[em.group(2)], side, layer, int(em.group(1)),
                             module_path)
    if table.fused_expert_module is not None:
        fm = re.fullmatch(re.escape(table.fused_expert_module) + r"((?:\.base_layer)*)", mod)
        if fm:
            depth = fm.group(1).count("base_layer")
            # expert=None; depth distinguishes nested ParamWrappers, shapes decide which parameter
            return ParsedKey(key, f"experts.fused{depth}", side, layer, None,
                             module_path.replace(".base_layer", ""))
    raise UnknownKey(f"unknown module {mod!r} for model family {family!r}")

"""PEFT key -> canonical LoRA name, one table per model family.

The planner speaks only canonical names; everything family-specific about where PEFT puts a LoRA
tensor lives in the tables below. What each canonical module *is* (TP kind, dimensions, merged members)
is the module-kind table of ``modules.py``.

Canonical *source* modules (what a PEFT tensor adapts):
``q k v o gate up down qkv gate_up`` (dense; ``qkv``/``gate_up`` are merged projections),
``experts.w1 experts.w3 experts.w2`` (one expert's gate/up/down, with an expert id),
``experts.fused`` (PEFT ``target_parameters`` LoRA on a fused 3-D expert parameter; whether it is the
gate_up or the down parameter is decided from the tensor shapes by the adapter reader),
``shared.gate shared.up shared.down`` (Qwen2-MoE shared expert), ``embed``, ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .modules import GLOBAL_MODULES

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
    "mlp.shared_expert_gate": "shared_gate",
}
_ROUTERS = {"mlp.gate": "router"}   # peft's 'all-linear' adapts it (transformers 5: through target_parameters)


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
    "qwen3_moe": FamilyTable({**_ATTN, **_DENSE_MLP, **_ROUTERS}, ("mlp.experts",), _QWEN_EXPERT, "mlp.experts"),
    "qwen2_moe": FamilyTable({**_ATTN, **_DENSE_MLP, **_QWEN_SHARED, **_ROUTERS}, ("mlp.experts",), _QWEN_EXPERT,
                             "mlp.experts"),
    "mixtral": FamilyTable({**_ATTN, **_ROUTERS, "block_sparse_moe.gate": "router"},
                           ("block_sparse_moe.experts", "mlp.experts"), {**_MIXTRAL_EXPERT, **_QWEN_EXPERT},
                           "mlp.experts"),
}

_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
MAX_LAYER_DIGITS = 9  # a layer or expert index longer than this is refused (no 4,300-digit int() parses)


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


def _index(token: str) -> int | None:
    """A layer / expert index: ASCII digits only ("layers.١" is no index), bounded length."""
    if not token.isascii() or not token.isdigit():
        return None
    if len(token) > MAX_LAYER_DIGITS:
        raise UnknownKey(f"index {token[:20]}... has more than {MAX_LAYER_DIGITS} digits")
    return int(token)


def _readings(key: str):
    """Each reading (path tokens, kind, adapter name, has '.weight') of '<path>.<kind>[.<adapter>][.weight]',
    shortest path first (as the lazy groups of the former regex chose).

    Token by token, so linear in the key's length (that regex was quadratic on names like "layers.0." * k)."""
    if "\n" in key:
        return
    parts = key.split(".")
    for i in range(max(1, len(parts) - 3), len(parts)):
        if parts[i] not in _KINDS:
            continue
        tail = parts[i + 1:]
        if len(tail) == 2 and tail[1] != "weight" or any(not t for t in tail):
            continue
        adapter = tail[0] if len(tail) == 2 or (tail and tail[0] != "weight") else None
        yield parts[:i], parts[i], adapter, bool(tail) and tail[-1] == "weight"


def _locate(path: list[str]) -> tuple[int, int | None, str] | None:
    """Where the module path starts in the tokens, its layer (None: embed / lm_head) and module name."""
    for j in range(len(path) - 2):  # the earliest "layers.<n>.<module>" (the regex's lazy prefix)
        if path[j] == "layers":
            layer = _index(path[j + 1])
            if layer is not None and all(path[j + 2:]):
                return (j - 1 if j and path[j - 1] == "model" else j), layer, ".".join(path[j + 2:])
    if path and path[-1] == "embed_tokens":
        return (len(path) - 2 if len(path) > 1 and path[-2] == "model" else len(path) - 1), None, "embed_tokens"
    if path and path[-1] == "lm_head":
        return len(path) - 1, None, "lm_head"
    return None


def parse_peft_key(key: str, family: str) -> ParsedKey:
    """Map one PEFT safetensors key to its canonical module; raise UnknownKey with the reason."""
    for path, kind, adapter, has_weight in _readings(key):
        where = _locate(path)
        if where is not None:
            break
    else:
        raise UnknownKey("not a LoRA A/B tensor key (expected '...<module>.lora_A.weight', "
                         "'...lora_B.weight' or '...lora_embedding_A/B')")
    start, layer, mod = where
    side = "A" if kind.endswith("A") else "B"
    module_path = ".".join(path[start:])
    if layer is None:
        if mod == "embed_tokens":
            if not kind.startswith("lora_embedding"):
                raise UnknownKey("embed_tokens LoRA must be lora_embedding_A/B")
            return ParsedKey(key, "embed", side, 0, None, module_path)
        if kind.startswith("lora_embedding"):
            raise UnknownKey("lm_head LoRA must be lora_A/lora_B")
        return ParsedKey(key, "lm_head", side, 0, None, module_path)
    if kind.startswith("lora_embedding"):
        raise UnknownKey("lora_embedding_A/B outside embed_tokens")
    if not (has_weight or adapter == "weight"):
        raise UnknownKey("lora_A/lora_B key without '.weight'")
    table = FAMILY_TABLES[family]
    if mod in table.layer_modules:
        return ParsedKey(key, table.layer_modules[mod], side, layer, None, module_path)
    for pref in table.expert_prefixes:
        rest = mod[len(pref) + 1:].split(".") if mod.startswith(pref + ".") else []
        if len(rest) == 2 and rest[1] in table.expert_names:
            expert = _index(rest[0])
            if expert is not None:
                return ParsedKey(key, table.expert_names[rest[1]], side, layer, expert, module_path)
    fused = table.fused_expert_module
    if fused is not None and (mod == fused or mod.startswith(fused + ".")):
        wrappers = mod[len(fused):].split(".")[1:]
        if all(w == "base_layer" for w in wrappers):
            # expert=None; the depth distinguishes nested ParamWrappers, shapes decide which parameter
            return ParsedKey(key, f"experts.fused{len(wrappers)}", side, layer, None,
                             module_path.replace(".base_layer", ""))
    raise UnknownKey(f"unknown module {mod!r} for model family {family!r}")


_BASE_EMBEDDINGS = {"embed_tokens.base_layer.weight": "embed", "lm_head.base_layer.weight": "lm_head"}


def base_embedding_module(key: str) -> str | None:
    """``embed`` / ``lm_head`` when ``key`` is the base layer's own weight that peft's
    ``save_pretrained(save_embedding_layers=True)`` (its default when embeddings are targeted) stores beside
    the LoRA, e.g. ``base_model.model.model.embed_tokens.base_layer.weight``; else None."""
    for suffix, module in _BASE_EMBEDDINGS.items():
        if key == suffix or key.endswith("." + suffix):
            return module
    return None


TRAINING_STATE = {"velora_config": (".lora_velora_embed",), "monteclora_config": (".lora_monteclora_sampler.",)}
"""Tensors peft saves for LoRA variants whose eval forward is plain LoRA (VeLoRA's activation-compression
embedding, MonteCLoRA's sampler state; peft 0.18-0.21), by the config field that enables the variant: used
only in training, skipped at register (never read). Without that field such a key is refused as unknown."""


def training_state_variant(key: str, enabled: frozenset[str]) -> str | None:
    """The variant field (``TRAINING_STATE``, one of ``enabled``) whose training-only tensor ``key`` is, else
    None: e.g. ``...q_proj.lora_velora_embed`` when the config sets ``velora_config``."""
    for variant in enabled:
        for mark in TRAINING_STATE.get(variant, ()):
            if key.endswith(mark) if not mark.endswith(".") else mark in key:
                return variant
    return None

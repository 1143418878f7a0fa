"""An adapter checked against the model: every LoRA pair named, placed, shaped and ranked, or refused.

``AdapterSource.open`` = ``format.adapter.read_adapter_files`` (files, header, config; no model) + this
validation (the module-kind table of ``format/modules.py`` gives each source module's scope and shapes).
Pure: no I/O beyond what ``read_adapter_files`` does; every problem raises an ``AdapterError`` subclass
naming the adapter, the file, the tensor, and the expected and actual values.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import AdapterFormatError, AdapterShapeError, UnsupportedAdapterError
from ..format.adapter import AdapterFiles, AdapterHeader, LoRATarget, read_adapter_files
from ..format.dtypes import SAFETENSORS_FLOAT
from ..format.modules import FUSED_SOURCES, SOURCES, Scope
from ..format.naming import ParsedKey, UnknownKey, base_embedding_module, parse_peft_key, training_state_variant
from ..format.peft_config import CONFIG_NAME
from ..format.safetensors_header import TensorInfo
from .model import ModelSpec

log = logging.getLogger(__name__)

_Ident = tuple[str, int, "int | None"]  # (source module, layer, expert)


class AdapterSource:
    """Opens PEFT adapter folders. ``open`` reads only ``adapter_config.json`` and the safetensors header."""

    @staticmethod
    def open(path: str | os.PathLike[str], model: ModelSpec, *, name: str | None = None,
             max_rank: int | None = None, allow_pickle: bool = False,
             pickle_cache_dir: str | None = None) -> AdapterHeader:
        files = read_adapter_files(path, name=name, allow_pickle=allow_pickle, pickle_cache_dir=pickle_cache_dir)
        targets = validate_targets(files, model, max_rank=max_rank)
        return AdapterHeader(name=files.name, path=files.path, weights_path=files.weights_path,
                             config=files.config, targets=targets, file_size=files.file_size,
                             fingerprint=files.fingerprint, header_bytes=files.header_bytes,
                             header_digest=files.header_digest, file_identity=files.file_identity,
                             settled_identity=files.settled_identity,
                             keepalive=files.keepalive)


@dataclass(frozen=True)
class _Check:
    """Error factory for one adapter file."""

    name: str
    path: str

    def shape(self, msg: str) -> AdapterShapeError:
        return AdapterShapeError(msg, adapter=self.name, path=self.path)

    def unsupported(self, msg: str) -> UnsupportedAdapterError:
        return UnsupportedAdapterError(msg, adapter=self.name, path=self.path)


def validate_targets(files: AdapterFiles, model: ModelSpec, *, max_rank: int | None = None
                     ) -> tuple[LoRATarget, ...]:
    """The adapter's LoRA pairs as targets of ``model``, in (layer, module, expert) order."""
    chk = _Check(files.name, files.weights_path)
    if not files.tensors:
        raise AdapterFormatError("the adapter holds no tensors (empty adapter)", adapter=chk.name, path=chk.path)
    pairs = _pair_tensors(files.tensors, model, chk, files.config.training_variants)
    if not pairs:
        raise AdapterFormatError("the adapter holds no LoRA tensors (only base weights)", adapter=chk.name,
                                 path=chk.path)
    targets: list[LoRATarget] = []
    seen: dict[_Ident, str] = {}
    for (module, layer, expert), sides in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0],
                                                                               kv[0][2] or -1)):
        t = _target(module, layer, expert, sides, files, model, chk, max_rank)
        ident = (t.module, layer, expert)
        if ident in seen:
            raise chk.shape(f"tensors {t.A.key!r} / {t.B.key!r}: a second LoRA pair for {t.module} layer {layer}"
                            f"{'' if expert is None else f' expert {expert}'} (first: {seen[ident]!r})")
        seen[ident] = t.A.key
        targets.append(t)
    return tuple(targets)


def _pair_tensors(tensors: dict[str, TensorInfo], model: ModelSpec, chk: _Check,
                  variants: frozenset[str] = frozenset()) -> dict[_Ident, dict[str, tuple[ParsedKey, TensorInfo]]]:
    """Every tensor named and paired (A with B); base embeddings peft saved beside the LoRA, and the
    training-only tensors of the config's ``variants`` (``naming.TRAINING_STATE``), are skipped."""
    pairs: dict[_Ident, dict[str, tuple[ParsedKey, TensorInfo]]] = {}
    for key, t in tensors.items():
        variant = training_state_variant(key, variants) if variants else None
        if variant is not None:
            log.debug("adapter %r: %s is training state of %s: skipped, not read", chk.name, key, variant)
            continue
        base = base_embedding_module(key)
        if base is not None:
            _check_base_embedding(key, t, base, model, chk)
            continue
        if ".modules_to_save." in key or key.endswith(".weight") and ".lora_" not in key:
            raise chk.unsupported(
                f"tensor {key!r} is a full weight (modules_to_save, or a resized embedding saved by peft's "
                f"save_embedding_layers); only LoRA A/B tensors are supported (if the embeddings were not "
                f"trained, save with save_pretrained(..., save_embedding_layers=False))")
        try:
            pk = parse_peft_key(key, model.family)
        except UnknownKey as e:
            raise chk.shape(f"tensor {key!r}: {e}") from None
        if t.dtype not in SAFETENSORS_FLOAT:
            raise chk.shape(f"tensor {key!r}: dtype {t.dtype} is not a floating type "
                            f"(expected one of {sorted(SAFETENSORS_FLOAT)})")
        if len(t.shape) != 2:
            raise chk.shape(f"tensor {key!r}: expected a 2-D tensor, got shape {list(t.shape)}")
        slot = pairs.setdefault((pk.module, pk.layer, pk.expert), {})
        if pk.side in slot:
            raise chk.shape(f"tensor {key!r}: a second LoRA {pk.side} for {pk.canonical} "
                            f"(first: {slot[pk.side][0].key!r})")
        slot[pk.side] = (pk, t)
    return pairs


def _check_base_embedding(key: str, t: TensorInfo, module: str, model: ModelSpec, chk: _Check) -> None:
    """peft's ``save_embedding_layers`` copy of the base ``embed_tokens`` / ``lm_head``: of the base vocabulary
    it is the base's own weight (skipped, never read); a larger vocabulary means added tokens (refused)."""
    v, h = model.vocab_size, model.hidden_size
    if len(t.shape) == 2 and t.shape[1] == h and t.shape[0] > v:
        raise chk.unsupported(
            f"tensor {key!r} is a {module} base weight of {t.shape[0]} rows for a base vocabulary of {v}: the "
            f"adapter adds {t.shape[0] - v} tokens; added tokens are not supported (refused, never ignored)")
    if t.shape != (v, h):
        raise chk.shape(f"tensor {key!r}: a saved {module} base weight must be [{v}, {h}] (vocab, hidden) for "
                        f"model {model.name!r}, got {list(t.shape)}")
    log.debug("adapter %r: %s is the base model's own %s weight (peft save_embedding_layers): skipped, not read",
              chk.name, key, module)


def _resolve_fused(model: ModelSpec, a: TensorInfo, b: TensorInfo) -> tuple[str, int] | None:
    """Which fused expert parameter a (A, B) pair adapts, from shapes; and the per-expert rank."""
    E = model.num_experts
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] % E:
        return None
    r = a.shape[0] // E
    for src in FUSED_SOURCES:
        out, inp = model.linear_shape(src.name)
        if a.shape == (E * r, inp) and b.shape == (out, E * r):
            return src.name, r
    return None


def _check_layer(module: str, layer: int, expert: int | None, a: TensorInfo, model: ModelSpec,
                 chk: _Check) -> None:
    """The layer (and expert) exist in the model and have the module's kind of block."""
    scope = SOURCES[module].kind.scope
    if scope is not Scope.GLOBAL and layer >= model.num_hidden_layers:
        raise chk.shape(f"tensor {a.key!r}: layer index {layer} is out of range "
                        f"(model {model.name!r} has {model.num_hidden_layers} layers)")
    if model.has_scope(scope, layer):
        if scope is Scope.EXPERTS and not SOURCES[module].fused_experts and (
                expert is None or not 0 <= expert < model.num_experts):
            raise chk.shape(f"tensor {a.key!r}: expert id {expert} is out of range "
                            f"(model {model.name!r} has {model.num_experts} experts)")
        return
    missing = {Scope.EXPERTS: "has no experts", Scope.SHARED_EXPERT: "has no shared expert",
               Scope.ROUTER: "has no router (not an MoE layer)",
               Scope.DENSE_MLP: "is an MoE layer without a dense MLP"}[scope]
    raise chk.shape(f"tensor {a.key!r}: layer {layer} of model {model.name!r} {missing}")


def _target(module: str, layer: int, expert: int | None, sides: dict[str, tuple[ParsedKey, TensorInfo]],
            files: AdapterFiles, model: ModelSpec, chk: _Check, max_rank: int | None) -> LoRATarget:
    """One pair checked: both sides, placement, shapes from the module table, rank against the config."""
    for side in ("A", "B"):
        if side not in sides:
            other = next(iter(sides.values()))[1].key
            raise chk.shape(f"LoRA {side} is missing for {other!r} (every target needs both A and B)")
    (pa, a), (_, b) = sides["A"], sides["B"]
    ne = 1
    if module.startswith("experts.fused"):
        _check_layer("experts.gate_up", layer, expert, a, model, chk)
        res = _resolve_fused(model, a, b)
        if res is None:
            raise chk.shape(
                f"tensors {a.key!r} {list(a.shape)} / {b.key!r} {list(b.shape)} fit neither fused expert "
                f"parameter of model {model.name!r}: expected gate_up A [E*r, {model.hidden_size}], "
                f"B [{2 * model.moe_intermediate_size}, E*r] or down A [E*r, "
                f"{model.moe_intermediate_size}], B [{model.hidden_size}, E*r] with E={model.num_experts}")
        module, r = res
        ne = model.num_experts
    else:
        _check_layer(module, layer, expert, a, model, chk)
        r = a.shape[0]
    if r <= 0:
        raise chk.shape(f"tensor {a.key!r}: rank {r} must be positive")
    out, inp = model.linear_shape(module)
    exp_a, exp_b = (ne * r, inp), (out, ne * r)
    if a.shape != exp_a or b.shape != exp_b:
        raise chk.shape(
            f"{module} layer {layer}{'' if expert is None else f' expert {expert}'}: expected A "
            f"{list(exp_a)} and B {list(exp_b)} for model {model.name!r} at rank {r}, got A "
            f"{a.key!r} {list(a.shape)} and B {b.key!r} {list(b.shape)}")
    # peft matches rank/alpha patterns against the module path, or for a fused expert ParamWrapper against
    # "<module>.<parameter>" (e.g. "model.layers.0.mlp.experts.gate_up_proj", where peft's v4->v5 MoE
    # conversion puts a rank_pattern of 2r for targets gate_proj+up_proj)
    pattern_path = pa.peft_module_path
    if ne > 1:
        pattern_path += ".gate_up_proj" if module == "experts.gate_up" else ".down_proj"
    cfg = files.config
    cfg_r = cfg.rank_for(pattern_path)
    if r != cfg_r:
        raise chk.shape(f"tensor {a.key!r}: rank {r} from the tensors does not match rank {cfg_r} from "
                        f"{CONFIG_NAME} (r / rank_pattern)")
    if max_rank is not None and r > max_rank:
        raise chk.shape(f"tensor {a.key!r}: rank {r} exceeds max_lora_rank={max_rank}")
    alpha = cfg.alpha_for(pattern_path)
    return LoRATarget(module=module, layer=layer, expert=expert, A=a, B=b, rank=r, alpha=alpha,
                      scaling=cfg.scaling_for(r, alpha), peft_module_path=pattern_path, num_experts=ne)

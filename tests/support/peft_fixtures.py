"""Tiny Hugging Face models and real PEFT adapters, made inside the tests, and peft's own logits.

Everything here imports ``transformers`` / ``peft`` lazily, inside functions: the spawned ranks of the
conformance tests import the test module (to unpickle their function) and must not pay for, or need,
those packages. Tests call ``require_hf()`` first, which skips with a clear reason if they are absent.

Adapters are created with ``init_lora_weights=False`` (random A *and* B, so every delta is non-zero),
saved with ``save_pretrained`` and then loaded back by peft itself (``PeftModel.from_pretrained``) to
compute the reference: the reference is what peft computes from the files tp_lora reads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tp_lora.plan.model import ModelSpec
from tp_lora.reference.checkpoint import hf_config_dict

DENSE_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj"]
GLOBALS = ["embed_tokens", "lm_head"]
MOE_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER_PARAM = "mlp.gate.weight"   # the router's weight (transformers 5's TopKRouter is not an nn.Linear)


def require_hf() -> tuple[Any, Any]:
    """(transformers, peft), or skip the test saying what is missing."""
    transformers = pytest.importorskip(
        "transformers", reason="conformance tests need transformers (test-only dependency: pip install "
                               "'tp_lora[test]')")
    peft = pytest.importorskip(
        "peft", reason="conformance tests need peft (test-only dependency: pip install 'tp_lora[test]')")
    if not hasattr(peft.LoraConfig(), "target_parameters"):
        pytest.skip(f"peft {peft.__version__} has no LoraConfig.target_parameters (MoE expert LoRA); "
                    f"need peft >= 0.17")
    return transformers, peft


@dataclass(frozen=True)
class Recipe:
    """One PEFT adapter: LoraConfig arguments + the seed of its random init."""

    name: str
    seed: int
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    target_parameters: tuple[str, ...] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def lora_config(self, peft: Any) -> Any:
        kw: dict[str, Any] = dict(r=self.r, lora_alpha=self.alpha, init_lora_weights=False, lora_dropout=0.0,
                                  target_modules=list(self.target_modules), use_rslora=self.use_rslora,
                                  rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern))
        if self.target_parameters is not None:
            kw["target_parameters"] = list(self.target_parameters)
        return peft.LoraConfig(**kw)


def recipes(spec: ModelSpec) -> dict[str, Recipe]:
    """The adapters of the conformance tests for a dense Llama or a Qwen3-MoE spec.

    a1: plain alpha/r. On the MoE it targets gate_proj/up_proj/down_proj by module name, the transformers-4
        way: peft converts that to ``target_parameters`` on the fused experts, with a rank_pattern/alpha_pattern
        of 2r/2alpha on gate_up_proj (what such adapters look like in practice).
    a2: rsLoRA alpha/sqrt(r), the largest rank (16); MoE experts and the router through explicit
        ``target_parameters``.
    a3: rank_pattern / alpha_pattern on some modules, some per layer.
    small: rank 2, a subset of the modules (no v_proj, lm_head, up_proj / expert gate_up): loaded into the
        slot a2 (rank 16, every module) used before, it must add nothing where it is not a target.
    """
    moe = spec.is_moe
    dense_t = tuple(DENSE_LINEARS + GLOBALS)
    attn_t = tuple(ATTN_LINEARS + GLOBALS)
    if not moe:
        return {
            "a1": Recipe("a1", 11, 8, 16, dense_t),
            "a2": Recipe("a2", 12, 16, 8, dense_t, use_rslora=True),
            "a3": Recipe("a3", 13, 4, 32, dense_t,
                         rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.o_proj": 8, "lm_head": 6,
                                       "embed_tokens": 12, r"layers\.0\.mlp\.down_proj": 10},
                         alpha_pattern={"v_proj": 4, "embed_tokens": 3, r"layers\.0\.mlp\.up_proj": 64}),
            "small": Recipe("small", 14, 2, 6, ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj",
                                                "embed_tokens")),
        }
    return {
        "a1": Recipe("a1", 21, 8, 16, dense_t),   # gate/up/down_proj converted by peft to the fused experts
        "a2": Recipe("a2", 22, 16, 8, attn_t, (*MOE_PARAMS, ROUTER_PARAM), use_rslora=True),
        "a3": Recipe("a3", 23, 4, 32, attn_t, tuple(MOE_PARAMS),
                     rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.o_proj": 8, "lm_head": 6,
                                   "embed_tokens": 12, r"layers\.1\.mlp\.experts\.down_proj": 10,
                                   "gate_up_proj": 3},
                     alpha_pattern={"v_proj": 4, "embed_tokens": 3, r"layers\.0\.mlp\.experts\.gate_up_proj": 7}),
        "small": Recipe("small", 24, 2, 6, ("q_proj", "k_proj", "o_proj", "embed_tokens"),
                        ("mlp.experts.down_proj",)),
    }


@dataclass
class Family:
    """One model family's fixture: checkpoint and adapter folders, and peft's logits per (adapter, seq)."""

    spec: ModelSpec
    base_dir: str
    adapter_dirs: dict[str, str]
    ranks: dict[str, int]  # largest rank of each adapter (after peft's config conversion)
    ref: dict[tuple[str | None, int], torch.Tensor]  # (adapter or None, sequence index) -> [len, vocab]


def build_family(spec: ModelSpec, root: Path, seqs: list[torch.Tensor]) -> Family:
    """Base checkpoint + the ``recipes(spec)`` adapters under ``root``, and peft's logits of every
    (adapter or None, sequence) pair, each sequence run alone (batch of one, positions from 0)."""
    with warnings.catch_warnings():
        # peft 0.21 checks rank/alpha_pattern keys against target_modules only, so it warns about keys that
        # select target_parameters; they are applied (the saved expert tensors have those ranks, and
        # tp_lora's reader checks the tensors' ranks against the config)
        warnings.filterwarnings("ignore", message=".*pattern keys did not match any targeted module.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _build_family(spec, root, seqs)


def _build_family(spec: ModelSpec, root: Path, seqs: list[torch.Tensor]) -> Family:
    transformers, peft = require_hf()
    transformers.utils.logging.disable_progress_bar()
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**hf_config_dict(spec), initializer_range=0.05)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    del base

    def load_base() -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(
            base_dir, attn_implementation="eager", dtype=torch.float32).eval()

    adapter_dirs: dict[str, str] = {}
    for rec in recipes(spec).values():
        torch.manual_seed(rec.seed)
        pm = peft.get_peft_model(load_base(), rec.lora_config(peft))
        if spec.is_moe:
            _check_expert_lora_applied(pm, rec.name)
        d = root / rec.name
        # peft's default: with embed_tokens / lm_head targeted it also stores their base weights
        # (save_embedding_layers=True), which tp_lora must skip
        pm.save_pretrained(d)
        adapter_dirs[rec.name] = str(d)
        if ROUTER_PARAM in (rec.target_parameters or ()):   # the router's LoRA is really in the file
            from safetensors import safe_open
            with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
                assert any(".mlp.gate.lora_A" in k for k in f.keys()), f"{rec.name}: no router LoRA saved"

    ref: dict[tuple[str | None, int], torch.Tensor] = {}
    base = load_base()
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref[(None, i)] = base(input_ids=s[None]).logits[0]
    ranks: dict[str, int] = {}
    for name, d in adapter_dirs.items():
        pm = peft.PeftModel.from_pretrained(load_base(), d).eval()
        ranks[name] = max(max(m.r.values()) for m in pm.modules() if hasattr(m, "r") and isinstance(m.r, dict)
                          and m.r)
        with torch.no_grad():
            for i, s in enumerate(seqs):
                ref[(name, i)] = pm(input_ids=s[None]).logits[0]
                if i == 0:
                    with pm.disable_adapter():   # peft's own "no adapter" is the base model
                        assert torch.equal(pm(input_ids=s[None]).logits[0], ref[(None, 0)])
    return Family(spec, str(base_dir), adapter_dirs, ranks, ref)


@torch.no_grad()
def _check_expert_lora_applied(pm: Any, name: str) -> None:
    """peft's ``target_parameters`` LoRA really reaches the fused experts' forward: zeroing the ParamWrappers'
    B changes the logits (so a match with tp_lora is not a match of two models that both skip experts)."""
    wrappers = [m for m in pm.modules() if type(m).__name__ == "ParamWrapper"]
    assert wrappers, f"{name}: peft created no ParamWrapper for the experts"
    ids = torch.arange(16)[None] * 7 % pm.config.vocab_size
    with_experts = pm(input_ids=ids).logits
    saved = [w.lora_B["default"].weight.clone() for w in wrappers]
    for w in wrappers:
        w.lora_B["default"].weight.zero_()
    without = pm(input_ids=ids).logits
    for w, b in zip(wrappers, saved):
        w.lora_B["default"].weight.copy_(b)
    assert float((with_experts - without).abs().max()) > 1e-2, f"{name}: expert LoRA has no effect in peft"


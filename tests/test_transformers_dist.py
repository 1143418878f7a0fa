"""tp_lora inside transformers' own tensor parallelism: logits and greedy tokens equal peft's, per request.

A tiny Llama and a tiny Qwen3-MoE (8 heads, 4 kv heads: GQA at tp 2 and 4) are built and saved here with
real PEFT adapters (``tests/peft_fixtures.py``: alpha/r, rsLoRA, rank/alpha patterns per module and per
layer, embed_tokens and lm_head, fused experts through ``target_parameters`` and peft's own conversion).
Each rank of a real gloo group loads the model with ``from_pretrained(tp_plan="auto")`` (weights as
DTensors), attaches tp_lora (``tp_lora.integrations.transformers``) and runs ONE batch mixing three
adapters and the base model through transformers' forward, then 16 greedy tokens per request through
transformers' ``generate``. The reference is peft, single process, each request alone.

The vocabulary (250) does not divide by 4: the last vocab shard of embed_tokens/lm_head is shorter.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import run_distributed

from tp_lora.plan.model import ModelSpec

PRESETS = {"dense": "tiny-dense", "moe": "tiny-moe"}
PROMPT_LEN = 6
NEW_TOKENS = 16
TOL = 1e-4
# (adapter or None, prompt index) per request, in batch order: a1 twice, not adjacent
MIXED = (("a1", 0), (None, 1), ("a2", 2), ("a3", 3), ("a1", 4))


def _spec(family: str) -> ModelSpec:
    # 8 heads / 4 kv heads: kv heads split at tp 2 and 4, two q heads per kv head
    return dataclasses.replace(ModelSpec.from_preset(PRESETS[family]), num_attention_heads=8,
                               num_key_value_heads=4, head_dim=8)


def _prompts(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    p = torch.randint(0, vocab, (len(MIXED), PROMPT_LEN), generator=g)
    p[0, :4] = torch.tensor([vocab - 1, 0, 62, 63])      # vocab ends and the tp=4 shard edge (63 rows)
    p[3, :3] = torch.tensor([125, 126, 189])              # tp=2 and tp=4 shard edges
    return p


# -- per rank (spawned: no peft here) -----------------------------------------------------------------
def _rank(rank: int, world: int, fams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import transformers

    from tp_lora import LoRAConfig
    from tp_lora.integrations.transformers import attach, build_manager

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out: dict[str, Any] = {}
    for fam, f in fams.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            f["base"], tp_plan="auto", dtype=torch.float32, attn_implementation="eager").eval()
        mgr = build_manager(model, LoRAConfig(max_loras=3, max_lora_rank=16, dtype="float32",
                                              activation_timeout_s=30))
        lora = attach(model, mgr)
        for name, d in f["adapters"].items():
            mgr.register(name, d)
        mgr.activate(["a1", "a2", "a3"])
        prompts = f["prompts"]
        ids = torch.stack([prompts[i] for _, i in MIXED])
        adapters = [a for a, _ in MIXED]
        with torch.no_grad(), lora.requests(adapters):
            logits = model(input_ids=ids).logits
        tokens = lora.generate(ids, adapters, NEW_TOKENS)
        lora.detach()
        with torch.no_grad():
            base = model(input_ids=ids).logits
        out[fam] = {"logits": logits, "tokens": tokens, "base_after_detach": base,
                    "tp": mgr.parallel.tp_size}
        mgr.close()
    return out


# -- the reference (parent process) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from peft_fixtures import build_family, require_hf
    transformers, peft = require_hf()
    out = {}
    for fam in PRESETS:
        spec = _spec(fam)
        root = tmp_path_factory.mktemp(fam)
        prompts = _prompts(spec.vocab_size)
        f = build_family(spec, root, [prompts[i] for i in range(len(prompts))])
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
            f.base_dir, attn_implementation="eager", dtype=torch.float32).eval()
        tokens: dict[tuple[str | None, int], torch.Tensor] = {}
        with torch.no_grad():
            for name in (None, "a1", "a2", "a3"):
                m = load() if name is None else peft.PeftModel.from_pretrained(load(), f.adapter_dirs[name]).eval()
                for a, i in MIXED:
                    if a == name:
                        g = m.generate(input_ids=prompts[i][None], max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                        tokens[(a, i)] = g[0, PROMPT_LEN:]
        out[fam] = {"base": f.base_dir, "adapters": {k: f.adapter_dirs[k] for k in ("a1", "a2", "a3")},
                    "prompts": prompts, "ref": f.ref, "ref_tokens": tokens}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_transformers_tp_matches_peft(families: dict[str, dict[str, Any]], world: int) -> None:
    send = {k: {"base": v["base"], "adapters": v["adapters"], "prompts": v["prompts"]} for k, v in families.items()}
    results = run_distributed(_rank, world, send, timeout=240)
    for fam, f in families.items():
        r0 = results[0][fam]
        assert r0["tp"] == world
        for r in results[1:]:   # every rank ends with the same (gathered / all-reduced) logits and tokens
            assert torch.equal(r[fam]["tokens"], r0["tokens"])
            assert torch.allclose(r[fam]["logits"], r0["logits"], atol=1e-5)
        for b, (a, i) in enumerate(MIXED):
            ref = f["ref"][(a, i)]
            err = float((r0["logits"][b] - ref).abs().max()) / max(1.0, float(ref.abs().max()))
            assert err <= TOL, f"{fam} tp={world} request {b} ({a}): logits differ from peft by {err:.2e}"
            if a is not None:   # the adapter really changes this request (not a match of two base models)
                assert float((ref - f["ref"][(None, i)]).abs().max()) > 1e-2
            assert r0["tokens"][b].tolist() == f["ref_tokens"][(a, i)].tolist(), \
                f"{fam} tp={world} request {b} ({a}): greedy tokens differ from peft's"
            base_err = float((r0["base_after_detach"][b] - f["ref"][(None, i)]).abs().max())
            assert base_err <= TOL * max(1.0, float(ref.abs().max())), f"{fam}: detach() left a delta"

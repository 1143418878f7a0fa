"""tp_lora inside transformers' own tensor parallelism: logits and greedy tokens equal peft's, per request.

A tiny Llama and a tiny Qwen3-MoE (8 heads, 4 kv heads: GQA at tp 2 and 4) are built and saved here with
real PEFT adapters (``tests/peft_fixtures.py``: alpha/r, rsLoRA, rank/alpha patterns per module and per
layer, embed_tokens and lm_head, fused experts through ``target_parameters`` and peft's own conversion).
Each rank of a real gloo group loads the model with ``from_pretrained(tp_plan="auto")`` (weights as
DTensors), or with ``DistributedConfig(tp_size=n, ep_size=n)`` for expert parallelism (whole experts per
rank, transformers' AllReduceEP at inference), attaches tp_lora (``tp_lora.integrations.transformers``)
and runs ONE batch mixing three adapters and the base model through transformers' forward, then 16 greedy
tokens per request through transformers' ``generate``, for equal-length prompts and for left-padded prompts
of different lengths. The reference is peft, single process, each request alone.

The vocabulary (250) does not divide by 4: the last vocab shard of embed_tokens/lm_head is shorter.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from support.distributed import run_distributed

from tp_lora.plan.model import ModelSpec

PRESETS = {"dense": "tiny-dense", "moe": "tiny-moe"}
PROMPT_LEN = 6
NEW_TOKENS = 16
TOL = 1e-4
# (adapter or None, prompt index) per request, in batch order: a1 twice, not adjacent
MIXED = (("a1", 0), (None, 1), ("a2", 2), ("a3", 3), ("a1", 4))
# prompt lengths of the left-padded generation (same requests, prompts cut to these lengths)
PAD_LENS = (6, 3, 5, 2, 4)
# (family, ep_size) per world size (tp = world). Each spawned rank imports transformers (the slow part on a
# shared 2-core CI box) and then loads every case of its world; the MoE at world 4 covers the attention path
# of both families. EP: DistributedConfig(tp_size=world, ep_size=world), whole experts per rank. "rep": the
# experts replicated on every rank, as transformers >= 5.25 loads them under tp_plan="auto" (on older
# transformers, whose default plan shards them, that case is not run); ep 1 of the MoE: the experts sharded
# over TP (the default plan up to 5.24, MOE_TP_PLAN from 5.25).
CASES = {2: (("dense", 1), ("moe", 1), ("moe", 2), ("moe", "rep")), 4: (("moe", 1), ("moe", 4))}


def _spec(family: str) -> ModelSpec:
    # 8 heads / 4 kv heads: kv heads split at tp 2 and 4, two q heads per kv head
    return dataclasses.replace(ModelSpec.from_preset(PRESETS[family]), num_attention_heads=8,
                               num_key_value_heads=4, head_dim=8)


def _left_padded(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, PROMPT_LEN]`` ids and attention mask: request b's prompt cut to PAD_LENS[b], left-padded with 0."""
    ids = torch.zeros(len(MIXED), PROMPT_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, ((_, i), n) in enumerate(zip(MIXED, PAD_LENS)):
        ids[b, PROMPT_LEN - n:] = prompts[i][:n]
        mask[b, PROMPT_LEN - n:] = 1
    return ids, mask


def _prompts(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    p = torch.randint(0, vocab, (len(MIXED), PROMPT_LEN), generator=g)
    p[0, :4] = torch.tensor([vocab - 1, 0, 62, 63])      # vocab ends and the tp=4 shard edge (63 rows)
    p[3, :3] = torch.tensor([125, 126, 189])              # tp=2 and tp=4 shard edges
    return p


def _plans_tp_experts(base: str) -> bool:
    """Whether this transformers' default TP plan of the model shards its fused experts (<= 5.24)."""
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(base)
    return "layers.*.mlp.experts" in (getattr(cfg, "base_model_tp_plan", None) or {})


# -- per rank (spawned: no peft here) -----------------------------------------------------------------
def _rank(rank: int, world: int, fams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import transformers

    from tp_lora import LoRAConfig
    from tp_lora.errors import AdapterStateError
    from tp_lora.integrations.transformers import attach, build_manager

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out: dict[str, Any] = {}
    for fam, ep in CASES[world]:
        f = fams[fam]
        if ep == "rep":
            if _plans_tp_experts(f["base"]):
                out[(fam, ep)] = None     # this transformers shards the experts under tp_plan="auto"
                continue
            load = dict(tp_plan="auto")
        elif ep > 1:
            from transformers.distributed import DistributedConfig
            load = dict(distributed_config=DistributedConfig(tp_size=world, ep_size=ep))
        elif fam == "moe" and not _plans_tp_experts(f["base"]):
            # transformers >= 5.25: the default plan replicates the experts; shard them over TP explicitly
            from transformers.distributed import DistributedConfig

            from tp_lora.integrations.transformers import MOE_TP_PLAN
            load = dict(distributed_config=DistributedConfig(tp_size=world, tp_plan=MOE_TP_PLAN))
        else:
            load = dict(tp_plan="auto")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            f["base"], dtype=torch.float32, attn_implementation="eager", **load).eval()
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
        pad_ids, pad_mask = _left_padded(prompts)
        padded = lora.generate(pad_ids, adapters, NEW_TOKENS, attention_mask=pad_mask)
        with pytest.raises(AdapterStateError, match="already has tp_lora attached"):
            attach(model, mgr)
        lora.detach()
        with torch.no_grad():
            base = model(input_ids=ids).logits
        out[(fam, ep)] = {"logits": logits, "tokens": tokens, "padded": padded, "base_after_detach": base,
                          "tp": mgr.parallel.tp_size, "ep": mgr.parallel.ep_size,
                          "replicated": mgr.parallel.moe_replicated}
        mgr.close()
    return out


# -- the reference (parent process) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from support.peft_fixtures import build_family, require_hf
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
                for (a, i), n in zip(MIXED, PAD_LENS):
                    if a == name:
                        for k in {PROMPT_LEN, n}:   # the full prompt, and the one cut for the padded batch
                            g = m.generate(input_ids=prompts[i][None, :k], max_new_tokens=NEW_TOKENS,
                                           min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                            tokens[(a, i, k)] = g[0, k:]
        out[fam] = {"base": f.base_dir, "adapters": {k: f.adapter_dirs[k] for k in ("a1", "a2", "a3")},
                    "prompts": prompts, "ref": f.ref, "ref_tokens": tokens}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_transformers_tp_matches_peft(families: dict[str, dict[str, Any]], world: int) -> None:
    send = {k: {"base": v["base"], "adapters": v["adapters"], "prompts": v["prompts"]} for k, v in families.items()}
    results = run_distributed(_rank, world, send, timeout=300)
    for fam, ep in CASES[world]:
        f, r0 = families[fam], results[0][(fam, ep)]
        if r0 is None:     # replicated experts need transformers >= 5.25's default plan
            assert ep == "rep" and _plans_tp_experts(f["base"]), (fam, ep)
            continue
        assert (r0["tp"], r0["ep"], r0["replicated"]) == (world, 1 if ep == "rep" else ep, ep == "rep")
        for r in results[1:]:   # every rank ends with the same (gathered / all-reduced) logits and tokens
            assert torch.equal(r[(fam, ep)]["tokens"], r0["tokens"])
            assert torch.equal(r[(fam, ep)]["padded"], r0["padded"])
            assert torch.allclose(r[(fam, ep)]["logits"], r0["logits"], atol=1e-5)
        fam = f"{fam} ep={ep}"
        for b, (a, i) in enumerate(MIXED):
            ref = f["ref"][(a, i)]
            err = float((r0["logits"][b] - ref).abs().max()) / max(1.0, float(ref.abs().max()))
            assert err <= TOL, f"{fam} tp={world} request {b} ({a}): logits differ from peft by {err:.2e}"
            if a is not None:   # the adapter really changes this request (not a match of two base models)
                assert float((ref - f["ref"][(None, i)]).abs().max()) > 1e-2
            assert r0["tokens"][b].tolist() == f["ref_tokens"][(a, i, PROMPT_LEN)].tolist(), \
                f"{fam} tp={world} request {b} ({a}): greedy tokens differ from peft's"
            assert r0["padded"][b].tolist() == f["ref_tokens"][(a, i, PAD_LENS[b])].tolist(), \
                f"{fam} tp={world} request {b} ({a}): left-padded greedy tokens differ from peft's"
            base_err = float((r0["base_after_detach"][b] - f["ref"][(None, i)]).abs().max())
            assert base_err <= TOL * max(1.0, float(ref.abs().max())), f"{fam}: detach() left a delta"


# -- the sharding check (pure: no processes, no transformers) ---------------------------------------------
def test_sharding_check_names_each_mismatching_module() -> None:
    from tp_lora import LoRAConfig, LoRAManager, ParallelSpec
    from tp_lora.errors import LayoutError
    from tp_lora.integrations.transformers import TargetModule, check_sharding, expected_shapes
    from tp_lora.runtime.activation import LOCAL

    spec = ModelSpec.from_preset("tiny-dense")            # 4 heads, 2 kv heads of 16, vocab 250
    par = ParallelSpec(tp_size=4, tp_rank=1, vocab_pad_to=1)
    with LoRAManager(LoRAConfig(max_loras=1, max_lora_rank=4, dtype="float32"), spec, par, group=LOCAL) as mgr:
        exp = expected_shapes({m: mgr.pool.A[m].shape for m in mgr.pool.modules},
                              {m: mgr.pool.B[m].shape for m in mgr.pool.modules})
    good = [TargetModule("model.layers.0.self_attn.q_proj", "q", 0, "colwise", (16, 64)),
            TargetModule("model.layers.0.self_attn.k_proj", "k", 0, "colwise", (16, 64)),
            TargetModule("model.layers.0.self_attn.o_proj", "o", 0, "rowwise", (64, 16)),
            TargetModule("model.layers.0.mlp.down_proj", "down", 0, "rowwise", (64, 32)),
            TargetModule("model.embed_tokens", "embed", 0, "embedding_rowwise", (63, 64)),
            TargetModule("lm_head", "lm_head", 0, "colwise_gather_output", (63, 64))]
    check_sharding(good, exp, par, spec)                  # tp_lora's own slicing passes
    bad = [TargetModule("model.layers.0.self_attn.k_proj", "k", 0, "colwise", (8, 64)),   # half a kv head
           TargetModule("model.layers.1.self_attn.o_proj", "o", 1, None, (64, 64)),       # not sharded
           TargetModule("model.embed_tokens", "embed", 0, None, (250, 64)),               # replicated (5.17)
           TargetModule("lm_head", "lm_head", 0, "colwise_gather_output", (64, 64))]      # other vocab split
    with pytest.raises(LayoutError) as e:
        check_sharding(good[:1] + bad, exp, par, spec)
    msg = str(e.value)
    for path in ("layers.0.self_attn.k_proj", "layers.1.self_attn.o_proj", "model.embed_tokens", "lm_head"):
        assert path in msg, (path, msg)
    assert "q_proj" not in msg
    assert "replicated" in msg and "num_key_value_heads=2" in msg
    # replicated fused experts (transformers >= 5.25's default plan): the error says how to load instead
    moe = ModelSpec.from_preset("tiny-moe")
    mpar = ParallelSpec(tp_size=2, tp_rank=0, vocab_pad_to=1)
    E, I, H = moe.num_experts, moe.moe_intermediate_size, moe.hidden_size
    rep = TargetModule("model.layers.0.mlp.experts", "experts", 0, None,
                       {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)})
    with pytest.raises(LayoutError) as e:
        check_sharding([rep], {"experts.w1": (I // 2, H), "experts.w2": (H, I // 2)}, mpar, moe)
    assert "model.layers.0.mlp.experts" in str(e.value) and "MOE_TP_PLAN" in str(e.value)
    assert "build_manager" in str(e.value)
    # ... and pass against a manager that plans them whole (what build_manager makes of such a model)
    rpar = ParallelSpec(tp_size=2, tp_rank=1, moe_replicated=True, vocab_pad_to=1)
    check_sharding([rep], {"experts.w1": (I, H), "experts.w2": (H, I)}, rpar, moe)
    # a replicated manager against experts transformers did shard: refused, saying which
    tp_sharded = TargetModule("model.layers.0.mlp.experts", "experts", 0, "moe_tp_experts",
                              {"gate_up_proj": (E, I, H), "down_proj": (E, H, I // 2)},
                              (("gate_up_proj", "packed_colwise"), ("down_proj", "rowwise")))
    with pytest.raises(LayoutError, match="moe_replicated=True"):
        check_sharding([tp_sharded], {"experts.w1": (I, H), "experts.w2": (H, I)}, rpar, moe)


# -- the main job on the transformers engine (one rank, in process) ----------------------------------------
def test_main_job_engine_transformers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tp_lora.errors import ConfigError
    from tp_lora.job.run import run
    from tp_lora.job.runconfig import load_run_config

    with pytest.raises(ConfigError, match="engine"):
        load_run_config(None, ["engine=vllm"])
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                          ["engine=transformers", f"cache_dir={tmp_path}", "workload.requests=12",
                           "workload.verify_every=1", "synthetic.count=3"])
    report = run(cfg, progress=False)
    assert report["engine"] == "transformers"
    v = report["verification"]   # every batch against tp_lora's own single-process reference model
    assert v["checked_batches"] == report["batches"] >= 2 and v["failed"] == 0, v
    assert v["max_abs_err"] <= 1e-4, v

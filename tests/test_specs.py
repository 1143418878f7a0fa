"""ModelSpec (presets, HF configs of every supported family) and ParallelSpec (validation, ownership)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from tp_lora.errors import ConfigError, LayoutError
from tp_lora.plan.model import FAMILIES, PRESET_DIR, ModelSpec, load_model_spec
from tp_lora.plan.parallel import ParallelSpec

warnings.filterwarnings("ignore", module="transformers")

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                "tie_word_embeddings", "qk_norm")


def shape(spec: ModelSpec) -> dict:
    return {f: getattr(spec, f) for f in SHAPE_FIELDS}


# ==================================================================================================
# presets
# ==================================================================================================
def test_presets_exist():
    assert {"tiny-dense", "tiny-moe", "tiny-qwen2-moe", "llama-3-8b", "llama-3-70b", "llama-3.1-70b",
            "mixtral-8x7b", "qwen3-30b-a3b"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name):
    spec = ModelSpec.from_preset(name)
    assert spec.name == name
    assert spec.family in FAMILIES
    assert spec.num_attention_heads % spec.num_key_value_heads == 0
    assert spec.q_size == spec.num_attention_heads * spec.head_dim
    assert spec.kv_size == spec.num_key_value_heads * spec.head_dim
    assert spec.is_moe == (spec.num_experts > 0)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_preset(PRESET_DIR / f"{name}.yaml") == spec  # by path too
    assert load_model_spec(name) == spec
    # every module a LoRA can adapt has a shape
    for m in ("q", "k", "v", "o", "gate", "up", "down", "lm_head", "embed"):
        out, inp = spec.linear_shape(m)
        assert out > 0 and inp > 0
    # the preset is legal at tp=1 (and its own natural layouts)
    ParallelSpec().validate(spec)


@pytest.mark.parametrize("name,tp,ep", [("llama-3-8b", 8, 1), ("llama-3-70b", 8, 1), ("mixtral-8x7b", 8, 8),
                                        ("mixtral-8x7b", 8, 2), ("qwen3-30b-a3b", 4, 4),
                                        ("qwen3-30b-a3b", 8, 2), ("tiny-moe", 4, 2), ("tiny-dense", 4, 1),
                                        ("tiny-qwen2-moe", 4, 4)])
def test_presets_are_legal_at_their_usual_layouts(name, tp, ep):
    ParallelSpec(tp_size=tp, ep_size=ep).validate(ModelSpec.from_preset(name))


def test_preset_numbers():
    l8 = ModelSpec.from_preset("llama-3-8b")
    assert (l8.q_size, l8.kv_size, l8.linear_shape("down"), l8.linear_shape("embed")) == (
        4096, 1024, (4096, 14336), (4096, 128256))
    q = ModelSpec.from_preset("qwen3-30b-a3b")
    assert (q.num_experts, q.moe_intermediate_size, q.head_dim, q.qk_norm, q.q_size) == (128, 768, 128, True, 4096)
    assert q.linear_shape("experts.w2") == (2048, 768)
    mx = ModelSpec.from_preset("mixtral-8x7b")
    assert mx.linear_shape("experts.w1") == (14336, 4096) and mx.num_experts == 8
    q2 = ModelSpec.from_preset("tiny-qwen2-moe")
    assert q2.has_shared_expert(0) and q2.linear_shape("shared.down") == (64, 64) and q2.attention_bias


def test_preset_errors():
    with pytest.raises(ConfigError, match=r"not found.*available presets.*tiny-dense"):
        ModelSpec.from_preset("no-such-model")
    with pytest.raises(ConfigError, match=r"unknown model field\(s\) \['bogus'\]"):
        ModelSpec.from_dict({**ModelSpec.from_preset("tiny-dense").to_dict(), "bogus": 1})
    d = ModelSpec.from_preset("tiny-dense").to_dict()
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelSpec.from_dict(d)


def test_bad_preset_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        ModelSpec.from_preset(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ModelSpec.from_preset(p)


@pytest.mark.parametrize("changes,match", [
    (dict(family="gpt2"), r"unknown family 'gpt2'"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    (dict(num_attention_heads=6, num_key_value_heads=4),
     r"num_attention_heads=6 is not a multiple of num_key_value_heads=4"),
    (dict(num_experts=8), r"dense family 'llama' with num_experts=8"),
    (dict(family="qwen3_moe"), r"needs num_experts, num_experts_per_tok and moe_intermediate_size > 0"),
    (dict(family="mixtral", num_experts=2, num_experts_per_tok=3, moe_intermediate_size=8),
     r"num_experts_per_tok=3 > num_experts=2"),
    (dict(vocab_size=True), r"vocab_size must be a positive integer, got True"),
])
def test_model_spec_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(ModelSpec.from_preset("tiny-dense"), **changes)


def test_moe_layer_pattern():
    spec = dataclasses.replace(ModelSpec.from_preset("tiny-qwen2-moe"), num_hidden_layers=6,
                               decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [spec.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert [spec.has_shared_expert(i) for i in range(6)] == [False, True, False, False, False, True]
    assert not ModelSpec.from_preset("tiny-dense").is_moe_layer(0)


# ==================================================================================================
# Hugging Face configs (built with transformers' config classes, no download)
# ==================================================================================================
COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=96, vocab_size=250)


def _hf(family: str, **kw):
    import transformers as tf
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config, "mistral": tf.MistralConfig,
           "mixtral": tf.MixtralConfig, "qwen2_moe": tf.Qwen2MoeConfig, "qwen3_moe": tf.Qwen3MoeConfig}[family]
    return cls(**{**COMMON, **kw})


HF_CASES = {
    # family: (config kwargs, expected fields beyond COMMON)
    "llama": (dict(rope_theta=500000.0, tie_word_embeddings=True),
              dict(family="llama", head_dim=8, qk_norm=False, attention_bias=False, tie_word_embeddings=True,
                   rope_theta=500000.0, num_experts=0)),
    "mistral": (dict(head_dim=16), dict(family="mistral", head_dim=16, num_experts=0)),
    "qwen2": (dict(), dict(family="qwen2", head_dim=8, attention_bias=True, qk_norm=False)),
    "qwen3": (dict(head_dim=32), dict(family="qwen3", head_dim=32, qk_norm=True, attention_bias=False)),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2),
                dict(family="mixtral", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96,
                     head_dim=8, qk_norm=False)),
    "qwen2_moe": (dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1],
                       norm_topk_prob=False),
                  dict(family="qwen2_moe", num_experts=6, moe_intermediate_size=24, shared_expert_intermediate_size=48,
                       mlp_only_layers=(1,), norm_topk_prob=False, attention_bias=True, qk_norm=False)),
    "qwen3_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16,
                       decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True),
                  dict(family="qwen3_moe", num_experts=8, moe_intermediate_size=16, head_dim=16,
                       mlp_only_layers=(0,), norm_topk_prob=True, qk_norm=True, shared_expert_intermediate_size=0)),
}


@pytest.mark.parametrize("family", sorted(HF_CASES))
def test_from_hf_config_every_family(family, tmp_path):
    kw, expect = HF_CASES[family]
    cfg = _hf(family, **kw)
    spec = ModelSpec.from_hf_config(cfg.to_dict(), name=f"tiny-{family}")
    for k, v in {**COMMON, **expect}.items():
        assert getattr(spec, k) == v, (k, getattr(spec, k), v)
    assert spec.name == f"tiny-{family}"
    # the same through config.json on disk (file and folder) and load_model_spec
    cfg.save_pretrained(tmp_path)
    by_dir = ModelSpec.from_hf_config(tmp_path, name=f"tiny-{family}")
    by_file = load_model_spec(tmp_path / "config.json")
    assert by_dir == spec
    assert shape(by_file) == shape(spec)
    assert shape(load_model_spec(tmp_path)) == shape(spec)


def test_hf_shapes_match_the_real_model_presets():
    """A transformers config with the published numbers gives the same shapes as our preset."""
    import transformers as tf
    llama = tf.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5)
    assert shape(ModelSpec.from_hf_config(llama.to_dict())) == shape(ModelSpec.from_preset("llama-3-8b"))
    mixtral = tf.MixtralConfig()  # transformers' defaults are Mixtral-8x7B
    assert shape(ModelSpec.from_hf_config(mixtral.to_dict())) == shape(ModelSpec.from_preset("mixtral-8x7b"))
    qwen = tf.Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                             num_experts=128, num_experts_per_tok=8, vocab_size=151936, norm_topk_prob=True)
    assert shape(ModelSpec.from_hf_config(qwen.to_dict())) == shape(ModelSpec.from_preset("qwen3-30b-a3b"))


def test_hf_config_quirks():
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; hub files say num_experts
    d = _hf("qwen3_moe", num_experts=8, moe_intermediate_size=16).to_dict()
    assert "num_experts" not in d and d["num_local_experts"] == 8
    assert ModelSpec.from_hf_config(d).num_experts == 8
    d2 = dict(d)
    d2["num_experts"] = d2.pop("num_local_experts")
    assert ModelSpec.from_hf_config(d2).num_experts == 8
    # head_dim absent or null -> hidden / heads
    d = _hf("llama").to_dict()
    d["head_dim"] = None
    assert ModelSpec.from_hf_config(d).head_dim == 8
    # rope theta from rope_parameters (transformers 5) or the old top-level key
    d = _hf("llama").to_dict()
    d.pop("rope_parameters", None)
    d["rope_theta"] = 1234.0
    assert ModelSpec.from_hf_config(d).rope_theta == 1234.0
    # Qwen2-MoE's bias flag is qkv_bias
    d = _hf("qwen2_moe", num_experts=4, moe_intermediate_size=8, qkv_bias=False).to_dict()
    assert ModelSpec.from_hf_config(d).attention_bias is False
    # num_key_value_heads missing -> MHA
    d = _hf("llama").to_dict()
    del d["num_key_value_heads"]
    assert ModelSpec.from_hf_config(d).num_key_value_heads == 8


def test_hf_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt2'"):
        ModelSpec.from_hf_config({"model_type": "gpt2"})
    d = _hf("llama").to_dict()
    del d["intermediate_size"]
    with pytest.raises(ConfigError, match=r"lacks 'intermediate_size' \(model_type llama\)"):
        ModelSpec.from_hf_config(d)
    d = _hf("qwen3_moe", num_experts=4, moe_intermediate_size=8).to_dict()
    del d["num_local_experts"]
    with pytest.raises(ConfigError, match=r"lacks 'num_experts'"):
        ModelSpec.from_hf_config(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read HF config"):
        ModelSpec.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot read HF config"):
        ModelSpec.from_hf_config(tmp_path / "missing.json")


# ==================================================================================================
# ParallelSpec
# ==================================================================================================
TINY = ModelSpec.from_preset("tiny-dense")          # 4 heads, 2 kv heads, I=128
MOE = ModelSpec.from_preset("tiny-moe")             # 4 heads, 2 kv, 8 experts, I_moe=32


@pytest.mark.parametrize("kw,match", [
    (dict(tp_size=4, tp_rank=4), r"tp_rank=4 is outside \[0, tp_size=4\)"),
    (dict(tp_size=4, tp_rank=-1), r"tp_rank=-1 is outside \[0, tp_size=4\)"),
    (dict(tp_size=4, ep_size=3), r"ep_size=3 does not divide tp_size=4"),
    (dict(tp_size=2, ep_size=4), r"ep_size=4 does not divide tp_size=2"),
    (dict(tp_size=0), r"tp_size must be an integer >= 1, got 0"),
    (dict(tp_size=4, tp_rank=3, ep_size=2, ep_rank=0), r"ep_rank=0 does not match tp_rank=3.*must be 1"),
    (dict(vocab_pad_to=0), r"vocab_pad_to must be an integer >= 1, got 0"),
    (dict(tp_size=4, ep_size=2, moe_replicated=True), r"moe_replicated=True with ep_size=2"),
    (dict(tp_size=2, moe_replicated=1), r"moe_replicated must be a bool, got 1"),
])
def test_parallel_spec_errors(kw, match):
    with pytest.raises(LayoutError, match=match):
        ParallelSpec(**kw)


@pytest.mark.parametrize("model,tp,ep,matches", [
    (TINY, 8, 1, [r"num_attention_heads=4 is not divisible by tp_size=8"]),
    (TINY, 3, 1, [r"num_attention_heads=4 is not divisible by tp_size=3",
                  r"num_key_value_heads=2 and tp_size=3: one must divide the other",
                  r"intermediate_size=128 is not divisible by tp_size=3"]),
    (dataclasses.replace(TINY, num_attention_heads=12, num_key_value_heads=6, head_dim=4), 4, 1,
     [r"num_key_value_heads=6 and tp_size=4: one must divide the other"]),
    (dataclasses.replace(MOE, num_experts=6), 4, 4, [r"num_experts=6 is not divisible by ep_size=4"]),
    (dataclasses.replace(MOE, moe_intermediate_size=6), 4, 1,
     [r"moe_intermediate_size=6 is not divisible by moe_tp_size=4 \(tp_size=4 / ep_size=1\)"]),
    (ModelSpec.from_preset("tiny-qwen2-moe"), 4, 1, []),
    (dataclasses.replace(ModelSpec.from_preset("tiny-qwen2-moe"), shared_expert_intermediate_size=6), 4, 1,
     [r"shared_expert_intermediate_size=6 is not divisible by tp_size=4"]),
    (TINY, 2, 2, [r"ep_size=2 > 1 for dense model 'tiny-dense'"]),
    (TINY, 2, "rep", [r"moe_replicated=True for dense model 'tiny-dense'"]),
    (dataclasses.replace(MOE, moe_intermediate_size=6), 4, "rep", []),   # experts whole: nothing to divide
])
def test_parallel_validate_names_the_numbers(model, tp, ep, matches):
    par = (ParallelSpec(tp_size=tp, moe_replicated=True) if ep == "rep" else ParallelSpec(tp_size=tp, ep_size=ep))
    if not matches:
        par.validate(model)
        return
    with pytest.raises(LayoutError) as ei:
        par.validate(model)
    msg = str(ei.value)
    assert f"tp_size={tp}" in msg and model.name in msg
    for m in matches:
        assert __import__("re").search(m, msg), (m, msg)


def test_ownership_ranges():
    # tp=4 > 2 kv heads: ranks 0,1 share kv head 0, ranks 2,3 share kv head 1
    ranks = ParallelSpec(tp_size=4).all_ranks()
    assert [p.tp_rank for p in ranks] == [0, 1, 2, 3]
    assert [p.heads_range(TINY) for p in ranks] == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert [p.kv_heads_range(TINY) for p in ranks] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    # tp=2 == kv heads: one each
    assert [p.kv_heads_range(TINY) for p in ParallelSpec(tp_size=2).all_ranks()] == [range(0, 1), range(1, 2)]
    # EP inside TP: tp=4, ep=2 -> moe_tp=2; ranks 0,1 hold experts 0-3, ranks 2,3 hold 4-7
    ranks = ParallelSpec(tp_size=4, ep_size=2).all_ranks()
    assert [(p.ep_rank, p.moe_tp_rank, p.moe_tp_size) for p in ranks] == [(0, 0, 2), (0, 1, 2), (1, 0, 2),
                                                                            (1, 1, 2)]
    assert [p.local_experts(MOE) for p in ranks] == [range(0, 4), range(0, 4), range(4, 8), range(4, 8)]
    # pure EP
    ranks = ParallelSpec(tp_size=4, ep_size=4).all_ranks()
    assert [p.local_experts(MOE) for p in ranks] == [range(2 * i, 2 * i + 2) for i in range(4)]
    assert all(p.moe_tp_size == 1 and p.moe_tp_rank == 0 for p in ranks)
    assert ParallelSpec(tp_size=8, tp_rank=5).shard(128, 8, 5) == (80, 96)
    # for_rank keeps the layout
    p = ParallelSpec(tp_size=8, ep_size=2, vocab_pad_to=128).for_rank(6)
    assert (p.tp_size, p.tp_rank, p.ep_size, p.ep_rank, p.vocab_pad_to) == (8, 6, 2, 1, 128)
    # replicated experts: every expert whole on every rank; attention and the shared expert still split
    ranks = ParallelSpec(tp_size=4, moe_replicated=True).all_ranks()
    assert all(p.moe_replicated and p.local_experts(MOE) == range(8) for p in ranks)
    assert all((p.ep_rank, p.moe_tp_rank, p.moe_tp_size) == (0, 0, 1) for p in ranks)
    assert [p.heads_range(MOE) for p in ranks] == [range(i, i + 1) for i in range(4)]
    from tp_lora.plan.layout import RankLayout
    qwen2 = ModelSpec.from_preset("tiny-qwen2-moe")
    lay = RankLayout(qwen2, ranks[3])
    assert lay.span("moe") == (0, qwen2.moe_intermediate_size)
    assert lay.span("shared") == (3 * qwen2.shared_expert_intermediate_size // 4, qwen2.shared_expert_intermediate_size)


def test_vocab_padding():
    # vLLM/SGLang: pad 250 -> 256, split evenly
    assert [ParallelSpec(tp_size=4, tp_rank=r).vocab_range(TINY) for r in range(4)] == [
        (0, 64), (64, 128), (128, 192), (192, 250)]
    assert ParallelSpec(tp_size=4).vocab_per_rank(TINY) == 64
    assert ParallelSpec(tp_size=1).vocab_per_rank(TINY) == 256
    small = dataclasses.replace(TINY, vocab_size=100)  # 128 over 8 ranks: 16 each; ranks 7.. empty
    got = [ParallelSpec(tp_size=8, tp_rank=r).vocab_range(small) for r in range(8)]
    assert got[-2:] == [(96, 100), (100, 100)]
    assert ParallelSpec(tp_size=2, vocab_pad_to=1).vocab_range(dataclasses.replace(TINY, vocab_size=7)) == (0, 4)

"""AdapterSource.open: header-only reading and validation against the model (API behaviour).

Each error names the adapter, the tensor and the expected and actual values. (The hostile-file corpus lives
in its own test; these tests pin down the reader's contract.)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tp_lora.plan.validate import AdapterSource
from tp_lora.errors import (AdapterConfigError, AdapterError, AdapterFormatError, AdapterShapeError,
                            TPLoRAError, UnsupportedAdapterError)
from tp_lora.plan.model import ModelSpec
from tp_lora.job.synthetic import write_synthetic_adapter

DENSE = ModelSpec.from_preset("tiny-dense")   # hidden 64, 4 heads x 16, 2 kv heads, I=128, vocab 250, 2 layers
MOE = ModelSpec.from_preset("tiny-moe")       # 8 experts, I_moe=32
P = "base_model.model.model.layers"


def make(tmp_path: Path, model: ModelSpec = DENSE, name: str = "a", **kw) -> Path:
    kw.setdefault("rank", 4)
    return write_synthetic_adapter(tmp_path / name, model, **kw)


def edit_tensors(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    t = load_file(path)
    fn(t)
    save_file(t, str(path))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def raises(exc, folder, model=DENSE, *patterns, **open_kw):
    with pytest.raises(exc) as ei:
        AdapterSource.open(folder, model, **open_kw)
    msg = str(ei.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert isinstance(ei.value, TPLoRAError)
    return ei.value


# ==================================================================================================
# valid adapters
# ==================================================================================================
def test_open_valid_adapter(tmp_path):
    d = make(tmp_path, targets=("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"), rank=4, alpha=16)
    h = AdapterSource.open(d, DENSE)
    assert h.name == "a" and h.path == str(d)
    assert h.max_rank == 4
    assert h.modules == {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"}
    assert len(h.targets) == 7 * 2 + 2
    q = next(t for t in h.targets if t.module == "q" and t.layer == 1)
    assert q.A.shape == (4, 64) and q.B.shape == (64, 4) and q.scaling == 4.0 and q.expert is None
    assert q.A.key == f"{P}.1.self_attn.q_proj.lora_A.weight"
    k = next(t for t in h.targets if t.module == "k")
    assert k.B.shape == (32, 4)
    emb = next(t for t in h.targets if t.module == "embed")
    assert emb.A.shape == (4, 250) and emb.B.shape == (64, 4)
    assert h.data_bytes == sum(t.A.nbytes + t.B.nbytes for t in h.targets) == h.file_size - 8 - h.header_bytes
    assert AdapterSource.open(d, DENSE, name="other").name == "other"


def test_open_reads_only_the_header(tmp_path):
    """Tensor data is not read (or validated) at registration; the fingerprint covers config + header."""
    d = make(tmp_path)
    h1 = AdapterSource.open(d, DENSE)
    path = d / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    start = 8 + h1.header_bytes
    raw[start:] = b"\xff" * (len(raw) - start)  # NaN patterns everywhere in the data section
    path.write_bytes(bytes(raw))
    h2 = AdapterSource.open(d, DENSE)
    assert h2.fingerprint == h1.fingerprint
    edit_config(d, lora_alpha=3.0)
    assert AdapterSource.open(d, DENSE).fingerprint != h1.fingerprint


def test_rank_and_alpha_patterns_and_rslora(tmp_path):
    d = make(tmp_path, targets=("q", "v", "o"), rank=4, alpha=8, use_rslora=True,
             rank_pattern={"v_proj": 2, r"layers\.0\.self_attn\.o_proj": 6}, alpha_pattern={"q_proj": 2.0})
    h = AdapterSource.open(d, DENSE)
    by = {(t.module, t.layer): t for t in h.targets}
    assert by[("v", 0)].rank == by[("v", 1)].rank == 2
    assert by[("o", 0)].rank == 6 and by[("o", 1)].rank == 4
    assert by[("q", 0)].alpha == 2.0 and by[("q", 0)].scaling == pytest.approx(2.0 / 2.0)  # rsLoRA: /sqrt(4)
    assert by[("o", 0)].scaling == pytest.approx(8 / 6 ** 0.5)
    assert h.max_rank == 6


def test_merged_and_fused_and_mixtral_layouts(tmp_path):
    h = AdapterSource.open(make(tmp_path, merged=True, name="m"), DENSE)
    assert {"qkv", "gate_up", "o", "down"} == h.modules
    qkv = next(t for t in h.targets if t.module == "qkv")
    assert qkv.B.shape == (64 + 2 * 32, 4)
    h = AdapterSource.open(make(tmp_path, MOE, fused_experts=True, name="f", rank=3), MOE)
    gu = next(t for t in h.targets if t.module == "experts.gate_up")
    assert (gu.rank, gu.num_experts, gu.A.shape, gu.B.shape) == (3, 8, (24, 64), (64, 24))
    mixtral = ModelSpec.from_dict({**MOE.to_dict(), "family": "mixtral", "name": "tiny-mixtral"})
    h = AdapterSource.open(make(tmp_path, mixtral, name="x"), mixtral)
    assert any(t.module == "experts.w1" and t.expert == 7 and "block_sparse_moe.experts.7.w1" in t.A.key
               for t in h.targets)
    h = AdapterSource.open(make(tmp_path, mixtral, name="xr", targets=["router"]), mixtral)
    assert {(t.module, t.B.shape) for t in h.targets} == {("router", (8, 4))}
    assert all("block_sparse_moe.gate.lora_A" in t.A.key for t in h.targets)


# ==================================================================================================
# shape errors: the message names the tensor, expected and actual shapes
# ==================================================================================================
def test_wrong_shape(tmp_path):
    d = make(tmp_path)
    key = f"{P}.0.self_attn.k_proj.lora_B.weight"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.zeros(48, 4, dtype=torch.bfloat16)))
    e = raises(AdapterShapeError, d, DENSE, re.escape(key), r"expected A \[4, 64\] and B \[32, 4\]",
               r"\[48, 4\]", "k layer 0", "'tiny-dense'")
    assert e.adapter == "a" and e.path.endswith("adapter_model.safetensors")


def test_rank_mismatch_between_a_and_b(tmp_path):
    d = make(tmp_path)
    key = f"{P}.1.mlp.down_proj.lora_B.weight"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.zeros(64, 3, dtype=torch.bfloat16)))
    raises(AdapterShapeError, d, DENSE, re.escape(key), r"at rank 4", r"B \[64, 4\]", r"\[64, 3\]")


def test_rank_mismatch_with_config(tmp_path):
    d = make(tmp_path, rank=4)
    edit_config(d, r=8)
    raises(AdapterShapeError, d, DENSE, r"rank 4 from the tensors does not match rank 8 from adapter_config.json",
           r"lora_A\.weight")


@pytest.mark.parametrize("side", ["A", "B"])
def test_missing_a_or_b(tmp_path, side):
    d = make(tmp_path)
    gone = f"{P}.0.self_attn.q_proj.lora_{side}.weight"
    other = f"{P}.0.self_attn.q_proj.lora_{'B' if side == 'A' else 'A'}.weight"
    edit_tensors(d, lambda t: t.pop(gone))
    raises(AdapterShapeError, d, DENSE, f"LoRA {side} is missing for {re.escape(repr(other))}")


def test_rank_above_max_rank(tmp_path):
    d = make(tmp_path, rank=8)
    AdapterSource.open(d, DENSE, max_rank=8)
    raises(AdapterShapeError, d, DENSE, r"rank 8 exceeds max_lora_rank=4", r"lora_A\.weight", max_rank=4)


def test_unknown_module(tmp_path):
    d = make(tmp_path)
    edit_tensors(d, lambda t: t.update({f"{P}.0.self_attn.rotary.lora_A.weight": torch.zeros(4, 64),
                                        f"{P}.0.self_attn.rotary.lora_B.weight": torch.zeros(64, 4)}))
    raises(AdapterShapeError, d, DENSE, r"self_attn\.rotary", r"unknown module 'self_attn.rotary'",
           r"family 'llama'")


def test_module_of_another_family(tmp_path):
    """A Mixtral expert key is not a Qwen3-MoE key; an expert on a dense model is unknown."""
    d = make(tmp_path, MOE)
    edit_tensors(d, lambda t: t.update({
        f"{P}.0.block_sparse_moe.experts.0.w1.lora_A.weight": torch.zeros(4, 64, dtype=torch.bfloat16),
        f"{P}.0.block_sparse_moe.experts.0.w1.lora_B.weight": torch.zeros(32, 4, dtype=torch.bfloat16)}))
    raises(AdapterShapeError, d, MOE, r"unknown module 'block_sparse_moe\.experts\.0\.w1'", "qwen3_moe")


def test_layer_out_of_range(tmp_path):
    d = make(tmp_path)
    edit_tensors(d, lambda t: t.update({f"{P}.2.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                                        f"{P}.2.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}))
    raises(AdapterShapeError, d, DENSE, r"layers\.2\.self_attn\.q_proj\.lora_A",
           r"layer index 2 is out of range \(model 'tiny-dense' has 2 layers\)")


def test_expert_id_out_of_range(tmp_path):
    d = make(tmp_path, MOE)
    edit_tensors(d, lambda t: t.update({f"{P}.1.mlp.experts.8.up_proj.lora_A.weight": torch.zeros(4, 64),
                                        f"{P}.1.mlp.experts.8.up_proj.lora_B.weight": torch.zeros(32, 4)}))
    raises(AdapterShapeError, d, MOE, r"experts\.8\.up_proj", r"expert id 8 is out of range",
           r"model 'tiny-moe' has 8 experts")


def test_expert_on_a_dense_layer_and_dense_mlp_on_an_moe_layer(tmp_path):
    spec = ModelSpec.from_dict({**MOE.to_dict(), "mlp_only_layers": [1]})
    d = make(tmp_path, spec, name="e")
    AdapterSource.open(d, spec)  # synthetic puts experts on layer 0 and a dense MLP on layer 1
    edit_tensors(d, lambda t: t.update({f"{P}.1.mlp.experts.0.up_proj.lora_A.weight": torch.zeros(4, 64),
                                        f"{P}.1.mlp.experts.0.up_proj.lora_B.weight": torch.zeros(32, 4)}))
    raises(AdapterShapeError, d, spec, r"layer 1 of model 'tiny-moe' has no experts")
    d = make(tmp_path, MOE, name="g")
    edit_tensors(d, lambda t: t.update({f"{P}.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 64),
                                        f"{P}.0.mlp.gate_proj.lora_B.weight": torch.zeros(128, 4)}))
    raises(AdapterShapeError, d, MOE, r"layer 0 of model 'tiny-moe' is an MoE layer without a dense MLP")


def test_fused_expert_shape_error(tmp_path):
    d = make(tmp_path, MOE, fused_experts=True)
    key = f"{P}.0.mlp.experts.lora_B.weight"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.zeros(60, 32, dtype=torch.bfloat16)))
    raises(AdapterShapeError, d, MOE, re.escape(key), r"\[60, 32\]", r"fit neither fused expert parameter",
           r"E=8")


def test_non_float_dtype(tmp_path):
    d = make(tmp_path)
    key = f"{P}.0.self_attn.v_proj.lora_A.weight"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.zeros(4, 64, dtype=torch.int32)))
    raises(AdapterShapeError, d, DENSE, re.escape(key), r"dtype I32 is not a floating type")


def test_not_2d(tmp_path):
    d = make(tmp_path)
    key = f"{P}.0.self_attn.v_proj.lora_A.weight"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.zeros(4, 8, 8, dtype=torch.bfloat16)))
    raises(AdapterShapeError, d, DENSE, re.escape(key), r"expected a 2-D tensor, got shape \[4, 8, 8\]")


def test_empty_adapter(tmp_path):
    d = make(tmp_path)
    save_file({}, str(d / "adapter_model.safetensors"))
    raises(AdapterFormatError, d, DENSE, "holds no tensors")


# ==================================================================================================
# unsupported PEFT features
# ==================================================================================================
def test_dora(tmp_path):
    d = make(tmp_path)
    edit_config(d, use_dora=True)
    raises(UnsupportedAdapterError, d, DENSE, r"DoRA \(use_dora=true\) is not supported")


@pytest.mark.parametrize("changes,pattern", [(dict(bias="all"), r"bias='all'"),
                                             (dict(bias="lora_only"), r"bias='lora_only'"),
                                             (dict(lora_bias=True), r"lora_bias=True")])
def test_bias(tmp_path, changes, pattern):
    d = make(tmp_path)
    edit_config(d, **changes)
    raises(UnsupportedAdapterError, d, DENSE, pattern, "not supported")


def test_modules_to_save_full_weight(tmp_path):
    d = make(tmp_path)
    key = "base_model.model.lm_head.modules_to_save.default.weight"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.zeros(250, 64, dtype=torch.bfloat16)))
    edit_config(d, modules_to_save=["lm_head"])
    raises(UnsupportedAdapterError, d, DENSE, re.escape(key), "full weight", "modules_to_save")


def test_saved_base_embedding_is_skipped_and_added_tokens_refused(tmp_path):
    """peft's default save_embedding_layers=True stores the base embedding next to its LoRA: of the base
    vocabulary it is the base's own weight (skipped, never planned); a larger one means added tokens."""
    d = make(tmp_path, targets=("q", "embed", "lm_head"))
    ref = AdapterSource.open(d, DENSE)
    keys = ("base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.base_layer.weight")
    edit_tensors(d, lambda t: t.update({k: torch.zeros(250, 64, dtype=torch.bfloat16) for k in keys}))
    h = AdapterSource.open(d, DENSE)
    same = lambda hh: [(t.module, t.layer, t.A.key, t.A.shape, t.B.key, t.B.shape, t.scaling)  # noqa: E731
                       for t in hh.targets]
    assert same(h) == same(ref) and h.data_bytes == ref.data_bytes
    assert not {t.A.key for t in h.targets} & set(keys)
    edit_tensors(d, lambda t: t.__setitem__(keys[0], torch.zeros(256, 64, dtype=torch.bfloat16)))
    raises(UnsupportedAdapterError, d, DENSE, re.escape(keys[0]), "adds 6 tokens", "added tokens are not supported")
    edit_tensors(d, lambda t: t.__setitem__(keys[0], torch.zeros(200, 64, dtype=torch.bfloat16)))
    raises(AdapterShapeError, d, DENSE, re.escape(keys[0]), r"must be \[250, 64\]")


def test_other_peft_types_and_features(tmp_path):
    d = make(tmp_path)
    edit_config(d, peft_type="IA3")
    raises(UnsupportedAdapterError, d, DENSE, r"peft_type 'IA3' is not supported")
    edit_config(d, peft_type="LORA", fan_in_fan_out=True)
    raises(UnsupportedAdapterError, d, DENSE, r"fan_in_fan_out")
    edit_config(d, fan_in_fan_out=False, layer_replication=[[0, 2]])
    raises(UnsupportedAdapterError, d, DENSE, r"layer_replication is not supported")


def test_pickle_refused_by_default_and_accepted_on_request(tmp_path):
    d = make(tmp_path, rank=2)
    ref = AdapterSource.open(d, DENSE)
    st_path = d / "adapter_model.safetensors"
    torch.save(load_file(st_path), d / "adapter_model.bin")
    st_path.unlink()
    raises(UnsupportedAdapterError, d, DENSE, r"adapter_model\.bin", r"refused by default", r"allow_pickle=True")
    cache = tmp_path / "converted"
    h = AdapterSource.open(d, DENSE, allow_pickle=True, pickle_cache_dir=str(cache))
    assert Path(h.weights_path).parent == cache
    assert [(t.module, t.layer, t.A.shape, t.B.shape, t.A.dtype) for t in h.targets] == [
        (t.module, t.layer, t.A.shape, t.B.shape, t.A.dtype) for t in ref.targets]


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that is not a plain dict of tensors is a format error."""
    d = make(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2), "evil": os.system}, d / "adapter_model.bin")
    raises(AdapterFormatError, d, DENSE, r"weights_only=True", allow_pickle=True,
           pickle_cache_dir=str(tmp_path / "c"))


# ==================================================================================================
# files and links
# ==================================================================================================
def test_symlink_leaving_the_folder(tmp_path):
    d = make(tmp_path, name="a")
    outside = tmp_path / "elsewhere.safetensors"
    (d / "adapter_model.safetensors").rename(outside)
    (d / "adapter_model.safetensors").symlink_to(outside)
    raises(AdapterFormatError, d, DENSE, r"adapter_model\.safetensors is a link that leaves the adapter folder",
           re.escape(str(outside)))


def test_config_symlink_leaving_the_folder(tmp_path):
    d = make(tmp_path, name="a")
    outside = tmp_path / "cfg.json"
    (d / "adapter_config.json").rename(outside)
    (d / "adapter_config.json").symlink_to(outside)
    raises(AdapterFormatError, d, DENSE, r"adapter_config\.json is a link that leaves the adapter folder")


def test_symlink_inside_the_folder_is_fine(tmp_path):
    d = make(tmp_path, name="a")
    (d / "blobs").mkdir()
    (d / "adapter_model.safetensors").rename(d / "blobs" / "w")
    (d / "adapter_model.safetensors").symlink_to(Path("blobs") / "w")
    h = AdapterSource.open(d, DENSE)
    assert h.weights_path == str((d / "blobs" / "w").resolve())


def test_symlinked_adapter_folder_is_fine(tmp_path):
    d = make(tmp_path, name="real")
    (tmp_path / "alias").symlink_to(d)
    assert AdapterSource.open(tmp_path / "alias", DENSE).name == "alias"


def test_missing_files(tmp_path):
    raises(AdapterConfigError, tmp_path / "nope", DENSE, "does not exist")
    d = make(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    raises(AdapterFormatError, d, DENSE, r"adapter_model\.safetensors is missing")
    d = make(tmp_path, name="b")
    (d / "adapter_config.json").unlink()
    raises(AdapterConfigError, d, DENSE, r"adapter_config\.json is missing")


@pytest.mark.parametrize("text,pattern", [
    ("{", r"not valid JSON"),
    ("[]", r"must be a JSON object, got list"),
    ('{"peft_type": "LORA"}', r"field 'r' is missing"),
    ('{"r": 0}', r"field 'r' must be a positive integer, got 0"),
    ('{"r": true}', r"field 'r' must be int, got bool"),
    ('{"r": 4, "lora_alpha": "8"}', r"field 'lora_alpha' must be int/float, got str"),
    ('{"r": 4, "rank_pattern": {"q_proj": 0}}', r"rank_pattern\['q_proj'\] must be a positive number, got 0"),
    ('{"r": 4, "target_modules": [1]}', r"target_modules' must be a list of strings"),
])
def test_bad_config(tmp_path, text, pattern):
    d = make(tmp_path)
    (d / "adapter_config.json").write_text(text)
    raises(AdapterConfigError, d, DENSE, pattern)


def test_errors_are_typed():
    for cls in (AdapterFormatError, AdapterConfigError, AdapterShapeError, UnsupportedAdapterError):
        assert issubclass(cls, AdapterError) and issubclass(cls, TPLoRAError)
    e = AdapterShapeError("boom", adapter="x", path="/p")
    assert str(e) == "adapter 'x' (/p): boom" and e.reason == "boom"

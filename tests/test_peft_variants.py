"""peft's LoRA variants (peft 0.17-0.21 ``LoraConfig`` fields): those whose eval forward is plain LoRA load and
give peft's logits; those whose forward differs are refused at register, naming the field, never loaded as
plain LoRA (aLoRA and QALoRA were silently accepted before: other outputs than peft's).

Real adapters made with peft on the tiny dense preset, single process (TP=1, float32).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tp_lora.errors import UnsupportedAdapterError
from tp_lora.ops.layer import LoRAOps
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.reference import TPModel
from tp_lora.runtime.manager import LoRAConfig, LoRAManager

TOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]

# variant -> LoraConfig arguments (peft must know the field; otherwise the case is skipped)
LOADED = {
    "velora": {"velora_config": {}},          # training-time activation compression; saves lora_velora_embed
    "monteclora": {"monteclora_config": {}},  # variational A in training only; saves its sampler's state
    "mica": {"init_lora_weights": "mica"},    # an SVD init with B frozen; plain LoRA forward
}
REFUSED = {
    "alora": ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
    "qalora": ({"use_qalora": True, "qalora_group_size": 16}, "QALoRA"),
    "bdlora": ({"use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"],
                               "nblocks": 2, "match_strict": False}}, "BD-LoRA"),
    "kasa": ({"kasa_config": {}}, "KaSA"),
}


def _peft_field(peft: Any, kw: dict) -> str | None:
    fields = peft.LoraConfig.__dataclass_fields__
    missing = [k for k in kw if k not in fields]
    return missing[0] if missing else None


def _base(spec: ModelSpec, root: Path) -> tuple[Any, Any]:
    """(peft, load_base): a random HF checkpoint of ``spec`` saved under ``root / "base"`` and its loader."""
    from support import peft_fixtures as pf
    transformers, peft = pf.require_hf()
    from tp_lora.reference.checkpoint import hf_config_dict
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**hf_config_dict(spec), initializer_range=0.05)
    transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(root / "base")

    def load_base() -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(
            root / "base", attn_implementation="eager", dtype=torch.float32).eval()
    return peft, load_base


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = ModelSpec.from_preset("tiny-dense")
    root = tmp_path_factory.mktemp("variants")
    peft, load_base = _base(spec, root)

    seq = torch.randint(0, spec.vocab_size, (7,), generator=torch.Generator().manual_seed(3))
    dirs, ref, skipped = {}, {}, {}
    for i, (name, kw) in enumerate({**LOADED, **{n: k for n, (k, _) in REFUSED.items()}}.items()):
        missing = _peft_field(peft, kw)
        if missing:
            skipped[name] = f"peft {peft.__version__} has no LoraConfig.{missing}"
            continue
        torch.manual_seed(100 + i)
        args = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, **kw)
        args.setdefault("init_lora_weights", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(load_base(), peft.LoraConfig(**args))
            with torch.no_grad():   # MiCA's init zeroes A: give every factor values (the delta non-zero)
                for n, p in pm.named_parameters():
                    if ".lora_A." in n or ".lora_B." in n:
                        p.copy_(torch.randn_like(p) * 0.1)
            pm.save_pretrained(root / name)
            dirs[name] = str(root / name)
            if name in LOADED:
                back = peft.PeftModel.from_pretrained(load_base(), root / name).eval()
                with torch.no_grad():
                    ref[name] = back(input_ids=seq[None]).logits[0]
    with torch.no_grad():
        ref[None] = load_base()(input_ids=seq[None]).logits[0]
    return {"spec": spec, "base": str(root / "base"), "dirs": dirs, "ref": ref, "seq": seq, "skipped": skipped}


def _manager(made: dict) -> tuple[TPModel, LoRAManager]:
    spec = made["spec"]
    par = ParallelSpec(tp_size=1, tp_rank=0)
    model = TPModel.from_pretrained(made["base"], par, None, spec=spec, device="cpu")
    mgr = LoRAManager(LoRAConfig(max_loras=2, max_lora_rank=8, dtype="float32", device="cpu"), spec, par)
    return model, mgr


@pytest.mark.parametrize("name", sorted(LOADED))
def test_variant_with_plain_lora_forward_matches_peft(made: dict, name: str) -> None:
    if name in made["skipped"]:
        pytest.skip(made["skipped"][name])
    model, mgr = _manager(made)
    seq = made["seq"]
    with mgr:
        mgr.register(name, made["dirs"][name])
        mgr.activate([name])
        with mgr.prepare_batch([name], [len(seq)]) as batch:
            got = model(seq, torch.arange(len(seq)), [len(seq)], lora=LoRAOps(mgr.pool, batch))
    ref = made["ref"][name]
    scale = max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) < TOL * scale
    assert float((ref - made["ref"][None]).abs().max()) > 1000 * TOL * scale   # the adapter does something


def test_training_state_is_skipped_not_read(made: dict) -> None:
    """VeLoRA's / MonteCLoRA's saved training tensors are not planned (no byte of them read or pinned)."""
    for name in ("velora", "monteclora"):
        if name in made["skipped"]:
            continue
        from safetensors import safe_open
        with safe_open(str(Path(made["dirs"][name]) / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
        lora = {k for k in keys if ".lora_A." in k or ".lora_B." in k}
        assert keys - lora, f"{name}: peft saved no training state (nothing to skip)"
        _, mgr = _manager(made)
        with mgr:
            mgr.register(name, made["dirs"][name])
            assert {op.tensor for op in mgr.plan(name).ops} == lora


def test_training_state_without_its_variant_is_refused(made: dict, tmp_path: Path) -> None:
    """A file with VeLoRA's tensor but a config without ``velora_config``: an unknown key, refused."""
    if "velora" in made["skipped"]:
        pytest.skip(made["skipped"]["velora"])
    d = tmp_path / "velora_no_config"
    shutil.copytree(made["dirs"]["velora"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.pop("velora_config")
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _, mgr = _manager(made)
    with mgr, pytest.raises(Exception, match="lora_velora_embed"):
        mgr.register("v", str(d))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_variant_with_another_forward_is_refused(made: dict, name: str) -> None:
    if name in made["skipped"]:
        pytest.skip(made["skipped"][name])
    field_kw, label = REFUSED[name]
    _, mgr = _manager(made)
    with mgr, pytest.raises(UnsupportedAdapterError) as ei:
        mgr.register(name, made["dirs"][name])
    msg = str(ei.value)
    assert label in msg and next(iter(field_kw)) in msg and f"'{name}'" in msg, msg
    assert not mgr.registered()


def test_arrow_config_is_refused(made: dict, tmp_path: Path) -> None:
    """Arrow routes each token among task adapters: a config naming it is refused (made from a plain one)."""
    src = next(iter(made["dirs"].values()), None)
    if src is None:
        pytest.skip("no adapter could be made with this peft")
    d = tmp_path / "arrow"
    shutil.copytree(made["dirs"].get("mica", src), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    for k in (*LOADED["velora"], *LOADED["monteclora"]):
        cfg.pop(k, None)
    cfg["init_lora_weights"] = True
    cfg["arrow_config"] = {"top_k": 3, "router_temperature": 1.0}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _, mgr = _manager(made)
    with mgr, pytest.raises(UnsupportedAdapterError, match="Arrow"):
        mgr.register("arrow", str(d))


def test_unconverted_residual_init_is_logged(made: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    """init_lora_weights='pissa' saved without peft's conversion: loaded (as peft loads it), with a warning
    that its outputs are peft's only on the base that init rewrote."""
    src = made["dirs"].get("mica")
    if src is None:
        pytest.skip(made["skipped"]["mica"])
    d = tmp_path / "pissa"
    shutil.copytree(src, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _, mgr = _manager(made)
    with mgr, caplog.at_level(logging.WARNING, logger="tp_lora"):
        mgr.register("pissa", str(d))
    assert any("pissa_niter_4" in r.getMessage() and "modified base" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("preset,module", [("tiny-moe", "mlp.gate"), ("tiny-qwen2-moe", "mlp.shared_expert_gate")])
def test_all_linear_moe_adapter_matches_peft(tmp_path: Path, preset: str, module: str) -> None:
    """peft's target_modules='all-linear' on a MoE also adapts the router (Qwen3-MoE, through
    target_parameters 'gate.weight') and the shared expert's scalar gate (Qwen2-MoE): served as the
    replicated ``router`` / ``shared_gate`` modules, the logits equal peft's (TP=1 here; the router at TP 2 / 4
    in tests/test_conformance.py)."""
    spec = ModelSpec.from_preset(preset)
    peft, load_base = _base(spec, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(load_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False))
        with torch.no_grad():   # the router's and the gate's deltas large enough to move the logits
            for n, p in pm.named_parameters():
                if f".{module}." in n and (".lora_A." in n or ".lora_B." in n):
                    p.mul_(4.0)
        pm.save_pretrained(tmp_path / "a")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if not any(f".{module}.lora_A" in k for k in keys):
        pytest.skip(f"peft {peft.__version__} does not adapt {module} under 'all-linear'")
    seq = torch.randint(0, spec.vocab_size, (9,), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(load_base(), tmp_path / "a").eval()(input_ids=seq[None]).logits[0]
        # the same adapter without the module's LoRA: it does change the logits
        d = tmp_path / "without"
        shutil.copytree(tmp_path / "a", d)
        from safetensors.torch import load_file, save_file
        t = {k: v for k, v in load_file(str(d / "adapter_model.safetensors")).items() if f".{module}." not in k}
        save_file(t, str(d / "adapter_model.safetensors"))
    par = ParallelSpec()
    model = TPModel.from_pretrained(str(tmp_path / "base"), par, None, spec=spec, device="cpu")
    got = {}
    with LoRAManager(LoRAConfig(max_loras=2, max_lora_rank=8, dtype="float32"), spec, par) as mgr:
        mgr.register("a", str(tmp_path / "a"))
        mgr.register("without", str(d))
        assert ("router" if module == "mlp.gate" else "shared_gate") in mgr.plan("a").modules
        mgr.activate(["a", "without"])
        for name in ("a", "without"):
            with mgr.prepare_batch([name], [len(seq)]) as batch:
                got[name] = model(seq, torch.arange(len(seq)), [len(seq)], lora=LoRAOps(mgr.pool, batch))
    scale = max(1.0, float(ref.abs().max()))
    assert float((got["a"] - ref).abs().max()) < TOL * scale
    assert float((got["without"] - ref).abs().max()) > 100 * TOL * scale

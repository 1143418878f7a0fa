"""The ``tp-lora`` command line: ``plan`` and ``write-adapter`` (in process, and once as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tp_lora.job import cli
from tp_lora.plan.validate import AdapterSource
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.plan.planner import plan_rank

ROOT = Path(__file__).resolve().parent.parent


def test_write_adapter_then_plan_json(tmp_path, capsys):
    out = tmp_path / "moe"
    assert cli.main(["write-adapter", str(out), "--model", "tiny-moe", "--rank", "4", "--fused-experts",
                     "--targets", "q", "k", "v", "o", "experts", "embed", "lm_head", "--dtype", "fp16",
                     "--seed", "3"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "experts.gate_up" in said
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    assert cli.main(["plan", str(out), "--model", "tiny-moe", "--tp", "4", "--ep", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    spec = ModelSpec.from_preset("tiny-moe")
    header = AdapterSource.open(out, spec)
    assert (rep["tp_size"], rep["ep_size"], rep["moe_tp_size"], rep["adapter_bytes"]) == (4, 2, 2,
                                                                                          header.data_bytes)
    assert [r["tp_rank"] for r in rep["ranks"]] == [0, 1, 2, 3]
    for r in rep["ranks"]:
        plan = plan_rank(header, spec, ParallelSpec(tp_size=4, tp_rank=r["tp_rank"], ep_size=2))
        assert r["planned_bytes"] == plan.nbytes
        assert r["slices"] == len(plan.ops)
        assert r["full_bytes"] == header.data_bytes
        assert r["saved_bytes"] == header.data_bytes - plan.nbytes > 0
        assert r["local_experts"] == ([0, 4] if r["tp_rank"] < 2 else [4, 8])
        assert r["ep_rank"] == r["tp_rank"] // 2
    t = rep["totals"]
    assert t["planned_bytes"] == sum(r["planned_bytes"] for r in rep["ranks"])
    assert t["full_bytes"] == 4 * header.data_bytes
    assert t["saved_bytes"] == t["full_bytes"] - t["planned_bytes"]


def test_plan_table(tmp_path, capsys):
    out = tmp_path / "dense"
    assert cli.main(["write-adapter", str(out), "--model", "tiny-dense", "--rank", "8", "--merged"]) == 0
    capsys.readouterr()
    assert cli.main(["plan", str(out), "--model", "tiny-dense", "--tp", "2"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header_line = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["rank"])
    assert "planned" in lines[header_line] and "saved vs full" in lines[header_line]
    rows = [ln.split() for ln in lines[header_line + 2:header_line + 4]]
    assert [r[0] for r in rows] == ["0", "1"]
    assert any(ln.split()[:1] == ["total"] for ln in lines)
    assert "model 'tiny-dense', tp_size=2, ep_size=1" in text
    assert "%" in text


def test_plan_with_hf_config(tmp_path, capsys):
    """--model accepts a config.json (or its folder) as well as a preset."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=250)
    cfg.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "a"
    assert cli.main(["write-adapter", str(out), "--model", str(tmp_path / "cfg" / "config.json"), "--rank",
                     "2", "--targets", "q", "v"]) == 0
    capsys.readouterr()
    assert cli.main(["plan", str(out), "--model", str(tmp_path / "cfg"), "--tp", "4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["modules"] == ["q", "v"] and len(rep["ranks"]) == 4


def test_plan_errors(tmp_path, capsys):
    out = tmp_path / "a"
    cli.main(["write-adapter", str(out), "--model", "tiny-dense", "--rank", "8"])
    capsys.readouterr()
    # illegal layout: exit status 2 and the numbers in the message
    assert cli.main(["plan", str(out), "--model", "tiny-dense", "--tp", "8"]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads=4 is not divisible by tp_size=8" in err
    # adapter above the pool's max rank
    assert cli.main(["plan", str(out), "--model", "tiny-dense", "--tp", "2", "--max-rank", "4"]) == 2
    assert "exceeds max_lora_rank=4" in capsys.readouterr().err
    # adapter of another model
    assert cli.main(["plan", str(out), "--model", "llama-3-8b", "--tp", "1"]) == 2
    assert "expected A" in capsys.readouterr().err
    # unknown preset
    assert cli.main(["plan", str(out), "--model", "nope", "--tp", "1"]) == 2
    assert "available presets" in capsys.readouterr().err
    # missing required option: argparse exits 2
    with pytest.raises(SystemExit) as ei:
        cli.main(["plan", str(out), "--tp", "2"])
    assert ei.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([])


def test_write_adapter_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--fused-experts needs an MoE model"):
        cli.main(["write-adapter", str(tmp_path / "x"), "--model", "tiny-dense", "--rank", "2",
                  "--fused-experts"])
    with pytest.raises(SystemExit, match="--rank must be a positive integer"):
        cli.main(["write-adapter", str(tmp_path / "x"), "--model", "tiny-dense", "--rank", "0"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.main(["write-adapter", str(tmp_path / "x"), "--model", "tiny-dense", "--rank", "2",
                  "--targets", "bogus"])


def test_write_adapter_is_seeded(tmp_path, capsys):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        cli.main(["write-adapter", str(tmp_path / name), "--model", "tiny-dense", "--rank", "2", "--seed", seed,
                  "--dtype", "fp32", "--rslora"])
    data = {n: (tmp_path / n / "adapter_model.safetensors").read_bytes() for n in "abc"}
    assert data["a"] == data["b"] != data["c"]
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_rslora"] is True


def test_subcommand_registry_has_room_for_run():
    assert {"plan", "write-adapter"} <= set(cli.SUBCOMMANDS)
    parser = cli.build_parser()
    assert parser.prog == "tp-lora"


def test_format_bytes():
    assert cli.format_bytes(0) == "0 B"
    assert cli.format_bytes(1023) == "1023 B"
    assert cli.format_bytes(1536) == "1.50 KiB"
    assert cli.format_bytes(-3 * 1024 ** 3) == "-3.00 GiB"


def test_as_a_subprocess_and_the_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_adapter.py"), str(out), "--model",
                        "tiny-qwen2-moe", "--rank", "2", "--merged"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tp_lora.job.cli", "plan", str(out), "--model", "tiny-qwen2-moe",
                        "--tp", "4", "--ep", "4"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "total" in r.stdout and "tp_size=4, ep_size=4" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tp_lora.job.cli", "plan", str(out), "--model", "tiny-qwen2-moe",
                        "--tp", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "tp_size=3" in r.stderr

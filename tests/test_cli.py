"""The ``tp-lora`` command line: ``plan``, ``write-adapter`` and ``run`` (in process, and as subprocesses):
help everywhere, options before or after positionals, one-line errors, exit status 2 (usage) / 1 (runtime),
atomic adapter writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tp_lora.job import cli
from tp_lora.plan.validate import AdapterSource
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.plan.planner import plan_rank

ROOT = Path(__file__).resolve().parent.parent


def test_write_adapter_then_plan_json(tmp_path, capsys):
    out = tmp_path / "moe"
    assert cli.main(["write-adapter", str(out), "--model", "tiny-moe", "--rank", "4", "--fused-experts",
                     "--targets", "q,k,v,o,experts,embed,lm_head", "--dtype", "fp16",
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


def test_router_and_shared_gate_targets_and_plan_of_replicated_experts(tmp_path, capsys):
    """write-adapter's router / shared_gate targets are the modules peft's all-linear adds on a MoE (the
    router through target_parameters); ``plan --moe-replicated`` plans every expert whole on every rank."""
    out = tmp_path / "q2"
    assert cli.main(["write-adapter", str(out), "--model", "tiny-qwen2-moe", "--rank", "4",
                     "--targets", "q,experts,router,shared_gate"]) == 0
    capsys.readouterr()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.gate.weight"] and "shared_expert_gate" in cfg["target_modules"]
    spec = ModelSpec.from_preset("tiny-qwen2-moe")
    header = AdapterSource.open(out, spec)
    assert {"router", "shared_gate", "experts.w1", "q"} <= set(header.modules)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["base_model.model.model.layers.0.mlp.gate.lora_B.weight"] == (spec.num_experts, 4)
    assert shapes["base_model.model.model.layers.0.mlp.shared_expert_gate.lora_B.weight"] == (1, 4)

    reps = {}
    for flag in ([], ["--moe-replicated"]):
        assert cli.main(["plan", str(out), "--model", "tiny-qwen2-moe", "--tp", "2", "--json", *flag]) == 0
        reps[bool(flag)] = json.loads(capsys.readouterr().out)
    rep, shard = reps[True], reps[False]
    assert (rep["moe_replicated"], rep["moe_tp_size"], shard["moe_replicated"], shard["moe_tp_size"]) == \
        (True, 1, False, 2)
    for r in rep["ranks"]:
        plan = plan_rank(header, spec, ParallelSpec(tp_size=2, tp_rank=r["tp_rank"], moe_replicated=True))
        assert r["planned_bytes"] == plan.nbytes > shard["ranks"][r["tp_rank"]]["planned_bytes"]
    assert cli.main(["plan", str(out), "--model", "tiny-qwen2-moe", "--tp", "2"] + ["--moe-replicated"]) == 0
    assert "(experts replicated: whole on every rank)" in capsys.readouterr().out
    assert cli.main(["plan", str(out), "--model", "tiny-qwen2-moe", "--tp", "2", "--ep", "2",
                     "--moe-replicated"]) == 2
    assert "moe_replicated=True with ep_size=2" in capsys.readouterr().err
    assert cli.main(["write-adapter", str(tmp_path / "d"), "--model", "tiny-moe", "--rank", "2",
                     "--targets", "q,shared_gate"]) == 2
    assert "shared_gate (the model has no shared expert" in capsys.readouterr().err


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
                     "2", "--targets", "q", "--targets", "v"]) == 0
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
    assert cli.main(["write-adapter", str(tmp_path / "x"), "--model", "tiny-dense", "--rank", "2",
                     "--fused-experts"]) == 2
    assert "--fused-experts needs an MoE model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:  # argparse: a usage error, exit status 2 like every other
        cli.main(["write-adapter", str(tmp_path / "x"), "--model", "tiny-dense", "--rank", "0"])
    assert ei.value.code == 2 and "--rank: must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:  # argparse: invalid choice
        cli.main(["write-adapter", str(tmp_path / "x"), "--model", "tiny-dense", "--rank", "2",
                  "--targets", "q,bogus"])
    assert ei.value.code == 2 and "unknown module(s) bogus" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


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


# ------------------------------------------------------------------------- the newcomer's CLI contract


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_help_on_every_subcommand(capsys):
    for argv in ([], *([name] for name in cli.SUBCOMMANDS)):
        with pytest.raises(SystemExit) as ei:
            cli.main([*argv, "--help"])
        assert ei.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {' '.join(['tp-lora', *argv])}"), out
    assert {"plan", "write-adapter", "run"} <= set(cli.SUBCOMMANDS)


def test_write_adapter_options_before_the_positional(tmp_path, capsys):
    out = tmp_path / "a"
    # --targets takes one comma-separated value: OUT_DIR after it stays the positional
    assert cli.main(["write-adapter", "--targets", "q,v", str(out), "--model", "tiny-dense", "--rank", "2"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert f"wrote {out}" in capsys.readouterr().out


def test_write_adapter_refuses_targets_that_adapt_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    assert cli.main(["write-adapter", "--targets", "experts", str(out), "--model", "tiny-dense", "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experts (the model is dense: no routed experts)" in err, err
    assert not out.exists() and _hidden_leftovers(tmp_path) == []
    assert cli.main(["write-adapter", str(out), "--model", "tiny-moe", "--rank", "2", "--targets", "q,shared.up"]) == 2
    assert "shared.up (the model has no shared expert)" in capsys.readouterr().err
    assert not out.exists()


def test_write_adapter_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "a"
    args = ["write-adapter", str(out), "--model", "tiny-dense", "--rank", "2", "--dtype", "fp32"]
    assert cli.main([*args, "--seed", "1"]) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    assert cli.main([*args, "--seed", "2"]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert cli.main([*args, "--seed", "2", "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _hidden_leftovers(tmp_path) == []
    # --force replaces an adapter, never an unrelated folder or a file
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert cli.main(["write-adapter", str(other), "--model", "tiny-dense", "--rank", "2", "--force"]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert (other / "mine.txt").read_text() == "keep"
    (tmp_path / "f").write_text("x")
    assert cli.main(["write-adapter", str(tmp_path / "f"), "--model", "tiny-dense", "--rank", "2"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    assert cli.main(["write-adapter", str(tmp_path / "empty"), "--model", "tiny-dense", "--rank", "2"]) == 0


def test_write_adapter_failure_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from tp_lora.job import synthetic

    def fails_midway(out_dir, *a, **kw):
        (Path(out_dir) / "adapter_config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "write_synthetic_adapter", fails_midway)
    out = tmp_path / "a"
    assert cli.main(["write-adapter", str(out), "--model", "tiny-dense", "--rank", "2"]) == 1  # runtime
    err = capsys.readouterr().err
    assert err == "tp-lora write-adapter: error: OSError: [Errno 28] No space left on device\n", err
    assert not out.exists() and _hidden_leftovers(tmp_path) == []


def test_one_line_errors_and_debug(tmp_path, capsys):
    out = tmp_path / "a"
    assert cli.main(["write-adapter", str(out), "--model", "tiny-dense", "--rank", "2"]) == 0
    capsys.readouterr()
    # the weights file instead of the folder: says which folder to pass
    assert cli.main(["plan", str(out / "adapter_model.safetensors"), "--model", "tiny-dense", "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is a file, not an adapter folder" in err and f"pass its folder '{out}'" in err
    # one line, traceback only with --debug; the exit status does not change
    assert cli.main(["plan", str(out), "--model", "nope", "--tp", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert cli.main(["plan", str(out), "--model", "nope", "--tp", "1", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith(
        "tp-lora plan: error: model preset 'nope' not found")
    # a bad log level is a usage error, not a traceback
    with pytest.raises(SystemExit) as ei:
        cli.main(["plan", str(out), "--model", "tiny-dense", "--tp", "1", "--log-level", "verbose"])
    assert ei.value.code == 2 and "'verbose' is not a log level" in capsys.readouterr().err
    assert cli.main(["plan", str(out), "--model", "tiny-dense", "--tp", "1", "--log-level", "info"]) == 0


def test_plan_of_a_dense_model_has_no_moe_columns(tmp_path, capsys):
    out = tmp_path / "a"
    cli.main(["write-adapter", str(out), "--model", "tiny-dense", "--rank", "2"])
    capsys.readouterr()
    assert cli.main(["plan", str(out), "--model", "tiny-dense", "--tp", "2"]) == 0
    text = capsys.readouterr().out
    assert "moe_tp_size" not in text and "local experts" not in text
    assert cli.main(["plan", str(out), "--model", "tiny-dense", "--tp", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["moe_tp_size"] is None and {r["moe_tp_rank"] for r in rep["ranks"]} == {None}


def test_exit_status_convention():
    from tp_lora.errors import AdapterShapeError, ConfigError, LayoutError, NoFreeSlotError, TPLoRAError
    from tp_lora.job import console

    for e in (ConfigError("x"), LayoutError("x"), AdapterShapeError("x", adapter="a")):
        assert console.exit_code(e) == 2
    for e in (TPLoRAError("x"), NoFreeSlotError("x"), OSError("x"), RuntimeError("x")):
        assert console.exit_code(e) == 1
    assert console.exit_code(KeyboardInterrupt()) == 130
    # one line whatever the message holds; our errors speak for themselves, others say their type
    assert console.error_line("p", RuntimeError("gloo:\n  Connection closed by peer")) == \
        "p: error: RuntimeError: gloo: Connection closed by peer"
    assert console.error_line("p", ConfigError("bad key")) == "p: error: bad key"
    assert console.error_line("p", KeyboardInterrupt()) == "p: error: KeyboardInterrupt"


def test_broken_pipe_is_quiet(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "a"
    assert cli.main(["write-adapter", str(out), "--model", "tiny-dense", "--rank", "2"]) == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte (`... | head` that already exited)
    try:
        r = subprocess.run([sys.executable, "-m", "tp_lora.job.cli", "plan", str(out), "--model", "tiny-dense",
                            "--tp", "2", "--json"], stdout=write, stderr=subprocess.PIPE, text=True, env=env,
                           timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 1 and r.stderr == "", r.stderr


def test_run_subcommand_options_around_the_config(tmp_path, capsys, monkeypatch):
    """`tp-lora run --set k=v CONFIG --json F`, under a one-rank torchrun environment: the process group is
    destroyed at the end, the JSON is written, the CPU report has no CUDA-only columns and no nan."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    cache, report = tmp_path / "cache", tmp_path / "r.json"
    assert cli.main(["run", "--set", f"cache_dir={cache}", "--set", "workload.requests=12", "demo",
                     "--set", "workload.verify_every=1", "--json", str(report)]) == 0
    assert not dist.is_initialized()
    text = capsys.readouterr().out
    assert not re.search(r"\bnan\b", text), text
    heads = [ln for ln in text.splitlines() if ln.startswith("  rank  ")]
    assert len(heads) == 2 and not any("pinned" in h or "H2D" in h for h in heads), heads
    assert re.search(r"2 batches checked, 0 failed: max \|TP - ref\| / max \|ref\| = \S+ \(tolerance 0.0001;", text)
    assert re.search(r"^ranks per node: node0 \(\S+\): \[0\]$", text, flags=re.M), text
    rep = json.loads(report.read_text())
    v = rep["verification"]
    assert v["tolerance"] == 1e-4 and v["checked_batches"] == 2 and v["failed"] == 0
    assert 0 <= v["max_rel_err"] <= 1e-4 and v["max_abs_ref"] > 0
    r0 = rep["ranks"][0]
    assert r0["bytes_pinned"] is None and r0["h2d_gbps"] is None and r0["node"] == "node0"
    assert r0["host_cache_equals_planned"] is True and r0["bytes_read"] <= r0["bytes_planned"]
    assert list(rep["nodes"]) == ["node0"] and rep["nodes"]["node0"]["ranks"] == [0]
    assert not list(cache.rglob(".*.tmp*"))


def test_run_checks_the_json_path_before_running(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli.main(["run", "demo", "--set", f"cache_dir={cache}", "--json", str(tmp_path / "no" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err, err
    assert not cache.exists()  # nothing ran

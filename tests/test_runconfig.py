"""The main job's run config: every field validated with an error that names it; --set overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tp_lora.errors import ConfigError
from tp_lora.job.runconfig import apply_override, load_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "demo-moe.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_run_config(ROOT / "configs" / name)
    assert cfg.max_loras < cfg.synthetic.count  # more adapters than slots: evictions happen


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("bogus: 1\n", "unknown key(s) ['bogus']"),
    ("workload: {requestz: 3}\n", "workload: unknown key(s) ['requestz']"),
    ("max_loras: two\n", "max_loras: expected an integer"),
    ("max_loras: true\n", "max_loras: expected an integer"),
    ("max_loras: 0\n", "max_loras must be positive"),
    ("device: tpu\n", "device must be auto, cpu or cuda"),
    ("dtype: int8\n", "dtype must be"),
    ("workload: {tokens_min: 5, tokens_max: 2}\n", "tokens_min <= tokens_max"),
    ("workload: {no_adapter_fraction: 1.5}\n", "no_adapter_fraction must be in [0, 1]"),
    ("synthetic: {ranks: [4, 64]}\n", "exceed max_lora_rank"),
    ("adapters: [a, b]\n", "adapters: expected a mapping"),
    ("synthetic: {targets: q}\n", "synthetic.targets: expected a list"),
    ("synthetic: {targets: [q, qq]}\n", "synthetic.targets: unknown or none ['qq']"),
    ("ep_size: 2\nmoe_replicated: true\n", "moe_replicated: true needs ep_size 1"),
    ("moe_replicated: 1\n", "moe_replicated: expected true/false"),
    ("- just\n- a list\n", "expected a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_bad_fields_are_named(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_run_config(_write(tmp_path, text))
    assert needle in str(e.value)


def test_missing_file_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    cfg = load_run_config(ROOT / "configs" / "demo.yaml",
                          ["workload.requests=7", "max_loras=3", "cache_dir=/tmp/x", "synthetic.ranks=[2, 4]"])
    assert (cfg.workload.requests, cfg.max_loras, cfg.cache_dir, cfg.synthetic.ranks) == (7, 3, "/tmp/x", [2, 4])
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "no-equals-sign")
    with pytest.raises(ConfigError, match="workload.requests: expected an integer"):
        load_run_config(ROOT / "configs" / "demo.yaml", ["workload.requests=many"])


def test_main_exits_2_with_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tp_lora.job.run import main

    assert main([str(_write(tmp_path, "max_lora_rank: -1\n"))]) == 2
    assert "max_lora_rank must be positive" in capsys.readouterr().err


def test_shipped_configs_by_name_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tp_lora.job.runconfig import verify_tolerance

    monkeypatch.chdir(tmp_path)
    assert load_run_config("demo") == load_run_config("demo.yaml") == load_run_config(ROOT / "configs" / "demo.yaml")
    assert load_run_config("demo-moe").ep_size == 2
    with pytest.raises(ConfigError, match=r"not found .*shipped configs: \['demo', 'demo-moe'\]; the shipped one is "
                                          r"'demo' \(tp-lora run demo\)"):
        load_run_config("configs/demo.yaml")  # a checkout-relative path, from elsewhere
    assert verify_tolerance(load_run_config("demo")) == 1e-4
    assert verify_tolerance(load_run_config("demo", ["dtype=bfloat16"])) == 3e-2
    assert verify_tolerance(load_run_config("demo", ["workload.verify_tol=0.5"])) == 0.5
    with pytest.raises(ConfigError, match="verify_tol > 0"):
        load_run_config("demo", ["workload.verify_tol=0"])


def test_adapter_paths_must_be_folders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"adapters.x: .* is a file, not an adapter folder .*pass its folder"):
        load_run_config(None, [f"adapters={{x: {tmp_path / 'a' / 'adapter_model.safetensors'}}}"])
    with pytest.raises(ConfigError, match="no such folder"):
        load_run_config(None, [f"adapters={{x: {tmp_path / 'b'}}}"])


def _env() -> dict[str, str]:
    import os
    import re

    leaked = re.compile(r"^(SLURM_|SLURMD_|TORCHELASTIC_)|^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
                        r"MASTER_ADDR|MASTER_PORT)$")
    env = {k: v for k, v in os.environ.items() if not leaked.search(k)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_layout_error_on_one_process_says_tp_is_the_world_size(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tp_lora.job.run import main

    assert main(["demo-moe", "--set", f"cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tp_lora.run: error: ep_size=2 does not divide tp_size=1") and err.count("\n") == 1, err
    assert "the job's tp_size is its world size, the number of processes: 1 (one process here; start N with " \
           "torchrun --nproc-per-node N)" in err, err


def test_replicated_experts_on_a_dense_model_is_a_layout_error(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tp_lora.job.run import main

    assert main(["demo", "--set", "moe_replicated=true", "--set", f"cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "moe_replicated=True for dense model 'tiny-dense'" in err and "moe_replicated=True come from the " \
        "run config" in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_layout_error_under_torchrun_is_one_line_per_rank(tmp_path: Path) -> None:
    """Every rank fails before any process group, with one line each: the layout error (it says tp is the
    world size), or SIGTERM when torchrun stopped it after the other one failed first. ``python -m
    tp_lora.run`` sets its handler before it imports torch (next test), but a rank that torchrun stops
    before even that (the interpreter's own start, tens of ms; once seen on a loaded 2-core machine, when
    the handler still came after torch's import) prints nothing; torchrun's summary then shows it killed
    by signal 15, and nothing else."""
    import re
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "tp_lora.run", "demo-moe", "--set", "ep_size=4", "--set", f"cache_dir={tmp_path}"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "tp_lora.run: error:" in ln and ln.startswith("[rank")]
    ranks = [ln.split("]")[0][len("[rank "):] for ln in lines]
    assert len(ranks) == len(set(ranks)) and set(ranks) <= {"0", "1"}, res.stderr   # one line per rank at most
    for r in {"0", "1"} - set(ranks):
        assert re.search(rf"rank\s*: {r} \(local_rank: {r}\)\s*\n\s*exitcode\s*: -15 ", res.stderr), res.stderr
    layout = [ln for ln in lines if "the job's tp_size is its world size, the number of processes: 2" in ln]
    assert layout and all(ln in layout or "error: stopped by SIGTERM" in ln for ln in lines), lines
    assert "tp_lora/" not in res.stderr.replace("tp_lora.run", ""), res.stderr  # no library traceback
    # torchrun's failure summary names our line (through its error file), not "To enable traceback see"
    assert re.search(r"traceback : \[rank \d\] tp_lora.run: error: ", res.stderr), res.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_failed_input_writing_leaves_no_temp_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tp_lora.job.run import main
    from tp_lora.reference import checkpoint

    def broken(spec, folder, seed=0):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise ModuleNotFoundError("No module named 'numpy'")

    monkeypatch.setattr(checkpoint, "write_random_checkpoint", broken)
    assert main(["demo", "--set", f"cache_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err == "tp_lora.run: error: ModuleNotFoundError: No module named 'numpy'\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _sigterm_when(argv: list[str], ready: str, check=None, **popen) -> tuple[int, str]:
    """Run ``argv``; once it prints the line ``ready`` (and ``check()`` holds), send SIGTERM: (status, stderr)."""
    import signal
    import subprocess

    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        assert p.stdout.readline().strip() == ready
        if check is not None:
            check()
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def test_sigterm_removes_temp_files(tmp_path: Path) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: the half-written inputs go away."""
    import signal
    import sys

    script = (
        "import sys, time\n"
        "from tp_lora.reference import checkpoint\n"
        "real = checkpoint.write_random_checkpoint\n"
        "def slow(spec, folder, seed=0):\n"
        "    real(spec, folder, seed=seed)\n"
        "    print('WRITTEN', flush=True)\n"
        "    time.sleep(120)\n"
        "checkpoint.write_random_checkpoint = slow\n"
        "from tp_lora.job.run import main\n"
        f"sys.exit(main(['demo', '--set', 'cache_dir={tmp_path}']))\n")

    def temp_folder_exists() -> None:
        assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".base-")]

    rc, err = _sigterm_when([sys.executable, "-c", script], "WRITTEN", temp_folder_exists, env=_env())
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("tp_lora.run: error: stopped by SIGTERM"), err
    assert sorted(x.name for x in tmp_path.iterdir()) == [], err


def test_sigterm_while_importing_torch_still_says_one_line(tmp_path: Path) -> None:
    """torchrun stops a rank that is still importing (torch's import takes seconds on a loaded machine): the
    rank ends with its one line and status 143, not silently. A stand-in ``torch`` that blocks in its import
    holds the rank there deterministically."""
    import signal
    import sys

    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("import time\nprint('IMPORTING', flush=True)\ntime.sleep(120)\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env["PYTHONPATH"]])
    rc, err = _sigterm_when([sys.executable, "-m", "tp_lora.run", "demo"], "IMPORTING", cwd=tmp_path, env=env)
    assert rc == 128 + signal.SIGTERM, err
    assert err == "tp_lora.run: error: stopped by SIGTERM (another rank failed, or the job was cancelled)\n", err


def test_importing_the_package_imports_no_torch_and_every_public_name_resolves() -> None:
    import subprocess
    import sys

    code = ("import sys, tp_lora\n"
            "assert 'torch' not in sys.modules, 'import tp_lora imported torch'\n"
            "missing = [n for n in tp_lora.__all__ if getattr(tp_lora, n, None) is None]\n"
            "assert not missing, missing\n"
            "from tp_lora import LoRAManager, plan_rank, TPLoRAError\n"
            "assert set(tp_lora.__all__) <= set(dir(tp_lora))\n"
            "try:\n    tp_lora.NoSuchThing\nexcept AttributeError as e:\n    assert 'NoSuchThing' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_synthetic_targets_that_adapt_nothing_stop_the_job_before_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tp_lora.job.run import main

    assert main(["demo-moe", "--set", "model=tiny-dense", "--set", "ep_size=1", "--set", f"cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == ("tp_lora.run: error: synthetic.targets: nothing to adapt in model 'tiny-dense' for experts "
                   "(the model is dense: no routed experts); router (the model is dense: no routed experts)\n"), err
    assert not any(tmp_path.iterdir())


def test_device_choice_one_gpu_per_rank() -> None:
    from tp_lora.job.run import pick_device

    assert str(pick_device("auto", 0, 0, 2)) == "cpu"
    assert str(pick_device("cpu", 8, 3, 8)) == "cpu"
    assert str(pick_device("auto", 8, 3, 8)) == "cuda:3"
    assert str(pick_device("cuda", 2, 1, 2)) == "cuda:1"
    assert str(pick_device("auto", 1, 1, 2)) == "cpu"  # two ranks cannot share one GPU under NCCL: gloo on CPU
    with pytest.raises(ConfigError, match=r"2 ranks on this node but 1 GPU\(s\) visible.*--nproc-per-node 1"):
        pick_device("cuda", 1, 1, 2)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        pick_device("cuda", 0, 0, 1)


def test_sigterm_raises_only_inside_its_block_and_only_from_the_main_thread() -> None:
    """``console.sigterm_raises``: SIGTERM becomes ``Terminated`` inside the block, the previous handler
    is back after it (also when the block raised), and from another thread the block runs untouched
    (Python allows signal handlers only in the main thread)."""
    import signal
    import threading
    import time

    from tp_lora.job import console

    seen = []
    mine = lambda signum, frame: seen.append(signum)  # noqa: E731
    old = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(console.Terminated) as e:
            with console.sigterm_raises():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)           # the handler's exception ends the sleep at once
        assert e.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(ValueError):
            with console.sigterm_raises():
                raise ValueError("boom")
        assert signal.getsignal(signal.SIGTERM) is mine
        errors = []

        def other() -> None:
            try:
                with console.sigterm_raises():
                    assert signal.getsignal(signal.SIGTERM) is mine
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert not errors
        assert not seen
    finally:
        signal.signal(signal.SIGTERM, old)

"""The main job's run config: every field validated with an error that names it; --set overrides."""

from __future__ import annotations

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

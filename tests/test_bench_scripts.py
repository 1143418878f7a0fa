"""The load benchmarks run end to end on the CPU in their tiny modes and write the JSON fields the
issues name (a benchmark that breaks is found here, not on the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], tmp: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def test_bench_load_tiny_with_trace(tmp_path):
    _run(["scripts/bench_load.py", "--tiny", "--cases", "tiny-moe-r8-tp4", "--repeats", "1", "--trace",
          "--out", str(tmp_path / "o"), "--adapters", str(tmp_path / "a")], tmp_path)
    r = json.loads((tmp_path / "o" / "bench.json").read_text())["cases"]["tiny-moe-r8-tp4"]
    for k in ("cold_s", "first_cold_s", "warm_s", "floor_s", "cold_over_floor"):
        assert r[k] > 0, k
    o = r["ours"]
    # rows joined through junk gaps read more than they own; the counts report both
    assert o["reads_only_s"] > 0 and o["bytes_read"] >= o["bytes_owned"] == o["bytes"]
    t = o["trace"]
    assert t["units"] == o["units"] == len(t["raw"]["reads"]) and 0 < t["reader_busy_frac"] <= 1


def test_bench_reads_and_node_tiny(tmp_path):
    _run(["scripts/bench_reads.py", "--tiny", "--cases", "tiny-dense-r8-tp4", "--readers", "2", "--repeats", "1",
          "--probe", "4096", "--probe-reads", "64", "--out", str(tmp_path / "r"), "--adapters", str(tmp_path / "a")],
         tmp_path)
    r = json.loads((tmp_path / "r" / "reads.json").read_text())["cases"]["tiny-dense-r8-tp4"]
    assert r["preadv_2_s"] > 0 and r["floor_2_s"] > 0 and r["bytes"] > 0
    _run(["scripts/bench_node.py", "--tiny", "--cases", "tiny-dense-r8-tp4:2", "--out", str(tmp_path / "n"),
          "--adapters", str(tmp_path / "a")], tmp_path)
    n = json.loads((tmp_path / "n" / "node.json").read_text())["cases"]["tiny-dense-r8-tp4:2"]
    assert n["cached"]["disk_bytes"] == 0 or n["cached"]["disk_per_file_byte"] < 1
    assert n["dropped"]["asked_per_file_byte"] >= 1 and len(n["per_rank"]) == 2

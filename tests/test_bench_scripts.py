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
    assert 0 <= o["arena_huge_bytes"] <= o["arena_reserved_bytes"] and "thp_mode" in o


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


def test_probe_first_tiny(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "scripts/probe_first.py", "--tiny", "--case", "tiny-moe-r8-tp4",
                        "--idle", "0.05", "--repeats", "1", "--out", str(tmp_path / "p"),
                        "--adapters", str(tmp_path / "a")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for k in ("first:", "cold:", "cold back to back:", "cold after 0.05 s idle:"):
        assert f"tiny-moe-r8-tp4 {k}" in p.stdout, p.stdout
    # (--stacks is not run here: faulthandler's watchdog reads the other threads' frames without the GIL,
    # which now and then crashes the process; the parser of its dumps is tested below)


def test_probe_first_keeps_only_busy_threads():
    sys.path.insert(0, str(ROOT / "scripts"))
    from probe_first import busy_stacks

    dump = ('Timeout (0:00:00.001000)!\nThread 0x1 (most recent call first):\n'
            '  File "/x/concurrent/futures/thread.py", line 89 in _worker\n'
            '\nThread 0x2 (most recent call first):\n'
            '  File "/x/tp_lora/host/reader.py", line 284 in check_header\n'
            '  File "/x/concurrent/futures/thread.py", line 58 in run\n'
            '\nThread 0x3 (most recent call first):\n'
            '  File "/x/tp_lora/host/native.py", line 205 in _serve\n')
    assert busy_stacks(dump + dump) == [["reader.py:284 check_header < thread.py:58 run"]] * 2

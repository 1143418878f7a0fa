"""The launchers in launch/ start real processes: torchrun on one node, two torchrun "nodes" on localhost
through a c10d rendezvous, and a real two-node Slurm job (scripts/slurm_local.sh) on this machine.

The launched program is ENTRY (run as `python -m ENTRY CONFIG [args]`) and a launch is right when its
output contains `expected_line(world, nodes)`. Today that is the probe in tests/dist_probe.py; to test the
real job, change ENTRY, CONFIG and expected_line only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "tests.dist_probe"
CONFIG = "configs/models/tiny-dense.yaml"
PROBE = ENTRY == "tests.dist_probe"  # the probe also prints per-rank lines that some checks read


def expected_line(world: int, nodes: int) -> str:
    """The line rank 0 prints when `world` ranks on `nodes` nodes all took part in one collective."""
    ranks = ",".join(str(r) for r in range(world))
    return f"PROBE world={world} nodes={nodes} ranks={ranks} sum={world}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**overrides: str) -> dict[str, str]:
    """This environment minus anything a surrounding torchrun or Slurm job would leak into the launch."""
    leaked = re.compile(r"^(SLURM_|SLURMD_|TORCHELASTIC_)|^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|"
                        r"GROUP_RANK|MASTER_ADDR|MASTER_PORT|NPROC|NPROC_PER_NODE|NNODES|NODE_RANK|RDZV_.*|"
                        r"TORCHRUN|TORCHRUN_ARGS|TP_LORA_ROOT)$")
    env = {k: v for k, v in os.environ.items() if not leaked.search(k)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(TP_LORA_ENTRY=ENTRY, CONFIG=CONFIG, CUDA_VISIBLE_DEVICES="")
    env.update(overrides)
    return env


def _probe_ranks(output: str) -> list[dict[str, str]]:
    return [dict(kv.split("=", 1) for kv in line.split()[1:])
            for line in output.splitlines() if line.startswith("PROBE-RANK ")]


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("port", ["auto", "fixed"])
def test_torchrun_single_node_two_ranks(port: str) -> None:
    env = _env(NPROC="2")
    if port == "fixed":  # MASTER_PORT given: static rendezvous on that port instead of --standalone
        env["MASTER_PORT"] = str(_free_port())
    res = _run(["launch/torchrun.sh", "--probe-flag", "x y"], env, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert expected_line(2, 1) in res.stdout, out
    if PROBE:  # CONFIG then the extra arguments, untouched (one argument with a space stays one)
        assert f"PROBE-ARGS {CONFIG} --probe-flag x y" in res.stdout, out
        assert sorted(int(r["local_rank"]) for r in _probe_ranks(res.stdout)) == [0, 1], out


def test_torchrun_launcher_from_another_directory(tmp_path: Path) -> None:
    """Started from elsewhere, the launcher runs its own checkout with its default config."""
    env = _env(NPROC="2")
    del env["CONFIG"]
    env["PYTHONPATH"] = ""  # the launcher itself puts the checkout on the path
    res = subprocess.run([str(ROOT / "launch" / "torchrun.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert expected_line(2, 1) in res.stdout, out
    if PROBE:
        assert f"PROBE-ARGS {ROOT / 'configs' / 'demo.yaml'}" in res.stdout, out


# --------------------------------------------------------------------------- two nodes on localhost (c10d)


def test_multinode_two_local_nodes_c10d() -> None:
    port = _free_port()
    procs = []
    for node_rank in (0, 1):
        env = _env(NNODES="2", NODE_RANK=str(node_rank), NPROC="2", RDZV_HOST="127.0.0.1",
                   RDZV_PORT=str(port), RDZV_ID=f"test-{port}", RDZV_CONF="join_timeout=45")
        procs.append(subprocess.Popen(["launch/multinode.sh"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    outputs = []
    try:
        deadline = time.monotonic() + 60
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:  # each launcher is its own process group: torchrun and its workers go too
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    out = "\n".join(outputs)
    assert [p.returncode for p in procs] == [0, 0], out
    assert out.count(expected_line(4, 2)) == 1, out
    if PROBE:
        ranks = _probe_ranks(out)
        assert sorted(int(r["rank"]) for r in ranks) == [0, 1, 2, 3], out
        assert sorted((r["group_rank"], r["local_rank"]) for r in ranks) == [
            ("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], out


# ------------------------------------------------------------------------------------ real local Slurm


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _slurm_local(cmd: str, state_dir: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**_env(), "SLURM_LOCAL_DIR": state_dir}
    return _run(["scripts/slurm_local.sh", cmd], env, timeout=timeout)


@pytest.fixture(scope="module")
def local_slurm() -> Iterator[dict[str, str]]:
    """A running two-node Slurm (n1, n2); yields the client environment. Daemons stop at teardown."""
    if os.geteuid() != 0:
        pytest.skip("local Slurm needs root (apt-get, munged as the munge user, slurmd)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("local Slurm needs Debian packages: no apt-get and no slurmctld here")
    res = _run(["scripts/slurm_local.sh", "install"], _env(), timeout=600)
    if res.returncode == 3:
        message = f"apt cannot reach its repository, so Slurm cannot be installed:\n{res.stderr[-2000:]}"
        if _in_ci():
            pytest.fail("CI=true and root, yet " + message)
        pytest.skip(message)
    assert res.returncode == 0, f"slurm_local.sh install failed:\n{res.stdout}\n{res.stderr}"

    # mkdtemp under /tmp, not pytest's tmp_path: munged (as the munge user) must traverse the path.
    state_dir = tempfile.mkdtemp(prefix="tp_lora_slurm_")
    try:
        res = _slurm_local("start", state_dir, timeout=180)
        assert res.returncode == 0, f"slurm_local.sh start failed:\n{res.stdout}\n{res.stderr}"
        yield {**_env(), "SLURM_CONF": f"{state_dir}/slurm.conf", "SLURM_LOCAL_DIR": state_dir}
    finally:
        res = _slurm_local("stop", state_dir, timeout=120)
        assert res.returncode == 0, f"slurm_local.sh stop failed:\n{res.stdout}\n{res.stderr}"


def _job_field(job_id: str, field: str, env: dict[str, str]) -> str:
    res = _run(["scontrol", "-o", "show", "job", job_id], env, timeout=20)
    match = re.search(rf"\b{field}=(\S+)", res.stdout)
    return match.group(1) if match else ""


def _daemon_logs(state_dir: str) -> str:
    text = []
    for log in sorted(Path(state_dir, "log").glob("*.log")):
        text.append(f"== {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(text)


def _sbatch_and_wait(env: dict[str, str], out_file: Path, job_args: list[str], minutes: int,
                     timeout: float) -> tuple[str, str, str, str]:
    """Submit launch/slurm.sbatch on 2 nodes and wait (bounded) for a terminal state.
    Returns (job id, state, job output, context for assertion messages)."""
    res = _run(["sbatch", "--parsable", "-N", "2", f"--time={minutes}", f"--output={out_file}",
                "launch/slurm.sbatch", *job_args], env, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = res.stdout.strip().split(";")[0]
    terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = _job_field(job_id, "JobState", env)
        if state in terminal:
            break
        time.sleep(0.5)
    else:
        _run(["scancel", job_id], env, timeout=20)
    output = out_file.read_text(errors="replace") if out_file.exists() else "(no job output)"
    context = f"job {job_id} state={state!r}\n--- job output\n{output}\n--- daemons\n" \
              f"{_daemon_logs(env['SLURM_LOCAL_DIR'])}"
    return job_id, state, output, context


@pytest.mark.slurm
def test_slurm_sbatch_two_nodes_two_ranks_each(local_slurm: dict[str, str], tmp_path: Path) -> None:
    env = {**local_slurm, "NPROC_PER_NODE": "2"}
    job_id, state, output, context = _sbatch_and_wait(env, tmp_path / "job.out", ["--probe-flag"], 3, 120)
    assert state == "COMPLETED", context
    assert _job_field(job_id, "ExitCode", env) == "0:0", context
    assert output.count(expected_line(4, 2)) == 1, context
    if PROBE:
        ranks = _probe_ranks(output)
        assert sorted(int(r["rank"]) for r in ranks) == [0, 1, 2, 3], context
        by_node: dict[str, list[str]] = {}
        for r in ranks:
            by_node.setdefault(f'{r["slurm_nodeid"]}/{r["slurmd_nodename"]}', []).append(r["local_rank"])
        # one torchrun per node: 2 nodes (SLURM_NODEID 0 on n1, 1 on n2), each with local ranks 0 and 1
        assert {k: sorted(v) for k, v in by_node.items()} == {"0/n1": ["0", "1"], "1/n2": ["0", "1"]}, \
            context


# ------------------------------------------------------------------- the main job through each launcher
# The same three launch paths, running the real main job (tp_lora.run) on CPU/gloo: every rank serves a
# mixed-adapter workload, rank 0 checks sampled batches against a single-process reference and prints
# the report. A launch is right when the report says so.

MAIN_ENTRY, MAIN_CONFIG = "tp_lora.run", "configs/demo.yaml"


def _main_args(cache: Path) -> list[str]:
    return [f"--set=cache_dir={cache}", "--set=workload.requests=18", "--set=workload.verify_every=2"]


def _report_nodes(out: str) -> dict[str, tuple[str, list[int]]]:
    """`ranks per node: node0 (host): [0, 1]  node1 (host): [2, 3]` -> {node: (host, ranks)}."""
    line = re.search(r"^ranks per node: (.*)$", out, flags=re.M)
    assert line, out
    return {n: (h, [int(x) for x in rs.split(",")])
            for n, h, rs in re.findall(r"(node\d+) \((\S+)\): \[([\d, ]+)\]", line.group(1))}


def _check_report(out: str, world: int, nodes: dict[str, list[int]] | None = None) -> None:
    assert f"world={world} (tp={world}, ep=1)" in out, out
    assert re.search(r"verification vs single-process reference: [1-9]\d* batches checked, 0 failed", out), out
    rows = re.findall(r"^  (\d+)  +node\d+ ", out, flags=re.M)  # the bytes table: a row per rank
    assert sorted(int(r) for r in rows) == list(range(world)), out
    if nodes is not None:
        assert {n: rs for n, (_h, rs) in _report_nodes(out).items()} == nodes, out


def test_main_job_torchrun_two_ranks(tmp_path: Path) -> None:
    env = _env(NPROC="2", TP_LORA_ENTRY=MAIN_ENTRY, CONFIG=MAIN_CONFIG)
    res = _run(["launch/torchrun.sh", *_main_args(tmp_path / "cache")], env, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    _check_report(res.stdout, 2)


@pytest.mark.parametrize("engine,layout", [
    ("reference", ["ep_size=2"]), ("reference", ["ep_size=1"]), ("reference", ["ep_size=1", "moe_replicated=true"]),
    ("transformers", ["ep_size=1"]), ("transformers", ["ep_size=1", "moe_replicated=true"])])
def test_main_job_moe_layouts_with_router_lora(tmp_path: Path, engine: str, layout: list[str]) -> None:
    """The MoE demo (its adapters adapt the router too) at world 2 in each layout of the experts: EP groups,
    sharded over TP, whole on every rank; on tp_lora's reference model and on transformers' TP model (whose
    plan follows the config: MOE_TP_PLAN or its default). Every batch matches the single-process reference."""
    if engine == "transformers":
        pytest.importorskip("transformers")
    env = _env(NPROC="2", TP_LORA_ENTRY=MAIN_ENTRY, CONFIG="configs/demo-moe.yaml")
    sets = [f"--set={x}" for x in (f"engine={engine}", *layout)]
    res = _run(["launch/torchrun.sh", *_main_args(tmp_path / "cache"), "--set=workload.verify_every=1",
                "--set=synthetic.count=3", *sets], env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    ep = 2 if "ep_size=2" in layout else 1
    rep = "experts replicated" if "moe_replicated=true" in layout else None
    assert f"world=2 (tp=2, ep={ep}{', ' + rep if rep else ''})" in res.stdout, res.stdout
    assert re.search(r"verification vs single-process reference: [1-9]\d* batches checked, 0 failed", res.stdout), \
        res.stdout


def test_main_job_two_local_nodes_c10d(tmp_path: Path) -> None:
    port = _free_port()
    procs = []
    for node_rank in (0, 1):
        env = _env(NNODES="2", NODE_RANK=str(node_rank), NPROC="2", RDZV_HOST="127.0.0.1",
                   RDZV_PORT=str(port), RDZV_ID=f"main-{port}", RDZV_CONF="join_timeout=60",
                   TP_LORA_ENTRY=MAIN_ENTRY, CONFIG=MAIN_CONFIG)
        procs.append(subprocess.Popen(["launch/multinode.sh", *_main_args(tmp_path / "cache")], cwd=ROOT,
                                      env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    outputs = []
    try:
        deadline = time.monotonic() + 240
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    out = "\n".join(outputs)
    assert [p.returncode for p in procs] == [0, 0], out
    # c10d assigns node ranks in join order: each torchrun "node" holds two consecutive global ranks
    _check_report(out, 4, {"node0": [0, 1], "node1": [2, 3]})


@pytest.mark.slurm
def test_main_job_slurm_two_nodes_two_ranks_each(local_slurm: dict[str, str], tmp_path: Path) -> None:
    env = {**local_slurm, "NPROC_PER_NODE": "2", "TP_LORA_ENTRY": MAIN_ENTRY, "CONFIG": MAIN_CONFIG}
    cache = Path(tempfile.mkdtemp(prefix="tp_lora_main_"))  # both emulated nodes share this host's /tmp
    try:
        job_id, state, output, context = _sbatch_and_wait(env, tmp_path / "job.out", _main_args(cache), 5, 300)
        assert state == "COMPLETED", context
        # 2 emulated nodes x 2 ranks; which host got global ranks 0-1 depends on rendezvous order
        nodes = _report_nodes(output)
        assert {h for h, _rs in nodes.values()} == {"n1", "n2"}, context
        assert {n: rs for n, (_h, rs) in nodes.items()} == {"node0": [0, 1], "node1": [2, 3]}, context
        _check_report(output, 4)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

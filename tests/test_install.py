"""A new user's first minutes, as CI sees them.

* Every package ``tp_lora`` imports is declared in pyproject.toml (read from the sources, no install).
* In a fresh venv holding only torch: the clean checkout (tracked files only, as a clone has them)
  installed and run with README's "Run it" command, read from README.md itself, so the two cannot drift.
* A non-editable ``pip install`` of the checkout finds its model presets and shipped run configs from
  another directory.

The venv tests need PyPI (pip fetches setuptools, safetensors, pyyaml and numpy); the CI machine reaches
it. They share one venv (a module fixture) and are marked ``install``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tp_lora"
#: Imports guarded by try/except or behind CUDA: optional, so not runtime dependencies.
OPTIONAL = {"tqdm": "progress bar (extra [progress])", "triton": "kernels, only where CUDA is",
            "transformers": "the transformers integration (extra [transformers])"}
#: import name -> distribution name, where they differ.
DIST_OF = {"yaml": "pyyaml"}


def _declared() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower() for d in deps}


def _imported_top_levels() -> dict[str, str]:
    """Top-level module of every absolute import in tp_lora/ -> a file importing it."""
    found: dict[str, str] = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], str(f.relative_to(ROOT)))
    return found


def test_every_import_is_declared() -> None:
    declared = _declared()
    missing = {}
    for mod, where in _imported_top_levels().items():
        if mod in sys.stdlib_module_names or mod == "tp_lora" or mod in OPTIONAL:
            continue
        if DIST_OF.get(mod, mod).lower() not in declared:
            missing[mod] = where
    assert not missing, f"imported but not in pyproject's dependencies: {missing} (declared: {sorted(declared)})"
    assert "numpy" in declared  # safetensors.torch.save_file needs it; torch warns without it


def test_presets_and_run_configs_are_package_data() -> None:
    """The files live in the package (so a wheel has them); the checkout's configs/ is the same folder."""
    from tp_lora.plan.model import CONFIG_DIR, PRESET_DIR

    assert CONFIG_DIR.parent == PACKAGE and PRESET_DIR.parent == CONFIG_DIR
    assert (ROOT / "configs").resolve() == CONFIG_DIR.resolve()
    assert {"demo", "demo-moe"} <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert "tiny-dense" in {p.stem for p in PRESET_DIR.glob("*.yaml")}
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {str(p.relative_to(PACKAGE)) for pat in data["tp_lora"] for p in PACKAGE.glob(pat)}
    on_disk = {str(p.relative_to(PACKAGE)) for p in CONFIG_DIR.rglob("*.yaml")}
    assert on_disk <= shipped, f"config files not shipped in the wheel: {sorted(on_disk - shipped)}"


# ------------------------------------------------------------------------------ fresh venv, clean clone


def _readme_run_command() -> str:
    """The one shell line of README's "Run it" code block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Run it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "README's Run it section has no ```bash block"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, f"README's Run it block should be one command, found {lines}"
    return lines[0]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pypi_reachable() -> bool:
    if os.environ.get("PIP_INDEX_URL"):
        return True
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _clean_checkout(dest: Path) -> Path:
    """What a clone of this checkout holds: tracked (and new, not ignored) files of the working tree, links
    kept as links; no build outputs, caches or egg-info."""
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, timeout=60)
    if res.returncode != 0:
        if _in_ci():
            pytest.fail(f"CI, yet this is not a git checkout: {res.stderr.decode(errors='replace')}")
        pytest.skip("not a git checkout: cannot tell the clean files from build outputs")
    for rel in sorted({r for r in res.stdout.decode().split("\0") if r}):
        src, dst = ROOT / rel, dest / rel
        if not src.is_symlink() and not src.exists():  # deleted in the working tree
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


class Venv:
    def __init__(self, path: Path, home: Path):
        self.path, self.home = path, home
        self.bin = path / "bin"
        leaked = re.compile(r"^(SLURM_|SLURMD_|TORCHELASTIC_|PYTHON|PIP_REQUIRE)|^(RANK|WORLD_SIZE|LOCAL_RANK|"
                            r"LOCAL_WORLD_SIZE|GROUP_RANK|MASTER_ADDR|MASTER_PORT|VIRTUAL_ENV|TP_LORA_.*)$")
        env = {k: v for k, v in os.environ.items() if not leaked.search(k)}
        # a new user's home (so ~/.cache/tp_lora starts empty); pip keeps its cache (downloads, not installs)
        pip_cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True,
                                   text=True).stdout.strip()
        if pip_cache:
            env["PIP_CACHE_DIR"] = pip_cache
        env.update(HOME=str(home), VIRTUAL_ENV=str(path), PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
                   PIP_DISABLE_PIP_VERSION_CHECK="1", CUDA_VISIBLE_DEVICES="",
                   PIP_NO_COMPILE="1")  # no .pyc at install time: torch alone has thousands of modules
        self.env = env

    def sh(self, command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", command], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with only torch (the version running these tests) installed."""
    if not _pypi_reachable():
        if _in_ci():
            pytest.fail("CI, yet PyPI is unreachable: the install tests need it")
        pytest.skip("PyPI unreachable: pip cannot fetch the build backend and dependencies")
    base = tmp_path_factory.mktemp("newcomer")
    home = base / "home"
    home.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=300)
    v = Venv(base / "venv", home)
    torch_version = importlib.metadata.version("torch").split("+")[0]
    # --no-compile: byte-compiling all of torch's files takes most of the install's time; the modules a
    # test imports are compiled when first imported, as in any fresh install
    res = v.sh(f"python -m pip install -q --no-compile torch=={torch_version}", base, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return v


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _clean_checkout(tmp_path_factory.mktemp("clone") / "tp_lora")


def _no_noise(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "Failed to initialize NumPy" not in stderr, stderr  # numpy is a dependency, not an accident


@pytest.mark.install
def test_readme_run_command_in_a_fresh_venv(venv: Venv, clone: Path) -> None:
    command = _readme_run_command()
    assert command.startswith("pip install") and "torchrun" in command, command
    res = venv.sh(command, clone, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert re.search(r"verification vs single-process reference: [1-9]\d* batches checked, 0 failed", res.stdout), out
    assert "world=2 (tp=2, ep=1)" in res.stdout, out
    _no_noise(res.stderr)
    cache = venv.home / ".cache" / "tp_lora"
    assert cache.is_dir() and not list(cache.rglob(".*.tmp*")), sorted(cache.rglob("*"))
    for cmd in ("tp-lora --help", "tp-lora run --help", "tp-lora plan --help", "tp-lora write-adapter --help"):
        res = venv.sh(cmd, clone, timeout=120)
        assert res.returncode == 0 and res.stderr == "", (cmd, res.stdout, res.stderr)
        assert "usage: tp-lora" in res.stdout, (cmd, res.stdout)


@pytest.mark.install
def test_non_editable_install_finds_presets_and_demo_from_anywhere(venv: Venv, clone: Path,
                                                                     tmp_path: Path) -> None:
    res = venv.sh(f"python -m pip install -q '{clone}'", tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import tp_lora; from tp_lora import ModelSpec; from tp_lora.plan.model import PRESET_DIR; "
             "print(tp_lora.__file__); print(ModelSpec.from_preset('tiny-dense').name); "
             "print(' '.join(sorted(p.stem for p in PRESET_DIR.glob('*.yaml'))))")
    res = venv.sh(f'python -c "{probe}"', elsewhere, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    where, name, presets = res.stdout.splitlines()
    assert Path(where).is_relative_to(venv.path), where  # the installed copy, not the checkout
    assert name == "tiny-dense"
    assert presets.split() == sorted(p.stem for p in (ROOT / "tp_lora" / "configs" / "models").glob("*.yaml"))
    # a shipped run config by name, from another directory
    res = venv.sh("tp-lora run demo --set workload.requests=6 --set workload.verify_every=1 --json r.json",
                  elsewhere, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 batches checked, 0 failed" in res.stdout, res.stdout
    assert (elsewhere / "r.json").is_file()
    _no_noise(res.stderr)
    # a checkout-relative path from elsewhere: one line naming the shipped config, usage exit status
    res = venv.sh("tp-lora run configs/demo.yaml", elsewhere, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "the shipped one is 'demo'" in res.stderr, res.stderr

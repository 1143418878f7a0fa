"""Placement of packed chunks into pool slots: the one-launch Triton kernel (run here under Triton's
interpreter on CPU tensors) against the strided copies, bit for bit, and its value checks.

Every layout of the transfer tests, every stored dtype into every pool dtype, cached, streamed (row
pieces of slices larger than a ring buffer) and warm loads: the slot's bytes are identical either way
and equal the file's slices cast by torch. The check flags NaN/Inf and finite values beyond the pool
dtype (naming the tensor group and the value), and float64 groups (placed by the copies beside kernel
groups of the same chunk) are checked as before.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # on a GPU machine the real kernel runs
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from support.runtime_ref import ALL_DENSE, make_adapter, new_manager  # noqa: E402
from test_transfer import LAYOUTS  # noqa: E402
from tp_lora.device import place  # noqa: E402
from tp_lora.errors import AdapterActivationError  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _slot_bytes(mgr, slot: int) -> bytes:
    pool = mgr.pool
    return b"".join(t[slot].contiguous().view(torch.uint8).cpu().numpy().tobytes()
                    for m in pool.shapes for t in (pool.A[m], pool.B[m], pool.scaling[m]))


def _load(adir, layout: str, src: str, pool_dtype: str, placement: str, mode: str, rank: int = 4):
    preset, tp, r, ep, kw = LAYOUTS[layout]
    path = make_adapter(adir, f"{layout}-{src}-r{rank}", preset, rank=rank, dtype=src, seed=11, std=0.3, **kw)
    cfg = dict(dtype=pool_dtype, max_loras=2, placement=placement, device=DEV, max_lora_rank=8)
    if mode == "streamed":
        cfg.update(host_cache_bytes=0, chunk_bytes=4096, ring_slots=2)
    with new_manager(preset, tp=tp, rank=r, ep=ep, **cfg) as mgr:
        assert mgr.engine.placer.kernel == (placement == "kernel")
        mgr.register("x", path)
        mgr.activate("x")
        ls = mgr.stats().load_stats[-1]
        assert ls["streamed"] == (mode == "streamed")
        return _slot_bytes(mgr, mgr.slot_of("x")), ls


def _with_value(src, dst, key_part: str, value: float, f64_part: str | None = None):
    """A copy of adapter ``src`` at ``dst`` whose first tensor matching ``key_part`` holds ``value`` at
    element 3; tensors matching ``f64_part`` stored as float64."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = dst / "adapter_model.safetensors"
    t = load_file(str(w))
    if f64_part is not None:
        t = {k: v.to(torch.float64) if f64_part in k else v for k, v in t.items()}
    key = sorted(k for k in t if key_part in k)[0]
    t[key] = t[key].clone()
    t[key].view(-1)[3] = value
    save_file(t, str(w))
    return dst


CASTS = [("fp32", "bfloat16"), ("bf16", "float32"), ("fp16", "bfloat16"), ("fp32", "float16"), ("bf16", "bfloat16")]


@pytest.mark.parametrize("layout,src,pool_dtype", [("dense-tp4", s, p) for s, p in CASTS] +
                         [(lay, s, p) for lay in sorted(LAYOUTS) if lay != "dense-tp4" for s, p in CASTS[:3]])
def test_kernel_places_the_same_bytes_as_the_copies(adir, layout, src, pool_dtype):
    """Cached cold loads, rank 4 into a rank-8 pool (strided destinations) and rank 8 (contiguous)."""
    for rank in (4, 8):
        got, ls = _load(adir, layout, src, pool_dtype, "kernel", "cached", rank)
        want, _ = _load(adir, layout, src, pool_dtype, "copies", "cached", rank)
        assert got == want, (layout, src, pool_dtype, rank)
        assert ls["place_s"] > 0


@pytest.mark.parametrize("layout", ["dense-tp4", "moe-fused-tp4-ep2"])
def test_kernel_places_streamed_row_pieces_and_warm_loads(adir, layout):
    got, _ = _load(adir, layout, "fp32", "bfloat16", "kernel", "streamed")
    want, _ = _load(adir, layout, "fp32", "bfloat16", "copies", "streamed")
    assert got == want
    preset, tp, r, ep, kw = LAYOUTS[layout]
    path = make_adapter(adir, f"{layout}-warm", preset, rank=4, dtype="fp32", seed=5, **kw)
    slots = {}
    for placement in ("kernel", "copies"):
        with new_manager(preset, tp=tp, rank=r, ep=ep, dtype="bfloat16", max_loras=1, placement=placement,
                         device=DEV) as mgr:
            mgr.register("x", path)
            mgr.register("y", path)
            mgr.activate("x")
            mgr.activate("y")  # evicts x from the one slot; x stays in the pinned cache
            mgr.activate("x")  # warm: the kernel without the check
            assert mgr.stats().load_stats[-1]["warm"]
            slots[placement] = _slot_bytes(mgr, mgr.slot_of("x"))
    assert slots["kernel"] == slots["copies"]


@pytest.mark.parametrize("placement", ["kernel", "copies"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_fails_the_load_either_way(adir, tmp_path, placement, value):
    src = make_adapter(adir, "nf-src", "tiny-dense", rank=4, dtype="bf16", targets=ALL_DENSE, seed=2)
    bad = _with_value(src, tmp_path / "bad", "layers.1.mlp.down_proj.lora_B", value)
    with new_manager("tiny-dense", tp=2, dtype="bfloat16", placement=placement, device=DEV) as mgr:
        mgr.register("good", src)
        mgr.activate("good")
        before = mgr.pool.checksum(mgr.slot_of("good"))
        mgr.register("bad", bad)
        with pytest.raises(AdapterActivationError, match="NaN/Inf values in adapter_model.safetensors"):
            mgr.activate("bad")
        assert mgr.slot_of("bad") is None and mgr.pool.checksum(mgr.slot_of("good")) == before
        mgr.activate("good")  # still served


@pytest.mark.parametrize("where", ["f32", "f64"])
def test_overflow_detail_names_the_group_and_value_with_float64_groups_beside(adir, tmp_path, where):
    """1e5 into a float16 pool: the kernel's per-group peak (float32 tensor) or the copies' (float64
    tensor, placed beside kernel groups in the same chunks) names the group and the value."""
    src = make_adapter(adir, "of-src", "tiny-dense", rank=4, dtype="fp32", targets=("q", "o"), seed=4)
    layer = 0 if where == "f32" else 1
    bad = _with_value(src, tmp_path / "bad", f"layers.{layer}.self_attn.q_proj.lora_A", 1e5, "layers.1.")
    with new_manager("tiny-dense", dtype="float16", placement="kernel", device=DEV) as mgr:
        mgr.register("bad", bad)
        with pytest.raises(AdapterActivationError) as ei:
            mgr.activate("bad")
        msg = str(ei.value)
        assert f"q.A (layer {layer}, {'F32' if where == 'f32' else 'F64'})" in msg, msg
        assert "1e+05" in msg and "float16 max" in msg and "after the cast" in msg, msg
    # the same file into a float32 pool loads, and the kernel placed what the copies place
    outs = []
    for placement in ("kernel", "copies"):
        with new_manager("tiny-dense", dtype="float32", placement=placement, device=DEV) as mgr:
            mgr.register("ok", bad)
            mgr.activate("ok")
            outs.append(_slot_bytes(mgr, mgr.slot_of("ok")))
    assert outs[0] == outs[1]


def test_kernel_mode_is_refused_where_it_cannot_run(monkeypatch):
    from tp_lora.errors import ConfigError
    from tp_lora.runtime.config import LoRAConfig

    with pytest.raises(ConfigError, match="placement"):
        LoRAConfig(placement="fast")
    monkeypatch.setattr(place, "triton_present", lambda: False)
    with pytest.raises(ValueError, match="placement='kernel' needs Triton"):
        with new_manager("tiny-dense", placement="kernel"):
            pass
    with new_manager("tiny-dense", placement="auto") as mgr:
        assert not mgr.engine.placer.kernel  # auto: the copies where the kernel cannot run


def test_auto_picks_the_kernel_on_cuda_only():
    """CPU pools keep the copies by default (the interpreter is for tests); CUDA pools the kernel."""
    with new_manager("tiny-dense", device=DEV) as mgr:
        assert mgr.engine.placer.kernel == (DEV == "cuda")

"""Tenant isolation (issue 15): one adapter's extreme values (3e38 with a 1e6 scaling, inf, NaN: values that
pass validation with ``check_finite=False`` or overflow only in the product) never reach another request.

* The torch path's ops (dense, embedding, expert): a property test over random batches of good, hostile and
  base-only requests: every good request's rows are finite and bit for bit the same with the other requests
  on other adapters, and alone (``tests/support/kernel_checks.py``; the Triton kernels get the same test under the
  interpreter and on the GPU).
* The reference model: a good request's logits are finite and equal (to float32 rounding: the batch's base
  GEMMs have another shape) alone and batched with a NaN adapter, for a dense and an MoE model; before the
  fix the batched attention multiplied the NaN sequence's values by 0 and spread them.
"""

from __future__ import annotations

import random

import pytest
import torch

from support import kernel_checks as kc
from test_ops import MOE, make_pool

from tp_lora.ops.layer import LoRAOps, TorchBackend
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.reference import TPModel, write_random_checkpoint
from tp_lora.runtime.batch import build_batch


@pytest.mark.parametrize("kind", ["huge", "inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_torch_path_keeps_tenants_apart(kind: str, dtype: torch.dtype) -> None:
    par = ParallelSpec(tp_size=2, tp_rank=1, ep_size=2)
    pool = make_pool(MOE, par, dtype=dtype, seed=2)
    if kind == "huge" and dtype == torch.float16:
        kind = "inf"   # 3e38 is not an fp16 value; its cast is inf
    kc.hostile_slot(pool, 2, kind)
    rng = random.Random({"huge": 11, "inf": 12, "nan": 13}[kind])
    for _ in range(3):
        kc.isolation_trial(pool, TorchBackend, rng, "cpu", good_slots=[0, 1], bad_slots=[2],
                           ranks={0: 8, 1: 3, 2: 5}, row_independent=False)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_reference_model_nan_sequence_does_not_reach_others(tmp_path, preset: str) -> None:
    spec = ModelSpec.from_preset(preset)
    write_random_checkpoint(spec, tmp_path)
    model = TPModel.from_pretrained(tmp_path, ParallelSpec(), spec=spec)
    pool = make_pool(spec, ParallelSpec(), dtype=torch.float32, seed=4)
    kc.hostile_slot(pool, 2, "nan")
    g = torch.Generator().manual_seed(0)
    lens = [5, 4, 6]
    slots = [0, 2, 1]   # the middle request's adapter is NaN everywhere
    ids = torch.randint(0, spec.vocab_size, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])

    def run(sel: list[int]) -> torch.Tensor:
        rows = torch.cat([torch.arange(sum(lens[:i]), sum(lens[:i + 1])) for i in sel])
        batch = build_batch([slots[i] for i in sel], [None] * len(sel), [lens[i] for i in sel],
                            {0: 8, 1: 3, 2: 5}, torch.device("cpu"), None)
        return model(ids[rows], pos[rows], [lens[i] for i in sel], lora=LoRAOps(pool, batch, TorchBackend()))

    full = run([0, 1, 2])
    assert bool(torch.isnan(full[5:9]).all())          # the hostile request itself is NaN
    for i, (a, b) in ((0, (0, 5)), (2, (9, 15))):
        alone = run([i])
        assert bool(torch.isfinite(full[a:b]).all()), f"request {i} got NaN from the hostile one"
        torch.testing.assert_close(full[a:b], alone, rtol=1e-4, atol=1e-4)


# -- values checked as they will be served: after the cast to the pool dtype (issue 15) --------------
def _with_value(src, dst, value: float, dtype=None):
    """A copy of adapter ``src`` at ``dst`` whose first lora_A tensor holds ``value`` (optionally stored
    in another dtype, e.g. float64), written with safetensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = dst / "adapter_model.safetensors"
    tensors = load_file(str(w))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(w))
    return dst, key.split(".")[-3].removesuffix("_proj") + ".A"  # e.g. "o.A": the pool module's name


@pytest.mark.parametrize("value,stored,pool", [(1e5, None, "float16"), (1e300, torch.float64, "float32"),
                                                (1e300, torch.float64, "bfloat16")])
def test_value_that_overflows_the_pool_dtype_is_refused_naming_tensor_and_value(tmp_path, value, stored, pool):
    from support.runtime_ref import make_adapter, new_manager
    from tp_lora.errors import AdapterActivationError

    src = make_adapter(tmp_path / "src", "ok", "tiny-dense", rank=4, dtype="fp32", targets=("q", "o"), seed=3)
    bad, tensor = _with_value(src, tmp_path / "bad", value, stored)
    with new_manager("tiny-dense", max_loras=2, dtype=pool) as mgr:
        mgr.register("good", src)
        mgr.activate("good")
        before = mgr.pool.checksum(mgr.slot_of("good"))
        mgr.register("bad", bad)
        with pytest.raises(AdapterActivationError) as ei:
            mgr.activate("bad")
        msg = str(ei.value)
        assert tensor in msg and "after the cast" in msg and f"{pool} max" in msg, msg
        assert f"{value:.4g}" in msg, msg
        # nothing of the rejected load stays in a slot; the serving adapter is untouched
        assert mgr.slot_of("bad") is None and mgr.pool.checksum(mgr.slot_of("good")) == before
        assert all(s in (None, "good") for s in mgr.pool.slot_name)
    # the same file into a pool that holds the value loads fine
    if pool == "float16":
        with new_manager("tiny-dense", max_loras=2, dtype="float32") as mgr:
            mgr.register("bad", bad)
            mgr.activate("bad")

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

"""peft conformance (tests/test_conformance.py) on the GPU, TP 1: the reference model on CUDA with a
float32 pool, LoRA through the default backend there (the Triton kernels), logits equal to peft's within
the same tolerance as on the CPU. Skipped without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


from test_conformance import LAYOUTS, MIXED, REUSE_AFTER, REUSE_BEFORE, _check, _rank_run  # noqa: E402
from test_conformance import families  # noqa: E402,F401  (module fixture)


def test_conformance_tp1_on_cuda_with_default_backend(families) -> None:   # noqa: F811
    from tp_lora.ops.layer import default_backend
    from tp_lora.ops.triton_backend import TritonBackend
    assert isinstance(default_backend("cuda"), TritonBackend)
    jobs = [(fam, ep, families[fam].base_dir, families[fam].adapter_dirs) for fam, ep in LAYOUTS[1]]
    res = _rank_run(0, 1, jobs, device="cuda")
    for fam, ep in LAYOUTS[1]:
        out = res[(fam, ep)]
        _check(f"cuda {fam} mixed", families[fam], MIXED, out["mixed"])
        _check(f"cuda {fam} reuse/before", families[fam], REUSE_BEFORE, out["before"])
        _check(f"cuda {fam} reuse/after", families[fam], REUSE_AFTER, out["after"])
        assert out["slot_problems"] == []

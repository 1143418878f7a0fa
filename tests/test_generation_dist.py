"""A register that failed on one rank only must not poison later activations of the name."""

from __future__ import annotations

from pathlib import Path

from distributed import run_distributed
from runtime_ref import make_adapter


def _scenario(rank: int, world: int, good1: str, good2: str) -> dict:
    import torch.distributed as dist

    from tp_lora.errors import TPLoRAError
    from tp_lora.runtime.manager import LoRAConfig, LoRAManager
    from tp_lora.plan.model import ModelSpec
    from tp_lora.plan.parallel import ParallelSpec

    spec = ModelSpec.from_preset("tiny-dense")
    mgr = LoRAManager(LoRAConfig(max_loras=2, max_lora_rank=8, dtype="float32", activation_timeout_s=20),
                      spec, ParallelSpec(tp_size=world, tp_rank=rank), group=dist.group.WORLD)
    # rank 1 is handed a folder that does not exist: its register fails, rank 0's succeeds
    failed = False
    try:
        mgr.register("x", good1 if rank == 0 else good1 + "-missing")
    except TPLoRAError:
        failed = True
    # the engine then registers x everywhere from another folder (replacing it where it exists)
    mgr.register("x", good2, replace=True)
    slots = mgr.activate(["x"])
    mgr.close()
    return {"failed": failed, "slots": slots}


def test_one_rank_register_failure_then_reregister(tmp_path: Path) -> None:
    a = make_adapter(tmp_path, "g1", "tiny-dense", rank=4, seed=1)
    b = make_adapter(tmp_path, "g2", "tiny-dense", rank=8, seed=2)
    out = run_distributed(_scenario, 2, str(a), str(b), timeout=90)
    assert [o["failed"] for o in out] == [False, True]
    assert out[0]["slots"] == out[1]["slots"] == {"x": 0}

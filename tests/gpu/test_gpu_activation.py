"""The agreement protocol on the NCCL backend (issue 14), world 1 on one GPU.

A world-1 NCCL group still runs every exchange (the manager issues them whenever a process group is
given), so this checks what is NCCL-specific: messages on the device, int64 sums, completion polled
through the work object, the commit path, an interrupt at the commit (in doubt, then resolved by
attach_group on a new NCCL group), aborting the NCCL communicator of a group given up on, and a fresh
group working afterwards. Not run here: world > 1 on NCCL (multi-GPU machines were not lent), i.e. a
late peer, a lost peer and lists that differ on NCCL; the same code paths run on gloo at world 2 and 4
(tests/test_agreement_dist.py, tests/test_chaos_dist.py).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
import torch


from support.runtime_ref import ALL_DENSE, expected_slot, make_adapter, slot_diff  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def nccl_world():
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL not available")
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=60))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", 0))
    yield dist
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a group the test aborted on purpose may refuse a clean shutdown
        pass


def test_nccl_activation_commit_in_doubt_and_reattach(nccl_world, tmp_path):
    dist = nccl_world
    from tp_lora.errors import AdapterStateError
    from tp_lora.runtime import activation as act
    from tp_lora.runtime.manager import LoRAConfig, LoRAManager
    from tp_lora.plan.model import ModelSpec
    from tp_lora.plan.parallel import ParallelSpec

    a = make_adapter(tmp_path, "a", "tiny-dense", rank=8, dtype="bf16", targets=ALL_DENSE, seed=1)
    b = make_adapter(tmp_path, "b", "tiny-dense", rank=4, dtype="fp32", targets=("q", "v"), seed=2)
    g1 = dist.new_group(backend="nccl")
    cfg = LoRAConfig(max_loras=2, max_lora_rank=8, dtype="bfloat16", device="cuda", chunk_bytes=4096,
                     activation_timeout_s=30.0, host_cache_bytes=1 << 20)
    spec = ModelSpec.from_preset("tiny-dense")
    mgr = LoRAManager(cfg, spec, ParallelSpec(tp_size=1, tp_rank=0), group=g1)
    assert mgr.collective.distributed and mgr.collective.backend == "nccl"
    assert mgr.collective.device.type == "cuda"
    mgr.register("a", a)
    mgr.register("b", b)
    assert mgr.activate("a") == {"a": 0}
    assert mgr.collective.calls == 2  # verdict + commit, on the GPU
    assert slot_diff(mgr.pool, 0, expected_slot(a, spec, 1, 0, 1, mgr.pool)) == []
    # an interrupt at the commit exchange: in doubt (loaded, unusable), the group given up (NCCL aborted)
    def boom(kind):
        if kind == act.KIND_COMMIT:
            raise KeyboardInterrupt
    mgr.collective.hook = boom
    with pytest.raises(KeyboardInterrupt):
        mgr.activate("b")
    mgr.collective.hook = None
    assert mgr.adapter_state("b") == "in_doubt" and mgr.collective.broken
    with pytest.raises(AdapterStateError, match="in doubt"):
        mgr.prepare_batch(["b"])
    # a new NCCL group: reconcile commits b (every rank, here the one, holds it)
    g2 = dist.new_group(backend="nccl")
    assert mgr.attach_group(g2) == {"a": 0, "b": 1}
    assert slot_diff(mgr.pool, 1, expected_slot(b, spec, 1, 0, 1, mgr.pool)) == []
    with mgr.prepare_batch(["a", "b", None], [2, 1, 1]) as info:
        assert info.slots == (0, 1)
    # and the new group carries the next activation
    mgr.unregister("b")
    mgr.register("b", b)
    assert mgr.activate("b") == {"b": 1}
    st = mgr.stats()
    assert st.in_doubt == [] and sorted(st.active) == ["a", "b"]
    mgr.close()

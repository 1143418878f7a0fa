"""Conformance: tp_lora's logits == peft's own logits, per request of a mixed-adapter batch, under real TP/EP.

Tiny random Llama and Qwen3-MoE models from ``transformers``, and real PEFT adapters made here
(``init_lora_weights=False``; every linear, embed_tokens, lm_head, and the MoE experts through
``target_parameters``), saved with ``save_pretrained`` (``tests/support/peft_fixtures.py``). The reference is peft
itself: ``PeftModel.from_pretrained`` of each saved adapter, each request run alone.

On tp_lora's side each rank (real gloo groups, TP 1/2/4, EP 1/2/4 for the MoE) builds the reference
``TPModel`` from the same checkpoint and a ``LoRAManager`` (float32 pool), registers and activates the
adapters, and runs ONE flattened batch that mixes three adapters and "no adapter" through ``LoRAOps``.
Scalings covered: alpha/r (a1), rsLoRA alpha/sqrt(r) (a2), rank_pattern/alpha_pattern per module and per
layer (a3), and on the MoE peft's own v4->v5 conversion of gate/up/down_proj targets (a1: gate_up at 2r).

The second scenario loads a rank-2 adapter that targets fewer modules into the slot a rank-16 adapter
(every module) used before: logits still equal peft's, and the slot holds no trace of the old adapter.

One spawn per world size runs every layout and both scenarios of that size.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.distributed import run_distributed

from tp_lora.runtime.manager import LoRAConfig, LoRAManager
from tp_lora.plan.model import ModelSpec
from tp_lora.ops.layer import LoRAOps
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.reference import TPModel

PRESETS = {"dense": "tiny-dense", "moe": "tiny-moe"}
SEQ_LENS = [5, 4, 6, 3, 4]
TOL = 1e-4          # max abs error / max(1, max |peft logit|), float32 everywhere
MAX_RANK = 16

# (adapter or None, sequence index) per request, in batch order
MIXED = (("a1", 0), (None, 1), ("a2", 2), ("a3", 3), ("a1", 4))   # a1 twice, not adjacent
REUSE_BEFORE = (("a2", 0), ("a1", 1), (None, 2))                  # a2 (rank 16, every module) -> slot 0
REUSE_AFTER = (("small", 3), (None, 4), ("a1", 0))                # small (rank 2) evicts a2 into slot 0

# (family, ep) per world size; tp = world size. ep "rep": every expert whole on every rank
# (``ParallelSpec(moe_replicated=True)``, transformers' default from 5.25), attention and the shared expert TP
LAYOUTS: dict[int, list[tuple[str, int | str]]] = {
    1: [("dense", 1), ("moe", 1)],
    2: [("dense", 1), ("moe", 1), ("moe", 2), ("moe", "rep")],
    4: [("dense", 1), ("moe", 1), ("moe", 2), ("moe", 4), ("moe", "rep")],   # tp=4 > 2 kv heads: replicated kv
}


def _parallel(world: int, rank: int, ep: int | str) -> ParallelSpec:
    if ep == "rep":
        return ParallelSpec(tp_size=world, tp_rank=rank, moe_replicated=True)
    return ParallelSpec(tp_size=world, tp_rank=rank, ep_size=ep)


def _seqs(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in SEQ_LENS]
    # both ends of the vocabulary and the vocab-shard edges of tp=2/4 (64 rows per rank at tp=4)
    seqs[0][:4] = torch.tensor([vocab - 1, 0, 63, 64])
    seqs[3][:3] = torch.tensor([127, 128, 192])
    return seqs


# -- the per-rank work (no transformers / peft here: spawned ranks import this module) ----------------------
def _forward(model: TPModel, mgr: LoRAManager, reqs: tuple, seqs: list[torch.Tensor]) -> torch.Tensor:
    lens = [len(seqs[i]) for _, i in reqs]
    ids = torch.cat([seqs[i] for _, i in reqs])
    pos = torch.cat([torch.arange(n) for n in lens])
    with mgr.prepare_batch([a for a, _ in reqs], lens) as batch:
        return model(ids, pos, lens, lora=LoRAOps(mgr.pool, batch)).cpu()


def _slot_problems(mgr: LoRAManager, name: str) -> list[str]:
    """What of the previous adapter survives in ``name``'s slot: rank padding and untargeted modules must be
    exactly zero (buffers and scalings), targeted modules must have a non-zero scaling."""
    pool, plan = mgr.pool, mgr.plan(name)
    s = mgr.slot_of(name)
    r = plan.max_rank
    out = []
    for m in pool.modules:
        A, B, sc = pool.A[m][s], pool.B[m][s], pool.scaling[m][s]
        if m not in plan.modules:
            if A.any() or B.any() or sc.any():
                out.append(f"{m}: untargeted but not zero")
            continue
        if A[..., r:, :].any() or B[..., r:].any():
            out.append(f"{m}: rank padding beyond {r} not zero")
        for (mod, layer, le), val in plan.scalings.items():
            if mod == m and float(sc[layer, 0 if le is None else le]) != pytest.approx(val, rel=1e-6):
                out.append(f"{m} layer {layer} expert {le}: scaling {float(sc[layer, 0 if le is None else le])}"
                           f" != {val}")
    return out


def _rank_run(rank: int, world: int, jobs: list[tuple[str, int | str, str, dict[str, str]]],
              device: str = "cpu") -> dict:
    """``device="cuda"``: the same on the GPU (tests/gpu/test_gpu_conformance.py), default LoRA backend
    there being the Triton kernels."""
    import torch.distributed as dist
    group = dist.group.WORLD if world > 1 else None
    res: dict[tuple[str, int], dict[str, Any]] = {}
    for fam, ep, base_dir, dirs in jobs:
        spec = ModelSpec.from_preset(PRESETS[fam])
        par = _parallel(world, rank, ep)
        model = TPModel.from_pretrained(base_dir, par, group, spec=spec, device=device)
        seqs = _seqs(spec.vocab_size)
        out: dict[str, Any] = {}
        cfg = dict(max_lora_rank=MAX_RANK, dtype="float32", device=device)
        # scenario 1: three adapters and "no adapter" in one batch
        with LoRAManager(LoRAConfig(max_loras=4, **cfg), spec, par, group=group) as mgr:
            for n in ("a1", "a2", "a3"):
                mgr.register(n, dirs[n])
            mgr.activate(["a1", "a2", "a3"])
            out["mixed"] = _forward(model, mgr, MIXED, seqs)
        # scenario 2: a smaller-rank adapter into a slot a larger-rank adapter used before
        with LoRAManager(LoRAConfig(max_loras=2, **cfg), spec, par, group=group) as mgr:
            for n in ("a2", "a1", "small"):
                mgr.register(n, dirs[n])
            before = mgr.activate(["a2", "a1"])
            out["before"] = _forward(model, mgr, REUSE_BEFORE, seqs)
            after = mgr.activate(["small"])
            out["slots"] = (before, after, mgr.pool.evictions, mgr.is_active("a2"))
            out["slot_problems"] = _slot_problems(mgr, "small")
            out["after"] = _forward(model, mgr, REUSE_AFTER, seqs)
        res[(fam, ep)] = out
    return res


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from support import peft_fixtures as pf
    pf.require_hf()
    root = tmp_path_factory.mktemp("conformance")
    out = {}
    for fam, preset in PRESETS.items():
        spec = ModelSpec.from_preset(preset)
        out[fam] = pf.build_family(spec, root / fam, _seqs(spec.vocab_size))
    return out


@pytest.fixture(scope="module")
def runs(families: dict[str, Any]) -> dict[int, list[dict]]:
    got: dict[int, list[dict]] = {}
    for world, layouts in LAYOUTS.items():
        jobs = [(fam, ep, families[fam].base_dir, families[fam].adapter_dirs) for fam, ep in layouts]
        got[world] = ([_rank_run(0, 1, jobs)] if world == 1
                      else run_distributed(_rank_run, world, jobs, timeout=240))
    return got


ALL = [(w, fam, ep) for w, ls in LAYOUTS.items() for fam, ep in ls]
IDS = [f"tp{w}-ep{ep}-{fam}" for w, fam, ep in ALL]


def _check(tag: str, fam: Any, reqs: tuple, logits: torch.Tensor) -> list[tuple[str, float, float]]:
    """Compare each request's rows with peft's logits; returns (adapter, max abs, max rel) per request."""
    rows, start, report = [], 0, []
    for a, i in reqs:
        ref = fam.ref[(a, i)]
        got = logits[start:start + ref.shape[0]]
        start += ref.shape[0]
        assert got.shape == ref.shape, (tag, a, got.shape, ref.shape)
        abs_err = float((got - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        rel_err = abs_err / float(ref.abs().max())
        report.append((str(a), abs_err, rel_err))
        rows.append(f"{a}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
        assert abs_err < TOL * scale, f"{tag} request {a!r} (seq {i}): max abs err {abs_err:.3e} > {TOL * scale:.1e}"
        if a is not None:   # the adapter changes this request's logits far beyond the tolerance
            assert float((ref - fam.ref[(None, i)]).abs().max()) > 1000 * TOL * scale, (tag, a)
    assert start == logits.shape[0]
    print(f"{tag}: " + "; ".join(rows))
    return report


def _same_on_every_rank(ranks: list[dict], key: tuple[str, int], what: str) -> torch.Tensor:
    first = ranks[0][key][what]
    for r, res in enumerate(ranks):
        assert torch.equal(res[key][what], first), f"rank {r} logits differ from rank 0 ({what})"
    return first


@pytest.mark.parametrize("world,fam,ep", ALL, ids=IDS)
def test_mixed_batch_matches_peft(runs: dict, families: dict, world: int, fam: str, ep: int) -> None:
    logits = _same_on_every_rank(runs[world], (fam, ep), "mixed")
    _check(f"tp{world} ep{ep} {fam} mixed", families[fam], MIXED, logits)


@pytest.mark.parametrize("world,fam,ep", ALL, ids=IDS)
def test_smaller_rank_into_used_slot_matches_peft(runs: dict, families: dict, world: int, fam: str,
                                                  ep: int) -> None:
    f = families[fam]
    assert f.ranks["small"] < f.ranks["a2"] == MAX_RANK
    before = _same_on_every_rank(runs[world], (fam, ep), "before")
    after = _same_on_every_rank(runs[world], (fam, ep), "after")
    _check(f"tp{world} ep{ep} {fam} reuse/before", f, REUSE_BEFORE, before)
    for r, res in enumerate(runs[world]):
        slots_before, slots_after, evictions, a2_active = res[(fam, ep)]["slots"]
        assert slots_after["small"] == slots_before["a2"], (r, slots_before, slots_after)
        assert evictions == 1 and not a2_active, r
        assert res[(fam, ep)]["slot_problems"] == [], f"rank {r}"
    _check(f"tp{world} ep{ep} {fam} reuse/after", f, REUSE_AFTER, after)


def test_adapters_really_differ(families: dict) -> None:
    """The fixture is not degenerate: the adapters give different logits on the same sequence."""
    for fam, f in families.items():
        names = [None, "a1", "a2", "a3", "small"]
        for x in names:
            for y in names:
                if x != y:
                    assert float((f.ref[(x, 0)] - f.ref[(y, 0)]).abs().max()) > 1e-2, (fam, x, y)

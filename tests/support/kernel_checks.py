"""Checks of the Triton backend against the torch path, shared by the interpreter tests (CPU,
``tests/test_kernels_interp.py``) and the GPU tests (``tests/gpu/test_kernels.py``).

Nothing here sets ``TRITON_INTERPRET``: the importing test module decides (the variable is read when the
kernels are decorated).

Tolerances (Triton vs the torch path, both on the same pool and activations):
* float32 activations and pool: both compute in float32 (Triton with IEEE products, no TF32); only the
  summation order differs: ``|diff| <= 1e-5 * (mag + 1)`` with ``mag = |out| + |s| |B| (|A| |x|)``.
* bf16: the torch path rounds x A^T, the product with B^T, the scaling and the sum to bf16 (4-5 roundings);
  the kernel rounds x A^T once to bf16 and the final sum once. Both are within 5u*mag of the exact value
  (u = 2^-8), so they differ by at most 10u*mag; we allow 12u*mag = 2^-4.4 * mag.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from test_ops import make_pool, ref_linear
from tp_lora.device.pool import GpuPool
from tp_lora.format.modules import EXPERT_MODULES
from tp_lora.ops.layer import LoRAOps, TorchBackend
from tp_lora.plan.model import ModelSpec
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.runtime.batch import BatchInfo, build_batch

U_BF16 = 2.0 ** -8


def tol_for(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    if dtype == torch.float32:
        return lambda mag: 1e-5 * (mag + 1.0)
    return lambda mag: 12 * U_BF16 * mag


def random_batch(rng: random.Random, num_slots: int, ranks: dict[int, int], device: str,
                 max_req: int = 7, max_len: int = 6) -> BatchInfo:
    """Random requests: random slots (some -1 = base only), random lengths (some 0)."""
    n = rng.randint(1, max_req)
    slots = [rng.choice([-1] + list(range(num_slots))) for _ in range(n)]
    lens = [rng.randint(0, max_len) for _ in range(n)]
    if sum(lens) == 0:
        lens[0] = 1
    names = [None if s < 0 else f"ad{s}" for s in slots]
    return build_batch(slots, names, lens, {s: ranks[s] for s in slots if s >= 0}, torch.device(device), None)


def _mag(pool: GpuPool, batch: BatchInfo, layer: int, module: str, x: torch.Tensor, out: torch.Tensor,
         **kw) -> torch.Tensor:
    return ref_linear(pool, batch, layer, module, x, out, **kw)[1]


def compare_dense(spec: ModelSpec, par: ParallelSpec, dtype: torch.dtype, device: str, seed: int,
                  trials: int = 3, max_len: int = 6) -> int:
    """Triton vs torch path on random mixed batches (requests of up to ``max_len`` tokens) for every dense
    module of layer 0..1 and lm_head; rows without adapter exactly unchanged. Returns the number of
    comparisons made."""
    from tp_lora.ops.triton_backend import TritonBackend   # lazily: the importer sets TRITON_INTERPRET
    rng = random.Random(seed)
    pool = make_pool(spec, par, dtype=dtype, device=device, seed=seed)
    ranks = {0: 8, 1: 3, 2: 5}
    tol = tol_for(dtype)
    done = 0
    for _ in range(trials):
        batch = random_batch(rng, pool.max_loras, ranks, device, max_len=max_len)
        T = batch.num_tokens
        ops_t, ops_k = LoRAOps(pool, batch, TorchBackend()), LoRAOps(pool, batch, TritonBackend())
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        for m, shape in pool.shapes.items():
            if m in EXPERT_MODULES or m == "embed":
                continue
            layer = rng.randrange(shape.layers)
            x = torch.randn(T, shape.a_shape[1], generator=g).to(device, dtype)
            out = torch.randn(T, shape.b_shape[0], generator=g).to(device, dtype)
            o_t, o_k = out.clone(), out.clone()
            ops_t.column(layer, m, x, o_t)
            ops_k.column(layer, m, x, o_k)
            mag = _mag(pool, batch, layer, m, x, out).to(device)
            err = (o_t.double() - o_k.double()).abs()
            assert bool((err <= tol(mag)).all()), f"{m} {dtype}: max diff {float(err.max()):.3e}"
            base = (batch.token_slots < 0)
            assert torch.equal(o_k[base], out[base]), f"{m}: base-only rows changed"
            done += 1
    return done


def compare_experts(spec: ModelSpec, par: ParallelSpec, dtype: torch.dtype, device: str, seed: int,
                    rows: int = 40) -> int:
    """The fused expert op (all local experts in one call) vs the torch path, random routing."""
    from tp_lora.ops.triton_backend import TritonBackend
    rng = random.Random(seed)
    pool = make_pool(spec, par, dtype=dtype, device=device, seed=seed)
    ranks = {0: 8, 1: 3, 2: 5}
    batch = random_batch(rng, pool.max_loras, ranks, device, max_req=8, max_len=8)
    T = batch.num_tokens
    local = par.local_experts(spec)
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, T, (rows,), generator=g)
    exp = torch.randint(local.start, local.stop, (rows,), generator=g)
    tol = tol_for(dtype)
    done = 0
    for m in EXPERT_MODULES:
        shape = pool.shapes[m]
        for layer in range(shape.layers):
            x = torch.randn(rows, shape.a_shape[1], generator=g).to(device, dtype)
            out = torch.randn(rows, shape.b_shape[0], generator=g).to(device, dtype)
            res = []
            for be in (TorchBackend(), TritonBackend()):
                ops = LoRAOps(pool, batch, be)
                o = out.clone()
                ops.experts_column(layer, m, x, ops.expert_routing(tok.to(device), exp.to(device)), o)
                res.append(o)
            # magnitude per row from its own expert (ref_linear reads one expert; loop over the experts)
            mag = torch.zeros(rows, shape.b_shape[0], dtype=torch.float64)
            for e in local:
                sel = (exp == e)
                if sel.any():
                    mag[sel] = _mag(pool, batch, layer, m, x[sel.to(device)], out[sel.to(device)],
                                    expert_le=e - local.start, token_index=tok[sel])
            err = (res[0].double() - res[1].double()).abs().cpu()
            assert bool((err <= tol(mag)).all()), f"{m} layer {layer}: max diff {float(err.max()):.3e}"
            base = (batch.token_slots.cpu()[tok] < 0).to(device)
            assert torch.equal(res[1][base], out[base])
            done += 1
    return done


def poison_rank_padding(pool: GpuPool, slot: int, rank: int) -> None:
    """NaN into slot ``slot``'s A rows / B columns at and above ``rank``: a kernel that computes on the
    padding above a smaller adapter's rank turns the slot's outputs into NaN."""
    for m in pool.modules:
        pool.A[m][slot][..., rank:, :] = float("nan")
        pool.B[m][slot][..., rank:] = float("nan")


def hostile_slot(pool: GpuPool, slot: int, kind: str) -> None:
    """Slot ``slot`` holds an adapter with extreme values: 'huge' (3e38, finite in bf16/fp32), 'inf'
    (1e6 * 3e38 overflows in any product) or 'nan'."""
    val = {"huge": 3e38, "inf": float("inf"), "nan": float("nan")}[kind]
    for m in pool.modules:
        pool.A[m][slot].fill_(val)
        pool.B[m][slot].fill_(val)
        pool.scaling[m][slot].fill_(1e6 if kind == "huge" else 1.0)


def isolation_trial(pool: GpuPool, backend_factory: Callable[[], object], rng: random.Random, device: str,
                    good_slots: list[int], bad_slots: list[int], ranks: dict[int, int],
                    row_independent: bool = True) -> None:
    """A random batch of good and hostile requests: every good request's rows equal bit for bit (a) the same
    batch with every other request moved to base-only or another slot and (b) the request alone; and they
    are finite. Dense (q, o, lm_head), embedding and the fused experts.

    ``row_independent`` (the kernels: fixed tiles) lets the swapped requests take the same slot and checks
    alone when the slot is shared; the torch path's per-slot GEMMs change shape then (a BLAS may round
    differently), so for it the other requests keep or avoid the slot and "alone" needs the slot used once.
    """
    n = rng.randint(2, 6)
    slots = [rng.choice(good_slots + bad_slots + [-1]) for _ in range(n)]
    if not any(s in good_slots for s in slots):
        slots[0] = good_slots[0]
    lens = [rng.randint(1, 5) for _ in range(n)]
    spec = pool.model
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    T = sum(lens)
    dt = pool.dtype
    xs = {m: torch.randn(T, pool.shapes[m].a_shape[1], generator=g).to(device, dt) for m in pool.shapes}
    outs = {m: torch.randn(T, pool.shapes[m].b_shape[0], generator=g).to(device, dt) for m in pool.shapes}
    ids = torch.randint(0, spec.vocab_size, (T,), generator=g).to(device)
    local = pool.parallel.local_experts(spec) if spec.is_moe else range(0)

    def run(req_slots: list[int], sel: list[int]) -> dict[str, torch.Tensor]:
        """Run the requests ``sel`` (indices) with slots ``req_slots``; rows are gathered from the full x."""
        rows = torch.cat([torch.arange(sum(lens[:i]), sum(lens[:i + 1])) for i in sel])
        batch = build_batch([req_slots[i] for i in sel], [None] * len(sel), [lens[i] for i in sel],
                            {s: ranks[s] for s in req_slots if s >= 0}, torch.device(device), None)
        ops = LoRAOps(pool, batch, backend_factory())
        res = {}
        r = rows.to(device)
        for m in ("q", "o", "lm_head"):
            if m in pool.shapes:
                o = outs[m][r].clone()
                ops.column(0, m, xs[m][r].contiguous(), o)
                res[m] = o
        if "embed" in pool.shapes:
            o = outs["embed"][r].clone()
            ops.embedding(ids[r].contiguous(), o)
            res["embed"] = o
        if "experts.w1" in pool.shapes:
            Tb = r.numel()
            tok = torch.arange(Tb, device=device).repeat_interleave(2)
            ex = torch.tensor([local.start + (int(t) * 3 + k) % len(local) for t in r for k in range(2)],
                              device=device)
            o = outs["experts.w1"][r].repeat_interleave(2, 0).clone()
            xe = xs["experts.w1"][r].repeat_interleave(2, 0).contiguous()
            ops.experts_column(0, "experts.w1", xe, ops.expert_routing(tok, ex), o)
            res["experts.w1"] = o.view(Tb, 2, -1)
        return res, rows

    full, rows_full = run(slots, list(range(n)))
    for i, s in enumerate(slots):
        if s not in good_slots:
            continue
        a, b = sum(lens[:i]), sum(lens[:i + 1])
        pick = good_slots + [-1] if row_independent else [x for x in good_slots + [-1] if x != s]
        others = [s if j == i else (s if slots[j] == s and not row_independent else rng.choice(pick))
                  for j in range(n)]
        swapped, _ = run(others, list(range(n)))
        check_alone = row_independent or slots.count(s) == 1
        alone = run(slots, [i])[0] if check_alone else None
        for m, t in full.items():
            mine = t[a:b]
            assert bool(torch.isfinite(mine).all()), f"{m}: request {i} (slot {s}) not finite in a hostile batch"
            assert torch.equal(mine, swapped[m][a:b]), f"{m}: request {i} depends on other requests' adapters"
            if alone is not None:
                assert torch.equal(mine, alone[m]), f"{m}: request {i} batched != alone"

"""Independent references for the runtime tests (pool / cache / pipeline / manager).

Nothing here uses ``tp_lora``'s reader, naming tables or planner: the expected slot contents are built
from the full tensors (``safetensors.torch.load_file``) and the TP reference (``tp_reference``), written out by
hand for the PEFT key layouts that ``write_synthetic_adapter`` produces. Tests compare the pool with
these, so a wrong slice, a wrong destination, a missing cast or a stray write shows up.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .tp_reference import RefRank, span



# --------------------------------------------------------------------------------------------------
# ownership: the one TP reference (tp_reference.RefRank; hand-written, no tp_lora.plan), as spans
# --------------------------------------------------------------------------------------------------
class Owner:
    def __init__(self, model: Any, tp: int, rank: int, ep: int = 1):
        ref = RefRank(model, tp, ep, rank)
        self.q_rows = span(ref.q_rows())
        self.kv_rows = span(ref.kv_rows())
        self.i_rows = span(ref.tp_split(model.intermediate_size))
        self.s_rows = span(ref.tp_split(model.shared_expert_intermediate_size))
        self.m_rows = span(ref.moe_split())
        self.experts = range(*span(ref.local_experts()))
        self.vocab = span(ref.vocab_rows())


_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(lora_A|lora_B)\.weight$")
_DENSE = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
          "self_attn.qkv_proj": "qkv", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
          "mlp.gate_up_proj": "gate_up", "mlp.shared_expert.gate_proj": "shared.gate",
          "mlp.shared_expert.up_proj": "shared.up", "mlp.shared_expert.down_proj": "shared.down"}
_EXPERT = {"gate_proj": "experts.w1", "up_proj": "experts.w3", "down_proj": "experts.w2",
           "w1": "experts.w1", "w3": "experts.w3", "w2": "experts.w2"}


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[tuple[str, int, int | None], dict[str, torch.Tensor]]:
    """(source module, layer, expert) -> {"A": tensor, "B": tensor}, from synthetic PEFT keys."""
    out: dict[tuple[str, int, int | None], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.endswith("embed_tokens.lora_embedding_A") or key.endswith("embed_tokens.lora_embedding_B"):
            out.setdefault(("embed", 0, None), {})[key[-1]] = t
            continue
        if re.search(r"(^|\.)lm_head\.lora_[AB]\.weight$", key):
            out.setdefault(("lm_head", 0, None), {})[key[-8]] = t
            continue
        m = _LAYER_RE.search(key)
        assert m, key
        layer, path, side = int(m.group(1)), m.group(2), m.group(3)[-1]
        if path in _DENSE:
            ident = (_DENSE[path], layer, None)
        elif path == "mlp.experts.base_layer":
            ident = ("fused.gate_up", layer, None)
        elif path == "mlp.experts":
            ident = ("fused.down", layer, None)
        else:
            em = re.fullmatch(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)", path)
            assert em, key
            ident = (_EXPERT[em.group(2)], layer, int(em.group(1)))
        out.setdefault(ident, {})[side] = t
    return out


def expected_slot(adapter_dir: str | os.PathLike[str], model: Any, tp: int, rank: int, ep: int,
                  pool: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """module -> (A, B, scaling) as one slot of ``pool`` must hold them (zeros where not written).

    Built from the full tensors and the TP table only; uses ``pool`` for nothing but buffer shapes and
    the dtype (the shapes themselves are checked against hand-computed numbers in test_pool.py).
    """
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    tensors = load_file(str(d / "adapter_model.safetensors"))
    own = Owner(model, tp, rank, ep)
    dt = pool.dtype
    exp = {m: (torch.zeros(pool.A[m].shape[1:], dtype=dt), torch.zeros(pool.B[m].shape[1:], dtype=dt),
               torch.zeros(pool.scaling[m].shape[1:], dtype=torch.float32)) for m in pool.shapes}
    alpha = float(cfg["lora_alpha"])
    E = model.num_experts

    def scale(r: int) -> float:
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def put(module: str, layer: int, le: int | None, a: torch.Tensor, b: torch.Tensor, r: int) -> None:
        assert module in exp, f"adapter targets {module} but the pool lacks it"
        A, B, S = exp[module]
        ia = (layer,) if le is None else (layer, le)
        A[ia][:a.shape[0], :a.shape[1]] = a.to(dt)
        B[ia][:b.shape[0], :b.shape[1]] = b.to(dt)
        S[layer, 0 if le is None else le] = scale(r)

    col = {"q": own.q_rows, "k": own.kv_rows, "v": own.kv_rows, "gate": own.i_rows, "up": own.i_rows,
           "shared.gate": own.s_rows, "shared.up": own.s_rows}
    rowp = {"o": own.q_rows, "down": own.i_rows, "shared.down": own.s_rows}
    q_size = model.num_attention_heads * model.head_dim
    kv_size = model.num_key_value_heads * model.head_dim
    for (mod, layer, expert), ab in _pairs(tensors).items():
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if mod in col:
            r0, r1 = col[mod]
            put(mod, layer, None, A, B[r0:r1], r)
        elif mod in rowp:
            c0, c1 = rowp[mod]
            put(mod, layer, None, A[:, c0:c1], B, r)
        elif mod == "qkv":
            (q0, q1), (k0, k1) = own.q_rows, own.kv_rows
            put("q", layer, None, A, B[q0:q1], r)
            put("k", layer, None, A, B[q_size + k0:q_size + k1], r)
            put("v", layer, None, A, B[q_size + kv_size + k0:q_size + kv_size + k1], r)
        elif mod == "gate_up":
            i0, i1 = own.i_rows
            put("gate", layer, None, A, B[i0:i1], r)
            put("up", layer, None, A, B[model.intermediate_size + i0:model.intermediate_size + i1], r)
        elif mod in ("experts.w1", "experts.w3", "experts.w2"):
            if expert not in own.experts:
                continue
            le = expert - own.experts.start
            m0, m1 = own.m_rows
            if mod == "experts.w2":
                put(mod, layer, le, A[:, m0:m1], B, r)
            else:
                put(mod, layer, le, A, B[m0:m1], r)
        elif mod == "fused.gate_up":  # A row e*r+j, B column j*E+e (PEFT ParamWrapper layout)
            r = A.shape[0] // E
            im = model.moe_intermediate_size
            m0, m1 = own.m_rows
            for e in own.experts:
                a, b = A[e * r:(e + 1) * r], B[:, e::E]
                put("experts.w1", layer, e - own.experts.start, a, b[m0:m1], r)
                put("experts.w3", layer, e - own.experts.start, a, b[im + m0:im + m1], r)
        elif mod == "fused.down":
            r = A.shape[0] // E
            m0, m1 = own.m_rows
            for e in own.experts:
                put("experts.w2", layer, e - own.experts.start, A[e * r:(e + 1) * r, m0:m1], B[:, e::E], r)
        elif mod == "embed":
            v0, v1 = own.vocab
            put("embed", 0, None, A[:, v0:v1], B, r)
        elif mod == "lm_head":
            v0, v1 = own.vocab
            put("lm_head", 0, None, A, B[v0:v1], r)
        else:  # pragma: no cover
            raise AssertionError(mod)
    return exp


def slot_diff(pool: Any, slot: int, expected: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[str]:
    """Where the slot differs from ``expected`` (bitwise); [] when identical."""
    bad = []
    for m in pool.shapes:
        a, b, s = expected[m]
        for side, got, want in (("A", pool.A[m][slot], a), ("B", pool.B[m][slot], b),
                                ("scaling", pool.scaling[m][slot], s)):
            got = got.detach().cpu()
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(
                    got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)):
                nz = (got.float() != want.float()).nonzero()
                bad.append(f"{m}.{side}: {nz.shape[0]} elements differ, first at {nz[:3].tolist()}")
    return bad


def slot_is_zero(pool: Any, slot: int) -> bool:
    return all(not pool.A[m][slot].any() and not pool.B[m][slot].any() and not pool.scaling[m][slot].any()
               for m in pool.shapes)


def delta(pool: Any, slot: int, x: torch.Tensor, modules: tuple[str, ...] = ("q", "o")) -> dict[str, torch.Tensor]:
    """A small LoRA delta computed by hand from the slot's buffers: s * (x @ A^T) @ B^T per layer."""
    out = {}
    for m in modules:
        if m not in pool.shapes:
            continue
        A, B, S = pool.A[m][slot].float().cpu(), pool.B[m][slot].float().cpu(), pool.scaling[m][slot].cpu()
        for layer in range(A.shape[0]):
            xin = x[:, :A.shape[-1]]
            out[f"{m}.{layer}"] = S[layer, 0] * (xin @ A[layer].T) @ B[layer].T
    return out


# --------------------------------------------------------------------------------------------------
# small helpers shared by the runtime tests
# --------------------------------------------------------------------------------------------------
ALL_DENSE = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")


def make_adapter(root: str | os.PathLike[str], name: str, preset: str, **kw: Any) -> Path:
    """A synthetic adapter ``root/name`` of a preset (written once per root/name)."""
    from tp_lora.plan.model import ModelSpec
    from tp_lora.job.synthetic import write_synthetic_adapter

    out = Path(root) / name
    if not (out / "adapter_model.safetensors").exists():
        write_synthetic_adapter(out, ModelSpec.from_preset(preset), **kw)
    return out


def new_manager(model: Any, tp: int = 1, rank: int = 0, ep: int = 1, *, group: Any = None, **cfg: Any):
    """The tests' one LoRAManager factory: ``model`` is a preset name or a ModelSpec; ``cfg`` LoRAConfig
    fields (small chunks, rank 8, 2 slots and float32 unless given)."""
    from tp_lora.runtime.manager import LoRAConfig, LoRAManager
    from tp_lora.plan.model import ModelSpec
    from tp_lora.plan.parallel import ParallelSpec

    cfg.setdefault("chunk_bytes", 4096)
    cfg.setdefault("max_lora_rank", 8)
    cfg.setdefault("max_loras", 2)
    cfg.setdefault("dtype", "float32")
    spec = ModelSpec.from_preset(model) if isinstance(model, str) else model
    return LoRAManager(LoRAConfig(**cfg), spec, ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep),
                       group=group)


class ReadRecorder:
    """Wraps os.preadv / os.pread, the reader's libc preadv (host/reader.py ``_PREADV``), its io_uring
    batches (``_RING_READV``: one entry per read of a batch), its C loop's parts (``_NATIVE_READ``: one
    entry per direct read) and the C batch's parts (at ``SliceReader.finish_batch``: one entry per direct
    read of each part read) to record
    (offset, length) of every read through them (the data path)."""

    def __init__(self, monkeypatch: Any):
        import numpy as np

        from tp_lora.host import reader
        from tp_lora.host.native import PENDING

        self.reads: list[tuple[int, int]] = []
        real_preadv, real_pread = os.preadv, os.pread
        real_libc = reader._PREADV

        if real_libc is not None:
            def libc_preadv(fd: int, iov: int, n: int, offset: int) -> int:
                got = real_libc(fd, iov, n, offset)
                self.reads.append((offset, got))
                return got

            monkeypatch.setattr(reader, "_PREADV", libc_preadv)

        real_ring = reader._RING_READV

        def ring_readv(ring: Any, fd: int, addr: Any, niov: Any, off: Any) -> Any:
            res = real_ring(ring, fd, addr, niov, off)
            self.reads.extend((int(o), int(n)) for o, n in zip(off, res))
            return res

        monkeypatch.setattr(reader, "_RING_READV", ring_readv)
        real_native = reader._NATIVE_READ

        def native_read(nat: Any, ring: Any, fd: int, tab: Any, *a: Any) -> int:
            bad = real_native(nat, ring, fd, tab, *a)
            self.reads.extend((int(o), int(n)) for o, n in zip(tab.direct_off, a[-1]))
            return bad

        monkeypatch.setattr(reader, "_NATIVE_READ", native_read)
        real_finish = reader.SliceReader.finish_batch

        def finish_batch(rd: Any, pb: Any) -> None:
            for i in np.flatnonzero(pb.batch.status != PENDING).tolist():
                t = pb.tables[i]
                self.reads.extend((int(o), int(n)) for o, n in zip(t.direct_off, t.direct_want))
            real_finish(rd, pb)

        monkeypatch.setattr(reader.SliceReader, "finish_batch", finish_batch)

        def preadv(fd: int, buffers: Any, offset: int, *a: Any) -> int:
            n = real_preadv(fd, buffers, offset, *a)
            self.reads.append((offset, n))
            return n

        def pread(fd: int, length: int, offset: int) -> bytes:
            b = real_pread(fd, length, offset)
            self.reads.append((offset, len(b)))
            return b

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "pread", pread)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.reads)


def poison_tensor(weights: str | os.PathLike[str], key_part: str = "layers.0.self_attn.q_proj.lora_A") -> str:
    """Overwrite the data of the first tensor whose key contains ``key_part`` with NaN bit patterns (valid
    for bf16, fp16 and fp32 alike); the header stays the same. A q_proj A is read in full by every rank."""
    import struct

    p = Path(weights)
    raw = bytearray(p.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    key = next(k for k in sorted(header) if key_part in k)
    s, e = header[key]["data_offsets"]
    raw[8 + hlen + s:8 + hlen + e] = b"\xc0\x7f" * ((e - s) // 2)
    keep_mtime(p, lambda: p.write_bytes(bytes(raw)))
    return key


def keep_mtime(path: str | os.PathLike[str], write: Any) -> None:
    """Run ``write`` (an in-place rewrite of ``path``) and put the file's mtime back: silent corruption
    (bit rot, a copy that preserves times) that the registration's identity check cannot see, so the
    data-level checks (NaN/Inf) are what catches it."""
    st = os.stat(path)
    write()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def batch_order(order: str) -> Any:
    """A stand-in for host/reader.py's ``_BATCH_ORDER``: the C batch takes parts "backwards" (last part
    first) or "interleaved" (every chunk's first part, then every chunk's second, ...: more chunks open
    at once than the loader has staging buffers), so they complete out of the load's order."""

    def perm(units: list) -> list[int]:
        idx = list(range(len(units)))
        if order == "backwards":
            return idx[::-1]
        rank: dict[int, int] = {}
        pos = []
        for i, (c, _) in enumerate(units):
            pos.append((rank.get(id(c), 0), i))
            rank[id(c)] = rank.get(id(c), 0) + 1
        return [i for _, i in sorted(pos)]

    return perm


def check_out_of_order_batch(adir: Any, monkeypatch: Any, preset: str, kw: dict, order: str, device: str) -> None:
    """A cold load whose parts complete in ``order`` (``batch_order``) lands the reference's slot
    (tests/test_native.py, tests/gpu)."""
    from tp_lora.host import reader

    path = make_adapter(adir, f"ooo-{preset}", preset, rank=8, dtype="bf16", seed=21, **kw)
    monkeypatch.setattr(reader, "_BATCH_ORDER", batch_order(order))
    opts = dict(tp=2, rank=1, max_loras=1, read_mode="exact", chunk_bytes=1 << 13, part_bytes=4096, device=device,
                read_workers=1 if order == "backwards" else 2)  # one thread: the completions in that order
    with new_manager(preset, **opts) as mgr:
        plan = mgr.register("a", path)
        chunks = mgr.engine.chunks(plan)
        assert len(chunks) > mgr.engine.STAGINGS and max(len(c.units()) for c in chunks) > 1
        mgr.activate("a")
        ls = mgr.stats().load_stats[-1]
        assert ls["batched"] and ls["native_parts"] > 0
        assert slot_diff(mgr.pool, 0, expected_slot(path, mgr.model, 2, 1, 1, mgr.pool)) == []

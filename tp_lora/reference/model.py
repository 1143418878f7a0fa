"""A small tensor- and expert-parallel transformer (dense Llama-style, Qwen-MoE/Mixtral-style MoE).

Not core: it exists so that tests and the demo can prove the LoRA layer ops right against Hugging Face
models under real TP/EP sharding. Plain tensors and one function per layer kind, so the TP rule of each
weight is readable next to the code that uses it.

TP rules (``RankLayout`` holds every range; nothing here re-derives ranks):

| weight | local part | after the matmul |
|---|---|---|
| q_proj | rows of ``heads`` | - |
| k_proj, v_proj | rows of ``kv_heads`` (one replicated head when tp > kv heads) | - |
| o_proj | columns of ``heads`` | LoRA ``row`` then all-reduce |
| gate/up_proj | rows ``shard(I, tp, tp_rank)`` | - |
| down_proj | columns of the same shard | LoRA ``row`` then all-reduce |
| embed_tokens | rows of ``vocab_range``, zero-padded to ``vocab_per_rank`` | LoRA ``embedding`` then all-reduce |
| lm_head | rows of ``vocab_range``, zero-padded | LoRA ``column`` then all-gather, trim to vocab |
| router (mlp.gate) | replicated | LoRA ``column`` (whole: the "experts" dimension is never split) |
| shared_expert_gate | replicated | LoRA ``column`` (whole) |
| experts w1/w3 | ``local_experts``; rows ``shard(I_moe, moe_tp, moe_tp_rank)`` | - |
| experts w2 | ``local_experts``; columns of the same shard | one all-reduce for the whole MoE block |
| experts, ``moe_replicated`` | every expert whole on every rank | not reduced (only the shared expert is) |
| shared expert | like gate/up/down over the full TP group | the same MoE all-reduce |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import ConfigError, LayoutError
from ..plan.model import ModelSpec
from ..plan.layout import RankLayout
from ..plan.parallel import ParallelSpec
from .checkpoint import FUSED_EXPERTS, PER_EXPERT_NAMES, CheckpointReader, Span, moe_layout


class LoRALayerOps(Protocol):
    """The layer-op contract of ``docs/ARCHITECTURE.md`` as the reference model calls it.

    Every method adds in place into ``out`` (a contiguous tensor the model keeps using); none returns.
    An object that also has ``expert_routing`` / ``experts_column`` / ``experts_row`` (``LoRAOps`` does)
    gets one call per expert projection for all local experts of a layer instead of one per expert.
    """

    def column(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None: ...

    def row(self, layer: int, module: str, x_local: torch.Tensor, out: torch.Tensor) -> None: ...

    def embedding(self, token_ids: torch.Tensor, out: torch.Tensor) -> None: ...

    def expert_column(self, layer: int, module: str, expert: int, x: torch.Tensor,
                      token_index: torch.Tensor, out: torch.Tensor) -> None: ...

    def expert_row(self, layer: int, module: str, expert: int, x: torch.Tensor,
                   token_index: torch.Tensor, out: torch.Tensor) -> None: ...


@dataclass
class _Linear:
    weight: torch.Tensor                 # local [out, in]
    bias: torch.Tensor | None = None     # column: local rows; row: full, added after the all-reduce


@dataclass
class _Attention:
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


@dataclass
class _MLP:
    gate: _Linear
    up: _Linear
    down: _Linear


@dataclass
class _MoE:
    router: torch.Tensor                 # [E, hidden], replicated
    w1: torch.Tensor                     # [E_local, I_moe/moe_tp, hidden]
    w3: torch.Tensor                     # [E_local, I_moe/moe_tp, hidden]
    w2: torch.Tensor                     # [E_local, hidden, I_moe/moe_tp]
    shared: _MLP | None
    shared_gate: torch.Tensor | None     # [1, hidden], replicated


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: _Attention
    mlp: _MLP | None
    moe: _MoE | None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF: normalise in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _span(r: range, scale: int = 1) -> Span:
    return r.start * scale, r.stop * scale


class TPModel:
    """One rank of a TP (and EP) decoder-only transformer, built from a ``ModelSpec``.

    Weights are allocated (zeros) at their local shapes here; ``load_hf_weights`` fills them from a
    ``save_pretrained`` folder reading only this rank's slices. ``group`` is the TP process group; with
    ``tp_size == 1`` it may be None and no collective is issued.
    """

    def __init__(self, spec: ModelSpec, parallel: ParallelSpec | RankLayout,
                 group: dist.ProcessGroup | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.layout = RankLayout.of(spec, parallel)  # validated once
        parallel = self.layout.parallel
        if group is None and parallel.tp_size > 1:
            raise LayoutError(f"tp_size={parallel.tp_size} needs a process group; pass group= (e.g. "
                              f"torch.distributed.group.WORLD)")
        if group is not None:
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            if (size, rank) != (parallel.tp_size, parallel.tp_rank):
                raise LayoutError(f"process group has size {size}, this rank {rank}; the ParallelSpec says "
                                  f"tp_size={parallel.tp_size}, tp_rank={parallel.tp_rank}")
        self.spec, self.parallel, self.group = spec, parallel, group
        self.dtype, self.device = dtype, torch.device(device)
        lay = self.layout
        self.heads, self.kv_heads, self.local_experts = lay.heads, lay.kv_heads, lay.local_experts
        self.vocab_range, self.vocab_per_rank = lay.vocab_range, lay.vocab_per_rank
        # local kv head of each local q head (GQA): global q head h reads global kv head h // group
        group_size = spec.num_attention_heads // spec.num_key_value_heads
        self._kv_of_q = torch.tensor([h // group_size - self.kv_heads.start for h in self.heads],
                                     device=self.device)
        assert all(0 <= int(i) < len(self.kv_heads) for i in self._kv_of_q), "kv_heads_range misses a q head"

        z = lambda *shape: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        h, hd = spec.hidden_size, spec.head_dim
        nq, nkv = len(self.heads) * hd, len(self.kv_heads) * hd

        def mlp(width: int, parts: int) -> _MLP:
            w = width // parts
            return _MLP(gate=_Linear(z(w, h)), up=_Linear(z(w, h)), down=_Linear(z(h, w)))

        self.embed = z(self.vocab_per_rank, h)
        self.lm_head = self.embed if spec.tie_word_embeddings else z(self.vocab_per_rank, h)
        self.norm = z(h)
        self.layers: list[_Layer] = []
        for i in range(spec.num_hidden_layers):
            attn = _Attention(q=_Linear(z(nq, h)), k=_Linear(z(nkv, h)), v=_Linear(z(nkv, h)),
                              o=_Linear(z(h, nq)), q_norm=z(hd) if spec.qk_norm else None,
                              k_norm=z(hd) if spec.qk_norm else None)
            moe = None
            dense = None
            if spec.is_moe_layer(i):
                el, im = len(self.local_experts), spec.moe_intermediate_size // parallel.moe_tp_size
                shared = (mlp(spec.shared_expert_intermediate_size, parallel.tp_size)
                          if spec.has_shared_expert(i) else None)
                moe = _MoE(router=z(spec.num_experts, h), w1=z(el, im, h), w3=z(el, im, h), w2=z(el, h, im),
                           shared=shared, shared_gate=z(1, h) if shared is not None else None)
            else:
                dense = mlp(spec.intermediate_size, parallel.tp_size)
            self.layers.append(_Layer(input_norm=z(h), post_norm=z(h), attn=attn, mlp=dense, moe=moe))
        # RoPE inverse frequencies, as HF's default rotary embedding (float32)
        self._inv_freq = 1.0 / (spec.rope_theta ** (
            torch.arange(0, hd, 2, dtype=torch.float32, device=self.device) / hd))

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], parallel: ParallelSpec,
                        group: dist.ProcessGroup | None = None, *, spec: ModelSpec | None = None,
                        dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "TPModel":
        """Build from a ``save_pretrained`` folder; ``spec`` defaults to the folder's ``config.json``."""
        if spec is None:
            spec = ModelSpec.from_hf_config(folder)
        model = cls(spec, parallel, group, dtype=dtype, device=device)
        model.load_hf_weights(folder)
        return model

    @torch.no_grad()
    def load_hf_weights(self, folder: str | os.PathLike[str]) -> None:
        """Copy this rank's slices of the HF checkpoint in ``folder`` into the local weights."""
        with CheckpointReader(folder) as r:
            self._load(r)

    def _put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # dst may be longer than src (vocab padding): the tail stays zero
        assert dst.shape[1:] == src.shape[1:] and dst.shape[0] >= src.shape[0], (dst.shape, src.shape)
        dst[: src.shape[0]].copy_(src)

    def _load_column(self, r: CheckpointReader, lin: _Linear, name: str, full: tuple[int, int],
                     rows: Span) -> None:
        self._put(lin.weight, r.read(name + ".weight", full, rows=rows))
        if r.has(name + ".bias"):
            lin.bias = r.read(name + ".bias", (full[0],), rows=rows).to(self.dtype).to(self.device)

    def _load_row(self, r: CheckpointReader, lin: _Linear, name: str, full: tuple[int, int],
                  cols: Span) -> None:
        self._put(lin.weight, r.read(name + ".weight", full, cols=cols))
        if r.has(name + ".bias"):
            lin.bias = r.read(name + ".bias", (full[0],)).to(self.dtype).to(self.device)

    def _load_mlp(self, r: CheckpointReader, m: _MLP, prefix: str, width: int, parts: int, index: int) -> None:
        h = self.spec.hidden_size
        shard = self.parallel.shard(width, parts, index)
        self._load_column(r, m.gate, prefix + "gate_proj", (width, h), shard)
        self._load_column(r, m.up, prefix + "up_proj", (width, h), shard)
        self._load_row(r, m.down, prefix + "down_proj", (h, width), shard)

    def _load(self, r: CheckpointReader) -> None:
        s, p = self.spec, self.parallel
        h, hd, v = s.hidden_size, s.head_dim, s.vocab_size
        vocab_rows = self.vocab_range
        self._put(self.embed, r.read("model.embed_tokens.weight", (v, h), rows=vocab_rows))
        if not s.tie_word_embeddings:
            self._put(self.lm_head, r.read("lm_head.weight", (v, h), rows=vocab_rows))
        self.norm.copy_(r.read("model.norm.weight", (h,)))
        q_rows, kv_rows = _span(self.heads, hd), _span(self.kv_heads, hd)
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}."
            layer.input_norm.copy_(r.read(pre + "input_layernorm.weight", (h,)))
            layer.post_norm.copy_(r.read(pre + "post_attention_layernorm.weight", (h,)))
            a = layer.attn
            self._load_column(r, a.q, pre + "self_attn.q_proj", (s.q_size, h), q_rows)
            self._load_column(r, a.k, pre + "self_attn.k_proj", (s.kv_size, h), kv_rows)
            self._load_column(r, a.v, pre + "self_attn.v_proj", (s.kv_size, h), kv_rows)
            self._load_row(r, a.o, pre + "self_attn.o_proj", (h, s.q_size), q_rows)
            if s.qk_norm:
                a.q_norm.copy_(r.read(pre + "self_attn.q_norm.weight", (hd,)))
                a.k_norm.copy_(r.read(pre + "self_attn.k_norm.weight", (hd,)))
            if layer.mlp is not None:
                self._load_mlp(r, layer.mlp, pre + "mlp.", s.intermediate_size, p.tp_size, p.tp_rank)
            if layer.moe is not None:
                self._load_moe(r, i, layer.moe)

    def _load_moe(self, r: CheckpointReader, i: int, m: _MoE) -> None:
        s, p = self.spec, self.parallel
        h, im, n = s.hidden_size, s.moe_intermediate_size, s.num_experts
        pre, layout = moe_layout(r, i)
        m.router.copy_(r.read(pre + "gate.weight", (n, h)))
        a, b = p.shard(im, p.moe_tp_size, p.moe_tp_rank)
        for j, e in enumerate(self.local_experts):
            if layout == "fused":
                gate_up, down = (t.format(p=pre) for t in FUSED_EXPERTS)
                m.w1[j].copy_(r.read(gate_up, (n, 2 * im, h), index=e, rows=(a, b)))
                m.w3[j].copy_(r.read(gate_up, (n, 2 * im, h), index=e, rows=(im + a, im + b)))
                m.w2[j].copy_(r.read(down, (n, h, im), index=e, cols=(a, b)))
            else:
                w1, w3, w2 = (t.format(p=pre, e=e) for t in PER_EXPERT_NAMES[layout])
                m.w1[j].copy_(r.read(w1, (im, h), rows=(a, b)))
                m.w3[j].copy_(r.read(w3, (im, h), rows=(a, b)))
                m.w2[j].copy_(r.read(w2, (h, im), cols=(a, b)))
        if m.shared is not None:
            self._load_mlp(r, m.shared, pre + "shared_expert.", s.shared_expert_intermediate_size,
                           p.tp_size, p.tp_rank)
            m.shared_gate.copy_(r.read(pre + "shared_expert_gate.weight", (1, h)))
        elif r.has(pre + "shared_expert_gate.weight"):
            raise ConfigError(f"{r.folder}: layer {i} has a shared expert but the model spec says "
                              f"shared_expert_intermediate_size=0")

    # -- collectives ---------------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def _gather_vocab(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            parts = [torch.empty_like(t) for _ in range(self.parallel.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            t = torch.cat(parts, dim=-1)
        return t[:, : self.spec.vocab_size]

    # -- forward -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_lens: Sequence[int] | torch.Tensor, lora: LoRALayerOps | None = None) -> torch.Tensor:
        """Logits ``[T, vocab_size]`` of a flattened batch: ``input_ids``, ``positions`` are ``[T]``.

        ``seq_lens`` (summing to T) splits the batch into sequences; attention is causal within each
        sequence only. ``positions`` feed RoPE only. ``lora`` (the layer-op contract) adds adapter deltas.
        """
        s = self.spec
        input_ids = input_ids.to(self.device)
        positions = positions.to(self.device)
        lens = torch.as_tensor(seq_lens, dtype=torch.long, device=self.device)
        T = input_ids.shape[0]
        if input_ids.dim() != 1 or positions.shape != input_ids.shape or int(lens.sum()) != T:
            raise ValueError(f"input_ids {list(input_ids.shape)} and positions {list(positions.shape)} must be "
                             f"[T] with T = sum(seq_lens) = {int(lens.sum())}")
        # attention runs per sequence (host-known bounds): nothing of one sequence, a NaN included, can
        # reach another's rows (a batched masked softmax would multiply it by 0)
        bounds, pos = [], 0
        for n in lens.tolist():
            bounds.append((pos, pos + n))
            pos += n
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

        x = self._embed(input_ids, lora)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer.attn, _rms_norm(x, layer.input_norm, s.rms_norm_eps),
                                    cos, sin, bounds, lora)
            hn = _rms_norm(x, layer.post_norm, s.rms_norm_eps)
            if layer.moe is not None:
                x = x + self._moe(i, layer.moe, hn, lora)
            else:
                x = x + self._mlp(i, layer.mlp, hn, lora, "")
        x = _rms_norm(x, self.norm, s.rms_norm_eps)
        logits = F.linear(x, self.lm_head)                              # [T, vocab_per_rank]
        if lora is not None:
            lora.column(0, "lm_head", x, logits)
        return self._gather_vocab(logits)

    __call__ = forward

    def _embed(self, ids: torch.Tensor, lora: LoRALayerOps | None) -> torch.Tensor:
        start, end = self.vocab_range
        outside = (ids < start) | (ids >= end)
        local = torch.where(outside, 0, ids - start)
        out = self.embed[local]                                         # [T, hidden]
        out[outside] = 0
        if lora is not None:
            lora.embedding(ids, out)
        return self._all_reduce(out)

    def _attention(self, i: int, a: _Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   bounds: list[tuple[int, int]], lora: LoRALayerOps | None) -> torch.Tensor:
        T, hd = x.shape[0], self.spec.head_dim
        q = F.linear(x, a.q.weight, a.q.bias)                           # [T, heads_local*hd]
        k = F.linear(x, a.k.weight, a.k.bias)                           # [T, kv_heads_local*hd]
        v = F.linear(x, a.v.weight, a.v.bias)
        if lora is not None:
            lora.column(i, "q", x, q)
            lora.column(i, "k", x, k)
            lora.column(i, "v", x, v)
        q, k, v = q.view(T, -1, hd), k.view(T, -1, hd), v.view(T, -1, hd)
        if a.q_norm is not None:
            q = _rms_norm(q, a.q_norm, self.spec.rms_norm_eps)
            k = _rms_norm(k, a.k_norm, self.spec.rms_norm_eps)
        c, sn = cos[:, None, :], sin[:, None, :]
        q = q * c + _rotate_half(q) * sn
        k = k * c + _rotate_half(k) * sn
        k, v = k[:, self._kv_of_q], v[:, self._kv_of_q]                 # [T, heads_local, hd]
        attn = torch.empty_like(q)
        for a0, a1 in bounds:
            n = a1 - a0
            if n == 0:
                continue
            causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            scores = torch.einsum("qhd,khd->hqk", q[a0:a1], k[a0:a1]) * hd ** -0.5
            scores = scores.masked_fill(~causal, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)
            attn[a0:a1] = torch.einsum("hqk,khd->qhd", probs, v[a0:a1])
        attn = attn.reshape(T, -1)                                      # [T, heads_local*hd]
        out = F.linear(attn, a.o.weight)                                # partial [T, hidden]
        if lora is not None:
            lora.row(i, "o", attn, out)
        self._all_reduce(out)
        return out if a.o.bias is None else out + a.o.bias

    def _mlp_partial(self, i: int, m: _MLP, x: torch.Tensor, lora: LoRALayerOps | None,
                     prefix: str) -> torch.Tensor:
        gate = F.linear(x, m.gate.weight, m.gate.bias)                  # [T, I/tp]
        up = F.linear(x, m.up.weight, m.up.bias)
        if lora is not None:
            lora.column(i, prefix + "gate", x, gate)
            lora.column(i, prefix + "up", x, up)
        hid = F.silu(gate) * up
        out = F.linear(hid, m.down.weight)                              # partial [T, hidden]
        if lora is not None:
            lora.row(i, prefix + "down", hid, out)
        return out

    def _mlp(self, i: int, m: _MLP, x: torch.Tensor, lora: LoRALayerOps | None, prefix: str) -> torch.Tensor:
        out = self._all_reduce(self._mlp_partial(i, m, x, lora, prefix))
        return out if m.down.bias is None else out + m.down.bias

    def _moe(self, i: int, m: _MoE, x: torch.Tensor, lora: LoRALayerOps | None) -> torch.Tensor:
        s = self.spec
        logits = F.linear(x, m.router)                                             # [T, E], replicated
        if lora is not None:
            lora.column(i, "router", x, logits)      # the whole delta on every rank (dimension never split)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)                 # [T, E]
        top_w, top_e = torch.topk(probs, s.num_experts_per_tok, dim=-1)            # [T, k]
        if s.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(self.dtype)
        out = torch.zeros_like(x)
        if lora is not None and hasattr(lora, "experts_column"):
            self._moe_fused(i, m, x, top_w, top_e, lora, out)
        else:
            for j, e in enumerate(self.local_experts):
                token_index, slot = torch.where(top_e == e)
                if token_index.numel() == 0:
                    continue
                xe = x[token_index]                                     # [n, hidden]
                g = F.linear(xe, m.w1[j])                               # [n, I_moe/moe_tp]
                u = F.linear(xe, m.w3[j])
                if lora is not None:
                    lora.expert_column(i, "experts.w1", e, xe, token_index, g)
                    lora.expert_column(i, "experts.w3", e, xe, token_index, u)
                he = F.silu(g) * u
                y = F.linear(he, m.w2[j])                               # partial [n, hidden]
                if lora is not None:
                    lora.expert_row(i, "experts.w2", e, he, token_index, y)
                out.index_add_(0, token_index, y * top_w[token_index, slot, None])
        routed = None
        if self.parallel.moe_replicated:   # every rank computed every expert whole: nothing to sum
            routed, out = out, torch.zeros_like(x)
        if m.shared is not None:
            shared = self._mlp_partial(i, m.shared, x, lora, "shared.")
            if m.shared.down.bias is not None and self.parallel.tp_rank == 0:
                shared += m.shared.down.bias   # once, before the gate, as HF's shared_expert(x)
            # the sigmoid gate is a per-token scalar, so it commutes with the all-reduce's sum
            gate = F.linear(x, m.shared_gate)                                      # [T, 1], replicated
            if lora is not None:
                lora.column(i, "shared_gate", x, gate)
            out += torch.sigmoid(gate) * shared
        # one all-reduce covers EP (other ranks' experts), MoE-TP (other shards) and the shared expert
        out = self._all_reduce(out)
        return out if routed is None else out + routed

    def _moe_fused(self, i: int, m: _MoE, x: torch.Tensor, top_w: torch.Tensor, top_e: torch.Tensor,
                   lora: LoRALayerOps, out: torch.Tensor) -> None:
        """The routed experts with the LoRA of all local experts of the layer in one call per projection
        (``experts_column`` / ``experts_row`` of ``LoRAOps``): rows grouped by expert, as a fused-MoE
        engine holds them; the base GEMMs stay per expert (this is the reference, not an engine)."""
        tok, slot, exp, spans, pos = [], [], [], [], 0
        for e in self.local_experts:
            token_index, s = torch.where(top_e == e)
            tok.append(token_index)
            slot.append(s)
            exp.append(torch.full_like(token_index, e))
            spans.append((pos, pos + token_index.numel()))
            pos += token_index.numel()
        if pos == 0:
            return
        tok_all, slot_all, exp_all = torch.cat(tok), torch.cat(slot), torch.cat(exp)
        xr = x[tok_all]                                                 # [N, hidden]
        im = m.w1.shape[1]
        g = torch.empty(pos, im, dtype=x.dtype, device=x.device)
        u = torch.empty_like(g)
        for j, (a, b) in enumerate(spans):
            g[a:b] = F.linear(xr[a:b], m.w1[j])
            u[a:b] = F.linear(xr[a:b], m.w3[j])
        routing = lora.expert_routing(tok_all, exp_all)
        lora.experts_column(i, "experts.w1", xr, routing, g)
        lora.experts_column(i, "experts.w3", xr, routing, u)
        he = F.silu(g) * u
        y = torch.empty(pos, x.shape[1], dtype=x.dtype, device=x.device)
        for j, (a, b) in enumerate(spans):
            y[a:b] = F.linear(he[a:b], m.w2[j])
        lora.experts_row(i, "experts.w2", he, routing, y)
        out.index_add_(0, tok_all, y * top_w[tok_all, slot_all, None])

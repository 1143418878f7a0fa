"""The one independent reference of the TP ownership rule for the tests (planner, pool, runtime).

Written from the ModelSpec numbers only, element by element (``g // per == rank``), never calling
``tp_lora.plan`` code: attention heads split over TP (kv heads split when tp <= kv heads, else head
``rank // (tp / kv)`` replicated), dense / shared MLP widths split over TP, MoE widths split over MoE-TP
(``tp // ep``), contiguous expert blocks per EP group, vLLM/SGLang vocab padding to 64 then an even split.
The rules as a table: docs/ARCHITECTURE.md ("TP rules").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

VOCAB_PAD = 64  # vLLM / SGLang DEFAULT_VOCAB_PADDING_SIZE


@dataclasses.dataclass(frozen=True)
class RefRank:
    model: Any  # tp_lora.plan.model.ModelSpec
    tp: int
    ep: int
    rank: int
    replicated: bool = False  # every expert whole on every rank (transformers >= 5.25's default)

    @property
    def moe_tp(self) -> int:
        return 1 if self.replicated else self.tp // self.ep

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp

    def q_rows(self) -> list[int]:
        """Global rows of q (and columns of o's input) of this rank's attention heads."""
        m = self.model
        heads_per_rank = m.num_attention_heads // self.tp
        return [g for g in range(m.q_size) if (g // m.head_dim) // heads_per_rank == self.rank]

    def kv_rows(self) -> list[int]:
        """k/v rows: kv heads split when tp <= kv heads, else head ``rank // (tp / kv)`` replicated."""
        m = self.model
        kv = m.num_key_value_heads
        if self.tp <= kv:
            owner = lambda head: head // (kv // self.tp)  # noqa: E731
        else:
            owner = lambda head: head  # noqa: E731
        want = self.rank if self.tp <= kv else self.rank // (self.tp // kv)
        return [g for g in range(m.kv_size) if owner(g // m.head_dim) == want]

    def split(self, n: int, parts: int, index: int) -> list[int]:
        return [g for g in range(n) if g // (n // parts) == index]

    def tp_split(self, n: int) -> list[int]:
        return self.split(n, self.tp, self.rank)

    def moe_split(self) -> list[int]:
        return self.split(self.model.moe_intermediate_size, self.moe_tp, self.moe_tp_rank)

    def vocab_rows(self) -> list[int]:
        """vLLM/SGLang VocabParallelEmbedding: pad the vocab to a multiple of 64, split evenly."""
        v = self.model.vocab_size
        padded = math.ceil(v / VOCAB_PAD) * VOCAB_PAD
        per = padded // self.tp
        return [g for g in range(v) if g // per == self.rank]

    def local_experts(self) -> list[int]:
        """Expert group ``rank // moe_tp`` holds the contiguous block of E/ep experts."""
        e_all = self.model.num_experts
        if self.replicated:
            return list(range(e_all))
        group = self.rank // self.moe_tp
        return [e for e in range(e_all) if e // (e_all // self.ep) == group]


def span(indices: list[int]) -> tuple[int, int]:
    """[start, stop) of a contiguous run of owned indices ((0, 0) when nothing is owned)."""
    if not indices:
        return 0, 0
    lo, hi = indices[0], indices[-1] + 1
    assert indices == list(range(lo, hi)), "ownership is not contiguous"
    return lo, hi

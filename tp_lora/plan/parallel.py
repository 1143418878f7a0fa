"""ParallelSpec: where one rank sits in the TP/EP layout, and the rules of which part of each tensor it owns.

The rules are written once, here; ``plan/layout.py``'s ``RankLayout`` applies them to a ModelSpec once
(validating it) and everything downstream reads the layout's ranges instead of re-deriving ranks.
EP sits inside the TP group as in SGLang: ``moe_tp_size = tp_size // ep_size``; rank ``tp_rank`` serves
expert group ``ep_rank = tp_rank // moe_tp_size`` and MoE-TP shard ``moe_tp_rank = tp_rank % moe_tp_size``.
Experts are placed in contiguous blocks: expert group g holds experts ``[g*E/ep, (g+1)*E/ep)``.
With ``moe_replicated`` (transformers' default from 5.25) every rank holds every expert whole:
``moe_tp_size`` is 1 and nothing of an expert is split.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LayoutError
from .model import ModelSpec


@dataclass(frozen=True, kw_only=True)
class ParallelSpec:
    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    """Expert-parallel degree inside the TP group (1: every rank holds every expert, MoE-TP = TP)."""
    ep_rank: int | None = None
    """Derived from tp_rank when None; when given it must match ``tp_rank // moe_tp_size``."""
    moe_replicated: bool = False
    """Every rank holds every routed expert whole (gate/up rows and down columns unsharded) and computes
    their full output, with no reduction after them: transformers >= 5.25 under ``tp_plan="auto"``. The
    expert LoRA is then planned whole on every rank (``moe_tp_size`` 1); attention, dense MLPs and the
    shared expert stay TP-sharded. Needs ``ep_size == 1``."""
    vocab_pad_to: int = 64
    """Vocab-parallel layers pad the vocabulary to a multiple of ``vocab_pad_to`` and split the padded size
    evenly over the TP ranks (as vLLM/SGLang ``VocabParallelEmbedding``: ``pad_vocab_size(V, 64) / tp``)."""

    def __post_init__(self) -> None:
        for f in ("tp_size", "ep_size", "vocab_pad_to"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LayoutError(f"{f} must be an integer >= 1, got {v!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(f"tp_rank={self.tp_rank!r} is outside [0, tp_size={self.tp_size})")
        if self.tp_size % self.ep_size:
            raise LayoutError(f"ep_size={self.ep_size} does not divide tp_size={self.tp_size} "
                              f"(EP sits inside the TP group)")
        if not isinstance(self.moe_replicated, bool):
            raise LayoutError(f"moe_replicated must be a bool, got {self.moe_replicated!r}")
        if self.moe_replicated and self.ep_size != 1:
            raise LayoutError(f"moe_replicated=True with ep_size={self.ep_size}: replicated experts are on every "
                              f"rank, expert parallelism splits them (one or the other)")
        derived = self.tp_rank // (self.tp_size // self.ep_size)
        if self.ep_rank is None:
            object.__setattr__(self, "ep_rank", derived)
        elif self.ep_rank != derived:
            raise LayoutError(f"ep_rank={self.ep_rank} does not match tp_rank={self.tp_rank}: with "
                              f"tp_size={self.tp_size}, ep_size={self.ep_size} it must be {derived}")

    @property
    def moe_tp_size(self) -> int:
        """Ranks that split one routed expert (1 when the experts are replicated)."""
        return 1 if self.moe_replicated else self.tp_size // self.ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank % self.moe_tp_size

    def for_rank(self, tp_rank: int) -> "ParallelSpec":
        return ParallelSpec(tp_size=self.tp_size, tp_rank=tp_rank, ep_size=self.ep_size,
                            moe_replicated=self.moe_replicated, vocab_pad_to=self.vocab_pad_to)

    def all_ranks(self) -> list["ParallelSpec"]:
        return [self.for_rank(r) for r in range(self.tp_size)]

    # -- validation against a model ------------------------------------------------------------
    def validate(self, model: ModelSpec) -> None:
        """Raise LayoutError naming the numbers that do not divide."""
        tp = self.tp_size
        problems = []
        if model.num_attention_heads % tp:
            problems.append(f"num_attention_heads={model.num_attention_heads} is not divisible by "
                            f"tp_size={tp}")
        kv = model.num_key_value_heads
        if kv % tp and tp % kv:
            problems.append(f"num_key_value_heads={kv} and tp_size={tp}: one must divide the other "
                            f"(kv heads are split when tp <= kv, replicated when tp > kv)")
        if model.intermediate_size % tp:
            problems.append(f"intermediate_size={model.intermediate_size} is not divisible by tp_size={tp}")
        if model.is_moe:
            if model.num_experts % self.ep_size:
                problems.append(f"num_experts={model.num_experts} is not divisible by ep_size="
                                f"{self.ep_size}")
            if model.moe_intermediate_size % self.moe_tp_size:
                problems.append(f"moe_intermediate_size={model.moe_intermediate_size} is not divisible by "
                                f"moe_tp_size={self.moe_tp_size} (tp_size={tp} / ep_size={self.ep_size})")
            if model.shared_expert_intermediate_size % tp:
                problems.append(f"shared_expert_intermediate_size={model.shared_expert_intermediate_size}"
                                f" is not divisible by tp_size={tp}")
        elif self.ep_size != 1:
            problems.append(f"ep_size={self.ep_size} > 1 for dense model {model.name!r}")
        elif self.moe_replicated:
            problems.append(f"moe_replicated=True for dense model {model.name!r}")
        if problems:
            raise LayoutError(f"illegal layout for model {model.name!r} (tp_size={tp}, "
                              f"ep_size={self.ep_size}): " + "; ".join(problems))

    # -- ownership (pure) -----------------------------------------------------------------------
    def local_experts(self, model: ModelSpec) -> range:
        per = model.num_experts // self.ep_size
        return range(self.ep_rank * per, (self.ep_rank + 1) * per)

    def heads_range(self, model: ModelSpec) -> range:
        per = model.num_attention_heads // self.tp_size
        return range(self.tp_rank * per, (self.tp_rank + 1) * per)

    def kv_heads_range(self, model: ModelSpec) -> range:
        kv, tp = model.num_key_value_heads, self.tp_size
        if tp <= kv:
            per = kv // tp
            return range(self.tp_rank * per, (self.tp_rank + 1) * per)
        replicas = tp // kv
        h = self.tp_rank // replicas
        return range(h, h + 1)

    def shard(self, size: int, parts: int, index: int) -> tuple[int, int]:
        per = size // parts
        return index * per, (index + 1) * per

    def vocab_per_rank(self, model: ModelSpec) -> int:
        padded = -(-model.vocab_size // self.vocab_pad_to) * self.vocab_pad_to
        return -(-padded // self.tp_size)  # vLLM/SGLang require tp | padded; round up when it does not

    def vocab_range(self, model: ModelSpec) -> tuple[int, int]:
        """[start, end) of real vocabulary rows this rank holds; may be empty for the last ranks."""
        per = self.vocab_per_rank(model)
        start = min(self.tp_rank * per, model.vocab_size)
        end = min(start + per, model.vocab_size)
        return start, end

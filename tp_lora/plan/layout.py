"""RankLayout: one rank's place in the TP/EP layout of one model, validated and derived once.

``ParallelSpec`` says where a rank sits (sizes and ranks) and holds the ownership rules; ``RankLayout``
binds it to a ``ModelSpec``: it validates the pair at construction (``LayoutError`` naming the numbers
that do not divide) and holds every range this rank owns, so the planner, the pool, the ops and the
reference model read fields instead of re-validating and passing ``model`` to each rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LayoutError
from .model import ModelSpec
from .parallel import ParallelSpec


@dataclass(frozen=True)
class RankLayout:
    model: ModelSpec
    parallel: ParallelSpec
    heads: range = field(init=False)
    """Global attention heads of this rank."""
    kv_heads: range = field(init=False)
    """Global kv heads (one replicated head when tp > kv heads)."""
    local_experts: range = field(init=False)
    """Global ids of the routed experts this rank's expert group holds (empty for a dense model)."""
    vocab_range: tuple[int, int] = field(init=False)
    """[start, end) of real vocabulary rows; may be empty for the last ranks."""
    vocab_per_rank: int = field(init=False)
    """Rows of this rank's (padded) vocab-parallel shard: the pool's local vocab size."""
    spans: dict[str, tuple[int, int]] = field(init=False, compare=False, repr=False)
    """Model dimension (``format.modules.DIMS``) -> [start, stop) of it this rank owns where TP splits it."""

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        p.validate(m)
        hd = m.head_dim
        heads, kv_heads = p.heads_range(m), p.kv_heads_range(m)
        experts = p.local_experts(m) if m.is_moe else range(0)
        vocab = p.vocab_range(m)
        set_ = object.__setattr__
        set_(self, "heads", heads)
        set_(self, "kv_heads", kv_heads)
        set_(self, "local_experts", experts)
        set_(self, "vocab_range", vocab)
        set_(self, "vocab_per_rank", p.vocab_per_rank(m))
        set_(self, "spans", {
            "hidden": (0, m.hidden_size),
            "q": (heads.start * hd, heads.stop * hd),
            "kv": (kv_heads.start * hd, kv_heads.stop * hd),
            "intermediate": p.shard(m.intermediate_size, p.tp_size, p.tp_rank),
            "shared": (p.shard(m.shared_expert_intermediate_size, p.tp_size, p.tp_rank)
                       if m.is_moe else (0, 0)),
            "moe": (p.shard(m.moe_intermediate_size, p.moe_tp_size, p.moe_tp_rank) if m.is_moe else (0, 0)),
            "vocab": vocab,
            "experts": (0, m.num_experts if m.is_moe else 0),   # never split (format.modules.DIMS)
            "one": (0, 1),
        })

    @classmethod
    def of(cls, model: ModelSpec, parallel: "ParallelSpec | RankLayout") -> "RankLayout":
        """``parallel`` bound to ``model``: a RankLayout is returned as it is (it must be of ``model``)."""
        if isinstance(parallel, RankLayout):
            if parallel.model != model:
                raise LayoutError(f"layout of model {parallel.model.name!r} used for model {model.name!r}")
            return parallel
        return cls(model, parallel)

    # -- the parallel spec's numbers, for readers of the layout -----------------------------------
    @property
    def tp_size(self) -> int:
        return self.parallel.tp_size

    @property
    def tp_rank(self) -> int:
        return self.parallel.tp_rank

    @property
    def ep_rank(self) -> int:
        return self.parallel.ep_rank  # type: ignore[return-value]  # derived in ParallelSpec

    @property
    def moe_tp_size(self) -> int:
        return self.parallel.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.parallel.moe_tp_rank

    @property
    def n_local_experts(self) -> int:
        return len(self.local_experts)

    # -- dimensions ------------------------------------------------------------------------------
    def span(self, dim: str) -> tuple[int, int]:
        """[start, stop) of the full dimension ``dim`` that this rank owns where TP splits it."""
        return self.spans[dim]

    def local(self, dim: str) -> int:
        """This rank's size of ``dim`` where TP splits it (the padded shard for the vocabulary)."""
        if dim == "vocab":
            return self.vocab_per_rank
        start, stop = self.spans[dim]
        return stop - start

"""The module-kind table: what each LoRA module of a pool is, written once.

One row per pool module: how tensor parallelism splits it, where it lives (attention, dense MLP, shared
expert, routed experts, or once per model), and which model dimensions its base linear maps between.
The planner (``plan/planner.py``), the pool's buffer shapes (``device/pool.py``), the validation of an
adapter against the model (``plan/validate.py``) and ``ModelSpec.linear_shape`` all read it; adding a
module is one row here (plus its PEFT names in ``naming.py``).

TP kinds (base linear ``y = x W^T`` with ``W [out, in]``; LoRA ``A [r, in]``, ``B [out, r]``):

| kind | split | this rank holds |
|---|---|---|
| column | output features | A full, the rows of B of its output slice |
| row | input features | the columns of A of its input slice, B full (the engine all-reduces) |
| vocab-column (lm_head) | vocabulary rows | A full, B rows of its vocab range; pool padded to ``vocab_per_rank`` |
| vocab-row (embed) | vocabulary columns of A | A columns of its vocab range, B full |

A column kind over a dimension TP never splits (the router's ``experts``, the shared gate's ``one``) is
replicated: every rank holds A and B whole and adds the whole delta (no reduction follows).

Which slice of a dimension a rank owns (heads, kv-head replication, MoE-TP, expert blocks, vocab padding)
is ``plan/layout.py``'s job; this table only names the dimensions.

*Source* modules are what a PEFT tensor pair adapts: a pool module itself, a merged stack of pool modules
along the output dimension (``qkv``, ``gate_up``), or a fused 3-D expert parameter (PEFT
``target_parameters``: A rows ``e*r+j``, B columns ``j*E+e`` for expert ``e``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TP(enum.Enum):
    COLUMN = "column"
    ROW = "row"
    VOCAB_COLUMN = "vocab-column"
    VOCAB_ROW = "vocab-row"

    @property
    def splits_output(self) -> bool:
        """True: B's rows are split (column kinds); False: A's columns are split (row kinds)."""
        return self in (TP.COLUMN, TP.VOCAB_COLUMN)


class Scope(enum.Enum):
    """Where a module sits; ``ModelSpec.has_scope`` says whether a model (or one layer) has it."""

    ATTENTION = "attention"
    DENSE_MLP = "dense MLP"
    SHARED_EXPERT = "shared expert"
    EXPERTS = "routed experts"
    ROUTER = "router"  # the routing linear of an MoE layer (once per layer, not per expert)
    GLOBAL = "model"  # once per model (embed, lm_head), stored at layer index 0


#: Model dimensions a module maps between (``ModelSpec.dim`` gives the full size, ``RankLayout`` the slice).
#: "experts" (the router's logits, one per routed expert) and "one" (the shared expert's scalar gate) are
#: never split: engines replicate those linears on every rank, so a column kind over them is replicated.
DIMS = ("hidden", "q", "kv", "intermediate", "shared", "moe", "vocab", "experts", "one")


@dataclass(frozen=True)
class ModuleKind:
    name: str
    tp: TP
    scope: Scope
    out_dim: str
    in_dim: str

    @property
    def per_expert(self) -> bool:
        return self.scope is Scope.EXPERTS

    @property
    def is_global(self) -> bool:
        return self.scope is Scope.GLOBAL

    @property
    def split_dim(self) -> str:
        """The dimension TP splits: ``out_dim`` for column kinds, ``in_dim`` for row kinds."""
        return self.out_dim if self.tp.splits_output else self.in_dim


def _kinds(*rows: ModuleKind) -> dict[str, ModuleKind]:
    return {k.name: k for k in rows}


_C, _R, _A, _D, _S, _E, _G = TP.COLUMN, TP.ROW, Scope.ATTENTION, Scope.DENSE_MLP, Scope.SHARED_EXPERT, \
    Scope.EXPERTS, Scope.GLOBAL

#: Pool modules in the fixed order the planner packs and the pool allocates them.
MODULES: dict[str, ModuleKind] = _kinds(
    ModuleKind("q", _C, _A, "q", "hidden"),
    ModuleKind("k", _C, _A, "kv", "hidden"),
    ModuleKind("v", _C, _A, "kv", "hidden"),
    ModuleKind("o", _R, _A, "hidden", "q"),
    ModuleKind("gate", _C, _D, "intermediate", "hidden"),
    ModuleKind("up", _C, _D, "intermediate", "hidden"),
    ModuleKind("down", _R, _D, "hidden", "intermediate"),
    ModuleKind("shared.gate", _C, _S, "shared", "hidden"),
    ModuleKind("shared.up", _C, _S, "shared", "hidden"),
    ModuleKind("shared.down", _R, _S, "hidden", "shared"),
    ModuleKind("shared_gate", _C, _S, "one", "hidden"),       # Qwen2-MoE shared_expert_gate [1, hidden]
    ModuleKind("router", _C, Scope.ROUTER, "experts", "hidden"),  # mlp.gate [E, hidden]: routing logits
    ModuleKind("experts.w1", _C, _E, "moe", "hidden"),
    ModuleKind("experts.w3", _C, _E, "moe", "hidden"),
    ModuleKind("experts.w2", _R, _E, "hidden", "moe"),
    # embedding LoRA: A is [r, vocab], B is [hidden, r]; "in" is the vocabulary
    ModuleKind("embed", TP.VOCAB_ROW, _G, "hidden", "vocab"),
    ModuleKind("lm_head", TP.VOCAB_COLUMN, _G, "vocab", "hidden"),
)

POOL_MODULES = tuple(MODULES)
EXPERT_MODULES = tuple(m for m, k in MODULES.items() if k.per_expert)
GLOBAL_MODULES = tuple(m for m, k in MODULES.items() if k.is_global)


@dataclass(frozen=True)
class SourceKind:
    """What one PEFT (A, B) pair adapts: pool modules stacked along the output dimension, in order."""

    name: str
    members: tuple[str, ...]
    fused_experts: bool = False
    """A fused 3-D expert parameter: A ``[E*r, in]`` (row ``e*r+j``), B ``[out, E*r]`` (column ``j*E+e``)."""

    @property
    def kind(self) -> ModuleKind:
        """The first member's kind (members of one source share TP kind, scope and input dimension)."""
        return MODULES[self.members[0]]


SOURCES: dict[str, SourceKind] = {
    **{m: SourceKind(m, (m,)) for m in MODULES},
    "qkv": SourceKind("qkv", ("q", "k", "v")),
    "gate_up": SourceKind("gate_up", ("gate", "up")),
    "experts.gate_up": SourceKind("experts.gate_up", ("experts.w1", "experts.w3"), fused_experts=True),
    "experts.down": SourceKind("experts.down", ("experts.w2",), fused_experts=True),
}
FUSED_SOURCES = tuple(s for s in SOURCES.values() if s.fused_experts)

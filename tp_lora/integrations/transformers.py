"""tp_lora as the multi-adapter LoRA backend of Hugging Face transformers' tensor parallelism.

transformers (5.x) shards a model over the ranks of a ``torchrun`` job itself
(``from_pretrained(..., tp_plan="auto")``): each targeted module's parameters become DTensors and
``install_forward`` replaces the module's ``forward`` by a ``tp_forward`` closure that transforms the
inputs, runs the module's own forward (``original_forward``) on local tensors, and then reduces or
gathers the output (``dist.all_reduce`` of a rowwise layer's partial output, the all-gather of the
vocab-parallel lm_head, the Partial->Replicate redistribute of the vocab-parallel embedding, the
all-reduce of the TP experts).

This module attaches a ``LoRAManager`` to such a model:

* ``layout(model)`` derives the ``ModelSpec`` (from ``model.config``) and this rank's ``ParallelSpec``
  and TP process group (from the model's device mesh). transformers splits a sharded dim like
  ``torch.chunk`` (``ceil(n / tp)`` rows per rank, the last ranks shorter), so the vocabulary layout is
  ``ParallelSpec(vocab_pad_to=1)``.
* ``attach(model, manager)`` finds every module tp_lora holds LoRA slots for, checks that transformers
  sharded it exactly as tp_lora slices its LoRA tensors (style and local shape per module), and refuses
  with a ``LayoutError`` naming each module that differs. It then puts the LoRA delta *inside*
  transformers' forward: the ``original_forward`` cell of the module's ``tp_forward`` closure is
  replaced by a function that calls the original and adds the delta to its local output, so a
  row-parallel (o_proj, down_proj, expert down) or vocab-parallel (embed_tokens, lm_head) partial delta
  is completed by the layer's own all-reduce / gather. No base weight is copied or changed;
  ``detach()`` restores the cells.
* ``TransformersLoRA.requests(adapters)`` binds one adapter name (or None = base) to each row of the
  batch for the forwards inside the block. Every forward, of any ``[B, S]`` shape, gets the BatchInfo
  of its shape (built once per shape, flattened row-major exactly as the modules flatten
  ``[B, S, H] -> [B*S, H]``: rows are never indexed by position), so transformers' own ``generate``
  carries per-request adapters (greedy / sampling with one sequence per row; beam search and
  ``num_return_sequences > 1`` change the rows and are refused by the row-count check).

Replicated experts (transformers >= 5.25 under ``tp_plan="auto"``: every expert whole on every rank, no
reduction after them) are detected by ``layout`` and planned whole (``ParallelSpec(moe_replicated=True)``).

Expert parallelism (transformers 5.24 ``DistributedConfig(tp_size=n, ep_size=n)``: whole experts
``[r*E/n, (r+1)*E/n)`` on rank r, the batch shared by the group): the EP implementation's
``experts_forward`` (``AllReduceEP``) is wrapped, the partial expert output rides its all-reduce. An EP
group that does not share the batch (all-to-all token dispatch) is refused: the rows it receives are not
the batch's rows.

Inference only: under ``torch.no_grad()`` transformers runs the local fast path; with autograd on it
keeps DTensors, and the wrapper refuses.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import AdapterStateError, ConfigError, LayoutError, TPLoRAError
from ..format.naming import FAMILY_TABLES
from ..ops.layer import LoRABackend, LoRAOps
from ..plan.model import ModelSpec
from ..plan.parallel import ParallelSpec
from ..runtime.activation import LOCAL
from ..runtime.batch import BatchInfo
from ..runtime.manager import LoRAConfig, LoRAManager

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("5.17", "5.24", "5.25")
"""transformers versions this integration is tested with (the TP forward closure it hooks into)."""

# transformers TP styles per kind of module, as tp_lora slices that module's LoRA tensors
_COLUMN_STYLES = ("colwise",)
_ROW_STYLES = ("rowwise",)
_LM_HEAD_STYLES = ("colwise_gather_output", "colwise_rep", "colwise")
_EMBED_STYLES = ("embedding_rowwise",)
_EXPERT_STYLES = ("moe_tp_experts",)
MOE_TP_PLAN: dict[str, str] = {"model.layers.*.mlp.experts": "moe_tp_experts",
                               "model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
                               "model.layers.*.mlp.experts.down_proj": "rowwise"}
"""A ``tp_plan`` override (names of an ``AutoModelForCausalLM``) that shards the fused experts of a Mixtral /
Qwen-MoE model over TP (every expert on
every rank, its intermediate split), vLLM's and SGLang's layout without EP. transformers 5.25 dropped these
rules from the models' default plans (``tp_plan="auto"`` then replicates the experts, which tp_lora plans as
``ParallelSpec(moe_replicated=True)``: every expert's LoRA whole on every rank); pass
``DistributedConfig(tp_size=n, tp_plan=MOE_TP_PLAN)`` to shard them, or use expert parallelism
(``DistributedConfig(tp_size=n, ep_size=n)``). transformers deprecates ``moe_tp_experts`` for removal in
5.28."""
_EXPERT_PARAM_STYLES = {"gate_up_proj": ("packed_colwise",), "down_proj": ("rowwise",)}
_EP_EXPERT_STYLES = ("ep_dispatch_experts",)
_REPLICATED_PARAM_STYLES = {"gate_up_proj": (None,), "down_proj": (None,)}
_LAYER_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")
_EP_PARAM_STYLES = {"gate_up_proj": ("grouped_gemm",), "down_proj": ("grouped_gemm",)}
_ROW_MODULES = ("o", "down", "shared.down")
_REPLICATED_MODULES = ("router", "shared_gate")   # out dimensions TP never splits (format.modules.DIMS)


def _qwen_route(module: torch.nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``Qwen2MoeTopKRouter`` / ``Qwen3MoeTopKRouter.forward`` after its logits (transformers 5)."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, index = torch.topk(probs, module.top_k, dim=-1)
    if module.norm_topk_prob:
        top /= top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), index


def _mixtral_route(module: torch.nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``MixtralTopKRouter.forward`` after its logits (transformers 5)."""
    probs = F.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, module.top_k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    return logits, top, index


#: transformers' router modules (not ``nn.Linear``: their forward returns logits, top-k weights and experts)
#: whose forward tp_lora runs itself with the router's LoRA added to the logits, by class name.
_ROUTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, ...]]] = {
    "Qwen2MoeTopKRouter": _qwen_route, "Qwen3MoeTopKRouter": _qwen_route, "MixtralTopKRouter": _mixtral_route}


@dataclass(frozen=True)
class TargetModule:
    """One transformers module that tp_lora adds a LoRA delta to (pure description, no tensors).

    ``local_shape``: this rank's weight shape (``[out, in]`` for a linear, ``[vocab, hidden]`` for the
    embedding, ``{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}`` for fused experts).
    ``style``: transformers' TP style of the module (None: not sharded); ``param_styles`` the styles of
    the fused expert parameters.
    """

    path: str
    module: str          # canonical tp_lora module ("q", "down", "embed", "lm_head", "experts", ...)
    layer: int
    style: str | None
    local_shape: Any
    param_styles: tuple[tuple[str, str | None], ...] = ()

    @property
    def kind(self) -> str:
        if self.module == "embed":
            return "embed"
        if self.module == "experts":
            return "experts"
        return "row" if self.module in _ROW_MODULES else "column"


@dataclass(frozen=True)
class Layout:
    """What ``layout(model)`` derives: the shapes, this rank's place, the TP group (None at tp 1)."""

    spec: ModelSpec
    parallel: ParallelSpec
    group: Any


# ---------------------------------------------------------------------------------------------------
# layout: ModelSpec + ParallelSpec from the loaded model
# ---------------------------------------------------------------------------------------------------
def tp_mesh(model: torch.nn.Module) -> Any:
    """The model's 1-D TP device mesh, or None when transformers did not shard it."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" in names:
        return mesh["tp"]
    if mesh.ndim == 1:
        return mesh
    raise LayoutError(f"{type(model).__name__}: device mesh {mesh} has no 'tp' dimension")


def _closure(f: Any) -> dict[str, Any]:
    code = getattr(f, "__code__", None)
    if code is None or not f.__closure__:
        return {}
    return {n: c for n, c in zip(code.co_freevars, f.__closure__)}


def _ep_mesh(model: torch.nn.Module) -> Any:
    """The EP mesh of the model's ``ep_dispatch_experts`` modules (from transformers' ``ep_forward``), or None."""
    for mod in model.modules():
        cells = _closure(mod.__dict__.get("forward"))
        if "implementation" in cells and "ep_mesh" in cells:
            return cells["ep_mesh"].cell_contents
    return None


def layout(model: torch.nn.Module) -> Layout:
    """ModelSpec, ParallelSpec and TP group of a transformers model (loaded with or without ``tp_plan``,
    with or without expert parallelism over the TP group: ``DistributedConfig(tp_size=n, ep_size=n)``)."""
    config = model.config.to_dict()
    spec = ModelSpec.from_hf_config(config, name=getattr(model, "name_or_path", None) or None)
    dc = getattr(model.config, "distributed_config", None)
    mesh = tp_mesh(model)
    ep_mesh = _ep_mesh(model)
    if dc is not None and getattr(dc, "enable_expert_parallel", False) and ep_mesh is None:
        # expert parallelism without transformers 5.24's ep_forward (the 5.17 router/expert plan)
        raise LayoutError(f"{type(model).__name__}: transformers' enable_expert_parallel (the EP API of "
                          f"transformers 5.17) is not supported; load with tensor parallelism only, or use "
                          f"DistributedConfig(tp_size=n, ep_size=n) (transformers 5.24)")
    if mesh is None or mesh.size() == 1:
        if ep_mesh is not None and ep_mesh.size() > 1:
            raise LayoutError(f"{type(model).__name__}: expert parallelism without tensor parallelism (tp_size=1, "
                              f"ep_size={ep_mesh.size()}): the ranks hold different batches; tp_lora needs the EP "
                              f"group to share the batch (ep_size == tp_size)")
        parallel = ParallelSpec(tp_size=1, tp_rank=0, vocab_pad_to=1)
        import torch.distributed as dist
        group = LOCAL if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None
    else:
        tp, rank = mesh.size(), mesh.get_local_rank()
        ep = 1
        if ep_mesh is not None and ep_mesh.size() > 1:
            ep = ep_mesh.size()
            if ep != tp or ep_mesh.get_local_rank() != rank:
                raise LayoutError(f"{type(model).__name__}: EP group of size {ep} (this rank "
                                  f"{ep_mesh.get_local_rank()}) is not the TP group (size {tp}, this rank {rank}); tp_lora supports EP over the "
                                  f"TP group (ep_size == tp_size, the batch shared), where whole experts "
                                  f"[rank*E/ep, (rank+1)*E/ep) sit on each rank")
        replicated = ep == 1 and spec.is_moe and _experts_replicated(model, spec.family)
        parallel = ParallelSpec(tp_size=tp, tp_rank=rank, ep_size=ep, moe_replicated=replicated, vocab_pad_to=1)
        group = mesh.get_group()
    parallel.validate(spec)
    return Layout(spec, parallel, group)


def _experts_replicated(model: torch.nn.Module, family: str) -> bool:
    """Whether transformers left this TP-sharded model's fused experts whole on every rank: the first
    experts module has no TP style (transformers >= 5.25 under ``tp_plan="auto"``, which dropped the
    ``moe_tp_experts`` rules). A model whose layers disagree is refused later by ``check_sharding``."""
    table = FAMILY_TABLES[family]
    plan = dict(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {})
    for name, mod in model.named_modules():
        m = _LAYER_RE.match(name)
        if m and m.group(2) == table.fused_expert_module and hasattr(mod, "gate_up_proj"):
            return not (_hooked(mod) and _style(plan, name) is not None)
    return False


def build_manager(model: torch.nn.Module, config: LoRAConfig) -> LoRAManager:
    """A LoRAManager for this rank of ``model`` (its ModelSpec, ParallelSpec and TP group)."""
    lay = layout(model)
    return LoRAManager(config, lay.spec, lay.parallel, group=lay.group)


# ---------------------------------------------------------------------------------------------------
# discovery and the sharding check (pure once the shapes are read)
# ---------------------------------------------------------------------------------------------------
def _local_shape(t: torch.Tensor) -> tuple[int, ...]:
    from torch.distributed.tensor import DTensor
    return tuple((t.to_local() if isinstance(t, DTensor) else t).shape)


def _style(plan: dict[str, str], name: str) -> str | None:
    if name in plan:
        return plan[name]
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", name)
    return plan.get(generic)


def _hooked(module: torch.nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return f is not None and "original_forward" in getattr(getattr(f, "__code__", None), "co_freevars", ())


def discover(model: torch.nn.Module, family: str, pool_modules: Sequence[str]) -> list[TargetModule]:
    """The modules of ``model`` that map to a pool module, with their TP style and local shapes."""
    table = FAMILY_TABLES[family]
    plan = dict(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {})
    sharded = tp_mesh(model) is not None and tp_mesh(model).size() > 1
    plan = plan if sharded else {}
    ep_plan = dict(getattr(model, "ep_plan", None) or getattr(model, "_ep_plan", None) or {})
    ep_plan = ep_plan if _ep_mesh(model) is not None else {}
    layer_re = _LAYER_RE
    out: list[TargetModule] = []
    pool = set(pool_modules)
    for name, mod in model.named_modules():
        style = _style(plan, name) if sharded and _hooked(mod) else None
        if "implementation" in _closure(mod.__dict__.get("forward")):
            style = _style(ep_plan, name)
        if isinstance(mod, torch.nn.Embedding) and name.split(".")[-1] == "embed_tokens":
            if "embed" in pool:
                out.append(TargetModule(name, "embed", 0, style, _local_shape(mod.weight)))
            continue
        if name.split(".")[-1] == "lm_head" and isinstance(mod, torch.nn.Linear):
            if "lm_head" in pool:
                out.append(TargetModule(name, "lm_head", 0, style, _local_shape(mod.weight)))
            continue
        m = layer_re.match(name)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        canon = table.layer_modules.get(rest)
        if canon == "router" and not isinstance(mod, torch.nn.Linear):
            if "router" in pool:
                if type(mod).__name__ not in _ROUTERS:
                    raise LayoutError(f"{name}: router {type(mod).__name__} is not one whose forward tp_lora runs "
                                      f"with the router's LoRA (known: {sorted(_ROUTERS)}); leave 'router' out of "
                                      f"LoRAConfig.target_modules to serve adapters without router LoRA")
                out.append(TargetModule(name, "router", layer, style, _local_shape(mod.weight)))
            continue
        if canon is not None and isinstance(mod, torch.nn.Linear):
            if canon in ("qkv", "gate_up"):
                raise LayoutError(f"{name}: merged {canon} projections are not supported by the transformers "
                                  f"integration yet")
            if canon in pool:
                out.append(TargetModule(name, canon, layer, style, _local_shape(mod.weight)))
        elif rest == table.fused_expert_module and hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):
            if pool & {"experts.w1", "experts.w3", "experts.w2"}:
                shapes = {p: _local_shape(getattr(mod, p)) for p in ("gate_up_proj", "down_proj")}
                pplan = ep_plan if style in _EP_EXPERT_STYLES else plan
                pstyles = tuple((p, _style(pplan, f"{name}.{p}")) for p in ("gate_up_proj", "down_proj"))
                out.append(TargetModule(name, "experts", layer, style, shapes, pstyles))
    return out


def expected_shapes(pool_a: dict[str, torch.Size], pool_b: dict[str, torch.Size]) -> dict[str, tuple[int, int]]:
    """(out_local, in_local) per pool module from the pool buffers' shapes (A ``[..., R, in]``,
    B ``[..., out, R]``)."""
    return {m: (int(pool_b[m][-2]), int(pool_a[m][-1])) for m in pool_a}


def check_sharding(targets: Sequence[TargetModule], expected: dict[str, tuple[int, int]],
                   parallel: ParallelSpec, spec: ModelSpec) -> None:
    """Raise LayoutError naming every module whose transformers sharding differs from tp_lora's slicing.

    ``expected``: (out_local, in_local) of each pool module on this rank (``expected_shapes``). Pure.
    """
    tp = parallel.tp_size
    problems: list[str] = []

    def want_style(t: TargetModule, allowed: tuple[str, ...], what: str) -> bool:
        if tp == 1:
            return True
        if t.style not in allowed:
            hint = "pass a tp_plan override"
            if t.kind == "experts" and t.style is None:
                hint = ("the experts are replicated, as transformers >= 5.25 leaves them under tp_plan='auto': "
                        "build the manager with build_manager(model, config), which plans them whole "
                        "(ParallelSpec(moe_replicated=True)), or shard them with DistributedConfig(tp_size=n, "
                        "tp_plan=tp_lora.integrations.transformers.MOE_TP_PLAN)")
            elif t.kind == "experts" and parallel.moe_replicated:
                hint = ("the manager plans the experts whole (moe_replicated=True) but transformers shards "
                        "them; build the manager with build_manager(model, config)")
            problems.append(f"{t.path}: transformers style {t.style!r}, tp_lora slices its LoRA {what} "
                            f"(needs one of {list(allowed)}; {hint})")
            return False
        return True

    vocab_local = parallel.vocab_range(spec)[1] - parallel.vocab_range(spec)[0]
    for t in targets:
        if t.kind == "experts":
            ep = parallel.ep_size > 1
            if parallel.moe_replicated:
                styles, pstyles, what = (None,), _REPLICATED_PARAM_STYLES, "whole on every rank (replicated experts)"
            elif ep:
                styles, pstyles, what = _EP_EXPERT_STYLES, _EP_PARAM_STYLES, "as expert-parallel experts over the TP group"
            else:
                styles, pstyles, what = (_EXPERT_STYLES, _EXPERT_PARAM_STYLES,
                                         "as tensor-parallel experts (every expert on every rank)")
            if not want_style(t, styles, what):
                continue
            for p, st in t.param_styles:
                if tp > 1 and st not in pstyles[p]:
                    problems.append(f"{t.path}.{p}: transformers style {st!r}, tp_lora needs {list(pstyles[p])}")
            gu, dn = t.local_shape["gate_up_proj"], t.local_shape["down_proj"]
            n_local = len(parallel.local_experts(spec))
            for m, got, want in (("experts.w1", gu[1] // 2, "out"), ("experts.w2", dn[2], "in")):
                if m in expected:
                    o, i = expected[m]
                    w = o if want == "out" else i
                    if got != w or gu[0] != n_local:
                        problems.append(f"{t.path}: this rank holds {gu[0]} experts x {got} intermediate "
                                        f"rows ({m}); tp_lora expects {n_local} x {w} "
                                        f"(experts {list(parallel.local_experts(spec))}, moe_intermediate_size="
                                        f"{spec.moe_intermediate_size} / moe_tp {parallel.moe_tp_size})")
            continue
        out_l, in_l = expected[t.module]
        shape = tuple(t.local_shape)
        if t.kind == "embed" or t.module == "lm_head":  # both hold this rank's vocabulary rows
            styles, what = ((_EMBED_STYLES, "vocab-parallel") if t.kind == "embed"
                            else (_LM_HEAD_STYLES, "vocab-parallel (rows of the vocabulary)"))
            if want_style(t, styles, what) and shape != (vocab_local, spec.hidden_size):
                problems.append(f"{t.path}: local weight {list(shape)}, tp_lora expects vocab rows "
                                f"{list(parallel.vocab_range(spec))} x {spec.hidden_size}")
            continue
        if t.module in _REPLICATED_MODULES:   # the router / the shared expert's gate: whole on every rank
            if want_style(t, (None,), "whole on every rank (replicated)") and shape != (out_l, in_l):
                problems.append(f"{t.path}: local weight {list(shape)}, tp_lora's {t.module} LoRA is "
                                f"[{out_l}, {in_l}] (replicated)")
            continue
        if t.kind == "row":
            if want_style(t, _ROW_STYLES, "row-parallel (input columns)") and shape[1] != in_l:
                problems.append(f"{t.path}: local weight {list(shape)} holds {shape[1]} input columns, "
                                f"tp_lora's {t.module} LoRA A slice has {in_l}")
            continue
        if want_style(t, _COLUMN_STYLES, "column-parallel (output rows)") and shape[0] != out_l:
            extra = ""
            if t.module in ("k", "v"):
                kv = spec.num_key_value_heads
                extra = (f"; tp_lora holds kv heads {list(parallel.kv_heads_range(spec))} of {kv} "
                         + (f"(replicated: tp_size={tp} > num_key_value_heads={kv}, transformers splits "
                            f"the heads instead)" if tp > kv else ""))
            problems.append(f"{t.path}: local weight {list(shape)} holds {shape[0]} output rows, tp_lora's "
                            f"{t.module} LoRA B slice has {out_l}{extra}")
    if problems:
        raise LayoutError(f"transformers' sharding does not match tp_lora's LoRA slicing on rank "
                          f"{parallel.tp_rank} (tp_size={tp}): " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# the wrappers
# ---------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


class TransformersLoRA:
    """tp_lora attached to one rank of a transformers model. Build with ``attach``."""

    def __init__(self, model: torch.nn.Module, manager: LoRAManager, targets: list[TargetModule],
                 backend: LoRABackend | None = None):
        self.model, self.manager, self.targets = model, manager, targets
        self.backend = backend
        self._restore: list[Callable[[], None]] = []
        self._adapters: tuple[str | None, ...] | None = None
        self._active = False   # some request of the current requests() block has an adapter
        self._ops: dict[int, LoRAOps] = {}
        self._batches: list[BatchInfo] = []

    # -- batches ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def requests(self, adapters: Sequence[str | None]) -> Iterator["TransformersLoRA"]:
        """Bind ``adapters[b]`` (None = base model) to row ``b`` of every forward inside the block.

        Every named adapter must be active (``manager.activate``); slots are held until the block ends.
        """
        if self._adapters is not None:
            raise AdapterStateError("requests() blocks do not nest")
        adapters = tuple(adapters)
        if not adapters:
            raise AdapterStateError("requests() needs at least one request")
        for a in adapters:
            if a is not None and not self.manager.is_active(a):
                raise AdapterStateError(f"adapter {a!r} is not active on rank {self.manager.rank}; "
                                        f"activate() it first")
        self._adapters = adapters
        self._active = any(a is not None for a in adapters)
        try:
            yield self
        finally:
            self._adapters, self._active = None, False
            self._ops = {}
            batches, self._batches = self._batches, []
            for b in batches:
                b.release()

    def _ops_for(self, tokens: int, where: str) -> LoRAOps | None:
        """The layer ops of a forward whose module sees ``tokens`` = B*S rows (built once per S)."""
        ads = self._adapters
        if ads is None or not self._active:
            return None
        B = len(ads)
        if tokens % B:
            raise AdapterStateError(f"{where}: {tokens} tokens in a batch of {B} requests (requests() got "
                                    f"{B} adapters; beam search / num_return_sequences change the rows)")
        S = tokens // B
        ops = self._ops.get(S)
        if ops is None:
            batch = self.manager.prepare_batch(list(ads), [S] * B)
            self._batches.append(batch)
            ops = self._ops[S] = LoRAOps(self.manager.pool, batch, self.backend)
        return ops

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, adapters: Sequence[str | None], max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Greedy decoding of exactly ``max_new_tokens`` per request (row ``b`` uses ``adapters[b]``),
        through transformers' own ``generate``. ``input_ids`` ``[B, S]`` (left-padded with
        ``attention_mask`` when the prompts differ in length). Returns the new tokens ``[B, N]``."""
        if input_ids.dim() != 2 or input_ids.shape[0] != len(adapters):
            raise AdapterStateError(f"input_ids {list(input_ids.shape)} must be [B, S] with B = "
                                    f"{len(adapters)} adapters")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kw: dict[str, Any] = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens,
                                  pad_token_id=self.model.config.pad_token_id or 0)
        kw.update(kwargs)
        with self.requests(adapters):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return out[:, input_ids.shape[1]:]

    # -- attach / detach -------------------------------------------------------------------------
    def _install(self, t: TargetModule, module: torch.nn.Module, make: Callable[[Callable], Callable]) -> None:
        f = module.__dict__.get("forward")
        if t.style is not None:
            # transformers' tp_forward: swap the cell of its ``original_forward``, so the delta is added
            # to the local output before the style's reduction / gather
            names = getattr(getattr(f, "__code__", None), "co_freevars", ())
            if f is None or "original_forward" not in names:
                raise LayoutError(f"{t.path}: transformers' TP forward of this module has no "
                                  f"'original_forward' closure (tested transformers {SUPPORTED_VERSIONS})")
            cell = f.__closure__[names.index("original_forward")]
            orig = cell.cell_contents
            cell.cell_contents = make(orig)

            def restore(cell: Any = cell, orig: Callable = orig) -> None:
                cell.cell_contents = orig
        else:
            orig = module.forward
            module.forward = make(orig)

            def restore(module: torch.nn.Module = module, f: Callable | None = f) -> None:
                if f is None:
                    del module.forward
                else:
                    module.forward = f
        self._restore.append(restore)

    def _install_ep(self, t: TargetModule, module: torch.nn.Module) -> None:
        """EP (transformers ``ep_dispatch_experts``): the EP implementation runs this rank's experts through its
        ``experts_forward`` on local expert ids. Only ``AllReduceEP`` keeps every token on every rank (the batch
        rows the BatchInfo indexes); a token-moving implementation (all-to-all) is refused at run time."""
        impl = _closure(module.__dict__.get("forward"))["implementation"].cell_contents
        name = type(impl).__name__
        shared = getattr(impl, "all_reduce", impl if name == "AllReduceEP" else None)
        if shared is None or getattr(impl, "megamoe", None) is not None:
            raise LayoutError(f"{t.path}: EP implementation {name} moves tokens between ranks; tp_lora needs the "
                              f"batch shared by the EP group (ep_implementation 'auto' or 'all_reduce' with "
                              f"ep_size == tp_size)")
        offset = self.manager.parallel.local_experts(self.manager.model).start
        lora, layer = self, t.layer

        def shared_forward(hidden: torch.Tensor, local_index: torch.Tensor, weights: torch.Tensor,
                           *args: Any, _orig: Callable = shared.experts_forward, **kwargs: Any) -> torch.Tensor:
            if not lora._active:
                return _orig(hidden, local_index, weights, *args, **kwargs)
            ops = lora._ops_for(hidden.shape[0], t.path)
            return _experts_forward(module, layer, ops, hidden, local_index, weights, offset)

        patched = [(shared, shared.experts_forward)]
        shared.experts_forward = shared_forward
        other = getattr(impl, "all_to_all", None)
        if other is not None:
            def refuse(*args: Any, _orig: Callable = other.experts_forward, **kwargs: Any) -> torch.Tensor:
                if lora._active:
                    raise TPLoRAError(f"{t.path}: transformers chose its all-to-all EP path (autograd is on); "
                                      f"run the forward under torch.no_grad() or torch.inference_mode()")
                return _orig(*args, **kwargs)
            patched.append((other, other.experts_forward))
            other.experts_forward = refuse

        def restore() -> None:
            for obj, f in patched:
                obj.experts_forward = f
        self._restore.append(restore)

    def detach(self) -> None:
        """Remove every wrapper: the model is transformers' own again."""
        while self._restore:
            self._restore.pop()()

    # -- per-kind wrappers -----------------------------------------------------------------------
    def _linear(self, t: TargetModule) -> Callable[[Callable], Callable]:
        lora, layer, name = self, t.layer, t.module
        is_lm_head = name == "lm_head"

        def make(orig: Callable) -> Callable:
            def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                out = orig(x, *args, **kwargs)
                if not lora._active:
                    return out
                ops = lora._ops_for(x.shape[:-1].numel(), t.path)
                if ops is None:
                    return out
                if not isinstance(_local(out), torch.Tensor) or _local(out) is not out or _local(x) is not x:
                    raise TPLoRAError(f"{t.path}: transformers ran this layer on DTensors (autograd is on); "
                                      f"run the forward under torch.no_grad() or torch.inference_mode()")
                x2 = x.reshape(-1, x.shape[-1])
                o2 = out.view(-1, out.shape[-1])
                if is_lm_head and o2.shape[1] < ops.pool.B["lm_head"].shape[-2]:
                    # last vocab shard of an uneven split: the pool slice is ceil(V/tp) rows
                    tmp = torch.zeros(o2.shape[0], ops.pool.B["lm_head"].shape[-2], dtype=o2.dtype,
                                      device=o2.device)
                    ops.column(0, "lm_head", x2, tmp)
                    o2 += tmp[:, : o2.shape[1]]
                elif t.kind == "row":
                    ops.row(layer, name, x2, o2)
                else:
                    ops.column(layer, name, x2, o2)
                return out
            return forward
        return make

    def _embedding(self, t: TargetModule) -> Callable[[Callable], Callable]:
        lora = self

        def make(orig: Callable) -> Callable:
            def forward(ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                out = orig(ids, *args, **kwargs)
                if not lora._active:
                    return out
                ops = lora._ops_for(ids.numel(), t.path)
                if ops is None:
                    return out
                # vocab-parallel: ``out`` is a Partial DTensor (masked rows of other shards are zero);
                # the partial delta goes into its local tensor before the Partial->Replicate all-reduce
                lo = _local(out)
                ops.embedding(_local(ids).reshape(-1), lo.view(-1, lo.shape[-1]))
                return out
            return forward
        return make

    def _router(self, t: TargetModule, module: torch.nn.Module) -> Callable[[Callable], Callable]:
        """transformers' TopKRouter (``_ROUTERS``): its logits ``F.linear(h, weight)`` with the router's LoRA
        added (whole on every rank), then its own top-k steps; without adapters its forward as it is."""
        lora, layer, route = self, t.layer, _ROUTERS[type(module).__name__]

        def make(orig: Callable) -> Callable:
            def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
                if not lora._active or args or kwargs:
                    return orig(hidden, *args, **kwargs)
                h = _local(hidden).reshape(-1, module.weight.shape[-1])
                ops = lora._ops_for(h.shape[0], t.path)
                if ops is None:
                    return orig(hidden)
                logits = F.linear(h, _local(module.weight))
                ops.column(layer, "router", h, logits)
                return route(module, logits)
            return forward
        return make

    def _experts(self, t: TargetModule, module: torch.nn.Module) -> Callable[[Callable], Callable]:
        lora, layer = self, t.layer

        def make(orig: Callable) -> Callable:
            def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        *args: Any, **kwargs: Any) -> torch.Tensor:
                if not lora._active:
                    return orig(hidden, top_k_index, top_k_weights, *args, **kwargs)
                ops = lora._ops_for(hidden.shape[0], t.path)
                if ops is None:
                    return orig(hidden, top_k_index, top_k_weights, *args, **kwargs)
                return _experts_forward(module, layer, ops, _local(hidden), top_k_index, _local(top_k_weights))
            return forward
        return make


def _experts_forward(module: torch.nn.Module, layer: int, ops: LoRAOps, hidden: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """transformers' eager fused-experts loop (Qwen3-MoE / Qwen2-MoE / Mixtral ``*Experts``) with the LoRA
    deltas of each expert's gate, up and down. Runs inside transformers' context, where ``gate_up_proj``
    ``[E, 2*I_local, H]`` (gate rows then up rows of this rank's shard) and ``down_proj``
    ``[E, H, I_local]`` are this rank's local tensors; the output is the partial sum that the
    ``moe_tp_experts`` all-reduce completes, or, with the experts replicated (``moe_replicated``: whole
    tensors, no reduction), the whole output. ``hidden`` ``[T, H]``, ``top_k_*`` ``[T, k]``.

    Under EP, ``top_k_index`` holds local expert ids (``E_local`` = a route to another rank, weight 0) and
    global expert ``offset + i`` is local expert ``i``."""
    gate_up, down = _local(module.gate_up_proj), _local(module.down_proj)
    n_exp, im = gate_up.shape[0], gate_up.shape[1] // 2
    final = torch.zeros_like(hidden)
    for e in torch.unique(top_k_index).tolist():   # one host sync, as transformers' expert_hit
        if not 0 <= e < n_exp:
            continue
        tok, pos = torch.where(top_k_index == e)
        x = hidden.index_select(0, tok)
        gu = F.linear(x, gate_up[e])
        g, u = gu[:, :im], gu[:, im:]
        ge = offset + e
        ops.expert_column(layer, "experts.w1", ge, x, tok, g)
        ops.expert_column(layer, "experts.w3", ge, x, tok, u)
        h = module.act_fn(g) * u
        y = F.linear(h, down[e])
        ops.expert_row(layer, "experts.w2", ge, h, tok, y)
        y = y * top_k_weights[tok, pos, None]
        final.index_add_(0, tok, y.to(final.dtype))
    return final


def attach(model: torch.nn.Module, manager: LoRAManager, *, backend: LoRABackend | None = None) -> TransformersLoRA:
    """Check the model's sharding against ``manager``'s layout and install the LoRA wrappers.

    ``manager`` must be built for this rank of ``model`` (``build_manager``). Raises LayoutError naming
    every module whose sharding differs, before anything is installed.
    """
    if getattr(model, "_tp_lora_attached", None) is not None:
        raise AdapterStateError(f"{type(model).__name__} already has tp_lora attached; detach() it first")
    lay = layout(model)
    if lay.spec.to_dict() | {"name": ""} != manager.model.to_dict() | {"name": ""}:
        raise ConfigError(f"the manager's ModelSpec {manager.model.name!r} is not the model's shape "
                          f"({type(model).__name__}); build it with build_manager(model, config)")
    mp = manager.parallel
    if (mp.tp_size, mp.tp_rank, mp.ep_size, mp.moe_replicated, mp.vocab_pad_to) \
            != (lay.parallel.tp_size, lay.parallel.tp_rank, lay.parallel.ep_size, lay.parallel.moe_replicated, 1):
        raise LayoutError(f"the manager's ParallelSpec {manager.parallel} is not this rank's place in the model's "
                          f"mesh {lay.parallel}; build it with build_manager(model, config)")
    pool = manager.pool
    targets = discover(model, lay.spec.family, pool.modules)
    exp = expected_shapes({m: pool.A[m].shape for m in pool.modules}, {m: pool.B[m].shape for m in pool.modules})
    check_sharding(targets, exp, lay.parallel, lay.spec)
    found = {t.module for t in targets} | ({"experts.w1", "experts.w3", "experts.w2"}
                                           if any(t.kind == "experts" for t in targets) else set())
    missing = sorted(set(pool.modules) - found)
    if missing:
        raise LayoutError(f"{type(model).__name__}: no module found for tp_lora pool module(s) {missing}")
    lora = TransformersLoRA(model, manager, targets, backend)
    modules = dict(model.named_modules())
    try:
        for t in targets:
            mod = modules[t.path]
            if t.kind == "experts" and t.style in _EP_EXPERT_STYLES:
                lora._install_ep(t, mod)
            elif t.kind == "experts":
                lora._install(t, mod, lora._experts(t, mod))
            elif t.kind == "embed":
                lora._install(t, mod, lora._embedding(t))
            elif t.module == "router" and not isinstance(mod, torch.nn.Linear):
                lora._install(t, mod, lora._router(t, mod))
            else:
                lora._install(t, mod, lora._linear(t))
    except BaseException:
        lora.detach()
        raise
    model._tp_lora_attached = lora
    lora._restore.insert(0, lambda: setattr(model, "_tp_lora_attached", None))
    log.debug("[rank %d] tp_lora attached to %d modules of %s", manager.rank, len(targets), type(model).__name__)
    return lora

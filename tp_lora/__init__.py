"""tp_lora: load LoRA adapters into tensor- and expert-parallel inference engines.

The engine-facing API: ``LoRAManager`` (register / prefetch / activate / prepare_batch / stats) built from
a ``LoRAConfig``, a ``ModelSpec`` and this rank's ``ParallelSpec``; ``LoRAOps`` computes the LoRA deltas of
a mixed-adapter batch at each TP layer. See README.md and docs/ARCHITECTURE.md.

The names below are imported on first use (PEP 562), so ``import tp_lora`` itself does not import torch:
``python -m tp_lora.run`` sets its SIGTERM handler before the seconds that importing torch takes, and a
rank that torchrun stops meanwhile still says so in one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "AdapterActivationError": ".errors", "AdapterError": ".errors", "AdapterInDoubtError": ".errors",
    "CollectiveTimeoutError": ".errors", "LoadTimeoutError": ".errors", "NoFreeSlotError": ".errors",
    "TPLoRAError": ".errors",
    "AdapterState": ".runtime.manager", "LoRAConfig": ".runtime.manager", "LoRAManager": ".runtime.manager",
    "ModelSpec": ".plan.model", "load_model_spec": ".plan.model",
    "LoRABackend": ".ops.layer", "LoRAOps": ".ops.layer", "TorchBackend": ".ops.layer",
    "ParallelSpec": ".plan.parallel",
    "SlicePlan": ".plan.planner", "plan_rank": ".plan.planner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'tp_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .errors import (AdapterActivationError, AdapterError, AdapterInDoubtError, CollectiveTimeoutError,
                         LoadTimeoutError, NoFreeSlotError, TPLoRAError)
    from .ops.layer import LoRABackend, LoRAOps, TorchBackend
    from .plan.model import ModelSpec, load_model_spec
    from .plan.parallel import ParallelSpec
    from .plan.planner import SlicePlan, plan_rank
    from .runtime.manager import AdapterState, LoRAConfig, LoRAManager

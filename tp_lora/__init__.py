"""tp_lora: load LoRA adapters into tensor- and expert-parallel inference engines.

The engine-facing API: ``LoRAManager`` (register / prefetch / activate / prepare_batch / stats) built from
a ``LoRAConfig``, a ``ModelSpec`` and this rank's ``ParallelSpec``; ``LoRAOps`` computes the LoRA deltas of
a mixed-adapter batch at each TP layer. See README.md and docs/ARCHITECTURE.md.
"""

from .errors import (AdapterActivationError, AdapterError, AdapterInDoubtError, CollectiveTimeoutError,
                     LoadTimeoutError, NoFreeSlotError, TPLoRAError)
from .runtime.manager import AdapterState, LoRAConfig, LoRAManager
from .plan.model import ModelSpec, load_model_spec
from .ops.layer import LoRABackend, LoRAOps, TorchBackend
from .plan.parallel import ParallelSpec
from .plan.planner import SlicePlan, plan_rank

__version__ = "0.1.0"

__all__ = [
    "AdapterActivationError", "AdapterError", "AdapterInDoubtError", "AdapterState", "CollectiveTimeoutError",
    "LoRABackend", "LoRAConfig", "LoadTimeoutError",
    "LoRAManager", "LoRAOps", "ModelSpec", "NoFreeSlotError", "ParallelSpec", "SlicePlan", "TPLoRAError",
    "TorchBackend", "load_model_spec", "plan_rank",
]

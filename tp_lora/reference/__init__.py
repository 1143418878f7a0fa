"""Reference TP/EP transformer for tests and the demo (not core): dense Llama-style and Qwen-MoE/Mixtral."""

from .checkpoint import CheckpointReader, hf_config_dict, hf_state_shapes, write_random_checkpoint
from .model import LoRALayerOps, TPModel

__all__ = ["CheckpointReader", "LoRALayerOps", "TPModel", "hf_config_dict", "hf_state_shapes",
           "write_random_checkpoint"]

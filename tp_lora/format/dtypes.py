"""The one dtype table: safetensors dtype strings of adapter files, and serving (pool/model) dtype names.

Adapter tensors may be any float type (``SAFETENSORS_FLOAT``); the pool holds one serving dtype, named
in configs by its torch name or a short alias (``SERVING``); casts happen on the device.
"""

from __future__ import annotations

import torch

#: safetensors dtype string -> (itemsize, torch dtype). Only float types make sense for LoRA.
SAFETENSORS_FLOAT: dict[str, tuple[int, torch.dtype]] = {
    "F16": (2, torch.float16), "BF16": (2, torch.bfloat16), "F32": (4, torch.float32), "F64": (8, torch.float64),
}
#: every other safetensors dtype string -> itemsize (valid in a header; refused as a LoRA tensor)
SAFETENSORS_OTHER: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                                     "I32": 4, "U32": 4, "I64": 8, "U64": 8}

#: serving dtype name (torch name; short aliases where the old configs accept them) -> torch dtype
SERVING: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ALIASES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def safetensors_itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype string (KeyError if it is not one)."""
    return SAFETENSORS_FLOAT[dtype][0] if dtype in SAFETENSORS_FLOAT else SAFETENSORS_OTHER[dtype]


def safetensors_torch(dtype: str) -> torch.dtype:
    """The torch dtype of a float safetensors dtype string."""
    return SAFETENSORS_FLOAT[dtype][1]


def serving_dtype(name: str, *, aliases: bool = True) -> torch.dtype:
    """The torch dtype of a serving dtype name (``bfloat16``; ``bf16`` too unless ``aliases`` is False)."""
    return SERVING[ALIASES.get(name, name) if aliases else name]


def serving_names(*, aliases: bool = True) -> list[str]:
    """The accepted serving dtype names, sorted (for error messages)."""
    return sorted([*SERVING, *ALIASES] if aliases else SERVING)

"""A PEFT adapter folder on disk, read header-only: which files, opened how, and what they describe.

``read_adapter_files`` finds ``adapter_config.json`` and the weights (``adapter_model.safetensors``, or a
pickle converted on opt-in), never following a symlink out of the folder, opens the weights ONCE (no
blocking on a FIFO, no symlink followed at open) and returns the parsed config, the validated header, the
header digest read from that same descriptor and its ``fstat`` identity. Validation against a model
(shapes, ranks, layers, experts) is ``plan/validate.py``'s: this module knows files, not models.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterConfigError, AdapterFormatError, UnsupportedAdapterError
from .dtypes import SAFETENSORS_FLOAT
from .peft_config import CONFIG_NAME, AdapterConfig, parse_adapter_config
from .safetensors_header import TensorInfo, read_header, read_safetensors_header

__all__ = ["CONFIG_NAME", "FLOAT_DTYPES", "PICKLE_NAME", "WEIGHTS_NAME", "AdapterFiles", "AdapterHeader",
           "LoRATarget", "TensorInfo", "read_adapter_files", "read_safetensors_header"]

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
#: files other tools put beside an adapter for added tokens (vLLM / SGLang layout): refused, never ignored
ADDED_TOKEN_FILES = ("new_embeddings.safetensors", "added_tokens.json")

#: safetensors float dtype string -> (itemsize, torch dtype): the LoRA tensor dtypes we accept
FLOAT_DTYPES = SAFETENSORS_FLOAT


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA A/B pair as stored in the file (full, unsharded shapes).

    ``module`` is a canonical source module (``q``, ``qkv``, ``experts.w1``, ``experts.gate_up`` for
    a fused 3-D PEFT ``target_parameters`` LoRA, ...; see ``format/modules.py``). For fused experts ``rank``
    is per expert and ``num_experts`` tells how A's rows / B's columns interleave (A row ``e*r+j``, B column
    ``j*E+e``).
    """

    module: str
    layer: int
    expert: int | None
    A: TensorInfo
    B: TensorInfo
    rank: int
    alpha: float
    scaling: float
    peft_module_path: str
    num_experts: int = 1


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder as read at register: config, header, and the identity of what was read."""

    name: str
    path: str  # the adapter folder
    weights_path: str  # the safetensors file (inside the folder, or the converted pickle)
    config: AdapterConfig
    config_raw: bytes
    tensors: dict[str, TensorInfo]
    file_size: int
    header_bytes: int
    header_digest: str  # sha256 of the 8-byte length + header JSON, read from the one descriptor
    fingerprint: str  # sha256 of config + header bytes + size: detects a different adapter under a name
    file_identity: tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns) of that descriptor
    settled_identity: tuple[int, int, int, int, int] | None = None  # safetensors_header.settled_identity
    keepalive: Any = field(default=None, compare=False, repr=False)
    """Owns a temporary folder (a converted pickle): removed when the last reference goes."""


@dataclass(frozen=True)
class AdapterHeader:
    """Everything known about an adapter without reading tensor data (validated against a model)."""

    name: str
    path: str  # the adapter folder
    weights_path: str  # the safetensors file
    config: AdapterConfig
    targets: tuple[LoRATarget, ...]
    file_size: int
    fingerprint: str  # sha256 of config + header bytes + size: detects a different adapter under a name
    header_bytes: int
    header_digest: str = ""  # sha256 of the 8-byte length + header JSON, as registered
    file_identity: tuple[int, int, int, int] | None = None  # fstat of the validated fd (st_dev, st_ino, size, mtime_ns)
    settled_identity: tuple[int, int, int, int, int] | None = None
    """(st_dev, st_ino, size, mtime_ns, ctime_ns) of that fd if the file was written long enough before it
    was read (``safetensors_header.settled_identity``): a load whose fstat matches skips the header check."""
    keepalive: Any = field(default=None, compare=False, repr=False)

    @property
    def max_rank(self) -> int:
        return max((t.rank for t in self.targets), default=0)

    @property
    def data_bytes(self) -> int:
        return sum(t.A.nbytes + t.B.nbytes for t in self.targets)

    @property
    def modules(self) -> set[str]:
        return {t.module for t in self.targets}


def read_adapter_files(path: str | os.PathLike[str], *, name: str | None = None, allow_pickle: bool = False,
                       pickle_cache_dir: str | None = None) -> AdapterFiles:
    """Read an adapter folder's config and weights header (no tensor data). Raises AdapterError subclasses
    naming the adapter and the file."""
    folder = Path(path)
    name = name or folder.name
    if not folder.is_dir():
        raise AdapterConfigError("adapter folder does not exist or is not a directory",
                                 adapter=name, path=str(folder))
    try:
        real_folder = folder.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: "Symlink loop" (Python < 3.13)
        raise AdapterFormatError(f"cannot resolve the adapter folder: {e}", adapter=name, path=str(folder)) from None

    def inside(p: Path) -> Path:
        """``p`` resolved; refused when it leads out of the folder (or loops)."""
        try:
            rp = p.resolve()
        except (OSError, RuntimeError) as e:
            raise AdapterFormatError(f"{p.name} cannot be resolved (symlink loop?): {e}", adapter=name,
                                     path=str(p)) from None
        if rp != real_folder and real_folder not in rp.parents:
            raise AdapterFormatError(f"{p.name} is a link that leaves the adapter folder (-> {rp})",
                                     adapter=name, path=str(p))
        return rp

    def present(p: Path) -> bool:
        return p.is_symlink() or p.exists()

    for extra in ADDED_TOKEN_FILES:
        if present(folder / extra):
            raise UnsupportedAdapterError(
                f"{extra} (added-token embeddings) is present; added tokens are not supported and are refused "
                f"rather than ignored", adapter=name, path=str(folder / extra))
    cfg_path = folder / CONFIG_NAME
    if present(cfg_path):
        cfg_path = inside(cfg_path)
    cfg, cfg_raw = parse_adapter_config(str(cfg_path), adapter=name)
    weights = folder / WEIGHTS_NAME
    keepalive = None
    if present(weights):
        weights = inside(weights)
    else:
        pickle = folder / PICKLE_NAME
        if not pickle.exists():
            raise AdapterFormatError(f"{WEIGHTS_NAME} is missing", adapter=name, path=str(folder))
        if not allow_pickle:
            raise UnsupportedAdapterError(
                f"only {PICKLE_NAME} (a pickle) is present; pickles are refused by default. "
                f"Convert it to safetensors, or opt in with allow_pickle=True "
                f"(loaded with torch.load(weights_only=True))", adapter=name, path=str(pickle))
        weights, keepalive = _convert_pickle(inside(pickle), name, pickle_cache_dir)
    # the one open of the weights: O_NOFOLLOW (the resolved path has no links left: one swapped in since is
    # refused), O_NONBLOCK + fstat before reading (a FIFO is refused, not waited on)
    h = read_header(str(weights), adapter=name, nofollow=True)
    fp = hashlib.sha256()
    for part in (cfg_raw, h.raw, str(h.file_size).encode()):
        fp.update(part)
    return AdapterFiles(name=name, path=str(folder), weights_path=str(weights), config=cfg, config_raw=cfg_raw,
                        tensors=h.tensors, file_size=h.file_size, header_bytes=h.header_bytes,
                        header_digest=hashlib.sha256(h.raw).hexdigest(), fingerprint=fp.hexdigest(),
                        file_identity=h.identity, settled_identity=h.settled,
                        keepalive=keepalive)


def _convert_pickle(pickle: Path, name: str, cache_dir: str | None) -> tuple[Path, Any]:
    """``adapter_model.bin`` -> a safetensors file. Without ``cache_dir`` it goes to a temporary folder
    owned by the returned object (removed when the adapter's header is dropped, or at exit)."""
    import torch
    from safetensors.torch import save_file

    try:
        sd = torch.load(str(pickle), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a format error of the file
        raise AdapterFormatError(f"cannot load pickle with weights_only=True: {e}", adapter=name,
                                 path=str(pickle)) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise AdapterFormatError("pickle does not hold a dict of tensors", adapter=name, path=str(pickle))
    tmp = tempfile.TemporaryDirectory(prefix="tp_lora_pickle_") if cache_dir is None else None
    out_dir = Path(tmp.name if tmp is not None else cache_dir)  # type: ignore[arg-type]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    except Exception as e:  # noqa: BLE001 - SafetensorError (odd names, shared storage), OSError, ...
        if tmp is not None:
            tmp.cleanup()
        raise AdapterFormatError(f"cannot convert the pickle to safetensors: {type(e).__name__}: {e}",
                                 adapter=name, path=str(pickle)) from None
    return out, tmp

"""AdapterSource: a PEFT adapter folder on disk, read header-only and validated against the model.

Registering an adapter must be cheap and must catch every problem that the header shows before a byte of
tensor data is read or a byte of pinned/GPU memory is allocated. We therefore parse the safetensors
header ourselves (8-byte length + JSON) with strict checks, instead of trusting a library to reject
hostile files: offsets in range, no overlaps, no holes, sizes that match shapes and dtypes, no duplicate
keys, UTF-8 names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (AdapterConfigError, AdapterFormatError, AdapterShapeError, UnsupportedAdapterError)
from ..plan.model import ModelSpec
from .naming import GLOBAL_MODULES, ParsedKey, UnknownKey, parse_peft_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

#: safetensors dtype string -> (itemsize, torch dtype name). Only float types make sense for LoRA.
FLOAT_DTYPES = {"F16": (2, "float16"), "BF16": (2, "bfloat16"), "F32": (4, "float32"), "F64": (8, "float64")}
KNOWN_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2",
                *FLOAT_DTYPES}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's limit
MAX_CONFIG_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the safetensors file: where its bytes are (absolute file offsets)."""

    key: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def itemsize(self) -> int:
        return FLOAT_DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA A/B pair as stored in the file (full, unsharded shapes).

    ``module`` is a canonical source module (``q``, ``qkv``, ``experts.w1``, ``experts.gate_up`` for
    a fused 3-D PEFT ``target_parameters`` LoRA, ...). For fused experts ``rank`` is per expert and
    ``num_experts`` tells how A's rows / B's columns interleave (A row ``e*r+j``, B column ``j*E+e``).
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
class AdapterConfig:
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    target_parameters: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None

    def rank_for(self, module_path: str) -> int:
        key = _pattern_key(self.rank_pattern, module_path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_path)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _regex_risk(pat: str) -> str | None:
    """Why matching ``pat`` (an untrusted rank/alpha pattern) could take exponential or high-polynomial time,
    or None. Conservative: a repeated group that contains a repetition or an alternation ("(.*.*)*x",
    "(a|a)*b", "(.?){30}"), or more than 3 repetitions ("*", "+", "?", "{") in all; real peft patterns have
    neither."""
    reps, stack, i = 0, [False], 0  # stack: does the open group contain a repetition/alternation?
    while i < len(pat):
        c = pat[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a character class: its metacharacters are literals
            j = i + 1 + (pat[i + 1:i + 2] == "^")
            j += pat[j:j + 1] == "]"
            while j < len(pat) and pat[j] != "]":
                j += 2 if pat[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            stack.append(False)
        elif c == ")" and len(stack) > 1:
            inner = stack.pop()
            if inner and pat[i + 1:i + 2] in ("*", "+", "{"):
                return "a repeated group that contains a repetition or an alternation"
            stack[-1] = stack[-1] or inner
        elif c in "*+{" or (c == "?" and i and pat[i - 1] not in "(*+?}"):  # not "(?:" nor a lazy "*?"
            reps += 1
            stack[-1] = True
        elif c == "|":
            stack[-1] = True
        i += 1
    return f"{reps} repetitions" if reps > 3 else None


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    # peft's rule (utils.other.get_pattern_key): the pattern must match a suffix at a '.' boundary.
    for pat in patterns:
        try:
            if re.match(rf"(.*\.)?({pat})$", module_path):
                return pat
        except re.error:
            continue
    return None


@dataclass(frozen=True)
class AdapterHeader:
    """Everything known about an adapter without reading tensor data."""

    name: str
    path: str  # the adapter folder
    weights_path: str  # the safetensors file
    config: AdapterConfig
    targets: tuple[LoRATarget, ...]
    file_size: int
    fingerprint: str  # sha256 of config + header bytes + size: detects a different adapter under a name
    header_bytes: int
    header_digest: str = ""  # sha256 of the 8-byte length + header JSON, as registered
    file_identity: tuple[int, int, int, int] | None = None  # (st_dev, st_ino, size, mtime_ns) when hashed

    @property
    def max_rank(self) -> int:
        return max((t.rank for t in self.targets), default=0)

    @property
    def data_bytes(self) -> int:
        return sum(t.A.nbytes + t.B.nbytes for t in self.targets)

    @property
    def modules(self) -> set[str]:
        return {t.module for t in self.targets}


# --------------------------------------------------------------------------------------------------
# safetensors header
# --------------------------------------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # called for every JSON object (tens of thousands in an MoE header): build the dict in C and look
    # for the duplicate only when the sizes differ
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return d


class _NotRegularFile(OSError):
    pass


def _open_regular(path: str) -> Any:
    """``open(path, "rb")`` that refuses anything but a regular file: opening a FIFO would block forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegularFile(f"{os.path.basename(path)} is not a regular file (a directory, FIFO or device)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_safetensors_header(path: str, *, adapter: str | None = None) -> tuple[dict[str, TensorInfo], int, int]:
    """Parse and validate a safetensors header. Returns (tensors, header_size, file_size).

    Raises AdapterFormatError naming the file and the problem. Reads only the header bytes.
    """
    def fail(msg: str) -> AdapterFormatError:
        return AdapterFormatError(msg, adapter=adapter, path=path)

    try:
        with _open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(f"file is {size} bytes: too short for a safetensors header length")
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > MAX_HEADER_BYTES:
                raise fail(f"header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + hlen > size:
                raise fail(f"header length {hlen} is larger than the file ({size} bytes): truncated header")
            raw = f.read(hlen)
    except OSError as e:
        raise fail(f"cannot read safetensors file: {e}") from None
    if len(raw) != hlen:
        raise fail(f"header truncated: read {len(raw)} of {hlen} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not valid UTF-8 (at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, our duplicate check; deep nesting
        raise fail(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise fail(f"header must be a JSON object, got {type(header).__name__}")
    data_start = 8 + hlen
    data_size = size - data_start
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or
                             not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise fail("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for key, ent in header.items():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:  # an escaped lone surrogate ("\ud800"): valid JSON, not valid UTF-8
            raise fail(f"tensor name {key!r} is not valid UTF-8 (lone surrogate escape)") from None
        if not isinstance(ent, dict) or set(ent) - {"dtype", "shape", "data_offsets"} or len(ent) != 3:
            raise fail(f"tensor {key!r}: entry must have exactly dtype, shape, data_offsets; got {ent!r:.200}")
        dtype, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
        if not isinstance(dtype, str) or dtype not in KNOWN_DTYPES:
            raise fail(f"tensor {key!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8 or
                not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise fail(f"tensor {key!r}: shape must be a list of non-negative integers, got {shape!r:.200}")
        if (not isinstance(offs, list) or len(offs) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise fail(f"tensor {key!r}: data_offsets must be [start, end] integers, got {offs!r:.200}")
        start, end = offs
        if not 0 <= start <= end:
            raise fail(f"tensor {key!r}: data_offsets [{start}, {end}] are not 0 <= start <= end")
        if end > data_size:
            raise fail(f"tensor {key!r}: data_offsets end {end} is beyond the data section "
                       f"({data_size} bytes): file truncated or offsets out of range")
        itemsize = FLOAT_DTYPES[dtype][0] if dtype in FLOAT_DTYPES else _int_itemsize(dtype)
        numel = math.prod(shape)
        if numel * itemsize != end - start:
            raise fail(f"tensor {key!r}: shape {shape} of {dtype} needs {numel * itemsize} bytes but "
                       f"data_offsets span {end - start}")
        tensors[key] = TensorInfo(key, dtype, tuple(shape), data_start + start, data_start + end)
    # offsets must tile the data section exactly: no overlap, no hole (as the reference implementation)
    pos = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start < pos:
            raise fail(f"tensor {t.key!r}: data [{t.start - data_start}, {t.end - data_start}) overlaps "
                       f"the previous tensor")
        if t.start > pos:
            raise fail(f"tensor {t.key!r}: hole of {t.start - pos} bytes before its data "
                       f"(offsets are not contiguous)")
        pos = t.end
    if pos != size:
        raise fail(f"data section is {data_size} bytes but tensors cover {pos - data_start}: "
                   f"trailing bytes or truncated file")
    return tensors, hlen, size


def _int_itemsize(dtype: str) -> int:
    return {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "I32": 4,
            "U32": 4, "I64": 8, "U64": 8}[dtype]


# --------------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------------
_F32_MAX = 3.4028234663852886e38  # scalings live in a float32 tensor; |alpha / r| <= |alpha| for r >= 1


def _finite_f32(v: int | float) -> bool:
    try:
        f = float(v)  # a 400-digit JSON integer overflows here
    except OverflowError:
        return False
    return math.isfinite(f) and abs(f) <= _F32_MAX


def parse_adapter_config(path: str, *, adapter: str | None = None) -> tuple[AdapterConfig, bytes]:
    def fail(msg: str) -> AdapterConfigError:
        return AdapterConfigError(msg, adapter=adapter, path=path)

    try:
        with _open_regular(path) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise fail(f"{CONFIG_NAME} is missing") from None
    except OSError as e:
        raise fail(f"cannot read {CONFIG_NAME}: {e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise fail(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise fail(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise fail(f"{CONFIG_NAME} must be a JSON object, got {type(d).__name__}")

    def get(key: str, types: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in d or d[key] is None:
            if required:
                raise fail(f"field {key!r} is missing")
            return default
        v = d[key]
        if isinstance(v, bool) and bool not in types:
            raise fail(f"field {key!r} must be {'/'.join(t.__name__ for t in types)}, got bool {v!r}")
        if not isinstance(v, types):
            raise fail(f"field {key!r} must be {'/'.join(t.__name__ for t in types)}, "
                       f"got {type(v).__name__} {v!r:.100}")
        return v

    peft_type = get("peft_type", (str,), "LORA")
    if peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported (only LORA)",
                                      adapter=adapter, path=path)
    r = get("r", (int,), required=True)
    if r <= 0:
        raise fail(f"field 'r' must be a positive integer, got {r}")
    alpha = get("lora_alpha", (int, float), r)
    if not _finite_f32(alpha):
        raise fail(f"field 'lora_alpha' must be finite (within float32 range), got {alpha!r:.40}")
    rank_pattern = get("rank_pattern", (dict,), {})
    alpha_pattern = get("alpha_pattern", (dict,), {})
    for pname, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k, v in pat.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (pname == "rank_pattern" and (
                    not isinstance(v, int) or v <= 0)):
                raise fail(f"{pname}[{k!r}] must be a positive number, got {v!r}")
            if not _finite_f32(v):
                raise fail(f"{pname}[{k!r}] must be finite (within float32 range), got {v!r:.40}")
            why = _regex_risk(k)
            if why is not None:
                raise fail(f"{pname} key {k!r:.80} is a regular expression that can backtrack "
                           f"catastrophically ({why}); use module names or simpler patterns")
    tm = get("target_modules", (list, str), None)
    if isinstance(tm, list) and not all(isinstance(x, str) for x in tm):
        raise fail("field 'target_modules' must be a list of strings")
    tp = get("target_parameters", (list,), None)
    if tp is not None and not all(isinstance(x, str) for x in tp):
        raise fail("field 'target_parameters' must be a list of strings")
    mts = get("modules_to_save", (list,), None)
    cfg = AdapterConfig(
        peft_type="LORA", r=r, lora_alpha=float(alpha),
        use_rslora=get("use_rslora", (bool,), False), rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
        target_modules=tuple(tm) if isinstance(tm, list) else tm,
        target_parameters=tuple(tp) if tp is not None else None,
        fan_in_fan_out=get("fan_in_fan_out", (bool,), False), use_dora=get("use_dora", (bool,), False),
        bias=get("bias", (str,), "none"), modules_to_save=tuple(mts) if mts else None)
    if cfg.use_dora:
        raise UnsupportedAdapterError("DoRA (use_dora=true) is not supported", adapter=adapter, path=path)
    if cfg.bias != "none" or d.get("lora_bias"):
        raise UnsupportedAdapterError(f"LoRA bias (bias={cfg.bias!r}, lora_bias={d.get('lora_bias')!r}) "
                                      f"is not supported", adapter=adapter, path=path)
    if cfg.fan_in_fan_out:
        raise UnsupportedAdapterError("fan_in_fan_out=true (Conv1D models) is not supported",
                                      adapter=adapter, path=path)
    for unsupported in ("layer_replication", "trainable_token_indices"):
        if d.get(unsupported):
            raise UnsupportedAdapterError(f"{unsupported} is not supported", adapter=adapter, path=path)
    return cfg, raw


# --------------------------------------------------------------------------------------------------
# validation against the model
# --------------------------------------------------------------------------------------------------
def _expected_shapes(model: ModelSpec, module: str, r: int, ne: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    h = model.hidden_size
    if module == "qkv":
        return (r, h), (model.q_size + 2 * model.kv_size, r)
    if module == "gate_up":
        return (r, h), (2 * model.intermediate_size, r)
    if module == "experts.gate_up":
        return (ne * r, h), (2 * model.moe_intermediate_size, ne * r)
    if module == "experts.down":
        return (ne * r, model.moe_intermediate_size), (h, ne * r)
    out, inp = model.linear_shape(module)
    return (r, inp), (out, r)


def _resolve_fused(model: ModelSpec, a: TensorInfo, b: TensorInfo) -> tuple[str, int] | None:
    """Which fused expert parameter a (A, B) pair adapts, from shapes; and the per-expert rank."""
    E, h, im = model.num_experts, model.hidden_size, model.moe_intermediate_size
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] % E:
        return None
    r = a.shape[0] // E
    if a.shape == (E * r, h) and b.shape == (2 * im, E * r):
        return "experts.gate_up", r
    if a.shape == (E * r, im) and b.shape == (h, E * r):
        return "experts.down", r
    return None


class AdapterSource:
    """Opens PEFT adapter folders. ``open`` reads only ``adapter_config.json`` and the safetensors header."""

    @staticmethod
    def open(path: str | os.PathLike[str], model: ModelSpec, *, name: str | None = None,
             max_rank: int | None = None, allow_pickle: bool = False,
             pickle_cache_dir: str | None = None) -> AdapterHeader:
        folder = Path(path)
        name = name or folder.name
        if not folder.is_dir():
            raise AdapterConfigError("adapter folder does not exist or is not a directory",
                                     adapter=name, path=str(folder))
        real_folder = folder.resolve()

        def inside(p: Path) -> Path:
            rp = p.resolve()
            if rp != real_folder and real_folder not in rp.parents:
                raise AdapterFormatError(f"{p.name} is a link that leaves the adapter folder (-> {rp})",
                                         adapter=name, path=str(p))
            return rp

        cfg_path = folder / CONFIG_NAME
        if cfg_path.exists() or cfg_path.is_symlink():
            inside(cfg_path)
        cfg, cfg_raw = parse_adapter_config(str(cfg_path), adapter=name)
        weights = folder / WEIGHTS_NAME
        if not (weights.exists() or weights.is_symlink()):
            pickle = folder / PICKLE_NAME
            if pickle.exists():
                if not allow_pickle:
                    raise UnsupportedAdapterError(
                        f"only {PICKLE_NAME} (a pickle) is present; pickles are refused by default. "
                        f"Convert it to safetensors, or opt in with allow_pickle=True "
                        f"(loaded with torch.load(weights_only=True))", adapter=name, path=str(pickle))
                weights = _convert_pickle(inside(pickle), name, pickle_cache_dir)
            else:
                raise AdapterFormatError(f"{WEIGHTS_NAME} is missing", adapter=name, path=str(folder))
        else:
            weights = inside(weights)
        tensors, hlen, size = read_safetensors_header(str(weights), adapter=name)
        targets = _validate(tensors, cfg, model, name=name, path=str(weights), max_rank=max_rank)
        with open(weights, "rb") as f:
            raw_header = f.read(8 + hlen)
            st = os.fstat(f.fileno())  # the identity of the very file whose header was hashed
        header_digest = hashlib.sha256(raw_header).hexdigest()
        h = hashlib.sha256()
        h.update(cfg_raw)
        h.update(raw_header)
        h.update(str(size).encode())
        return AdapterHeader(name=name, path=str(folder), weights_path=str(weights), config=cfg,
                             targets=targets, file_size=size, fingerprint=h.hexdigest(), header_bytes=hlen,
                             header_digest=header_digest,
                             file_identity=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def _convert_pickle(pickle: Path, name: str, cache_dir: str | None) -> Path:
    import tempfile

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
    out_dir = Path(cache_dir or tempfile.mkdtemp(prefix="tp_lora_pickle_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out


def _validate(tensors: dict[str, TensorInfo], cfg: AdapterConfig, model: ModelSpec, *, name: str,
              path: str, max_rank: int | None) -> tuple[LoRATarget, ...]:
    def shape_err(msg: str) -> AdapterShapeError:
        return AdapterShapeError(msg, adapter=name, path=path)

    if not tensors:
        raise AdapterFormatError("the adapter holds no tensors (empty adapter)", adapter=name, path=path)
    pairs: dict[tuple[str, int, int | None], dict[str, tuple[ParsedKey, TensorInfo]]] = {}
    for key, t in tensors.items():
        if ".modules_to_save." in key or key.endswith(".weight") and ".lora_" not in key:
            raise UnsupportedAdapterError(
                f"tensor {key!r} is a full weight (modules_to_save, or a base embedding saved by peft's "
                f"save_embedding_layers); only LoRA A/B tensors are supported (if the embeddings were not "
                f"trained, save with save_pretrained(..., save_embedding_layers=False))",
                adapter=name, path=path)
        try:
            pk = parse_peft_key(key, model.family)
        except UnknownKey as e:
            raise shape_err(f"tensor {key!r}: {e}") from None
        if t.dtype not in FLOAT_DTYPES:
            raise shape_err(f"tensor {key!r}: dtype {t.dtype} is not a floating type "
                            f"(expected one of {sorted(FLOAT_DTYPES)})")
        if len(t.shape) != 2:
            raise shape_err(f"tensor {key!r}: expected a 2-D tensor, got shape {list(t.shape)}")
        slot = pairs.setdefault((pk.module, pk.layer, pk.expert), {})
        if pk.side in slot:
            raise shape_err(f"tensor {key!r}: a second LoRA {pk.side} for {pk.canonical} "
                            f"(first: {slot[pk.side][0].key!r})")
        slot[pk.side] = (pk, t)

    targets: list[LoRATarget] = []
    seen: dict[tuple[str, int, int | None], str] = {}
    for (module, layer, expert), sides in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0],
                                                                               kv[0][2] or -1)):
        for side in ("A", "B"):
            if side not in sides:
                other = next(iter(sides.values()))[1].key
                raise shape_err(f"LoRA {side} is missing for {other!r} (every target needs both A and B)")
        (pa, a), (pb, b) = sides["A"], sides["B"]
        if module not in GLOBAL_MODULES and layer >= model.num_hidden_layers:
            raise shape_err(f"tensor {a.key!r}: layer index {layer} is out of range "
                            f"(model {model.name!r} has {model.num_hidden_layers} layers)")
        ne = 1
        if module.startswith("experts.fused"):
            if not model.is_moe_layer(layer):
                raise shape_err(f"tensor {a.key!r}: layer {layer} of model {model.name!r} has no experts")
            res = _resolve_fused(model, a, b)
            if res is None:
                raise shape_err(
                    f"tensors {a.key!r} {list(a.shape)} / {b.key!r} {list(b.shape)} fit neither fused expert "
                    f"parameter of model {model.name!r}: expected gate_up A [E*r, {model.hidden_size}], "
                    f"B [{2 * model.moe_intermediate_size}, E*r] or down A [E*r, "
                    f"{model.moe_intermediate_size}], B [{model.hidden_size}, E*r] with E={model.num_experts}")
            module, r = res
            ne = model.num_experts
        else:
            r = a.shape[0]
            if module.startswith("experts."):
                if not model.is_moe_layer(layer):
                    raise shape_err(f"tensor {a.key!r}: layer {layer} of model {model.name!r} has no experts")
                if expert is None or not 0 <= expert < model.num_experts:
                    raise shape_err(f"tensor {a.key!r}: expert id {expert} is out of range "
                                    f"(model {model.name!r} has {model.num_experts} experts)")
            elif module.startswith("shared."):
                if not model.has_shared_expert(layer):
                    raise shape_err(f"tensor {a.key!r}: layer {layer} of model {model.name!r} has no "
                                    f"shared expert")
            elif module in ("gate", "up", "down", "gate_up") and model.is_moe_layer(layer):
                raise shape_err(f"tensor {a.key!r}: layer {layer} of model {model.name!r} is an MoE layer "
                                f"without a dense MLP")
        if r <= 0:
            raise shape_err(f"tensor {a.key!r}: rank {r} must be positive")
        exp_a, exp_b = _expected_shapes(model, module, r, ne)
        if a.shape != exp_a or b.shape != exp_b:
            raise shape_err(
                f"{module} layer {layer}{'' if expert is None else f' expert {expert}'}: expected A "
                f"{list(exp_a)} and B {list(exp_b)} for model {model.name!r} at rank {r}, got A "
                f"{a.key!r} {list(a.shape)} and B {b.key!r} {list(b.shape)}")
        # peft matches rank/alpha patterns against the module path, or for a fused expert ParamWrapper against
        # "<module>.<parameter>" (e.g. "model.layers.0.mlp.experts.gate_up_proj", where peft's v4->v5 MoE
        # conversion puts a rank_pattern of 2r for targets gate_proj+up_proj)
        pattern_path = pa.peft_module_path
        if ne > 1:
            pattern_path += ".gate_up_proj" if module == "experts.gate_up" else ".down_proj"
        cfg_r = cfg.rank_for(pattern_path)
        if r != cfg_r:
            raise shape_err(f"tensor {a.key!r}: rank {r} from the tensors does not match rank {cfg_r} from "
                            f"{CONFIG_NAME} (r / rank_pattern)")
        if max_rank is not None and r > max_rank:
            raise shape_err(f"tensor {a.key!r}: rank {r} exceeds max_lora_rank={max_rank}")
        alpha = cfg.alpha_for(pattern_path)
        ident = (module, layer, expert)
        if ident in seen:
            raise shape_err(f"tensors {a.key!r} / {b.key!r}: a second LoRA pair for {module} layer {layer}"
                            f"{'' if expert is None else f' expert {expert}'} (first: {seen[ident]!r})")
        seen[ident] = a.key
        targets.append(LoRATarget(module=module, layer=layer, expert=expert, A=a, B=b, rank=r, alpha=alpha,
                                  scaling=cfg.scaling_for(r, alpha), peft_module_path=pattern_path,
                                  num_experts=ne))
    return tuple(targets)

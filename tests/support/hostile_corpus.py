"""A corpus of hostile PEFT adapter folders, generated (never checked in).

``build_corpus(root)`` writes one folder per case under ``root`` and returns a list of :class:`Case`:
the folder, the exact exception type the library must raise, substrings its message must contain (the
file and the problem), and the stage that raises:

- ``"register"``: the problem is visible in ``adapter_config.json`` or the safetensors header, so
  ``LoRAManager.register`` (header-only) raises it before a byte of pinned or GPU memory is allocated;
- ``"activate"``: the header is fine and the problem shows when the data is read (NaN/Inf, a file that
  changes or vanishes after registration); ``activate`` raises ``AdapterActivationError`` on every rank
  and rolls the partial load back. ``after_register`` (if set) mutates the folder between the two calls.

Every case is built against ``CORPUS_PRESET`` with ``CORPUS_MAX_RANK`` as the manager's max_lora_rank.
The low-level writers (``write_safetensors``, ``write_raw``) are also used by the fuzzer.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from tp_lora.errors import (AdapterActivationError, AdapterConfigError, AdapterFormatError,
                            AdapterShapeError, UnsupportedAdapterError)
from tp_lora.plan.model import ModelSpec
from tp_lora.job.synthetic import write_synthetic_adapter

CORPUS_PRESET = "tiny-moe"  # attention + routed experts: covers dense and expert validation
CORPUS_MAX_RANK = 8
RANK = 4
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLE = "adapter_model.bin"

# tiny-moe: hidden 64, q 64, kv 32, 8 experts of width 32, 2 layers, vocab 250
PRE = "base_model.model.model.layers"
QA, QB = f"{PRE}.0.self_attn.q_proj.lora_A.weight", f"{PRE}.0.self_attn.q_proj.lora_B.weight"
VA, VB = f"{PRE}.1.self_attn.v_proj.lora_A.weight", f"{PRE}.1.self_attn.v_proj.lora_B.weight"

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL", torch.uint8: "U8"}


@dataclass(frozen=True)
class Case:
    name: str
    path: str  # the adapter folder (register it under ``name``)
    exc: type[BaseException]  # the exact type
    substrings: tuple[str, ...]  # all must appear in str(exception)
    stage: str  # "register" | "activate"
    after_register: Callable[[Path], None] | None = field(default=None, compare=False)
    problem: str = ""  # one line for docs/HOSTILE.md


def corpus_model() -> ModelSpec:
    return ModelSpec.from_preset(CORPUS_PRESET)


# --------------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------------
def base_config(r: int = RANK, **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r if isinstance(r, int) else 8, "use_rslora": False, "rank_pattern": {},
        "alpha_pattern": {}, "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False,
        "use_dora": False, "bias": "none", "modules_to_save": None, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": CORPUS_PRESET,
    }
    for k, v in [("r", r), *changes.items()]:
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


_DELETE = object()


def write_config(folder: Path, cfg: dict[str, Any] | str | bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / CONFIG
    if isinstance(cfg, bytes):
        p.write_bytes(cfg)
    elif isinstance(cfg, str):
        p.write_text(cfg)
    else:
        p.write_text(json.dumps(cfg, indent=1))


def write_raw(path: Path, header: dict[str, Any] | str | bytes, data: bytes = b"", *,
              hlen: int | None = None) -> None:
    """``<u64 header length><header bytes><data>``; ``hlen`` overrides the length field."""
    if isinstance(header, dict):
        hb = json.dumps(header).encode()
    elif isinstance(header, str):
        hb = header.encode("utf-8", "surrogatepass")
    else:
        hb = header
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(hb) if hlen is None else hlen) + hb + data)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Like ``save_file`` but without its checks, so any dtype (bool, int) and any shape go through."""
    header: dict[str, Any] = {}
    data = bytearray()
    for k, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                     "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_raw(path, header, bytes(data))


def read_raw(path: Path) -> tuple[dict[str, Any], bytes, bytes]:
    """(header dict in file order, header bytes, data bytes) of a well-formed safetensors file."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8:8 + n], b[8 + n:]


def _pair(r: int = RANK, out: int = 64, inp: int = 64, dtype: torch.dtype = torch.bfloat16,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(r, inp, generator=g) * 0.02).to(dtype),
            (torch.randn(out, r, generator=g) * 0.02).to(dtype))


def mini_tensors(r: int = RANK, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A small valid adapter: q of layer 0 and v of layer 1."""
    qa, qb = _pair(r, 64, 64, dtype, 1)
    va, vb = _pair(r, 32, 64, dtype, 2)
    return {QA: qa, QB: qb, VA: va, VB: vb}


def write_mini(folder: Path, tensors: dict[str, torch.Tensor] | None = None, *, cfg: dict[str, Any] | None = None,
               raw: bool = True) -> Path:
    write_config(folder, cfg if cfg is not None else base_config())
    t = mini_tensors() if tensors is None else tensors
    if raw:
        write_safetensors(folder / WEIGHTS, t)
    else:
        save_file(t, str(folder / WEIGHTS))
    return folder


def write_good(folder: Path, *, seed: int = 0, model: ModelSpec | None = None, rank: int = RANK,
               **kw: Any) -> Path:
    """A valid synthetic adapter of the corpus model (attention + every expert)."""
    return write_synthetic_adapter(folder, model or corpus_model(), rank=rank, seed=seed,
                                   targets=kw.pop("targets", ("q", "k", "v", "o", "experts")), **kw)


# --------------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------------
def build_corpus(root: str | os.PathLike[str]) -> list[Case]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    outside = root / "_outside"
    outside.mkdir(exist_ok=True)
    cases: list[Case] = []
    W, C = WEIGHTS, CONFIG

    def case(name: str, exc: type[BaseException], subs: tuple[str, ...], stage: str = "register",
             after: Callable[[Path], None] | None = None, problem: str = "") -> Path:
        folder = root / name
        if folder.exists() or folder.is_symlink():
            shutil.rmtree(folder) if folder.is_dir() and not folder.is_symlink() else folder.unlink()
        cases.append(Case(name, str(folder), exc, subs, stage, after, problem or name.replace("_", " ")))
        return folder

    good = write_good(root / "_good")
    gh, ghb, gdata = read_raw(good / W)
    gbytes = (good / W).read_bytes()
    ghlen = len(ghb)

    def good_copy(folder: Path) -> Path:
        shutil.copytree(good, folder)
        return folder

    # ---- the safetensors container: AdapterFormatError at register ---------------------------------
    f = good_copy(case("truncated_data", AdapterFormatError, (W, "truncated"),
                       problem="the file ends inside the last tensor's data"))
    (f / W).write_bytes(gbytes[:-100])

    f = good_copy(case("truncated_header", AdapterFormatError, (W, "truncated header"),
                       problem="the file ends inside the JSON header"))
    (f / W).write_bytes(gbytes[:8 + ghlen // 2])

    f = good_copy(case("file_too_short", AdapterFormatError, (W, "too short"),
                       problem="4 bytes: not even the header length"))
    (f / W).write_bytes(b"\x10\x00\x00\x00")

    f = good_copy(case("header_length_over_limit", AdapterFormatError, (W, "exceeds"),
                       problem="header length 2**64-1"))
    (f / W).write_bytes(struct.pack("<Q", 2**64 - 1) + gbytes[8:])

    f = good_copy(case("header_length_beyond_file", AdapterFormatError, (W, "larger than the file"),
                       problem="header length larger than the file"))
    (f / W).write_bytes(struct.pack("<Q", len(gbytes)) + gbytes[8:])

    f = write_mini(case("petabyte_tensor", AdapterFormatError, (W, "beyond the data section"),
                        problem="a tensor of 8 PB with matching data_offsets"))
    write_raw(f / W, {QA: {"dtype": "F32", "shape": [2**25, 2**26], "data_offsets": [0, 2**53]}}, b"\0" * 64)

    f = write_mini(case("petabyte_shape_small_offsets", AdapterFormatError, (W, "needs", "bytes but"),
                        problem="a tensor of 8 PB whose data_offsets span 64 bytes"))
    write_raw(f / W, {QA: {"dtype": "F32", "shape": [2**25, 2**26], "data_offsets": [0, 64]}}, b"\0" * 64)

    def two(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {QA: {"dtype": "BF16", **a}, QB: {"dtype": "BF16", **b}}

    A_SH, B_SH, NA, NB = [RANK, 64], [64, RANK], RANK * 64 * 2, 64 * RANK * 2
    f = write_mini(case("overlapping_offsets", AdapterFormatError, (W, "overlaps"),
                        problem="two tensors share bytes"))
    write_raw(f / W, two({"shape": A_SH, "data_offsets": [0, NA]},
                         {"shape": B_SH, "data_offsets": [NA // 2, NA // 2 + NB]}), b"\0" * (NA + NB))

    f = write_mini(case("offsets_out_of_range", AdapterFormatError, (W, "beyond the data section"),
                        problem="data_offsets end past the end of the file"))
    write_raw(f / W, two({"shape": A_SH, "data_offsets": [0, NA]},
                         {"shape": B_SH, "data_offsets": [NA + 4096, NA + 4096 + NB]}), b"\0" * (NA + NB))

    f = write_mini(case("offsets_reversed", AdapterFormatError, (W, "not 0 <= start <= end"),
                        problem="data_offsets [end, start]"))
    write_raw(f / W, two({"shape": A_SH, "data_offsets": [NA, 0]},
                         {"shape": B_SH, "data_offsets": [NA, NA + NB]}), b"\0" * (NA + NB))

    f = write_mini(case("offsets_negative", AdapterFormatError, (W, "not 0 <= start <= end"),
                        problem="a negative data offset"))
    write_raw(f / W, two({"shape": A_SH, "data_offsets": [-NA, 0]},
                         {"shape": B_SH, "data_offsets": [0, NB]}), b"\0" * NB)

    f = write_mini(case("offsets_not_integers", AdapterFormatError, (W, "data_offsets must be"),
                        problem="float data offsets"))
    write_raw(f / W, two({"shape": A_SH, "data_offsets": [0.0, float(NA)]},
                         {"shape": B_SH, "data_offsets": [NA, NA + NB]}), b"\0" * (NA + NB))

    f = write_mini(case("non_contiguous_offsets", AdapterFormatError, (W, "hole of 16 bytes"),
                        problem="a 16-byte hole between two tensors"))
    write_raw(f / W, two({"shape": A_SH, "data_offsets": [0, NA]},
                         {"shape": B_SH, "data_offsets": [NA + 16, NA + 16 + NB]}),
              b"\0" * (NA + 16 + NB))

    f = good_copy(case("trailing_bytes", AdapterFormatError, (W, "trailing bytes"),
                       problem="bytes after the last tensor"))
    (f / W).write_bytes(gbytes + b"\0" * 32)

    f = write_mini(case("duplicate_keys", AdapterFormatError, (W, "duplicate key"),
                        problem="the same tensor name twice in the header"))
    ent = json.dumps({"dtype": "BF16", "shape": A_SH, "data_offsets": [0, NA]})
    write_raw(f / W, f'{{"{QA}": {ent}, "{QA}": {ent}}}', b"\0" * NA)

    for nm, dt, prob in (("dtype_unknown", "F17", "dtype string F17"),
                         ("dtype_lowercase", "bf16", "dtype string bf16 (lower case)"),
                         ("dtype_not_a_string", 16, "dtype 16 (a number)")):
        f = write_mini(case(nm, AdapterFormatError, (W, "unknown dtype"), problem=prob))
        write_raw(f / W, two({"shape": A_SH, "data_offsets": [0, NA]},
                             {"shape": B_SH, "data_offsets": [NA, NA + NB]}) | {
            QA: {"dtype": dt, "shape": A_SH, "data_offsets": [0, NA]}}, b"\0" * (NA + NB))

    f = write_mini(case("header_not_json", AdapterFormatError, (W, "not valid JSON"),
                        problem="the header is not JSON"))
    write_raw(f / W, b"{this is not json" + b" " * 8)

    f = write_mini(case("header_json_array", AdapterFormatError, (W, "must be a JSON object"),
                        problem="the header is a JSON array"))
    write_raw(f / W, b"[1, 2, 3]")

    f = write_mini(case("header_deeply_nested", AdapterFormatError, (W, "not valid JSON"),
                        problem="100 000 nested JSON arrays (Python's json recursion limit)"))
    write_raw(f / W, b"[" * 100_000 + b"]" * 100_000)

    f = write_mini(case("non_utf8_name", AdapterFormatError, (W, "not valid UTF-8"),
                        problem="a tensor name with invalid UTF-8 bytes"))
    hb = json.dumps({QA: {"dtype": "BF16", "shape": A_SH, "data_offsets": [0, NA]}}).encode()
    write_raw(f / W, hb.replace(b"q_proj", b"q_\xff\xfeproj"), b"\0" * NA)

    f = write_mini(case("lone_surrogate_name", AdapterFormatError, (W, "not valid UTF-8"),
                        problem="a tensor name with an escaped lone UTF-16 surrogate (\\ud800)"))
    write_raw(f / W, json.dumps({"\ud800" + QA: {"dtype": "BF16", "shape": A_SH, "data_offsets": [0, NA]},
                                 QB: {"dtype": "BF16", "shape": B_SH, "data_offsets": [NA, NA + NB]}}),
              b"\0" * (NA + NB))

    f = write_mini(case("metadata_not_strings", AdapterFormatError, (W, "__metadata__"),
                        problem="__metadata__ with a non-string value"))
    write_raw(f / W, {"__metadata__": {"format": 1}, QA: {"dtype": "BF16", "shape": A_SH,
                                                          "data_offsets": [0, NA]}}, b"\0" * NA)

    f = write_mini(case("entry_extra_field", AdapterFormatError, (W, "exactly dtype, shape, data_offsets"),
                        problem="a tensor entry with an extra field"))
    write_raw(f / W, {QA: {"dtype": "BF16", "shape": A_SH, "data_offsets": [0, NA], "x": 1}}, b"\0" * NA)

    f = write_mini(case("shape_negative", AdapterFormatError, (W, "shape must be"),
                        problem="a negative dimension"))
    write_raw(f / W, {QA: {"dtype": "BF16", "shape": [-4, -64], "data_offsets": [0, NA]}}, b"\0" * NA)

    f = write_mini(case("shape_nine_dims", AdapterFormatError, (W, "shape must be"),
                        problem="a 9-D shape"))
    write_raw(f / W, {QA: {"dtype": "BF16", "shape": [1] * 9, "data_offsets": [0, 2]}}, b"\0" * 2)

    f = write_mini(case("size_mismatch", AdapterFormatError, (W, "needs 1024 bytes but data_offsets span 512"),
                        problem="F32 [4, 64] over 512 bytes"))
    write_raw(f / W, {QA: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 512]}}, b"\0" * 512)

    f = write_mini(case("empty_adapter", AdapterFormatError, (W, "empty adapter"),
                        problem="a header with no tensors"))
    write_raw(f / W, {})

    f = write_mini(case("metadata_only", AdapterFormatError, (W, "empty adapter"),
                        problem="only __metadata__"))
    write_raw(f / W, {"__metadata__": {"format": "pt"}})

    f = case("weights_missing", AdapterFormatError, (W, "is missing"), problem="no weights file")
    write_config(f, base_config())

    case("folder_missing", AdapterConfigError, ("folder_missing", "does not exist"),
         problem="the adapter folder does not exist")

    f = case("weights_symlink_outside", AdapterFormatError, (W, "leaves the adapter folder"),
             problem="the weights file is a symlink to a file outside the folder")
    write_config(f, base_config())
    shutil.copy(good / W, outside / "weights.safetensors")
    os.symlink(outside / "weights.safetensors", f / W)

    f = case("weights_symlink_relative_escape", AdapterFormatError, (W, "leaves the adapter folder"),
             problem="the weights file is a relative symlink ../_outside/...")
    write_config(f, base_config())
    os.symlink(os.path.join("..", "_outside", "weights.safetensors"), f / W)

    f = good_copy(case("config_symlink_outside", AdapterFormatError, (C, "leaves the adapter folder"),
                       problem="adapter_config.json is a symlink to a file outside the folder"))
    shutil.copy(good / C, outside / "config.json")
    (f / C).unlink()
    os.symlink(outside / "config.json", f / C)

    f = case("weights_is_directory", AdapterFormatError, (W, "not a regular file"),
             problem="adapter_model.safetensors is a directory")
    write_config(f, base_config())
    (f / W).mkdir()

    f = case("weights_is_fifo", AdapterFormatError, (W, "not a regular file"),
             problem="adapter_model.safetensors is a FIFO (opening it would block forever)")
    write_config(f, base_config())
    os.mkfifo(f / W)

    f = good_copy(case("config_is_fifo", AdapterConfigError, (C, "not a regular file"),
                       problem="adapter_config.json is a FIFO"))
    (f / C).unlink()
    os.mkfifo(f / C)

    # ---- tensors that do not fit the model: AdapterShapeError at register ---------------------------
    for nm, dt in (("int_tensor", torch.int32), ("bool_tensor", torch.bool)):
        t = mini_tensors()
        t[QA] = torch.ones(RANK, 64, dtype=dt)
        write_mini(case(nm, AdapterShapeError, (W, "not a floating type"), problem=f"a {dt} lora_A"), t)

    f = write_mini(case("fp8_tensor", AdapterShapeError, (W, "F8_E4M3", "not a floating type"),
                        problem="an F8_E4M3 lora_A"))
    write_raw(f / W, {QA: {"dtype": "F8_E4M3", "shape": A_SH, "data_offsets": [0, NA // 2]},
                      QB: {"dtype": "BF16", "shape": B_SH, "data_offsets": [NA // 2, NA // 2 + NB]}},
              b"\0" * (NA // 2 + NB))

    t = mini_tensors()
    del t[QA]
    write_mini(case("missing_lora_A", AdapterShapeError, (W, "LoRA A is missing", "q_proj"),
                    problem="lora_B without its lora_A"), t)
    t = mini_tensors()
    del t[VB]
    write_mini(case("missing_lora_B", AdapterShapeError, (W, "LoRA B is missing", "v_proj"),
                    problem="lora_A without its lora_B"), t)

    t = mini_tensors()
    t[QB] = t[QB][:, :3].contiguous()
    write_mini(case("rank_mismatch_A_B", AdapterShapeError, (W, "expected A [4, 64] and B [64, 4]"),
                    problem="A of rank 4, B of rank 3"), t)

    write_mini(case("rank_above_max", AdapterShapeError, (W, f"exceeds max_lora_rank={CORPUS_MAX_RANK}"),
                    problem=f"rank 16 > max_lora_rank {CORPUS_MAX_RANK}"), mini_tensors(16), cfg=base_config(16))

    write_mini(case("rank_vs_config", AdapterShapeError, (W, "does not match rank 8"),
                    problem="tensors of rank 4, adapter_config r=8"), cfg=base_config(8))

    wider = ModelSpec.from_dict({**corpus_model().to_dict(), "name": "tiny-moe-wide", "hidden_size": 128})
    write_good(case("shapes_of_another_model", AdapterShapeError, (W, "expected A [4, 64]"),
                    problem="an adapter of a model with hidden size 128"), model=wider)

    write_synthetic_adapter(case("dense_adapter_on_moe", AdapterShapeError, (W, "without a dense MLP"),
                                 problem="a dense-MLP LoRA (mlp.gate_proj) on an MoE layer"),
                            ModelSpec.from_preset("tiny-dense"), rank=RANK, targets=("q", "gate"))

    t = mini_tensors()
    t[QA.replace("layers.0.", "layers.7.")] = t.pop(QA)
    t[QB.replace("layers.0.", "layers.7.")] = t.pop(QB)
    write_mini(case("layer_out_of_range", AdapterShapeError, (W, "layer index 7 is out of range"),
                    problem="layers.7 of a 2-layer model"), t)

    t = mini_tensors()
    t[QA.replace("q_proj", "rotary_emb")] = t.pop(QA)
    t[QB.replace("q_proj", "rotary_emb")] = t.pop(QB)
    write_mini(case("unknown_module", AdapterShapeError, (W, "unknown module 'self_attn.rotary_emb'"),
                    problem="a LoRA on self_attn.rotary_emb"), t)

    t = mini_tensors()
    t["base_model.model.model.norm.some_tensor"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    write_mini(case("not_a_lora_key", AdapterShapeError, (W, "not a LoRA A/B tensor key"),
                    problem="a tensor that is not a LoRA A/B"), t)

    t = mini_tensors()
    t[QA.replace("layers.0.", "layers.\u0661.")] = t.pop(QA)  # ARABIC-INDIC DIGIT ONE: not layer 1
    t[QB.replace("layers.0.", "layers.\u0661.")] = t.pop(QB)
    write_mini(case("unicode_digit_layer", AdapterShapeError, (W, "not a LoRA A/B tensor key"),
                    problem="layers.\u0661 (an Arabic-Indic digit one) is not layer 1"), t)

    t = mini_tensors()
    ea, eb = _pair(RANK, 32, 64, seed=3)
    t[f"{PRE}.0.mlp.experts.8.gate_proj.lora_A.weight"] = ea
    t[f"{PRE}.0.mlp.experts.8.gate_proj.lora_B.weight"] = eb
    write_mini(case("expert_out_of_range", AdapterShapeError, (W, "expert id 8 is out of range"),
                    problem="experts.8 of an 8-expert model"), t)

    t = mini_tensors()
    t[QA] = t[QA].reshape(2, 2, 64).contiguous()
    write_mini(case("three_d_tensor", AdapterShapeError, (W, "expected a 2-D tensor"),
                    problem="a 3-D lora_A"), t)

    t = mini_tensors()
    t[QA.replace("lora_A.weight", "lora_A.default.weight")] = t[QA].clone()
    write_mini(case("same_target_two_keys", AdapterShapeError, (W, "a second LoRA A"),
                    problem="one target under two keys (.lora_A.weight and .lora_A.default.weight)"), t)

    t = mini_tensors()
    t[f"{PRE}.0.mlp.experts.base_layer.lora_A.weight"] = torch.zeros(8 * RANK + 1, 64, dtype=torch.bfloat16)
    t[f"{PRE}.0.mlp.experts.base_layer.lora_B.weight"] = torch.zeros(64, 8 * RANK + 1, dtype=torch.bfloat16)
    write_mini(case("fused_experts_bad_shape", AdapterShapeError, (W, "fit neither fused expert"),
                    problem="target_parameters LoRA with E*r+1 rows"), t)

    t = mini_tensors()
    t[QA], t[QB] = torch.zeros(0, 64, dtype=torch.bfloat16), torch.zeros(64, 0, dtype=torch.bfloat16)
    write_mini(case("zero_rank", AdapterShapeError, (W, "rank 0 must be positive"),
                    problem="A [0, 64], B [64, 0]"), t)

    t = mini_tensors()
    t["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(RANK, 250, dtype=torch.bfloat16)
    t["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(64, RANK, dtype=torch.bfloat16)
    write_mini(case("embedding_as_linear", AdapterShapeError, (W, "lora_embedding_A/B"),
                    problem="embed_tokens with lora_A/lora_B instead of lora_embedding_A/B"), t)

    # ---- PEFT features we refuse: UnsupportedAdapterError at register ------------------------------
    t = mini_tensors()
    t["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(250, 64, dtype=torch.bfloat16)
    write_mini(case("full_weight_modules_to_save", UnsupportedAdapterError, (W, "full weight"),
                    problem="a modules_to_save full weight"), t)

    f = case("pickle_only", UnsupportedAdapterError, (PICKLE, "pickle", "allow_pickle"),
             problem="only adapter_model.bin (a pickle)")
    write_config(f, base_config())
    torch.save(mini_tensors(), f / PICKLE)

    write_mini(case("peft_type_unknown", UnsupportedAdapterError, (C, "peft_type 'LOHA'"),
                    problem="peft_type LOHA"), cfg=base_config(peft_type="LOHA"))
    write_mini(case("dora", UnsupportedAdapterError, (C, "DoRA"), problem="use_dora=true"),
               cfg=base_config(use_dora=True))
    write_mini(case("lora_bias", UnsupportedAdapterError, (C, "bias"), problem="bias='all'"),
               cfg=base_config(bias="all"))

    # ---- adapter_config.json: AdapterConfigError at register ----------------------------------------
    f = case("config_missing", AdapterConfigError, (C, "is missing"), problem="no adapter_config.json")
    write_safetensors((f / W), mini_tensors())
    write_mini(case("config_not_json", AdapterConfigError, (C, "not valid JSON"), problem="config is not JSON"),
               cfg="{'r': 4,}")
    write_mini(case("config_not_utf8", AdapterConfigError, (C, "not valid JSON"),
                    problem="config with invalid UTF-8"), cfg=b'{"r": 4, "x": "\xff"}')
    write_mini(case("config_json_array", AdapterConfigError, (C, "must be a JSON object"),
                    problem="config is a JSON array"), cfg="[4]")
    write_mini(case("config_deeply_nested", AdapterConfigError, (C, "not valid JSON"),
                    problem="config of 100 000 nested arrays"), cfg="[" * 100_000 + "]" * 100_000)
    write_mini(case("config_r_missing", AdapterConfigError, (C, "field 'r' is missing"), problem="no r"),
               cfg=base_config(r=_DELETE))
    write_mini(case("config_r_string", AdapterConfigError, (C, "field 'r' must be int", "str"),
                    problem='r = "4"'), cfg=base_config(r="4"))
    write_mini(case("config_r_float", AdapterConfigError, (C, "field 'r' must be int", "float"),
                    problem="r = 4.0"), cfg=base_config(r=4.0))
    write_mini(case("config_r_bool", AdapterConfigError, (C, "field 'r' must be int", "bool"),
                    problem="r = true"), cfg=base_config(r=True))
    write_mini(case("config_r_zero", AdapterConfigError, (C, "positive integer, got 0"), problem="r = 0"),
               cfg=base_config(r=0))
    write_mini(case("config_r_negative", AdapterConfigError, (C, "positive integer, got -4"), problem="r = -4"),
               cfg=base_config(r=-4))
    write_mini(case("config_alpha_nan", AdapterConfigError, (C, "lora_alpha", "finite"),
                    problem="lora_alpha = NaN"), cfg=base_config(lora_alpha=float("nan")))
    write_mini(case("config_alpha_overflows_float32", AdapterConfigError, (C, "lora_alpha", "float32"),
                    problem="lora_alpha = 1e300 (the scaling overflows the float32 scaling tensor)"),
               cfg=base_config(lora_alpha=1e300))
    write_mini(case("config_alpha_huge_int", AdapterConfigError, (C, "lora_alpha", "float32"),
                    problem="lora_alpha = a 400-digit integer (float() overflows)"),
               cfg=base_config(lora_alpha=10**400))
    write_mini(case("config_alpha_pattern_infinity", AdapterConfigError, (C, "alpha_pattern", "finite"),
                    problem="alpha_pattern value Infinity"), cfg=base_config(alpha_pattern={"q_proj": float("inf")}))
    write_mini(case("config_alpha_string", AdapterConfigError, (C, "lora_alpha"),
                    problem='lora_alpha = "8"'), cfg=base_config(lora_alpha="8"))
    write_mini(case("config_target_modules_ints", AdapterConfigError, (C, "target_modules"),
                    problem="target_modules = [1, 2]"), cfg=base_config(target_modules=[1, 2]))
    write_mini(case("config_rank_pattern_negative", AdapterConfigError, (C, "rank_pattern"),
                    problem="rank_pattern value -1"), cfg=base_config(rank_pattern={"q_proj": -1}))
    write_mini(case("config_rank_pattern_redos", AdapterConfigError, (C, "rank_pattern", "backtrack catastrophically"),
                    problem='rank_pattern key "(.*.*)*x": exponential regex backtracking (register would hang)'),
               cfg=base_config(rank_pattern={"(.*.*)*x": 4}))
    write_mini(case("config_alpha_pattern_polynomial", AdapterConfigError, (C, "alpha_pattern", "repetitions"),
                    problem='alpha_pattern key ".*.*.*.*.*.*.*.*x": high-polynomial backtracking'),
               cfg=base_config(alpha_pattern={".*.*.*.*.*.*.*.*x": 2.0}))
    write_mini(case("config_use_dora_string", AdapterConfigError, (C, "use_dora"),
                    problem='use_dora = "false" (a string)'), cfg=base_config(use_dora="false"))

    # ---- problems only the data shows: AdapterActivationError at activate --------------------------
    ACT = AdapterActivationError
    for nm, val in (("nan_values", float("nan")), ("inf_values", float("inf"))):
        t = mini_tensors()
        t[VB] = t[VB].clone()
        t[VB][3, 1] = val
        write_mini(case(nm, ACT, (nm, W, "NaN/Inf"), stage="activate",
                        problem=f"one {val} in a bf16 lora_B (checked on the device as data arrives)"), t)

    def truncate(folder: Path) -> None:
        p = folder / W
        p.write_bytes(p.read_bytes()[:-64])

    def remove(folder: Path) -> None:
        (folder / W).unlink()

    def to_fifo(folder: Path) -> None:
        (folder / W).unlink()
        os.mkfifo(folder / W)

    good_copy(case("truncated_after_register", ACT, ("truncated_after_register", W, "changed since registration"),
                   stage="activate", after=truncate, problem="the file is truncated between register and activate"))
    good_copy(case("deleted_after_register", ACT, ("deleted_after_register", W, "cannot open"),
                   stage="activate", after=remove, problem="the file vanishes between register and activate"))
    good_copy(case("fifo_after_register", ACT, ("fifo_after_register", W, "no longer a regular file"),
                   stage="activate", after=to_fifo,
                   problem="the file is replaced by a FIFO between register and activate (no hang)"))
    return cases


def write_malicious_pickle(folder: Path) -> Path:
    """An adapter_model.bin whose unpickling would run code: weights_only=True must refuse it."""
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned > /dev/null",))

    write_config(folder, base_config())
    with open(folder / PICKLE, "wb") as fh:
        pickle.dump({QA: Evil()}, fh, protocol=2)
    return folder

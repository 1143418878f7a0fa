"""Property-based fuzzing (hypothesis) of the header parser, the config parser, the planner and the load
path, on mutated real adapters.

The property: whatever the bytes, ``AdapterSource.open`` / ``plan_rank`` / ``LoRAManager.register`` and
``activate`` either succeed or raise one of our exception types (``TPLoRAError``). Anything else (an
IndexError, a RecursionError, an AssertionError in the transfer, a hang) is a bug. An adapter that is
accepted must also be self-consistent: every planned slice lies inside its source tensor and fits its pool
block, every slice can be read, and unregistering it leaves zero pinned bytes.

Four targets share a time budget: ``TP_LORA_FUZZ_SECONDS`` (default 30 s in total, CI); set it higher to
fuzz longer, e.g. ``TP_LORA_FUZZ_SECONDS=3600 pytest tests/test_fuzz.py -s``. Inputs that found bugs are
kept as ``@example`` regression cases (REGRESSIONS below) and run on every call.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from support.hostile_corpus import read_raw, write_raw
from support.runtime_ref import new_manager
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tp_lora.plan.validate import AdapterSource
from tp_lora.errors import TPLoRAError
from tp_lora.runtime.manager import LoRAManager
from tp_lora.plan.model import ModelSpec
from tp_lora.format.modules import POOL_MODULES
from tp_lora.plan.parallel import ParallelSpec
from tp_lora.plan.planner import plan_rank
from tp_lora.device.pool import module_shapes
from tp_lora.job.synthetic import write_synthetic_adapter
from tp_lora.device.transfer import SliceReader

FUZZ_SECONDS = float(os.environ.get("TP_LORA_FUZZ_SECONDS", "30"))
MAX_RANK = 16
RUN_EXAMPLES = 25  # examples per hypothesis run; runs repeat until the target's share of the budget is spent
COUNTS: dict[str, dict[str, int]] = {}

# -- the seeds: real adapters of four shapes ------------------------------------------------------------
BASES: dict[str, tuple[str, dict[str, Any], tuple[tuple[int, int], ...]]] = {
    # name: (preset, write_synthetic_adapter kwargs, layouts (tp, ep))
    "moe_experts": ("tiny-moe", dict(rank=2, targets=("q", "k", "v", "o", "experts")), ((2, 1), (2, 2), (4, 4))),
    "moe_fused": ("tiny-moe", dict(rank=2, targets=("q", "experts"), fused_experts=True, dtype="fp16"),
                  ((2, 2), (4, 2))),
    "dense_merged": ("tiny-dense", dict(rank=3, targets=("q", "k", "v", "o", "gate", "up", "down", "embed",
                                                           "lm_head"), merged=True, dtype="fp32"),
                     ((1, 1), (2, 1), (4, 1))),
    "qwen2_shared": ("tiny-qwen2-moe", dict(rank=2, targets=("q", "o", "experts", "shared.gate", "shared.up",
                                                              "shared.down"), use_rslora=True,
                                            rank_pattern={"o_proj": 4}, alpha_pattern={"q_proj": 3.0}),
                     ((2, 2), (4, 1))),
}
BASE_NAMES = tuple(BASES)


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="tp_lora_fuzz_"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.lru_cache(maxsize=None)
def _base(name: str) -> tuple[ModelSpec, Path, bytes, bytes]:
    preset, kw, _ = BASES[name]
    model = ModelSpec.from_preset(preset)
    folder = write_synthetic_adapter(_root() / "bases" / name, model, seed=7, **kw)
    return model, folder, (folder / "adapter_model.safetensors").read_bytes(), (
        folder / "adapter_config.json").read_bytes()


@functools.lru_cache(maxsize=None)
def _managers(name: str) -> list[LoRAManager]:
    """One single-process manager per (layout, rank) of the base's model: the full load path, no collective
    (a rank of a TP group without a process group is a world of one)."""
    model = _base(name)[0]
    out = []
    for tp, ep in BASES[name][2]:
        for r in sorted({0, tp - 1}):
            out.append(new_manager(model, tp, r, ep, max_loras=2, max_lora_rank=MAX_RANK, chunk_bytes=4096,
                                   host_cache_bytes=1 << 20, dtype="bfloat16"))
            atexit.register(out[-1].close)
    return out


def _scratch(tag: str) -> Path:
    d = _root() / f"case_{tag}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _count(target: str, outcome: str) -> None:
    c = COUNTS.setdefault(target, {})
    c[outcome] = c.get(outcome, 0) + 1


# -- the property ---------------------------------------------------------------------------------------
def check_folder(target: str, name: str, folder: Path, mgr_index: int = 0) -> str:
    """Open, plan every rank of every layout, read every slice, and load through one manager.
    Returns the outcome ("loaded" or where it was rejected)."""
    model = _base(name)[0]
    try:
        header = AdapterSource.open(folder, model, name="fz", max_rank=MAX_RANK)
    except TPLoRAError:
        _count(target, "rejected at open")
        return "rejected at open"
    tensors = {t.key: t for tg in header.targets for t in (tg.A, tg.B)}
    planner_rejected = False
    for t in tensors.values():
        assert 8 + header.header_bytes <= t.start <= t.end <= header.file_size
    for tp, ep in BASES[name][2]:
        for r in range(tp):
            par = ParallelSpec(tp_size=tp, tp_rank=r, ep_size=ep)
            try:
                plan = plan_rank(header, model, par, pool_modules=set(POOL_MODULES))
            except TPLoRAError:
                _count(target, "rejected by planner")
                planner_rejected = True
                continue
            shapes = module_shapes(model, par, MAX_RANK, POOL_MODULES)
            rd = SliceReader(header)
            try:
                for op in plan.ops:
                    src = tensors[op.tensor]
                    assert op.src_offset == src.start and op.src_shape == src.shape
                    assert 0 <= op.rows[0] < op.rows[1] <= src.shape[0], op
                    c0, c1, step = op.cols
                    assert 0 <= c0 and c0 + (op.ncols - 1) * step < src.shape[1] and c1 <= src.shape[1], op
                    s = shapes[op.module]
                    blk = s.a_shape if op.side == "A" else s.b_shape
                    assert op.nrows <= blk[0] and op.ncols <= blk[1], (op, blk)
                    assert op.flat_index(plan.n_local_experts) < s.blocks, op
                for chunk in plan.chunks(4096):
                    assert chunk.nbytes >= sum(o.nbytes for o in chunk.ops)
                    rd.read_chunk(chunk, torch.empty(chunk.nbytes, dtype=torch.uint8))  # every op's bytes
            finally:
                rd.close()
    mgrs = _managers(name)
    mgr = mgrs[mgr_index % len(mgrs)]
    try:
        mgr.register("fz", folder, replace=True)
    except TPLoRAError:
        _count(target, "rejected at register")
        return "rejected at register"
    try:
        mgr.activate("fz")
        outcome = "loaded"
    except TPLoRAError as e:
        # the file did not change since register: only the data itself (NaN/Inf) may fail here; anything
        # the header or config shows must have been refused at register
        assert "NaN/Inf" in str(e), f"a header-visible problem got past register: {e}"
        outcome = "rejected at activate"
    _count(target, outcome)
    mgr.unregister("fz")
    st_ = mgr.stats()
    assert st_.pinned_bytes_now == 0 and mgr.cache.reserved_bytes == 0, "leaked pinned bytes"
    assert mgr.pool.slot_name == [None] * mgr.config.max_loras and not any(mgr.pool.refcount)
    return "rejected by planner" if planner_rejected and outcome == "loaded" else outcome


# -- target 1: byte-level mutations of the safetensors file ----------------------------------------------
_byte_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255), st.booleans()),
    st.tuples(st.just("trunc"), st.integers(0, 2**31)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=16), st.booleans()),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 64), st.booleans()),
    st.tuples(st.just("hlen"), st.sampled_from([0, 1, 2, 7, 8, 2**31, 2**32 - 1, 2**63, 2**64 - 1])
              | st.integers(0, 2**20)),
    st.tuples(st.just("hlen_delta"), st.integers(-64, 64)),
    st.tuples(st.just("set_header"), st.binary(max_size=64)),
)


def mutate_bytes(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        hlen = struct.unpack("<Q", bytes(b[:8]))[0] if len(b) >= 8 else 0
        head_end = min(len(b), 8 + hlen) or 1
        if kind == "flip":
            _, pos, x, in_header = op
            if b:
                b[pos % (head_end if in_header else len(b))] ^= x
        elif kind == "trunc":
            del b[op[1] % (len(b) + 1):]
        elif kind == "insert":
            _, pos, raw, in_header = op
            p = pos % ((head_end if in_header else len(b)) + 1)
            b[p:p] = raw
        elif kind == "delete":
            _, pos, n, in_header = op
            p = pos % ((head_end if in_header else len(b)) + 1)
            del b[p:p + n]
        elif kind == "hlen":
            b[:8] = struct.pack("<Q", op[1])
        elif kind == "hlen_delta":
            b[:8] = struct.pack("<Q", max(0, hlen + op[1]) % 2**64)
        elif kind == "set_header":
            b = bytearray(struct.pack("<Q", len(op[1])) + op[1] + bytes(b[head_end:]))
    return bytes(b)


# inputs that found bugs (see docs/HOSTILE.md); kept as regression cases for every run
# (base, mutations, expected outcome)
REGRESSIONS_BYTES = [
    ("moe_experts", [("set_header", b"[" * 5000 + b"]" * 5000)], "rejected at open"),  # RecursionError (fixed)
    ("dense_merged", [("hlen", 2**64 - 1)], "rejected at open"),
    ("moe_fused", [("flip", 2**31, 0x40, False)], None),
]


def _bytes_target(name: str, ops: list[tuple], mgr_index: int) -> str:
    _, folder, weights, config = _base(name)
    d = _scratch("bytes")
    (d / "adapter_config.json").write_bytes(config)
    (d / "adapter_model.safetensors").write_bytes(mutate_bytes(weights, ops))
    return check_folder("bytes", name, d, mgr_index)


@settings(max_examples=RUN_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(BASE_NAMES), ops=st.lists(_byte_op, min_size=1, max_size=4),
       mgr_index=st.integers(0, 7))
def _fuzz_bytes(name: str, ops: list[tuple], mgr_index: int) -> None:
    _bytes_target(name, ops, mgr_index)


for _name, _ops, _ in REGRESSIONS_BYTES:
    _fuzz_bytes = example(name=_name, ops=_ops, mgr_index=0)(_fuzz_bytes)


# -- target 2: structure-aware mutations of the header JSON ----------------------------------------------
_int_values = st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 8, 16, 32, 64, 250, 256, 2**31, 2**40, 2**53, 2**63,
                               2**64, 10**30]) | st.integers(-(2**70), 2**70)
_json_scalar = st.none() | st.booleans() | _int_values | st.floats(allow_nan=True) | st.text(max_size=8) | \
    st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "BOOL", "U8", "F8_E4M3", "bf16", ""])
_json_value = st.recursive(_json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=6), c, max_size=3), max_leaves=8)
_KEY_TOKENS = ["layers.0", "layers.1", "layers.2", "layers.99", "layers.-1", "layers.00", "experts.0",
               "experts.7", "experts.8", "experts.99999999999999999999", "lora_A", "lora_B", "lora_embedding_A",
               "lora_embedding_B", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
               "down_proj", "gate_up_proj", "w1", "w2", "w3", "shared_expert", "base_layer", "default", "weight",
               "embed_tokens", "lm_head", "mlp.experts", "modules_to_save", "", "\ud800", "\u0661", "\u00e9", "."]
_header_op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 999), st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
              _json_value),
    st.tuples(st.just("shape"), st.integers(0, 999), st.lists(_int_values, max_size=4)),
    st.tuples(st.just("transpose"), st.integers(0, 999)),
    st.tuples(st.just("offsets"), st.integers(0, 999), st.integers(-8, 8), st.integers(-8, 8)),
    st.tuples(st.just("rename"), st.integers(0, 999), st.integers(0, 20), st.sampled_from(_KEY_TOKENS)),
    st.tuples(st.just("delete"), st.integers(0, 999)),
    st.tuples(st.just("dup"), st.integers(0, 999), st.sampled_from(_KEY_TOKENS)),
    st.tuples(st.just("swap"), st.integers(0, 999), st.integers(0, 999)),
    st.tuples(st.just("dtype_keep_bytes"), st.integers(0, 999), st.sampled_from(["F16", "BF16", "F32", "F64"])),
    st.tuples(st.just("metadata"), _json_value),
    st.tuples(st.just("data_len"), st.integers(-64, 64)),
)


def mutate_header(header: dict[str, Any], data: bytes, ops: list[tuple]) -> tuple[dict[str, Any], bytes]:
    h = {k: dict(v) if isinstance(v, dict) else v for k, v in header.items()}
    for op in ops:
        keys = [k for k in h if k != "__metadata__"]
        kind = op[0]
        if kind in ("metadata",):
            h["__metadata__"] = op[1]
            continue
        if kind == "data_len":
            data = data[:max(0, len(data) + op[1])] if op[1] < 0 else data + b"\0" * op[1]
            continue
        if not keys:
            continue
        k = keys[op[1] % len(keys)]
        ent = h[k] if isinstance(h[k], dict) else {}
        if kind == "set":
            ent[op[2]] = op[3]
        elif kind == "shape":
            ent["shape"] = op[2]
        elif kind == "transpose" and isinstance(ent.get("shape"), list):
            ent["shape"] = ent["shape"][::-1]
        elif kind == "offsets" and isinstance(ent.get("data_offsets"), list) and len(ent["data_offsets"]) == 2:
            a, b = ent["data_offsets"]
            if isinstance(a, int) and isinstance(b, int):
                ent["data_offsets"] = [a + op[2], b + op[3]]
        elif kind == "rename":
            parts = k.split(".")
            i = op[2] % len(parts)
            parts[i] = op[3]
            h[".".join(parts)] = h.pop(k)
            continue
        elif kind == "delete":
            del h[k]
            continue
        elif kind == "dup":
            h[k.replace("lora_", op[2] + ".lora_", 1)] = dict(ent)
        elif kind == "swap":
            k2 = keys[op[2] % len(keys)]
            h[k], h[k2] = h[k2], h[k]
            continue
        elif kind == "dtype_keep_bytes":
            ent["dtype"] = op[2]
        h[k] = ent
    return h, data


REGRESSIONS_HEADER = [
    ("moe_experts", [("rename", 0, 0, "\ud800")], "rejected at open"),  # lone surrogate prefix: accepted (fixed)
    ("moe_experts", [("rename", 0, 5, "\u0661")], "rejected at open"),  # "layers.\u0661" read as 1 (fixed)
    ("dense_merged", [("delete", 3)], "rejected at open"),
    ("moe_fused", [("transpose", 0), ("transpose", 1)], "rejected at open"),
]


def _header_target(name: str, ops: list[tuple], ascii_json: bool, mgr_index: int) -> str:
    _, folder, weights, config = _base(name)
    header, _, data = read_raw(folder / "adapter_model.safetensors")
    h, data = mutate_header(header, data, ops)
    d = _scratch("header")
    (d / "adapter_config.json").write_bytes(config)
    try:
        text = json.dumps(h, ensure_ascii=ascii_json)
    except (TypeError, ValueError):  # e.g. a mutation put NaN somewhere json refuses: write it anyway
        text = json.dumps(h, ensure_ascii=True, allow_nan=True)
    write_raw(d / "adapter_model.safetensors", text.encode("utf-8", "surrogatepass"), data)
    return check_folder("header", name, d, mgr_index)


@settings(max_examples=RUN_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(BASE_NAMES), ops=st.lists(_header_op, min_size=1, max_size=4),
       ascii_json=st.booleans(), mgr_index=st.integers(0, 7))
def _fuzz_header(name: str, ops: list[tuple], ascii_json: bool, mgr_index: int) -> None:
    _header_target(name, ops, ascii_json, mgr_index)


for _name, _ops, _ in REGRESSIONS_HEADER:
    _fuzz_header = example(name=_name, ops=_ops, ascii_json=True, mgr_index=0)(_fuzz_header)
    _fuzz_header = example(name=_name, ops=_ops, ascii_json=False, mgr_index=1)(_fuzz_header)


# -- target 3: adapter_config.json -----------------------------------------------------------------------
_CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                "target_parameters", "fan_in_fan_out", "use_dora", "bias", "modules_to_save", "lora_bias",
                "layer_replication", "trainable_token_indices", "task_type", "unknown_field"]
# pattern keys are drawn from a list (valid, malformed and catastrophic-backtracking regexes): a random regex that
# slipped past the ReDoS check would hang the run instead of failing it (see docs/HOSTILE.md)
_PATTERNS = ["q_proj", "o_proj", "model.layers.0.self_attn.q_proj", "layers.1.mlp.experts.3.down_proj", "experts",
             "gate_up_proj", ".*", "^(q|v)_proj$", "(", "[", "a{2}", "", "*", "\\", "mlp.experts.gate_up_proj",
             "(.*.*)*x", "(a|a)*b", ".*.*.*.*.*.*.*.*x", "(.?){30}.{30}", "[*+]+x"]  # the last ones: ReDoS
_pattern_dict = st.dictionaries(st.sampled_from(_PATTERNS), _json_scalar, max_size=3)
_config_op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_CONFIG_KEYS), _json_value),
    st.tuples(st.just("set"), st.sampled_from(["rank_pattern", "alpha_pattern"]), _pattern_dict),
    st.tuples(st.just("set"), st.sampled_from(["r", "lora_alpha"]), _int_values),
    st.tuples(st.just("delete"), st.sampled_from(_CONFIG_KEYS)),
    st.tuples(st.just("raw"), st.binary(max_size=32)),
)
REGRESSIONS_CONFIG = [
    ("moe_experts", [("raw", b"[" * 5000)], "rejected at open"),  # RecursionError (fixed)
    ("qwen2_shared", [("set", "rank_pattern", {"(": 2})], None),
    ("moe_experts", [("set", "lora_alpha", 1e300)], "rejected at open"),  # float32 overflow at activate (fixed)
    ("moe_experts", [("set", "lora_alpha", 10**400)], "rejected at open"),  # OverflowError (fixed)
    ("qwen2_shared", [("set", "rank_pattern", {"(.*.*)*x": 2})], "rejected at open"),  # ReDoS hang (fixed)
]


def _config_target(name: str, ops: list[tuple], mgr_index: int) -> str:
    _, folder, weights, config = _base(name)
    cfg: Any = json.loads(config)
    raw = None
    for op in ops:
        if op[0] == "set":
            cfg[op[1]] = op[2]
        elif op[0] == "delete":
            cfg.pop(op[1], None)
        else:
            raw = op[1]
    d = _scratch("config")
    (d / "adapter_config.json").write_bytes(raw if raw is not None else json.dumps(cfg).encode())
    (d / "adapter_model.safetensors").write_bytes(weights)
    return check_folder("config", name, d, mgr_index)


@settings(max_examples=RUN_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(BASE_NAMES), ops=st.lists(_config_op, min_size=1, max_size=3),
       mgr_index=st.integers(0, 7))
def _fuzz_config(name: str, ops: list[tuple], mgr_index: int) -> None:
    _config_target(name, ops, mgr_index)


for _name, _ops, _ in REGRESSIONS_CONFIG:
    _fuzz_config = example(name=_name, ops=_ops, mgr_index=0)(_fuzz_config)


# -- target 4: valid adapters of random shape must load on every layout ----------------------------------
@settings(max_examples=RUN_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(BASE_NAMES), rank=st.integers(1, MAX_RANK), seed=st.integers(0, 2**16),
       subset=st.lists(st.sampled_from(["q", "k", "v", "o", "gate", "up", "down", "experts", "embed", "lm_head",
                                        "shared.gate", "shared.up", "shared.down"]), min_size=1, max_size=5,
                       unique=True),
       merged=st.booleans(), fused=st.booleans(), dtype=st.sampled_from(["bf16", "fp16", "fp32"]))
def _fuzz_valid(name: str, rank: int, seed: int, subset: list[str], merged: bool, fused: bool, dtype: str) -> None:
    model = _base(name)[0]
    d = _scratch("valid")
    write_synthetic_adapter(d, model, rank=rank, seed=seed, targets=tuple(subset), merged=merged,
                            fused_experts=fused and model.family == "qwen3_moe", dtype=dtype)
    has_tensors = bool(read_raw(d / "adapter_model.safetensors")[0])
    for i in range(len(_managers(name))):
        outcome = check_folder("valid", name, d, i)
        expected = "loaded" if has_tensors else "rejected at open"
        assert outcome == expected, f"{subset} rank={rank} merged={merged} fused={fused}: {outcome}"


# -- the tests ------------------------------------------------------------------------------------------
SHARES = {"bytes": 0.3, "header": 0.35, "config": 0.2, "valid": 0.15}
TARGETS = {"bytes": _fuzz_bytes, "header": _fuzz_header, "config": _fuzz_config, "valid": _fuzz_valid}


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz(target: str) -> None:
    budget = FUZZ_SECONDS * SHARES[target]
    deadline = time.monotonic() + budget
    runs = 0
    while True:
        TARGETS[target]()
        runs += 1
        if time.monotonic() >= deadline:
            break
    total = sum(COUNTS.get(target, {}).values())
    print(f"\nfuzz {target}: {runs} runs, {total} inputs in {budget:.0f}s: {COUNTS.get(target)}")
    assert total >= runs


def test_regressions_without_budget() -> None:
    """The kept seeds alone, independent of TP_LORA_FUZZ_SECONDS, with the outcome each must have."""
    for name, ops, want in REGRESSIONS_BYTES:
        assert want in (None, _bytes_target(name, ops, 0)), (name, ops)
    for name, ops, want in REGRESSIONS_HEADER:
        assert want in (None, _header_target(name, ops, True, 0)), (name, ops)
        assert want in (None, _header_target(name, ops, False, 1)), (name, ops)
    for name, ops, want in REGRESSIONS_CONFIG:
        assert want in (None, _config_target(name, ops, 0)), (name, ops)

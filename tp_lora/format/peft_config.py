"""adapter_config.json: PEFT's LoRA config, parsed strictly (types, finite numbers, refused features).

``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched as peft matches them
(``utils.other.get_pattern_key``: the first key, in file order, that fully matches a suffix of the module
path starting at a '.' boundary). They are untrusted: each is checked for catastrophic backtracking, their
number and length are bounded, and ``PatternMatcher`` indexes the plain-name keys once per config, so
matching a module path does not cost one regex call per key (10,000 per-module keys stay cheap).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterConfigError, UnsupportedAdapterError
from .naming import TRAINING_STATE
from .safetensors_header import no_duplicates, open_regular

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_PATTERN_KEYS = 100_000
"""More rank/alpha pattern keys than this are refused (a bound on the work of one register)."""
MAX_PATTERN_CHARS = 1000
"""A rank/alpha pattern key longer than this is refused (module paths are far shorter)."""
MAX_REGEX_KEYS = 256
"""Keys that are regular expressions (not plain module names/paths) are tried one by one: at most this many."""


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
    training_variants: frozenset[str] = frozenset()
    """Enabled variants whose eval forward is plain LoRA and whose saved training-only tensors are skipped
    (``naming.TRAINING_STATE``: ``velora_config``, ``monteclora_config``)."""

    def rank_for(self, module_path: str) -> int:
        key = self._rank_matcher.first(module_path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        key = self._alpha_matcher.first(module_path)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    @functools.cached_property
    def _rank_matcher(self) -> "PatternMatcher":
        return PatternMatcher(tuple(self.rank_pattern))

    @functools.cached_property
    def _alpha_matcher(self) -> "PatternMatcher":
        return PatternMatcher(tuple(self.alpha_pattern))

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


_NAME_CHARS = dict.fromkeys(map(ord, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-."))


def _is_literal(key: str) -> bool:
    r"""A plain module name / path: ASCII letters, digits, ``_ - .`` (a regex "." is any char) and ``\.``."""
    return bool(key) and not key.replace("\\.", ".").translate(_NAME_CHARS)


_WILD = "\x00"  # an unescaped "." of a literal key (matches any one character)
_IGNORE = bytes(0xFF if c == 0 else 0 for c in range(256))  # wildcard byte -> 0xff (ignored), others -> 0


def _plain_match(key: str, path: str) -> bool:
    try:
        return re.match(rf"(.*\.)?({key})$", path) is not None
    except re.error:
        return False


class PatternMatcher:
    r"""peft's pattern rule for many keys at once: ``first(path)`` is the first key (in order) that
    ``re.fullmatch``-es ``path[b:]`` for some '.' boundary ``b`` (0 or just after a '.'), else None.

    Literal keys (module names and paths: letters, digits, ``_``, ``-``, ``.`` = any character, ``\.``) are
    indexed by (length, positions of their wildcard dots): a suffix of the path is looked up in each group
    of its length with one integer AND and one dict probe, so 10,000 per-module keys cost about as much
    as 10. Other keys are regular expressions, compiled once and tried one by one (at most
    ``MAX_REGEX_KEYS``; each already passed the backtracking check). Keys that do not compile never match.
    """

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        # length -> [(ignore mask, {masked key bytes as int: first index})]
        self._literal: dict[int, dict[int, dict[int, int]]] = {}
        self._regex: list[tuple[int, re.Pattern[str]]] = []
        for i, k in enumerate(keys):
            if _is_literal(k):
                lit = k.replace(".", _WILD).replace("\\" + _WILD, ".").encode("ascii")
                ignore = int.from_bytes(lit.translate(_IGNORE), "little")
                group = self._literal.setdefault(len(lit), {}).setdefault(ignore, {})
                group.setdefault(int.from_bytes(lit, "little"), i)  # wildcard bytes are 0 already
                continue
            try:
                self._regex.append((i, re.compile(rf"(.*\.)?({k})$")))
            except re.error:
                continue

    def first(self, path: str) -> str | None:
        if not path.isascii():  # "." matches one character, not one byte: the plain rule, key by key
            return next((k for k in self.keys if _plain_match(k, path)), None)
        best: int | None = None
        if self._literal:
            raw = path.encode("ascii")
            starts = [0] + [i + 1 for i, c in enumerate(raw) if c == 0x2E]
            for b in starts:
                groups = self._literal.get(len(raw) - b)
                if not groups:
                    continue
                value = int.from_bytes(raw[b:], "little")
                for ignore, table in groups.items():
                    i = table.get(value & ~ignore)
                    if i is not None and (best is None or i < best):
                        best = i
        for i, pat in self._regex:
            if best is not None and i > best:
                break
            if pat.match(path):
                best = i
                break
        return None if best is None else self.keys[best]


_FORWARD_VARIANTS = (
    ("alora_invocation_tokens", "aLoRA (activated LoRA: the delta only from the invocation tokens on)"),
    ("use_qalora", "QALoRA (A applied to the input pooled over groups)"),
    ("arrow_config", "Arrow (per-token routing among task adapters)"),
    ("use_bdlora", "BD-LoRA (block-diagonal A or B)"),
    ("kasa_config", "KaSA (a singular-value diagonal between A and B, on an SVD-truncated base)"),
)
"""peft LoRA variants (``LoraConfig`` fields, peft 0.17-0.21) whose inference forward differs from plain LoRA:
refused. The variants whose eval forward is plain LoRA (VeLoRA, MonteCLoRA, MiCA) load; their training-only
tensors are skipped (``naming.TRAINING_STATE``)."""
_RESIDUAL_INITS = frozenset({"pissa", "olora", "corda", "loftq", "lora_ga"})


def _residual_init(init: str) -> bool:
    """Whether ``init_lora_weights`` names an init that also rewrites the base weights (PiSSA, including
    ``pissa_niter_<n>``, OLoRA, CorDA, LoftQ, LoRA-GA): an adapter saved without peft's conversion to plain
    LoRA expects that rewritten base (logged, not refused: peft itself loads it onto any base the same way)."""
    name = init.lower()
    return name in _RESIDUAL_INITS or name.startswith("pissa_niter_")

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
        with open_regular(path) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise fail(f"{CONFIG_NAME} is missing") from None
    except OSError as e:
        raise fail(f"cannot read {CONFIG_NAME}: {e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise fail(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        d = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)  # duplicates: refused
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
        if len(pat) > MAX_PATTERN_KEYS:
            raise fail(f"{pname} has {len(pat)} keys; at most {MAX_PATTERN_KEYS} are accepted")
        regex_keys = [k for k in pat if not _is_literal(k)]  # plain names cannot backtrack
        if len(regex_keys) > MAX_REGEX_KEYS:
            raise fail(f"{pname} has {len(regex_keys)} keys that are regular expressions (not plain module "
                       f"names); at most {MAX_REGEX_KEYS} are accepted")
        for k, v in pat.items():
            if len(k) > MAX_PATTERN_CHARS:
                raise fail(f"{pname} key {k!r:.80} is {len(k)} characters long; at most {MAX_PATTERN_CHARS} "
                           f"are accepted")
            if type(v) is int and 0 < v < 2**63 or type(v) is float and pname == "alpha_pattern" and (
                    -_F32_MAX <= v <= _F32_MAX):
                continue  # the common case, checked cheaply (10,000 keys)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (pname == "rank_pattern" and (
                    not isinstance(v, int) or v <= 0)):
                raise fail(f"{pname}[{k!r}] must be a positive number, got {v!r}")
            if not _finite_f32(v):
                raise fail(f"{pname}[{k!r}] must be finite (within float32 range), got {v!r:.40}")
        for k in regex_keys:
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
        bias=get("bias", (str,), "none"), modules_to_save=tuple(mts) if mts else None,
        training_variants=frozenset(k for k in TRAINING_STATE if d.get(k) is not None))
    if cfg.use_dora:
        raise UnsupportedAdapterError("DoRA (use_dora=true) is not supported", adapter=adapter, path=path)
    if cfg.bias != "none" or d.get("lora_bias"):
        raise UnsupportedAdapterError(f"LoRA bias (bias={cfg.bias!r}, lora_bias={d.get('lora_bias')!r}) "
                                      f"is not supported", adapter=adapter, path=path)
    if cfg.fan_in_fan_out:
        raise UnsupportedAdapterError("fan_in_fan_out=true (Conv1D models) is not supported",
                                      adapter=adapter, path=path)
    if d.get("layer_replication"):
        raise UnsupportedAdapterError("layer_replication is not supported", adapter=adapter, path=path)
    for key, what in _FORWARD_VARIANTS:
        if d.get(key):
            raise UnsupportedAdapterError(f"{what} ({key}={d[key]!r:.80}) is not supported: its forward is not "
                                          f"x @ A^T @ B^T * scaling, so loading it as plain LoRA would give outputs "
                                          f"other than peft's (refused, never ignored)", adapter=adapter, path=path)
    init = d.get("init_lora_weights")
    if isinstance(init, str) and _residual_init(init):
        log.warning("adapter %r: init_lora_weights=%r was saved without peft's conversion "
                    "(path_initial_model_for_weight_conversion): its A/B were trained on a base whose weights "
                    "that init changed; its outputs match peft's only on that modified base", adapter, init)
    if d.get("trainable_token_indices"):
        raise UnsupportedAdapterError(
            "trainable_token_indices is not supported: added or retrained token embeddings (peft trainable "
            "tokens) are refused, never ignored", adapter=adapter, path=path)
    return cfg, raw



"""LoRAConfig: the manager's settings, their defaults and their bounds (the one place for both).

Every knob is type- and range-checked at construction with an error naming the field, so nothing
fails later deep inside (an ``inf`` timeout in ``timedelta``, a ``NaN`` that disables a deadline, a
float rank in ``torch.zeros``, a billion slots in the allocator). Other layers (the run config, the
transfer engine) read the defaults from here: ``DEFAULTS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch

from ..errors import ConfigError
from ..format.fingerprint import DEFAULT_SAMPLE_BYTES
from ..format.dtypes import serving_dtype
from ..format.modules import POOL_MODULES
from ..device.mapper import MapReads
from ..device.place import PlacementMode
from ..host.uring import ReadBackend
from ..plan.packing import ReadMode

DTypeName = Literal["bfloat16", "bf16", "float16", "fp16", "float32", "fp32"]
PinMode = Literal["register", "caching"]
MAX_TIMEOUT_S = 86400.0  # a day: longer is a mistake (and overflows nothing)


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Per-rank manager settings."""

    max_loras: int = 4
    """GPU slots: adapters usable in batches at once (1..4096)."""
    max_lora_rank: int = 64
    """Slot rank; smaller adapters are zero-padded, larger ones are refused at register (1..65536)."""
    target_modules: tuple[str, ...] = POOL_MODULES
    """Pool modules to allocate (canonical names; those the model lacks are skipped)."""
    host_cache_bytes: int = 8 << 30
    """Budget of the pinned host cache (this rank's slices of cached adapters)."""
    dtype: DTypeName = "bfloat16"
    """Serving dtype of the pool; adapters in other float dtypes are cast on the device."""
    device: str = "cpu"
    chunk_bytes: int = 64 << 20
    """Cache and placement unit: a warm activation is one H2D copy per chunk (64 MiB copies reach the
    PCIe peak; 4 MiB ones about half of it) and one device copy per (module, side) in it."""
    part_bytes: int | None = None
    """Cold pipeline unit (default chunk_bytes / 8): read+pack of part n+1 overlaps the H2D of part n."""
    ring_slots: int = 3
    """Host buffers for streamed (uncached) adapters: in-flight bound = ring_slots * chunk_bytes (2..64)."""
    read_workers: int | None = None
    """Reader threads of the cold pipeline (preadv releases the GIL: parts are read in parallel); None:
    one per core this process may run on (1..256)."""
    read_backend: ReadBackend = "auto"
    """How readers issue reads: "io_uring" (each part's reads in one submission: reading only owned bytes
    of row slices costs no Python per row), "preadv" (one call per read), "auto" (io_uring where this
    kernel and its seccomp profile allow a ring, else preadv). The cost model of read_mode "auto" follows."""
    native_reads: bool = True
    """Issue each part's reads from a small C loop (``tp_lora/host/native.c``, compiled once per machine
    with the system C compiler at first use, cached under ``$TP_LORA_CACHE_DIR`` or ``~/.cache/tp_lora``),
    one call per part without the GIL; where it cannot be built (no compiler, ``TP_LORA_NATIVE=0``) the
    readers' Python loop reads the same bytes. False: always the Python loop."""
    map_reads: MapReads = "off"
    """Copy a cached cold load's last chunks to the GPU straight from the page cache (their pages pinned
    in place with a read-only ``cudaHostRegister``, no CPU copy) while the readers take the first ones
    (``tp_lora/device/mapper.py``); the cache's copy of those chunks is read after the load. "auto": on
    CUDA, for plans of at least 512 MiB whose chunks are few large file ranges in the page cache; "on":
    every cached cold load through the C batch (on CPU the same claims run with ``preadv``: tests);
    "off" (the default until it is measured faster on the device: docs/PERF_NOTES.md rows 53-55): the
    readers read every byte. A driver or file system that refuses turns it off (one warning)."""
    read_ahead: int | None = None
    """Parts of a cached cold load read ahead of the copy (their buffers are the cache entry's, so this
    bounds no memory, only how far readers run past a slow part); None: read_workers + 1 (1..65536)."""
    read_mode: ReadMode = "auto"
    """How slices of many short rows are read: "exact" (only owned bytes, one read per row), "span"
    (the row range once, then sliced), "auto" (the read backend's cost model per slice; with io_uring,
    rows a few kB apart share one request, their gaps read into scratch and dropped). The cache holds
    owned bytes only."""
    placement: PlacementMode = "auto"
    """How a packed chunk reaches its slot on the device: "kernel" (one Triton launch per chunk copies,
    casts and value-checks every tensor group in it), "copies" (one strided copy per group plus torch
    checks), "auto" (the kernel on CUDA when Triton imports, else the copies)."""
    pin_workers: int = 2
    """Threads allocating (pinning) chunk buffers ahead of the readers."""
    activation_timeout_s: float = 60.0
    """Bound of each agreement exchange (a peer later than this makes every rank roll back)."""
    load_timeout_s: float = 600.0
    """Bound of this rank's own loads inside one ``activate`` (a hung read fails with LoadTimeoutError)."""
    check_finite: bool = True
    """Reject adapters holding NaN/Inf (checked on the device as data arrives)."""
    allow_pickle: bool = False
    pin_mode: PinMode = "register"
    """CUDA host memory for the cache: "register" (anonymous huge-page mapping + cudaHostRegister:
    pinned bytes == requested bytes, ~2x faster to pin here) or "caching" (torch's pinned caching
    allocator, which rounds each request up to a power of two)."""
    fingerprint_sample_bytes: int = DEFAULT_SAMPLE_BYTES
    """Tensor bytes hashed at register for the content fingerprint (>= the file: every byte)."""

    def __post_init__(self) -> None:
        _int(self, "max_loras", 1, 4096)
        _int(self, "max_lora_rank", 1, 1 << 16)
        _int(self, "host_cache_bytes", 0, 1 << 50)
        _int(self, "chunk_bytes", 4096, 1 << 34)
        if self.part_bytes is not None:
            _int(self, "part_bytes", 4096, self.chunk_bytes)
        _int(self, "ring_slots", 2, 64)
        if self.read_workers is not None:
            _int(self, "read_workers", 1, 256)
        if self.read_ahead is not None:
            _int(self, "read_ahead", 1, 1 << 16)
        _int(self, "pin_workers", 1, 64)
        _int(self, "fingerprint_sample_bytes", 4096, 1 << 50)
        for f in ("activation_timeout_s", "load_timeout_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{f} must be a number of seconds, got {type(v).__name__} {v!r}")
            if not math.isfinite(v) or not 0 < v <= MAX_TIMEOUT_S:
                raise ConfigError(f"{f} must be finite, > 0 and <= {MAX_TIMEOUT_S:g} s, got {v!r}")
        for f in ("check_finite", "allow_pickle", "native_reads"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"{f} must be True or False, got {getattr(self, f)!r}")
        _choice(self, "dtype", DTypeName)
        _choice(self, "pin_mode", PinMode)
        _choice(self, "read_mode", ReadMode)
        _choice(self, "placement", PlacementMode)
        _choice(self, "read_backend", ReadBackend)
        _choice(self, "map_reads", MapReads)
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a string like 'cpu' or 'cuda:0', got {self.device!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"device {self.device!r} is not a torch device: {e}") from None
        tm = self.target_modules
        if isinstance(tm, str) or not all(isinstance(m, str) for m in tm):
            raise ConfigError(f"target_modules must be a tuple of module names, got {tm!r}")
        bad = [m for m in tm if m not in POOL_MODULES]
        if bad:
            raise ConfigError(f"unknown target module(s) {bad}; known: {list(POOL_MODULES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return serving_dtype(self.dtype)


def _int(cfg: LoRAConfig, f: str, lo: int, hi: int) -> None:
    v = getattr(cfg, f)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{f} must be an integer, got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(f"{f} must be in [{lo}, {hi}], got {v}")


def _choice(cfg: LoRAConfig, f: str, lit: object) -> None:
    v = getattr(cfg, f)
    if v not in get_args(lit):
        raise ConfigError(f"{f} {v!r} is not one of {sorted(get_args(lit))}")


#: the defaults, for layers that build engines or configs of their own (RunConfig, TransferEngine)
DEFAULTS = {f.name: f.default for f in fields(LoRAConfig) if f.name != "target_modules"}

"""Exception types of tp_lora.

Every error the library raises on bad input or a failed load is one of these, so that an engine can
catch ``TPLoRAError`` and know the failure is about an adapter or a layout, not a bug of its own.
Messages name the adapter, the tensor, the rank, and the expected and actual values where they apply.
"""

from __future__ import annotations


class TPLoRAError(Exception):
    """Base class of every tp_lora error."""


class LayoutError(TPLoRAError, ValueError):
    """A model or parallel layout is illegal (a size does not divide, a rank is out of range)."""


class ConfigError(TPLoRAError, ValueError):
    """A run config, model preset or manager config is invalid."""


class AdapterError(TPLoRAError):
    """An adapter on disk is unusable. ``adapter`` and ``path`` say which one."""

    def __init__(self, message: str, *, adapter: str | None = None, path: str | None = None):
        self.adapter = adapter
        self.path = path
        prefix = []
        if adapter is not None:
            prefix.append(f"adapter {adapter!r}")
        if path is not None:
            prefix.append(f"({path})")
        full = (" ".join(prefix) + ": " + message) if prefix else message
        super().__init__(full)
        self.reason = message


class AdapterFormatError(AdapterError):
    """The files are malformed: bad JSON, bad safetensors header, bad offsets, truncated data."""


class AdapterConfigError(AdapterError):
    """``adapter_config.json`` is missing, not JSON, has wrong types or asks for an unsupported feature."""


class AdapterShapeError(AdapterError):
    """A tensor's shape, dtype or name does not fit the model (expected vs actual is in the message)."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT feature we do not implement (DoRA, bias, full-weight modules_to_save, pickles)."""


class AdapterDataError(AdapterError):
    """Tensor data is bad when read (NaN/Inf, file changed or vanished since registration)."""


class PoolError(TPLoRAError):
    """The GPU pool cannot satisfy a request."""


class NoFreeSlotError(PoolError):
    """Every slot is held by a running batch; the engine should finish batches and retry."""


class AdapterStateError(TPLoRAError):
    """An operation does not fit the adapter's state (unknown name, not active, re-registration)."""


class AdapterActivationError(TPLoRAError):
    """Activation failed on at least one rank; every rank raised it and rolled back.

    ``failed_ranks`` maps each failing rank to its reason (as far as this rank learned it).
    """

    def __init__(self, message: str, *, adapters: list[str], failed_ranks: dict[int, str]):
        super().__init__(message)
        self.adapters = list(adapters)
        self.failed_ranks = dict(failed_ranks)


class CollectiveTimeoutError(AdapterActivationError):
    """A peer rank did not arrive at the activation collective within the configured timeout (or the
    group is unusable after such a failure): the group is broken, ``attach_group`` a new one."""


class AdapterInDoubtError(CollectiveTimeoutError):
    """The commit exchange did not complete on this rank after an all-ok verdict: a peer may have
    committed, so the adapters stay loaded but unusable ("in doubt") until ``attach_group`` resolves
    them the same way on every rank."""


class ActivationCallError(AdapterActivationError, AdapterStateError):
    """The activate call itself is invalid (duplicate or non-string names, more names than slots);
    agreed like any verdict, so every rank raises it."""


class LoadTimeoutError(AdapterDataError):
    """This rank's load did not finish within ``LoRAConfig.load_timeout_s`` (a hung or very slow read)."""

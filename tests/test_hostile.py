"""The hostile-adapter corpus (tests/support/hostile_corpus.py) thrown at one LoRAManager.

For every case: the exact exception type and a message naming the file and the problem. Cases whose
problem shows in the header raise at ``register`` with no pinned/host buffer allocated and nothing
changed in the cache or the pool; data-level cases raise ``AdapterActivationError`` at ``activate`` and
the partial load is rolled back. Across the whole corpus the serving adapters stay bit-identical (slot
checksums) and, once everything is unregistered, zero pinned bytes remain.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from support.hostile_corpus import (CORPUS_MAX_RANK, Case, build_corpus, corpus_model, write_good,
                                    write_malicious_pickle)
from support.runtime_ref import new_manager

from tp_lora.errors import AdapterActivationError, AdapterFormatError, TPLoRAError
from tp_lora.runtime.manager import LoRAManager

CHUNK = 4096  # the smallest chunk: a load is many chunks, so failures land mid-transfer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return build_corpus(tmp_path_factory.mktemp("hostile"))


def _manager(**kw: Any) -> LoRAManager:
    cfg = dict(max_loras=3, max_lora_rank=CORPUS_MAX_RANK, chunk_bytes=CHUNK, host_cache_bytes=1 << 20,
               dtype="bfloat16")
    cfg.update(kw)
    return new_manager(corpus_model(), **cfg)


class _AllocCounter:
    """Counts host (pinned on CUDA) buffer allocations of the cache and the streaming ring."""

    def __init__(self, mgr: LoRAManager):
        self.calls = 0
        self.nbytes = 0
        for owner, attr in ((mgr.cache, "_alloc"), (mgr.device, "alloc_host")):
            setattr(owner, attr, self._wrap(getattr(owner, attr)))

    def _wrap(self, fn: Any) -> Any:
        def alloc(n: int) -> torch.Tensor:
            self.calls += 1
            self.nbytes += n
            return fn(n)
        return alloc


def _snapshot(mgr: LoRAManager) -> dict[str, Any]:
    st = mgr.stats()
    return {
        "pinned_bytes_now": st.pinned_bytes_now, "pinned_planned_now": st.pinned_planned_now,
        "cache_reserved": mgr.cache.reserved_bytes, "cache_entries": sorted(mgr.cache.names()),
        "slot_name": list(mgr.pool.slot_name), "refcount": list(mgr.pool.refcount),
        "reserved": list(mgr.pool.reserved), "registered": sorted(mgr.registered()), "active": sorted(st.active),
    }


def _check_message(case: Case, e: BaseException) -> None:
    assert type(e) is case.exc, f"{case.name}: expected {case.exc.__name__}, got {type(e).__name__}: {e}"
    msg = str(e)
    assert f"'{case.name}'" in msg, f"{case.name}: the message does not name the adapter: {msg}"
    for s in case.substrings:
        assert s in msg, f"{case.name}: {s!r} not in {msg!r}"


def test_corpus_is_complete(corpus: list[Case]) -> None:
    names = [c.name for c in corpus]
    assert len(names) == len(set(names))
    assert len(corpus) >= 30
    assert all(c.stage in ("register", "activate") for c in corpus)
    assert all(issubclass(c.exc, TPLoRAError) for c in corpus)
    stages = collections.Counter(c.stage for c in corpus)
    assert stages["register"] >= 30 and stages["activate"] >= 4
    # every folder the generator promised exists (except the one that must not)
    for c in corpus:
        assert Path(c.path).exists() or c.name == "folder_missing", c.name


def test_corpus_against_one_manager(corpus: list[Case]) -> None:
    mgr = _manager()
    counter = _AllocCounter(mgr)
    root = Path(corpus[0].path).parent
    # two serving adapters: one held by a running batch, one idle; both must come out bit-identical
    for i, n in enumerate(("serve_held", "serve_idle")):
        mgr.register(n, write_good(root / f"_{n}", seed=10 + i))
    mgr.activate(["serve_held", "serve_idle"])
    batch = mgr.prepare_batch(["serve_held", None], [3, 2])
    serving = {n: (mgr.slot_of(n), mgr.pool.checksum(mgr.slot_of(n))) for n in ("serve_held", "serve_idle")}
    serving_pinned = mgr.stats().pinned_bytes_now
    assert serving_pinned > 0  # both are cached (the budget holds them)

    raised: collections.Counter[str] = collections.Counter()
    for case in corpus:
        before = _snapshot(mgr)
        allocs = counter.calls
        if case.stage == "register":
            with pytest.raises(TPLoRAError) as ei:
                mgr.register(case.name, case.path)
            _check_message(case, ei.value)
            assert counter.calls == allocs, f"{case.name}: host memory allocated for a header-visible problem"
            assert _snapshot(mgr) == before, f"{case.name}: register changed the manager's state"
        else:
            mgr.register(case.name, case.path)
            if case.after_register is not None:
                case.after_register(Path(case.path))
            with pytest.raises(TPLoRAError) as ei:
                mgr.activate(case.name)
            _check_message(case, ei.value)
            assert isinstance(ei.value, AdapterActivationError)
            assert set(ei.value.failed_ranks) == {0}
            assert not mgr.is_active(case.name)
            after = _snapshot(mgr)
            # rolled back: the slot is free again, its scalings are zero, the failed cache fill is gone
            assert after["slot_name"] == before["slot_name"], case.name
            assert after["pinned_bytes_now"] == before["pinned_bytes_now"], case.name
            assert after["cache_reserved"] == before["cache_reserved"], case.name
            for sc in mgr.pool.scaling.values():
                assert not bool(sc[2].any()), f"{case.name}: the rolled-back slot still has scalings"
            mgr.unregister(case.name)
            assert _snapshot(mgr) == before, case.name
        raised[case.exc.__name__] += 1
        for n, (slot, digest) in serving.items():
            assert mgr.slot_of(n) == slot and mgr.pool.checksum(slot) == digest, f"{case.name} touched {n}"

    st = mgr.stats()
    assert st.pinned_bytes_now == serving_pinned  # leaked pinned bytes: 0
    assert st.failed_activations == sum(c.stage == "activate" for c in corpus)
    batch.release()
    mgr.unregister("serve_held")
    mgr.unregister("serve_idle")
    st = mgr.stats()
    assert st.pinned_bytes_now == 0 and st.pinned_planned_now == 0 and mgr.cache.reserved_bytes == 0
    assert mgr.pool.slot_name == [None] * 3 and mgr.pool.refcount == [0] * 3 and mgr.registered() == []
    mgr.close()
    print(f"\nhostile corpus: {len(corpus)} cases, {dict(raised)}, leaked pinned bytes 0")


def test_nan_check_can_be_skipped(corpus: list[Case]) -> None:
    by_name = {c.name: c for c in corpus}
    with _manager(check_finite=False) as mgr:
        for n in ("nan_values", "inf_values"):
            mgr.register(n, by_name[n].path)
            slot = mgr.activate(n)[n]
            v = mgr.pool.B["v"][slot]
            assert not bool(torch.isfinite(v).all())  # loaded as is: the engine opted out of the check
        assert mgr.stats().failed_activations == 0


def test_nan_rejection_is_repeatable_and_frees_everything(corpus: list[Case]) -> None:
    """A rejected NaN adapter keeps no pinned bytes (the cache fill is dropped), so a retry reads the file
    again and is rejected again; nothing accumulates."""
    nan = Path({c.name: c for c in corpus}["nan_values"].path)
    with _manager() as mgr:
        mgr.register("n", nan)
        for _ in range(3):
            with pytest.raises(AdapterActivationError, match="NaN/Inf values in adapter_model.safetensors"):
                mgr.activate("n")
            st = mgr.stats()
            assert st.pinned_bytes_now == 0 and mgr.cache.reserved_bytes == 0
            assert mgr.pool.slot_name == [None] * 3 and not mgr.is_active("n")
        assert mgr.stats().cold_loads == 3 and mgr.stats().warm_loads == 0


def test_pickle_opt_in_uses_weights_only(corpus: list[Case], tmp_path: Path) -> None:
    pickle_case = {c.name: c for c in corpus}["pickle_only"]
    with _manager(allow_pickle=True) as mgr:
        mgr.register("p", pickle_case.path)
        slot = mgr.activate("p")["p"]
        assert bool(mgr.pool.A["q"][slot].any())
        evil = write_malicious_pickle(tmp_path / "evil")
        with pytest.raises(AdapterFormatError, match="weights_only") as ei:
            mgr.register("evil", evil)
        assert "adapter_model.bin" in str(ei.value)


def test_header_only_register_on_huge_claims(corpus: list[Case]) -> None:
    """A header claiming petabytes costs nothing at register (no allocation, no data read)."""
    by_name = {c.name: c for c in corpus}
    with _manager() as mgr:
        counter = _AllocCounter(mgr)
        for n in ("petabyte_tensor", "petabyte_shape_small_offsets", "header_length_over_limit"):
            with pytest.raises(AdapterFormatError):
                mgr.register(n, by_name[n].path)
        assert counter.calls == 0 and math.isclose(mgr.stats().bytes_read, 0)

"""The only module that issues collectives: activation agreement.

One all-reduce (SUM, float64) of a small vector tells every rank, for each adapter of the activation:
which ranks failed (one-hot flags), whether slots, generations and adapter fingerprints agree (sum and sum
of squares satisfy sum^2 == W * sum of squares only if every rank sent the same x), and each failing rank's
short reason (its bytes sit in that rank's own segment, zero elsewhere, so the sum reveals them). Every
rank decodes the same vector, so every rank raises the same error text, or none does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..errors import AdapterActivationError, CollectiveTimeoutError

REASON_BYTES = 160
#: pass as ``group`` for a rank-local manager (a single-process reference inside a distributed job)
LOCAL = "local"


@dataclass
class RankVerdict:
    ok: bool
    slot: int
    generation: int
    reason: str = ""
    fingerprint: int = 0  # a short digest of the registered files: every rank must hold the same adapter


@dataclass
class Agreement:
    ok: bool
    failed: dict[str, dict[int, str]]  # adapter -> {rank: reason}
    disagreement: list[str]  # human-readable slot/generation mismatches

    def message(self, names: list[str]) -> str:
        parts = []
        for n, ranks in self.failed.items():
            rk = ", ".join(f"rank {r}: {why}" for r, why in sorted(ranks.items()))
            parts.append(f"adapter {n!r} failed on rank(s) {sorted(ranks)} ({rk})")
        parts += self.disagreement
        return f"activation of {names} rolled back on every rank: " + "; ".join(parts)


class Collective:
    """Wraps the process group; counts the collectives it issues (tests check there is exactly one
    per activation). ``group=None`` means the default group when one is initialised, else a single
    rank; ``group=LOCAL`` forces a single rank."""

    def __init__(self, group: Any = None, device: torch.device | str = "cpu", timeout_s: float = 60.0):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.timeout_s = timeout_s
        self.calls = 0
        self.broken: str | None = None
        if isinstance(group, str) and group == LOCAL:
            self.group = None
            self.world, self.rank, self.device = 1, 0, torch.device("cpu")
        elif dist.is_available() and dist.is_initialized():
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            backend = dist.get_backend(group)
            self.device = torch.device(device) if backend == "nccl" else torch.device("cpu")
        else:
            self.world, self.rank, self.device = 1, 0, torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.broken:
            raise CollectiveTimeoutError(
                f"the process group is unusable after an earlier failure ({self.broken}); restart the group",
                adapters=[], failed_ranks={})
        if self.world == 1:
            return t
        self.calls += 1
        x = t.to(self.device)
        work = self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
        deadline = time.monotonic() + self.timeout_s
        try:
            while not work.is_completed():
                if time.monotonic() > deadline:
                    self.broken = f"a peer did not arrive within {self.timeout_s:.1f}s"
                    raise TimeoutError(self.broken)
                time.sleep(0.0005)
            work.wait(timeout=timedelta(seconds=max(1.0, self.timeout_s)))
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 - gloo/NCCL report a dead peer as RuntimeError etc.
            self.broken = f"collective failed: {type(e).__name__}: {e}"
            raise TimeoutError(self.broken) from e
        return x.cpu()


def agree(coll: Collective, names: list[str], verdicts: list[RankVerdict]) -> Agreement:
    """The activation collective. Pure decoding around exactly one all-reduce."""
    W, me, n = coll.world, coll.rank, len(names)
    per = W + 6 + W * REASON_BYTES
    vec = torch.zeros(n * per, dtype=torch.float64)
    for i, v in enumerate(verdicts):
        base = i * per
        if not v.ok:
            vec[base + me] = 1.0
            raw = v.reason.encode("utf-8", "replace")[:REASON_BYTES]
            seg = base + W + 6 + me * REASON_BYTES
            vec[seg:seg + len(raw)] = torch.tensor(list(raw), dtype=torch.float64)
        vec[base + W] = v.slot
        vec[base + W + 1] = v.slot * v.slot
        vec[base + W + 2] = v.generation
        vec[base + W + 3] = v.generation * v.generation
        vec[base + W + 4] = v.fingerprint
        vec[base + W + 5] = v.fingerprint * v.fingerprint
    try:
        out = coll.all_reduce_sum(vec)
    except TimeoutError as e:
        raise CollectiveTimeoutError(
            f"activation of {names} on rank {me}: {e}; no adapter was activated on this rank",
            adapters=names, failed_ranks={}) from None
    failed: dict[str, dict[int, str]] = {}
    disagree: list[str] = []
    for i, name in enumerate(names):
        base = i * per
        for r in range(W):
            if out[base + r] > 0.5:
                seg = base + W + 6 + r * REASON_BYTES
                raw = bytes(int(b) for b in out[seg:seg + REASON_BYTES].tolist() if 0 < b < 256)
                failed.setdefault(name, {})[r] = raw.decode("utf-8", "replace")
        if name in failed:
            continue
        # integers (exact: every sum is far below 2**53); compare in Python ints, not float products
        s, s2, g, g2, f, f2 = (int(round(float(out[base + W + k]))) for k in range(6))
        if s * s != W * s2:
            disagree.append(f"adapter {name!r}: ranks chose different GPU slots (sum {s:g}, sum of squares "
                            f"{s2:g} over {W} ranks)")
        if g * g != W * g2:
            disagree.append(f"adapter {name!r}: ranks hold different registrations (generations differ)")
        if f * f != W * f2:
            disagree.append(f"adapter {name!r}: ranks registered different files under this name (adapter "
                            f"fingerprints differ)")
    return Agreement(ok=not failed and not disagree, failed=failed, disagreement=disagree)


def raise_for(agreement: Agreement, names: list[str]) -> None:
    if agreement.ok:
        return
    failed_ranks: dict[int, str] = {}
    for ranks in agreement.failed.values():
        failed_ranks.update(ranks)
    raise AdapterActivationError(agreement.message(names), adapters=names, failed_ranks=failed_ranks)

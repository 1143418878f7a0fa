"""BatchInfo: what the layer ops need to apply the right adapter to each token of a mixed batch.

Built once per batch (not per layer): per-token slot ids on the device, and per slot the token indices
that use it, so every layer op does one gather + two matmuls + one index_add per adapter present.
Holding a BatchInfo holds a reference on each slot it uses: those slots are never evicted until
``release()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class BatchInfo:
    token_slots: torch.Tensor  # [T] int64 on the pool device; -1 = no adapter
    request_slots: tuple[int, ...]  # slot per request (-1 = none)
    request_adapters: tuple[str | None, ...]
    seg_starts: tuple[int, ...]  # first token of each request
    seg_lens: tuple[int, ...]
    slot_tokens: dict[int, torch.Tensor]  # slot -> [n] int64 token indices (device)
    slot_ranks: dict[int, int]  # slot -> the adapter's largest rank
    slot_ids: torch.Tensor | None = None  # [S_b] int64 (device): the slots of this batch, sorted
    _release: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.numel())

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(sorted(self.slot_tokens))

    def release(self) -> None:
        """Drop the slot references (call when the batch's forward is done). Idempotent."""
        if self._release is not None:
            fn, self._release = self._release, None
            fn()

    def __enter__(self) -> "BatchInfo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def build_batch(request_slots: list[int], request_adapters: list[str | None], tokens_per_request: list[int],
                slot_ranks: dict[int, int], device: torch.device,
                release: Callable[[], None] | None) -> BatchInfo:
    starts, pos = [], 0
    for n in tokens_per_request:
        starts.append(pos)
        pos += n
    per_token = torch.repeat_interleave(torch.tensor(request_slots, dtype=torch.int64),
                                        torch.tensor(tokens_per_request, dtype=torch.int64))
    cuda = device.type == "cuda"

    def put(t: torch.Tensor) -> torch.Tensor:
        # pinned + non_blocking: no host synchronisation with the compute stream
        return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

    slot_tokens = {}
    for s in sorted(set(request_slots)):
        if s < 0:
            continue
        idx = torch.nonzero(per_token == s, as_tuple=False).flatten()
        slot_tokens[s] = put(idx)
    return BatchInfo(token_slots=put(per_token), request_slots=tuple(request_slots),
                     request_adapters=tuple(request_adapters), seg_starts=tuple(starts),
                     seg_lens=tuple(tokens_per_request), slot_tokens=slot_tokens,
                     slot_ranks={s: slot_ranks[s] for s in slot_tokens},
                     slot_ids=put(torch.tensor(sorted(slot_tokens), dtype=torch.int64)), _release=release)

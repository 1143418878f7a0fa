"""The only module that issues collectives: activation agreement (docs/HOSTILE.md, "Agreement").

Protocol (two all-reduces per activation, both of ONE fixed size):

1. **verdict**: every rank sends, in its own segment of an int64 vector (zeros elsewhere, so the SUM
   is an all-gather), its view of the call: the digest and length of the ordered name list, the first
   bytes of every name, a digest of what it has active before the call, and per adapter ok / slot /
   content fingerprint / short reason. Every rank decodes the same vector with the same pure function
   (:func:`decide`), so every rank reaches the same verdict and raises the same text, or none does.
2. **commit**: only after an all-ok verdict; a rank commits when this second exchange completes.

The message size depends only on (world size, ``max_loras``), never on the call: lists of different
lengths, names or orders are an agreed error, not a gloo size mismatch. Order matters (slots are
assigned in list order): a different order on some rank is rejected, identically everywhere.

No split: a rank that gives up on the verdict exchange (timeout, lost peer, interrupt) rolls back, and
no peer can commit, because committing needs that rank's commit message, which it never sends. A rank
that gives up on the *commit* exchange has sent its commit message, so a peer may have committed: it
keeps the adapters **in doubt** (loaded, slot held, unusable in batches) and ``attach_group`` resolves
them on every rank the same way (commit iff every rank holds them committed or in doubt). Either way
the group is marked broken and never used again by this rank (gloo's ``abort`` does not stop a late
peer from completing against data already sent, so correctness does not rest on it; NCCL
communicators are aborted to free the device).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import AdapterActivationError, AdapterStateError, CollectiveTimeoutError

log = logging.getLogger(__name__)

#: pass as ``group`` for a rank-local manager (a single-process reference inside a distributed job)
LOCAL = "local"

MAGIC = 0x7A1_0000
KIND_VERDICT, KIND_COMMIT, KIND_STATE = 1, 2, 3
TEXT_WORDS = 23  # 161 bytes of reason per entry / per call
NAME_WORDS = 5  # the first 35 bytes of each name travel for error messages
_HDR = 7 + TEXT_WORDS  # kind, epoch, n_names, list digest, state digest, flags, evicted digest, call reason
_ENT = 1 + NAME_WORDS + 3 + TEXT_WORDS  # name digest, name prefix, status, slot + 1, fingerprint, reason
_MASK = (1 << 62) - 1
ST_OK, ST_FAIL = 1, 2
#: reconcile states per slot
SLOT_EMPTY, SLOT_ACTIVE, SLOT_IN_DOUBT = 0, 1, 2
FLAG_CALL, FLAG_OVERFLOW = 1, 2


@functools.lru_cache(maxsize=4096)
def _digest_str(s: str) -> int:
    return digest62(s)


def digest62(*parts: Any) -> int:
    """A 62-bit digest (exact in int64 sums); ``parts`` are repr'd, so any value is accepted."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        b = p.encode("utf-8", "surrogatepass") if isinstance(p, str) else repr(p).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return int.from_bytes(h.digest(), "little") & _MASK


@functools.lru_cache(maxsize=4096)
def _pack(text: str, words: int) -> tuple[int, ...]:
    """``text`` (utf-8, cut to ``words`` x 7 bytes) as 7-byte little-endian words: non-negative int64
    values that travel unchanged through a SUM with zeros. Cached: names and reasons repeat."""
    if not text:
        return (0,) * words
    raw = text.encode("utf-8", "replace")[:words * 7].ljust(words * 7, b"\0")
    return tuple(int.from_bytes(raw[i * 7:(i + 1) * 7], "little") for i in range(words))


def _unpack(ws: Sequence[int]) -> str:
    if not any(ws):
        return ""
    raw = b"".join(int(w).to_bytes(7, "little") for w in ws).rstrip(b"\0")
    return raw.decode("utf-8", "replace")


def block_size(max_loras: int) -> int:
    return _HDR + max_loras * _ENT


@dataclass
class Entry:
    name: str
    ok: bool
    slot: int
    fingerprint: int
    reason: str = ""


@dataclass
class RankMessage:
    """One rank's segment, decoded."""

    kind: int
    epoch: int
    n_names: int
    list_digest: int
    state_digest: int
    flags: int
    call_reason: str
    entries: list[Entry] = field(default_factory=list)
    evicted: int = 0  # digest of the active adapters this call evicted here (slots taken for its loads)
    name_digests: list[int] = field(default_factory=list)


def encode(msg: RankMessage, rank: int, world: int, max_loras: int) -> torch.Tensor:
    """This rank's message in its segment of a ``world x block_size(max_loras)`` int64 vector, zeros
    elsewhere (so that a SUM all-reduce is an all-gather). Built as bytes and wrapped without a copy: the
    exchange of a small world costs microseconds, not the tens that per-element tensor ops would."""
    B = block_size(max_loras)
    seg: list[int] = [MAGIC + msg.kind, msg.epoch, msg.n_names, msg.list_digest, msg.state_digest, msg.flags,
                      msg.evicted]
    seg += _pack(msg.call_reason, TEXT_WORDS)
    for e in msg.entries[:max_loras]:
        seg.append(_digest_str(e.name))
        seg += _pack(e.name, NAME_WORDS)
        seg += (ST_OK if e.ok else ST_FAIL, e.slot + 1, e.fingerprint & _MASK)
        seg += _pack(e.reason, TEXT_WORDS)
    buf = bytearray(world * B * 8)
    struct.pack_into(f"<{len(seg)}q", buf, rank * B * 8, *seg)
    return torch.frombuffer(buf, dtype=torch.int64)


def decode(vec: torch.Tensor, world: int, max_loras: int) -> list[RankMessage]:
    """Every rank's message from the summed vector. Ranks whose segments are equal share one (read-only)
    RankMessage object: in the usual all-agree case a world of any size decodes one segment."""
    B = block_size(max_loras)
    rows = vec.reshape(world, B)
    same = (rows == rows[0]).all(dim=1).tolist() if world > 1 else [True]
    out: list[RankMessage] = []
    names: dict[tuple[int, ...], str] = {}  # the same names arrive from every rank: unpack each once
    for r in range(world):
        if r and same[r]:  # ranks that agree send the same segment: rank 0's decoded message serves them
            out.append(out[0])
            continue
        s = rows[r].tolist()
        kind = s[0] - MAGIC
        n = max(0, min(s[2], max_loras))
        m = RankMessage(kind=kind, epoch=s[1], n_names=s[2], list_digest=s[3], state_digest=s[4], flags=s[5],
                        evicted=s[6], call_reason=_unpack(s[7:7 + TEXT_WORDS]))
        for i in range(n):
            e = s[_HDR + i * _ENT:_HDR + (i + 1) * _ENT]
            m.name_digests.append(e[0])
            key = tuple(e[1:1 + NAME_WORDS])
            name = names.get(key)
            if name is None:
                name = names[key] = _unpack(key)
            m.entries.append(Entry(name=name, ok=e[1 + NAME_WORDS] == ST_OK,
                                   slot=e[2 + NAME_WORDS] - 1, fingerprint=e[3 + NAME_WORDS],
                                   reason=_unpack(e[4 + NAME_WORDS:4 + NAME_WORDS + TEXT_WORDS])))
        out.append(m)
    return out


@dataclass
class Decision:
    """What every rank concluded from the same decoded vector (hence identical everywhere)."""

    ok: bool
    message: str = ""
    failed_ranks: dict[int, str] = field(default_factory=dict)
    call_error: bool = False  # the call itself was bad (duplicates, too many names, non-string names)
    out_of_step: bool = False  # not one activation on every rank: the group must be re-attached
    state_differs: bool = False  # the ranks' active sets differed before the call: reconcile now
    evictions_differ: bool = False  # a failed call evicted different active adapters on different ranks
    lists_differ: bool = False  # the ranks were asked for different lists (their LRU updates differ too)


def _show(m: RankMessage) -> str:
    names = [e.name for e in m.entries]
    more = f" +{m.n_names - len(names)} more" if m.n_names > len(names) else ""
    return f"{names}{more}"


def _groups(values: list[Any]) -> list[list[int]]:
    """Ranks grouped by equal value, largest group first (ties: lowest rank first)."""
    by: dict[Any, list[int]] = {}
    for r, v in enumerate(values):
        by.setdefault(v, []).append(r)
    return sorted(by.values(), key=lambda rs: (-len(rs), rs[0]))


def decide(msgs: list[RankMessage], kind: int = KIND_VERDICT) -> Decision:
    """The agreed verdict of one activation (pure: every rank runs it on the same input). A failed call
    whose loads evicted different active adapters on different ranks (their lists or slots differed) is
    flagged: the ranks reconcile before they return, so they end the call in the same state."""
    d = _decide(msgs)
    if not d.ok and len({m.evicted for m in msgs}) > 1:
        d.evictions_differ = True
    return d


def _decide(msgs: list[RankMessage]) -> Decision:
    W = len(msgs)
    head = "activation rolled back on every rank: "
    kinds = [(m.kind, m.epoch) for m in msgs]
    if len(set(kinds)) > 1:
        parts = [f"rank(s) {rs}: {'verdict' if kinds[rs[0]][0] == KIND_VERDICT else f'message {kinds[rs[0]][0]}'}"
                 f" #{kinds[rs[0]][1]}" for rs in _groups(kinds)]
        return Decision(False, head + "ranks are out of step (" + "; ".join(parts) + "); the group must be "
                        "re-attached (attach_group)", out_of_step=True,
                        failed_ranks={r: "out of step" for rs in _groups(kinds)[1:] for r in rs})
    lists = [(m.list_digest, m.n_names) for m in msgs]
    groups = _groups(lists)
    if len(groups) > 1:
        ref = msgs[groups[0][0]]
        parts = []
        failed: dict[int, str] = {}
        for rs in groups:
            m = msgs[rs[0]]
            what = f"{_show(m)} ({m.n_names} name{'s' if m.n_names != 1 else ''})"
            if rs is not groups[0]:
                if sorted(m.name_digests) == sorted(ref.name_digests) and m.n_names == ref.n_names:
                    what += ", the same names in another order"
                for r in rs:
                    failed[r] = f"asked for {what}"
            parts.append(f"rank(s) {rs}: {what}")
        return Decision(False, head + "ranks were asked to activate different adapter lists (" +
                        "; ".join(parts) + ")", failed_ranks=failed, lists_differ=True)
    ref = msgs[0]
    calls = [r for r, m in enumerate(msgs) if m.flags & (FLAG_CALL | FLAG_OVERFLOW)]
    if calls:
        why = msgs[calls[0]].call_reason
        return Decision(False, f"activate({_show(ref)}) rejected on every rank: {why}", call_error=True,
                        failed_ranks={r: msgs[r].call_reason for r in calls})
    states = [m.state_digest for m in msgs]
    sg = _groups(states)
    if len(sg) > 1:
        return Decision(False, head + f"the ranks' active adapters and slots differed before activate("
                        f"{_show(ref)}) (state digests agree on rank(s) {sg[0]}, differ on "
                        f"{sorted(r for rs in sg[1:] for r in rs)}); reconciled on every rank (adapters "
                        f"not held alike everywhere were rolled back)", state_differs=True,
                        failed_ranks={r: "active set differs" for rs in sg[1:] for r in rs})
    failed: dict[int, str] = {}
    parts = []
    for i, e0 in enumerate(ref.entries):
        bad = {r: m.entries[i].reason for r, m in enumerate(msgs) if not m.entries[i].ok}
        if bad:
            rk = ", ".join(f"rank {r}: {why}" for r, why in sorted(bad.items()))
            parts.append(f"adapter {e0.name!r} failed on rank(s) {sorted(bad)} ({rk})")
            for r, why in bad.items():
                failed.setdefault(r, why)
            continue
        slots = [m.entries[i].slot for m in msgs]
        if len(set(slots)) > 1:
            parts.append(f"adapter {e0.name!r}: ranks chose different GPU slots (" +
                         "; ".join(f"rank(s) {rs}: slot {slots[rs[0]]}" for rs in _groups(slots)) + ")")
        fps = [m.entries[i].fingerprint for m in msgs]
        if len(set(fps)) > 1:
            parts.append(f"adapter {e0.name!r}: ranks registered different files under this name (content "
                         f"fingerprints differ: " + "; ".join(f"rank(s) {rs}: {fps[rs[0]]:016x}"
                                                              for rs in _groups(fps)) + ")")
    if parts:
        return Decision(False, f"activation of {_show(ref)} rolled back on every rank: " + "; ".join(parts),
                        failed_ranks=failed)
    return Decision(True)


class ExchangeFailed(Exception):
    """Internal: this rank gave up on an exchange (timeout or a peer lost); the group is broken."""


class Collective:
    """Wraps the process group: fixed-size exchanges under a timeout, the broken flag, re-attach.

    ``group=None`` means the default group when one is initialised, else a single rank; ``group=LOCAL``
    forces a single rank. With a process group, exchanges are issued even at world size 1 (so the
    NCCL path runs on one GPU); without one, there is nothing to exchange."""

    def __init__(self, group: Any = None, device: torch.device | str = "cpu", timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self.calls = 0
        self.requested_device = torch.device(device)
        #: test hook: callable(message kind) run before each exchange (delays between the two phases)
        self.hook: Any = None
        self._bind(group)

    def _bind(self, group: Any) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.broken: str | None = None
        self.epoch = 0
        self.backend = ""
        if isinstance(group, str) and group == LOCAL:
            self.group = None
            self.distributed, self.world, self.rank, self.device = False, 1, 0, torch.device("cpu")
        elif dist.is_available() and dist.is_initialized():
            self.distributed = True
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            self.backend = str(dist.get_backend(group))
            self.device = self.requested_device if self.backend == "nccl" else torch.device("cpu")
        else:
            self.distributed, self.world, self.rank, self.device = False, 1, 0, torch.device("cpu")

    def rebind(self, group: Any) -> None:
        """Use ``group`` from now on (after ``attach_group``): not broken, epoch 0. The world size and
        this rank's index must not change (the TP layout is bound to them)."""
        world, rank = self.world, self.rank
        self._bind(group)
        if (self.world, self.rank) != (world, rank):
            got = (self.world, self.rank)
            self.world, self.rank, self.broken = world, rank, "re-attached to a group of another shape"
            raise AdapterStateError(f"attach_group: the new group has world size {got[0]} and this process "
                                    f"is its rank {got[1]}; the manager was built for world {world}, rank {rank}")

    def check_usable(self, what: str) -> None:
        if self.broken:
            raise CollectiveTimeoutError(
                f"{what} on rank {self.rank}: the process group is unusable after an earlier failure "
                f"({self.broken}); create a new group and call attach_group() on every rank",
                adapters=[], failed_ranks={})

    def abandon(self, why: str) -> None:
        """Never use this group again (this rank gave up on an exchange). NCCL communicators are aborted
        (a pending NCCL kernel would otherwise occupy the device); gloo needs nothing."""
        if self.broken:
            return
        self.broken = why
        if self.distributed and self.backend == "nccl":
            try:
                pg = self.group if self.group is not None else self.dist.group.WORLD
                abort = getattr(pg, "abort", None)  # public on ProcessGroup in torch >= 2.6
                if abort is not None:
                    abort()
            except Exception as e:  # noqa: BLE001 - best effort: correctness does not depend on it
                log.warning("[rank %d] aborting the NCCL group failed: %s", self.rank, e)

    def exchange(self, vec: torch.Tensor, kind: int, timeout_s: float | None = None) -> torch.Tensor:
        """SUM all-reduce of ``vec`` (a message of ``kind``) under the timeout; raises ExchangeFailed (and
        marks the group broken) when it does not complete. KeyboardInterrupt / SystemExit propagate (the
        caller abandons)."""
        if self.hook is not None:
            self.hook(kind)
        if not self.distributed:
            return vec
        self.calls += 1
        x = vec.to(self.device)
        t = self.timeout_s if timeout_s is None else timeout_s
        try:
            work = self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
            deadline = time.monotonic() + t
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise ExchangeFailed(f"a peer did not arrive within {t:.1f}s")
                time.sleep(0.0005)
            work.wait()
        except ExchangeFailed as e:
            self.abandon(str(e))
            raise
        except Exception as e:  # noqa: BLE001 - gloo/NCCL report a dead peer as RuntimeError etc.
            why = f"collective failed: {type(e).__name__}: {str(e)[:200]}"
            self.abandon(why)
            raise ExchangeFailed(why) from e
        return x.cpu()


def timeout_error(message: str, names: list[str]) -> CollectiveTimeoutError:
    return CollectiveTimeoutError(message, adapters=names, failed_ranks={})


def activation_error(d: Decision, names: list[str]) -> AdapterActivationError:
    from ..errors import ActivationCallError

    cls = ActivationCallError if d.call_error else AdapterActivationError
    return cls(d.message, adapters=names, failed_ranks=d.failed_ranks)

"""The safetensors header, parsed strictly: 8-byte length + JSON, checked before any tensor byte is read.

We parse the header ourselves instead of trusting a library to reject hostile files: offsets in range, no
overlaps, no holes, sizes that match shapes and dtypes, no duplicate keys, UTF-8 names, bounded size.
The file is opened once, without following a final symlink and without blocking on a FIFO; the caller gets
the raw header bytes (for a digest) and the ``fstat`` identity of the very file descriptor that was read.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterFormatError
from .dtypes import SAFETENSORS_FLOAT, SAFETENSORS_OTHER, safetensors_itemsize

KNOWN_DTYPES = frozenset(SAFETENSORS_FLOAT) | frozenset(SAFETENSORS_OTHER)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's limit


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
        return safetensors_itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.end - self.start



def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
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


class NotRegularFile(OSError):
    """A path that is a directory, FIFO, socket or device: refused before any read."""


def open_regular(path: str, *, nofollow: bool = False) -> Any:
    """``open(path, "rb")`` that refuses anything but a regular file without blocking (``O_NONBLOCK``,
    then ``fstat`` of the descriptor before any read: opening a FIFO would block forever, reading it too).
    ``nofollow``: refuse a final path component that is a symlink (``O_NOFOLLOW``, ELOOP)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if nofollow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{os.path.basename(path)} is not a regular file (a directory, FIFO or device)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns): what a later open must find to be reading the validated file."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


SETTLE_NS = 2_000_000_000
"""How much older than the read of its header a file's mtime and ctime must be for the file to count as
settled (``settled_identity``). Any write after the read then stamps a later mtime and ctime: file
timestamps tick in at most 2 s (FAT; NFSv3 and HFS+ 1 s, ext4 and xfs a clock tick), and user space can
reset mtime (``utime``) but not ctime."""


def stat_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime in ns, ctime in ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def settled_identity(st: os.stat_result, read_at_ns: int) -> tuple[int, int, int, int, int] | None:
    """``stat_identity(st)`` if the file was last written at least ``SETTLE_NS`` before ``read_at_ns``
    (wall clock, taken after its header was read from the descriptor ``st`` describes), else None.

    Why: a later open whose ``fstat`` gives this same tuple reads the bytes read then, so a cold load need
    not read and hash the header again (the 5.4 MB header of a 37k-tensor MoE adapter costs a few ms of
    sha256, on the critical path of a 10 ms load). The tensor data is trusted by the same comparison
    already (``SliceReader.verify_unchanged``). A file written within the window (just generated,
    or rewritten while it was registered) gets None: its loads compare the header bytes every time."""
    if max(st.st_mtime_ns, st.st_ctime_ns) <= read_at_ns - SETTLE_NS:
        return stat_identity(st)
    return None


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header and where it came from (one open of the file)."""

    tensors: dict[str, TensorInfo]
    header_bytes: int  # length of the JSON
    file_size: int
    raw: bytes  # the 8-byte length + the JSON, as read
    identity: tuple[int, int, int, int]  # file_identity() of the descriptor that was read
    settled: tuple[int, int, int, int, int] | None = None  # settled_identity() of that descriptor


def read_safetensors_header(path: str, *, adapter: str | None = None) -> tuple[dict[str, TensorInfo], int, int]:
    """Parse and validate a safetensors header. Returns (tensors, header_size, file_size)."""
    h = read_header(path, adapter=adapter)
    return h.tensors, h.header_bytes, h.file_size


def read_header(path: str, *, adapter: str | None = None, nofollow: bool = False) -> SafetensorsHeader:
    """Open ``path`` once, parse and validate its header from that descriptor.

    Raises AdapterFormatError naming the file and the problem. Reads only the header bytes.
    """
    def fail(msg: str) -> AdapterFormatError:
        return AdapterFormatError(msg, adapter=adapter, path=path)

    try:
        with open_regular(path, nofollow=nofollow) as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            if size < 8:
                raise fail(f"file is {size} bytes: too short for a safetensors header length")
            head8 = f.read(8)
            if len(head8) != 8:
                raise fail(f"header length truncated: read {len(head8)} of 8 bytes (file changed while read)")
            (hlen,) = struct.unpack("<Q", head8)
            if hlen > MAX_HEADER_BYTES:
                raise fail(f"header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + hlen > size:
                raise fail(f"header length {hlen} is larger than the file ({size} bytes): truncated header")
            raw = f.read(hlen)
            read_at = time.time_ns()
    except OSError as e:
        raise fail(f"cannot read safetensors file: {e}") from None
    if len(raw) != hlen:
        raise fail(f"header truncated: read {len(raw)} of {hlen} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not valid UTF-8 (at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
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
        itemsize = safetensors_itemsize(dtype)
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
    return SafetensorsHeader(tensors, hlen, size, head8 + raw, file_identity(st), settled_identity(st, read_at))

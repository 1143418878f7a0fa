"""SliceReader: this rank's bytes of one adapter file, read into packed host buffers.

One open per load: every check and every read of the load goes through that one fd.

- Opened with O_NOFOLLOW | O_NONBLOCK: a link swapped in since registration is not followed (it could
  point out of the adapter folder), a FIFO does not block the loader thread.
- ``fstat`` on that fd: a regular file of the registered size. Its identity (device, inode, mtime) is
  compared with what registration recorded; a file replaced or rewritten since is loaded only if its
  header bytes, read from the same fd, are exactly those registered (the planned offsets then hold, and
  the finite check covers the data), with a warning naming the file. Refusing it outright would also
  refuse a file restored from a copy (the suite's repair-by-copy case loads with the same registration).
- Short reads (a file truncated during the load) and changes during the load (size, mtime or ctime
  differ at the end: truncated and regrown to the same size) raise AdapterDataError naming the file and
  the tensor.

The reads are the packing's precomputed scatter runs (``os.preadv`` releases the GIL) and span reads
(one read into per-thread scratch, then strided torch copies of the owned bytes).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import stat
import threading
import torch

from ..errors import AdapterDataError
from ..format.adapter import AdapterHeader
from ..plan.packing import Chunk, Part, span_of

log = logging.getLogger(__name__)

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0))


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, st_size, st_mtime_ns): what registration validated."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SliceReader:
    """Reads this rank's slices from a safetensors file (see the module docstring). Thread-safe: the
    reader threads of one load share it (pread has no file offset)."""

    def __init__(self, header: AdapterHeader):
        self.header = header
        self.path = header.weights_path
        self.fd = -1
        self.replaced = False  # the file's identity differs from the registered one (header identical)
        self.bytes_read = 0
        self.syscalls = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as e:
            if os.path.islink(self.path):
                raise self._err("the weights are now a symbolic link: links are not followed at load "
                                "(one could leave the adapter folder); register the adapter again") from None
            raise self._err(f"cannot open the weights for reading: {e}") from None
        self.fd = fd
        try:
            self._opened = self._check_identity(os.fstat(fd))
            self._check_header()
        except BaseException:
            self.close()
            raise

    # -- checks ----------------------------------------------------------------------------------
    def _err(self, msg: str, tensor: str | None = None) -> AdapterDataError:
        if tensor is not None:
            msg = f"tensor {tensor!r}: {msg}"
        return AdapterDataError(msg, adapter=self.header.name, path=self.path)

    def _check_identity(self, st: os.stat_result) -> tuple[int, int, int]:
        h = self.header
        if not stat.S_ISREG(st.st_mode):
            raise self._err("the weights are no longer a regular file (a directory, FIFO or device)")
        if st.st_size != h.file_size:
            raise self._err(f"file size changed since registration: {h.file_size} -> {st.st_size} bytes")
        ident = h.file_identity
        self.replaced = ident is not None and file_identity(st) != tuple(ident)
        if self.replaced:
            log.warning("adapter %r: %s was replaced or rewritten since registration (dev, ino, size, "
                        "mtime_ns %s -> %s); loading it only if its header is the registered one",
                        h.name, self.path, tuple(ident), file_identity(st))
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _check_header(self) -> None:
        """The planned offsets hold only if the header is byte-for-byte the one registered (a same-size
        rewrite with another layout would load other tensors' bytes). Read from this fd."""
        h = self.header
        if not h.header_digest:
            return
        raw = self._pread_bytes(8 + h.header_bytes, 0)
        if hashlib.sha256(raw).hexdigest() != h.header_digest:
            what = "it was replaced and its" if self.replaced else "its"
            raise self._err(f"the file changed since registration: {what} safetensors header differs (tensor "
                            f"layout or names); register the adapter again")

    def verify_unchanged(self) -> None:
        """After the last read: the file did not change while it was read (truncated and regrown to the
        same size, rewritten in place)."""
        st = os.fstat(self.fd)
        now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if now != self._opened:
            raise self._err(f"the file changed while it was read (size, mtime_ns, ctime_ns {self._opened} -> "
                            f"{now}); the data read cannot be trusted")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------------------
    def read_chunk(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Fill a whole chunk's host buffer."""
        self.read_part(chunk, None, buf)

    def read_part(self, chunk: Chunk, part: Part | None, buf: torch.Tensor) -> None:
        """Fill one part of a chunk's buffer (``part`` None: the whole chunk): one preadv per scatter run
        (then the strided copies of the span slices it read into scratch), then the span reads."""
        u = chunk.whole if part is None else part
        mv = memoryview(buf.numpy()).cast("B")
        total = 0
        fd = self.fd
        for file_off, pieces, copies, scratch_bytes in u.reads:
            if scratch_bytes:
                scratch = self._scratch(scratch_bytes)
                smv = memoryview(scratch.numpy()).cast("B")
                iov = [mv[o:o + n] if o >= 0 else smv[-o - 1:n - o - 1] for o, n in pieces]
            else:
                iov = [mv[o:o + n] for o, n in pieces]
            want = sum(n for _, n in pieces)
            if os.preadv(fd, iov, file_off) != want:
                # short read (signal, end of a truncated file): finish piece by piece, raising at EOF
                pos = file_off
                for v, (o, n) in zip(iov, pieces):
                    self._pread_into(v, pos, chunk, max(o, 0))
                    pos += n
            total += want
            for i, soff in copies:
                self._copy_out(chunk, i, buf, scratch, soff)
        for sp in u.spans:
            scratch = self._scratch(sp.nbytes)
            self._pread_into(memoryview(scratch.numpy()).cast("B")[:sp.nbytes], sp.file_offset, chunk,
                             chunk.offsets[sp.ops[0]])
            total += sp.nbytes
            for i in sp.ops:
                self._copy_out(chunk, i, buf, scratch, span_of(chunk.ops[i])[0] - sp.file_offset)
        with self._lock:
            self.bytes_read += total
            self.syscalls += u.syscalls

    @staticmethod
    def _copy_out(chunk: Chunk, i: int, buf: torch.Tensor, scratch: torch.Tensor, soff: int) -> None:
        """Slice ``chunk.ops[i]`` out of its span, read into ``scratch`` at ``soff``, to its packed place."""
        op, off = chunk.ops[i], chunk.offsets[i]
        isz = op.itemsize
        step = op.cols[2]
        row_bytes = op.src_shape[1] * isz
        if step == 1:  # rows of contiguous owned columns
            src = torch.as_strided(scratch, (op.nrows, op.ncols * isz), (row_bytes, 1), soff)
            buf[off:off + op.nbytes].view(op.nrows, op.ncols * isz).copy_(src)
        else:  # strided columns (fused-expert B: experts interleave at element granularity)
            src = torch.as_strided(scratch, (op.nrows, op.ncols, isz), (row_bytes, step * isz, 1), soff)
            buf[off:off + op.nbytes].view(op.nrows, op.ncols, isz).copy_(src)

    def _scratch(self, n: int) -> torch.Tensor:
        t = getattr(self._local, "buf", None)
        if t is None or t.numel() < n:
            t = self._local.buf = torch.empty(n, dtype=torch.uint8)
        return t

    def _tensor_at(self, chunk: Chunk, offset: int) -> str:
        i = max(0, bisect.bisect_right(chunk.offsets, offset) - 1)
        return chunk.ops[i].tensor if chunk.ops else "?"

    def _pread_into(self, mv: memoryview, offset: int, chunk: Chunk | None = None, dst: int = 0) -> None:
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise self._err(f"file truncated while reading: got {done} of {len(mv)} bytes at offset "
                                f"{offset}", tensor=None if chunk is None else self._tensor_at(chunk, dst))
            done += n

    def _pread_bytes(self, n: int, offset: int) -> bytes:
        b = bytearray(n)
        self._pread_into(memoryview(b), offset)
        return bytes(b)


"""Run a function on N real processes joined by a gloo process group, for tests.

``run_distributed(fn, world_size, *args, timeout=...)`` spawns ``world_size`` processes, joins them through
a TCPStore that the parent opens on port 0 (the OS picks a free port and the parent keeps it bound, so
two tests can never race for one), calls ``fn(rank, world_size, *args)`` on each, and returns the list of
return values in rank order. If a rank raises, the others are killed and a ``DistributedTestError``
carries the failing rank's traceback. It never hangs: past ``timeout`` seconds every child is killed and
``TimeoutError`` says which ranks had not answered. Before it kills the ranks that had not answered, each
prints every thread's stack to its stderr (faulthandler on SIGUSR1), which the test's report shows.

``fn`` and its arguments and results must be picklable (``fn`` defined at module level); results travel
as plain pickles (not shared memory), so a child may exit right after answering.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import signal
import sys
import queue
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


_STORE: Any = None


def child_store() -> Any:
    """In a rank process: the TCPStore the group was built on (out-of-band coordination for tests that
    must compare ranks or rebuild groups after the group under test was given up on)."""
    if _STORE is None:
        raise RuntimeError("child_store() is only available inside run_distributed's rank processes")
    return _STORE


class DistributedTestError(RuntimeError):
    """A rank raised; ``rank`` and ``remote_traceback`` say where and what."""

    def __init__(self, rank: int, remote_traceback: str):
        super().__init__(f"rank {rank} failed:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, timeout: float,
           backend: str, results: Any, args: tuple[Any, ...]) -> None:
    # the parent asks for every thread's stack (SIGUSR1) before it kills a rank that did not answer
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    try:
        import torch
        torch.set_num_threads(1)   # N ranks share few cores; oversubscription makes gloo tests crawl
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        global _STORE
        _STORE = store
        # report before tearing the group down: peers see a reset connection once this rank leaves,
        # and the parent should hear the root cause first
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _later_failures(results: Any, first: int, grace: float = 1.0) -> str:
    """Tracebacks of ranks that fail within ``grace`` seconds after ``first`` (often consequences)."""
    extra, deadline = [], time.monotonic() + grace
    while (left := deadline - time.monotonic()) > 0:
        try:
            rank, ok, payload = results.get(timeout=left)
        except queue.Empty:
            break
        if not ok and rank != first:
            extra.append(f"\n(rank {rank} also failed:)\n{payload}")
    return "".join(extra)


def _dump_stacks(procs: list[Any], wait_s: float = 1.0) -> None:
    """Every thread's stack of each process in ``procs`` (faulthandler, on SIGUSR1), to its stderr."""
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except (OSError, TypeError):
            pass
    if procs:
        time.sleep(wait_s)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
                    backend: str = "gloo", may_exit: tuple[int, ...] = ()) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size-1, world_size, *args)]``, each on its own process.

    ``may_exit``: ranks that a test kills on purpose (``os._exit``); one that ends without a result is not a
    failure, and its value is None."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, store.port, timeout, backend, results, args),
                         daemon=True, name=f"rank{r}")
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    ok_all = False
    try:
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}): "
                                   f"ranks {missing} did not finish within {timeout:.0f}s")
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in values and p.exitcode is not None]
                values.update({r: None for r in dead if r in may_exit})
                dead = [r for r in dead if r not in may_exit]
                if dead:
                    # a rank died without reporting (segfault, os._exit): give its message a moment
                    try:
                        rank, ok, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise DistributedTestError(dead[0], f"process exited with code "
                                                   f"{procs[dead[0]].exitcode} without a result") from None
                else:
                    continue
            if not ok:
                raise DistributedTestError(rank, payload + _later_failures(results, rank))
            values[rank] = pickle.loads(payload)
        ok_all = True
    finally:
        # after a failure the survivors may sit in a collective forever: kill them at once, after each
        # has printed its threads' stacks (to stderr, which the test's report shows): where it hung
        if not ok_all:
            _dump_stacks([p for r, p in enumerate(procs) if r not in values and p.is_alive()])
        for p in procs:
            if ok_all:
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()
        del store
    return [values[r] for r in range(world_size)]

"""The multi-process test harness itself (``tests/support/distributed.py``): when a rank fails, the ranks
that did not answer print every thread's stack before they are killed, so a hang in CI says where it
hung."""

from __future__ import annotations

import time

import pytest

from support.distributed import DistributedTestError, run_distributed


def _one_fails_one_hangs(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(0.5)
        raise RuntimeError("rank 0 gives up")
    _stuck_here_forever()


def _stuck_here_forever() -> None:
    while True:
        time.sleep(0.05)


def test_a_rank_that_did_not_answer_prints_its_stack(capfd) -> None:
    with pytest.raises(DistributedTestError, match="rank 0 gives up"):
        run_distributed(_one_fails_one_hangs, 2, timeout=60)
    err = capfd.readouterr().err
    assert "_stuck_here_forever" in err and "_one_fails_one_hangs" in err, err[-2000:]

"""A stand-in for `tp_lora.run` that checks what a launcher built: run it under torchrun.

    TP_LORA_ENTRY=tests.dist_probe launch/torchrun.sh

Every rank joins a gloo group (env://), all-reduces 1 (the sum must be the world size) and sends rank 0
its identity (host, SLURM_NODEID, SLURMD_NODENAME, GROUP_RANK). Rank 0 prints one line per rank and then

    PROBE world=4 nodes=2 ranks=0,1,2,3 sum=4

where a node is SLURM_NODEID when Slurm started us, else torchrun's GROUP_RANK. Exit status is non-zero
when the sum is wrong or the torchrun environment is inconsistent.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise SystemExit(f"dist_probe: {name} is not set; run me under torchrun")
    return int(value)


def main(argv: list[str]) -> int:
    rank = _env_int("RANK")
    world = _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    group_rank = _env_int("GROUP_RANK")
    slurm_node = os.environ.get("SLURM_NODEID")
    me = {
        "rank": rank,
        "local_rank": local_rank,
        "group_rank": group_rank,
        "host": socket.gethostname(),
        "slurm_nodeid": slurm_node,
        "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
        "node": int(slurm_node) if slurm_node is not None else group_rank,
    }

    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    try:
        if dist.get_rank() != rank or dist.get_world_size() != world:
            print(f"PROBE-ERROR rank {rank}: process group says rank {dist.get_rank()} "
                  f"of {dist.get_world_size()}, env says {rank} of {world}", file=sys.stderr, flush=True)
            return 1
        ones = torch.ones(1)
        dist.all_reduce(ones)
        total = int(ones.item())
        everyone: list[dict | None] = [None] * world
        dist.all_gather_object(everyone, me)
    finally:
        dist.destroy_process_group()

    if total != world:
        print(f"PROBE-ERROR rank {rank}: all_reduce(1) = {total}, expected world size {world}",
              file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        for info in everyone:
            print("PROBE-RANK " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        nodes = {info["node"] for info in everyone}
        ranks = ",".join(str(info["rank"]) for info in sorted(everyone, key=lambda i: i["rank"]))
        print(f"PROBE-ARGS {' '.join(argv)}", flush=True)
        print(f"PROBE world={world} nodes={len(nodes)} ranks={ranks} sum={total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

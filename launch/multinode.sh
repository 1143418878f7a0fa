#!/usr/bin/env bash
# One node of a multi-node job: run this once per node, same settings everywhere.
# torchrun --nnodes NNODES meets the other nodes through a c10d rendezvous at RDZV_HOST:RDZV_PORT
# (hosted by whichever agent runs on that host), then starts NPROC ranks of
# `python -m $TP_LORA_ENTRY $CONFIG [args...]` here.
#
#   head$  NNODES=2 NODE_RANK=0 RDZV_HOST=head RDZV_PORT=29400 launch/multinode.sh [args...]
#   other$ NNODES=2 NODE_RANK=1 RDZV_HOST=head RDZV_PORT=29400 launch/multinode.sh [args...]
#
# Knobs (environment variables, [default]):
#   NNODES         number of nodes (or a range "MIN:MAX")   [$SLURM_JOB_NUM_NODES, else 2]
#   NODE_RANK      this node's index; only the static backend uses it: with c10d the rendezvous
#                  assigns GROUP_RANK itself (torchrun ignores --node-rank then)  [$SLURM_NODEID, else 0]
#   NPROC          ranks on this node                       [number of visible GPUs, or 2 without GPUs]
#   RDZV_HOST      address of the rendezvous host (node 0)  [127.0.0.1]
#   RDZV_PORT      rendezvous port on RDZV_HOST             [29400]
#   RDZV_ID        job id shared by all nodes of one run    [$SLURM_JOB_ID, else tp_lora]
#   RDZV_BACKEND   c10d, or static (then RDZV_HOST:RDZV_PORT is the master address)  [c10d]
#   RDZV_CONF      torchrun --rdzv-conf, e.g. "join_timeout=120"  [empty: torchrun's defaults]
#   CONFIG         first argument of the entry              [<checkout>/configs/demo.yaml]
#   TP_LORA_ENTRY  module run by each rank                  [tp_lora.run]
#   TORCHRUN       the torchrun command                     [torchrun, else `python3 -m torch.distributed.run`]
#   TORCHRUN_ARGS  extra torchrun flags, word-split         [empty]
# NCCL_NVLS_ENABLE is exported as 0; set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / NCCL_IB_* as your
# network needs (see launch/slurm.sbatch).
# Runs from any directory (the checkout's root goes first on PYTHONPATH; see launch/_common.sh).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-2}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
RDZV_HOST=${RDZV_HOST:-127.0.0.1}
RDZV_PORT=${RDZV_PORT:-29400}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-tp_lora}}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
RDZV_CONF=${RDZV_CONF:-}

case "$RDZV_BACKEND" in
    c10d)
        # No --node-rank: torchrun would ignore it (and warn). The agent on RDZV_HOST hosts the store;
        # with several agents on that host one binds and the others connect as clients.
        rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RDZV_ID")
        [[ -n "$RDZV_CONF" ]] && rdzv+=(--rdzv-conf "$RDZV_CONF")
        ;;
    static)
        rdzv=(--node-rank "$NODE_RANK" --master-addr "$RDZV_HOST" --master-port "$RDZV_PORT")
        ;;
    *)
        echo "multinode.sh: RDZV_BACKEND must be c10d or static, got '$RDZV_BACKEND'" >&2
        exit 2
        ;;
esac

echo "multinode.sh: node_rank=$NODE_RANK/$NNODES nproc=$NPROC rdzv=$RDZV_BACKEND@$RDZV_HOST:$RDZV_PORT id=$RDZV_ID host=$(hostname)" >&2
set -x
exec "${torchrun_cmd[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC" "${rdzv[@]}" --max-restarts 0 \
    ${extra[@]+"${extra[@]}"} -m "$TP_LORA_ENTRY" "$CONFIG" "$@"

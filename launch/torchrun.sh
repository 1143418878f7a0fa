#!/usr/bin/env bash
# Single node: one torchrun starting NPROC ranks of `python -m $TP_LORA_ENTRY $CONFIG [args...]`.
#
#   launch/torchrun.sh [args passed to the entry module...]
#   NPROC=4 CONFIG=my_run.yaml launch/torchrun.sh --set max_loras=8
#
# Knobs (environment variables, [default]):
#   NPROC          ranks on this node            [number of visible GPUs, or 2 without GPUs]
#   CONFIG         first argument of the entry   [<checkout>/configs/demo.yaml]
#   TP_LORA_ENTRY  module run by each rank       [tp_lora.run]
#   MASTER_ADDR    rendezvous address            [127.0.0.1]
#   MASTER_PORT    rendezvous port; 0 = let torchrun pick a free one (--standalone)  [0]
#   TORCHRUN       the torchrun command          [torchrun, else `python3 -m torch.distributed.run`]
#   TORCHRUN_ARGS  extra torchrun flags, word-split (e.g. "--log-dir out/logs --redirects 3")  [empty]
# NCCL_NVLS_ENABLE is exported as 0 (NVLink multicast stays off); other NCCL_* pass through.
# Runs from any directory (the checkout's root goes first on PYTHONPATH; see launch/_common.sh).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-0}

if [[ "$MASTER_PORT" == 0 ]]; then
    # c10d rendezvous on localhost with a port picked by torchrun: no collisions between jobs.
    rdzv=(--standalone)
else
    rdzv=(--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi

set -x
exec "${torchrun_cmd[@]}" --nnodes 1 --nproc-per-node "$NPROC" "${rdzv[@]}" --max-restarts 0 \
    ${extra[@]+"${extra[@]}"} -m "$TP_LORA_ENTRY" "$CONFIG" "$@"

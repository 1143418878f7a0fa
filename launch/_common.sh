# Shared by launch/torchrun.sh and launch/multinode.sh (sourced, not run).
# The launchers work from any directory: they run the checkout they live in (its root first on
# PYTHONPATH, so no install is needed), and CONFIG defaults to that checkout's configs/demo.yaml.
# A relative CONFIG or --json path is relative to the directory you start them from.

# Number of GPUs this node may use: CUDA_VISIBLE_DEVICES if set ("" or -1: none), else nvidia-smi.
gpu_count() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]] && { echo 0; return; }
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Defaults every launcher shares; sets the arrays torchrun_cmd and extra.
gpus=$(gpu_count)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
TP_LORA_ROOT=${TP_LORA_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)}
CONFIG=${CONFIG:-$TP_LORA_ROOT/configs/demo.yaml}
export PYTHONPATH="$TP_LORA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
TP_LORA_ENTRY=${TP_LORA_ENTRY:-tp_lora.run}
if [[ -z "${TORCHRUN:-}" ]]; then
    if command -v torchrun >/dev/null 2>&1; then TORCHRUN=torchrun; else TORCHRUN="python3 -m torch.distributed.run"; fi
fi
read -r -a torchrun_cmd <<<"$TORCHRUN"
read -r -a extra <<<"${TORCHRUN_ARGS:-}"
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off

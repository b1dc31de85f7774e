#!/usr/bin/env bash
# Single-node launch: NPROC processes (one per GPU, or CPU processes with gloo) of `effdist train`.
#
#   launch/run.sh NPROC CONFIG [train args...]
#   launch/run.sh 8 configs/llama-1b.yaml --set parallel.tp=2 --run-dir runs/1b-tp2
#
# runs  torchrun --standalone --nproc_per_node NPROC -m effdist.train --config CONFIG [train args...]
# through launch/torchrun.py (torchrun that passes the trainer's exit code 75, "saved after SIGTERM/
# SIGUSR1, restart me", through). Set TORCHRUN to use another launcher command (e.g. TORCHRUN=torchrun),
# PYTHON for the interpreter. Exit code: the trainer's (0 done, 75 preempted and saved, other: failed).
set -euo pipefail

usage() {
    echo "usage: $0 NPROC CONFIG [effdist train args, e.g. --set train.steps=100 --run-dir DIR]" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
nproc=$1
config=$2
shift 2
[[ $nproc =~ ^[1-9][0-9]*$ ]] || { echo "$0: NPROC must be a positive integer, got '$nproc'" >&2; usage; }
# A config file, or a preset's name (llama-1b) that effdist resolves itself.
if [[ ! -f $config && ( $config == */* || $config == *.yaml || $config == *.yml ) ]]; then
    echo "$0: config file '$config' not found" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Megatron's TP/SP overlap needs one CUDA work queue; NVLS (NVLink SHARP) multicast is off on the
# machines we run on. Both only matter on GPUs and can be overridden from the caller's environment.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# torchrun would set 1 thread per process with a warning; say it explicitly (override for CPU runs).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ -n ${TORCHRUN:-} ]]; then
    read -r -a launcher <<<"$TORCHRUN"
else
    launcher=("${PYTHON:-python}" "$here/torchrun.py")
fi

exec "${launcher[@]}" --standalone --nproc_per_node "$nproc" -m effdist.train --config "$config" "$@"

#!/usr/bin/env bash
# Single-node data-parallel training: one process per GPU (or N CPU processes with gloo).
#   scripts/launch_local.sh NPROC CONFIG.toml [saeformer train options...]
# e.g. scripts/launch_local.sh 8 configs/gpt2-small.toml --run-dir runs/gpt2 --set train.parallel=fsdp
set -euo pipefail
if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
NPROC="$1"; shift
exec torchrun --standalone --nproc-per-node "$NPROC" -m saeformer.cli train "$@"

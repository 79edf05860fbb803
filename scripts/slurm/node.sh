#!/bin/bash
# One node's share of scripts/slurm/train.sbatch: accelerate launch with this node's rank (SLURM_NODEID).
# GPTPIPE_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
VENV=${VENV:-.venv}
# Preemption (docs/fault-tolerance.md): the launcher passes SIGTERM and SIGUSR1 on to the training processes
# and gives them time to finish the step and save a checkpoint before it kills them.
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${GPTPIPE_SAVE_GRACE:-600}}
CONFIG_FILE=accelerate_configs/${GPTPIPE_CONFIG}.yaml
cmd=("$VENV/bin/accelerate" launch --config_file "$CONFIG_FILE"
  --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))"
  --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
  --rdzv_backend static --same_network
  -m gptpipe "$@")
if [ "${GPTPIPE_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi

#!/usr/bin/env bash
# Run a megastack recipe (or one command) under the DeepSpeed launcher.
#   launch/deepspeed.sh [RECIPE]                         # this node, NPROC processes (GPUs, or CPU processes)
#   HOSTFILE=hosts launch/deepspeed.sh RECIPE            # several nodes (pdsh); the launcher sets RANK etc.
# With --launcher openmpi or slurm DeepSpeed does not export RANK; megastack reads OMPI_COMM_WORLD_RANK /
# SLURM_PROCID itself, so those work too: DS_LAUNCHER=openmpi HOSTFILE=hosts launch/deepspeed.sh RECIPE
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
COMMAND=${MEGASTACK_COMMAND:-run}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as torchrun: one thread per rank unless told otherwise
if [ -z "${HOSTFILE:-}" ]; then
  exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module megastack \
    "$COMMAND" "$@"
fi
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
exec deepspeed --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module megastack "$COMMAND" "$@"

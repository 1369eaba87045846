#!/usr/bin/env bash
# Run a megastack recipe (or one command) under mpirun (Open MPI or MPICH).
#   NP=4 launch/mpirun.sh [RECIPE]                       # NP ranks on this node
#   NP=8 HOSTFILE=hosts launch/mpirun.sh RECIPE          # across the hosts in HOSTFILE
# Ranks come from OMPI_COMM_WORLD_* / PMI_*; rank 0's address and a free port are shared over mpi4py.
set -euo pipefail
NP=${NP:-2}
COMMAND=${MEGASTACK_COMMAND:-run}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as torchrun: one thread per rank unless told otherwise
MPIRUN=${MPIRUN:-mpirun}
ARGS=(-np "$NP")
if [ -n "${HOSTFILE:-}" ]; then ARGS+=(--hostfile "$HOSTFILE"); fi
if "$MPIRUN" --version 2>/dev/null | grep -q "Open MPI"; then
  ARGS+=(--oversubscribe)  # more ranks than cores on a CPU test machine
  [ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
exec "$MPIRUN" "${ARGS[@]}" python -m megastack "$COMMAND" "$@"

#!/usr/bin/env bash
# Run a megastack recipe (all stages) under torchrun, on one node or several.
#   launch/torchrun.sh [RECIPE] [--out DIR]                     # one node, NPROC ranks
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh RECIPE   # on every node, with its NODE_RANK
# NPROC defaults to the GPUs on the node (or 2 on a CPU machine). Any megastack command works the same
# way: MEGASTACK_COMMAND=train launch/torchrun.sh configs/train/tiny-small.yaml
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
COMMAND=${MEGASTACK_COMMAND:-run}
if [ "$NNODES" = 1 ]; then
  exec torchrun --standalone --nproc-per-node "$NPROC" -m megastack "$COMMAND" "$@"
fi
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" -m megastack "$COMMAND" "$@"

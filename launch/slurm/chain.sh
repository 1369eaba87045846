#!/usr/bin/env bash
# Submit a recipe as a dependency chain: small -> grow -> large, each a job that starts only when the one
# before it succeeded (--dependency=afterok); the scratch baseline needs nothing and runs alongside.
# Whichever job finishes last writes the summary. Extra sbatch flags via SBATCH_ARGS.
#   SBATCH_ARGS="--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" launch/slurm/chain.sh RECIPE --out DIR
# Prints the job ids; `--wait` in SBATCH_ARGS makes each submission block (used by the tests).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
read -r -a EXTRA <<< "${SBATCH_ARGS:-}"
previous=""
for stage in small grow large scratch; do
  dep=()
  if [ -n "$previous" ] && [ "$stage" != scratch ]; then dep=(--dependency="afterok:$previous"); fi
  id=$(sbatch --parsable "${EXTRA[@]}" "${dep[@]}" --job-name="megastack-$stage" "$HERE/stage.sbatch" "$stage" "$@")
  echo "$stage: job $id"
  if [ "$stage" != scratch ]; then previous=$id; fi
done

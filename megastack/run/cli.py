"""``megastack run RECIPE``: small stage -> grow -> large stage (-> FLOP-matched scratch baseline) -> summary.

Without a launcher (``megastack run``), the command starts ``--nproc`` local ranks of itself; under
torchrun / the deepspeed launcher / srun / mpirun it runs as the rank it was given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from megastack.errors import UserError
from megastack.run.recipe import load_recipe
from megastack.run.report import summary_table
from megastack.run.stages import run_recipe

# ----------------------------------------------------------------------------- the command


def cli_run(args: Any) -> int:
    from megastack.dist import discover

    recipe, path = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    stage = getattr(args, "stage", None)
    names = recipe.stage_names()
    names += [] if "scratch" in names else ["scratch"]  # a launch script may ask every recipe for its baseline
    if stage is not None and stage not in names:
        raise UserError(f"--stage must be one of {', '.join(names)} (the stages of '{recipe.name}'), got {stage!r}")
    if discover().launcher == "single" and args.nproc > 1:
        return launch_self(args, out)
    summary = run_recipe(recipe, out, stage)
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(summary_table(summary), end="")
        print(f"summary: {out / 'summary.md'} (and summary.json)")
        print(f"plot: {out / 'loss_vs_flops.png'}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def launch_self(args: Any, out: Path) -> int:
    """Start ``--nproc`` local ranks of this same command; rank 0 prints to this terminal."""
    from megastack.dist import launch_local

    argv = (
        [sys.executable, "-m", "megastack", "run"]
        + ([args.recipe] if args.recipe else [])
        + ["--out", str(out)]
        + (["--stage", args.stage] if getattr(args, "stage", None) else [])
    )
    result = launch_local(argv, args.nproc, timeout=7 * 24 * 3600, stream_rank0=True)
    if not result.ok:
        for rank, (rc, output) in enumerate(zip(result.returncodes, result.outputs)):
            if rc not in (0, None) and output.strip():
                tail = output.strip().splitlines()[-1]
                raise UserError(f"rank {rank} failed: {tail}")
        raise UserError("a rank failed (see the output above)")
    return 0

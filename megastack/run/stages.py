"""The stages of a run, in order; each a directory under OUT with a marker once finished.

A finished stage writes ``OUT/stages/<stage>.json`` (the hash of its effective config and the checksum of
its output), so the same command run again skips what is done, resumes the unfinished stage from its last
checkpoint, and refuses to continue when a finished stage's config has changed. All ranks run every stage
together: training is collective, and the growth step splits its output across the same ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from megastack.errors import UserError
from megastack.run.dirs import NEEDS, RunDirs, check_marker, config_hash, read_marker, write_marker
from megastack.run.recipe import Recipe, StageRecipe, planned_growth_tokens
from megastack.run.report import write_summary
from megastack.train.config import (
    ScheduleConfig,
    TrainConfig,
)

# ----------------------------------------------------------------------------- stages


def stage_train_config(
    recipe: Recipe,
    stage: str,
    stage_recipe: StageRecipe,
    dirs: RunDirs,
    init_from: str | None,
    schedule: ScheduleConfig | None = None,
) -> TrainConfig:
    return TrainConfig(
        model=stage_recipe.resolved_model(),
        out_dir=str(dirs.stage_dir(stage)),
        parallel=stage_recipe.parallel or recipe.parallel,
        data=recipe.data,
        optimizer=stage_recipe.optimizer,
        schedule=schedule or stage_recipe.schedule,
        init_from=init_from,
        mask_ramp_steps=stage_recipe.mask_ramp_steps,
        seed=stage_recipe.seed,
        logging=recipe.logging,
    )


def stage_flops(cfg: TrainConfig, world: int) -> tuple[float, float]:
    """(FLOPs per iteration, FLOPs of the whole stage) of a training config on ``world`` ranks."""
    from megastack.flops import flops_per_iteration

    par, model = cfg.parallel, cfg.resolved_model()
    global_batch = par.micro_batch_size * par.data_parallel_size(world) * par.gradient_accumulation_steps(world)
    per_iter = flops_per_iteration(model, global_batch)
    return per_iter, per_iter * cfg.schedule.iterations(global_batch * model.seq_length)


def run_grow(recipe: Recipe, dirs: RunDirs, small_checkpoint: str, comm) -> dict[str, Any]:
    """The growth stage, split across every rank of the run (Recipe.check made sure of its shape)."""
    from megastack.growth.api import grow

    job = grow(small_checkpoint, dirs.stage_dir("grow"), recipe.growth.spec(), comm=comm)
    return grow_result(dirs.stage_dir("grow"), job.manifest["growth"])


def grow_result(grown: Path, growth: dict[str, Any]) -> dict[str, Any]:
    """The grow stage's marker record, from the growth block of the grown checkpoint's manifest."""
    return {"checkpoint": str(grown), **{k: growth.get(k) for k in ("operator", "layer_map", "new_layers")}}


def stage_configs(recipe: Recipe, dirs: RunDirs, world: int) -> list[tuple[str, TrainConfig | None, str]]:
    """(stage, its TrainConfig or None for growth, config hash) in order; hashes chain, so a change
    upstream changes every later stage's hash."""
    small_schedule = None
    if recipe.growth.tokens is not None:
        d = planned_growth_tokens(recipe) if recipe.growth.tokens == "plan" else recipe.growth.tokens
        small_schedule = replace(recipe.small.schedule, train_iters=None, train_tokens=d)
    small = stage_train_config(recipe, "small", recipe.small, dirs, None, small_schedule)
    large = stage_train_config(recipe, "large", recipe.large, dirs, str(dirs.stage_dir("grow")))
    out = [("small", small, config_hash(asdict(small)))]
    out.append(("grow", None, config_hash({"growth": asdict(recipe.growth), "after": out[-1][2]})))
    out.append(("large", large, config_hash({"train": asdict(large), "after": out[-1][2]})))
    if recipe.scratch is not None:
        scratch = stage_train_config(recipe, "scratch", recipe.scratch, dirs, None)
        if recipe.scratch_matches_flops:
            budget = stage_flops(small, world)[1] + stage_flops(large, world)[1]
            iterations = max(1, math.ceil(budget / stage_flops(scratch, world)[0]))
            scratch = replace(scratch, schedule=replace(scratch.schedule, train_iters=iterations, train_tokens=None))
        out.append(("scratch", scratch, config_hash(asdict(scratch))))
    return out


def run_recipe(recipe: Recipe, out: Path, only: str | None = None) -> dict[str, Any]:
    """Every stage in order (collective: all ranks call it); returns the summary on rank 0."""
    import torch.distributed as dist

    from megastack.ckpt.execute import Comm
    from megastack.dist import init_distributed
    from megastack.train.loop import train

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Comm(rank, world)
    dirs = RunDirs(out)
    plan = stage_configs(recipe, dirs, world)
    results: dict[str, dict[str, Any]] = {}

    def say(text: str) -> None:
        if rank == 0:
            print(f"megastack run: {text}", flush=True)

    if only is not None and only not in [stage for stage, _, _ in plan]:
        say(f"stage {only}: not in recipe '{recipe.name}', nothing to do")

    for stage, cfg, digest in plan:
        marker = check_marker(dirs, stage, digest)
        if marker is not None:
            say(f"stage {stage}: finished earlier, skipped ({dirs.marker(stage)})")
            results[stage] = marker
            continue
        if only is not None and only != stage:
            if stage in NEEDS.get(only, ()):
                raise UserError(
                    f"--stage {only} needs stage '{stage}' finished first ({dirs.marker(stage)} "
                    "is missing); run the earlier stages first"
                )
            continue
        say(f"stage {stage}: starting")
        start = time.monotonic()
        if stage == "grow":
            result = grow_stage(recipe, dirs, results["small"]["checkpoint"], comm)
            result["wall_seconds"] = round(time.monotonic() - start, 3)
        else:
            result = asdict(train(cfg))
        if rank == 0:
            write_marker(dirs, stage, digest, result)
        comm.barrier()
        results[stage] = read_marker(dirs, stage) or result
    summary: dict[str, Any] = {}
    if rank == 0 and all(stage in results for stage, _, _ in plan):
        summary = write_summary(recipe, dirs, results)
    comm.barrier()
    return summary


def grow_stage(recipe: Recipe, dirs: RunDirs, small_checkpoint: str, comm) -> dict[str, Any]:
    """The growth stage; a grown directory left by a run that stopped before its marker is reused if it
    verifies."""
    from megastack.ckpt.inspect import verify
    from megastack.ckpt.manifest import read_manifest

    grown = dirs.stage_dir("grow")
    if grown.exists():
        problems = verify(grown)
        if problems:
            raise UserError(f"{grown} exists but does not verify ({problems[0]}); delete it and run again")
        return grow_result(grown, (read_manifest(grown) or {}).get("growth", {}))
    return run_grow(recipe, dirs, small_checkpoint, comm)

"""The stages of a run, in order; each a directory under OUT with a marker once finished.

A finished stage writes ``OUT/stages/<stage>.json`` (the hash of its effective config and the checksum of
its output), so the same command run again skips what is done, resumes the unfinished stage from its last
checkpoint, and refuses to continue when a finished stage's config has changed. All ranks run every stage
together: training is collective, and the growth step splits its output across the same ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from megastack.config import ModelConfig
from megastack.errors import UserError
from megastack.growth.spec import GrowthSpec, operator
from megastack.run.dirs import RunDirs, check_marker, config_hash, read_marker, write_marker
from megastack.run.recipe import GrowthRecipe, Recipe, StageRecipe, planned_growth_tokens
from megastack.run.report import write_summary
from megastack.train.config import ScheduleConfig, TrainConfig

# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One stage of a run: a training stage (``train``) or a growth (``growth``, of stage ``source``)."""

    name: str
    digest: str  # the hash its marker records; hashes chain, so a change upstream changes every later one
    train: TrainConfig | None = None
    growth: GrowthRecipe | None = None
    source: str | None = None


def stage_train_config(
    recipe: Recipe,
    stage: str,
    stage_recipe: StageRecipe,
    model: ModelConfig,
    dirs: RunDirs,
    init_from: str | None,
    schedule: ScheduleConfig | None = None,
    carried: bool = False,
) -> TrainConfig:
    return TrainConfig(
        model=model,
        out_dir=str(dirs.stage_dir(stage)),
        parallel=stage_recipe.parallel or recipe.parallel,
        data=recipe.data,
        optimizer=stage_recipe.optimizer,
        schedule=schedule or stage_recipe.schedule,
        init_from=init_from,
        init_optimizer="carried" if carried else "fresh",
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


def stage_configs(recipe: Recipe, dirs: RunDirs, world: int) -> list[Stage]:
    """Every stage in order: small, [grow1, stage1, ...], grow, large, then the baseline."""
    links = recipe.chain()
    out: list[Stage] = []
    for i, link in enumerate(links):
        init_from = None
        if link.growth is not None:
            digest = config_hash({"growth": link.growth, "after": out[-1].digest})
            out.append(Stage(link.growth_name, digest, growth=link.growth, source=out[-1].name))
            init_from = str(dirs.stage_dir(link.growth_name))
        schedule = None
        following = links[i + 1].growth if i + 1 < len(links) else None
        if following is not None and following.tokens is not None:  # d: this stage's length
            d = planned_growth_tokens(recipe) if following.tokens == "plan" else following.tokens
            schedule = replace(link.stage.schedule, train_iters=None, train_tokens=d)
        carried = link.growth is not None and link.growth.carry_optimizer  # Adam's state through the growth
        cfg = stage_train_config(recipe, link.name, link.stage, link.model, dirs, init_from, schedule, carried)
        digest = config_hash(cfg if not out else {"train": cfg, "after": out[-1].digest})
        out.append(Stage(link.name, digest, train=cfg))
    scratch_recipe = recipe.scratch_stage(links[-1].model)
    if scratch_recipe is not None:
        scratch = stage_train_config(recipe, "scratch", scratch_recipe, scratch_recipe.resolved_model(), dirs, None)
        if recipe.scratch_matches_flops:
            budget = sum(stage_flops(s.train, world)[1] for s in out if s.train is not None)
            iterations = max(1, math.ceil(budget / stage_flops(scratch, world)[0]))
            scratch = replace(scratch, schedule=replace(scratch.schedule, train_iters=iterations, train_tokens=None))
        out.append(Stage("scratch", config_hash(scratch), train=scratch))
    return out


def needed_before(stages: list[Stage], name: str) -> list[str]:
    """What ``--stage name`` needs finished first: every earlier stage of the grown chain (the baseline
    needs nothing)."""
    chain = [s.name for s in stages if s.name != "scratch"]
    return chain[: chain.index(name)] if name in chain else []


class StageRunner:
    """Runs each stage once, on every rank together: a finished stage (its marker, same config hash) is
    skipped, a changed one refused. ``megastack run`` and bench/speedup.py both drive their stages with it."""

    def __init__(self, dirs: RunDirs, comm: Any, say: Callable[[str], None]):
        self.dirs, self.comm, self.say = dirs, comm, say

    def finished(self, name: str, digest: str) -> dict[str, Any] | None:
        return check_marker(self.dirs, name, digest)

    def run(self, name: str, digest: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        marker = self.finished(name, digest)
        if marker is not None:
            self.say(f"stage {name}: finished earlier, skipped ({self.dirs.marker(name)})")
            return marker
        self.say(f"stage {name}: starting")
        start = time.monotonic()
        result = work()
        result.setdefault("wall_seconds", round(time.monotonic() - start, 3))
        if self.comm.rank == 0:
            write_marker(self.dirs, name, digest, result)
        self.comm.barrier()
        return read_marker(self.dirs, name) or result

    def train(self, name: str, cfg: TrainConfig, digest: str, verbose: bool = True) -> dict[str, Any]:
        from megastack.train.loop import train

        return self.run(name, digest, lambda: asdict(train(cfg, verbose=verbose)))

    def grow(self, name: str, digest: str, source: str, grown: Path, spec: GrowthSpec) -> dict[str, Any]:
        return self.run(name, digest, lambda: grow_stage(source, grown, spec, self.comm))


def run_recipe(recipe: Recipe, out: Path, only: str | None = None) -> dict[str, Any]:
    """Every stage in order (collective: all ranks call it); returns the summary on rank 0."""
    import torch.distributed as dist

    from megastack.ckpt.execute import Comm
    from megastack.dist import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Comm(rank, world)
    dirs = RunDirs(out)
    stages = stage_configs(recipe, dirs, world)

    def say(text: str) -> None:
        if rank == 0:
            print(f"megastack run: {text}", flush=True)

    runner = StageRunner(dirs, comm, say)
    if only is not None and only not in [s.name for s in stages]:
        say(f"stage {only}: not in recipe '{recipe.name}', nothing to do")
    results: dict[str, dict[str, Any]] = {}
    for stage in stages:
        if only is not None and only != stage.name:
            marker = runner.finished(stage.name, stage.digest)
            if marker is not None:
                results[stage.name] = marker
            elif stage.name in needed_before(stages, only):
                raise UserError(
                    f"--stage {only} needs stage '{stage.name}' finished first ({dirs.marker(stage.name)} "
                    "is missing); run the earlier stages first"
                )
            continue
        if stage.growth is not None:
            spec = stage.growth.spec(growth_data(recipe) if operator(stage.growth.operator).needs_data else ())
            source = results[stage.source]["checkpoint"]
            results[stage.name] = runner.grow(stage.name, stage.digest, source, dirs.stage_dir(stage.name), spec)
        else:
            results[stage.name] = runner.train(stage.name, stage.train, stage.digest)
    summary: dict[str, Any] = {}
    if rank == 0 and all(s.name in results for s in stages):
        summary = write_summary(recipe, dirs, stages, results)
    comm.barrier()
    return summary


def growth_data(recipe: Recipe) -> list[str]:
    """What G_learn learns on when its growth names no learn_data: the recipe's training data."""
    from megastack.train.data import resolve_data

    vocab = recipe.chain()[0].model.vocab_size
    return list(recipe.data.prefixes) or resolve_data([], recipe.data.tokenizer, vocab, recipe.data.demo_bytes)[0]


def grow_stage(source: str, grown: Path, spec: GrowthSpec, comm: Any) -> dict[str, Any]:
    """One growth, split across the ranks; a grown directory left by a run that stopped before its marker
    is reused if it verifies. The record says what was done and what it cost (G_learn's map training:
    6N FLOPs per token of the grown model, as training)."""
    from megastack.ckpt.inspect import verify
    from megastack.ckpt.manifest import read_manifest
    from megastack.growth.api import grow

    if grown.exists():
        problems = verify(grown)
        if problems:
            raise UserError(f"{grown} exists but does not verify ({problems[0]}); delete it and run again")
        manifest = read_manifest(grown) or {}
    else:
        manifest = grow(source, grown, spec, comm=comm).manifest
    growth = manifest.get("growth") or {}
    learn = (manifest.get("history") or [{}])[-1].get("learn")
    record = {
        "checkpoint": str(grown),
        "operator": spec.operator,
        "dimension": spec.dimension,
        **{k: growth.get(k) for k in ("layer_map", "new_layers")},
    }
    if isinstance(learn, dict):
        from megastack.config import from_dict
        from megastack.flops import flops_per_token

        tokens = float(learn.get("tokens") or 0)
        record["growth_flops"] = flops_per_token(from_dict(ModelConfig, manifest["model"])) * tokens
        record["learn"] = {k: learn.get(k) for k in ("steps", "tokens", "heldout_loss_stack", "heldout_loss_learned")}
    return record

"""The speedup harness: does growing a small model save compute against training the large one from scratch?

Reproduces the paper's Figure 3 (Du et al. 2024, arXiv 2405.15319) on the user's setup. For every seed:
train the small model ONCE, grow it with every requested operator from that same checkpoint (in-process
library calls, collective across the ranks), train each grown model with the same schedule and optimizer,
and train the large model from scratch with the FLOPs of small + large (megastack.run's FLOP
matching). Every large run evaluates at its start, so the loss spike right after growth is in the curves.
Per operator it reports the final validation loss, the FLOPs it needed to reach the scratch run's final
loss (the small stage counted), and speedup = FLOPs_scratch / FLOPs_op - 1, over seeds with their spread,
as speedup.md / speedup.json and a loss-vs-FLOPs plot (speedup.png).

Operators: stack, zero, random, learn (depth, from the small model) and width, width-zero, width-random
(G_direct / G_zero / G_random width: from a model of the large depth at half the width, trained on the same
tokens as the small model, since width growth cannot start from the shallow one). learn's own training
(the LiGO maps) is counted as 6 N tokens of the grown model and added to its cumulative FLOPs.

    python bench/speedup.py --preset cpu                  # ~35-40 min on an idle 2-core machine
    python bench/speedup.py --preset smoke --out /tmp/s   # seconds per stage: the test suite runs it
    python bench/speedup.py --preset cpu --seeds 1,2,3 --operators stack,zero
    torchrun --nproc-per-node 8 bench/speedup.py --preset cluster --out runs/speedup-1.1b

Without a launcher it starts ``--nproc`` (default 2) local ranks of itself. Re-running the same command
skips finished runs (stage markers under OUT/seed-N/stages/, as ``megastack run``), resumes an unfinished
one from its last checkpoint, and refuses a finished run whose config changed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megastack.config import ModelConfig, from_dict  # noqa: E402
from megastack.errors import UserError  # noqa: E402
from megastack.growth.spec import OPERATORS as GROWTH_OPERATORS  # noqa: E402
from megastack.run.dirs import RunDirs, config_hash, read_marker  # noqa: E402
from megastack.run.recipe import Recipe, load_recipe, planned_model  # noqa: E402
from megastack.run.report import eval_curve, flops_to_reach, plot_loss_curves  # noqa: E402
from megastack.run.stages import StageRunner, stage_configs  # noqa: E402

DEPTH_OPERATORS = tuple(name for name, op in GROWTH_OPERATORS.items() if op.grows)
# harness name -> growth operator (width dimension); learn's width maps are left out of the harness
WIDTH_OPERATORS = {"width" if op == "stack" else f"width-{op}": op for op in DEPTH_OPERATORS if op != "learn"}
# operator+variant: the same growth with Adam's state carried through it (the large stage continues the small
# stage's moments and step instead of a fresh AdamW), or with the paper's noise (W <- 0.8 W + 0.2 eps)
VARIANTS = {"carried": "Adam's state carried through the growth", "noise": "--noise 0.2 on the grown weights"}
VARIANT_OPERATORS = ("stack+carried", "zero+carried", "stack+noise")
OPERATORS = DEPTH_OPERATORS + tuple(WIDTH_OPERATORS) + VARIANT_OPERATORS
PAPER_NOISE = 0.2

# The smoke preset: a few iterations per stage, so the test suite runs the whole harness in about a minute.
SMOKE = {
    "name": "speedup-smoke",
    "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 1, "micro_batch_size": 4, "global_batch_size": 8},
    "data": {"prefixes": [], "split": "98,2,0", "seed": 1234},
    "logging": {"tensorboard": False, "progress": "off"},
    "small": {
        "model": "tiny-small",
        "optimizer": {"lr": 3.0e-3, "warmup_iters": 2},
        "schedule": {
            "train_iters": 6,
            "eval_interval": 3,
            "eval_iters": 1,
            "save_interval": 0,
            "keep_last": 1,
            "log_interval": 3,
        },
    },
    "growth": {"operator": "stack", "factor": 4},
    "large": {
        "model": "tiny",
        "optimizer": {"lr": 2.0e-3, "warmup_iters": 2},
        "mask_ramp_steps": 3,
        "schedule": {
            "train_iters": 6,
            "eval_interval": 2,
            "eval_at_start": True,
            "eval_iters": 1,
            "save_interval": 0,
            "keep_last": 1,
            "log_interval": 3,
        },
    },
}


@dataclass(frozen=True)
class Preset:
    recipe: str | dict[str, Any]  # a shipped recipe name / path, or the recipe itself
    seeds: tuple[int, ...]
    operators: tuple[str, ...]
    learn_tokens: int = 16384
    note: str = ""
    sweep_d: tuple[int, ...] = ()
    sweep_g: tuple[int, ...] = ()
    sweep_seeds: tuple[int, ...] | None = None  # the seeds the sweeps run for (None: every seed)
    upcycle: tuple[int, int, int] | None = None


PRESETS = {
    "smoke": Preset(SMOKE, (1,), ("stack", "zero"), learn_tokens=2048, note="seconds per stage: the test suite's"),
    "cpu": Preset(
        "speedup-cpu",
        (1, 2),
        ("stack", "zero", "random", "learn", "width", "width-zero", "width-random"),
        note="configs/recipes/speedup-cpu.yaml: ~35-40 min on an idle 2-core machine",
    ),
    "chinchilla": Preset(
        "speedup-chinchilla",
        (1, 2, 3),
        ("stack", "zero", *VARIANT_OPERATORS, "random", "learn", "width", "width-zero", "width-random"),
        learn_tokens=1 << 16,
        note="configs/recipes/speedup-chinchilla.yaml: scratch at 20 tokens per parameter; ~10 min per large "
        "run on an idle 2-core machine (hours in all), resumable (add operators, sweeps or seeds later)",
        sweep_d=(125, 250, 1000, 2000),  # 0.5M-8M small-stage tokens around the recipe's 2M
        sweep_g=(2, 8),  # with the recipe's 4: small models of 4, 2 and 1 layers
        sweep_seeds=(1,),  # each sweep point is a full large run: one seed, the operators have three
        upcycle=(8, 2, 2),  # mini-small -> 8 half-width experts, top 2: the dense FLOPs per token
    ),
    "cluster": Preset(
        "llama-1.1b",
        (1,),
        ("stack", "zero", "random"),
        learn_tokens=1 << 22,
        note="configs/recipes/llama-1.1b.yaml (the paper's 1.1B setting): a GPU cluster's job",
    ),
}


@dataclass
class Options:
    seeds: tuple[int, ...]
    operators: tuple[str, ...]
    learn_tokens: int
    learn_batch: int = 8
    learn_lr: float = 0.01
    upcycle: tuple[int, int, int] | None = None  # (experts, topk, granularity): the upcycling comparison
    sweep_d: tuple[int, ...] = ()  # growth timing: small-stage iterations, each grown by stack
    sweep_g: tuple[int, ...] = ()  # growth factor: small models of large layers / g, each stacked g times
    sweep_seeds: tuple[int, ...] | None = None  # the seeds the sweeps run for (None: every seed)
    scratch_from: Path | None = None  # a stored speedup.json whose scratch runs stand in for this run's

    def sweeps_for(self, seed: int) -> bool:
        return self.sweep_seeds is None or seed in self.sweep_seeds


# ----------------------------------------------------------------------------- setup


def resolve_recipe(spec: str | dict[str, Any]) -> Recipe:
    """The preset's recipe; every large run evaluates at its start and the baseline exists (default: the
    large stage's schedule and optimizer, then FLOP-matched)."""
    recipe = from_dict(Recipe, spec, where="smoke preset") if isinstance(spec, dict) else load_recipe(spec)[0]
    problems = recipe.check()
    if problems:
        raise UserError(f"recipe {recipe.name}: {problems[0][0]}: {problems[0][1]}")
    large = replace(recipe.large, schedule=replace(recipe.large.schedule, eval_at_start=True))
    scratch = recipe.scratch or recipe.large
    scratch = replace(scratch, schedule=replace(scratch.schedule, eval_at_start=True))
    return replace(recipe, large=large, scratch=scratch, scratch_matches_flops=True)


def seeded(recipe: Recipe, seed: int) -> Recipe:
    """One seed: the models' initialisation and the growth's randomness; the data order and validation
    batches stay the same, so every run of every seed is evaluated on the same tokens."""
    stages = {name: replace(getattr(recipe, name), seed=seed) for name in ("small", "large", "scratch")}
    return replace(recipe, growth=replace(recipe.growth, seed=seed), **stages)


def narrow_model(large: ModelConfig) -> ModelConfig:
    """The width operators' small model: the large depth at half the width (same head dim), so width x2
    grows it back with about 4x the non-embedding parameters, the paper's g = 4."""
    heads = max(1, large.num_attention_heads // 2)
    groups = max(1, large.query_groups // 2)
    if heads % groups or large.num_attention_heads < 2:
        raise UserError(
            f"{large.name}: cannot halve {large.num_attention_heads} heads / {large.query_groups} query "
            "groups for the width operators' small model; leave width out of --operators"
        )
    return replace(
        large,
        hidden_size=heads * large.head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=large.ffn_hidden_size // 2,
        name=f"{large.name or 'model'}-narrow",
    )


def growth_spec(op: str, recipe: Recipe, large: ModelConfig, seed: int):
    from megastack.growth.spec import GrowthSpec

    g = recipe.growth
    op, _, variant = op.partition("+")
    if variant:
        spec = growth_spec(op, recipe, large, seed)
        return replace(spec, carry_optimizer=True) if variant == "carried" else replace(spec, noise=PAPER_NOISE)
    if op in WIDTH_OPERATORS:
        return GrowthSpec(
            operator=WIDTH_OPERATORS[op],
            dimension="width",
            seed=seed,
            hidden=large.hidden_size,
            ffn=large.ffn_hidden_size,
            heads=large.num_attention_heads,
            query_groups=large.query_groups,
        )
    return GrowthSpec(operator=op, factor=g.factor, layer_map=g.layer_map, noise=g.noise, seed=seed)


# ----------------------------------------------------------------------------- the runs (collective)


def run_seed(
    recipe: Recipe, seed: int, out: Path, options: Options, comm: Any, rank: int, world: int
) -> dict[str, Any]:
    """Small once, every operator from it, the FLOP-matched scratch run; the stage results by name."""
    from megastack.train.data import resolve_data

    recipe = seeded(recipe, seed)
    dirs = RunDirs(out / f"seed-{seed}")

    def say(text: str) -> None:
        if rank == 0:
            print(f"speedup: {dirs.out.name}: {text}", flush=True)

    runner = StageRunner(dirs, comm, say)
    plan = {stage.name: stage for stage in stage_configs(recipe, dirs, world)}
    small_cfg = plan["small"].train
    large_template, scratch = plan["large"].train, plan["scratch"]
    large_model = large_template.resolved_model()
    results: dict[str, Any] = {"small": runner.train("small", small_cfg, plan["small"].digest, verbose=False)}
    # scratch right after small: a run stopped part-way (or given fewer operators) already has its baseline
    if options.operators and options.scratch_from is None:  # (none: only upcycling, with its own baseline)
        results["scratch"] = runner.train("scratch", scratch.train, scratch.digest, verbose=False)
    data = (
        list(recipe.data.prefixes)
        or resolve_data([], recipe.data.tokenizer, large_model.vocab_size, recipe.data.demo_bytes)[0]
    )
    if any(op in WIDTH_OPERATORS for op in options.operators):
        narrow = replace(small_cfg, model=narrow_model(large_model), out_dir=str(dirs.stage_dir("small-width")))
        results["small-width"] = runner.train("small-width", narrow, config_hash(narrow), verbose=False)
    for op in options.operators:
        source_stage = "small-width" if op in WIDTH_OPERATORS else "small"
        source_cfg = (results[source_stage], small_cfg if source_stage == "small" else narrow)
        spec = replace(
            growth_spec(op, recipe, large_model, seed),
            learn_data=tuple(data),
            learn_tokens=options.learn_tokens,
            learn_batch=options.learn_batch,
            learn_lr=options.learn_lr,
        )
        target = planned_model(source_cfg[1].resolved_model(), spec)
        if target.num_layers != large_model.num_layers or target.hidden_size != large_model.hidden_size:
            raise UserError(
                f"--operators {op}: growth gives {target.num_layers} layers x {target.hidden_size} "
                f"hidden, the large model is {large_model.num_layers} x {large_model.hidden_size}"
            )
        grow_hash = config_hash(
            {
                "spec": replace(spec, learn_data=()),
                "learn": [options.learn_tokens, options.learn_batch, options.learn_lr] if op == "learn" else None,
                "after": config_hash(source_cfg[1]),
            }
        )
        large = replace(large_template, model=replace(large_model, norm_epsilon=target.norm_epsilon))
        if spec.carry_optimizer:  # the large stage continues the small stage's Adam (its own LR schedule)
            large = replace(large, init_optimizer="carried")
        results |= grow_then_train(runner, dirs, op, source_cfg[0]["checkpoint"], spec, grow_hash, large)
    if options.sweeps_for(seed):
        results |= run_sweeps(recipe, seed, dirs, runner, small_cfg, large_template, options)
    if options.upcycle is not None:
        results |= run_upcycle(seed, dirs, runner, results["small"]["checkpoint"], small_cfg, large_template, options)
    return results


def grow_then_train(runner, dirs, tag, checkpoint, spec, grow_hash, large) -> dict[str, Any]:
    """Stages grow-TAG (``checkpoint`` grown by ``spec`` into grown-TAG) and large-TAG (``large`` trained from
    it), as every grown run of the harness is made."""
    grown = dirs.stage_dir(f"grown-{tag}")
    results = {f"grow-{tag}": runner.grow(f"grow-{tag}", grow_hash, checkpoint, grown, spec)}
    large = replace(large, out_dir=str(dirs.stage_dir(f"large-{tag}")), init_from=str(grown))
    digest = config_hash({"train": large, "after": grow_hash})
    results[f"large-{tag}"] = runner.train(f"large-{tag}", large, digest, verbose=False)
    return results


def sweep_points(options: Options, small_cfg: Any, factor: int | None) -> list[tuple[str, str, int]]:
    """(sweep, stage suffix, value) of every sweep point; the recipe's own d and g are the stack run's."""
    base_d, points = small_cfg.schedule.train_iters, []
    points += [("d", f"d{d}", d) for d in options.sweep_d if d != base_d]
    points += [("g", f"g{g}", g) for g in options.sweep_g if g != factor]
    return points


def run_sweeps(recipe, seed, dirs, runner, small_cfg, large_template, options) -> dict[str, Any]:
    """Growth timing d (the small stage's length) and factor g (small models of L / g layers, stacked g times),
    every point grown by stack and trained with the large stage's schedule, against the same scratch run."""
    from megastack.growth.spec import GrowthSpec

    large_model, results = large_template.resolved_model(), {}
    for sweep, tag, value in sweep_points(options, small_cfg, recipe.growth.factor):
        if sweep == "d":
            schedule = replace(small_cfg.schedule, train_iters=value, train_tokens=None)
            source = replace(small_cfg, schedule=schedule, out_dir=str(dirs.stage_dir(f"small-{tag}")))
            spec = GrowthSpec(operator="stack", factor=recipe.growth.factor, seed=seed)
        else:
            model = replace(large_model, num_layers=large_model.num_layers // value, name=f"{large_model.name}-{tag}")
            source = replace(small_cfg, model=model, out_dir=str(dirs.stage_dir(f"small-{tag}")))
            spec = GrowthSpec(operator="stack", factor=value, seed=seed)
        results[f"small-{tag}"] = runner.train(f"small-{tag}", source, config_hash(source), verbose=False)
        grow_hash = config_hash({"spec": spec, "after": config_hash(source)})
        checkpoint = results[f"small-{tag}"]["checkpoint"]
        results |= grow_then_train(runner, dirs, tag, checkpoint, spec, grow_hash, large_template)
    return results


def upcycle_configs(small_cfg: Any, large_template: Any, options: Options, seed: int, world: int):
    """(the upcycling spec, dense continued, the MoE stage before its paths): the small model trained on for the
    large stage's schedule, against the small model upcycled into experts and trained for the same FLOPs
    (its top-k experts cost more per token unless granular experts keep the dense width active)."""
    from megastack.growth.spec import GrowthSpec
    from megastack.run.stages import stage_flops

    experts, topk, granularity = options.upcycle
    spec = GrowthSpec(dimension="experts", experts=experts, topk=topk, granularity=granularity, seed=seed)
    dense = replace(large_template, model=small_cfg.resolved_model())
    moe = replace(dense, model=planned_model(small_cfg.resolved_model(), spec))
    _, total_dense = stage_flops(dense, world)
    iters = max(1, round(total_dense / stage_flops(moe, world)[0]))
    moe = replace(moe, schedule=replace(moe.schedule, train_iters=iters, train_tokens=None))
    return spec, dense, moe


def run_upcycle(seed, dirs, runner, small_checkpoint, small_cfg, large_template, options) -> dict[str, Any]:
    spec, dense, moe = upcycle_configs(small_cfg, large_template, options, seed, runner.comm.world)
    dense = replace(dense, out_dir=str(dirs.stage_dir("dense-continued")), init_from=small_checkpoint)
    results = {"dense-continued": runner.train("dense-continued", dense, config_hash(dense), verbose=False)}
    grow_hash = config_hash({"spec": spec, "after": config_hash(small_cfg)})
    return results | grow_then_train(runner, dirs, "upcycle", small_checkpoint, spec, grow_hash, moe)


# ----------------------------------------------------------------------------- the analysis (rank 0)


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# a stored baseline is reused only for the same scratch run: same model, iterations, FLOPs, batch and ranks
SCRATCH_SETUP_KEYS = ("large_model", "scratch_iters", "scratch_flops", "global_batch", "seq_length")


@functools.cache
def stored_scratch(path: Path) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """The scratch rows of a stored speedup.json by seed, and that report (read once per process). The
    FLOP-matched baseline does not depend on the operators, so a later run for more operators may reuse it."""
    from megastack.untrusted import read_json, typed

    fix = "give --scratch-from a speedup.json this harness wrote"
    report = typed(read_json(path, 64 << 20, fix), dict, path, "the document", fix)
    runs = typed(report.get("runs"), dict, path, "field 'runs'", fix)
    rows: dict[int, dict[str, Any]] = {}
    for key, run in runs.items():
        where = f"field 'runs.{key[:20]}.scratch'"
        row = typed(typed(run, dict, path, f"field 'runs.{key[:20]}'", fix).get("scratch"), dict, path, where, fix)
        curve = typed(row.get("curve"), list, path, f"{where}.curve", fix)
        points = [typed(p, list, path, f"{where}.curve", fix) for p in curve]
        if not key.isdigit() or not points or any(len(p) != 2 for p in points):
            raise UserError(f"{path}: {where} is not a seed's evaluation curve; {fix}")
        points = [[typed(v, float, path, f"{where}.curve", fix) for v in p] for p in points]
        wall = row.get("wall_seconds")
        rows[int(key)] = {
            "curve": points,
            "final_valid_loss": points[-1][1],
            "flops": points[-1][0],
            "wall_seconds": None if wall is None else typed(wall, float, path, f"{where}.wall_seconds", fix),
        }
    return rows, report


def scratch_provenance(path: Path | None) -> dict[str, Any] | None:
    """Where a reused baseline came from: the file, and the command and dates that measured it."""
    if path is None:
        return None
    stored = stored_scratch(path)[1]
    return {"file": str(path), **{k: stored.get(k) for k in ("command", "measured", "date")}}


def scratch_from_markdown(provenance: dict[str, Any] | None) -> list[str]:
    if not provenance:
        return []
    return [
        f"The scratch rows are not trained by this run: they are the same seeds' scratch runs of "
        f"`{provenance['file']}` (`{provenance['command']}`, measured {provenance['measured']}), "
        "the same recipe, model, iterations, batch and ranks."
    ]


def check_scratch_from(out: Path, recipe: Recipe, options: Options, world: int) -> None:
    """Refuse a stored baseline that is not this run's scratch run (another recipe, size, batch, ranks or seed)."""
    path, setup = options.scratch_from, run_setup(out, recipe, options, world)[1]
    rows, stored = stored_scratch(path)
    theirs = stored.get("setup") if isinstance(stored.get("setup"), dict) else {}
    differ = [k for k in SCRATCH_SETUP_KEYS if theirs.get(k) != setup[k]]
    if stored.get("recipe") != recipe.name or stored.get("world") != world or differ:
        what = ", ".join(differ) or ("recipe" if stored.get("recipe") != recipe.name else "ranks")
        raise UserError(f"--scratch-from {path}: its scratch run is not this one ({what} differ); run without it")
    missing = [s for s in options.seeds if s not in rows]
    if missing:
        raise UserError(f"--scratch-from {path}: no scratch run for seed(s) {missing}; run without it")


def analyse_seed(out: Path, seed: int, options: Options, small_cfg: Any, factor: int | None) -> dict[str, Any]:
    """Per operator and sweep point: curves, loss right after growth, final loss, FLOPs to reach scratch's
    final loss; the upcycling comparison."""
    operators = options.operators
    dirs = RunDirs(out / f"seed-{seed}")
    if options.scratch_from is not None:
        row: dict[str, Any] = {"scratch": stored_scratch(options.scratch_from)[0][seed]}
    else:
        scratch = eval_curve(dirs.stage_dir("scratch"))
        marker = read_marker(dirs, "scratch") or {}
        row = {
            "scratch": {
                "curve": scratch,
                "final_valid_loss": scratch[-1][1] if scratch else None,
                "flops": scratch[-1][0] if scratch else None,
                "wall_seconds": marker.get("wall_seconds"),
            }
        }
    for op in operators:
        small_stage = "small-width" if op in WIDTH_OPERATORS else "small"
        row[op] = grown_row(dirs, row["scratch"], small_stage, f"grow-{op}", f"large-{op}")
    for _, tag, _ in sweep_points(options, small_cfg, factor) if options.sweeps_for(seed) else ():
        row[tag] = grown_row(dirs, row["scratch"], f"small-{tag}", f"grow-{tag}", f"large-{tag}")
    if options.upcycle is not None:
        row["upcycle"] = analyse_upcycle(dirs)
    return row


def grown_row(dirs: RunDirs, scratch: dict[str, Any], small_stage: str, grow: str, large_stage: str) -> dict[str, Any]:
    """One grown run: its curves, loss right after growth, final loss, FLOPs to reach scratch's final loss."""
    target, f_scratch = scratch["final_valid_loss"], scratch["flops"]
    small, large = eval_curve(dirs.stage_dir(small_stage)), eval_curve(dirs.stage_dir(large_stage))
    reached = flops_to_reach(large, target) if target is not None and large else None
    walls = [(read_marker(dirs, s) or {}).get("wall_seconds") for s in (small_stage, grow, large_stage)]
    grow_marker = read_marker(dirs, grow) or {}
    return {
        "curve": small + large,
        "small_final_valid_loss": small[-1][1] if small else None,
        "loss_after_growth": large[0][1] if large else None,
        "final_valid_loss": large[-1][1] if large else None,
        "flops": large[-1][0] if large else None,
        "small_flops": small[-1][0] if small else None,
        "growth_flops": grow_marker.get("growth_flops", 0.0),
        "flops_to_scratch_loss": reached,
        "speedup": f_scratch / reached - 1 if reached and f_scratch else None,
        "learn": grow_marker.get("learn"),
        "wall_seconds": {"small": walls[0], "grow": walls[1], "large": walls[2]},
    }


def analyse_upcycle(dirs: RunDirs) -> dict[str, Any] | None:
    """Dense continued vs upcycled at equal FLOPs: both final losses, and the FLOPs the MoE needed to reach
    the dense run's final loss (both count the small stage they start from)."""
    dense, moe = eval_curve(dirs.stage_dir("dense-continued")), eval_curve(dirs.stage_dir("large-upcycle"))
    if not dense or not moe:
        return None
    reached = flops_to_reach(moe, dense[-1][1])
    return {
        "dense_curve": dense,
        "curve": moe,
        "dense_final_valid_loss": dense[-1][1],
        "dense_flops": dense[-1][0],
        "loss_after_growth": moe[0][1],
        "final_valid_loss": moe[-1][1],
        "flops": moe[-1][0],
        "flops_to_dense_loss": reached,
        "saving": dense[-1][0] / reached - 1 if reached else None,
    }


def aggregate(runs: dict[int, dict[str, Any]], operators: tuple[str, ...]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in ("scratch", *operators):
        rows = [r[name] for r in runs.values() if name in r]
        entry = {
            "final_valid_loss": _spread([r["final_valid_loss"] for r in rows if r["final_valid_loss"] is not None]),
            "flops": _spread([r["flops"] for r in rows if r["flops"] is not None]),
        }
        if name != "scratch":
            speedups = [r["speedup"] for r in rows if r["speedup"] is not None]
            entry |= {
                "loss_after_growth": _spread(
                    [r["loss_after_growth"] for r in rows if r["loss_after_growth"] is not None]
                ),
                "flops_to_scratch_loss": _spread(
                    [r["flops_to_scratch_loss"] for r in rows if r["flops_to_scratch_loss"] is not None]
                ),
                "speedup": _spread(speedups),
                "speedup_per_seed": [r["speedup"] for r in rows],
                "reached": f"{len(speedups)}/{len(rows)}",
            }
        table[name] = entry
    upcycled = [r["upcycle"] for r in runs.values() if r.get("upcycle")]
    if upcycled:
        table["upcycle"] = {
            key: _spread([u[key] for u in upcycled if u[key] is not None])
            for key in (
                "dense_final_valid_loss",
                "dense_flops",
                "final_valid_loss",
                "loss_after_growth",
                "flops",
                "saving",
            )
        } | {"saving_per_seed": [u["saving"] for u in upcycled]}
    return table


def _pm(s: dict[str, Any], spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if s["mean"] is None:
        return "-"
    text = format(s["mean"] * scale, spec) + suffix
    if s["sd"]:  # no ± for one seed, nor for a spread of exactly 0 (FLOPs fixed by the schedule)
        text += f" ± {format(s['sd'] * scale, spec)}{suffix}"
    return text


def _pct(value: float | None) -> str:
    return "not reached" if value is None else f"{value:+.1%}"


SWEEP_BASE = "stack (sweep seeds)"


def sweep_setup(options: Options, configs: dict[str, Any], factor: int | None, world: int) -> dict[str, Any]:
    """Each sweep's points in order (the recipe's own point is the stack run), and for d the growth timing
    Du et al.'s fit predicts for this target and budget (``megastack plan``'s formula)."""
    from megastack.planner import growth_timing

    small, scratch = configs["small"], configs["scratch"]
    par = small.parallel
    tokens_per_iter = par.micro_batch_size * par.data_parallel_size(world) * par.gradient_accumulation_steps(world)
    tokens_per_iter *= small.resolved_model().seq_length
    base_d, out = small.schedule.iterations(tokens_per_iter), {}
    base = "stack" if options.sweep_seeds is None else SWEEP_BASE  # the recipe's own point, over the sweep seeds
    if options.sweep_d:
        params = configs["large"].resolved_model().total_parameters()
        tokens = scratch.schedule.iterations(tokens_per_iter) * tokens_per_iter
        values = sorted({*options.sweep_d, base_d})
        out["d"] = {
            "points": [
                {"value": d, "run": base if d == base_d else f"d{d}", "tokens": d * tokens_per_iter} for d in values
            ],
            "small_parameters": small.resolved_model().total_parameters(),
            "predicted_tokens": growth_timing(params, tokens),
            "prediction": f"Du et al.'s fit at N = {params:,} parameters, D = {tokens:,} tokens (scratch)",
        }
    if options.sweep_g:
        values = sorted({*options.sweep_g, factor})
        out["g"] = {"points": [{"value": g, "run": base if g == factor else f"g{g}"} for g in values]}
    return out


def sweep_markdown(report: dict[str, Any]) -> list[str]:
    lines = []
    for sweep, info in report.get("sweeps", {}).items():
        title = "growth timing d (small-stage iterations)" if sweep == "d" else "growth factor g (layers / g, x g)"
        lines += [
            "",
            f"Sweep: {title}, every point grown by stack and trained with the large stage's schedule, "
            f"against the same scratch run (seeds {', '.join(map(str, report['options']['sweep_seeds']))}):",
            "",
        ]
        head = "| d (iterations) | d tokens | small tokens/param |" if sweep == "d" else "| g |"
        lines += [
            head + " final valid loss | total FLOPs | FLOPs to scratch's final loss | speedup | per seed |",
            "|---" * (6 if sweep == "d" else 4) + "|---|---|",
        ]
        for point in info["points"]:
            t = report["table"].get(point["run"])
            if t is None:
                lines.append(f"| {point['value']} | not measured (the recipe's own point needs stack in --operators) |")
                continue
            sp = t["speedup"]
            speed = "not reached" if sp["mean"] is None else _pm(sp, ".1f", 100, "%")
            first = f"| {point['value']} |"
            if sweep == "d":
                first += f" {point['tokens']:,} | {point['tokens'] / info['small_parameters']:.1f} |"
            lines.append(
                f"{first} {_pm(t['final_valid_loss'], '.4f')} | {_pm(t['flops'], '.3e')} | "
                f"{_pm(t['flops_to_scratch_loss'], '.3e')} | {speed} | "
                f"{', '.join(_pct(v) for v in t['speedup_per_seed'])} |"
            )
        if sweep == "d":
            lines += [
                "",
                f"Predicted d: {info['predicted_tokens']:.3g} tokens ({info['prediction']}; the fit was made "
                "at 410M-7B targets, so a gap here is a finding about its range, not a failure).",
            ]
    return lines


def upcycle_markdown(report: dict[str, Any]) -> list[str]:
    u = report["table"].get("upcycle")
    if not u:
        return []
    experts, topk, granularity = report["options"]["upcycle"]
    per_seed = ", ".join(_pct(v) for v in u["saving_per_seed"])
    return [
        "",
        f"Upcycling: the small model trained on dense for the large stage's schedule, against it upcycled into "
        f"{experts} experts (top {topk}, granularity {granularity}) and trained for the same FLOPs (both from "
        "the small checkpoint, fresh AdamW, warmup + cosine):",
        "",
        "| run | final valid loss | loss right after upcycling | total FLOPs | saving to the dense run's final "
        "loss (FLOPs_dense / FLOPs_moe - 1) | per seed |",
        "|---|---|---|---|---|---|",
        f"| dense continued | {_pm(u['dense_final_valid_loss'], '.4f')} | - | {_pm(u['dense_flops'], '.3e')} | "
        "0 (baseline) | - |",
        f"| upcycled | {_pm(u['final_valid_loss'], '.4f')} | {_pm(u['loss_after_growth'], '.4f')} | "
        f"{_pm(u['flops'], '.3e')} | "
        f"{'not reached' if u['saving']['mean'] is None else _pm(u['saving'], '.1f', 100, '%')} | {per_seed} |",
    ]


def report_markdown(report: dict[str, Any]) -> str:
    setup, table = report["setup"], report["table"]
    n = len(report["seeds"])
    lines = [
        f"# Speedup: {report['recipe']} ({report['preset'] or 'custom'} preset)",
        "",
        f"`{report['command']}`, {report['world']} rank(s), seeds {report['seeds']}; stages finished "
        f"{report.get('measured') or report['date']}: {report['stage_wall_seconds'] / 60:.1f} min summed over "
        f"the stages' own wall times (report written {report['date']}, this invocation "
        f"{report['wall_seconds'] / 60:.1f} min).",
    ]
    if not report["operators"]:  # --operators none: the upcycling comparison alone
        small = f"Small `{setup['small_model']}` {setup['small_iters']} iterations ({setup['small_tokens']:,} tokens)."
        return "\n".join([*lines, "", small, *upcycle_markdown(report)]) + "\n"
    lines += [
        "",
        f"Small `{setup['small_model']}` {setup['small_iters']} iterations ({setup['small_tokens']:,} tokens), "
        f"grown x{setup['factor']} into `{setup['large_model']}`, {setup['large_iters']} iterations "
        f"({setup['large_tokens']:,} tokens) per operator; scratch `{setup['large_model']}` "
        f"{setup['scratch_iters']} iterations (the FLOPs of small + large); global batch "
        f"{setup['global_batch']} x {setup['seq_length']} tokens, AdamW, fresh after growth, warmup + "
        "cosine in every stage; validation loss on the same held-out batches everywhere.",
        *scratch_from_markdown(report.get("scratch_from")),
        "",
        "| operator | final valid loss | loss right after growth | total FLOPs | FLOPs to reach scratch's "
        "final loss | speedup (FLOPs_scratch / FLOPs_op - 1) | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    s = table["scratch"]
    lines.append(
        f"| scratch | {_pm(s['final_valid_loss'], '.4f')} | - | {_pm(s['flops'], '.3e')} | "
        f"{_pm(s['flops'], '.3e')} | 0 (baseline) | - |"
    )
    for op in report["operators"]:
        t = table[op]
        sp = t["speedup"]
        speed = "not reached" if sp["mean"] is None else _pm(sp, ".1f", 100, "%")
        if sp["mean"] is not None and t["reached"] != f"{n}/{n}":
            speed += f" ({t['reached']} seeds reached)"
        lines.append(
            f"| {op} | {_pm(t['final_valid_loss'], '.4f')} | {_pm(t['loss_after_growth'], '.4f')} | "
            f"{_pm(t['flops'], '.3e')} | {_pm(t['flops_to_scratch_loss'], '.3e')} | {speed} | "
            f"{', '.join(_pct(v) for v in t['speedup_per_seed'])} |"
        )
    lines += [
        "",
        "Mean ± sample standard deviation over seeds (no ± with one seed). FLOPs count the small "
        "stage (and G_learn's map training); 'not reached': the run's curve never got down to the "
        "scratch run's final loss, so its speedup is negative or unmeasured at this budget.",
    ]
    for op, why in report["not_measured"].items():
        lines.append(f"- `{op}`: not measured: {why}")
    if any(op in WIDTH_OPERATORS for op in report["operators"]):
        lines.append(
            f"- width operators start from `{setup.get('narrow_model')}` (the large depth at half the "
            "width), trained with the small stage's schedule; their FLOPs count that model instead."
        )
    if "learn" in report["operators"]:
        lines.append(
            f"- learn: LiGO maps trained on {report['options']['learn_tokens']:,} tokens of the training "
            "data before the large stage, counted as 6N FLOPs per token of the grown model."
        )
    for op in report["operators"]:
        if "+" in op:
            base, _, variant = op.partition("+")
            lines.append(f"- `{op}`: `{base}` with {VARIANTS[variant]}, from the same small checkpoint.")
    lines += sweep_markdown(report)
    lines += upcycle_markdown(report)
    lines += [
        "",
        "Per seed (valid loss right after growth -> final; wall seconds of small / grow / large):",
        "",
        "| seed | run | small final | after growth | final | FLOPs to scratch loss | speedup | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, run in report["runs"].items():
        sc = run["scratch"]
        lines.append(
            f"| {seed} | scratch | - | - | {_num(sc['final_valid_loss'], '.4f')} | {_num(sc['flops'], '.3e')} "
            f"| - | {_num(sc['wall_seconds'], '.0f')} |"
        )
        for op in report["operators"]:
            r = run[op]
            w = r["wall_seconds"]
            lines.append(
                f"| {seed} | {op} | {_num(r['small_final_valid_loss'], '.4f')} | "
                f"{_num(r['loss_after_growth'], '.4f')} | {_num(r['final_valid_loss'], '.4f')} | "
                f"{_num(r['flops_to_scratch_loss'], '.3e')} | {_pct(r['speedup'])} | "
                f"{_num(w['small'], '.0f')} / {_num(w['grow'], '.0f')} / {_num(w['large'], '.0f')} |"
            )
    return "\n".join(lines) + "\n"


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLORS = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def plot(report: dict[str, Any], path: Path) -> None:
    """Validation loss vs FLOPs, every operator and scratch; the first seed labelled, the others faint."""
    curves: list[tuple[str | None, list[tuple[float, float]], dict[str, Any]]] = []
    lows, starts = [], []
    for i, run in enumerate(report["runs"].values()):
        faint = {} if i == 0 else {"alpha": 0.35, "markersize": 0}
        for j, name in enumerate(("scratch", *report["operators"])):
            points = [tuple(p) for p in run[name]["curve"]]
            if not points:
                continue
            lows.append(min(p[1] for p in points))
            if name != "scratch" and run[name]["loss_after_growth"] is not None:
                starts.append(run[name]["loss_after_growth"])
            style = {
                "fmt": "s--" if name == "scratch" else "o-",
                "color": "black" if name == "scratch" else COLORS[j % len(COLORS)],
                **faint,
            }
            curves.append((name if i == 0 else None, points, style))
        upcycled = run.get("upcycle")
        if upcycled:
            for name, points, fmt, color in (
                ("dense continued", upcycled["dense_curve"], "^:", "gray"),
                ("upcycled", upcycled["curve"], "d-", "purple"),
            ):
                curves.append(
                    (name if i == 0 else None, [tuple(p) for p in points], {"fmt": fmt, "color": color, **faint})
                )
    top = max(starts) + 0.4 if starts else None
    ylim = (min(lows) - 0.05, top) if lows and top else None
    seeds = ", ".join(str(s) for s in report["runs"])
    plot_loss_curves(curves, path, f"{report['recipe']}: validation loss vs FLOPs (seeds {seeds})", ylim=ylim)


def plot_sweeps(report: dict[str, Any], path: Path) -> None:
    """Speedup (mean and spread over seeds) against d and against g, one panel per sweep; for d, the growth
    timing Du et al.'s fit predicts. Points whose runs never reached scratch's final loss are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = report.get("sweeps") or {}
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.2), squeeze=False)
    for ax, (sweep, info) in zip(axes[0], sweeps.items()):
        xs, means, sds = [], [], []
        for point in info["points"]:
            speedup = (report["table"].get(point["run"]) or {}).get("speedup") or {}
            if speedup.get("mean") is not None:
                xs.append(point["tokens"] if sweep == "d" else point["value"])
                means.append(100 * speedup["mean"])
                sds.append(100 * (speedup["sd"] or 0.0))
        ax.errorbar(xs, means, yerr=sds, fmt="o-", capsize=3, color="tab:blue")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        if sweep == "d":
            ax.set_xscale("log")
            ax.set_xlabel("growth timing d (tokens the small model trains)")
            predicted = info["predicted_tokens"]
            ax.set_title(f"speedup vs d (fit predicts d = {predicted:.2g} tokens)")
        else:
            ax.set_xlabel("growth factor g (layers x g)")
            ax.set_title("speedup vs g")
        ax.set_ylabel("speedup, % (FLOPs_scratch / FLOPs_op - 1)")
        ax.grid(alpha=0.3)
    seeds = report["options"].get("sweep_seeds") or report["seeds"]  # each sweep point ran for these seeds only
    fig.suptitle(f"{report['recipe']}: sweeps over seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _marker_texts(markers: Path) -> list[str]:
    return [p.read_text() for p in sorted(markers.glob("*.json"))] if markers.is_dir() else []


def run_setup(out: Path, recipe: Recipe, options: Options, world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stages' train configs by name (the first seed's) and the run's setup: models, iterations, tokens,
    FLOPs, batch."""
    from megastack.run.stages import stage_flops

    dirs = RunDirs(out / f"seed-{options.seeds[0]}")
    configs = {stage.name: stage.train for stage in stage_configs(recipe, dirs, world)}
    small, large, scratch = configs["small"], configs["large"], configs["scratch"]
    par = small.parallel
    global_batch = par.micro_batch_size * par.data_parallel_size(world) * par.gradient_accumulation_steps(world)
    seq = large.resolved_model().seq_length
    small_iters = small.schedule.iterations(global_batch * seq)
    large_iters = large.schedule.iterations(global_batch * seq)
    setup = {
        "small_model": small.resolved_model().name,
        "large_model": large.resolved_model().name,
        "factor": recipe.growth.factor,
        "small_iters": small_iters,
        "large_iters": large_iters,
        "scratch_iters": scratch.schedule.iterations(global_batch * seq),
        "small_tokens": small_iters * global_batch * seq,
        "large_tokens": large_iters * global_batch * seq,
        "global_batch": global_batch,
        "seq_length": seq,
        "small_flops": stage_flops(small, world)[1],
        "large_flops": stage_flops(large, world)[1],
        "scratch_flops": stage_flops(scratch, world)[1],
    }
    if any(op in WIDTH_OPERATORS for op in options.operators):
        setup["narrow_model"] = narrow_model(large.resolved_model()).name
    return configs, setup


def write_report(
    out: Path, recipe: Recipe, options: Options, world: int, wall: float, preset: str | None, command: str
) -> dict[str, Any]:
    configs, setup = run_setup(out, recipe, options, world)
    factor = recipe.growth.factor
    runs = {seed: analyse_seed(out, seed, options, configs["small"], factor) for seed in options.seeds}
    points = sweep_points(options, configs["small"], factor)
    sweeps = sweep_setup(options, configs, factor, world)
    not_measured = {op: "not requested (--operators)" for op in OPERATORS if op not in options.operators}
    table = aggregate(runs, (*options.operators, *(tag for _, tag, _ in points)))
    if sweeps and options.sweep_seeds is not None and "stack" in options.operators:
        subset = {seed: runs[seed] for seed in options.sweep_seeds}
        table[SWEEP_BASE] = aggregate(subset, ("stack",))["stack"]
    markers = [json.loads(t) for seed in options.seeds for t in _marker_texts(out / f"seed-{seed}" / "stages")]
    stage_wall = sum(float(m.get("wall_seconds") or 0.0) for m in markers)
    finished = sorted(m["finished"] for m in markers if m.get("finished"))
    measured = f"{finished[0][:16].replace('T', ' ')} to {finished[-1][:16].replace('T', ' ')}" if finished else None
    report = {
        "preset": preset,
        "recipe": recipe.name,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "world": world,
        "seeds": list(options.seeds),
        "operators": list(options.operators),
        "options": {
            "upcycle": list(options.upcycle) if options.upcycle else None,
            "learn_tokens": options.learn_tokens,
            "learn_batch": options.learn_batch,
            "learn_lr": options.learn_lr,
            "sweep_seeds": list(options.sweep_seeds) if options.sweep_seeds is not None else list(options.seeds),
        },
        "setup": setup,
        "scratch_from": scratch_provenance(options.scratch_from),
        "table": table,
        "sweeps": sweeps,
        "not_measured": not_measured,
        "runs": {str(k): v for k, v in runs.items()},
        "wall_seconds": wall,
        "stage_wall_seconds": stage_wall,
        "measured": measured,
        "definition": "speedup = FLOPs_scratch / FLOPs_op - 1; FLOPs_op = cumulative FLOPs (small stage "
        "included) at which the grown run's validation loss first reaches the scratch run's "
        "final validation loss (linear interpolation between evaluations)",
    }
    from megastack.fsio import atomic_write_json, atomic_write_text

    atomic_write_json(out / "speedup.json", report)
    atomic_write_text(out / "speedup.md", report_markdown(report))
    plot(report, out / "speedup.png")
    if report["sweeps"]:
        plot_sweeps(report, out / "sweeps.png")
    return report


# ----------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="smoke (seconds), cpu (the 45-minute toy-budget CPU run), chinchilla (scratch at 20 tokens per "
        "parameter: hours on a CPU), cluster (the paper's 1.1B recipe)",
    )
    parser.add_argument("--recipe", help="any megastack run recipe instead of a preset's")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument(
        "--operators",
        help=f"comma-separated, from {', '.join(OPERATORS)} (default: the preset's); none: with --upcycle, only the "
        "upcycling comparison (no scratch run)",
    )
    parser.add_argument("--learn-tokens", type=int, help="G_learn's map training tokens (default: the preset's)")
    parser.add_argument(
        "--sweep-d",
        help="growth timing: comma-separated small-stage iterations, each grown by stack (the recipe's own is "
        "stack's); none: no sweep (default: the preset's)",
    )
    parser.add_argument(
        "--sweep-g",
        help="growth factor: comma-separated g dividing the large model's layers (small = layers / g, stacked x g); "
        "none: no sweep (default: the preset's)",
    )
    parser.add_argument(
        "--sweep-seeds",
        help="comma-separated seeds the sweeps run for (default: the preset's; chinchilla: 1; else every seed)",
    )
    parser.add_argument(
        "--upcycle",
        help="EXPERTS,TOPK[,GRANULARITY]: also compare the small model continued dense with it upcycled into "
        "experts, at equal FLOPs (e.g. 8,2,2: 8 half-width experts, top 2, the dense FLOPs per token); none: no "
        "comparison (default: the preset's)",
    )
    parser.add_argument(
        "--scratch-from",
        help="a speedup.json of an earlier run of the same recipe, seeds and ranks: its scratch runs are this "
        "run's baseline instead of training them again (the report names the file)",
    )
    parser.add_argument("--out", help="output directory (default: runs/speedup-<preset or recipe>)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks to start without a launcher")
    parser.add_argument("--json", help="also copy speedup.json here (for bench/run_all.py)")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Recipe, Options, Path]:
    preset = PRESETS[args.preset or ("cpu" if args.recipe is None else "smoke")]
    recipe = resolve_recipe(args.recipe or preset.recipe)
    seeds = _seeds(args.seeds, "--seeds") if args.seeds else preset.seeds
    upcycle = _upcycle(args.upcycle, recipe) if args.upcycle is not None else preset.upcycle
    operators = tuple(o.strip() for o in args.operators.split(",") if o.strip()) if args.operators else preset.operators
    if operators == ("none",) and upcycle:
        operators = ()  # the upcycling comparison alone
    for op in operators:
        if op not in OPERATORS:
            raise UserError(f"--operators {op!r} is unknown; choose from {', '.join(OPERATORS)}")
    if (not operators and not upcycle) or len(set(operators)) != len(operators):
        raise UserError(f"--operators needs distinct operator names, got {args.operators!r}")
    learn_tokens = args.learn_tokens if args.learn_tokens is not None else preset.learn_tokens
    if learn_tokens <= 0:
        raise UserError(f"--learn-tokens must be positive, got {learn_tokens}")
    if args.nproc < 1:
        raise UserError(f"--nproc must be positive, got {args.nproc}")
    name = args.preset or (Path(args.recipe).stem if args.recipe else "cpu")
    out = Path(args.out) if args.out else Path("runs") / f"speedup-{name}"
    sweep_d = _counts(args.sweep_d, "--sweep-d") if args.sweep_d is not None else preset.sweep_d
    sweep_g = _counts(args.sweep_g, "--sweep-g") if args.sweep_g is not None else preset.sweep_g
    if args.sweep_seeds:
        sweep_seeds = _seeds(args.sweep_seeds, "--sweep-seeds")
        if not set(sweep_seeds) <= set(seeds):
            raise UserError(f"--sweep-seeds {args.sweep_seeds}: each must be one of the seeds run ({seeds})")
    else:  # the preset's, within the seeds run
        sweep_seeds = preset.sweep_seeds and (tuple(s for s in preset.sweep_seeds if s in seeds) or seeds[:1])
    layers = recipe.large.resolved_model().num_layers
    for g in sweep_g:
        if layers % g or g < 2:
            raise UserError(f"--sweep-g {g}: g must be at least 2 and divide the large model's {layers} layers")
    if args.scratch_from and not operators:
        raise UserError("--scratch-from needs --operators: the upcycling comparison has no scratch run")
    options = Options(
        seeds,
        operators,
        learn_tokens,
        upcycle=upcycle,
        sweep_d=sweep_d,
        sweep_g=sweep_g,
        sweep_seeds=sweep_seeds,
        scratch_from=Path(args.scratch_from) if args.scratch_from else None,
    )
    return recipe, options, out


def _upcycle(text: str, recipe: Recipe) -> tuple[int, int, int] | None:
    """--upcycle EXPERTS,TOPK[,GRANULARITY] (none: no upcycling comparison), checked against the small model."""
    from megastack.growth.spec import GrowthSpec

    if text == "none":
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 3) or min(values) < 1:
        raise UserError(f"--upcycle takes EXPERTS,TOPK[,GRANULARITY] like 8,2,2 (or none), got {text!r}")
    experts, topk, granularity = (*values, 1)[:3]
    spec = GrowthSpec(dimension="experts", experts=experts, topk=topk, granularity=granularity)
    planned_model(recipe.small.resolved_model(), spec)  # a bad combination is refused before anything trains
    return experts, topk, granularity


def _seeds(text: str, flag: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers like 1,2,3, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"{flag} needs distinct non-negative integers, got {text!r}")
    return seeds


def _counts(text: str | None, flag: str) -> tuple[int, ...]:
    if not text or text == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if min(values) < 1 or len(set(values)) != len(values):
        raise UserError(f"{flag} takes distinct positive integers, got {text!r}")
    return values


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch.distributed as dist

    from megastack.ckpt.execute import Comm
    from megastack.dist import discover, init_distributed, launch_local

    recipe, options, out = resolve(args)
    launched = discover()
    if options.scratch_from is not None:  # refused before any rank starts or anything trains
        world = args.nproc if launched.launcher == "single" else launched.world_size
        check_scratch_from(out, recipe, options, world)
    if launched.launcher == "single" and args.nproc > 1:
        argv = [sys.executable, str(Path(__file__).resolve()), *argv]
        result = launch_local(argv, args.nproc, timeout=7 * 24 * 3600, stream_rank0=True)
        if not result.ok:
            for output in result.outputs:
                if output.strip():
                    raise UserError(f"a rank failed: {output.strip().splitlines()[-1]}")
            raise UserError("a rank failed (see the output above)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.monotonic()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Comm(rank, world)
    for seed in options.seeds:
        run_seed(recipe, seed, out, options, comm, rank, world)
    if rank == 0:
        wall = time.monotonic() - start
        shown = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
        command = "python bench/speedup.py " + " ".join(shown)
        report = write_report(out, recipe, options, world, wall, args.preset, command.strip())
        print(report_markdown(report), end="", flush=True)
        print(f"speedup: {out / 'speedup.md'} (and speedup.json), plot {out / 'speedup.png'}", flush=True)
        if args.json:
            Path(args.json).write_text((out / "speedup.json").read_text())
    comm.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        return run(args, argv)
    except UserError as exc:
        print(f"speedup: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

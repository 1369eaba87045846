"""``megastack run RECIPE``: small stage -> grow -> large stage (-> FLOP-matched scratch baseline) -> summary.

Every stage is a directory under OUT with its own checkpoints; a finished stage writes
``OUT/stages/<stage>.json`` (the hash of its effective config and the checksum of its output), so the
same command run again skips what is done, resumes the unfinished stage from its last checkpoint, and
refuses to continue when a finished stage's config has changed. All ranks run every stage together:
training is collective, and the growth step splits its output across the same ranks.

Without a launcher (``megastack run``), the command starts ``--nproc`` local ranks of itself; under
torchrun / the deepspeed launcher / srun / mpirun it runs as the rank it was given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from megastack import untrusted
from megastack.config import (
    ModelConfig,
    ParallelConfig,
    brief,
    from_dict,
    load_model_config,
    read_yaml,
    resolve_config_path,
)
from megastack.errors import UserError
from megastack.fsio import atomic_write_json, atomic_write_text
from megastack.train.config import (
    MAX_TRAIN_TOKENS,
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
)

DEFAULT_RECIPE = "tiny"
STAGES = ("small", "grow", "large", "scratch")
NEEDS = {"grow": ("small",), "large": ("small", "grow"), "scratch": ()}  # what --stage X requires done


# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class StageRecipe:
    """One training stage of a recipe: a TrainConfig without the paths the pipeline fills in."""

    model: ModelConfig | str
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(train_iters=100))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig | None = None  # None: the recipe's
    mask_ramp_steps: int = 100
    seed: int = 1234

    def resolved_model(self) -> ModelConfig:
        return self.model if isinstance(self.model, ModelConfig) else load_model_config(self.model)


@dataclass(frozen=True)
class GrowthRecipe:
    operator: Literal["stack", "zero", "random"] = "stack"
    factor: int | None = 4
    layer_map: str | None = None
    noise: float = 0.0
    seed: int = 0
    tokens: int | Literal["plan"] | None = None  # d: tokens of the small stage; "plan": from megastack plan

    def spec(self):
        """The GrowthSpec this recipe's growth stage runs."""
        from megastack.growth.spec import GrowthSpec

        return GrowthSpec(
            operator=self.operator, factor=self.factor, layer_map=self.layer_map, noise=self.noise, seed=self.seed
        )


@dataclass(frozen=True)
class Recipe:
    """A whole growth experiment (see configs/recipes/)."""

    name: str
    small: StageRecipe
    large: StageRecipe
    growth: GrowthRecipe = field(default_factory=GrowthRecipe)
    scratch: StageRecipe | None = None  # the baseline: the large model from scratch
    scratch_matches_flops: bool = True  # give the baseline the FLOPs of small + large (overrides its length)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # shared by every stage
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", self.name):
            # the default output directory is runs/<name>: a path here would write elsewhere
            problems.append(("name", f"{brief(self.name)} must be a plain name (letters, digits, '.', '_', '-')"))
        tokens = self.growth.tokens
        if isinstance(tokens, int) and not 0 < tokens <= MAX_TRAIN_TOKENS:
            problems.append(("growth.tokens", f"must be in [1, {MAX_TRAIN_TOKENS:.0e}], got {tokens}"))
        elif tokens == "plan" and self.large.schedule.train_tokens is None:
            problems.append(("growth.tokens", "'plan' needs large.schedule.train_tokens (D) to plan d from"))
        small, large = self.small.resolved_model(), self.large.resolved_model()
        for attr in (
            "hidden_size",
            "num_attention_heads",
            "query_groups",
            "ffn_hidden_size",
            "vocab_size",
            "seq_length",
            "tie_embeddings",
        ):
            if getattr(small, attr) != getattr(large, attr):
                problems.append(
                    (
                        "large.model",
                        f"differs from small.model in {attr} ({getattr(small, attr)} vs "
                        f"{getattr(large, attr)}); depth growth keeps everything but num_layers",
                    )
                )
        factor = self.growth.factor
        if self.growth.layer_map is None and factor is not None and small.num_layers * factor != large.num_layers:
            problems.append(
                (
                    "growth.factor",
                    f"{factor} x {small.num_layers} small layers != {large.num_layers} "
                    "large layers; fix the factor or the models",
                )
            )
        if not problems:  # the whole growth step, planned now (pure: no data), not after the small stage trained
            from megastack.growth.operators import make_plan

            try:
                plan = make_plan(small, self.growth.spec())
            except UserError as exc:
                problems.append(("growth", str(exc)))
            else:
                if plan.target.num_layers != large.num_layers:
                    problems.append(
                        (
                            "growth.layer_map",
                            f"gives {plan.target.num_layers} layers but large.model "
                            f"has {large.num_layers}; make them agree",
                        )
                    )
        for name, stage in (("small", self.small), ("large", self.large), ("scratch", self.scratch)):
            if stage is not None:
                par = stage.parallel or self.parallel
                problems += [(f"{name}.parallel.{f}", p) for f, p in par.check_model(stage.resolved_model())]
        return problems


def load_recipe(name_or_path: str | os.PathLike | None) -> tuple[Recipe, Path]:
    """A recipe by shipped name (configs/recipes/NAME.yaml) or path; None is the embedded default."""
    path = resolve_config_path(name_or_path or DEFAULT_RECIPE, "recipes")
    return from_dict(Recipe, read_yaml(path), where=str(path)), path


# ----------------------------------------------------------------------------- stage bookkeeping


@dataclass
class Layout:
    out: Path

    @property
    def markers(self) -> Path:
        return self.out / "stages"

    def stage_dir(self, stage: str) -> Path:
        return self.out / ("grown" if stage == "grow" else stage)

    def marker(self, stage: str) -> Path:
        return self.markers / f"{stage}.json"


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(layout: Layout, stage: str) -> dict[str, Any] | None:
    path = layout.marker(stage)
    if not path.is_file():
        return None
    marker = untrusted.read_json(path, 1 << 20, f"the stage marker is corrupt; delete it to re-run stage '{stage}'")
    if not isinstance(marker, dict):
        raise UserError(f"{path}: the stage marker is corrupt; delete it to re-run stage '{stage}'")
    return marker


def check_marker(layout: Layout, stage: str, digest: str) -> dict[str, Any] | None:
    """The finished stage's marker, or None if the stage still has to run; a changed config is refused."""
    marker = read_marker(layout, stage)
    if marker is None:
        return None
    if marker.get("config_hash") != digest:
        raise UserError(
            f"stage '{stage}' in {layout.out} finished with a different config (hash "
            f"{marker.get('config_hash')}, now {digest}); keep the recipe as it was, or use a new --out "
            f"(or delete {layout.stage_dir(stage)} and {layout.marker(stage)} to redo it)"
        )
    return marker


def write_marker(layout: Layout, stage: str, digest: str, result: dict[str, Any]) -> None:
    from megastack.ckpt.manifest import manifest_digest, resolve_iteration_dir

    checkpoint = result.get("checkpoint")
    output_sha = manifest_digest(resolve_iteration_dir(checkpoint)) if checkpoint else None
    layout.markers.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        layout.marker(stage),
        {
            "stage": stage,
            "config_hash": digest,
            "output_sha256": output_sha,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **result,
        },
    )


# ----------------------------------------------------------------------------- stages


def stage_train_config(
    recipe: Recipe,
    stage: str,
    stage_recipe: StageRecipe,
    layout: Layout,
    init_from: str | None,
    schedule: ScheduleConfig | None = None,
) -> TrainConfig:
    return TrainConfig(
        model=stage_recipe.resolved_model(),
        out_dir=str(layout.stage_dir(stage)),
        parallel=stage_recipe.parallel or recipe.parallel,
        data=recipe.data,
        optimizer=stage_recipe.optimizer,
        schedule=schedule or stage_recipe.schedule,
        init_from=init_from,
        mask_ramp_steps=stage_recipe.mask_ramp_steps,
        seed=stage_recipe.seed,
        logging=recipe.logging,
    )


def planned_growth_tokens(recipe: Recipe) -> int:
    """d from megastack plan (Du et al.'s fit) for the large stage's model and token budget."""
    from megastack.planner import plan_growth

    large = recipe.large.resolved_model()
    tokens = recipe.large.schedule.train_tokens
    if tokens is None:
        raise UserError("growth.tokens: plan needs large.schedule.train_tokens (D) to plan d from")
    return int(
        plan_growth(
            large.total_parameters(), float(tokens), factor=recipe.growth.factor or 4, model=large
        ).growth_tokens
    )


def stage_flops(cfg: TrainConfig, world: int) -> tuple[float, float]:
    """(FLOPs per iteration, FLOPs of the whole stage) of a training config on ``world`` ranks."""
    from megastack.flops import flops_per_iteration

    par, model = cfg.parallel, cfg.resolved_model()
    global_batch = par.micro_batch_size * par.data_parallel_size(world) * par.gradient_accumulation_steps(world)
    per_iter = flops_per_iteration(model, global_batch)
    return per_iter, per_iter * cfg.schedule.iterations(global_batch * model.seq_length)


def run_grow(recipe: Recipe, layout: Layout, small_checkpoint: str, comm) -> dict[str, Any]:
    """The growth stage, split across every rank of the run (Recipe.check made sure of its shape)."""
    from megastack.growth.api import grow

    job = grow(small_checkpoint, layout.stage_dir("grow"), recipe.growth.spec(), comm=comm)
    return grow_result(layout.stage_dir("grow"), job.manifest["growth"])


def grow_result(grown: Path, growth: dict[str, Any]) -> dict[str, Any]:
    """The grow stage's marker record, from the growth block of the grown checkpoint's manifest."""
    return {"checkpoint": str(grown), **{k: growth.get(k) for k in ("operator", "layer_map", "new_layers")}}


def stage_configs(recipe: Recipe, layout: Layout, world: int) -> list[tuple[str, TrainConfig | None, str]]:
    """(stage, its TrainConfig or None for growth, config hash) in order; hashes chain, so a change
    upstream changes every later stage's hash."""
    small_schedule = None
    if recipe.growth.tokens is not None:
        d = planned_growth_tokens(recipe) if recipe.growth.tokens == "plan" else recipe.growth.tokens
        small_schedule = replace(recipe.small.schedule, train_iters=None, train_tokens=d)
    small = stage_train_config(recipe, "small", recipe.small, layout, None, small_schedule)
    large = stage_train_config(recipe, "large", recipe.large, layout, str(layout.stage_dir("grow")))
    out = [("small", small, config_hash(asdict(small)))]
    out.append(("grow", None, config_hash({"growth": asdict(recipe.growth), "after": out[-1][2]})))
    out.append(("large", large, config_hash({"train": asdict(large), "after": out[-1][2]})))
    if recipe.scratch is not None:
        scratch = stage_train_config(recipe, "scratch", recipe.scratch, layout, None)
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
    layout = Layout(out)
    plan = stage_configs(recipe, layout, world)
    results: dict[str, dict[str, Any]] = {}

    def say(text: str) -> None:
        if rank == 0:
            print(f"megastack run: {text}", flush=True)

    if only is not None and only not in [stage for stage, _, _ in plan]:
        say(f"stage {only}: not in recipe '{recipe.name}', nothing to do")

    for stage, cfg, digest in plan:
        marker = check_marker(layout, stage, digest)
        if marker is not None:
            say(f"stage {stage}: finished earlier, skipped ({layout.marker(stage)})")
            results[stage] = marker
            continue
        if only is not None and only != stage:
            if stage in NEEDS.get(only, ()):
                raise UserError(
                    f"--stage {only} needs stage '{stage}' finished first ({layout.marker(stage)} "
                    "is missing); run the earlier stages first"
                )
            continue
        say(f"stage {stage}: starting")
        start = time.monotonic()
        if stage == "grow":
            result = grow_stage(recipe, layout, results["small"]["checkpoint"], comm)
            result["wall_seconds"] = round(time.monotonic() - start, 3)
        else:
            result = asdict(train(cfg))
        if rank == 0:
            write_marker(layout, stage, digest, result)
        comm.barrier()
        results[stage] = read_marker(layout, stage) or result
    summary: dict[str, Any] = {}
    if rank == 0 and all(stage in results for stage, _, _ in plan):
        summary = write_summary(recipe, layout, results)
    comm.barrier()
    return summary


def grow_stage(recipe: Recipe, layout: Layout, small_checkpoint: str, comm) -> dict[str, Any]:
    """The growth stage; a grown directory left by a run that stopped before its marker is reused if it
    verifies."""
    from megastack.ckpt.inspect import verify
    from megastack.ckpt.manifest import read_manifest

    grown = layout.stage_dir("grow")
    if grown.exists():
        problems = verify(grown)
        if problems:
            raise UserError(f"{grown} exists but does not verify ({problems[0]}); delete it and run again")
        return grow_result(grown, (read_manifest(grown) or {}).get("growth", {}))
    return run_grow(recipe, layout, small_checkpoint, comm)


# ----------------------------------------------------------------------------- results


def eval_curve(stage_dir: Path) -> list[tuple[float, float]]:
    """(cumulative FLOPs, valid loss) of every evaluation a stage logged, in order."""
    from megastack.train.loop import LOG_FILE

    path = stage_dir / LOG_FILE
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("type") == "eval" and record.get("valid_loss") is not None:
                points.append((float(record["cumulative_flops"]), float(record["valid_loss"])))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            continue  # a line torn by a killed job, or not a record: not a point of the curve
    return points


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a curve first reaches ``target`` loss, linearly interpolated; None if it never does."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None:
                return flops
            f0, l0 = previous
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss) if l0 != loss else flops
        previous = (flops, loss)
    return None


def write_summary(recipe: Recipe, layout: Layout, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for stage in STAGES:
        r = results.get(stage)
        if r is None:
            continue
        rows.append(
            {
                "stage": stage,
                "tokens": r.get("tokens"),
                "flops": r.get("flops"),
                "cumulative_flops": r.get("cumulative_flops"),
                "final_train_loss": r.get("final_train_loss"),
                "final_valid_loss": r.get("final_valid_loss"),
                "wall_seconds": r.get("wall_seconds"),
                "checkpoint": r.get("checkpoint"),
            }
        )
    grown = eval_curve(layout.stage_dir("small")) + eval_curve(layout.stage_dir("large"))
    scratch = eval_curve(layout.stage_dir("scratch"))
    comparison: dict[str, Any] = {}
    if scratch and grown:
        target = scratch[-1][1]
        reached = flops_to_reach(eval_curve(layout.stage_dir("large")), target)
        comparison = {
            "scratch_final_valid_loss": target,
            "scratch_flops": scratch[-1][0],
            "grown_flops_to_scratch_loss": reached,
        }
        if reached:
            comparison["flops_saving"] = 1 - reached / scratch[-1][0]
            comparison["speedup"] = scratch[-1][0] / reached - 1
    summary = {
        "recipe": recipe.name,
        "stages": rows,
        "comparison": comparison,
        "curves": {"grown": grown, "scratch": scratch},
    }
    atomic_write_json(layout.out / "summary.json", summary)
    atomic_write_text(layout.out / "summary.md", summary_table(summary))
    plot_curves(summary, layout.out / "loss_vs_flops.png")
    return summary


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(summary: dict[str, Any]) -> str:
    lines = [
        f"# megastack run: {summary['recipe']}",
        "",
        "| stage | tokens | FLOPs | cumulative FLOPs | final train loss | final valid loss | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["stages"]:
        lines.append(
            f"| {r['stage']} | {_fmt(r['tokens'], ',')} | {_fmt(r['flops'], '.3e')} | "
            f"{_fmt(r['cumulative_flops'], '.3e')} | {_fmt(r['final_train_loss'], '.4f')} | "
            f"{_fmt(r['final_valid_loss'], '.4f')} | {_fmt(r['wall_seconds'], '.1f')} |"
        )
    c = summary["comparison"]
    if c:
        lines += [
            "",
            f"Scratch baseline: final valid loss {c['scratch_final_valid_loss']:.4f} at "
            f"{c['scratch_flops']:.3e} FLOPs.",
        ]
        if c.get("grown_flops_to_scratch_loss"):
            lines.append(
                f"Grown run reached it at {c['grown_flops_to_scratch_loss']:.3e} cumulative FLOPs "
                f"(small stage included): {c['flops_saving']:.1%} fewer FLOPs, speedup "
                f"{c['speedup']:.1%} (FLOPs_scratch / FLOPs_grown - 1)."
            )
        else:
            lines.append("Grown run did not reach the scratch baseline's final loss within its budget.")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    c = summary["comparison"]
    note = None
    if c.get("grown_flops_to_scratch_loss"):
        note = (c["grown_flops_to_scratch_loss"], c["scratch_final_valid_loss"], f"{c['flops_saving']:.0%} fewer FLOPs")
    plot_loss_curves(
        [
            ("grown (small + large)", summary["curves"]["grown"], {"fmt": "o-"}),
            ("scratch", summary["curves"]["scratch"], {"fmt": "s--"}),
        ],
        path,
        f"megastack run: {summary['recipe']}",
        note=note,
    )


def plot_loss_curves(
    curves: list[tuple[str | None, list[tuple[float, float]], dict[str, Any]]],
    path: Path,
    title: str,
    *,
    note: tuple[float, float, str] | None = None,
    ylim: tuple[float, float] | None = None,
) -> None:
    """Validation loss against cumulative FLOPs, one line per (label, points, matplotlib style) curve;
    ``note`` = (FLOPs, loss, text) marks where a run reached the baseline's final loss. Shared by
    ``megastack run`` and bench/speedup.py so both draw the same figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points, style in curves:
        if points:
            style = {"markersize": 3} | style
            fmt = style.pop("fmt", "o-")
            ax.plot([p[0] for p in points], [p[1] for p in points], fmt, label=label, **style)
    if note is not None:
        ax.axhline(note[1], color="gray", linewidth=0.8)
        ax.annotate(note[2], (note[0], note[1]), textcoords="offset points", xytext=(5, 8), fontsize=9)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the command


def cli_run(args: Any) -> int:
    from megastack.dist import discover

    recipe, path = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    stage = getattr(args, "stage", None)
    if stage is not None and stage not in STAGES:
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
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

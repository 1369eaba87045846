"""A ``megastack run`` recipe: the small and large stages, the growth between them, the baseline."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
from megastack.growth.layer_map import check_depth
from megastack.growth.spec import DIMENSIONS, OPERATORS, GrowthSpec
from megastack.train.config import (
    MAX_TRAIN_TOKENS,
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    ScheduleConfig,
)

DEFAULT_RECIPE = "tiny"


# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class StageRecipe:
    """One training stage of a recipe: a TrainConfig without the paths the run fills in."""

    model: ModelConfig | str | None = None  # None after a growth: the grown model as planned
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(train_iters=100))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig | None = None  # None: the recipe's
    mask_ramp_steps: int = 100
    seed: int = 1234

    def resolved_model(self) -> ModelConfig | None:
        if self.model is None or isinstance(self.model, ModelConfig):
            return self.model
        return load_model_config(self.model)


@dataclass(frozen=True)
class GrowthRecipe(GrowthSpec):
    """A recipe's growth: any GrowthSpec (depth, width or both; stack, zero, random or learn), plus d.
    Depth growth names its ``factor`` or ``layer_map``; G_learn learns on ``learn_data``, by default the
    recipe's training data."""

    tokens: int | Literal["plan"] | None = None  # d: tokens of the stage before; "plan": from megastack plan

    def check(self) -> list[tuple[str, str]]:
        if self.operator not in OPERATORS:
            return [("operator", f"must be one of {', '.join(OPERATORS)}, got {brief(self.operator)}")]
        if self.dimension not in DIMENSIONS:
            return [("dimension", f"must be one of {', '.join(DIMENSIONS)}, got {brief(self.dimension)}")]
        if self.learned is not None:
            return [("learned", "is what G_learn computes, not a recipe field; leave it out")]
        return []

    def spec(self, learn_data: list[str] | tuple[str, ...] = ()) -> GrowthSpec:
        """The GrowthSpec this growth stage runs (``learn_data``: the recipe's data, for G_learn)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(GrowthSpec)}
        return GrowthSpec(**fields | {"learn_data": tuple(self.learn_data or learn_data)})


@dataclass(frozen=True)
class GrowthStage:
    """One growth and the training after it, before the recipe's last growth (progressive growth)."""

    growth: GrowthRecipe
    train: StageRecipe


@dataclass(frozen=True)
class ChainLink:
    """A training stage of the grown chain: its name, recipe and model, and the growth that leads to it."""

    name: str
    stage: StageRecipe
    model: ModelConfig
    growth: GrowthRecipe | None = None  # None for the first (small) stage
    growth_name: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A whole growth experiment (see configs/recipes/): small -> [grow1 -> stage1 -> ...] -> grow -> large,
    and the baseline (the large model from scratch)."""

    name: str
    small: StageRecipe
    large: StageRecipe
    growth: GrowthRecipe = field(default_factory=GrowthRecipe)
    progressive: tuple[GrowthStage, ...] = ()  # growths between small and the last one (e.g. 2 -> 4 -> 8)
    scratch: StageRecipe | None = None  # the baseline; its model by default the large stage's
    scratch_matches_flops: bool = True  # give the baseline the FLOPs of the grown chain (overrides its length)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # shared by every stage
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def chain(self) -> list[ChainLink]:
        """The grown chain's training stages in order, every model planned (pure: no data is read)."""
        if self.small.model is None:
            raise UserError("small.model is missing; name the model the run starts from")
        links = [ChainLink("small", self.small, self.small.resolved_model())]
        steps = [
            (f"stage{i}", f"grow{i}", step.growth, step.train, f"progressive[{i - 1}]")
            for i, step in enumerate(self.progressive, 1)
        ]
        steps.append(("large", "grow", self.growth, self.large, "large"))
        for name, growth_name, growth, stage, where in steps:
            planned = planned_model(links[-1].model, growth, f"{where}.growth" if where != "large" else "growth")
            wanted = stage.resolved_model()
            if wanted is not None:
                check_planned(planned, wanted, links[-1], growth, where)
            links.append(ChainLink(name, stage, wanted or planned, growth, growth_name))
        return links

    def stage_names(self) -> list[str]:
        """The stages' names in order: small, [grow1, stage1, ...], grow, large[, scratch]."""
        middle = [name for i in range(1, len(self.progressive) + 1) for name in (f"grow{i}", f"stage{i}")]
        return ["small", *middle, "grow", "large", *(["scratch"] if self.scratch is not None else [])]

    def scratch_stage(self, large_model: ModelConfig) -> StageRecipe | None:
        if self.scratch is None or self.scratch.model is not None:
            return self.scratch
        return dataclasses.replace(self.scratch, model=large_model)

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", self.name):
            # the default output directory is runs/<name>: a path here would write elsewhere
            problems.append(("name", f"{brief(self.name)} must be a plain name (letters, digits, '.', '_', '-')"))
        growths = [(f"progressive[{i}].growth", s.growth) for i, s in enumerate(self.progressive)]
        for where, growth in [*growths, ("growth", self.growth)]:
            tokens = growth.tokens
            if isinstance(tokens, int) and not 0 < tokens <= MAX_TRAIN_TOKENS:
                problems.append((f"{where}.tokens", f"must be in [1, {MAX_TRAIN_TOKENS:.0e}], got {tokens}"))
            elif tokens == "plan" and (self.progressive or self.large.schedule.train_tokens is None):
                problems.append(
                    (
                        f"{where}.tokens",
                        "'plan' needs one growth and large.schedule.train_tokens (D) to plan d from",
                    )
                )
        if problems:
            return problems
        try:  # every growth planned now (pure: no data), not after the small stage trained
            links = self.chain()
        except RecipeProblem as exc:
            return [(exc.field, exc.problem)]
        except UserError as exc:
            return [("growth", str(exc))]
        scratch = self.scratch_stage(links[-1].model)
        for name, stage in [*((link.name, link.stage) for link in links), ("scratch", scratch)]:
            if stage is not None:
                par = stage.parallel or self.parallel
                model = stage.resolved_model() or next(link.model for link in links if link.name == name)
                problems += [(f"{name}.parallel.{f}", p) for f, p in par.check_model(model)]
        return problems


class RecipeProblem(UserError):
    """A recipe field that does not fit (field, problem); Recipe.check reports it as config errors do."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field, self.problem = field_name, problem


def planned_model(source: ModelConfig, growth: GrowthSpec, where: str = "growth") -> ModelConfig:
    """The model ``growth`` makes of ``source``, before any data is read (G_learn: its initial maps)."""
    from megastack.growth.operators import make_plan
    from megastack.growth.spec import operator

    spec = growth.spec() if isinstance(growth, GrowthRecipe) else growth
    if spec.dimension != "width" and spec.layer_map is None and spec.factor is not None:
        try:
            check_depth(source.num_layers * spec.factor, f"factor {spec.factor}")
        except UserError as exc:
            raise RecipeProblem(f"{where}.factor", str(exc)) from None
    if operator(spec.operator).needs_data:
        from megastack.growth.learn import initial_learned

        spec = dataclasses.replace(spec, learned=initial_learned(source, spec))
    return make_plan(source, spec).target


def check_planned(planned: ModelConfig, wanted: ModelConfig, before: ChainLink, growth: GrowthRecipe, where: str):
    """The stage's model must be what the growth gives (its name aside): else it could not load the grown
    checkpoint, or would silently train another shape."""
    growth_field = f"{where}.growth" if where != "large" else "growth"
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("name", "num_layers"):
            continue
        p, w = getattr(planned, f.name), getattr(wanted, f.name)
        if p != w and not (f.name == "num_query_groups" and planned.query_groups == wanted.query_groups):
            raise RecipeProblem(
                f"{where}.model",
                f"differs from {before.name}.model in {f.name} after the growth ({growth.dimension} "
                f"{growth.operator}): the growth gives {p}, {where}.model has {w}; fix it, or leave "
                f"{where}.model out to train the grown model as planned",
            )
    if planned.num_layers != wanted.num_layers:
        if growth.dimension != "width" and growth.layer_map is None and growth.factor is not None:
            raise RecipeProblem(
                f"{growth_field}.factor",
                f"{growth.factor} x {before.model.num_layers} {before.name} layers != {wanted.num_layers} "
                f"{where} layers; fix the factor or the models",
            )
        raise RecipeProblem(
            f"{growth_field}.layer_map",
            f"gives {planned.num_layers} layers but {where}.model has {wanted.num_layers}; make them agree",
        )


def load_recipe(name_or_path: str | os.PathLike | None) -> tuple[Recipe, Path]:
    """A recipe by shipped name (configs/recipes/NAME.yaml) or path; None is the embedded default."""
    path = resolve_config_path(name_or_path or DEFAULT_RECIPE, "recipes")
    return from_dict(Recipe, read_yaml(path), where=str(path)), path


def planned_growth_tokens(recipe: Recipe) -> int:
    """d from megastack plan (Du et al.'s fit) for the large stage's model and token budget."""
    from megastack.planner import plan_growth

    large = recipe.chain()[-1].model
    tokens = recipe.large.schedule.train_tokens
    if tokens is None:
        raise UserError("growth.tokens: plan needs large.schedule.train_tokens (D) to plan d from")
    return int(
        plan_growth(
            large.total_parameters(), float(tokens), factor=recipe.growth.factor or 4, model=large
        ).growth_tokens
    )

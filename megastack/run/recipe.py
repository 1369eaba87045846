"""A ``megastack run`` recipe: the small and large stages, the growth between them, the baseline."""

from __future__ import annotations

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

"""What a growth is asked to do: one typed spec for the CLI, recipes, the library and the bench."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megastack.errors import UserError
from megastack.growth.layer_map import check_depth, parse_layer_map, stack_map

DIMENSIONS = ("depth", "width", "both", "experts")  # both: depth and width in one step; experts: MoE upcycling


@dataclass(frozen=True)
class GrowthSpec:
    operator: str = "stack"
    factor: int | None = None
    layer_map: str | None = None
    dimension: str = "depth"
    noise: float = 0.0
    seed: int = 0
    hidden: int | None = None  # width targets (None: the source's)
    ffn: int | None = None
    heads: int | None = None
    query_groups: int | None = None
    learn_data: tuple[str, ...] = ()  # G_learn: token data the maps are learned on
    learn_tokens: int = 65536
    learn_batch: int = 8  # sequences per step over all ranks
    learn_lr: float = 0.01
    carry_optimizer: bool = False  # Adam's state grown with the weights (torch_dist from megastack train)
    keep: str | None = None  # prune: the source layers kept, in order (the --layer-map grammar)
    experts: int | None = None  # --dimension experts: experts per MoE layer
    topk: int | None = None  # experts per token (None: 2, or the granularity's multiple of it)
    granularity: int = 1  # each expert 1/granularity of the dense MLP (granular upcycling)
    router_init: str = "random"  # random (N(0, init_std)) or zero
    learned: Any = None  # G_learn's result: {kind: D as nested lists [L2][L1]} (set by growth.learn)


def resolve_layer_map(spec: GrowthSpec, source_layers: int) -> list[int]:
    """The layer map from --layer-map and/or --factor; they must agree when both are given."""
    if spec.factor is not None and spec.factor < 1:
        raise UserError(f"--factor must be a positive integer, got {spec.factor}")
    if spec.layer_map:
        mapping = parse_layer_map(spec.layer_map, source_layers)
        if spec.factor is not None and len(mapping) != source_layers * spec.factor:
            raise UserError(
                f"--layer-map gives {len(mapping)} layers but --factor {spec.factor} asks for "
                f"{source_layers * spec.factor}; drop one of them or make them agree"
            )
        return mapping
    if spec.factor is None:
        raise UserError("give --factor G (stack the whole model G times) or --layer-map")
    check_depth(source_layers * spec.factor, f"--factor {spec.factor}")
    return stack_map(source_layers, spec.factor)


@dataclass(frozen=True)
class Operator:
    """One growth operator. Its planners are "module:function" names taking (source ModelConfig, GrowthSpec)
    and returning a Plan, imported when used (plans need torch; the CLI lists operators without it)."""

    name: str
    summary: str
    depth: str  # the planner for --dimension depth
    width: str  # the planner for --dimension width and both
    experts: str | None = None  # the planner for --dimension experts (upcycling), if the operator has one
    needs_data: bool = False  # learns from --data before planning (G_learn)
    ramps_new_blocks: bool = False  # its new blocks start masked and training ramps them in (G_random)
    grows: bool = True  # false for prune: the speedup harness compares growth operators only

    def planner(self, dimension: str) -> Callable[[Any, GrowthSpec], Any]:
        if dimension == "experts":
            if self.experts is None:
                able = ", ".join(op.name for op in OPERATORS.values() if op.experts)
                raise UserError(f"--dimension experts: --operator {self.name} does not upcycle; use {able}")
            module, function = self.experts.split(":")
            return getattr(importlib.import_module(module), function)
        module, function = (self.depth if dimension == "depth" else self.width).split(":")
        return getattr(importlib.import_module(module), function)


_WIDTH = "megastack.growth.width:grow_width"
# The registry: every place that lists, validates or runs operators reads it; a new operator is one entry.
OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in (
        Operator(
            "stack",
            "G_stack: each target layer copies a source layer (the paper's best)",
            "megastack.growth.operators:stack",
            _WIDTH,
            experts="megastack.growth.upcycle:upcycle",  # every expert a copy of the dense MLP
        ),
        Operator(
            "zero",
            "G_zero: later copies get zero output projections (the small model's function)",
            "megastack.growth.operators:zero",
            _WIDTH,
        ),
        Operator(
            "random",
            "G_random: later copies freshly initialised, ramped in by training",
            "megastack.growth.operators:random",
            _WIDTH,
            ramps_new_blocks=True,
        ),
        Operator(
            "prune",
            "depth pruning (Minitron-style): keep --keep's layers in order, drop the rest",
            "megastack.growth.operators:prune",
            "megastack.growth.operators:prune",
            grows=False,
        ),
        Operator(
            "learn",
            "G_learn (LiGO): learned linear maps of the source layers, trained on --data",
            "megastack.growth.learn:learned_plan",
            "megastack.growth.learn:learned_plan",
            needs_data=True,
        ),
    )
}


def operator(name: str) -> Operator:
    if name not in OPERATORS:
        raise UserError(f"--operator {name!r} is unknown; choose one of {', '.join(OPERATORS)}")
    return OPERATORS[name]

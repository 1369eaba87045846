"""``megastack validate FILE``: check any megastack YAML (model, layout, training stage or recipe).

It sits above config, train and run because it must know every kind of file; the kind is told apart
by the top-level keys, so a file is checked by the same loader the command that runs it uses.
"""

from __future__ import annotations

import os
from typing import Any

from megastack.config import LayoutConfig, ModelConfig, from_dict, read_yaml


def load_any_config(path: str | os.PathLike) -> Any:
    """A validated config of whichever kind ``path`` holds."""
    data = read_yaml(path)
    keys = set(data) if isinstance(data, dict) else set()
    if "num_layers" in keys:
        return from_dict(ModelConfig, data, where=str(path))
    if {"small", "large"} & keys:
        from megastack.run.recipe import Recipe

        return from_dict(Recipe, data, where=str(path))
    if "out_dir" in keys:
        from megastack.train.config import TrainConfig

        return from_dict(TrainConfig, data, where=str(path))
    return from_dict(LayoutConfig, data, where=str(path))


def describe(model: ModelConfig) -> str:
    return (
        f"{model.num_layers} layers, hidden {model.hidden_size}, {model.total_parameters():,} parameters, "
        f"{model.non_embedding_parameters():,} non-embedding"
    )


def cli_validate(args: Any) -> int:
    """Load and check a config; print what it describes."""
    cfg = load_any_config(args.config)
    if isinstance(cfg, ModelConfig):
        what = describe(cfg)
    elif hasattr(cfg, "small"):
        what = f"small: {describe(cfg.small.resolved_model())}; large: {describe(cfg.large.resolved_model())}"
    else:
        what = describe(cfg.resolved_model())
    print(f"{args.config}: valid {type(cfg).__name__} ({what})")
    return 0

"""TrainConfig: one training stage (small from scratch, or large from a grown checkpoint) as typed YAML.

Loaded with ``megastack.config.from_dict``: unknown keys, wrong types and inconsistent values are
one-line errors naming the file and the field. Paths are taken relative to the working directory.

    model: tiny-small                  # shipped name, YAML path, or inline ModelConfig fields
    parallel: {tensor: 1, pipeline: 1, zero_stage: 1, micro_batch_size: 8, global_batch_size: 16}
    data: {prefixes: [], weights: null, split: "98,2,0", tokenizer: null, seed: 1234}  # [] = demo corpus
    optimizer: {lr: 1.0e-3, min_lr_fraction: 0.1, warmup_iters: 20, weight_decay: 0.1, clip_grad: 1.0}
    schedule: {train_iters: 200, eval_interval: 50, eval_iters: 4, save_interval: 100, keep_last: 2}
    init_from: null                    # a grown or converted torch_dist checkpoint (ROOT or iter_* dir)
    mask_ramp_steps: 100               # G_random: steps over which new blocks and width slices ramp in (0: off)
    logging: {tensorboard: true, peak_flops: null, progress: auto}
    out_dir: runs/tiny-small           # checkpoint root (iter_*/ + tracker), train.jsonl, tensorboard/
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from megastack.config import (
    ModelConfig,
    ParallelConfig,
    from_dict,
    load_model_config,
    read_yaml,
)


@dataclass(frozen=True)
class DataConfig:
    """Megatron indexed datasets (prefixes of .bin/.idx pairs) blended by weight, split train/valid/test."""

    prefixes: list[str] = field(default_factory=list)  # empty: the demo corpus (prepared on first use)
    weights: list[float] | None = None  # blend weights, one per prefix; None: proportional to size
    split: str = "98,2,0"  # train,valid,test weights over documents (megatron's split string)
    tokenizer: str | None = None  # sentencepiece .model; None: tokenizer.model next to the first prefix
    seed: int = 1234  # megatron's dataset shuffling seed
    cache_dir: str | None = None  # where GPTDataset caches its index files; None: OUT_DIR/data_cache
    demo_bytes: int = 6_000_000  # the demo corpus's size when prefixes is empty (the whole filtered stdlib: ~10.6 MB)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.demo_bytes < 100_000:
            problems.append(("demo_bytes", f"must be at least 100000 (a tokenizer needs text), got {self.demo_bytes}"))
        if self.weights is not None:
            if len(self.weights) != len(self.prefixes):
                problems.append(
                    (
                        "weights",
                        f"has {len(self.weights)} entries but there are "
                        f"{len(self.prefixes)} prefixes; give one weight per prefix",
                    )
                )
            elif any(w <= 0 for w in self.weights):
                problems.append(("weights", "must all be positive"))
        parts = [p for p in self.split.replace("/", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if not values or len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
            problems.append(("split", f"must be up to three non-negative weights like '98,2,0', got {self.split!r}"))
        return problems

    def split_weights(self) -> tuple[float, float, float]:
        values = [float(p) for p in self.split.replace("/", ",").split(",") if p.strip()]
        values += [0.0] * (3 - len(values))
        total = sum(values)
        return values[0] / total, values[1] / total, values[2] / total


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to a floor (the paper: floor 10% of the peak)."""

    lr: float = 1e-3
    min_lr_fraction: float = 0.1
    warmup_iters: int = 100
    decay_iters: int | None = None  # cosine length after warmup; None: to the end of the stage
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norm weights (1-D parameters)
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.lr <= 0:
            problems.append(("lr", f"must be positive, got {self.lr}"))
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            problems.append(("min_lr_fraction", f"must be in [0, 1], got {self.min_lr_fraction}"))
        if self.warmup_iters < 0:
            problems.append(("warmup_iters", f"must be >= 0, got {self.warmup_iters}"))
        if self.decay_iters is not None and self.decay_iters < 0:
            problems.append(("decay_iters", f"must be >= 0 or omitted, got {self.decay_iters}"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(("betas", f"must be two numbers in [0, 1), got {self.betas}"))
        for name in ("eps", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        return problems


# Far beyond any real run (Llama 3: 1.5e13 tokens, about 1e6 iterations); a value past them is a typo that
# would have megatron's dataset builder allocate an index for it before the first step.
MAX_TRAIN_ITERS = 10**8
MAX_TRAIN_TOKENS = 10**15


@dataclass(frozen=True)
class ScheduleConfig:
    """How long the stage runs and how often it evaluates, logs and saves."""

    train_iters: int | None = None
    train_tokens: int | None = None  # alternative to train_iters: rounded up to whole global batches
    eval_interval: int = 100  # 0: evaluate only at the end
    eval_at_start: bool = False  # also evaluate before the first step (the loss right after growth)
    eval_iters: int = 10  # global batches of the validation split per evaluation
    save_interval: int = 100  # 0: save only at the end
    keep_last: int = 2  # checkpoints kept in out_dir (older ones are removed after a new one is published)
    log_interval: int = 10

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if (self.train_iters is None) == (self.train_tokens is None):
            problems.append(("train_iters", "give exactly one of schedule.train_iters and schedule.train_tokens"))
        for name in ("train_iters", "train_tokens"):
            value = getattr(self, name)
            limit = MAX_TRAIN_ITERS if name == "train_iters" else MAX_TRAIN_TOKENS
            if value is not None and value <= 0:
                problems.append((name, f"must be positive, got {value}"))
            elif value is not None and value > limit:
                problems.append((name, f"is {value}; at most {limit:.0e} is supported"))
        for name in ("eval_interval", "eval_iters", "save_interval"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        for name in ("keep_last", "log_interval"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        return problems

    def iterations(self, tokens_per_iter: int) -> int:
        if self.train_iters is not None:
            return self.train_iters
        assert self.train_tokens is not None
        return math.ceil(self.train_tokens / tokens_per_iter)


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True  # event files under OUT_DIR/tensorboard (needs the tensorboard package)
    peak_flops: float | None = None  # per device, for MFU; None: known GPUs by name, otherwise no MFU
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # auto: a bar on a terminal, lines otherwise


@dataclass(frozen=True)
class TrainConfig:
    """One training stage."""

    model: ModelConfig | str
    out_dir: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(train_iters=100))
    init_from: str | None = None  # torch_dist checkpoint to start from (weights only)
    # fresh: a new AdamW (the paper, after growth); carried: init_from's Adam state (moments, step), read
    # in the model's sharded space, so under any ZeRO stage, DP size, TP or PP
    init_optimizer: Literal["fresh", "carried"] = "fresh"
    # Adam's state also written in the model's sharded space (what `carried` and growth read): at the
    # stage's last checkpoint, at every save, or never; it adds 2-3x the fp32 model to a checkpoint
    export_optimizer: Literal["final", "always", "never"] = "final"
    mask_ramp_steps: int = 100  # G_random new blocks and width slices: scaled by min(1, step / N)
    resume: bool = True  # continue from out_dir's newest complete checkpoint when there is one
    seed: int = 1234
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def resolved_model(self) -> ModelConfig:
        return self.model if isinstance(self.model, ModelConfig) else load_model_config(self.model)

    def check(self) -> list[tuple[str, str]]:
        problems = [(f"parallel.{name}", problem) for name, problem in self.parallel.check_model(self.resolved_model())]
        if self.mask_ramp_steps < 0:
            problems.append(("mask_ramp_steps", f"must be >= 0, got {self.mask_ramp_steps}"))
        if not self.out_dir:
            problems.append(("out_dir", "must name a directory"))
        elif self.init_from:
            out, source = Path(self.out_dir).resolve(), Path(self.init_from).resolve()
            if out == source or out.is_relative_to(source) or source.is_relative_to(out):
                # training prunes old iter_* in out_dir: the source checkpoint would be deleted
                problems.append(
                    (
                        "out_dir",
                        f"({self.out_dir}) must not be, contain or lie inside init_from "
                        f"({self.init_from}); train into a new directory",
                    )
                )
        return problems


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """A TrainConfig from YAML, with the model resolved (a shipped name or path becomes its fields)."""
    cfg = from_dict(TrainConfig, read_yaml(path), where=str(path))
    return replace(cfg, model=cfg.resolved_model())

"""Growth as a pure plan: for every logical tensor of the target model, which source tensors it is made
from and how. Operators only build plans; readers, writers and the executor never know which operator
made one. Conversion is the identity plan.

A recipe's ``produce(read, pieces)`` returns the requested pieces (TP shards or row blocks) of its target
tensor. Copies read only those pieces of the source; random values (init, noise) come from fixed row
blocks seeded by (seed, target name, block), so the result is identical under any output layout, chunking
and number of ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from megastack import layout, untrusted
from megastack.config import ModelConfig
from megastack.errors import NotBuiltError, UserError
from megastack.layout import Piece, pieces_shape, take_pieces

Read = Callable[[str, "list[Piece] | None"], torch.Tensor]


class SliceReader(Protocol):
    """What a plan needs of a checkpoint reader (ckpt.base.Reader has more): slices of logical tensors."""

    def read(self, name: str, pieces: list[Piece] | None = None) -> torch.Tensor: ...


RANDOM_BLOCK_ROWS = 256  # random values are drawn in fixed row blocks, each with its own seed


def generator_for(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def seeded_normal(shape: tuple[int, ...], seed: int, name: str, pieces) -> torch.Tensor:
    """The requested pieces of a N(0, 1) tensor that is a pure function of (seed, name, shape).

    Rows come from canonical blocks of RANDOM_BLOCK_ROWS rows, each drawn from its own generator, so
    any slice costs only the blocks it touches and is identical whatever the slicing or rank count.
    """

    def rows(start: int, stop: int) -> torch.Tensor:
        blocks = []
        first, last = start // RANDOM_BLOCK_ROWS, (stop - 1) // RANDOM_BLOCK_ROWS
        for k in range(first, last + 1):
            lo, hi = k * RANDOM_BLOCK_ROWS, min((k + 1) * RANDOM_BLOCK_ROWS, shape[0])
            block = torch.randn((hi - lo, *shape[1:]), generator=generator_for(seed, f"{name}#{k}"))
            blocks.append(block[max(start, lo) - lo : min(stop, hi) - lo])
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    if not pieces:
        return rows(0, shape[0])
    parts = []
    for p in pieces:
        if p.dim == 0:
            parts.append(rows(p.start, p.start + p.length))
        else:  # a column piece needs every row block, narrowed as it is drawn
            blocks = [
                rows(lo, min(lo + RANDOM_BLOCK_ROWS, shape[0])).narrow(p.dim, p.start, p.length).clone()
                for lo in range(0, shape[0], RANDOM_BLOCK_ROWS)
            ]
            parts.append(torch.cat(blocks))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=pieces[0].dim)


@dataclass(frozen=True)
class Copy:
    """target <- source (same shape)."""

    source: str

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        return read(self.source, pieces)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return [(self.source, pieces)]


@dataclass(frozen=True)
class Zeros:
    """target <- 0: G_zero's output projections, which make a new block the identity."""

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        return torch.zeros(pieces_shape(shape, pieces), dtype=dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return []


@dataclass(frozen=True)
class RandomInit:
    """target <- N(0, std^2) for matrices, ones for norms: G_random's fresh blocks."""

    std: float
    seed: int
    ones: bool = False

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        if self.ones:
            return torch.ones(pieces_shape(shape, pieces), dtype=dtype)
        return (seeded_normal(shape, self.seed, target, pieces) * self.std).to(dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return []


@dataclass(frozen=True)
class Noisy:
    """target <- (1 - alpha) * base + alpha * eps, eps ~ N(0, std^2): the paper's growth noise."""

    base: Any
    alpha: float
    std: float
    seed: int

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        base = self.base.produce(target, shape, read, pieces, dtype).float()
        eps = seeded_normal(shape, self.seed, "noise:" + target, pieces)
        return ((1 - self.alpha) * base + self.alpha * self.std * eps).to(dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return self.base.sources(pieces)


def _shifted(pieces, dim: int, offset: int):
    return [Piece(p.dim, p.start + offset, p.length) if p.dim == dim else p for p in pieces]


@dataclass(frozen=True)
class ColumnSlice:
    """target <- scale * source[:, start:start + target columns]: a granular expert's fc2 (its share of the
    dense MLP's columns; ``scale`` undoes the router's split of the weight over the finer experts)."""

    source: str
    start: int
    scale: float = 1.0

    def _source_pieces(self, shape: tuple[int, ...], pieces) -> list[Piece]:
        if not pieces:
            return [Piece(1, self.start, shape[1])]
        return _shifted(pieces, 1, self.start) if pieces[0].dim == 1 else list(pieces)

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        got = read(self.source, self._source_pieces(shape, pieces))
        if pieces and pieces[0].dim == 0:  # row blocks: the source's full rows, narrowed to these columns
            got = got.narrow(1, self.start, shape[1])
        return got if self.scale == 1.0 else (got.float() * self.scale).to(dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        if pieces and pieces[0].dim == 0:
            return [(self.source, list(pieces))]
        return [(self.source, _shifted(pieces, 1, self.start) if pieces else None)]


@dataclass(frozen=True)
class GluSlice:
    """target [gate; up] <- rows [start, start + half) of the source's gate and of its up half: a granular
    expert's fc1, its share of the dense MLP's neurons."""

    source: str
    start: int
    half: int  # the target's ffn (half its rows)
    source_half: int  # the source's ffn (the row where its up half starts)

    def _source_pieces(self, pieces) -> list[Piece]:
        out = []
        for p in pieces or [Piece(0, 0, 2 * self.half)]:
            if p.dim != 0:
                raise ValueError("GluSlice: fc1 is cut by rows only (TP and the writers' row blocks)")
            h = self.half
            for lo, hi, base in ((0, h, self.start), (h, 2 * h, self.source_half + self.start - h)):
                a, b = max(p.start, lo), min(p.start + p.length, hi)
                if a < b:
                    out.append(Piece(0, base + a, b - a))
        return out

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        return read(self.source, self._source_pieces(pieces))

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return [(self.source, self._source_pieces(pieces))]


@dataclass(frozen=True)
class RouterInit:
    """A fresh router: N(0, std^2) rows (or zeros), the same row for the ``group`` fine experts cut from one
    copy of the dense MLP, so top-k picks whole copies and the upcycled layer is the dense one."""

    std: float
    seed: int
    group: int = 1

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        copies = (shape[0] // self.group, *shape[1:])
        rows = seeded_normal(copies, self.seed, target, None) * self.std
        return take_pieces(rows.repeat_interleave(self.group, dim=0), pieces).to(dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return []


@dataclass(frozen=True)
class AsWeight:
    """``base`` produced as if it were weight ``weight``: the fp32 master copy of a freshly drawn or noised
    weight gets the very values the weight gets (random values are seeded by the target's name)."""

    base: Any
    weight: str

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        return self.base.produce(self.weight, shape, read, pieces, dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return self.base.sources(pieces)


def state_recipe(recipe: Any, state: str, weight: str) -> Any:
    """What Adam's ``state`` of target weight ``weight`` is made of, given the weight's recipe. Moments:
    copied where the weight is copied (stack, and G_zero's first copies), zero where the weight is zero or
    freshly drawn (G_zero's zeroed outputs, G_random's new blocks), as copied under noise (the noise is
    the weight's, not its history's), scaled with the weight (a weight scaled by s: exp_avg by s, exp_avg_sq
    by s^2). The fp32 master copy: the weight's own recipe, read from the source's master copies."""
    if isinstance(recipe, Copy):
        return Copy(layout.state_name(state, recipe.source))
    if isinstance(recipe, Zeros):
        return Zeros()
    if isinstance(recipe, (RandomInit, RouterInit)):
        return AsWeight(recipe, weight) if state == "fp32_param" else Zeros()
    if isinstance(recipe, ColumnSlice):  # a weight scaled by s: exp_avg by s, exp_avg_sq by s^2
        scale = recipe.scale**2 if state == "exp_avg_sq" else recipe.scale
        return ColumnSlice(layout.state_name(state, recipe.source), recipe.start, scale)
    if isinstance(recipe, GluSlice):
        return GluSlice(layout.state_name(state, recipe.source), recipe.start, recipe.half, recipe.source_half)
    if isinstance(recipe, Noisy):
        base = state_recipe(recipe.base, state, weight)
        return AsWeight(Noisy(base, recipe.alpha, recipe.std, recipe.seed), weight) if state == "fp32_param" else base
    if hasattr(recipe, "for_state"):  # a recipe of a higher layer (width growth) that knows its own rule
        return recipe.for_state(state, weight)
    raise NotBuiltError(
        f"carrying Adam's state through {type(recipe).__name__} recipes (width or learned growth) is not built "
        "yet; grow depth with stack, zero or random, or grow without --carry-optimizer"
    )


def with_optimizer_state(plan: Plan, states: tuple[str, ...]) -> Plan:
    """The same plan applied to Adam's state of every target weight, as one more set of target tensors."""
    recipes = dict(plan.recipes)
    for name in layout.logical_names(plan.target):
        for state in states:
            recipes[layout.state_name(state, name)] = state_recipe(plan.recipes[name], state, name)
    return Plan(plan.source, plan.target, recipes, plan.info | {"optimizer_states": list(states)})


@dataclass
class Plan:
    """Everything the executor needs to build the target, plus what the manifest records."""

    source: ModelConfig
    target: ModelConfig
    recipes: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def producer(self, reader: SliceReader, dtype: torch.dtype) -> Callable[[str, list[Piece] | None], torch.Tensor]:
        """produce(target, pieces). The last source read is kept: units ordered by ``source_key`` (as the
        executor does) read each source slice once even when several targets copy it."""
        last: dict[tuple, torch.Tensor] = {}

        def read(source: str, pieces: list[Piece] | None) -> torch.Tensor:
            key = (source, tuple(pieces) if pieces else None)
            if key not in last:
                last.clear()
                last[key] = reader.read(source, pieces)
            return last[key]

        def produce(name: str, pieces: list[Piece] | None) -> torch.Tensor:
            shape = layout.logical_shape(self.target, name)
            out_dtype = torch.float32 if layout.split_state(name)[0] else dtype  # Adam's state stays fp32
            return self.recipes[name].produce(name, shape, read, pieces, out_dtype)

        return produce

    def source_key(self, unit: Any) -> tuple:
        """Sort key putting units that read the same source slice next to each other."""
        sources = [(s, p) for r in unit.requests for s, p in self.recipes[r.name].sources(r.pieces)]
        if not sources:
            return (1, "", 0, 0)
        (name, pieces) = sources[0]
        layer, kind = layout.split_name(name)
        return (0, kind, -1 if layer is None else layer, pieces[0].start if pieces else 0)

    def sources_of(self, name: str, pieces) -> list[tuple[str, Any]]:
        return self.recipes[name].sources(list(pieces) if pieces else None)


def identity_plan(cfg: ModelConfig) -> Plan:
    """Conversion: every tensor copied as it is."""
    return Plan(cfg, cfg, {name: Copy(name) for name in layout.logical_names(cfg)}, {"operator": "identity"})


@dataclass(frozen=True)
class GrowthRecord:
    """What a grown checkpoint tells the next training stage: megastack.json's ``growth`` block. Growth
    writes it from the plan; training reads it (typed: the file may be anyone's) to ramp new blocks in."""

    operator: str
    new_layers: tuple[int, ...] | None = None  # G_random's fresh blocks (target layer indices)
    layer_map: tuple[int, ...] | None = None
    width: dict[str, Any] | None = None  # width growth: the maps' description, its "masks" ramped in
    dimension: str | None = None  # "width" or "both" for width growth; None for depth
    mask_ramp: bool = False  # new blocks / width slices start masked and ramp in over mask_ramp_steps

    @classmethod
    def of(cls, info: dict[str, Any]) -> GrowthRecord:
        """From a Plan's ``info``."""

        def ints(key: str) -> tuple[int, ...] | None:
            return tuple(info[key]) if info.get(key) is not None else None

        width = info.get("width")
        dimension = info.get("dimension") if width is not None else None
        return cls(
            info["operator"], ints("new_layers"), ints("layer_map"), width, dimension, bool(info.get("mask_ramp"))
        )

    @property
    def width_masks(self) -> list[dict[str, Any]]:
        return list((self.width or {}).get("masks") or [])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": self.operator}
        if self.new_layers is not None:
            out["new_layers"] = list(self.new_layers)
        if self.layer_map is not None:
            out["layer_map"] = list(self.layer_map)
        if self.width is not None:
            out |= {"dimension": self.dimension, "width": self.width}
        return out | {"mask_ramp": self.mask_ramp}

    @classmethod
    def from_json(cls, data: Any, where: str) -> GrowthRecord:
        fix = "the manifest's growth block is corrupt (re-grow the checkpoint)"
        untrusted.typed(data, dict, where, "field 'growth'", fix)

        def counts(key: str) -> tuple[int, ...] | None:
            value = data.get(key)
            if value is not None and not untrusted.is_counts(value):
                raise UserError(f"{where}: field 'growth.{key}' must be a list of layer indices; {fix}")
            return None if value is None else tuple(value)

        width = data.get("width")
        if width is not None:
            untrusted.typed(width, dict, where, "field 'growth.width'", fix)
            masks = width.get("masks", [])
            if not isinstance(masks, list) or not all(isinstance(m, dict) for m in masks):
                raise UserError(f"{where}: field 'growth.width.masks' must be a list of objects; {fix}")
        return cls(
            untrusted.typed(data.get("operator", "unknown"), str, where, "field 'growth.operator'", fix),
            counts("new_layers"),
            counts("layer_map"),
            width,
            untrusted.typed(data.get("dimension", "width"), str, where, "field 'growth.dimension'", fix)
            if width
            else None,
            untrusted.typed(data.get("mask_ramp", False), bool, where, "field 'growth.mask_ramp'", fix),
        )

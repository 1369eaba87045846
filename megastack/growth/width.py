"""Width growth (hidden size, FFN size, attention heads / query groups), alone or with depth in one step.

Notation: source h, f (FFN), n heads in g query groups (r = n / g heads per group), head dim d = h / n;
target h' >= h, f' >= f, n' >= n, g' >= g with r' = n' / g' >= r and the SAME head dim d (changing d would
change RoPE's frequencies, so no width map can preserve attention; the head dim is fixed, heads are added).
RMSNorm(x) = w * x / sqrt(mean(x^2) + eps). Every map below is "originals first": target position i < size
is source position i, the new positions i >= size copy source (i - size) mod size (round robin), so a
count c_j says how many target positions copy source position j (c_j = k everywhere when the ratio is k).

Attention heads: target query group G' copies source group sigma(G') = G' for G' < g, else (G' - g) mod g;
in an original group the first r heads are the original heads, extra heads copy them round robin; a new
group's heads copy its source group's heads round robin. A head always stays with a copy of the key/value
head of its own source group, so grouped attention is consistent (megatron's [q heads of g; k_g; v_g]).

G_direct (``--operator stack``; Net2Net / bert2BERT neuron splitting, with a norm-exact scale):
- FFN neuron j split into c_j copies (gate and up rows copied), its fc2 column divided by c_j: exact.
- Head split into c copies (q rows copied, with k/v of a copied group), its proj columns divided by c: exact.
- Hidden channel j: the residual stream carries x'_i = s_j x_j with s_j = sqrt(h' / (h c_j)). Then
  sum_i x'_i^2 = (h'/h) sum_j x_j^2, so RMS over h' equals RMS over h EXACTLY, eps included, for any
  h' >= h (for an integer ratio c_j = k and s_j = 1: plain duplication). Writers of the residual
  (embedding columns, proj and fc2 rows) are copied times s_j; norm weights become w_j / s_j so the
  normalised input is the plain duplicate; readers (qkv and fc1 columns) are split, divided by c_j. The
  final norm and output layer: output columns copied times s_j and final norm weights times h / h'
  (works for tied embeddings too).
  Guarantee: the grown model computes exactly the small model's function in exact arithmetic; in fp32
  the logits differ by float rounding only (measured in tests/test_growth_width.py: max |dlogit| ~1e-6).
  Copies are symmetric (identical gradients): use ``--noise`` to break the symmetry (then not exact).

G_zero (``--operator zero``), W' = [[W, 0], [A, C]] in (out, in) layout:
- New FFN neurons / heads / kv groups: random fan-in (gate/up rows, q/k/v rows), zero fan-out (fc2 /
  proj columns): exact.
- New hidden channels: zero fan-in (embedding columns, proj and fc2 rows are 0), so they stay exactly 0
  in the residual stream; their fan-out (qkv, fc1, output columns) is random, so they receive gradient.
  With zero channels the RMS over h' is sqrt(h/h') times the RMS over h: old norm weights are multiplied
  by sqrt(h/h') and the target's ``norm_epsilon`` is eps * h / h', which makes it EXACT in exact
  arithmetic (the target config records the new epsilon). New norm entries are sqrt(h/h').
G_random (``--operator random``): every new entry random (init_std; proj/fc2 scaled by 1/sqrt(2 L')), the
  same norm compensation, and mask metadata (``Plan.info['width']['masks']``, docs/checkpoints.md) for the
  training engine to ramp the new neurons in; at mask c = 0 the model is exactly the small one.

Depth and width together (``--dimension both``): target layer l is the width-grown source layer
layer_map[l]; the depth operator's rule then applies to the widened block (zero: proj/fc2 of repeated
blocks are 0; random: repeated blocks are fresh random blocks).

What each output piece reads: a target TP shard or row block reads only the source rows (or columns,
for column-cut tensors) that its positions map to, along the same dimension, whole in the other one;
positions without a source (G_zero / G_random new neurons) read nothing. Random values are
``seeded_normal`` of (seed, target name, position): identical under any TP/PP, chunking and rank count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from megastack import layout
from megastack.config import ModelConfig
from megastack.errors import UserError
from megastack.growth.blocks import BLOCK_NORM_KINDS, OUTPUT_KINDS, repeated_block, with_noise
from megastack.growth.layer_map import check_zero_map, first_occurrences
from megastack.growth.spec import operator, resolve_layer_map
from megastack.layout import Piece, pieces_shape
from megastack.plan import AsWeight, Plan, Read, seeded_normal

WIDTH_OPERATORS = {"stack": "direct", "zero": "zero", "random": "random"}


# ----------------------------------------------------------------------------- target shape


def width_target(
    source: ModelConfig, hidden: int | None, ffn: int | None, heads: int | None, groups: int | None
) -> ModelConfig:
    """The widened config (same depth), or a one-line UserError naming the flag."""
    d = source.head_dim
    for flag, value in (("--hidden", hidden), ("--ffn", ffn), ("--heads", heads), ("--query-groups", groups)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if heads is not None and hidden is None:
        hidden = heads * d
    h2 = source.hidden_size if hidden is None else hidden
    if h2 < source.hidden_size:
        raise UserError(
            f"--hidden {h2} is smaller than the source's hidden size {source.hidden_size}; width "
            "growth only widens (give a target at least as wide)"
        )
    if h2 % d:
        raise UserError(
            f"--hidden {h2} is not a multiple of the source's head dim {d}; width growth keeps the "
            f"head dim (RoPE) and adds heads, so give a multiple of {d}"
        )
    n2 = h2 // d if heads is None else heads
    if n2 * d != h2:
        raise UserError(
            f"--heads {n2} with hidden {h2} gives head dim {h2 / n2:g}, the source's is {d}; width "
            f"growth keeps the head dim (RoPE), so use --heads {h2 // d} (or omit it)"
        )
    if n2 < source.num_attention_heads:
        raise UserError(f"--heads {n2} is fewer than the source's {source.num_attention_heads} heads")
    r = source.num_attention_heads // source.query_groups
    if groups is None:
        if n2 % r:
            raise UserError(
                f"the target's {n2} heads cannot keep the source's {r} heads per query group; "
                "give --query-groups G (G divides the heads, at least the source's groups)"
            )
        groups = n2 // r
    if n2 % groups:
        raise UserError(f"--query-groups {groups} does not divide the target's {n2} heads; choose a divisor")
    if groups < source.query_groups:
        raise UserError(
            f"--query-groups {groups} is fewer than the source's {source.query_groups} query groups; "
            "width growth only adds groups"
        )
    if n2 // groups < r:
        raise UserError(
            f"--query-groups {groups} gives {n2 // groups} heads per group but the source has {r}; "
            f"a source group's heads must stay together: use at most {n2 // r} groups"
        )
    f2 = source.ffn_hidden_size if ffn is None else ffn
    if f2 < source.ffn_hidden_size:
        raise UserError(
            f"--ffn {f2} is smaller than the source's FFN size {source.ffn_hidden_size}; width growth only widens"
        )
    mha = source.num_query_groups is None and groups == n2
    return replace(
        source, hidden_size=h2, num_attention_heads=n2, num_query_groups=None if mha else groups, ffn_hidden_size=f2
    )


# ----------------------------------------------------------------------------- index maps


@dataclass(frozen=True)
class Axis:
    """One dimension of a target tensor: for each target position, the source position it copies
    (-1: none, it is filled), whether it is filled (new, no source), and the factor on the copy."""

    index: torch.Tensor  # long [n]
    fresh: torch.Tensor  # bool [n]
    scale: torch.Tensor  # float64 [n]

    @staticmethod
    def make(
        index: list[int] | torch.Tensor, fresh: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> Axis:
        index = torch.as_tensor(index, dtype=torch.long)
        fresh = torch.zeros(len(index), dtype=torch.bool) if fresh is None else fresh
        index = torch.where(fresh, torch.full_like(index, -1), index)
        scale = torch.ones(len(index), dtype=torch.float64) if scale is None else scale.to(torch.float64)
        return Axis(index, fresh, scale)

    def squared(self) -> Axis:
        return Axis(self.index, self.fresh, self.scale**2)


def round_robin(size: int, target: int) -> torch.Tensor:
    """Originals first, then new positions copy source (i - size) mod size."""
    index = torch.arange(target)
    return torch.where(index < size, index, (index - size) % size)


@dataclass
class WidthMaps:
    """Index maps between source and target (same maps for every layer) and the per-axis descriptions
    each operator uses."""

    source: ModelConfig
    target: ModelConfig
    mode: str  # direct | zero | random

    def __post_init__(self) -> None:
        s, t = self.source, self.target
        self.h, self.h2 = s.hidden_size, t.hidden_size
        self.f, self.f2 = s.ffn_hidden_size, t.ffn_hidden_size
        self.d = s.head_dim
        self.n, self.g, self.n2, self.g2 = s.num_attention_heads, s.query_groups, t.num_attention_heads, t.query_groups
        self.r, self.r2 = self.n // self.g, self.n2 // self.g2
        self.hidden = round_robin(self.h, self.h2)
        self.ffn = round_robin(self.f, self.f2)
        self.group_map = [G if G < self.g else (G - self.g) % self.g for G in range(self.g2)]
        heads, new_heads = [], []
        for G in range(self.g2):
            src = self.group_map[G]
            for k in range(self.r2):
                if G < self.g:
                    heads.append(G * self.r + (k if k < self.r else (k - self.r) % self.r))
                    new_heads.append(k >= self.r)
                else:
                    heads.append(src * self.r + k % self.r)
                    new_heads.append(True)
        self.head_map = heads
        self.new_heads = torch.tensor(new_heads, dtype=torch.bool)
        self.new_groups = torch.tensor([G >= self.g for G in range(self.g2)], dtype=torch.bool)

    # --- per-dimension axes ------------------------------------------------------------------------

    def _new(self, size: int, target: int) -> torch.Tensor:
        return torch.arange(target) >= size

    def hidden_axis(self, role: str) -> Axis:
        """role: 'write' (embedding cols, proj/fc2 rows, output cols under direct), 'read' (qkv/fc1 cols,
        output cols under zero/random), 'norm' (block norm weights), 'final' (final norm weights)."""
        counts = torch.bincount(self.hidden, minlength=self.h).to(torch.float64)
        if self.mode == "direct":
            s = torch.sqrt(self.h2 / (self.h * counts))[self.hidden]
            scale = {
                "write": s,
                "read": 1.0 / counts[self.hidden],
                "norm": 1.0 / s,
                "final": torch.full((self.h2,), self.h / self.h2, dtype=torch.float64),
            }[role]
            return Axis.make(self.hidden, scale=scale)
        fresh = self._new(self.h, self.h2)
        scale = None
        if role in ("norm", "final"):
            scale = torch.full((self.h2,), math.sqrt(self.h / self.h2), dtype=torch.float64)
        return Axis.make(self.hidden, fresh, scale)

    def ffn_axis(self, role: str) -> Axis:
        """role 'glu' (fc1 rows [gate; up]) or 'fanout' (fc2 columns)."""
        fresh = self._new(self.f, self.f2) if self.mode != "direct" else torch.zeros(self.f2, dtype=torch.bool)
        if role == "glu":
            return Axis.make(torch.cat([self.ffn, self.f + self.ffn]), torch.cat([fresh, fresh]))
        counts = torch.bincount(self.ffn, minlength=self.f).to(torch.float64)
        scale = 1.0 / counts[self.ffn] if self.mode == "direct" else None
        return Axis.make(self.ffn, fresh, scale)

    def qkv_axis(self) -> Axis:
        """Rows of the fused QKV, group by group: [q heads of G'; k_G'; v_G']."""
        d, r, r2 = self.d, self.r, self.r2
        index, fresh = [], []
        direct = self.mode == "direct"
        for G in range(self.g2):
            src = self.group_map[G]
            base = src * (r + 2) * d
            for k in range(r2):
                head = self.head_map[G * r2 + k]
                index += range(base + (head - src * r) * d, base + (head - src * r + 1) * d)
                fresh += [not direct and bool(self.new_heads[G * r2 + k])] * d
            for offset in (r, r + 1):  # k_G', v_G'
                index += range(base + offset * d, base + (offset + 1) * d)
                fresh += [not direct and bool(self.new_groups[G])] * d
        return Axis.make(index, torch.tensor(fresh, dtype=torch.bool))

    def head_axis(self) -> Axis:
        """Columns of proj: head i's d columns copy its source head's, divided by that head's copy count."""
        d = self.d
        heads = torch.tensor(self.head_map)
        index = (heads[:, None] * d + torch.arange(d)).reshape(-1)
        if self.mode == "direct":
            counts = torch.bincount(heads, minlength=self.n).to(torch.float64)
            return Axis.make(index, scale=(1.0 / counts[heads]).repeat_interleave(d))
        return Axis.make(index, self.new_heads.repeat_interleave(d))

    def axes(self, kind: str) -> tuple[Axis, Axis | None]:
        """(row axis, column axis or None for 1-D) of a target tensor kind; computed once per kind, shared
        by every layer's recipe."""
        cache = self.__dict__.setdefault("_axis_cache", {})
        if kind not in cache:
            cache[kind] = self._axes(kind)
        return cache[kind]

    def _axes(self, kind: str) -> tuple[Axis, Axis | None]:
        vocab = Axis.make(torch.arange(self.source.vocab_size))
        direct = self.mode == "direct"
        return {
            "embedding": (vocab, self.hidden_axis("write")),
            "output": (vocab, self.hidden_axis("write" if direct else "read")),
            "final_norm": (self.hidden_axis("final"), None),
            "attn_norm": (self.hidden_axis("norm"), None),
            "mlp_norm": (self.hidden_axis("norm"), None),
            "qkv": (self.qkv_axis(), self.hidden_axis("read")),
            "proj": (self.hidden_axis("write"), self.head_axis()),
            "fc1": (self.ffn_axis("glu"), self.hidden_axis("read")),
            "fc2": (self.hidden_axis("write"), self.ffn_axis("fanout")),
        }[kind]

    # --- what the manifest records -----------------------------------------------------------------

    def ranges(self, mask: torch.Tensor) -> list[list[int]]:
        """[start, stop) runs of True positions."""
        out: list[list[int]] = []
        for i in torch.nonzero(mask).flatten().tolist():
            if out and out[-1][1] == i:
                out[-1][1] = i + 1
            else:
                out.append([i, i + 1])
        return out

    def info(self) -> dict[str, Any]:
        def shape(cfg: ModelConfig) -> dict[str, int]:
            return {
                "hidden_size": cfg.hidden_size,
                "ffn_hidden_size": cfg.ffn_hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_query_groups": cfg.query_groups,
                "head_dim": cfg.head_dim,
                "norm_epsilon": cfg.norm_epsilon,
            }

        new_head_cols = self.new_heads.repeat_interleave(self.d)
        new_hidden = self._new(self.h, self.h2)
        new_ffn = self._new(self.f, self.f2)
        out: dict[str, Any] = {
            "operator": self.mode,
            "source": shape(self.source),
            "target": shape(self.target),
            "map_rule": "originals first, then round robin: target i copies source i if i < size, "
            "else (i - size) mod size",
            "head_map": self.head_map,
            "group_map": self.group_map,
            "new_hidden": self.ranges(new_hidden),
            "new_ffn": self.ranges(new_ffn),
            "new_heads": self.ranges(self.new_heads),
            "new_groups": self.ranges(self.new_groups),
        }
        if self.mode == "random":
            masks = [
                {"tensor": "embedding", "dim": 1, "ranges": self.ranges(new_hidden)},
                {"tensor": "layers.*.proj", "dim": 0, "ranges": self.ranges(new_hidden)},
                {"tensor": "layers.*.proj", "dim": 1, "ranges": self.ranges(new_head_cols)},
                {"tensor": "layers.*.fc2", "dim": 0, "ranges": self.ranges(new_hidden)},
                {"tensor": "layers.*.fc2", "dim": 1, "ranges": self.ranges(new_ffn)},
            ]
            out["masks"] = [m for m in masks if m["ranges"]]
        return out


# ----------------------------------------------------------------------------- the recipe


def _positions(size: int, pieces: list[Piece] | None, dim: int) -> torch.Tensor:
    if not pieces or pieces[0].dim != dim:
        return torch.arange(size)
    return torch.cat([torch.arange(p.start, p.start + p.length) for p in pieces])


def _runs(indices: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted unique indices -> (start, length) runs."""
    runs: list[list[int]] = []
    for i in indices.tolist():
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(a, n) for a, n in runs]


@dataclass(frozen=True, eq=False)
class WidthCopy:
    """target[i, j] = rows.scale[i] * cols.scale[j] * source[rows.index[i], cols.index[j]], with positions
    that have no source (``fresh``) filled by ``fill``: 'zero', 'random' (N(0, std^2), seeded by the
    target name and position) or 'const' (``value``, 1-D norms)."""

    source: str
    source_shape: tuple[int, ...]
    shape: tuple[int, ...]
    rows: Axis
    cols: Axis | None
    fill: str = "zero"
    std: float = 0.0
    seed: int = 0
    value: float = 0.0

    def for_state(self, state: str, weight: str) -> Any:
        """Adam's ``state`` of this weight: moments copied with the same maps, scaled by the weight's factor
        (exp_avg) or its square (exp_avg_sq), zero where the weight is new (it has no history); the fp32
        master copy made like the weight from the source's master copies, fresh values seeded as the weight's."""
        source = layout.state_name(state, self.source)
        if state == "fp32_param":
            return AsWeight(replace(self, source=source), weight)
        if state == "exp_avg_sq":
            cols = self.cols.squared() if self.cols is not None else None
            return replace(self, source=source, rows=self.rows.squared(), cols=cols, fill="zero", value=0.0)
        return replace(self, source=source, fill="zero", value=0.0)

    def _source_pieces(self, pieces: list[Piece] | None) -> tuple[list[Piece] | None, torch.Tensor, int]:
        """The source pieces to read (along the target pieces' dim), the source indices they hold, the dim."""
        dim = pieces[0].dim if pieces else 0
        axis = self.rows if dim == 0 else self.cols
        assert axis is not None
        index = axis.index[_positions(self.shape[dim], pieces, dim)]
        needed = torch.unique(index[index >= 0])
        if not pieces and len(needed) == self.source_shape[0] and dim == 0:
            return None, needed, dim
        return [Piece(dim, a, n) for a, n in _runs(needed)], needed, dim

    def sources(self, pieces) -> list[tuple[str, Any]]:
        src_pieces, needed, _ = self._source_pieces(list(pieces) if pieces else None)
        return [(self.source, src_pieces)] if len(needed) else []

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        pieces = list(pieces) if pieces else None
        src_pieces, needed, dim = self._source_pieces(pieces)
        rows_t = _positions(shape[0], pieces, 0)
        cols_t = _positions(shape[1], pieces, 1) if self.cols is not None else None
        rows = self.rows.index[rows_t]
        cols = self.cols.index[cols_t] if self.cols is not None else None
        if len(needed):
            src = read(self.source, src_pieces).to(torch.float32)
            lookup = torch.full((self.source_shape[dim],), -1, dtype=torch.long)
            lookup[needed] = torch.arange(len(needed))
            if dim == 0:
                rows = torch.where(rows >= 0, lookup[rows.clamp(min=0)], rows)
            else:
                cols = torch.where(cols >= 0, lookup[cols.clamp(min=0)], cols)
            out = src.index_select(0, rows.clamp(min=0))
            out = out * self.rows.scale[rows_t].to(torch.float32).reshape(-1, *([1] * (out.dim() - 1)))
            if cols is not None:
                out = out.index_select(1, cols.clamp(min=0)) * self.cols.scale[cols_t].to(torch.float32)
        else:
            out = torch.zeros(pieces_shape(shape, pieces), dtype=torch.float32)
        fresh = self.rows.fresh[rows_t]
        if cols is not None:
            fresh = fresh[:, None] | self.cols.fresh[cols_t][None, :]
        if bool(fresh.any()):
            if self.fill == "random":
                value = seeded_normal(shape, self.seed, "width:" + target, pieces) * self.std
            else:
                value = torch.full_like(out, self.value if self.fill == "const" else 0.0)
            out = torch.where(fresh, value, out)
        return out.to(dtype)


# ----------------------------------------------------------------------------- plans

# G_zero: which new entries are zero (residual writers, fan-out of new neurons) and which random.
ZERO_FILL = {"embedding": "zero", "output": "random", "qkv": "random", "fc1": "random", "proj": "zero", "fc2": "zero"}
NORM_KINDS = (*BLOCK_NORM_KINDS, "final_norm")


def width_recipe(maps: WidthMaps, source_name: str, target_name: str, seed: int, target_layers: int) -> WidthCopy:
    _, kind = layout.split_name(target_name)
    rows, cols = maps.axes(kind)
    src_shape = layout.logical_shape(maps.source, source_name)
    shape = layout.logical_shape(maps.target, target_name)
    if kind in NORM_KINDS:
        return WidthCopy(source_name, src_shape, shape, rows, None, "const", value=math.sqrt(maps.h / maps.h2))
    std = maps.source.init_std
    if kind in OUTPUT_KINDS:
        std = std / math.sqrt(2.0 * target_layers)
    fill = "random" if maps.mode == "random" else ZERO_FILL[kind]
    return WidthCopy(source_name, src_shape, shape, rows, cols, fill, std, seed)


def width_plan(source: ModelConfig, spec: Any, mapping: list[int]) -> Plan:
    """Width growth, and depth too when ``mapping`` is not the identity (``--dimension both``)."""
    mode = WIDTH_OPERATORS.get(spec.operator)
    if mode is None:
        raise UserError(f"--operator {spec.operator} has no width version here; use stack, zero or random")
    if not 0.0 <= spec.noise < 1.0:
        raise UserError(f"--noise must be in [0, 1), got {spec.noise} (the paper uses 0.2; above it hurts)")
    wide = width_target(source, spec.hidden, spec.ffn, spec.heads, spec.query_groups)
    if (wide.hidden_size, wide.ffn_hidden_size, wide.num_attention_heads, wide.query_groups) == (
        source.hidden_size,
        source.ffn_hidden_size,
        source.num_attention_heads,
        source.query_groups,
    ):
        raise UserError(
            "the width flags give the source's own width; give a larger --hidden, --ffn, --heads "
            "or --query-groups (or grow depth with --dimension depth)"
        )
    if mode != "direct" and wide.hidden_size > source.hidden_size:
        wide = replace(wide, norm_epsilon=source.norm_epsilon * source.hidden_size / wide.hidden_size)
    depth = mapping != list(range(source.num_layers))
    name = f"{source.name or 'model'}-grown{len(mapping)}L{wide.hidden_size}H"
    target = replace(wide, num_layers=len(mapping), name=name)
    maps = WidthMaps(source, target, mode)
    originals = set(first_occurrences(mapping))
    recipes: dict[str, Any] = {}
    for gname in layout.logical_names(source):
        if layout.split_name(gname)[0] is None:
            recipes[gname] = width_recipe(maps, gname, gname, spec.seed, len(mapping))
    for position, src in enumerate(mapping):
        for kind in layout.LAYER_KINDS:
            tname = layout.layer_name(position, kind)
            recipe: Any = width_recipe(maps, layout.layer_name(src, kind), tname, spec.seed, len(mapping))
            if position not in originals:
                recipe = repeated_block(spec.operator, kind, recipe, target, spec.seed)
            recipe = with_noise(recipe, kind, spec.noise, source.init_std, spec.seed)
            recipes[tname] = recipe
    new_layers = sorted(set(range(len(mapping))) - originals)
    info: dict[str, Any] = {
        "operator": spec.operator,
        "dimension": "both" if depth else "width",
        "factor": len(mapping) / source.num_layers,
        "layer_map": mapping,
        "new_layers": new_layers,
        "noise": spec.noise,
        "seed": spec.seed,
        "width": maps.info(),
        "parameter_factor": target.non_embedding_parameters() / source.non_embedding_parameters(),
    }
    if operator(spec.operator).ramps_new_blocks:
        info["mask_ramp"] = True
    return Plan(source, target, recipes, info)


def grow_width(source: ModelConfig, spec: Any) -> Plan:
    """--dimension width (every layer once) or both (the layer map's layers), by stack/zero/random's rules."""
    mapping = resolve_layer_map(spec, source.num_layers) if spec.dimension == "both" else list(range(source.num_layers))
    if spec.operator == "zero":
        check_zero_map(mapping, source.num_layers)
    return width_plan(source, spec, mapping)

"""The registry of growth operators (Du et al. 2024's four atomic operators, depth direction).

Each operator turns (source config, GrowthSpec) into a Plan. Definitions: Du et al. 2024 (arXiv 2405.15319), sec. 3.
- stack  (G_direct depth = G_stack): target layer i copies source layer layer_map[i]; embedding, final
         norm and output layer are copied once.
- zero   (G_zero depth): like stack, but every block that is not the first copy of its source layer gets
         zero attention output projection and MLP down projection, so it is the identity through its
         residual path and the grown model computes exactly the small model's function.
- random (G_random depth): first copies keep their weights; the other blocks are freshly initialised
         (Megatron's init: N(0, std) with proj/fc2 scaled by 1/sqrt(2 L)); training ramps them in with a
         mask (the manifest lists them under growth.new_layers).
- learn  (G_learn, LiGO): per weight type a learned D (L2 x L1), W'_l = sum_j D[l, j] W_j, initialised
         at the stacking map and optimised on the LM loss (megastack/growth/learn.py).
The block rules (what a repeated block gets, --noise) are in megastack/growth/blocks.py, shared with
width (``--dimension width``) and depth + width (``--dimension both``): megastack/growth/width.py.
``--noise A`` applies W <- (1 - A) W + A eps (eps ~ N(0, init_std^2)) to every weight matrix of every
target block (norms, embedding and output layer untouched), seeded and deterministic.
"""

from __future__ import annotations

from dataclasses import replace

from megastack import layout
from megastack.config import ModelConfig
from megastack.errors import NotBuiltError, UserError
from megastack.growth.blocks import repeated_block, with_noise
from megastack.growth.layer_map import check_zero_map, first_occurrences, parse_layer_map
from megastack.growth.spec import DIMENSIONS, GrowthSpec, operator, resolve_layer_map
from megastack.plan import Copy, Plan


def _global_copies(source: ModelConfig) -> dict[str, Copy]:
    return {name: Copy(name) for name in layout.logical_names(source) if layout.split_name(name)[0] is None}


def depth_plan(source: ModelConfig, spec: GrowthSpec) -> Plan:
    """Depth growth by ``spec.operator``'s block rule (growth/blocks.py)."""
    if not 0.0 <= spec.noise < 1.0:
        raise UserError(f"--noise must be in [0, 1), got {spec.noise} (the paper uses 0.2; above it hurts)")
    mapping = resolve_layer_map(spec, source.num_layers)
    target = replace(source, num_layers=len(mapping), name=f"{source.name or 'model'}-grown{len(mapping)}L")
    originals = set(first_occurrences(mapping))
    recipes: dict[str, object] = _global_copies(source)
    for position, src in enumerate(mapping):
        for kind, expert in layout.block_tensors(source):
            recipe = Copy(layout.layer_name(src, kind, expert))
            if position not in originals:
                recipe = repeated_block(spec.operator, kind, recipe, target, spec.seed)
            recipe = with_noise(recipe, kind, spec.noise, source.init_std, spec.seed)
            recipes[layout.layer_name(position, kind, expert)] = recipe
    info = {
        "operator": spec.operator,
        "dimension": "depth",
        "factor": len(mapping) / source.num_layers,
        "layer_map": mapping,
        "new_layers": sorted(set(range(len(mapping))) - originals),
        "noise": spec.noise,
        "seed": spec.seed,
    }
    if operator(spec.operator).ramps_new_blocks:
        info["mask_ramp"] = True
    return Plan(source, target, recipes, info)


def stack(source: ModelConfig, spec: GrowthSpec) -> Plan:
    return depth_plan(source, spec)


def zero(source: ModelConfig, spec: GrowthSpec) -> Plan:
    check_zero_map(resolve_layer_map(spec, source.num_layers), source.num_layers)
    return depth_plan(source, spec)


def random(source: ModelConfig, spec: GrowthSpec) -> Plan:
    return depth_plan(source, spec)


def prune(source: ModelConfig, spec: GrowthSpec) -> Plan:
    """Depth pruning: the target is the source's ``--keep`` layers in their order (the inverse of depth
    growth, on the same plan and executor; the history records what was kept and dropped)."""
    if spec.dimension != "depth":
        raise UserError("--operator prune drops layers: it is --dimension depth only")
    if spec.factor is not None or spec.layer_map:
        raise UserError("--operator prune takes --keep (the layers kept), not --factor or --layer-map")
    if not spec.keep:
        raise UserError(f"--operator prune needs --keep, the layers kept, e.g. --keep 0-{source.num_layers - 3}")
    keep = parse_layer_map(spec.keep, source.num_layers, "--keep")
    if keep != sorted(set(keep)):
        raise UserError(
            f"--keep {spec.keep}: layers must be kept in order, each once (pruning drops, it does not reorder)"
        )
    if len(keep) == source.num_layers:
        raise UserError(f"--keep {spec.keep} keeps all {source.num_layers} layers; drop at least one")
    plan = depth_plan(source, replace(spec, layer_map=",".join(map(str, keep)), keep=None))
    plan.target = replace(plan.target, name=f"{source.name or 'model'}-pruned{len(keep)}L")
    dropped = sorted(set(range(source.num_layers)) - set(keep))
    plan.info |= {"operator": "prune", "kept": keep, "dropped": dropped}
    return plan


WIDTH_FLAGS = ("hidden", "ffn", "heads", "query_groups")


def make_plan(source: ModelConfig, spec: GrowthSpec) -> Plan:
    """The plan of ``spec`` applied to ``source``: the dimension checks, then the operator's planner."""
    planner = operator(spec.operator).planner(spec.dimension)
    widths = [f"--{f.replace('_', '-')}" for f in WIDTH_FLAGS if getattr(spec, f) is not None]
    if spec.dimension == "depth" and widths:
        raise UserError(
            f"width flags ({', '.join(widths)}) need --dimension width (or --dimension both to grow "
            "depth and width in one step)"
        )
    if spec.dimension in ("width", "both") and not widths:
        raise UserError(
            f"--dimension {spec.dimension} needs a width target: --hidden, --ffn, --heads and/or --query-groups"
        )
    if spec.dimension == "width" and (spec.factor is not None or spec.layer_map):
        raise UserError("--factor/--layer-map grow depth; use --dimension both to grow depth and width together")
    if spec.dimension not in DIMENSIONS:
        raise UserError(f"--dimension {spec.dimension!r} is unknown; choose {', '.join(DIMENSIONS)}")
    moe_flags = spec.experts is not None or spec.topk is not None or spec.granularity != 1
    if moe_flags and spec.dimension != "experts":
        raise UserError("--experts/--topk/--granularity upcycle the MLP into experts: they need --dimension experts")
    if spec.dimension == "experts" and (spec.factor is not None or spec.layer_map):
        raise UserError("--dimension experts keeps the depth; grow depth (--factor/--layer-map) in a separate step")
    if source.is_moe and (spec.dimension in ("width", "both") or operator(spec.operator).needs_data):
        raise NotBuiltError(
            f"growing a mixture of experts ({source.num_experts} experts) by --dimension {spec.dimension} "
            f"--operator {spec.operator} is not built yet; depth growth by stack, zero, random or prune is"
        )
    return planner(source, spec)

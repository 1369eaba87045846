"""``--layer-map``: which source layer each target layer is copied from.

Grammar: comma-separated items; an item is a layer ``i`` or an inclusive range ``a-b`` (descending
allowed), optionally repeated with ``xN``. Examples for a 6-layer source:

    0-5x4              G_stack x4: [0..5, 0..5, 0..5, 0..5] (the paper's default)
    0-5,0-5            stack x2
    0x2,1x2,2x2,...    interleaving: each layer twice in place (worse in the paper; here for ablations)
    0-3,2-5            SOLAR-style depth up-scaling: two copies, dropping the last 2 / first 2
    0-5,2-3x2          MIDAS-style: the whole stack, then the middle layers again

A mergekit passthrough config (``--layer-map merge.yaml``: ``slices`` of one source each, ``layer_range``
[start, end) half-open, as mergekit reads it) gives the same list, so existing configs work unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from megastack.config import MAX_LAYERS
from megastack.errors import UserError

_ITEM = re.compile(r"^(\d{1,9})(?:-(\d{1,9}))?(?:x(\d{1,9}))?$")


def check_depth(layers: int, flag: str) -> None:
    if layers > MAX_LAYERS:
        raise UserError(f"{flag}: asks for {layers} target layers; at most {MAX_LAYERS} are supported")


def parse_layer_map(expr: str, source_layers: int, flag: str = "--layer-map") -> list[int]:
    """Source layer index for every target layer; a UserError naming the flag for bad input."""
    if isinstance(expr, str) and expr.strip().endswith((".yaml", ".yml")):
        return mergekit_layer_map(expr.strip(), source_layers, flag)
    if not isinstance(expr, str) or not expr.strip():
        raise UserError(f"{flag} is empty; give source layers like '0-{source_layers - 1}x2'")
    out: list[int] = []
    for raw in expr.replace(" ", "").split(","):
        m = _ITEM.match(raw)
        if not m:
            raise UserError(
                f"{flag}: cannot parse '{raw[:40]}'; use layers 'i', ranges 'a-b' and repeats 'xN' "
                "(numbers up to 9 digits), e.g. '0-5x4' or '0-3,2-5'"
            )
        start = int(m.group(1))
        stop = int(m.group(2)) if m.group(2) is not None else start
        repeat = int(m.group(3)) if m.group(3) is not None else 1
        if repeat < 1:
            raise UserError(f"{flag}: repeat count in '{raw}' must be at least 1")
        for index in (start, stop):
            if index >= source_layers:
                raise UserError(
                    f"{flag}: layer {index} in '{raw}' does not exist; the source has "
                    f"{source_layers} layers (0-{source_layers - 1})"
                )
        step = 1 if stop >= start else -1
        check_depth(len(out) + (abs(stop - start) + 1) * repeat, flag)
        out += list(range(start, stop + step, step)) * repeat
    return out


def stack_map(source_layers: int, factor: int) -> list[int]:
    """G_stack: the whole stack repeated ``factor`` times."""
    return list(range(source_layers)) * factor


def first_occurrences(layer_map: list[int]) -> list[int]:
    """Target positions that are the first copy of their source layer (the 'original' blocks)."""
    seen: set[int] = set()
    out = []
    for position, source in enumerate(layer_map):
        if source not in seen:
            seen.add(source)
            out.append(position)
    return out


def check_zero_map(mapping: list[int], source_layers: int) -> None:
    """G_zero's rule: every source layer appears, first copies in order, so the grown model is the small one."""
    firsts = [mapping[p] for p in first_occurrences(mapping)]
    if firsts != list(range(source_layers)):
        raise UserError(
            f"--operator zero needs every source layer to appear, first copies in order 0..."
            f"{source_layers - 1}, so the grown model is the small one; the layer map's first "
            f"copies are {firsts}"
        )


MERGEKIT_KEYS = {"slices", "merge_method", "dtype", "tokenizer_source", "base_model", "parameters"}


def mergekit_layer_map(path: str, source_layers: int, flag: str = "--layer-map") -> list[int]:
    """The layer list of a mergekit passthrough YAML: every slice one source, ``layer_range: [start, end)``.

    The slices' ``model`` names are mergekit's; here the source is the checkpoint given to ``grow``, so
    all slices must name one model (a merge of several models is another operation)."""
    from megastack.config import read_yaml

    config: Any = read_yaml(Path(path))
    where = f"{flag} {path}"
    if not isinstance(config, dict) or not isinstance(config.get("slices"), list) or not config["slices"]:
        raise UserError(f"{where}: a mergekit config needs 'slices:', a list of {{sources: [...]}}; fix the file")
    unknown = sorted(set(map(str, config)) - MERGEKIT_KEYS)
    if unknown:
        raise UserError(f"{where}: '{unknown[0]}' is not a mergekit passthrough field; remove it")
    if config.get("merge_method", "passthrough") != "passthrough":
        raise UserError(
            f"{where}: merge_method {str(config['merge_method'])[:40]!r}; only passthrough (copying layers) is "
            "a layer map"
        )
    out: list[int] = []
    models: set[str] = set()
    for i, slice_ in enumerate(config["slices"]):
        sources = slice_.get("sources") if isinstance(slice_, dict) else None
        if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
            raise UserError(f"{where}: slices[{i}] must have 'sources:' with exactly one model (passthrough)")
        source = sources[0]
        models.add(str(source.get("model")))
        bounds = source.get("layer_range")
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        ):
            raise UserError(f"{where}: slices[{i}].layer_range must be [start, end], two integers")
        start, end = bounds
        if not 0 <= start < end <= source_layers:
            raise UserError(
                f"{where}: slices[{i}].layer_range [{start}, {end}] is not within the source's {source_layers} "
                f"layers ([start, end) with 0 <= start < end <= {source_layers})"
            )
        check_depth(len(out) + end - start, flag)
        out += list(range(start, end))
    if len(models) > 1:
        raise UserError(
            f"{where}: the slices name {len(models)} models; grow copies layers of one source checkpoint "
            "(name the same model in every slice)"
        )
    return out

"""What each depth operator does to a block, shared by the depth planners and the width planner's
``--dimension both`` (one rule, not a copy per planner).

A target block that is the first copy of its source layer keeps that layer (widened, under width growth).
A repeated block: stack copies it again; zero zeroes its residual-branch outputs (attention proj, MLP fc2),
so it is the identity through its residual path; random draws it afresh (Megatron's init: N(0, std), the
outputs scaled by 1/sqrt(2 L), norms at one) and training ramps it in. ``--noise`` then mixes noise into
every weight matrix that is not zero.
"""

from __future__ import annotations

import math
from typing import Any

from megastack.config import ModelConfig
from megastack.plan import Noisy, RandomInit, Zeros

BLOCK_NORM_KINDS = ("attn_norm", "mlp_norm")
OUTPUT_KINDS = ("proj", "fc2", "expert_fc2")  # the residual-branch outputs G_zero zeroes


def repeated_block(operator: str, kind: str, copied: Any, target: ModelConfig, seed: int) -> Any:
    """The recipe of a block of ``kind`` that repeats a source layer already placed (``copied``: what
    stacking would write)."""
    if operator == "zero" and kind in OUTPUT_KINDS:
        return Zeros()
    if operator == "random":
        if kind in BLOCK_NORM_KINDS:
            return RandomInit(0.0, seed, ones=True)
        scale = math.sqrt(2.0 * target.num_layers) if kind in OUTPUT_KINDS else 1.0
        return RandomInit(target.init_std / scale, seed)
    return copied


def with_noise(recipe: Any, kind: str, noise: float, std: float, seed: int) -> Any:
    """``--noise A``: W <- (1 - A) W + A eps on weight matrices; norms and zeros stay as they are."""
    if noise and kind not in BLOCK_NORM_KINDS and not isinstance(recipe, Zeros):
        return Noisy(recipe, noise, std, seed)
    return recipe

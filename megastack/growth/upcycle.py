"""Sparse upcycling: a dense model -> a mixture of experts that computes the dense model's function.

Every MoE layer's experts are copies of the dense layer's MLP (Komatsuzaki et al. 2022, "Sparse
Upcycling", arXiv 2212.05055); attention, norms, embedding and output layer are copied. megatron-core's
router (softmax over the top-k logits, dropless) gives a token's k experts weights that sum to one, so k
identical experts add up to the dense MLP whatever the router's weights: a random router (N(0, init_std),
megatron's own init) breaks the ties between experts from the first step, a zero one routes every token to
the same k experts until training moves it.

Granular upcycling (``--granularity G``, as in He et al. 2024, "Upcycling Large Language Models into
Mixture of Experts", arXiv 2410.07524): each copy of the MLP is cut into G finer experts of ffn / G
neurons, E / G copies in all, each token routed to k = G x (copies per token) experts. The G experts of one
copy share one router row, so top-k selects whole copies and each of their experts gets weight p / G;
their fc2 is scaled by G, so the sum is again the dense MLP.

``--noise A`` mixes noise into each expert's weights (seeded per expert: the copies then differ) and so
moves the upcycled model off the dense function by about A; the router is fresh and not noised.
"""

from __future__ import annotations

from dataclasses import replace

from megastack import layout
from megastack.config import MAX_EXPERTS, ModelConfig
from megastack.errors import UserError
from megastack.growth.blocks import with_noise
from megastack.growth.spec import GrowthSpec
from megastack.plan import ColumnSlice, Copy, GluSlice, Plan, RouterInit, Zeros

ROUTER_INITS = ("random", "zero")


def check_upcycle(source: ModelConfig, spec: GrowthSpec) -> tuple[int, int, int]:
    """(experts, topk, granularity), or the one-line refusal naming the flag."""
    if source.is_moe:
        raise UserError(f"--dimension experts: the source already has {source.num_experts} experts per layer")
    if spec.experts is None:
        raise UserError("--dimension experts needs --experts E (experts per layer, each a copy of the dense MLP)")
    experts, granularity = spec.experts, spec.granularity
    topk = spec.topk if spec.topk is not None else 2 * granularity
    if not 2 <= experts <= MAX_EXPERTS:
        raise UserError(f"--experts must be 2 to {MAX_EXPERTS}, got {experts}")
    if granularity < 1 or experts % granularity:
        raise UserError(f"--granularity {granularity} must divide --experts {experts} (experts per copy of the MLP)")
    if source.ffn_hidden_size % granularity:
        raise UserError(
            f"--granularity {granularity} must divide the dense MLP's width ({source.ffn_hidden_size}) to cut it"
        )
    if topk < 2:
        raise UserError(
            f"--topk {topk}: megatron-core routes a single expert with a softmax over all experts, which scales "
            "its output by the router's probability, so a top-1 upcycled model is not the dense one; use --topk 2 "
            "or more"
        )
    if topk > experts or topk % granularity:
        raise UserError(
            f"--topk {topk} must be at most --experts {experts} and a multiple of --granularity {granularity} "
            "(whole copies of the MLP are routed to, or the upcycled model is not the dense one)"
        )
    if spec.router_init not in ROUTER_INITS:
        raise UserError(f"--router-init {spec.router_init!r}: choose {' or '.join(ROUTER_INITS)}")
    if not 0.0 <= spec.noise < 1.0:
        raise UserError(f"--noise must be in [0, 1), got {spec.noise}")
    return experts, topk, granularity


def expert_recipes(source: ModelConfig, layer: int, expert: int, granularity: int) -> tuple[object, object]:
    """(fc1, fc2) of one expert: the dense MLP, or its ``expert % granularity``-th slice of neurons."""
    fc1, fc2 = layout.layer_name(layer, "fc1"), layout.layer_name(layer, "fc2")
    if granularity == 1:
        return Copy(fc1), Copy(fc2)
    width = source.ffn_hidden_size // granularity
    start = (expert % granularity) * width
    return GluSlice(fc1, start, width, source.ffn_hidden_size), ColumnSlice(fc2, start, float(granularity))


def upcycle(source: ModelConfig, spec: GrowthSpec) -> Plan:
    experts, topk, granularity = check_upcycle(source, spec)
    target = replace(
        source,
        num_experts=experts,
        moe_topk=topk,
        moe_ffn_hidden_size=source.ffn_hidden_size // granularity if granularity > 1 else None,
        name=f"{source.name or 'model'}-{experts}e",
    )
    recipes: dict[str, object] = {
        name: Copy(name) for name in layout.logical_names(source) if layout.split_name(name)[0] is None
    }
    router = Zeros() if spec.router_init == "zero" else RouterInit(source.init_std, spec.seed, granularity)
    for layer in range(source.num_layers):
        for kind in ("attn_norm", "qkv", "proj", "mlp_norm"):
            recipes[layout.layer_name(layer, kind)] = Copy(layout.layer_name(layer, kind))
        recipes[layout.layer_name(layer, "router")] = router
        for expert in range(experts):
            for kind, recipe in zip(layout.EXPERT_KINDS, expert_recipes(source, layer, expert, granularity)):
                recipes[layout.layer_name(layer, kind, expert)] = with_noise(
                    recipe, kind, spec.noise, source.init_std, spec.seed
                )
    info = {
        "operator": spec.operator,
        "dimension": "experts",
        "experts": experts,
        "topk": topk,
        "granularity": granularity,
        "router_init": spec.router_init,
        "layer_map": list(range(source.num_layers)),
        "new_layers": [],
        "noise": spec.noise,
        "seed": spec.seed,
    }
    return Plan(source, target, recipes, info)

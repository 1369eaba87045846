"""The cutting rules: how each logical tensor of the canonical model is split across TP ranks and named
in each format. Readers, writers, growth and the tests all use this one module.

Logical tensors (canonical = megatron-core's TP=1 layout):

    embedding              [vocab, h]                     TP: vocab blocks (dim 0)
    output                 [vocab, h]  (untied only)      TP: vocab blocks (dim 0)
    final_norm             [h]                            replicated
    layers.{i}.attn_norm   [h]                            replicated
    layers.{i}.qkv         [(heads + 2 groups) * d, h]    rows grouped per query group:
                                                          [q heads of g; k_g; v_g] for each g
                                                          TP: whole groups (contiguous rows)
    layers.{i}.proj        [h, heads * d]                 TP: dim 1
    layers.{i}.mlp_norm    [h]                            replicated
    layers.{i}.fc1         [2 ffn, h]  = [gate; up]       TP rank r holds [gate_r; up_r]
    layers.{i}.fc2         [h, ffn]                       TP: dim 1
  in a mixture of experts, fc1 and fc2 are per expert e, with the router before them:
    layers.{i}.router          [experts, h]               replicated
    layers.{i}.expert_fc1.{e}  [2 expert_ffn, h]          as fc1
    layers.{i}.expert_fc2.{e}  [h, expert_ffn]            as fc2
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megastack.compat import streaming
from megastack.config import ModelConfig

LAYER_KINDS = ("attn_norm", "qkv", "proj", "mlp_norm", "fc1", "fc2")
GLOBAL_KINDS = ("embedding", "output", "final_norm")
MOE_KINDS = ("attn_norm", "qkv", "proj", "mlp_norm", "router", "expert_fc1", "expert_fc2")
EXPERT_KINDS = ("expert_fc1", "expert_fc2")  # one tensor per expert: layers.{i}.expert_fc1.{e}

# How each kind is cut across TP ranks: "rows"/"cols" split one dim evenly, "glu" splits gate and up
# halves separately (each rank holds [gate_r; up_r]), "replicated" is copied to every rank.
TP_RULE = {
    "embedding": "rows",
    "output": "rows",
    "final_norm": "replicated",
    "attn_norm": "replicated",
    "qkv": "rows",
    "proj": "cols",
    "mlp_norm": "replicated",
    "fc1": "glu",
    "fc2": "cols",
    "router": "replicated",
    "expert_fc1": "glu",
    "expert_fc2": "cols",
}

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.([a-z_0-9]+?)(?:\.(\d+))?$")


@dataclass(frozen=True)
class Piece:
    """Rows/cols ``[start, start + length)`` of dimension ``dim`` of a full logical tensor."""

    dim: int
    start: int
    length: int


# Adam's state per weight, named as megatron-core names it in the model's own sharded space
# (optimizer.state.<state>.<model key> in torch_dist): the fp32 master copy and the two moments.
OPTIMIZER_STATES = ("fp32_param", "exp_avg", "exp_avg_sq")


def state_name(state: str, name: str) -> str:
    """The logical name of Adam's ``state`` of weight ``name``: 'exp_avg/layers.3.qkv'. It has the weight's
    shape and TP cut, so readers, plans and writers treat it as one more tensor."""
    return f"{state}/{name}"


def split_state(name: str) -> tuple[str | None, str]:
    """'exp_avg/layers.3.qkv' -> ('exp_avg', 'layers.3.qkv'); a weight's own name -> (None, name)."""
    state, sep, weight = name.partition("/")
    return (state, weight) if sep else (None, name)


def split_name(name: str) -> tuple[int | None, str]:
    """'layers.3.qkv' -> (3, 'qkv'); 'embedding' -> (None, 'embedding'); Adam's state as its weight."""
    name = split_state(name)[1]
    m = _LAYER_NAME.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


def expert_of(name: str) -> int | None:
    """'layers.3.expert_fc1.5' -> 5; None for a tensor that is not one expert's."""
    m = _LAYER_NAME.match(split_state(name)[1])
    return int(m.group(3)) if m and m.group(3) is not None else None


def layer_name(layer: int, kind: str, expert: int | None = None) -> str:
    return f"layers.{layer}.{kind}" if expert is None else f"layers.{layer}.{kind}.{expert}"


def block_tensors(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """(kind, expert) of every tensor in one block, in a stable order: a dense block's six, or a mixture
    of experts' norms, attention, router and each expert's fc1 and fc2."""
    if not cfg.is_moe:
        return [(kind, None) for kind in LAYER_KINDS]
    dense = [(kind, None) for kind in MOE_KINDS if kind not in EXPERT_KINDS]
    return dense + [(kind, e) for e in range(cfg.num_experts) for kind in EXPERT_KINDS]


def logical_names(cfg: ModelConfig) -> list[str]:
    """All logical tensors of a model, in a stable order (embedding first, output last)."""
    names = ["embedding"]
    block = block_tensors(cfg)
    for i in range(cfg.num_layers):
        names += [layer_name(i, kind, expert) for kind, expert in block]
    names.append("final_norm")
    if not cfg.tie_embeddings:
        names.append("output")
    return names


def logical_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    _, kind = split_name(name)
    h = cfg.hidden_size
    return {
        "embedding": (cfg.vocab_size, h),
        "output": (cfg.vocab_size, h),
        "final_norm": (h,),
        "attn_norm": (h,),
        "mlp_norm": (h,),
        "qkv": (cfg.qkv_rows, h),
        "proj": (h, cfg.num_attention_heads * cfg.head_dim),
        "fc1": (2 * cfg.ffn_hidden_size, h),
        "fc2": (h, cfg.ffn_hidden_size),
        "router": (cfg.num_experts, h),
        "expert_fc1": (2 * cfg.expert_ffn_size, h),
        "expert_fc2": (h, cfg.expert_ffn_size),
    }[kind]


def tp_pieces(kind: str, shape: tuple[int, ...], rank: int, size: int) -> list[Piece]:
    """The pieces of the full tensor that TP rank ``rank`` of ``size`` holds, in shard order."""
    rule = TP_RULE[kind]
    if rule == "replicated" or size == 1:
        return [Piece(0, 0, shape[0])]
    if rule == "rows":
        step = shape[0] // size
        return [Piece(0, rank * step, step)]
    if rule == "cols":
        step = shape[1] // size
        return [Piece(1, rank * step, step)]
    half = shape[0] // 2  # glu: [gate; up]
    step = half // size
    return [Piece(0, rank * step, step), Piece(0, half + rank * step, step)]


def tp_shard(kind: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Cut TP rank ``rank``'s shard out of a full logical tensor."""
    return take_pieces(full, tp_pieces(kind, tuple(full.shape), rank, size))


def tp_merge(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``tp_shard``: the full logical tensor from all TP ranks' shards."""
    rule = TP_RULE[kind]
    if rule == "replicated" or len(shards) == 1:
        return shards[0]
    if rule == "rows":
        return cat(shards, 0)
    if rule == "cols":
        return cat(shards, 1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return cat([g for g, _ in halves] + [u for _, u in halves], 0)


def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` into a buffer of ``streaming.empty``: while a conversion streams, a reused one, not fresh
    pages faulted in and zeroed for every joined block (a TP shard of fc1 is two pieces)."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].device.type != "cpu" or any(p.dtype != parts[0].dtype for p in parts):
        return torch.cat(parts, dim=dim)  # a GPU gather (model/weights.py) or mixed dtypes: torch's own rules
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return torch.cat(parts, dim=dim, out=streaming.empty(tuple(shape), parts[0].dtype))


def tp_read_plan(
    kind: str, shape: tuple[int, ...], size: int, pieces: list[Piece] | None
) -> tuple[list[tuple[int, list[Piece] | None]], bool]:
    """Which of ``size`` TP shards a request for ``pieces`` of the full tensor reads: [(tp rank, pieces in that
    shard's coordinates)] in global order, and whether the parts need a TP merge (``tp_merge``; else they are
    concatenated along the pieces' dimension). Pieces along the split dimension touch only the shards that
    hold them (each shard is the concatenation of its own global pieces, so a global range maps to a local
    one by walking them); any other request reads every shard, narrowed along the other dimension."""
    rule = TP_RULE[kind]
    if rule == "replicated" or size == 1:
        return [(0, pieces)], False
    split = 1 if rule == "cols" else 0
    if not pieces or pieces[0].dim != split:
        return [(r, pieces) for r in range(size)], True
    parts = []
    for p in pieces:
        for r in range(size):
            local = 0
            for q in tp_pieces(kind, shape, r, size):
                lo, hi = max(p.start, q.start), min(p.start + p.length, q.start + q.length)
                if hi > lo:
                    parts.append((lo, r, local + lo - q.start, hi - lo))
                local += q.length
    return [(r, [Piece(split, start, length)]) for _, r, start, length in sorted(parts)], False


def tp_join(
    kind: str, plan: list[tuple[int, list[Piece] | None]], merge: bool, parts: list[torch.Tensor]
) -> torch.Tensor:
    """The parts a ``tp_read_plan`` read, one per plan entry, as the requested tensor."""
    if merge:
        return tp_merge(kind, parts)
    return parts[0] if len(parts) == 1 else cat(parts, plan[0][1][0].dim)


def holds_tied_copy(cfg: ModelConfig, pp_rank: int, pp_size: int) -> bool:
    """Whether pipeline stage ``pp_rank`` holds megatron's copy of tied embeddings as its output layer (the
    last stage, when there is more than one)."""
    return cfg.tie_embeddings and pp_size > 1 and pp_rank == pp_size - 1


def tp_shard_shape(kind: str, shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    rule = TP_RULE[kind]
    if rule in ("rows", "glu"):
        return (shape[0] // size, *shape[1:])
    if rule == "cols":
        return (shape[0], shape[1] // size)
    return tuple(shape)


# ----------------------------------------------------------------------------- fused attention / MLP


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Separate q/k/v projections (HF layout) -> megatron's QKV grouped per query group."""
    d, groups = cfg.head_dim, cfg.query_groups
    per_group = cfg.num_attention_heads // groups
    h_in = q.shape[-1]
    q = q.reshape(groups, per_group * d, h_in)
    k = k.reshape(groups, d, h_in)
    v = v.reshape(groups, d, h_in)
    return torch.cat([q, k, v], dim=1).reshape(-1, h_in)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    d, groups = cfg.head_dim, cfg.query_groups
    per_group = cfg.num_attention_heads // groups
    h_in = qkv.shape[-1]
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, h_in).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h_in), k.reshape(-1, h_in), v.reshape(-1, h_in)


def qkv_rows(cfg: ModelConfig, part: int) -> list[Piece]:
    """The rows of the fused QKV that q (``part`` 0), k (1) or v (2) is, in its order: one range in each query
    group, which holds its q rows, then k's, then v's (``fuse_qkv``)."""
    d = cfg.head_dim
    q_rows = cfg.num_attention_heads // cfg.query_groups * d
    first, length = ((0, q_rows), (q_rows, d), (q_rows + d, d))[part]
    return [Piece(0, group * (q_rows + 2 * d) + first, length) for group in range(cfg.query_groups)]


def fuse_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_glu(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


# ----------------------------------------------------------------------------- Hugging Face names

HF_GLOBAL = {
    "embedding": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "output": "lm_head.weight",
}
HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "proj": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "fc2": "mlp.down_proj.weight",
}


def logical_from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole HF Llama state dict -> logical tensors (tests and small models; streaming uses hf.py)."""
    out = {name: state[hf] for name, hf in HF_GLOBAL.items() if hf in state}
    if cfg.tie_embeddings:
        out.pop("output", None)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for kind, suffix in HF_LAYER.items():
            out[layer_name(i, kind)] = state[p + suffix]
        out[layer_name(i, "qkv")] = fuse_qkv(
            state[p + "self_attn.q_proj.weight"],
            state[p + "self_attn.k_proj.weight"],
            state[p + "self_attn.v_proj.weight"],
            cfg,
        )
        out[layer_name(i, "fc1")] = fuse_glu(state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"])
    return out


def hf_from_logical(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``logical_from_hf``."""
    out = {hf: tensors[name] for name, hf in HF_GLOBAL.items() if name in tensors}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = tensors["embedding"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for kind, suffix in HF_LAYER.items():
            out[p + suffix] = tensors[layer_name(i, kind)]
        q, k, v = split_qkv(tensors[layer_name(i, "qkv")], cfg)
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
        out[p + "self_attn.v_proj.weight"] = v
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = split_glu(tensors[layer_name(i, "fc1")])
    return out


# ----------------------------------------------------------------------------- megatron-core names

# Parameter names inside a megatron-core GPTModel (per layer, local layer index). The local spec names
# the norms input_layernorm / pre_mlp_layernorm; the Transformer Engine spec fuses them into the
# following linear as layer_norm_weight. torch_dist checkpoints always use the TE names.
MCORE_GLOBAL = {
    "embedding": "embedding.word_embeddings.weight",
    "final_norm": "decoder.final_layernorm.weight",
    "output": "output_layer.weight",
}
MCORE_LAYER_TE = {
    "attn_norm": "self_attention.linear_qkv.layer_norm_weight",
    "qkv": "self_attention.linear_qkv.weight",
    "proj": "self_attention.linear_proj.weight",
    "mlp_norm": "mlp.linear_fc1.layer_norm_weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
}
MCORE_LAYER_LOCAL = {**MCORE_LAYER_TE, "attn_norm": "input_layernorm.weight", "mlp_norm": "pre_mlp_layernorm.weight"}
# Modules whose per-layer _extra_state megatron-core expects next to the weights.
MCORE_EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)

# A mixture of experts' MLP (megatron-core's MoELayer; SequentialMLP's local experts, numbered within the
# expert-parallel rank); its norm is a separate module under both specs (TE fuses only a dense fc1's).
MCORE_MOE = {
    "mlp_norm": "pre_mlp_layernorm.weight",
    "router": "mlp.router.weight",
    "expert_fc1": "mlp.experts.local_experts.{e}.linear_fc1.weight",
    "expert_fc2": "mlp.experts.local_experts.{e}.linear_fc2.weight",
}

_MCORE_BY_SUFFIX = (
    {v: k for k, v in MCORE_LAYER_LOCAL.items()}
    | {v: k for k, v in MCORE_LAYER_TE.items()}
    | {MCORE_MOE["router"]: "router"}
)
_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MCORE_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_MCORE_BY_GLOBAL = {v: k for k, v in MCORE_GLOBAL.items()}


def logical_from_mcore_name(name: str, layer_offset: int = 0, expert_offset: int = 0) -> str | None:
    """'decoder.layers.1.mlp.linear_fc1.weight' (+ offset) -> 'layers.{1+offset}.fc1'; None if not a weight.
    A local expert's index plus ``expert_offset`` (its expert-parallel rank's first) is its global one."""
    if name in _MCORE_BY_GLOBAL:
        return _MCORE_BY_GLOBAL[name]
    m = _MCORE_LAYER.match(name)
    if not m:
        return None
    layer = int(m.group(1)) + layer_offset
    expert = _MCORE_EXPERT.match(m.group(2))
    if expert:
        return layer_name(layer, f"expert_fc{expert.group(2)}", int(expert.group(1)) + expert_offset)
    if m.group(2) in _MCORE_BY_SUFFIX:
        return layer_name(layer, _MCORE_BY_SUFFIX[m.group(2)])
    return None


def mcore_name(
    logical: str, layer_offset: int = 0, te_names: bool = True, moe: bool = False, expert_offset: int = 0
) -> str:
    """Inverse of ``logical_from_mcore_name``: the global index minus ``layer_offset`` is the local index
    (an expert's minus ``expert_offset``, the first expert of its expert-parallel rank)."""
    layer, kind = split_name(logical)
    if layer is None:
        return MCORE_GLOBAL[kind]
    if moe and kind in MCORE_MOE:
        suffix = MCORE_MOE[kind].format(e=(expert_of(logical) or 0) - expert_offset)
    else:
        suffix = (MCORE_LAYER_TE if te_names else MCORE_LAYER_LOCAL)[kind]
    return f"decoder.layers.{layer - layer_offset}.{suffix}"


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global layer indices held by pipeline stage ``pp_rank`` (even split, as megatron-core does)."""
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def rank_experts(cfg: ModelConfig, ep_rank: int, ep_size: int) -> range:
    """Global experts held by expert-parallel rank ``ep_rank`` (an even split, as megatron-core does); a
    dense model's ranks hold none."""
    per_rank = cfg.num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def expert_rank(cfg: ModelConfig, expert: int, ep_size: int) -> int:
    """The expert-parallel rank holding global expert ``expert``."""
    return expert // (cfg.num_experts // ep_size)


def stage_holds(name: str, cfg: ModelConfig, pp_rank: int, pp_size: int) -> bool:
    """Does pipeline stage ``pp_rank`` hold logical tensor ``name``?"""
    layer, kind = split_name(name)
    if layer is not None:
        return layer in stage_layers(cfg.num_layers, pp_rank, pp_size)
    if kind == "embedding":  # the last stage also holds it when tied (megatron syncs the copies)
        return pp_rank == 0 or holds_tied_copy(cfg, pp_rank, pp_size)
    return pp_rank == pp_size - 1


def pieces_shape(full_shape: tuple[int, ...], pieces: list[Piece] | tuple[Piece, ...] | None) -> tuple[int, ...]:
    """Shape of the concatenation of ``pieces`` of a tensor of ``full_shape``."""
    if not pieces:
        return tuple(full_shape)
    shape = list(full_shape)
    shape[pieces[0].dim] = sum(p.length for p in pieces)
    return tuple(shape)


def narrow_pieces(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    """Rows ``[start, stop)`` of the tensor the dim-0 ``pieces`` cut out (their concatenation), as pieces of the
    full tensor: how a writer produces a large tensor a block of rows at a time."""
    out, offset = [], 0
    for p in pieces:
        lo, hi = max(start, offset), min(stop, offset + p.length)
        if hi > lo:
            out.append(Piece(p.dim, p.start + lo - offset, hi - lo))
        offset += p.length
    return out


def take_pieces(full: torch.Tensor, pieces: list[Piece] | tuple[Piece, ...] | None) -> torch.Tensor:
    """Cut ``pieces`` out of a full tensor (a view when there is one piece)."""
    if not pieces:
        return full
    return cat([full.narrow(p.dim, p.start, p.length) for p in pieces], pieces[0].dim)

"""Moving logical tensors in and out of a live megatron-core model on this rank.

Tests use it to give megatron-core and the reference model the same weights; training uses
megatron's dist_checkpointing instead, which cuts the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megastack import layout
from megastack.config import ModelConfig


def _position() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )


def param_logical_names(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, str]:
    """Local parameter name -> logical tensor name, for this rank's model."""
    from megatron.core import parallel_state as ps

    _, _, pp_rank, pp_size = _position()
    offset = layout.stage_layers(cfg.num_layers, pp_rank, pp_size).start
    # this expert-parallel rank's experts are numbered from 0 in the module
    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    first_expert = layout.rank_experts(cfg, ep_rank, ep_size).start
    names = {}
    for name, _ in model.named_parameters():
        logical = layout.logical_from_mcore_name(name, offset, first_expert)
        if logical is None:
            raise ValueError(f"parameter {name} has no logical tensor; the model is not Llama-style")
        if logical == "output" and cfg.tie_embeddings:
            logical = "embedding"  # the last stage's copy of the tied embedding
        names[name] = logical
    return names


@torch.no_grad()
def load_logical(model: torch.nn.Module, cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> None:
    """Fill this rank's parameters from full logical tensors (``get(name)``), cut by the TP rules."""
    tp_rank, tp_size, _, _ = _position()
    params = dict(model.named_parameters())
    for name, logical in param_logical_names(model, cfg).items():
        _, kind = layout.split_name(logical)
        shard = layout.tp_shard(kind, get(logical), tp_rank, tp_size)
        if shard.shape != params[name].shape:
            raise ValueError(f"{logical}: shard {tuple(shard.shape)} does not fit {name} {tuple(params[name].shape)}")
        params[name].copy_(shard)


@torch.no_grad()
def gather_logical(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """This pipeline stage's logical tensors, merged over the TP group (every TP rank gets them)."""
    from megatron.core import parallel_state as ps

    _, tp_size, _, _ = _position()
    group = ps.get_tensor_model_parallel_group()
    out = {}
    params = dict(model.named_parameters())
    for name, logical in param_logical_names(model, cfg).items():
        local = params[name].detach().contiguous()
        shards = [torch.empty_like(local) for _ in range(tp_size)]
        torch.distributed.all_gather(shards, local, group=group)
        out[logical] = layout.tp_merge(layout.split_name(logical)[1], shards)
    return out

"""Adam's state in the model's own sharded space: written beside the weights, read back under any layout.

DeepSpeed keeps AdamW's state as flat fp32 partitions per DP rank (engine/), which load back only into the
same ZeRO stage and world size. megastack also writes each weight's state as megatron-core names it,
``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<weight key>`` in the torch_dist checkpoint, with the
weight's own sharding, so a later stage can start from it (``init_optimizer: carried``) under another ZeRO
stage, DP size, TP or PP, and a plan can carry it through growth like the weights. The step count goes in
megastack.json (``optimizer.step``): Adam's bias correction continues from it.

DeepSpeed's fragment API (deepspeed.utils.safe_{get,set}_full_*) moves one weight's state at a time; it needs
the inner optimizer's state to exist, which torch's AdamW creates only at its first step, so a carried-in
state is created first (see the notes on DeepSpeed in ../shared/notes, measured at ZeRO-1, 2 and 3).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megastack import layout
from megastack.ckpt.manifest import optimizer_block
from megastack.config import ModelConfig
from megastack.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_states(precision: str) -> tuple[str, ...]:
    """What a checkpoint carries: the moments, and the fp32 master copy when the weights are not fp32."""
    return MOMENTS if precision == "fp32" else ("fp32_param", *MOMENTS)


def _is_deepspeed(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def get_state(engine: Any, param: torch.nn.Parameter, state: str) -> torch.Tensor:
    """The whole (TP-local) fp32 state of ``param``; under ZeRO a collective over the DP group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _is_deepspeed(param):
        value = (
            safe_get_full_fp32_param(param) if state == "fp32_param" else safe_get_full_optimizer_state(param, state)
        )
    else:  # ZeRO-0 in fp32: the torch optimizer's own state, the parameter its own master copy
        value = param.detach() if state == "fp32_param" else engine.optimizer.state[param][state]
    return value.detach().float().cpu().clone()


def set_state(engine: Any, param: torch.nn.Parameter, state: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if _is_deepspeed(param):
        device = param.device
        if state == "fp32_param":
            safe_set_full_fp32_param(param, value.to(device))
        else:
            safe_set_full_optimizer_state(param, value.to(device), state)
    elif state == "fp32_param":
        with torch.no_grad():
            param.copy_(value)
    else:
        engine.optimizer.state[param][state].copy_(value)


def adam_step(engine: Any) -> int:
    """The optimizer steps taken (torch AdamW's per-tensor ``step``; 0 before the first)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for value in inner.state.values():
        step = value.get("step")
        if step is not None:
            return int(step.item() if isinstance(step, torch.Tensor) else step)
    return 0


def _flat_partitions(engine: Any) -> list[torch.Tensor]:
    """The tensors the inner torch optimizer keeps state for: DeepSpeed's fp32 partitions, or the params."""
    zero = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        flats = getattr(zero, attr, None)
        if flats:
            return list(flats)
    return [p for group in zero.param_groups for p in group["params"]]


def init_adam_state(engine: Any, step: int) -> None:
    """Create AdamW's state (zero moments, ``step`` taken) so carried values can be set into it."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    fused = any(group.get("fused") for group in inner.param_groups)  # fused AdamW keeps step on the device
    for flat in _flat_partitions(engine):
        inner.state[flat] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=flat.device if fused else "cpu"),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    link_fragments(engine)


def link_fragments(engine: Any) -> None:
    """Point each weight's DeepSpeed fragment at the optimizer state as it is now (ZeRO-1/2 and the bf16
    optimizer link it once, after the first step, and a fragment linked while a partition had no state
    yet stays empty: 'exp_avg not found in optimizer state fragment' at the save after)."""
    zero = engine.optimizer
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        zero._hp_optimizer_states_linked = False
        link()


def export_entries(module: torch.nn.Module, engine: Any, model_sd: dict[str, Any], states: tuple[str, ...]):
    """Sharded entries of Adam's state for ``dist_checkpointing.save``, beside the model's: each weight's
    ShardedTensor with the state as data under optimizer.state.<state>.<key>. Every rank of a DP group
    walks the weights in the same order (the gathers are collective)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    link_fragments(engine)
    params = dict(module.named_parameters())
    out = {}
    for name in sorted(model_sd):
        entry = model_sd[name]
        # a SwiGLU fc1 is a factory (its gate and up halves are cut by TP separately): the same factory
        # builds the state's entries from the state's data
        if name not in params or not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            continue
        for state in states:
            value = get_state(engine, params[name], state).reshape(entry.data.shape)
            fields = {"dtype": torch.float32} if isinstance(entry, ShardedTensor) else {}
            out[f"optimizer.state.{state}.{name}"] = dataclasses.replace(
                entry, key=f"optimizer.state.{state}.{entry.key}", data=value, **fields
            )
    return out


def carry_in(engine: Any, module: torch.nn.Module, cfg: ModelConfig, source: Path, manifest: dict[str, Any]) -> int:
    """Set Adam's state from ``source`` (its weights are already in ``module``): this rank's TP pieces of
    every weight's moments (and fp32 master when the checkpoint has one). Returns the step carried."""
    from megatron.core import parallel_state as ps

    from megastack.ckpt import formats
    from megastack.ckpt.detect import open_checkpoint
    from megastack.model.weights import param_logical_names

    step, states = optimizer_block(manifest, f"init_optimizer: carried: {source}")
    reader = open_checkpoint(source)
    if not formats.get(reader.format).reads_optimizer:  # the registry says which formats hold Adam's state
        raise UserError(f"init_optimizer: carried: {source} is {reader.format}; Adam's state is read from torch_dist")
    stored = reader.optimizer_states()
    missing = [s for s in states if s not in stored]
    if missing:
        raise UserError(
            f"{source}: megastack.json lists Adam's {missing[0]} but the checkpoint lacks it; it is damaged"
        )
    init_adam_state(engine, step)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    params = dict(module.named_parameters())
    for name, logical in sorted(param_logical_names(module, cfg).items()):
        shape = getattr(params[name], "ds_shape", params[name].shape)
        pieces = layout.tp_pieces(layout.split_name(logical)[1], layout.logical_shape(cfg, logical), tp_rank, tp)
        for state in states:
            value = reader.read(layout.state_name(state, logical), pieces).float()
            if tuple(value.shape) != tuple(shape):
                raise UserError(
                    f"{source}: {state} of {logical} has shape {tuple(value.shape)}, the model {tuple(shape)}"
                )
            set_state(engine, params[name], state, value)
    return step

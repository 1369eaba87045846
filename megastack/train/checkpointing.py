"""Training checkpoints in the layout of docs/checkpoints.md, written so that a crash never publishes half.

    OUT_DIR/latest_checkpointed_iteration.txt   the newest COMPLETE iteration, replaced atomically LAST
    OUT_DIR/iter_0000100/                       renamed into place from .iter_0000100.partial when complete
        metadata.json, common.pt, .metadata, __*_*.distcp   model weights: megatron-core dist_checkpointing,
                                                            backend torch_dist (loads under any TP/PP;
                                                            what ``megastack grow`` reads)
        engine/                                 DeepSpeed's own checkpoint (ZeRO optimizer partitions, fp32
                                                master weights, engine counters) + per-rank RNG state
        megastack.json                          model config, iteration, tokens, cumulative FLOPs, history,
                                                data position, sha256 of every file

Weights are read back through megastack's checkpoint readers (``open_checkpoint``: torch_dist, legacy
Megatron or Hugging Face; DCP metadata unpickled with an allowlist, tensors with weights_only=True), so
``init_from`` accepts any checkpoint megastack can read and checks its architecture first.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from megastack import layout
from megastack.ckpt.manifest import (
    TRACKER,
    file_hashes,
    iter_dir_name,
    read_manifest,
    read_tracker,
    write_manifest,
    write_tracker,
)
from megastack.config import ModelConfig
from megastack.errors import UserError
from megastack.fsio import FileDigest, publish_dir, staging_dir

ENGINE_DIR = "engine"  # DeepSpeed's tag inside an iteration directory
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "rotary_base",
    "norm_epsilon",
    "tie_embeddings",
    "num_experts",
    "moe_topk",
    "expert_ffn_size",
)
FAULT_ENV = "MEGASTACK_FAULT_KILL_IN_SAVE"  # tests only: "ITERATION:RANK" kills that rank mid-save


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- finding checkpoints


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration the tracker names, None when there is no tracker (a fresh run)."""
    named = read_tracker(root)
    if named is None:
        return None
    if named == "release":
        raise UserError(
            f"{Path(root) / TRACKER}: names 'release' (a converted checkpoint, not a training run); give it as "
            "init_from and train into a new out_dir"
        )
    if not (Path(root) / iter_dir_name(named)).is_dir():
        raise UserError(
            f"{Path(root) / TRACKER}: names iteration {named} but {iter_dir_name(named)} is missing; restore it "
            "or remove the tracker to start over"
        )
    return named


def remove_stale_partials(root: Path) -> None:
    """Leftovers of a save that crashed: never published, never named by the tracker."""
    for path in root.glob(".iter_*.partial"):
        shutil.rmtree(path, ignore_errors=True)


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """What makes two configs one model; a mixture of experts has no dense MLP (its ffn_hidden_size only
    defaults the experts' width, so a Mixtral export, which stores the experts' width alone, matches)."""
    return {name: getattr(cfg, name) for name in ARCH_FIELDS if not (cfg.is_moe and name == "ffn_hidden_size")}


def check_architecture(found: ModelConfig, expected: ModelConfig, where: str) -> None:
    a, b = architecture(found), architecture(expected)
    diffs = [
        f"{k} {a.get(k)} (model config: {b.get(k)})" for k in ARCH_FIELDS if a.get(k, b.get(k)) != b.get(k, a.get(k))
    ]
    if diffs:
        raise UserError(
            f"{where}: checkpoint of another architecture: {', '.join(diffs)}; point init_from at a "
            "checkpoint of this model or change 'model' to match it"
        )


# ----------------------------------------------------------------------------- weights in


def check_source(path: str | os.PathLike, cfg: ModelConfig, where: str = "init_from") -> None:
    """Fail early (before any model is built or file written) on a missing or mismatched checkpoint."""
    from megastack.ckpt.detect import open_checkpoint

    if not Path(path).exists():
        raise UserError(f"{where}: {path} not found; give a checkpoint directory (ROOT with a tracker or iter_*)")
    reader = open_checkpoint(path)
    check_architecture(reader.cfg, cfg, f"{where} {path}")


@torch.no_grad()
def load_weights(
    module: torch.nn.Module, cfg: ModelConfig, path: str | os.PathLike, where: str = "init_from"
) -> dict[str, Any]:
    """Fill this rank's parameters from a checkpoint (reading only this rank's TP pieces); its manifest."""
    from megatron.core import parallel_state as ps

    from megastack.ckpt.detect import open_checkpoint
    from megastack.model.weights import param_logical_names

    if not Path(path).exists():
        raise UserError(f"{where}: {path} not found; give a checkpoint directory (ROOT with a tracker or iter_*)")
    reader = open_checkpoint(path)
    check_architecture(reader.cfg, cfg, f"{where} {path}")
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    params = dict(module.named_parameters())
    for name, logical in param_logical_names(module, cfg).items():
        kind = layout.split_name(logical)[1]
        pieces = layout.tp_pieces(kind, layout.logical_shape(cfg, logical), tp_rank, tp)
        shard = reader.read(logical, pieces)
        if tuple(shard.shape) != tuple(params[name].shape):
            raise UserError(
                f"{where} {path}: {logical} has shape {tuple(shard.shape)} for this rank, the model "
                f"needs {tuple(params[name].shape)}"
            )
        params[name].copy_(shard.to(params[name].dtype))
    return read_manifest(reader.path) or {}


# ----------------------------------------------------------------------------- save


def _maybe_fault(iteration: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec:
        it, rank = (int(x) for x in spec.split(":"))
        if it == iteration and rank == _rank_world()[0]:
            os.kill(os.getpid(), signal.SIGKILL)


def _model_state(module: torch.nn.Module, zero_stage: int):
    """megatron's sharded state dict; under ZeRO-3 the parameters are gathered for it first."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()


def _hash_files(directory: Path) -> dict[str, FileDigest]:
    """The checksums of every file below ``directory``, the work split over all ranks."""
    rank, world = _rank_world()
    mine = file_hashes(directory, share=(rank, world))
    if world == 1:
        return mine
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return dict(sorted(kv for part in gathered for kv in part.items()))


def save(
    root: str | os.PathLike,
    iteration: int,
    engine: Any,
    cfg: ModelConfig,
    zero_stage: int,
    manifest: dict[str, Any],
    client_state: dict[str, Any],
    keep_last: int,
    optimizer_states: tuple[str, ...] = (),
) -> Path:
    """Write iteration ``iteration`` (collective: every rank calls it). Returns the published directory.
    ``optimizer_states``: Adam's state also written in the model's sharded space (train/optimizer_state.py)."""
    from megatron.core import dist_checkpointing

    from megastack.model.build import checkpoint_state

    root = Path(root)
    rank, _ = _rank_world()
    final = root / iter_dir_name(iteration)
    if final.is_dir():  # already saved (e.g. the last periodic save is also the end of the stage)
        return final
    staging = staging_dir(final)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    _barrier()
    module = engine.module
    with _model_state(module, zero_stage):
        state = checkpoint_state(module, cfg)
        if optimizer_states:
            from megastack.train.optimizer_state import export_entries

            state |= export_entries(module, engine, state, optimizer_states)
        dist_checkpointing.save(state, str(staging))
    _maybe_fault(iteration)
    engine.save_checkpoint(str(staging), tag=ENGINE_DIR, client_state=client_state, save_latest=False)
    torch.save({"torch": torch.get_rng_state()}, staging / ENGINE_DIR / f"rng_rank{rank:05d}.pt")
    if rank == 0:  # DeepSpeed's rank 0 drops its recovery scripts beside the tag; keep them with its state
        for script in staging.glob("zero_to_*.py"):
            os.replace(script, staging / ENGINE_DIR / script.name)
    _barrier()
    hashes = _hash_files(staging)
    if rank == 0:
        write_manifest(staging, manifest, hashes)
        publish_dir(staging, final)
        write_tracker(root, iteration)
        prune(root, keep_last)
    _barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` published checkpoints (after the tracker moved on)."""
    published = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for old in published[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- resume


def load_engine_state(engine: Any, directory: Path) -> dict[str, Any]:
    """DeepSpeed's optimizer/engine state and this rank's RNG from ``directory`` (our own checkpoint)."""
    rank, _ = _rank_world()
    if not (directory / ENGINE_DIR).is_dir():
        raise UserError(
            f"{directory}: has no {ENGINE_DIR}/ (optimizer state); it is not a training checkpoint "
            "to resume from; use it as init_from instead"
        )
    _, client_state = engine.load_checkpoint(
        str(directory),
        tag=ENGINE_DIR,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    if client_state is None:
        raise UserError(
            f"{directory / ENGINE_DIR}: DeepSpeed could not load this checkpoint (written with another "
            "parallel layout?); resume with the layout it was written with"
        )
    rng = directory / ENGINE_DIR / f"rng_rank{rank:05d}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
    return client_state


def resume_dir(root: str | os.PathLike) -> Path | None:
    iteration = latest_iteration(root)
    return None if iteration is None else Path(root) / iter_dir_name(iteration)

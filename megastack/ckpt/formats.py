"""The format registry: how each checkpoint format is detected, read, written and listed.

detect, convert, grow, inspect and the CLI's ``--to`` all go through ``FORMATS``; a new format is a
reader/writer module plus one ``Format`` entry here. Format modules are imported only when used (DCP's
imports alone take a second), so each entry's functions import their module lazily.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megastack.ckpt.manifest import model_from_manifest
from megastack.config import ModelConfig, ParallelConfig
from megastack.errors import NotBuiltError, UserError

if TYPE_CHECKING:  # the CLI imports this module for --to's choices: no torch at import time
    import torch

    from megastack.ckpt.base import Reader, Writer

    # (name, shape, dtype, file or None): one stored tensor, as `megastack inspect` lists it (in file
    # order, names in natural order: layers.10 after layers.9)
    Stored = tuple[str, tuple[int, ...], torch.dtype, str | None]


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class WriteOptions:
    """Everything a writer may need; each format takes what applies to it."""

    tp: int = 1
    pp: int = 1
    ep: int = 1  # legacy: expert-parallel rank files of a mixture of experts
    iteration: int = 0
    args: Any = None  # Megatron-LM's args for the output (megatron_args.for_output)
    te_names: bool = True  # Transformer Engine norm key names (legacy; torch_dist: a mixture of experts' norm)
    shard_bytes: int | None = None  # hf: the largest safetensors file (None: the format's default)
    optimizer_states: tuple[str, ...] = ()  # Adam's states written beside the weights
    resume_state: dict[str, Any] | None = None  # Megatron-LM's optimizer/scheduler (common.pt, legacy rank files)
    layer_order: tuple[str, ...] | None = None  # legacy: the source run's layer module order, when it is known


@dataclass(frozen=True)
class Format:
    name: str
    looks_for: str  # what detection finds on disk (the refusal lists every format's)
    detect: Callable[[Path], bool]
    open: Callable[[Path, ModelConfig | None, bool], Reader]  # (directory, model or None, check_files)
    writer: Callable[[ModelConfig, torch.dtype, WriteOptions], Writer]
    stored: Callable[[Path], tuple[ModelConfig | None, list[Stored], dict[str, int] | None]]  # cfg, tensors, layout
    # `megastack inspect`: the layout line for a format with no TP x PP file sets (given the tensors)
    layout_note: Callable[[list[dict[str, Any]]], str]
    cut_by_rank: bool = False  # written as one file set per TP x PP rank (takes --tp/--pp)
    megatron: bool = False  # carries Megatron-LM's args (read from the source, written to the output)
    # Megatron-LM's state beside the weights, for inspect: (rank 0's dict, sharded keys, optimizer or None)
    saved_state: Callable[[Path], SavedState] | None = None
    files_per_tensor: bool = True  # inspect lists each tensor's file (not for DCP's shards)
    iteration_dirs: bool = True  # lives in iter_NNNNNNN directories (its iteration from the name)
    reads_optimizer: bool = False  # reads Adam's state beside the weights (--carry-optimizer)
    writes_optimizer: bool = False  # writes it (torch_dist in the model's space; legacy: Megatron's plain optimizer)
    experts: bool = False  # reads and writes mixtures of experts (upcycled models)


# (rank 0's state dict or common.pt, names of sharded entries, a description of the optimizer state or None)
SavedState = tuple[dict[str, Any], list[str], str | None]


# ----------------------------------------------------------------------------- torch_dist


def _td_detect(directory: Path) -> bool:
    return (directory / "metadata.json").is_file() and (directory / ".metadata").is_file()


def _td_config(directory: Path) -> ModelConfig:
    """megastack.json's model, else the model Megatron-LM's args in common.pt describe."""
    from megastack.ckpt import megatron_args
    from megastack.ckpt.torch_dist import read_common

    return model_from_manifest(directory) or megatron_args.model_config(
        read_common(directory).get("args"), str(directory / "common.pt")
    )


def _td_open(directory: Path, model: ModelConfig | None, check_files: bool) -> Reader:
    from megastack.ckpt.torch_dist import TorchDistReader

    return TorchDistReader(directory, model or _td_config(directory), check_files=check_files)


def _td_writer(cfg: ModelConfig, dtype: torch.dtype, options: WriteOptions) -> Writer:
    from megastack.ckpt.torch_dist import TorchDistWriter

    return TorchDistWriter(
        cfg,
        dtype,
        args=options.args,
        iteration=options.iteration,
        optimizer_states=options.optimizer_states,
        resume_state=options.resume_state,
        te_names=options.te_names,
    )


def _td_stored(directory: Path) -> tuple[ModelConfig | None, list[Stored], None]:
    from megastack.ckpt.dcp_metadata import TensorStorageMetadata
    from megastack.ckpt.safe_load import read_dcp_metadata
    from megastack.ckpt.torch_dist import TorchDistReader, read_common

    cfg = None
    if model_from_manifest(directory) is not None or read_common(directory).get("args") is not None:
        cfg = _td_config(directory)  # a refused or malformed args object is an error, not "unknown"
        TorchDistReader(directory, cfg)  # checks every tensor's global shape against the config
    metadata = read_dcp_metadata(directory)
    tensors = [
        (key, tuple(md.size), md.properties.dtype, None)
        for key, md in sorted(metadata.state_dict_metadata.items(), key=lambda kv: natural_key(kv[0]))
        if isinstance(md, TensorStorageMetadata)
    ]
    return cfg, tensors, None


# ----------------------------------------------------------------------------- Hugging Face


def _td_state(directory: Path) -> SavedState:
    from megastack.ckpt.safe_load import read_dcp_metadata
    from megastack.ckpt.torch_dist import read_common

    common = read_common(directory)
    sharded = list(read_dcp_metadata(directory).state_dict_metadata)
    optim_keys = [k for k in sharded if k.startswith("optimizer.")]
    optimizer = None
    if optim_keys:
        content = common.get("content_metadata")
        kind = content.get("distrib_optim_sharding_type") if isinstance(content, dict) else None
        optimizer = f"sharded optimizer state ({len(optim_keys)} entries" + (f", {kind})" if kind else ")")
    return common, sharded, optimizer


def _hf_detect(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (
        any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file()
    )


def _hf_open(directory: Path, model: ModelConfig | None, check_files: bool) -> Reader:
    from megastack.ckpt.hf import HFReader

    return HFReader(directory, model)


def _hf_writer(cfg: ModelConfig, dtype: torch.dtype, options: WriteOptions) -> Writer:
    from megastack.ckpt.hf import DEFAULT_SHARD_BYTES, HFWriter

    return HFWriter(cfg, dtype, options.shard_bytes or DEFAULT_SHARD_BYTES)


def _hf_stored(directory: Path) -> tuple[ModelConfig, list[Stored], None]:
    from megastack.ckpt.hf import HFReader

    reader = HFReader(directory, model_from_manifest(directory))
    entries = sorted(reader.entries.items(), key=lambda kv: natural_key(kv[0]))
    tensors = [(name, tuple(e.shape), e.dtype, e.file) for name, e in entries]
    reader.close()
    return reader.cfg, tensors, None


# ----------------------------------------------------------------------------- legacy


def _legacy_detect(directory: Path) -> bool:
    from megastack.ckpt.legacy import is_legacy

    return is_legacy(directory)


def _legacy_open(directory: Path, model: ModelConfig | None, check_files: bool) -> Reader:
    from megastack.ckpt.legacy import LegacyReader

    return LegacyReader(directory, model or model_from_manifest(directory))


def _legacy_writer(cfg: ModelConfig, dtype: torch.dtype, options: WriteOptions) -> Writer:
    from megastack.ckpt.legacy import LegacyWriter

    return LegacyWriter(
        cfg,
        options.tp,
        options.pp,
        dtype,
        iteration=options.iteration,
        te_names=options.te_names,
        args=options.args,
        ep=options.ep,
        optimizer_states=options.optimizer_states,
        resume_state=options.resume_state,
        layer_order=options.layer_order,
    )


def _legacy_stored(directory: Path) -> tuple[ModelConfig, list[Stored], dict[str, int]]:
    import torch

    from megastack.ckpt.legacy import LegacyReader, rank_dir

    reader = LegacyReader(directory, model_from_manifest(directory))
    tensors = []
    files = [(p, t, e) for p in range(reader.pp) for t in range(reader.tp) for e in range(reader.ep)]
    for pp_rank, tp_rank, ep_rank in files:
        model = reader._file(tp_rank, pp_rank, ep_rank)["model"]
        rel = rank_dir(tp_rank, pp_rank, reader.pp, ep_rank, reader.ep)
        for key in sorted(model, key=natural_key):
            if isinstance(model[key], torch.Tensor):
                tensors.append((key, tuple(model[key].shape), model[key].dtype, rel))
    shape = {"tp": reader.tp, "pp": reader.pp, "iteration": reader.iteration} | (
        {"ep": reader.ep} if reader.ep > 1 else {}
    )
    return reader.cfg, tensors, shape


# ----------------------------------------------------------------------------- the registry


def _legacy_state(directory: Path) -> SavedState:
    from megastack.ckpt.legacy import FILE_NAME, rank_dir, scan_layout
    from megastack.ckpt.safe_load import load_pt

    _, pp, ep = scan_layout(directory)
    first = directory / rank_dir(0, 0, pp, 0, ep)
    blob = load_pt(first / FILE_NAME, mmap=True)
    blob = blob if isinstance(blob, dict) else {}
    optimizer = None
    if (first / "distrib_optim.pt").is_file():
        optimizer = "distributed optimizer (distrib_optim.pt per rank)"
    elif isinstance(blob.get("optimizer"), dict):
        optimizer = "Megatron optimizer state (in model_optim_rng.pt)"
    return blob, [], optimizer


def _hf_layout(tensors: list[dict[str, Any]]) -> str:
    return f"{len({t['file'] for t in tensors})} safetensors file(s)"


FORMATS: dict[str, Format] = {  # in detection order
    "torch_dist": Format(
        "torch_dist",
        "torch_dist metadata.json + .metadata",
        _td_detect,
        _td_open,
        _td_writer,
        _td_stored,
        lambda tensors: "none fixed (megatron-core loads torch_dist under any TP/PP)",
        megatron=True,
        saved_state=_td_state,
        files_per_tensor=False,
        reads_optimizer=True,
        writes_optimizer=True,
        experts=True,
    ),
    "hf": Format(
        "hf",
        "Hugging Face config.json + *.safetensors",
        _hf_detect,
        _hf_open,
        _hf_writer,
        _hf_stored,
        _hf_layout,
        iteration_dirs=False,
        experts=True,  # Mixtral
    ),
    "legacy": Format(
        "legacy",
        "Megatron legacy mp_rank_* directories",
        _legacy_detect,
        _legacy_open,
        _legacy_writer,
        _legacy_stored,
        lambda tensors: "TP x PP rank files",
        cut_by_rank=True,
        megatron=True,
        saved_state=_legacy_state,
        reads_optimizer=True,  # Megatron-LM's (megatron_optim)
        writes_optimizer=True,  # a Megatron-LM run's plain optimizer (megatron_optim.plain_optimizer_entry)
        experts=True,
    ),
}


def get(name: str, flag: str = "--to") -> Format:
    if name not in FORMATS:
        raise UserError(f"{flag} {name}: unknown format; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_experts(cfg: ModelConfig, name: str, doing: str) -> None:
    """Mixtures of experts only where a format's reader and writer know their tensors."""
    if cfg.is_moe and not get(name).experts:
        able = ", ".join(f.name for f in FORMATS.values() if f.experts)
        raise NotBuiltError(
            f"{doing} a mixture of experts ({cfg.num_experts} experts) in {name} checkpoints is not built yet; "
            f"use {able}"
        )


def detect_format(directory: Path) -> str:
    for fmt in FORMATS.values():
        if fmt.detect(directory):
            return fmt.name
    found = ", ".join(f.looks_for for f in FORMATS.values())
    raise UserError(f"{directory}: not a recognised checkpoint (expected one of: {found})")


def make_writer(
    name: str,
    target: ModelConfig,
    dtype: torch.dtype,
    reader: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    iteration: int = 0,
    new_stage: bool = False,
    norm_names: str | None = None,
    shard_bytes: int | None = None,
    optimizer_states: tuple[str, ...] = (),
    ep: int = 1,
    resume_state: dict[str, Any] | None = None,
) -> Writer:
    """The ``name`` writer for ``target``. Megatron outputs carry ``reader``'s Megatron-LM args with the new
    shape, layout and dtype (``new_stage``: the counters of a new training stage), or fresh args."""
    from megastack.ckpt import megatron_args

    fmt = get(name)
    check_experts(target, name, "writing")
    args, te_names = None, True
    if fmt.megatron:
        layout = (tp, pp) if fmt.cut_by_rank else (None, None)
        args, te_names = megatron_args.for_output(
            reader,
            target,
            *layout,
            dtype,
            iteration=iteration,
            new_stage=new_stage,
            norm_names=norm_names,
            ep=ep if fmt.cut_by_rank else None,
        )
    if optimizer_states and not fmt.writes_optimizer:
        raise NotBuiltError(
            f"writing Adam's state in {name} checkpoints is not built yet; write torch_dist (grow --to torch_dist)"
        )
    options = WriteOptions(
        tp=tp,
        pp=pp,
        ep=ep,
        iteration=iteration,
        args=args,
        te_names=te_names,
        shard_bytes=shard_bytes,
        optimizer_states=tuple(optimizer_states),
        resume_state=resume_state,
        layer_order=getattr(reader, "layer_order", None) if optimizer_states else None,
    )
    return fmt.writer(target, dtype, options)


def check_norm_names(to: str, target: ModelConfig, norm_names: str | None) -> None:
    """``--norm-names`` names legacy output's norms, and a mixture of experts' norm in torch_dist (the one
    torch_dist key Megatron-LM's local and Transformer Engine specs save differently)."""
    if norm_names is not None and to != "legacy" and not (to == "torch_dist" and target.is_moe):
        raise UserError(
            f"--norm-names applies to legacy output and to a mixture of experts in torch_dist; {to} output of "
            "this model has one naming"
        )


def check_layout(
    cfg: ModelConfig, to: str, tp: int | None, pp: int | None, ep: int | None = None
) -> tuple[int, int, int]:
    """The output TP/PP/EP (EP: legacy rank files of a mixture of experts), refused in one line when it cannot
    cut this model."""
    if (ep or 1) != 1:
        if not get(to).cut_by_rank:
            raise UserError(f"--ep applies to legacy output only; a {to} checkpoint loads under any expert parallelism")
        for _, problem in ParallelConfig(expert=ep).check_model(cfg):
            raise UserError(f"--ep {ep}: {problem.split(' ', 1)[1]}")
    ep = ep or 1
    if not get(to).cut_by_rank:
        if (tp or 1) != 1 or (pp or 1) != 1:
            raise UserError(
                f"--tp/--pp apply to legacy output only; a {to} checkpoint is not cut by rank "
                "(torch_dist loads under any TP/PP)"
            )
        return 1, 1, ep
    tp, pp = tp or 1, pp or 1
    if tp < 1 or pp < 1:
        raise UserError(f"--tp {tp} --pp {pp}: both must be positive")
    for field_name, problem in ParallelConfig(tensor=tp, pipeline=pp).check_model(cfg):
        flag, value = ("--tp", tp) if field_name == "tensor" else ("--pp", pp)
        raise UserError(f"{flag} {value}: {problem.split(' ', 1)[1]}; choose a {flag} that divides it")
    return tp, pp, ep

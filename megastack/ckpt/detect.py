"""Open any supported checkpoint directory as a Reader, telling the format from what is on disk."""

from __future__ import annotations

import os
from pathlib import Path

from megastack.ckpt.base import Reader
from megastack.ckpt.manifest import read_manifest, resolve_iteration_dir
from megastack.config import ModelConfig, from_dict
from megastack.errors import UserError


def detect_format(directory: Path) -> str:
    from megastack.ckpt import legacy, torch_dist

    if torch_dist.is_torch_dist(directory):
        return "torch_dist"
    if (directory / "config.json").is_file() and (
        any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file()
    ):
        return "hf"
    if legacy.is_legacy(directory):
        return "legacy"
    raise UserError(
        f"{directory}: not a recognised checkpoint (expected torch_dist metadata.json + .metadata, "
        "Megatron legacy mp_rank_* directories, or Hugging Face config.json + *.safetensors)"
    )


def model_from_manifest(directory: Path) -> ModelConfig | None:
    manifest = read_manifest(directory)
    if manifest and isinstance(manifest.get("model"), dict):
        return from_dict(ModelConfig, manifest["model"], where=str(directory / "megastack.json"), path="model")
    return None


def _torch_dist_config(directory: Path) -> ModelConfig:
    """Architecture of a torch_dist checkpoint: megastack.json, else Megatron-LM's args in common.pt."""
    cfg = model_from_manifest(directory)
    if cfg is not None:
        return cfg
    from megastack.ckpt.megatron_args import model_config
    from megastack.ckpt.torch_dist import read_common

    return model_config(read_common(directory).get("args"), str(directory / "common.pt"))


def open_checkpoint(path: str | os.PathLike, model: ModelConfig | None = None, check_files: bool = True) -> Reader:
    """A Reader for ``path`` (a checkpoint root with a tracker file, an iter_* directory, or an HF dir).

    ``check_files=False`` opens a torch_dist checkpoint from its metadata alone (dry runs)."""
    directory = resolve_iteration_dir(path)
    fmt = detect_format(directory)
    if fmt == "torch_dist":
        from megastack.ckpt.torch_dist import TorchDistReader

        return TorchDistReader(directory, model or _torch_dist_config(directory), check_files=check_files)
    if fmt == "legacy":
        from megastack.ckpt.legacy import LegacyReader

        return LegacyReader(directory, model or model_from_manifest(directory))
    from megastack.ckpt.hf import HFReader

    return HFReader(directory, model)

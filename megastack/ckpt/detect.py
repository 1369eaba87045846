"""Open any supported checkpoint directory as a Reader, telling the format from what is on disk."""

from __future__ import annotations

import os

from megastack.ckpt import formats
from megastack.ckpt.base import Reader
from megastack.ckpt.manifest import resolve_iteration_dir
from megastack.config import ModelConfig


def open_checkpoint(path: str | os.PathLike, model: ModelConfig | None = None, check_files: bool = True) -> Reader:
    """A Reader for ``path`` (a checkpoint root with a tracker file, an iter_* directory, or an HF dir).

    ``check_files=False`` opens a torch_dist checkpoint from its metadata alone (dry runs)."""
    directory = resolve_iteration_dir(path)
    return formats.FORMATS[formats.detect_format(directory)].open(directory, model, check_files)

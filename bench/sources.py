"""The benches' stand-in for a downloaded Hugging Face checkpoint, shared by convert.py and mergekit_peer.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megastack import layout
from megastack.ckpt.execute import Comm, execute
from megastack.ckpt.hf import HFWriter
from megastack.config import ModelConfig
from megastack.layout import pieces_shape
from megastack.plan import seeded_normal


def write_hf_download(path: Path, cfg: ModelConfig) -> None:
    """``cfg``'s shape as bf16 safetensors: N(0, 0.02) matrices, unit norms, each piece produced on its own
    (seeded, so any piece equals the same rows of the whole); no megastack.json, as a plain download."""

    def produce(name: str, pieces: Any) -> torch.Tensor:
        shape = layout.logical_shape(cfg, name)
        if len(shape) == 1:
            return torch.ones(pieces_shape(shape, pieces), dtype=torch.bfloat16)
        return (seeded_normal(shape, 0, name, pieces) * 0.02).to(torch.bfloat16)  # only the pieces asked for

    execute(HFWriter(cfg, torch.bfloat16), produce, path, Comm(), {"format": "hf"}, iteration=None)
    (path / "megastack.json").unlink()  # a download has none (and no cheap source checksum)

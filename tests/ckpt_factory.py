"""Test checkpoints made from the plain-PyTorch reference model through megastack's own writers."""

from __future__ import annotations

from pathlib import Path

import torch

from megastack import layout
from megastack.ckpt.execute import Comm, execute
from megastack.ckpt.legacy import LegacyWriter
from megastack.ckpt.torch_dist import TorchDistWriter
from megastack.config import ModelConfig, to_dict
from megastack.layout import take_pieces
from megastack.model.reference import ReferenceLlama


def small_config(**overrides) -> ModelConfig:
    base = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        vocab_size=256,
        seq_length=16,
    )
    return ModelConfig(**{**base, **overrides})


def reference(cfg: ModelConfig, seed: int = 3) -> ReferenceLlama:
    return ReferenceLlama(cfg).init_weights(seed=seed).eval()


def logical_of(model: ReferenceLlama) -> dict[str, torch.Tensor]:
    return layout.logical_from_hf(model.state_dict(), model.cfg)


def write_checkpoint(
    model: ReferenceLlama,
    dst: str | Path,
    fmt: str = "torch_dist",
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A torch_dist or legacy checkpoint root (tracker + iter_0000000) holding ``model``'s weights."""
    cfg = model.cfg
    tensors = logical_of(model)
    writer = TorchDistWriter(cfg, dtype) if fmt == "torch_dist" else LegacyWriter(cfg, tp, pp, dtype)
    manifest = {"format": fmt, "model": to_dict(cfg), "iteration": 0, "history": [{"event": "test"}]}
    return execute(writer, lambda name, pieces: take_pieces(tensors[name], pieces), dst, Comm(), manifest)


def logits(model: ReferenceLlama, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def sample_tokens(cfg: ModelConfig, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=torch.Generator().manual_seed(11))

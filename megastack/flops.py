"""Model FLOPs: what a stage costs, the same way for the small model, the grown one and scratch.

Per trained token (forward + backward = 3 x forward, every matmul 2 FLOPs per multiply-add):
    6 * N                  N = transformer-block parameters + the output layer (the embedding lookup is
                           not a matmul); Kaplan et al.'s 6ND with the LM head counted; in a mixture of
                           experts the parameters a token uses: its top-k experts and the router
    + 12 * L * s * d_attn  attention scores and weighted values (QK^T and AV: 2 x 2 s d_attn per layer,
                           forward), no causal discount, as in Megatron-LM's and PaLM's accounting
MFU = achieved model FLOPs/s / (devices x peak FLOPs/s per device). Recomputation is not counted.
"""

from __future__ import annotations

import torch

from megastack.config import ModelConfig

# Dense bf16 peak per device (vendor data sheets), matched by substring of torch.cuda.get_device_name().
KNOWN_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def flops_per_token(cfg: ModelConfig) -> float:
    matmul_params = cfg.non_embedding_parameters(active=True) + cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * cfg.seq_length * cfg.num_attention_heads * cfg.head_dim
    return float(6 * matmul_params + attention)


def flops_per_iteration(cfg: ModelConfig, global_batch: int) -> float:
    return flops_per_token(cfg) * global_batch * cfg.seq_length


def peak_flops(configured: float | None) -> float | None:
    """Peak FLOPs/s of one device: the configured value, else a known GPU's, else None (no MFU)."""
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in KNOWN_PEAKS.items():
            if key in name:
                return value
    return None


def mfu(flops_per_second: float, devices: int, peak: float | None) -> float | None:
    return None if not peak else flops_per_second / (devices * peak)

"""Forward passes through megatron-core's pipeline schedules (any TP/PP), for evaluation and tests."""

from __future__ import annotations

import torch

from megastack.compat import cpu


def causal_positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int | None = None):
    """Full-vocab logits [batch, seq, vocab] on the last pipeline stage, None on the others.

    Every rank passes the same ``tokens``; the batch is split into micro-batches and run through
    megatron-core's forward-only schedule, and the TP-split logits are gathered over the TP group.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    micro = micro_batch_size or batch
    chunks = list(tokens.split(micro))

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb, causal_positions(mb), attention_mask=None)

        def collect(output):
            logits = gather_from_tensor_model_parallel_region(output)
            return output.sum() * 0.0, {"logits": logits.detach()}

        return out, collect

    was_training = model.training
    model.eval()
    with torch.no_grad(), cpu.device_mode():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(chunks),
            model=model,
            num_microbatches=len(chunks),
            seq_length=seq,
            micro_batch_size=micro,
            forward_only=True,
        )
    model.train(was_training)
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat([r["logits"] for r in results], dim=0)

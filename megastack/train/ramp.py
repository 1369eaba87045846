"""G_random's ramp: what growth added enters training scaled by c = min(1, step / N) (MSG style).

Depth: a new block's attention and MLP outputs are scaled by c (``y = x + c * MHA(RMSNorm(x))``), so at c = 0
each new block is the identity. Width (``growth.width.masks``, docs/checkpoints.md): the effective weight is
W * M(c), M being c on each listed slice of a logical tensor (c^2 where a row and a column slice cross). For
``y = W x`` that is the same as scaling the listed input features and output features by c, which is what
the hooks do, on the activations, so no weight is ever rewritten and the optimizer sees the true gradient
``M * dL/dW_eff``:

    embedding, dim 1      new hidden channels of the embedding output
    layers.*.proj, dim 0  new hidden channels of the attention output (rows of linear_proj)
    layers.*.proj, dim 1  new heads' outputs entering linear_proj (its columns: TP-cut, local slice)
    layers.*.fc2, dim 0   new hidden channels of the MLP output (rows of linear_fc2)
    layers.*.fc2, dim 1   new FFN activations entering linear_fc2 (its columns: TP-cut, local slice)

At c = 0 the grown model computes exactly the small model; from c = 1 on the hooks do nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from megastack.config import ModelConfig
from megastack.errors import UserError

# (tensor, dim) -> where the hook scales the activation's last dim
WIDTH_POINTS = {
    ("embedding", 1): "embedding output",
    ("layers.*.proj", 0): "attention output",
    ("layers.*.proj", 1): "linear_proj input",
    ("layers.*.fc2", 0): "mlp output",
    ("layers.*.fc2", 1): "linear_fc2 input",
}


def local_mask(cfg: ModelConfig, spec: dict[str, Any], tp_rank: int, tp_size: int) -> torch.Tensor:
    """The bool vector of positions to scale, over this TP rank's slice of the activation's last dim."""
    from megastack import layout

    key = (spec.get("tensor"), spec.get("dim"))
    if key not in WIDTH_POINTS:
        raise UserError(
            f"growth.width.masks: unknown mask {key[0]!r} dim {key[1]!r} in the checkpoint's "
            f"megastack.json (known: {sorted(WIDTH_POINTS)}); was it written by a newer megastack?"
        )
    tensor, dim = key
    name = tensor.replace("*", "0")
    shape = layout.logical_shape(cfg, name)
    size = shape[dim]
    mask = torch.zeros(size, dtype=torch.bool)
    for start, stop in spec.get("ranges", []):
        if not 0 <= start <= stop <= size:
            raise UserError(
                f"growth.width.masks: range [{start}, {stop}) of {tensor} dim {dim} is outside "
                f"0..{size} for this model; the checkpoint's megastack.json does not match it"
            )
        mask[start:stop] = True
    # a dim the weight is TP-cut along (proj / fc2 columns) is cut the same way in the activation it reads
    piece = layout.tp_pieces(layout.split_name(name)[1], shape, tp_rank, tp_size)[0]
    return mask.narrow(0, piece.start, piece.length) if piece.dim == dim else mask


class MaskRamp:
    """Forward hooks on this rank's part of the model (its pipeline stage, its TP slice) that scale what
    growth added by c; ``set_step`` moves c, ``remove`` takes the hooks off."""

    def __init__(
        self,
        module: torch.nn.Module,
        cfg: ModelConfig,
        new_layers: list[int],
        width_masks: list[dict[str, Any]],
        steps: int,
    ):
        from megatron.core import parallel_state as ps

        from megastack import layout

        self.steps, self.scale, self.handles = steps, 1.0, []
        here = layout.stage_layers(
            cfg.num_layers, ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        )
        layers = module.decoder.layers
        local = [layers[i - here.start] for i in here]
        new = [layers[i - here.start] for i in new_layers if i in here]
        for block in new:
            for sub in (block.self_attention, block.mlp):
                self.handles.append(sub.register_forward_hook(self._output_hook(None)))

        tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        for spec in width_masks:
            mask = local_mask(cfg, spec, tp_rank, tp_size)
            if not mask.any():
                continue
            where = WIDTH_POINTS[(spec["tensor"], spec["dim"])]
            if where == "embedding output":
                targets = [module.embedding] if getattr(module, "pre_process", False) else []
            else:
                targets = [
                    {
                        "attention output": b.self_attention,
                        "mlp output": b.mlp,
                        "linear_proj input": b.self_attention.linear_proj,
                        "linear_fc2 input": b.mlp.linear_fc2,
                    }[where]
                    for b in local
                ]
            for target in targets:
                if where.endswith("input"):
                    hook = self._input_hook(mask)
                    self.handles.append(target.register_forward_pre_hook(hook))
                else:
                    self.handles.append(target.register_forward_hook(self._output_hook(mask)))

    def _factor(self, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
        """c on the masked positions, 1 elsewhere; c everywhere without a mask (a whole new block)."""
        if mask is None:
            return self.scale
        factor = torch.ones(mask.shape, dtype=like.dtype, device=like.device)
        return factor.masked_fill_(mask.to(like.device), self.scale)

    def _output_hook(self, mask: torch.Tensor | None):
        def hook(module, inputs, output):
            if self.scale == 1.0:
                return output
            if isinstance(output, tuple):
                return (output[0] * self._factor(mask, output[0]), *output[1:])
            return output * self._factor(mask, output)

        return hook

    def _input_hook(self, mask: torch.Tensor):
        def hook(module, inputs):
            if self.scale == 1.0:
                return None
            return (inputs[0] * self._factor(mask, inputs[0]), *inputs[1:])

        return hook

    def set_step(self, step: int) -> None:
        self.scale = 1.0 if self.steps <= 0 else min(1.0, step / self.steps)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

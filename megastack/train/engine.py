"""DeepSpeed's engine around megatron-core's GPTModel, and one optimizer step through megatron's schedules.

How the two fit together:
- megatron-core owns the model and the layout: tensor parallelism inside the layers, pipeline
  parallelism through ``get_forward_backward_func`` (1F1B over micro-batches, p2p between stages).
- DeepSpeed owns data parallelism and the optimizer: ZeRO 1/2/3 partitions of the fp32 master
  weights, Adam moments and gradients, gradient clipping, mixed precision. It sees megatron's
  ``parallel_state`` through ``MegatronMPU`` (its ``mpu`` argument), so it reduces over the DP group only
  and computes the clipping norm over the TP x PP group once per parameter. At ZeRO-0 (plain data
  parallelism, fp32) the step reduces and clips itself and DeepSpeed only updates.
- Gradient accumulation belongs to megatron's schedule (it divides each micro-batch loss by the number
  of micro-batches). DeepSpeed runs with ``managed_gradient_accumulation: false`` and sees a single
  "micro-batch" per step: backward passes only accumulate, ``engine.step()`` reduces and updates.
- The forward goes through the engine (``engine(...)``) so that DeepSpeed's torch-style backward hooks
  (ZeRO-2 gradient partitioning, ZeRO-3 parameter gathering) run inside megatron's backward calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from megastack.compat import cpu
from megastack.config import ModelConfig, ParallelConfig
from megastack.errors import NotBuiltError, UserError
from megastack.train.config import OptimizerConfig


class MegatronMPU:
    """megatron-core's parallel_state in the shape of DeepSpeed's ``mpu``.

    ``model_parallel`` is the TP x PP group (the clipping norm sums over it; checkpoint files are named by
    the rank in it); ``tensor_model_parallel`` is what DeepSpeed uses to count replicated parameters
    (norm weights) once."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(group=self.ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(group=self.ps.get_model_parallel_group())

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()


# ----------------------------------------------------------------------------- learning rate


def learning_rate(step: int, opt: OptimizerConfig, total_iters: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup to ``lr``, cosine to ``min_lr_fraction x lr``."""
    if opt.warmup_iters and step < opt.warmup_iters:
        return opt.lr * (step + 1) / opt.warmup_iters
    decay = opt.decay_iters if opt.decay_iters is not None else max(total_iters - opt.warmup_iters, 0)
    floor = opt.lr * opt.min_lr_fraction
    if decay <= 0:
        return opt.lr
    progress = min(1.0, (step - opt.warmup_iters) / decay)
    return floor + 0.5 * (opt.lr - floor) * (1.0 + math.cos(math.pi * progress))


def is_decayed(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay on matrices (linear layers, embedding, output layer), not on norm weights."""
    return param.dim() > 1


def param_groups(model: torch.nn.Module, opt: OptimizerConfig) -> list[dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and is_decayed(n, p)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not is_decayed(n, p)]
    return [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.Optimizer:
    """torch's AdamW (fused kernel on GPU): no hidden JIT builds, the same update as the reference loop."""
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(
        param_groups(model, opt),
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        fused=fused,
        foreach=False if not fused else None,
    )


# ----------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(parallel: ParallelConfig, opt: OptimizerConfig, dp: int, micro_batches: int) -> dict[str, Any]:
    """The DeepSpeed config of one stage. DeepSpeed sees one micro-batch of micro x accumulation samples
    per step because megatron's schedule does the accumulation."""
    per_rank = parallel.micro_batch_size * micro_batches
    zero: dict[str, Any] = {
        "stage": parallel.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if parallel.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=50_000_000)
    config: dict[str, Any] = {
        "train_batch_size": per_rank * dp,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": opt.clip_grad if parallel.zero_stage > 0 else 0.0,  # ZeRO-0: the Stepper clips
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": parallel.precision == "bf16"},
        "fp16": {"enabled": parallel.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if parallel.precision == "bf16":
        # DP-only layouts accumulate bf16 gradients in fp32 (DeepSpeed's BF16 optimizer at ZeRO-1). Under
        # pipeline parallelism that optimizer misses the first stage's gradients (its backward hooks see only
        # the hidden-state output), so there the ZeRO optimizer takes the bf16 gradients as they are.
        config["data_types"] = {"grad_accum_dtype": "bf16" if parallel.pipeline > 1 else "fp32"}
    return config


def check_layout(parallel: ParallelConfig, model: ModelConfig) -> None:
    if parallel.zero_stage == 0 and parallel.precision != "fp32":
        raise NotBuiltError(
            f"parallel.zero_stage 0 with precision {parallel.precision} is not built in the trainer yet (DeepSpeed "
            "keeps the fp32 master weights of mixed precision without ZeRO in flat buffers megastack does not "
            "read); use zero_stage 1 (the same update, with the optimizer state partitioned) or precision fp32"
        )
    if parallel.pipeline > 1 and parallel.zero_stage > 1:
        raise UserError(
            f"parallel.zero_stage {parallel.zero_stage} cannot be combined with pipeline parallelism "
            f"({parallel.pipeline} stages): ZeRO-2/3 partition gradients during backward, which the "
            "pipeline schedule interleaves across micro-batches; use zero_stage 1 with pipeline > 1 "
            "(as Megatron-DeepSpeed does)"
        )
    if model.is_moe and parallel.tensor > 1:
        raise NotBuiltError(
            f"parallel.tensor {parallel.tensor} with a mixture of experts is not built in the trainer yet "
            "(megatron-core trains MoE layers under TP only with sequence parallelism, which megastack does not "
            "enable yet); train it with pipeline or data parallelism (it loads under any TP)"
        )
    if parallel.expert > 1:
        raise NotBuiltError(
            f"parallel.expert {parallel.expert}: expert parallelism is not built in the trainer yet (DeepSpeed's "
            "ZeRO would average different experts' gradients over the data-parallel group); train with "
            "parallel.expert 1 (every rank holds every expert; megatron-core loads the checkpoint under any EP)"
        )
    if parallel.precision == "fp16" and parallel.pipeline > 1:
        raise NotBuiltError(
            "precision fp16 with pipeline parallelism is not built in the trainer yet (DeepSpeed's "
            "loss scaler expects every stage's backward to be scaled); use bf16"
        )


def shared_embedding_weight(model: torch.nn.Module, parallel: ParallelConfig) -> torch.nn.Parameter | None:
    """This rank's copy of a word embedding tied to the output layer on another pipeline stage (the first
    and the last stage each hold one, megatron-core keeps them equal). Its gradient is summed over the
    embedding group every step, as megatron-core's ``finalize_model_grads`` does, and the last stage's
    copy is marked replicated so DeepSpeed's gradient norm counts the weight once."""
    from megatron.core import parallel_state as ps

    if not (getattr(model, "share_embeddings_and_output_weights", False) and parallel.pipeline > 1):
        return None
    if not ps.is_rank_in_embedding_group():
        return None
    weight = model.shared_embedding_or_output_weight()
    if not ps.is_pipeline_first_stage():
        weight.ds_pipe_replicated = True  # deepspeed.runtime.constants.PIPE_REPLICATED
    return weight


def clip_over_model_parallel(module: torch.nn.Module, max_norm: float) -> float:
    """Clip this rank's gradients to a global L2 norm of ``max_norm`` (0: no clipping); the norm.

    As megatron-core's optimizer does: every gradient counted once over the TP x PP group (a replicated
    norm weight on TP rank 0 only, a tied embedding on its first stage only), squares summed over that
    group. Called after the data-parallel all-reduce, so every DP replica computes the same norm."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    params = [p for p in module.parameters() if p.grad is not None]
    counted = [
        p.grad
        for p in params
        if tensor_parallel.param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "ds_pipe_replicated", False)
    ]
    squares = torch.zeros((), dtype=torch.float32, device=params[0].grad.device if params else None)
    for grad in counted:
        squares += grad.detach().float().pow(2).sum()
    torch.distributed.all_reduce(squares, group=ps.get_model_parallel_group())
    norm = squares.sqrt().item()
    coefficient = max_norm / (norm + 1e-6)
    if max_norm > 0 and coefficient < 1.0:
        for p in params:
            p.grad.detach().mul_(coefficient)
    return norm


def initialize(model: torch.nn.Module, parallel: ParallelConfig, opt: OptimizerConfig, micro_batches: int):
    """Wrap a megatron-core model in a DeepSpeed engine over megatron's parallel_state."""
    cpu.prepare_deepspeed()
    import deepspeed
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    optimizer = make_optimizer(model, opt)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, mpu=MegatronMPU(), config=deepspeed_config(parallel, opt, dp, micro_batches)
    )
    guard_checkpoint_loads(engine)
    return engine


def guard_checkpoint_loads(engine: Any) -> None:
    """DeepSpeed's checkpoint engine loads its files with ``torch.load(weights_only=False)``: a pickle
    planted in ``engine/*optim_states.pt`` would run on resume. Every load goes through ``load_pt``
    instead (weights_only, with DeepSpeed's few data classes allowed)."""
    from megastack.ckpt.safe_load import allow_deepspeed_globals, load_pt

    allow_deepspeed_globals()

    def load(path: str, map_location: Any = None) -> Any:
        return load_pt(path)

    engine.checkpoint_engine.load = load


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- one step


@dataclass
class Batch:
    """One micro-batch on this rank."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    @staticmethod
    def of(items: dict[str, torch.Tensor], device: torch.device) -> Batch:
        return Batch(items["tokens"].to(device), items["labels"].to(device), items["loss_mask"].to(device).float())


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and data-parallel ranks of each micro-batch's token-mean loss
    grad_norm: float | None
    lr: float


@dataclass
class Stepper:
    """Runs forward/backward over a step's micro-batches with megatron's schedule, then DeepSpeed's step."""

    engine: Any
    parallel: ParallelConfig
    seq_length: int
    device: torch.device
    clip_grad: float  # the global gradient-norm clip (ZeRO-0 clips in the step; DeepSpeed does otherwise)
    call: Callable[..., torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        # forward through the engine: DeepSpeed's backward hooks run under megatron's backward calls. ZeRO-0
        # has no such hooks (DeepSpeed 0.19 refuses a backward it did not start): the module is called
        # directly and the step all-reduces the gradients first (plain data parallelism).
        self.call = self.engine.module if self.parallel.zero_stage == 0 else self.engine
        if self.parallel.zero_stage == 0:
            # DeepSpeed clips ZeRO-0's gradients with a norm that skips later pipeline stages (it counts a
            # parameter only on model-parallel rank 0 unless it is tensor-parallel): the step reduces and
            # clips them itself (clip_over_model_parallel), and DeepSpeed's step only updates.
            self.engine.enable_backward_allreduce = False
        # Tied embeddings across stages: DeepSpeed must not reduce gradients while megatron's schedule runs
        # (its per-backward reduction would move them into its buffers before the two stages' copies are
        # summed): backward runs under no_sync, and DeepSpeed's step reduces them after the embedding group's
        # sum. Every rank decides alike.
        self.ties_stages = self.parallel.pipeline > 1 and getattr(
            self.module, "share_embeddings_and_output_weights", False
        )
        self.shared_embedding = shared_embedding_weight(self.module, self.parallel)
        if self.parallel.precision == "fp16":
            # megatron's schedule scales the last stage's loss before backward; DeepSpeed's dynamic loss scale
            engine = self.engine
            self.module.config.grad_scale_func = lambda t: engine.scale(t) if t.grad_fn is not None else t

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _forward_step(self, data_iterator, model):
        batch: Batch = next(data_iterator)
        positions = torch.arange(batch.tokens.shape[1], device=self.device).unsqueeze(0).expand_as(batch.tokens)
        output = self.call(batch.tokens, positions, None, labels=batch.labels)

        def loss_func(per_token: torch.Tensor):
            loss = masked_mean(per_token, batch.loss_mask)
            return loss, {"loss": loss.detach().clone()}  # megatron divides the returned loss in place

        return output, loss_func

    def _run(self, batches: list[Batch], forward_only: bool) -> torch.Tensor:
        """Sum of this rank's micro-batch losses (zero off the last pipeline stage)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        with cpu.device_mode():
            results = get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=iter(batches),
                model=self.module,
                num_microbatches=len(batches),
                seq_length=self.seq_length,
                micro_batch_size=self.parallel.micro_batch_size,
                forward_only=forward_only,
            )
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        if ps.is_pipeline_last_stage():
            for r in results:
                total += r["loss"].float()
        return total

    def mean_over_ranks(self, local_sum: torch.Tensor, micro_batches: int) -> float:
        """Average of the micro-batch losses over every DP rank (last-stage TP ranks hold equal copies)."""
        from megatron.core import parallel_state as ps

        value = local_sum.detach().clone()
        torch.distributed.all_reduce(value)
        copies = ps.get_data_parallel_world_size() * ps.get_tensor_model_parallel_world_size()
        return value.item() / (copies * micro_batches)

    def train_step(self, batches: list[Batch], lr: float) -> StepResult:
        self.module.train()
        set_lr(self.engine, lr)
        with self.engine.no_sync() if self.ties_stages else contextlib.nullcontext():
            local = self._run(batches, forward_only=False)
        if self.shared_embedding is not None:
            from megatron.core import parallel_state as ps

            torch.distributed.all_reduce(self.shared_embedding.grad, group=ps.get_embedding_group())
        norm = None
        if self.parallel.zero_stage == 0:  # the data-parallel mean first, then the norm of the reduced gradients
            self.engine.buffered_allreduce_fallback()
            norm = clip_over_model_parallel(self.module, self.clip_grad)
        self.engine.step()  # reduces the gradients itself at ZeRO-1 (after no_sync too), ZeRO-2/3 as they go
        norm = self.engine.get_global_grad_norm() if norm is None else norm
        norm_value = float(norm.item() if isinstance(norm, torch.Tensor) else norm) if norm is not None else None
        return StepResult(self.mean_over_ranks(local, len(batches)), norm_value, lr)

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        self.module.eval()
        local = self._run(batches, forward_only=True)
        self.module.train()
        return self.mean_over_ranks(local, len(batches))

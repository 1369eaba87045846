"""Model config -> megatron-core GPTModel under the current parallel_state.

On GPU with Transformer Engine installed the layer spec is TE's (fused norm+linear, fused attention)
and megatron's fused kernels are switched on where their prerequisites hold. On CPU the local spec
runs in fp32 or bf16 with every fusion off, after ``compat.cpu.apply()``. ``select_kernels`` is a pure
function of what the machine has, so the GPU selection logic is tested on CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from megastack.compat import cpu
from megastack.config import DType, ModelConfig, ParallelConfig
from megastack.errors import UserError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Kernels:
    """Which implementation and fusions a model is built with."""

    spec: Literal["transformer_engine", "local"]
    apply_rope_fusion: bool
    bias_activation_fusion: bool  # fused SwiGLU
    masked_softmax_fusion: bool
    gradient_accumulation_fusion: bool


@dataclass(frozen=True)
class Machine:
    """What the process can use; ``Machine.detect()`` reads it, tests construct it by hand."""

    cuda: bool
    transformer_engine: bool
    apex: bool

    @staticmethod
    def detect() -> Machine:
        def has(module: str) -> bool:
            return importlib.util.find_spec(module) is not None

        return Machine(cuda=torch.cuda.is_available(), transformer_engine=has("transformer_engine"), apex=has("apex"))


def select_kernels(machine: Machine, *, main_grad_buffers: bool = False) -> Kernels:
    """Fastest implementation the machine supports.

    Gradient-accumulation fusion writes weight gradients straight into ``param.main_grad``, a buffer
    that megatron's own DDP allocates; DeepSpeed's engine does not, so it stays off unless the caller
    says those buffers exist.
    """
    if not machine.cuda:
        return Kernels("local", False, False, False, False)
    te = machine.transformer_engine
    return Kernels(
        spec="transformer_engine" if te else "local",
        apply_rope_fusion=te,  # megatron's fused RoPE comes from TE
        bias_activation_fusion=True,  # megatron's jit-fused SwiGLU needs only CUDA
        masked_softmax_fusion=te or machine.apex,
        gradient_accumulation_fusion=main_grad_buffers and (te or machine.apex),
    )


def check_precision(precision: DType, machine: Machine) -> None:
    if precision == "fp16" and not machine.cuda:
        raise UserError(
            "precision fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32 in parallel.precision"
        )


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, kernels: Kernels, machine: Machine):
    """The megatron-core TransformerConfig of a Llama-style model."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = TORCH_DTYPES[parallel.precision]
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        sequence_parallel=False,
        use_cpu_initialization=not machine.cuda,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=parallel.precision == "bf16",
        fp16=parallel.precision == "fp16",
        apply_rope_fusion=kernels.apply_rope_fusion,
        bias_activation_fusion=kernels.bias_activation_fusion,
        masked_softmax_fusion=kernels.masked_softmax_fusion,
        gradient_accumulation_fusion=kernels.gradient_accumulation_fusion,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        **moe_config(cfg, parallel, machine),
    )


def moe_config(cfg: ModelConfig, parallel: ParallelConfig, machine: Machine) -> dict:
    """megatron-core's MoE fields: dropless top-k softmax routing (upcycled copies then compute the dense
    model's function) and the load-balancing aux loss. The all-to-all token dispatcher needs CUDA streams;
    on CPU the all-gather one does the same routing."""
    if not cfg.is_moe:
        return {}
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.moe_topk,
        moe_ffn_hidden_size=cfg.expert_ffn_size,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_router_pre_softmax=False,
        moe_token_dispatcher_type="alltoall" if machine.cuda else "allgather",
        moe_grouped_gemm=False,
        expert_model_parallel_size=parallel.expert,
    )


def layer_spec(kernels: Kernels, cfg: ModelConfig | None = None):
    from megatron.core.models.gpt import gpt_layer_specs

    experts = cfg.num_experts if cfg is not None and cfg.is_moe else None
    if kernels.spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=experts)
    return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm")


# The local spec saves a MoE layer's norm under the name TE gives a dense layer's fused norm; TE's MoE spec
# (what Megatron-LM runs on GPUs) saves it as pre_mlp_layernorm. megastack's torch_dist files use TE's.
_LOCAL_MOE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
_TE_MOE_NORM = "decoder.layers.pre_mlp_layernorm.weight"


def checkpoint_state(model, cfg: ModelConfig) -> dict:
    """The model's sharded state dict under the torch_dist names megastack reads and writes (the same on
    CPU and GPU): megatron-core's own, with a local-spec MoE norm renamed as TE's MoE spec names it."""
    state = model.sharded_state_dict()
    if cfg.is_moe:
        for entry in state.values():
            if getattr(entry, "key", None) == _LOCAL_MOE_NORM:
                entry.key = _TE_MOE_NORM
    return state


def build_model(
    cfg: ModelConfig, parallel: ParallelConfig, *, machine: Machine | None = None, main_grad_buffers: bool = False
):
    """A megatron-core GPTModel for this rank's tensor/pipeline position (parallel_state must be set up)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    machine = machine or Machine.detect()
    check_precision(parallel.precision, machine)
    cpu.apply()
    if (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
    ) != (parallel.tensor, parallel.pipeline, parallel.expert):
        raise RuntimeError("parallel_state was initialised with a different TP/PP/EP than the config")
    kernels = select_kernels(machine, main_grad_buffers=main_grad_buffers)
    if cfg.is_moe:
        cpu.moe_without_te()
    spec = layer_spec(kernels, cfg)
    rotary_base = int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base
    with cpu.device_mode():
        model = GPTModel(
            config=transformer_config(cfg, parallel, kernels, machine),
            transformer_layer_spec=spec,
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=rotary_base,
        )
    if machine.cuda:
        model = model.cuda(torch.cuda.current_device())
    return model

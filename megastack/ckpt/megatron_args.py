"""Megatron-LM's ``args`` as data: every field megastack reads or writes, under its names across releases.

Megatron-LM pickles its whole argparse Namespace into every checkpoint (legacy ``model_optim_rng.pt``,
torch_dist ``common.pt``), and its loader rebuilds the model from it: a field megastack misreads is a
different model, a field it forgets is Megatron's default. So the fields are one table (``FIELDS``,
also in docs/checkpoints.md), read by their current name first (``layernorm_epsilon`` since core 0.16,
``norm_epsilon`` before) and written under every name. Output args start from the source's own and
change only what the operation changed (``output_args``).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any

import torch

from megastack import untrusted
from megastack.config import ModelConfig
from megastack.errors import UserError

CHECKPOINT_VERSION = 3.0


@dataclass(frozen=True)
class ArgField:
    names: tuple[str, ...]  # Megatron-LM's names for it, the current release's first
    kind: type  # int, float, bool or str
    meaning: str


FIELDS: dict[str, ArgField] = {
    "num_layers": ArgField(("num_layers",), int, "transformer layers"),
    "hidden_size": ArgField(("hidden_size",), int, "model width"),
    "ffn_hidden_size": ArgField(("ffn_hidden_size",), int, "MLP width"),
    "num_attention_heads": ArgField(("num_attention_heads",), int, "query heads"),
    "group_query_attention": ArgField(("group_query_attention",), bool, "num_query_groups applies"),
    "num_query_groups": ArgField(("num_query_groups",), int, "key/value heads (with group_query_attention)"),
    "kv_channels": ArgField(("kv_channels",), int, "head dim; megastack needs hidden_size / heads"),
    "seq_length": ArgField(("seq_length",), int, "training sequence length"),
    "max_position_embeddings": ArgField(("max_position_embeddings",), int, "RoPE table length"),
    "padded_vocab_size": ArgField(("padded_vocab_size",), int, "rows of the embedding (vocab after padding)"),
    "vocab_size": ArgField(("vocab_size",), int, "unpadded vocab (only when padded_vocab_size is absent)"),
    "rotary_base": ArgField(("rotary_base",), float, "RoPE base"),
    "norm_epsilon": ArgField(
        ("layernorm_epsilon", "norm_epsilon"),
        float,
        "RMSNorm epsilon (core 0.16 names it layernorm_epsilon, earlier norm_epsilon)",
    ),
    "untie_embeddings_and_output_weights": ArgField(
        ("untie_embeddings_and_output_weights",), bool, "separate output layer"
    ),
    "bf16": ArgField(("bf16",), bool, "bf16 training"),
    "fp16": ArgField(("fp16",), bool, "fp16 training"),
    "params_dtype": ArgField(("params_dtype",), torch.dtype, "weights dtype (written with bf16/fp16)"),
    "tensor_model_parallel_size": ArgField(("tensor_model_parallel_size",), int, "TP of the files (legacy)"),
    "pipeline_model_parallel_size": ArgField(("pipeline_model_parallel_size",), int, "PP of the files (legacy)"),
    "expert_model_parallel_size": ArgField(("expert_model_parallel_size",), int, "EP of the files (legacy MoE)"),
    "virtual_pipeline_model_parallel_size": ArgField(
        ("virtual_pipeline_model_parallel_size",), int, "interleaved PP chunks (megastack reads none)"
    ),
    "data_parallel_size": ArgField(("data_parallel_size",), int, "DP of the run (its default DDP bucket size)"),
    "overlap_grad_reduce": ArgField(("overlap_grad_reduce",), bool, "DDP cut its buffer into buckets"),
    "ddp_bucket_size": ArgField(("ddp_bucket_size",), int, "elements per DDP bucket (None: the default)"),
    "accumulate_allreduce_grads_in_fp32": ArgField(
        ("accumulate_allreduce_grads_in_fp32",), bool, "fp32 gradient buffer (the distributed optimizer's key)"
    ),
    "transformer_impl": ArgField(("transformer_impl",), str, "local or transformer_engine: the norm key names"),
    "tokenizer_type": ArgField(("tokenizer_type",), str, "kept from the source; HuggingFaceTokenizer from HF"),
    "tokenizer_model": ArgField(("tokenizer_model",), str, "kept; from HF: the source dir if it has a tokenizer"),
    "num_experts": ArgField(("num_experts",), int, "experts per MoE layer (None or 0: dense)"),
    "moe_router_topk": ArgField(("moe_router_topk",), int, "experts per token"),
    "moe_ffn_hidden_size": ArgField(("moe_ffn_hidden_size",), int, "each expert's MLP width"),
    "moe_aux_loss_coeff": ArgField(("moe_aux_loss_coeff",), float, "load-balancing loss weight"),
    "iteration": ArgField(("iteration",), int, "reset to 0 by grow"),
    "consumed_train_samples": ArgField(("consumed_train_samples",), int, "reset to 0 by grow (a new stage)"),
    "consumed_valid_samples": ArgField(("consumed_valid_samples",), int, "reset to 0 by grow"),
    "skipped_train_samples": ArgField(("skipped_train_samples",), int, "reset to 0 by grow"),
}

# What megastack's Llama is: a source with another value here is another architecture, refused.
LLAMA: dict[str, Any] = {
    "normalization": "RMSNorm",
    "swiglu": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "position_embedding_type": "rope",
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "apply_layernorm_1p": False,
    "qk_layernorm": False,
}
# A mixture of experts megastack reads: megatron-core's MoE layer with the routing whose top-k softmax
# lets upcycled copies compute the dense model's function (another router is another architecture).
MOE: dict[str, Any] = {
    "moe_router_pre_softmax": False,
    "moe_router_score_function": "softmax",
    "moe_router_topk_scaling_factor": None,
    "moe_expert_capacity_factor": None,
    "moe_shared_expert_intermediate_size": None,
    "moe_layer_freq": 1,
    "moe_router_num_groups": None,
    "moe_router_enable_expert_bias": False,
}

# Fields grow sets for the new stage (Megatron-LM reads them on resume unless --finetune).
NEW_STAGE = {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0, "skipped_train_samples": 0}


def get(args: Any, field: str, where: str) -> Any:
    """One field by its first present name, type-checked; None when no name is present (or it is None)."""
    spec = FIELDS[field]
    for name in spec.names:
        value = _get_raw(args, name)
        if value is None:
            continue
        return untrusted.typed(
            value,
            spec.kind,
            where,
            f"args field '{name}' ({spec.meaning})",
            "the checkpoint's args are corrupt",
            minimum=0 if spec.kind is int else None,
        )
    return None


def _get_raw(args: Any, name: str) -> Any:
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def saved_iteration(state: dict[str, Any], where: str) -> int:
    """The top-level ``iteration`` Megatron-LM's save_checkpoint writes beside ``args`` (a legacy rank file
    or torch_dist's common.pt); 0 when absent."""
    return untrusted.typed(state.get("iteration", 0), int, where, "field 'iteration'", "the file is corrupt", minimum=0)


def model_config(args: Any, where: str) -> ModelConfig:
    """The ModelConfig Megatron-LM's loader would build from these args, or a UserError naming the field."""
    if args is None:
        raise UserError(
            f"{where}: no Megatron 'args' and no megastack.json, so the architecture is unknown; "
            "convert it with --model CONFIG naming the architecture"
        )
    experts = get(args, "num_experts", where) or 0
    for name, want in {**LLAMA, **(MOE if experts else {})}.items():
        have = _get_raw(args, name)
        if have is not None and have != want:
            raise UserError(
                f"{where}: args field '{name}' is {have!r}; megastack reads Llama-style models "
                f"({name}={want!r}), so this checkpoint is another architecture"
            )
    vpp = get(args, "virtual_pipeline_model_parallel_size", where)
    if vpp not in (None, 1):
        raise UserError(
            f"{where}: saved with virtual pipeline parallelism ({vpp} chunks per stage); reshard it "
            "to a plain pipeline with Megatron-LM's tools/checkpoint/convert.py first"
        )
    required = {}
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length"):
        required[field] = get(args, field, where)
        if not required[field]:
            raise UserError(
                f"{where}: args lack '{field}', so the architecture is unknown; the checkpoint's args are incomplete"
            )
    heads = required["num_attention_heads"]
    groups = get(args, "num_query_groups", where) if get(args, "group_query_attention", where) else heads
    vocab = get(args, "padded_vocab_size", where) or get(args, "vocab_size", where)
    if not vocab:
        raise UserError(f"{where}: args lack 'padded_vocab_size', so the vocab is unknown; the args are incomplete")
    kv = get(args, "kv_channels", where)
    if kv is not None and kv * heads != required["hidden_size"]:
        raise UserError(
            f"{where}: args give kv_channels={kv} with {heads} heads and hidden_size "
            f"{required['hidden_size']}; megastack needs head dim = hidden_size / heads"
        )
    epsilon = get(args, "norm_epsilon", where)
    base = get(args, "rotary_base", where)
    moe = {}
    if experts > 1:  # Megatron-LM's num_experts 1 is one expert: its dense MLP under another name, refused
        coeff = get(args, "moe_aux_loss_coeff", where)
        moe = {
            "num_experts": experts,
            "moe_topk": get(args, "moe_router_topk", where) or 2,
            "moe_ffn_hidden_size": get(args, "moe_ffn_hidden_size", where),
            "moe_aux_loss_coeff": coeff if coeff is not None else 0.0,
        }
    elif experts == 1:
        raise UserError(f"{where}: args give num_experts=1 (a one-expert MoE layer); megastack reads dense or >= 2")
    return ModelConfig(
        **moe,
        num_layers=required["num_layers"],
        hidden_size=required["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=groups or heads,
        ffn_hidden_size=required["ffn_hidden_size"],
        vocab_size=vocab,
        seq_length=required["seq_length"],
        rotary_base=base if base is not None else 10000.0,
        norm_epsilon=epsilon if epsilon is not None else 1e-5,
        tie_embeddings=not get(args, "untie_embeddings_and_output_weights", where),
        dtype="bf16" if get(args, "bf16", where) else ("fp16" if get(args, "fp16", where) else "fp32"),
    )


def fresh_args(cfg: ModelConfig) -> argparse.Namespace:
    """Args for a checkpoint with no Megatron source (HF or megastack's own): what Megatron-LM's loader and
    ``pretrain_gpt.py`` need to rebuild this Llama (a missing key silently falls back to Megatron's
    default, i.e. a different model)."""
    return argparse.Namespace(
        **LLAMA,
        num_experts=None,
        make_vocab_size_divisible_by=128,
        tokenizer_type="SentencePieceTokenizer",
        # as Megatron-LM's own saves of a RoPE Llama hold them (its loader compares add_position_embedding
        # with its default True; rope is chosen by position_embedding_type)
        add_position_embedding=True,
        use_rotary_position_embeddings=False,
        apply_query_key_layer_scaling=False,
        sequence_parallel=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_legacy_models=False,
        transformer_impl="transformer_engine",
        **NEW_STAGE,
    )


def output_args(
    source: Any,
    cfg: ModelConfig,
    tp: int | None,
    pp: int | None,
    dtype: torch.dtype,
    *,
    iteration: int,
    new_stage: bool,
    te_names: bool,
    where: str = "source",
    ep: int | None = None,
) -> argparse.Namespace:
    """The args to write: the source's (a copy; fresh when it has none) with only what changed changed.
    ``tp``/``pp``/``ep`` None (torch_dist output, which loads under any layout) keeps the source's."""
    if source is None:
        args = fresh_args(cfg)
    elif isinstance(source, argparse.Namespace):
        args = copy.copy(source)
    elif isinstance(source, dict):
        args = argparse.Namespace(**source)
    else:
        raise UserError(f"{where}: 'args' is a {type(source).__name__}, not Megatron-LM's Namespace")
    changed = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.query_groups,
        "group_query_attention": cfg.query_groups != cfg.num_attention_heads,
        "kv_channels": cfg.head_dim,
        "seq_length": cfg.seq_length,
        "padded_vocab_size": cfg.vocab_size,
        "untie_embeddings_and_output_weights": not cfg.tie_embeddings,
        "rotary_base": int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base,
        "tensor_model_parallel_size": tp or getattr(args, "tensor_model_parallel_size", None) or 1,
        "pipeline_model_parallel_size": pp or getattr(args, "pipeline_model_parallel_size", None) or 1,
        "fp16": dtype == torch.float16,
        "bf16": dtype == torch.bfloat16,
        "params_dtype": dtype,
        "iteration": iteration,
        "transformer_impl": "transformer_engine" if te_names else "local",
        "num_experts": cfg.num_experts or None,
    }
    if ep is not None:
        changed["expert_model_parallel_size"] = ep
    if cfg.is_moe:  # megatron-core's MoE layer as megastack builds it: dropless, top-k softmax routing
        changed |= MOE | {
            "moe_router_topk": cfg.moe_topk,
            "moe_ffn_hidden_size": cfg.expert_ffn_size,
            "moe_aux_loss_coeff": cfg.moe_aux_loss_coeff,
            "moe_router_load_balancing_type": "aux_loss",
        }
    if source is None or (getattr(args, "max_position_embeddings", None) or 0) < cfg.seq_length:
        changed["max_position_embeddings"] = cfg.seq_length
    if source is None or getattr(args, "vocab_size", None) is None:
        changed["vocab_size"] = cfg.vocab_size
    for name in FIELDS["norm_epsilon"].names:  # every release's name: each reads its own
        changed[name] = cfg.norm_epsilon
    if new_stage:
        changed |= NEW_STAGE
    for name, value in changed.items():
        setattr(args, name, value)
    return args


NORM_NAMES = ("te", "local")


def output_te_names(reader: Any, requested: str | None) -> bool:
    """Whether legacy output names norms the Transformer Engine way: ``--norm-names`` if given, else as the
    source's legacy files do, else as its args' ``transformer_impl`` says, else TE (megatron-core's default)."""
    if requested is not None:
        if requested not in NORM_NAMES:
            raise UserError(f"--norm-names {requested}: choose te or local")
        return requested == "te"
    if isinstance(getattr(reader, "te_names", None), bool):
        return reader.te_names
    impl = _get_raw(getattr(reader, "saved_args", None), "transformer_impl")
    return impl != "local"


def for_output(
    reader: Any,
    cfg: ModelConfig,
    tp: int | None,
    pp: int | None,
    dtype: torch.dtype,
    *,
    iteration: int,
    new_stage: bool,
    norm_names: str | None = None,
    ep: int | None = None,
) -> tuple[argparse.Namespace, bool]:
    """(args, te_names) for a Megatron output made from ``reader``'s checkpoint."""
    te_names = output_te_names(reader, norm_names)
    source = getattr(reader, "saved_args", None)
    args = output_args(
        source,
        cfg,
        tp,
        pp,
        dtype,
        iteration=iteration,
        new_stage=new_stage,
        te_names=te_names,
        where=str(getattr(reader, "path", "the new checkpoint")),  # no reader: fresh args
        ep=ep,
    )
    if source is None and getattr(reader, "format", None) == "hf":
        tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        if any((reader.path / name).is_file() for name in tokenizer_files):
            args.tokenizer_type, args.tokenizer_model = "HuggingFaceTokenizer", str(reader.path.resolve())
    return args, te_names

"""Typed configs loaded from YAML and validated on load.

Every config is a frozen dataclass. ``load_config(path, cls)`` reads YAML, refuses unknown keys,
checks each field's type against its annotation, then runs the dataclass's own ``check()`` for the
rules that tie fields together (heads divide hidden, TP divides heads, ...). Every failure is a
``UserError`` naming the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from megastack.errors import UserError

DType = Literal["fp32", "bf16", "fp16"]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: an installed wheel ships them

T = TypeVar("T")

# Far above any model's depth (Megatron's largest have a few hundred layers): a model, map or factor past it
# is a typo or an attack that would build lists of billions before anything else is checked.
MAX_LAYERS = 4096
MAX_DIMENSION = 1 << 22  # widths, heads, vocabulary and sequence length: 4M is far beyond any real model
MAX_EXPERTS = 4096  # experts per MoE layer (the largest public MoE models have a few hundred)


class ConfigError(UserError):
    """A config field is wrong; the message names file and field."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def brief(value: Any) -> str:
    """A value for an error message: short, and bounded however large or nested (a file the config points
    at is not echoed back; a YAML alias bomb is not expanded)."""
    return _REPR.repr(value)


def _fail(where: str, field_path: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field '{field_path}' {problem}")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE (rotate-half), no biases, optional GQA."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    num_query_groups: int | None = None  # None: one group per head (plain multi-head attention)
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    dtype: DType = "fp32"
    init_std: float = 0.02
    name: str = ""
    # Mixture of experts (megatron-core's MoE layer: a router, then each token through its top-k experts,
    # dropless, softmax over the top-k logits); 0 experts: a dense MLP.
    num_experts: int = 0
    moe_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # each expert's MLP width; None: ffn_hidden_size
    moe_aux_loss_coeff: float = 0.01  # megatron-core's load-balancing loss weight

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: all query heads plus one key and one value head per group."""
        return (self.num_attention_heads + 2 * self.query_groups) * self.head_dim

    def layer_parameters(self, active: bool = False) -> int:
        """One block's parameters; ``active``: those a token uses (its top-k experts, not all of them)."""
        h = self.hidden_size
        attn = self.qkv_rows * h + h * self.num_attention_heads * self.head_dim
        if self.is_moe:
            experts = self.moe_topk if active else self.num_experts
            mlp = experts * 3 * h * self.expert_ffn_size + self.num_experts * h  # experts + router
        else:
            mlp = 3 * h * self.ffn_hidden_size
        return attn + mlp + 2 * h

    def non_embedding_parameters(self, active: bool = False) -> int:
        """Transformer-block parameters (Kaplan's N): what growth factors and scaling laws count."""
        return self.num_layers * self.layer_parameters(active) + self.hidden_size

    def embedding_parameters(self) -> int:
        copies = 1 if self.tie_embeddings else 2
        return copies * self.vocab_size * self.hidden_size

    def total_parameters(self) -> int:
        return self.non_embedding_parameters() + self.embedding_parameters()

    def check(self) -> list[tuple[str, str]]:
        """Cross-field rules; returns (field, problem) pairs."""
        problems = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
            if getattr(self, name) <= 0:
                problems.append((name, f"must be a positive integer, got {getattr(self, name)}"))
        if problems:
            return problems
        if self.num_layers > MAX_LAYERS:
            problems.append(("num_layers", f"is {self.num_layers}; at most {MAX_LAYERS} layers are supported"))
        for name in (
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "vocab_size",
            "seq_length",
            "num_query_groups",
        ):
            if (getattr(self, name) or 0) > MAX_DIMENSION:
                problems.append((name, f"is {getattr(self, name)}; at most {MAX_DIMENSION} is supported"))
        if problems:
            return problems
        if self.num_query_groups is not None and self.num_query_groups <= 0:
            problems.append(("num_query_groups", f"must be positive, got {self.num_query_groups}"))
        elif self.num_attention_heads % self.query_groups:
            problems.append(
                (
                    "num_query_groups",
                    f"({self.query_groups}) must divide num_attention_heads ({self.num_attention_heads})",
                )
            )
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                ("num_attention_heads", f"({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})")
            )
        elif self.head_dim % 2:
            problems.append(("num_attention_heads", f"gives an odd head dim ({self.head_dim}); RoPE needs an even one"))
        for name in ("rotary_base", "norm_epsilon", "init_std"):
            if getattr(self, name) <= 0:
                problems.append((name, f"must be positive, got {getattr(self, name)}"))
        return problems + self._check_experts()

    def _check_experts(self) -> list[tuple[str, str]]:
        if self.num_experts < 0 or self.num_experts > MAX_EXPERTS:
            return [("num_experts", f"must be 0 (dense) to {MAX_EXPERTS}, got {self.num_experts}")]
        if not self.is_moe:
            return []
        problems = []
        if not 2 <= self.moe_topk <= self.num_experts:  # top-1 needs megatron's pre-softmax routing: not built
            problems.append(("moe_topk", f"must be 2 to num_experts ({self.num_experts}), got {self.moe_topk}"))
        if self.moe_ffn_hidden_size is not None and not 0 < self.moe_ffn_hidden_size <= MAX_DIMENSION:
            problems.append(("moe_ffn_hidden_size", f"must be positive, got {self.moe_ffn_hidden_size}"))
        if self.moe_aux_loss_coeff < 0:
            problems.append(("moe_aux_loss_coeff", f"must be >= 0, got {self.moe_aux_loss_coeff}"))
        return problems


@dataclass(frozen=True)
class ParallelConfig:
    """How one stage is laid out: TP x PP x DP ranks, ZeRO stage, batch sizes and precision."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1  # expert parallelism: each rank of an expert-parallel group holds experts / expert
    data: int | None = None  # None: whatever the world size leaves after tensor x pipeline
    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # None: micro_batch_size x data (no accumulation)
    precision: DType = "fp32"

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for name in ("tensor", "pipeline", "expert", "micro_batch_size"):
            if getattr(self, name) <= 0:
                problems.append((name, f"must be a positive integer, got {getattr(self, name)}"))
        for name in ("data", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append((name, f"must be a positive integer or omitted, got {value}"))
        if problems:
            return problems
        if self.pipeline > 1 and self.zero_stage > 1:
            problems.append(
                (
                    "zero_stage",
                    f"{self.zero_stage} cannot be combined with pipeline "
                    f"parallelism ({self.pipeline}); use zero_stage 1 with pipeline > 1 "
                    "(as Megatron-DeepSpeed does)",
                )
            )
        if self.data is not None and self.global_batch_size is not None:
            step = self.micro_batch_size * self.data
            if self.global_batch_size % step:
                problems.append(
                    (
                        "global_batch_size",
                        f"({self.global_batch_size}) must be a multiple "
                        f"of micro_batch_size x data ({self.micro_batch_size} x {self.data})",
                    )
                )
        return problems

    def check_model(self, model: ModelConfig) -> list[tuple[str, str]]:
        """Rules that tie the layout to an architecture."""
        problems = []
        tp, pp = self.tensor, self.pipeline
        if model.num_attention_heads % tp:
            problems.append(("tensor", f"({tp}) must divide num_attention_heads ({model.num_attention_heads})"))
        if model.query_groups % tp:
            problems.append(("tensor", f"({tp}) must divide num_query_groups ({model.query_groups})"))
        if model.vocab_size % tp:
            problems.append(("tensor", f"({tp}) must divide vocab_size ({model.vocab_size}); pad the vocab"))
        if model.ffn_hidden_size % tp:
            problems.append(("tensor", f"({tp}) must divide ffn_hidden_size ({model.ffn_hidden_size})"))
        if model.num_layers % pp:
            problems.append(("pipeline", f"({pp}) must divide num_layers ({model.num_layers})"))
        if model.is_moe and model.expert_ffn_size % tp:
            problems.append(("tensor", f"({tp}) must divide the experts' ffn ({model.expert_ffn_size})"))
        if self.expert > 1 and not model.is_moe:
            problems.append(("expert", f"({self.expert}) needs a mixture of experts; this model is dense"))
        elif model.is_moe and model.num_experts % self.expert:
            problems.append(("expert", f"({self.expert}) must divide num_experts ({model.num_experts})"))
        return problems

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for this world; a UserError when the world cannot be split this way."""
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise UserError(
                f"world size {world_size} is not a multiple of tensor x pipeline "
                f"({self.tensor} x {self.pipeline}); launch a multiple of "
                f"{model_parallel} processes"
            )
        dp = world_size // model_parallel
        if dp % self.expert:
            raise UserError(
                f"parallel.expert ({self.expert}) must divide the data parallel size ({dp}: {world_size} "
                f"processes over tensor x pipeline {model_parallel}); expert ranks are carved out of data ranks"
            )
        if self.data is not None and self.data != dp:
            raise UserError(
                f"parallel.data is {self.data} but {world_size} processes with tensor x "
                f"pipeline {model_parallel} give data parallel size {dp}; fix parallel.data "
                "or the number of processes"
            )
        return dp

    def gradient_accumulation_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        step = self.micro_batch_size * dp
        global_batch = self.global_batch_size or step
        if global_batch % step:
            raise UserError(
                f"parallel.global_batch_size ({global_batch}) is not a multiple of "
                f"micro_batch_size x data parallel size ({self.micro_batch_size} x {dp})"
            )
        return global_batch // step


# ----------------------------------------------------------------------------- generic YAML loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats, nothing else bends."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise _fail(where, path, f"must be {_type_name(tp)}, got {brief(value)}")
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, dict):  # a mapping can only be the dataclass option: keep its precise error
            for option in typing.get_args(tp):
                if dataclasses.is_dataclass(option) or typing.get_origin(option) is dict:
                    return _coerce(value, option, where, path)
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where, path)
            except ConfigError:
                continue
        raise _fail(where, path, f"must be {_type_name(tp)}, got {brief(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise _fail(where, path, f"must be null, got {brief(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, path)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _fail(where, path, f"must be {_type_name(tp)}, got {brief(value)}")
        item = typing.get_args(tp)[0]
        items = [_coerce(v, item, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, path, f"must be a mapping, got {brief(value)}")
        key_t, val_t = typing.get_args(tp)
        return {_coerce(k, key_t, where, path): _coerce(v, val_t, where, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _fail(where, path, f"must be a finite number, got {brief(value)}")
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 without a dot as a string
            try:
                return _coerce(float(value), float, where, path)
            except ValueError:
                pass
        raise _fail(where, path, f"must be a number, got {brief(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, path, f"must be an integer, got {brief(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, path, f"must be true or false, got {brief(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, path, f"must be a string, got {brief(value)}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def from_dict(cls: type[T], data: Any, where: str = "<config>", path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        shown = path or "(top level)"
        raise ConfigError(f"{where}: field '{shown}' must be a mapping of fields, got {brief(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise _fail(where, prefix + unknown[0], f"is not a known field; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(where, prefix + name, f"is missing; it must be {_type_name(hints[name])}")
            continue
        kwargs[name] = _coerce(data[name], hints[name], where, prefix + name)
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        for field_name, problem in obj.check():
            raise _fail(where, prefix + field_name, problem)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain mapping that ``from_dict`` turns back into the same object."""
    return dataclasses.asdict(obj)


MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 100  # configs rarely use anchors at all; thousands of them is a billion-laughs bomb


class _YamlRefusal(Exception):
    """A YAML document that parses but is refused (the message says why)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice (PyYAML silently keeps the last: a user's edit that
    appears to change a field would not) and alias bombs."""

    def compose_document(self):
        self._aliases = 0
        return super().compose_document()

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlRefusal(f"uses more than {MAX_YAML_ALIASES} aliases (*name)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise _YamlRefusal(
                            f"gives key {brief(key_node.value)} twice (line {key_node.start_mark.line + 1})"
                        )
                    seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; unreadable or malformed files are one-line UserErrors."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(
                f"{path}: {path.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES} "
                "bytes; pass the YAML config, not another file"
            )
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found; check the path") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config ({type(exc).__name__}); pass a readable YAML file") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _YamlRefusal as exc:
        raise UserError(f"{path}: {exc}; fix the file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a config; fix the file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{line}; fix the syntax") from None


def resolve_config_path(name: str | os.PathLike, kind: str) -> Path:
    """A path as given, or a shipped config by name: ``tiny`` -> configs/<kind>/tiny.yaml."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") or os.sep in str(name):
        return path
    candidate = CONFIG_DIR / kind / f"{name}.yaml"
    if candidate.exists():
        return candidate
    shipped = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise UserError(f"no {kind[:-1]} config named '{name}'; pass a YAML path or one of: {', '.join(shipped)}")


def load_config(path: str | os.PathLike, cls: type[T]) -> T:
    """Load and validate one config file of dataclass type ``cls``."""
    return from_dict(cls, read_yaml(path), where=str(path))


def load_model_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A model config from a YAML path or a shipped name (``tiny``, ``llama-1.1b``, ...)."""
    return load_config(resolve_config_path(name_or_path, "models"), ModelConfig)


@dataclass(frozen=True)
class LayoutConfig:
    """A model and the parallel layout it runs under (the core of every stage config)."""

    model: ModelConfig | str  # inline fields, or a shipped name / YAML path
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def resolved_model(self) -> ModelConfig:
        return self.model if isinstance(self.model, ModelConfig) else load_model_config(self.model)

    def check(self) -> list[tuple[str, str]]:
        return [(f"parallel.{name}", problem) for name, problem in self.parallel.check_model(self.resolved_model())]

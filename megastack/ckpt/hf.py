"""Hugging Face Llama checkpoints (``config.json`` + safetensors), read and written tensor by tensor.

Reading parses the safetensors headers itself (8-byte length + JSON, a documented format) and copies
exactly the byte ranges a request needs with ``preadv`` into a fresh tensor: a TP piece of an
embedding or of a grouped QKV reads only its rows, and nothing is memory-mapped, so a conversion's
resident memory is what it holds, not the pages of the files it touched. Every shard's header is
checked against the index and the model config before any tensor is read.

Layout: HF keeps q/k/v and gate/up as separate matrices; the logical (megatron) tensors are the QKV
grouped per query group and fc1 = [gate; up]. RoPE needs no permutation: HF Llama's rotary embedding
and megatron-core's non-interleaved RoPE both rotate the two halves of each head (``rotate_half``),
so q/k rows are copied as they are (proven by logits in tests/test_convert.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megastack import layout, untrusted
from megastack.ckpt.base import HashingWriter, Produce, Unit, ahead
from megastack.compat import streaming
from megastack.config import ModelConfig
from megastack.errors import UserError
from megastack.fsio import ReadAhead, mapped_range, open_output
from megastack.layout import Piece, take_pieces

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB files: bounded writer memory, and units for several ranks

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CFG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MIXTRAL = {"router": "block_sparse_moe.gate.weight", "expert_fc1": None, "expert_fc2": None}
# Tensors some Llama exports carry that hold no weights (recomputed by every implementation).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- names and shapes


def hf_parts(cfg: ModelConfig, name: str) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors (name, shape) a logical tensor is made of, in fusion order."""
    layer, kind = layout.split_name(name)
    h, d = cfg.hidden_size, cfg.head_dim
    if layer is None:
        return [(layout.HF_GLOBAL[kind], layout.logical_shape(cfg, name))]
    p = f"model.layers.{layer}."
    if kind == "qkv":
        return [
            (p + "self_attn.q_proj.weight", (cfg.num_attention_heads * d, h)),
            (p + "self_attn.k_proj.weight", (cfg.query_groups * d, h)),
            (p + "self_attn.v_proj.weight", (cfg.query_groups * d, h)),
        ]
    if kind == "fc1":
        return [
            (p + "mlp.gate_proj.weight", (cfg.ffn_hidden_size, h)),
            (p + "mlp.up_proj.weight", (cfg.ffn_hidden_size, h)),
        ]
    if kind in MIXTRAL:  # Mixtral's sparse MoE block, as transformers saves it (w1 gate, w3 up, w2 down)
        expert = f"{p}block_sparse_moe.experts.{layout.expert_of(name)}."
        f = cfg.expert_ffn_size
        if kind == "expert_fc1":
            return [(expert + "w1.weight", (f, h)), (expert + "w3.weight", (f, h))]
        if kind == "expert_fc2":
            return [(expert + "w2.weight", (h, f))]
        return [(p + MIXTRAL[kind], layout.logical_shape(cfg, name))]
    return [(p + layout.HF_LAYER[kind], layout.logical_shape(cfg, name))]


# ----------------------------------------------------------------------------- config.json


MAX_JSON_BYTES = 16 << 20  # config.json and the index are a few KB; a 1B-tensor index is about 100 MB


def _load_json(path: Path) -> Any:
    return untrusted.read_json(path, MAX_JSON_BYTES, "a Hugging Face checkpoint needs it whole and valid")


def _rope_theta(hc: dict[str, Any], where: Path) -> float:
    """rope_theta from either transformers 4 (top level + rope_scaling) or 5 (rope_parameters) configs;
    any RoPE scaling is refused: megatron's plain RoPE would compute a different model."""
    params = hc.get("rope_parameters")
    scaling = hc.get("rope_scaling")
    for field_name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise UserError(f"{where}: field '{field_name}' must be an object, got {value!r}")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise UserError(
                f"{where}: field '{field_name}' asks for RoPE scaling '{kind}'; only plain RoPE "
                "(rope_type default) converts exactly to megatron; use a model without rope scaling"
            )
    theta = (params or {}).get("rope_theta", hc.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < math.inf:
        raise UserError(f"{where}: field 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta)


# Sizes users type are far below this; a config.json asking for more is corrupt or hostile (a 1e30-layer
# model would be planned before anything checks the weights).
MAX_SIZE = 1 << 24


def _field(hc: dict[str, Any], key: str, kind: type, where: Path, default: Any = ...) -> Any:
    """One config.json field, of exactly ``kind`` (the string "false" is not a bool), finite, sizes
    positive and bounded; a one-line error otherwise."""
    if key not in hc or hc[key] is None:
        if default is ...:
            raise UserError(f"{where}: field '{key}' is missing; not a complete Llama config")
        return default
    return untrusted.typed(
        hc[key],
        kind,
        where,
        f"field '{key}'",
        "fix config.json",
        positive=kind is not bool,
        maximum=MAX_SIZE if kind is int else None,
    )


def config_from_hf(hc: Any, where: Path) -> ModelConfig:
    """A ModelConfig from a Llama ``config.json``; anything megatron's Llama would compute differently
    (another architecture, biases, RoPE scaling, another activation or head dim) is one-line refused."""
    if not isinstance(hc, dict):
        raise UserError(f"{where}: must hold a JSON object")
    archs = hc.get("architectures") or []
    model_type = hc.get("model_type")
    if (
        not isinstance(model_type, str)
        or model_type not in ARCHITECTURES
        or (archs and archs != [ARCHITECTURES[model_type]])
    ):
        shown = ", ".join(map(str, archs)) or "none"
        raise UserError(
            f"{where}: model_type '{model_type}' (architectures: {shown}) is not supported; only "
            "Llama (model_type 'llama', LlamaForCausalLM) and Mixtral (MixtralForCausalLM) checkpoints convert"
        )
    if model_type == "mixtral" and hc.get("sliding_window") is not None:
        raise UserError(
            f"{where}: field 'sliding_window' is {hc['sliding_window']!r}; megatron's attention is full causal, "
            "so only Mixtral configs without a sliding window convert exactly"
        )
    for field_name in ("attention_bias", "mlp_bias"):
        if hc.get(field_name):
            raise UserError(
                f"{where}: field '{field_name}' is true; megastack's Llama has no biases, so the "
                "model cannot convert exactly"
            )
    act = hc.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: field 'hidden_act' is '{act}'; only SwiGLU with silu is supported")
    heads = _field(hc, "num_attention_heads", int, where)
    groups = _field(hc, "num_key_value_heads", int, where, heads)
    dtype_name = hc.get("dtype") or hc.get("torch_dtype") or "float32"
    cfg = ModelConfig(
        num_layers=_field(hc, "num_hidden_layers", int, where),
        hidden_size=_field(hc, "hidden_size", int, where),
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        ffn_hidden_size=_field(hc, "intermediate_size", int, where),
        vocab_size=_field(hc, "vocab_size", int, where),
        seq_length=_field(hc, "max_position_embeddings", int, where, 2048),
        rotary_base=_rope_theta(hc, where),
        norm_epsilon=_field(hc, "rms_norm_eps", float, where, 1e-6),
        tie_embeddings=_field(hc, "tie_word_embeddings", bool, where, False),
        dtype=CFG_DTYPES.get(str(dtype_name).replace("torch.", ""), "fp32"),
        init_std=_field(hc, "initializer_range", float, where, 0.02),
        **(_mixtral_fields(hc, where) if model_type == "mixtral" else {}),
    )
    for field_name, problem in cfg.check():
        raise UserError(f"{where}: {field_name} {problem}")
    head_dim = _field(hc, "head_dim", int, where, None)
    if head_dim is not None and head_dim != cfg.head_dim:
        raise UserError(
            f"{where}: field 'head_dim' is {head_dim} but hidden_size/num_attention_heads is "
            f"{cfg.head_dim}; decoupled head dims are not supported"
        )
    return cfg


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


def _mixtral_fields(hc: dict[str, Any], where: Path) -> dict[str, Any]:
    """Mixtral's experts: softmax over all router logits, top-k, renormalised: the same weights as
    megatron-core's softmax over the top-k logits. ``intermediate_size`` is each expert's width."""
    return {
        "num_experts": _field(hc, "num_local_experts", int, where),
        "moe_topk": _field(hc, "num_experts_per_tok", int, where, 2),
        "moe_aux_loss_coeff": _field(hc, "router_aux_loss_coef", float, where, 0.001),
    }


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (MixtralForCausalLM for a mixture of experts), readable by
    transformers 4 (rope_theta, torch_dtype) and 5 (rope_parameters, dtype)."""
    moe = {}
    if cfg.is_moe:
        moe = {
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.moe_topk,
            "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "sliding_window": None,
        }
    model_type = "mixtral" if cfg.is_moe else "llama"
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        **moe,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_ffn_size if cfg.is_moe else cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_length,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
        "dtype": HF_DTYPE_NAMES[dtype],
        "use_cache": True,
    }


# ----------------------------------------------------------------------------- safetensors headers


@dataclass(frozen=True)
class Entry:
    """One stored tensor: file, dtype, shape and absolute byte range."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: Path) -> dict[str, Entry]:
    """Parse and check a safetensors header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: too short for a safetensors file; it is truncated")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 1 << 28):
                raise UserError(f"{path}: header length {n} exceeds the file; not a safetensors file or truncated")
            raw = f.read(n)
    except FileNotFoundError:
        raise UserError(f"{path}: missing safetensors file") from None
    header = untrusted.loads_json(raw, f"{path}: safetensors header", "the file is corrupt")
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is not an object; the file is corrupt")
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: header entry '{name}' is malformed; the file is corrupt") from None
        if not isinstance(dtype_name, str) or not untrusted.is_counts([*shape, begin, end]):
            raise UserError(f"{path}: header entry '{name}' has a non-integer shape or offset; the file is corrupt")
        if dtype_name not in ST_DTYPES:
            raise UserError(
                f"{path}: tensor '{name}' has dtype {dtype_name}; only F32, BF16, F16 and F64 "
                "weights convert (quantized checkpoints are not supported)"
            )
        dtype = ST_DTYPES[dtype_name]
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0 or base + end > size:
            raise UserError(
                f"{path}: tensor '{name}' has a byte range that does not fit its shape or the "
                "file; the file is truncated or corrupt"
            )
        entries[name] = Entry(path.name, dtype, shape, base + begin, end - begin)
    # The safetensors library's rule: the tensors tile the data buffer exactly, no overlap, no gap.
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.nbytes)):
        if entry.start - base != position:
            raise UserError(
                f"{path}: tensors' data_offsets overlap or leave a gap at byte {position}; the file is "
                "corrupt (the safetensors library refuses it too)"
            )
        position += entry.nbytes
    if position != size - base:
        raise UserError(f"{path}: the tensors cover {position} of {size - base} data bytes; the file is corrupt")
    return entries


# ----------------------------------------------------------------------------- reader


COLUMN_READ_BYTES = 8 << 20  # whole rows read at once to cut column pieces from (a TP piece of proj or fc2)


class HFReader:
    """Logical-tensor slices of a Hugging Face Llama (or Mixtral) checkpoint, fusing q/k/v and gate/up on the
    fly."""

    format = "hf"

    def __init__(self, directory: str | os.PathLike, cfg: ModelConfig | None = None):
        self.path = Path(directory)
        self.iteration = 0
        self.hf_config = _load_json(self.path / CONFIG)
        parsed = config_from_hf(self.hf_config, self.path / CONFIG)
        self.cfg = cfg or parsed
        self.files = self._shard_files()
        self.entries = self._index_entries()
        self._check_tensors()
        self._fds: dict[str, int] = {}
        self._read_ahead = ReadAhead((e.file, e.start, e.nbytes) for e in self.entries.values())

    # -- discovery and checks, all before any tensor is read

    def _shard_files(self) -> list[str]:
        index_path = self.path / INDEX
        if index_path.is_file():
            index = _load_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index_path}: has no 'weight_map' object; the index is corrupt")
            self.weight_map: dict[str, str] | None = {}
            for name, file in weight_map.items():
                if not isinstance(file, str) or "/" in file or "\\" in file or file in ("", ".", ".."):
                    raise UserError(
                        f"{index_path}: tensor '{name}' names shard file {file!r}, which is not a "
                        "plain file name in this directory; the index is corrupt or malicious"
                    )
                self.weight_map[name] = file
            files = sorted(set(self.weight_map.values()))
            for file in files:
                if not (self.path / file).is_file():
                    count = sum(1 for f in self.weight_map.values() if f == file)
                    raise UserError(
                        f"{self.path / file}: shard missing ({INDEX} names it for {count} tensors); "
                        "the download or copy is incomplete, fetch that file again"
                    )
            return files
        self.weight_map = None
        if (self.path / SINGLE).is_file():
            return [SINGLE]
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        raise UserError(
            f"{self.path}: has {', '.join(found) or 'no safetensors files'} but neither {SINGLE} nor "
            f"{INDEX}; a sharded checkpoint needs its index file"
        )

    def _index_entries(self) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        holder: dict[str, str] = {}
        for file in self.files:
            for name, entry in read_header(self.path / file).items():
                if name in holder:
                    raise UserError(
                        f"{self.path}: tensor '{name}' is stored in both {holder[name]} and {file}; "
                        "the shards are from different exports"
                    )
                holder[name] = file
                entries[name] = entry
        if self.weight_map is not None:
            for name, file in sorted(self.weight_map.items()):
                if holder.get(name) != file:
                    actual = f"it is in {holder[name]}" if name in holder else "no shard holds it"
                    raise UserError(
                        f"{self.path / INDEX}: maps '{name}' to {file} but {actual}; the index does "
                        "not match the shard files (re-download them together)"
                    )
            for name, file in sorted(holder.items()):
                if name not in self.weight_map:
                    raise UserError(
                        f"{self.path / file}: holds '{name}', which {INDEX} does not list; the index "
                        "does not match the shard files (re-download them together)"
                    )
        return entries

    def _check_tensors(self) -> None:
        cfg = self.cfg
        expected: dict[str, tuple[int, ...]] = {}
        for name in layout.logical_names(cfg):
            expected.update(hf_parts(cfg, name))
        where = f"{self.path} ({INDEX if self.weight_map is not None else SINGLE})"
        for name, shape in expected.items():
            if name not in self.entries:
                raise UserError(
                    f"{where}: tensor '{name}' is missing; the checkpoint does not match config.json "
                    f"({cfg.num_layers} layers, tie_word_embeddings={cfg.tie_embeddings})"
                )
            if self.entries[name].shape != shape:
                raise UserError(
                    f"{self.path / self.entries[name].file}: tensor '{name}' has shape "
                    f"{list(self.entries[name].shape)} but config.json gives {list(shape)}"
                )
        allowed_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
        for name in sorted(set(self.entries) - set(expected)):
            if name in allowed_extra or name.endswith(IGNORED_SUFFIXES):
                continue
            raise UserError(
                f"{self.path / self.entries[name].file}: tensor '{name}' is not part of a bias-free "
                "Llama; converting would drop it, so the checkpoint is refused"
            )

    # -- reading

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.path / file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _fill(self, dst: torch.Tensor, hf_name: str, start: int) -> None:
        """Rows [start, start + len(dst)) of a stored tensor, read from disk straight into ``dst`` (a
        contiguous row block of the output): every byte is copied once, no intermediate tensors."""
        entry = self.entries[hf_name]
        if entry.dtype != dst.dtype:  # a checkpoint mixing dtypes: read, then cast into place
            dst.copy_(self._rows(hf_name, start, dst.shape[0] if dst.dim() else 1).reshape(dst.shape))
            return
        rows = entry.shape[0] if entry.shape else 1
        row_bytes = entry.nbytes // rows if rows else 0
        view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
        nbytes, offset = view.nbytes, entry.start + start * row_bytes
        fd, done = self._fd(entry.file), 0
        self._read_ahead.after(fd, entry.file, entry.start)
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise UserError(f"{self.path / entry.file}: ended early while reading '{hf_name}'; truncated file")
            done += got

    def _cut_columns(self, dst: torch.Tensor, hf_name: str, start: int, want: list[Piece]) -> None:
        """The column pieces ``want`` of rows [start, start + len(dst)) of a stored matrix, copied into
        ``dst`` from the rows mapped in place: a torch_dist chunk of a 7B fc2 is a third of its columns,
        and reading whole rows for each of the three copied every byte three times."""
        entry = self.entries[hf_name]
        row_bytes = entry.nbytes // entry.shape[0]
        fd = self._fd(entry.file)
        self._read_ahead.after(fd, entry.file, entry.start)
        with mapped_range(fd, entry.start + start * row_bytes, dst.shape[0] * row_bytes, self.path / entry.file) as raw:
            rows = torch.frombuffer(raw, dtype=entry.dtype).view(dst.shape[0], *entry.shape[1:])
            dst.copy_(take_pieces(rows, want))
            del rows  # the mapping closes on leaving: nothing may point into it

    def _rows(self, hf_name: str, start: int, length: int) -> torch.Tensor:
        """Rows [start, start+length) of a stored tensor as a new tensor (its own dtype)."""
        entry = self.entries[hf_name]
        if not entry.shape:
            out = torch.empty((), dtype=entry.dtype)
        else:
            out = streaming.empty((length, *entry.shape[1:]), entry.dtype)
        self._fill(out, hf_name, start)
        return out

    def _fill_qkv(self, dst: torch.Tensor, layer: int, piece: Piece) -> None:
        """Rows [start, start + length) of the grouped QKV (per query group: its q rows, then k, then v), each
        run of rows that one of q, k, v holds read straight into place. Any range: a torch_dist chunk of a
        7B QKV (4096 of 12288 rows) cuts groups in the middle, and fusing the whole QKV for each chunk read
        it three times over."""
        d = self.cfg.head_dim
        q_rows = self.cfg.num_attention_heads // self.cfg.query_groups * d  # a group's query rows
        group_rows = q_rows + 2 * d
        (q, _), (k, _), (v, _) = hf_parts(self.cfg, layout.layer_name(layer, "qkv"))
        row, end = piece.start, piece.start + piece.length
        while row < end:
            group, at = divmod(row, group_rows)
            if at < q_rows:
                part, first, run_end = q, group * q_rows + at, q_rows
            elif at < q_rows + d:
                part, first, run_end = k, group * d + at - q_rows, q_rows + d
            else:
                part, first, run_end = v, group * d + at - q_rows - d, group_rows
            count = min(run_end - at, end - row)
            self._fill(dst.narrow(0, row - piece.start, count), part, first)
            row += count

    def _fill_fc1(self, dst: torch.Tensor, name: str, piece: Piece) -> None:
        """Rows of [gate; up] (a dense fc1 or an expert's): the gate part and the up part of the range,
        each read into place."""
        (gate, (ffn, _)), (up, _) = hf_parts(self.cfg, name)
        lo, hi = piece.start, piece.start + piece.length
        gate_rows = max(0, min(hi, ffn) - lo)
        if gate_rows:
            self._fill(dst.narrow(0, 0, gate_rows), gate, lo)
        if hi > ffn:
            self._fill(dst.narrow(0, gate_rows, piece.length - gate_rows), up, max(lo, ffn) - ffn)

    def read(self, name: str, pieces: list[Piece] | None = None) -> torch.Tensor:
        layer, kind = layout.split_name(name)
        shape = layout.logical_shape(self.cfg, name)
        want = list(pieces) if pieces else [Piece(0, 0, shape[0])]
        if want[0].dim != 0:  # column pieces: the columns cut out of whole rows, a block of rows at a time
            out = streaming.empty((shape[0], sum(p.length for p in want)), self.dtype(name))
            step = max(1, COLUMN_READ_BYTES // (math.prod(shape[1:]) * out.element_size()))
            parts = hf_parts(self.cfg, name)
            for start in range(0, shape[0], step):
                count = min(step, shape[0] - start)
                if len(parts) == 1 and self.entries[parts[0][0]].dtype == out.dtype:
                    self._cut_columns(out.narrow(0, start, count), parts[0][0], start, want)
                else:
                    out[start : start + count] = take_pieces(self.read(name, [Piece(0, start, count)]), want)
            return out
        out = streaming.empty((sum(p.length for p in want), *shape[1:]), self.dtype(name))  # reused while streaming
        row = 0
        for piece in want:
            dst = out.narrow(0, row, piece.length)
            if kind == "qkv":
                self._fill_qkv(dst, layer, piece)
            elif kind in ("fc1", "expert_fc1"):
                self._fill_fc1(dst, name, piece)
            else:
                self._fill(dst, hf_parts(self.cfg, name)[0][0], piece.start)
            row += piece.length
        return out

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[hf_parts(self.cfg, name)[0][0]].dtype

    def sources(self, name: str, pieces: list[Piece] | None = None) -> dict[str, int]:
        """Files and bytes a read touches: the fraction of each part's rows (whole tensors for columns)."""
        shape = layout.logical_shape(self.cfg, name)
        want = list(pieces) if pieces else [Piece(0, 0, shape[0])]
        fraction = 1.0 if want[0].dim != 0 else sum(p.length for p in want) / shape[0]
        out: dict[str, int] = {}
        for hf_name, _ in hf_parts(self.cfg, name):
            entry = self.entries[hf_name]
            out[entry.file] = out.get(entry.file, 0) + int(entry.nbytes * fraction)
        return out


# ----------------------------------------------------------------------------- writer


# The most of one tensor the HF writer produces at once: two files are written at a time, each hashed while up
# to two blocks trail its write (HashingWriter.PENDING_BYTES). 8 layers of the 7B shape (3.1 GiB) on 1 rank,
# cached: torch_dist -> HF 5.0-5.1 s at 500-511 MB peak RSS with 16 MiB, 5.3 s at 557 MB with 32 MiB; legacy ->
# HF 4.4-4.6 s with both, at 528-531 against 562-568 MB.
BLOCK_BYTES = 16 << 20


class HFWriter:
    """LlamaForCausalLM (MixtralForCausalLM) safetensors files of at most ``max_shard_bytes`` each (a tensor
    larger than that gets a file of its own), with ``model.safetensors.index.json`` when there is more than
    one. A unit is one file, streamed: it holds a block of rows of one tensor at a time."""

    format = "hf"
    FILES_AT_ONCE = 2  # files written at a time (write_units)

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if dtype not in HF_DTYPE_NAMES:
            raise UserError(f"dtype {dtype} cannot be written to a Hugging Face checkpoint; use fp32, bf16 or fp16")
        self.cfg, self.dtype, self.max_shard_bytes = cfg, dtype, max_shard_bytes

    def _nbytes(self, name: str) -> int:
        numel = 1
        for s in layout.logical_shape(self.cfg, name):
            numel *= s
        return numel * self.dtype.itemsize

    def units(self) -> list[Unit]:
        from megastack.ckpt.base import Request

        groups = self._groups(self.max_shard_bytes)
        if len(groups) > 1:
            # As many files, of about equal size (each but the last holds over total / n, so n suffice): two
            # are written at a time, and a short second file would leave the first's hashing alone (1.1B:
            # 2.0 + 0.26 GiB at 2 GiB a file, 1.23 + 1.03 GiB so).
            names = layout.logical_names(self.cfg)
            total, largest = sum(map(self._nbytes, names)), max(map(self._nbytes, names))
            groups = self._groups(min(self.max_shard_bytes, -(-total // len(groups)) + largest))
        n = len(groups)
        units = []
        for i, names in enumerate(groups):
            key = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            hf_names = [hf for name in names for hf, _ in hf_parts(self.cfg, name)]
            units.append(
                Unit(
                    key=key,
                    nbytes=sum(self._nbytes(name) for name in names),
                    requests=[Request(name, None) for name in names],
                    meta={"hf_names": hf_names},
                )
            )
        return units

    def _groups(self, limit: int) -> list[list[str]]:
        """Logical tensors, in order, cut into files of at most ``limit`` bytes (a larger tensor: a file alone)."""
        groups: list[list[str]] = [[]]
        size = 0
        for name in layout.logical_names(self.cfg):
            nbytes = self._nbytes(name)
            if groups[-1] and size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        return groups

    def write_units(self, directory: str | os.PathLike, units: list[Unit], produce: Produce, rank: int) -> list:
        """Each file streamed: the safetensors header first (every shape is known from the config), then
        each tensor's bytes as they are produced, a block of rows at a time, not a shard or a tensor; hashed
        as written (the manifest does not re-read the file). Tensors are laid out as safetensors' own
        save_file lays them out (by name; all of one dtype), so a file is the very bytes it would write.

        FILES_AT_ONCE files are written at a time, their blocks interleaved, each file hashed by a thread of
        its own (sha256 is the writer's largest CPU cost, and one thread's is slower than the disk)."""
        records = []
        for first in range(0, len(units), self.FILES_AT_ONCE):
            group = units[first : first + self.FILES_AT_ONCE]
            headers = [self._header(unit) for unit in group]
            written = [{hf_name: 0 for hf_name in header if hf_name != "__metadata__"} for header, _ in headers]
            with contextlib.ExitStack() as files:
                streams = []
                for lane, (unit, (_, encoded)) in enumerate(zip(group, headers)):
                    stream = HashingWriter(files.enter_context(open_output(Path(directory) / unit.key)), lane)
                    stream.write(len(encoded).to_bytes(8, "little"))
                    stream.write(encoded)
                    streams.append(stream)
                # the next block is read while this one is written
                for lane, hf_name, data in ahead(self._interleaved(group, produce)):
                    written[lane][hf_name] += data.nbytes
                    streams[lane].write(memoryview(data), owned=True)  # a fresh tensor's bytes, never changed
            for unit, (header, _), counts, stream in zip(group, headers, written, streams):
                for hf_name, nbytes in counts.items():
                    begin, end = header[hf_name]["data_offsets"]
                    if nbytes != end - begin:
                        raise RuntimeError(
                            f"produced {hf_name} with {nbytes - end + begin:+d} bytes against its header's size"
                        )
                records.append(stream.file_hash(unit.key))
        return records

    def _parts(self, unit: Unit) -> list[tuple[str, tuple[int, ...], str]]:
        """(HF name, shape, logical name) of every tensor of ``unit``'s file, in the file's order (by name)."""
        return sorted(
            (hf_name, shape, request.name)
            for request in unit.requests
            for hf_name, shape in hf_parts(self.cfg, request.name)
        )

    def _header(self, unit: Unit) -> tuple[dict[str, Any], bytes]:
        """The safetensors header of ``unit``'s file, and its encoding as written (padded to 8 bytes)."""
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for hf_name, shape, _ in self._parts(unit):
            nbytes = math.prod(shape) * self.dtype.itemsize
            header[hf_name] = {
                "dtype": ST_NAMES[self.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        return header, encoded + b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors pads it

    def _interleaved(self, group: list[Unit], produce: Produce) -> Iterator[tuple[int, str, Any]]:
        """(file's index in ``group``, HF name, bytes) of every block of the group's files, each file's in its
        order, the next block always from the file written least so far (so their hashing threads share the
        work)."""
        per_file = [self._file_blocks(unit, produce) for unit in group]
        done = [0] * len(per_file)
        live = set(range(len(per_file)))
        while live:
            lane = min(live, key=lambda i: (done[i], i))
            item = next(per_file[lane], None)
            if item is None:
                live.discard(lane)
                continue
            done[lane] += item[1].nbytes
            yield lane, *item

    def _file_blocks(self, unit: Unit, produce: Produce) -> Iterator[tuple[str, Any]]:
        """(HF name, bytes) of every block of ``unit``'s file, in the file's order."""
        for hf_name, _, logical in self._parts(unit):
            for block in self._blocks(logical, hf_name, produce):
                yield hf_name, block.to(self.dtype).contiguous().view(torch.uint8).reshape(-1).numpy()

    def _blocks(self, logical: str, hf_name: str, produce: Produce) -> Iterator[torch.Tensor]:
        """The HF tensor ``hf_name`` of ``logical``, produced in blocks of at most BLOCK_BYTES (at least a
        row), each block the rows of ``logical`` it is (``_rows_of``): a 7B embedding or QKV is never whole
        in memory."""
        shape = layout.logical_shape(self.cfg, logical)
        pieces = self._rows_of(logical, hf_name)
        rows = sum(p.length for p in pieces)
        step = max(1, BLOCK_BYTES // (math.prod(shape[1:]) * self.dtype.itemsize))
        if rows == shape[0] and rows <= step:
            yield produce(logical, None)
            return
        for start in range(0, rows, step):
            yield produce(logical, layout.narrow_pieces(pieces, start, min(rows, start + step)))

    def _rows_of(self, logical: str, hf_name: str) -> list[Piece]:
        """The rows of ``logical`` that HF tensor ``hf_name`` is, in its order: all of them, or gate's and up's
        halves of fc1, or q's, k's or v's rows of the fused QKV (``layout.qkv_rows``)."""
        names = [name for name, _ in hf_parts(self.cfg, logical)]
        index = names.index(hf_name)
        if layout.split_name(logical)[1] == "qkv":
            return layout.qkv_rows(self.cfg, index)
        rows = layout.logical_shape(self.cfg, logical)[0] // len(names)
        return [Piece(0, index * rows, rows)]

    def finalize(self, directory: str | os.PathLike, results: list[Any]) -> None:
        from megastack.fsio import atomic_write_json

        directory = Path(directory)
        units = self.units()
        if len(units) > 1:
            weight_map = {hf: unit.key for unit in units for hf in unit.meta["hf_names"]}
            total = sum(unit.nbytes for unit in units)
            atomic_write_json(
                directory / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            )
        atomic_write_json(directory / CONFIG, hf_config(self.cfg, self.dtype))

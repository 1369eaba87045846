"""Megatron-core's distributed checkpoint format (``torch_dist``: PyTorch DCP files), read and written
one chunk at a time.

Layers are stored as one tensor per parameter with a leading global layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[num_layers, rows, h]``), cut into chunks
(megatron writes one per layer per TP rank). A DCP file is a concatenation of ``torch.save`` blobs and
``.metadata`` maps each chunk to (file, offset, length), so a reader seeks to exactly the chunks it
needs. The writer here writes its own chunk blobs and metadata rather than going through
``torch.distributed.checkpoint.save``, whose file writer keeps every tensor of a file alive until the
file closes; this one holds one chunk at a time.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megastack import layout, untrusted
from megastack.ckpt import megatron_args, megatron_optim
from megastack.ckpt.base import FileHash, HashingWriter, Produce, Request, Unit, ahead
from megastack.ckpt.dcp_metadata import (
    CURRENT_DCP_VERSION,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from megastack.ckpt.safe_load import load_pt, read_dcp_metadata, save_pt, write_dcp_metadata
from megastack.ckpt.torch_zip import LazyTensor, save_streaming
from megastack.compat import streaming
from megastack.config import ModelConfig
from megastack.errors import NotBuiltError, UserError
from megastack.fsio import ReadAhead, open_output
from megastack.layout import Piece, pieces_shape, take_pieces

METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}


DISTRIBUTED_KEY = "optimizer.distributed.dp_group_idx_0."  # the distributed optimizer's (one TP x PP domain)
MAX_OBJECT_BYTES = 64 << 20  # a stored object (param groups, bucket sizes) is a few KB; refuse a huge one
OPTIMIZER_KEY = "optimizer.state."  # megatron-core's model-space optimizer keys: optimizer.state.<state>.<key>


# A mixture of experts' tensors as megatron-core stores them: the experts of a layer on a second leading
# axis (SequentialMLP's sharded_state_dict; its global expert index), the norm as TE's MoE spec names it.
MOE_KEYS = {
    "mlp_norm": "decoder.layers.pre_mlp_layernorm.weight",  # the TE spec's; the local spec's: MOE_LOCAL_NORM_KEY
    "router": "decoder.layers.mlp.router.weight",
    "expert_fc1": "decoder.layers.mlp.experts.experts.linear_fc1.weight",
    "expert_fc2": "decoder.layers.mlp.experts.experts.linear_fc2.weight",
}
EXPERT_MODULES = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
# megatron-core's local spec maps pre_mlp_layernorm to the dense fused name in its sharded state dict, MoE layers
# too (a Megatron-LM MoE run with --transformer-impl local saves its MoE norm under this key)
MOE_LOCAL_NORM_KEY = "decoder.layers.mlp.linear_fc1.layer_norm_weight"


def dcp_key(name: str, moe: bool = False, local_moe_norm: bool = False) -> tuple[str, int | None]:
    """Logical name -> (DCP key, layer index on the leading axis or None); Adam's state of a weight
    ('exp_avg/layers.3.qkv') is the weight's key under optimizer.state.exp_avg. ``local_moe_norm``: a mixture of
    experts' norm under the local spec's key (a Megatron-LM run with --transformer-impl local), not TE's."""
    state, _ = layout.split_state(name)
    layer, kind = layout.split_name(name)
    if layer is None:
        key = layout.MCORE_GLOBAL[kind]
    elif moe and kind == "mlp_norm" and local_moe_norm:
        key = MOE_LOCAL_NORM_KEY
    elif moe and kind in MOE_KEYS:
        key = MOE_KEYS[kind]
    else:
        key = "decoder.layers." + layout.MCORE_LAYER_TE[kind]
    return (f"{OPTIMIZER_KEY}{state}.{key}" if state else key), layer


def leading(cfg: ModelConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a logical tensor sits on its key's leading axes, and their sizes: () for a global tensor,
    (layer,) of (num_layers,) for a block's, (layer, expert) of (num_layers, num_experts) for an expert's."""
    layer, _ = layout.split_name(name)
    if layer is None:
        return (), ()
    expert = layout.expert_of(name)
    if expert is None:
        return (layer,), (cfg.num_layers,)
    return (layer, expert), (cfg.num_layers, cfg.num_experts)


def extra_state_keys(cfg: ModelConfig) -> list[str]:
    """The per-layer (and per-expert) ``_extra_state`` objects megatron-core expects even in a non-strict
    load."""
    n = cfg.num_layers
    keys = [
        f"decoder.layers.{module}._extra_state/shard_{i}_{n}"
        for module in layout.MCORE_EXTRA_STATE_MODULES
        for i in range(n)
    ]
    if not cfg.is_moe:
        return keys
    attention = [k for k in keys if ".self_attention." in k]
    return attention + [
        f"decoder.layers.{module}._extra_state/shard_{i}.{e}_{n}.{cfg.num_experts}"
        for module in EXPERT_MODULES
        for i in range(n)
        for e in range(cfg.num_experts)
    ]


def fully_reshardable_master_key(key: str) -> str:
    """The distributed optimizer's model-space save (fully_reshardable) names the fp32 master copy 'param'
    where the plain optimizer (and ``dcp_key``) says 'fp32_param'."""
    plain = OPTIMIZER_KEY + megatron_optim.MASTER
    return OPTIMIZER_KEY + megatron_optim.FULLY_RESHARDABLE_MASTER + key.removeprefix(plain)


def read_common(directory: Path) -> dict[str, Any]:
    """``common.pt``: the non-sharded state (Megatron-LM's args, iteration, scheduler, ...); {} if absent."""
    path = Path(directory) / "common.pt"
    if not path.is_file():
        return {}
    common = load_pt(path)
    if not isinstance(common, dict):
        raise UserError(
            f"{path}: holds a {type(common).__name__}, not the dict megatron-core writes; the file is corrupt"
        )
    return common


class TorchDistReader:
    format = "torch_dist"

    def __init__(self, directory: str | os.PathLike, cfg: ModelConfig, check_files: bool = True):
        self.path = Path(directory)
        self.cfg = cfg
        self.metadata = read_dcp_metadata(self.path)
        self._last_chunk: tuple[tuple, torch.Tensor] | None = None  # row-block reads of one big chunk
        self._index: dict[str, tuple[list[int], list[ChunkStorageMetadata], int]] = {}
        self._runs: dict[tuple, StoredRun | None] = {}  # _stored_run's answers
        self._check_shapes()
        if check_files:
            self._check_files()

    @functools.cached_property
    def common(self) -> dict[str, Any]:
        """common.pt, loaded once (args and iteration are read from it more than once per command)."""
        return read_common(self.path)

    @property
    def iteration(self) -> int:
        """Megatron-LM's iteration from common.pt (0 when it has none)."""
        return megatron_args.saved_iteration(self.common, str(self.path / "common.pt"))

    @property
    def saved_args(self) -> Any:
        """Megatron-LM's args from common.pt (None when it has none, e.g. megastack's own older files)."""
        return self.common.get("args")

    def _check_files(self) -> None:
        """Every data file the metadata names exists and is long enough: fail before writing anything."""
        from megastack.ckpt.manifest import checked_relative

        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            rel = checked_relative(info.relative_path, self.path / ".metadata")
            needed[rel] = max(needed.get(rel, 0), info.offset + info.length)
        for rel, end in sorted(needed.items()):
            path = self.path / rel
            if not path.is_file():
                raise UserError(
                    f"{path}: missing shard file named in {self.path / '.metadata'}; the checkpoint "
                    "is incomplete (copy it again)"
                )
            if path.stat().st_size < end:
                raise UserError(
                    f"{path}: truncated ({path.stat().st_size} bytes, the metadata needs {end}); the "
                    "checkpoint is incomplete or corrupt"
                )

    @property
    def layer_order(self) -> tuple[str, ...] | None:
        """A layer's module order (one of ``megatron_optim.LAYER_ORDERS``) when the distributed optimizer's
        buckets proved it; None otherwise (model-space saves do not say)."""
        if self._distributed is None or len(self._distributed[3]) != 1:
            return None
        return next(iter(self._distributed[3]))

    def optimizer_step(self) -> int | None:
        """Adam's step as Megatron-LM saved it (None: no Megatron-LM optimizer state; megastack's own
        checkpoints keep theirs in megastack.json)."""
        if self._distributed is not None:
            return self._distributed[1]
        return megatron_optim.torch_dist_step(self.common, str(self.path / "common.pt"))

    @functools.cached_property
    def _distributed(self) -> tuple[dict[str, list[tuple[str, int, int]]], int, Any, set[tuple[str, ...]]] | None:
        """Megatron-LM's distributed optimizer state (dp_reshardable: flat buckets, one set per tensor-parallel
        rank) mapped onto the weights: ({state name: [(bucket key, start, end) of each TP rank's shard]}, step,
        its param-groups object, the layer orders the buckets proved); None without one. A replicated weight (a
        norm) is read from TP rank 0."""
        where = str(self.path / "common.pt")
        if megatron_optim.torch_dist_sharding(self.common, where) != "dp_reshardable":
            return None
        tp, pp = (
            megatron_args.get(self.saved_args, f, where) or 1
            for f in ("tensor_model_parallel_size", "pipeline_model_parallel_size")
        )
        if self.cfg.is_moe:
            raise NotBuiltError(
                f"{self.path}: the distributed optimizer's torch_dist buckets are read for dense saves only yet "
                "(save with --dist-ckpt-optim-fully-reshardable, which is read for any model); " + megatron_optim.FIX
            )
        mapping: dict[str, list[tuple[str, int, int]]] = {}
        orders: set[tuple[str, ...]] = set()
        for stage in range(pp):
            shards = []
            for rank in range(tp):
                spans, kinds = self._rank_buckets(rank, stage, tp, pp)
                shards.append(spans)
                orders.add(kinds)
            for name in shards[0]:
                if name in mapping:  # tied embeddings: the last stage's copy holds the first stage's moments
                    continue
                replicated = layout.TP_RULE[layout.split_name(name)[1]] == "replicated"
                mapping[name] = [spans[name] for spans in shards[: 1 if replicated else tp]]
        # the model-parallel ranks' param groups agree (one optimizer config); rank 0's are the source's
        groups = self._stored_object(DISTRIBUTED_KEY + "optimizer/shard_0_1")
        groups = groups[0] if isinstance(groups, list) and len(groups) == 1 else groups
        where = f"{self.path} ({DISTRIBUTED_KEY}optimizer)"
        saved = untrusted.typed(groups, dict, where, "the object", megatron_optim.FIX).get("param_groups")
        step = megatron_optim.groups_step(saved, where)
        return mapping, step, groups, orders

    def _rank_buckets(
        self, rank: int, stage: int, tp: int, pp: int
    ) -> tuple[dict[str, tuple[str, int, int]], tuple[str, ...]]:
        """Where the buckets of TP rank ``rank`` on pipeline stage ``stage`` (``dp_group_idx_<stage * tp +
        rank>``: its model-parallel rank) hold each of its shards' states: {state name: (bucket key, start,
        end)}, and the layer's module order the master weights prove."""
        prefix = DISTRIBUTED_KEY.replace("dp_group_idx_0", f"dp_group_idx_{stage * tp + rank}")
        sizes = self._stored_object(prefix + "per_bucket_numel_unpadded/shard_0_1")
        try:  # [[{(param dtype, grad dtype): [bucket sizes]}]]: one model chunk, one gradient buffer
            ((by_dtype,),) = sizes
            ((dtype_key, bucket_sizes),) = by_dtype.items()
            bucket_sizes = [int(n) for n in bucket_sizes]
        except (TypeError, ValueError, AttributeError):
            raise NotBuiltError(
                f"{self.path}: the distributed optimizer's bucket sizes {str(sizes)[:80]} (TP {rank}, PP {stage}) "
                "are not one dense buffer's; " + megatron_optim.FIX
            ) from None

        def key(bucket: int, state: str) -> str:
            return f"{prefix}gbuf_idx_0.dtype_{dtype_key}.bucket_idx_{bucket}.{state}"

        sd = self.metadata.state_dict_metadata
        for b, n in enumerate(bucket_sizes):
            for state in ("param", *megatron_optim.MOMENTS):
                md = sd.get(key(b, state))
                if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != (n,):
                    raise UserError(f"{self.path}: '{key(b, state)}' is missing or not {n} elements; it is corrupt")
        numels = {
            n: math.prod(layout.tp_shard_shape(layout.split_name(n)[1], layout.logical_shape(self.cfg, n), tp))
            for n in layout.logical_names(self.cfg)
        }
        for kinds in megatron_optim.LAYER_ORDERS:  # the module order whose layout the master weights prove
            local = [(n, numels[n]) for n in megatron_optim.stage_module_order(self.cfg, kinds, stage, pp)]
            spans = megatron_optim.buffer_spans(local, bucket_sizes)
            if spans is not None and all(
                megatron_optim.master_matches(
                    lambda lo, hi, b=b, a=a: self._flat(key(b, "param"), a + lo, a + hi),
                    *self._shard_ends(n, rank, tp),
                    e - a,
                )
                for n, (b, a, e) in spans.items()
            ):
                break
        else:
            raise NotBuiltError(
                f"{self.path}: the distributed optimizer's buckets ({bucket_sizes} elements, TP {rank}, PP {stage}) "
                "do not hold the weights in any parameter order megatron-core's GPTModel has (local or Transformer "
                "Engine spec); " + megatron_optim.FIX
            )
        # bf16/fp16 weights: the bucket's fp32 `param` is also each weight's master copy
        states = (
            megatron_optim.MOMENTS
            if dtype_key[0] == torch.float32
            else (megatron_optim.MASTER, *megatron_optim.MOMENTS)
        )
        return {
            layout.state_name(m, n): (key(b, "param" if m == megatron_optim.MASTER else m), a, e)
            for n, (b, a, e) in spans.items()
            for m in states
        }, kinds

    def _flat(self, key: str, start: int, end: int) -> torch.Tensor:
        return self._assemble(
            key, [start], [end - start], list(self._overlaps(key, [start], [end - start])), torch.float32
        )

    def _flat_spans_of(
        self, name: str, span: tuple[str, int, int], local: list[Piece] | None
    ) -> list[tuple[str, int, int, tuple[int, ...]]]:
        """The bucket ranges holding ``local`` pieces of one TP shard whose state lies flat in ``span``:
        [(key, start, end, shape)]. Rows of the shard are contiguous in the bucket, so row pieces are read alone;
        anything else reads the whole shard (to be narrowed)."""
        key, start, end = span
        shard = layout.tp_shard_shape(
            layout.split_name(name)[1], layout.logical_shape(self.cfg, name), len(self._flat_spans(name))
        )
        if not local or local[0].dim != 0:
            return [(key, start, end, shard)]
        row = math.prod(shard[1:])
        return [(key, start + p.start * row, start + (p.start + p.length) * row, (p.length, *shard[1:])) for p in local]

    def _flat_shard(self, name: str, span: tuple[str, int, int], local: list[Piece] | None) -> torch.Tensor:
        """``local`` pieces of one TP shard of Adam's state ``name``, read from its bucket span."""
        ranges = self._flat_spans_of(name, span, local)
        parts = [self._flat(key, a, b).view(shape) for key, a, b, shape in ranges]
        if not local or local[0].dim != 0:
            return take_pieces(parts[0], local)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _shard_ends(self, name: str, rank: int, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first and last rows of TP rank ``rank``'s shard of a weight (a 1-D weight: itself twice), read
        without the rest of it: enough to tell the weights apart in a buffer."""
        shape = layout.logical_shape(self.cfg, name)
        if len(shape) < 2:
            weight = self.read(name)
            return weight, weight
        pieces = layout.tp_pieces(layout.split_name(name)[1], shape, rank, tp)
        if pieces[0].dim == 1:  # a column block: rows 0 and -1 of the weight, narrowed to it
            cols = pieces[0]
            rows = self.read(name, [Piece(0, 0, 1)]), self.read(name, [Piece(0, shape[0] - 1, 1)])
            return tuple(r.narrow(1, cols.start, cols.length) for r in rows)
        last = pieces[-1].start + pieces[-1].length - 1
        return self.read(name, [Piece(0, pieces[0].start, 1)]), self.read(name, [Piece(0, last, 1)])

    def _stored_object(self, key: str) -> Any:
        """A non-tensor DCP entry (megatron-core's ShardedObject: torch.save bytes), loaded weights-only."""
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, BytesStorageMetadata):
            raise UserError(f"{self.path}: entry '{key}' is missing; the distributed optimizer's state is incomplete")
        info = self.metadata.storage_data.get(MetadataIndex(key))
        if info is None or info.length > MAX_OBJECT_BYTES:
            raise UserError(f"{self.path}: entry '{key}' has no storage or is over 64 MiB; the metadata is corrupt")
        path = self.path / info.relative_path
        if not path.is_file() or path.stat().st_size < info.offset + info.length:
            raise UserError(f"{path}: missing or truncated (entry '{key}'); the checkpoint is incomplete")
        with open(path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        return load_pt(path, data=io.BytesIO(raw))

    def megatron_resume_state(self, step: int) -> dict[str, Any]:
        """common.pt's optimizer and scheduler entries for a grown output Megatron-LM resumes with Adam's state
        (``megatron_optim.resume_state``)."""
        common, where = self.common, str(self.path / "common.pt")
        # dp_reshardable keeps each key of the distributed optimizer's state dict in its own stored object
        optimizer = {"optimizer": self._distributed[2]} if self._distributed is not None else common.get("optimizer")
        mixed = self.dtype("embedding") != torch.float32
        scaler = None  # the distributed optimizer's buckets keep fp16's loss scaler in a stored object
        if (
            self._distributed is not None
            and DISTRIBUTED_KEY + "grad_scaler/shard_0_1" in self.metadata.state_dict_metadata
        ):
            scaler = self._stored_object(DISTRIBUTED_KEY + "grad_scaler/shard_0_1")
            scaler = scaler[0] if isinstance(scaler, list) and len(scaler) == 1 else scaler  # a ShardedObject's list
        scheduler = common.get("opt_param_scheduler")
        return megatron_optim.resume_state(optimizer, scheduler, step, where, mixed, scaler)

    def optimizer_states(self) -> tuple[str, ...]:
        """Which of Adam's states this checkpoint holds for every weight (megastack's trainer writes them at
        the end of a stage), each checked like the weights; () when it holds none."""
        if self._distributed is not None:  # Megatron-LM's distributed optimizer: mapped and proven above
            mapped = {layout.split_state(name)[0] for name in self._distributed[0]}
            return tuple(s for s in layout.OPTIMIZER_STATES if s in mapped)
        keys = self.metadata.state_dict_metadata
        present = tuple(
            state for state in layout.OPTIMIZER_STATES if self._key(layout.state_name(state, "embedding")) in keys
        )
        for state in present:
            self._check_shapes([layout.state_name(state, n) for n in layout.logical_names(self.cfg)])
        return present

    def _check_shapes(self, names: list[str] | None = None) -> None:
        sd = self.metadata.state_dict_metadata
        checked: set[str] = set()
        for name in names or layout.logical_names(self.cfg):
            key = self._key(name)
            if key not in sd or not isinstance(sd[key], TensorStorageMetadata):
                experts = f", {self.cfg.num_experts} experts" if self.cfg.is_moe else ""
                raise UserError(
                    f"{self.path}: tensor '{key}' is missing; the checkpoint does not match the "
                    f"model config ({self.cfg.num_layers} layers{experts}, tied={self.cfg.tie_embeddings})"
                )
            expected = (*leading(self.cfg, name)[1], *layout.logical_shape(self.cfg, name))
            if tuple(sd[key].size) != expected:
                raise UserError(
                    f"{self.path}: tensor '{key}' has shape {tuple(sd[key].size)} but the model "
                    f"config gives {expected}; pass the matching model config"
                )
            if key not in checked:
                self._check_tiling(key, sd[key])
                checked.add(key)
        for index, info in self.metadata.storage_data.items():
            if getattr(info, "transform_descriptors", None):
                raise UserError(
                    f"{self.path}: chunk {index.fqn} uses storage transforms "
                    f"{list(info.transform_descriptors)}; only plain torch_dist files are supported"
                )

    def _check_tiling(self, key: str, md: TensorStorageMetadata) -> None:
        """The chunks of ``key`` tile its global shape exactly: inside it, no two overlapping, and their
        volumes summing to the whole (so no hole), checked once here rather than trusted at every read (a
        hole would be uninitialised memory in a published output)."""
        size = tuple(md.size)
        chunks = sorted(md.chunks, key=lambda c: tuple(c.offsets))
        total = 0
        for c in chunks:
            if len(c.offsets) != len(size) or any(
                o < 0 or n < 1 or o + n > s for o, n, s in zip(c.offsets, c.sizes, size)
            ):
                raise UserError(
                    f"{self.path / '.metadata'}: a chunk of '{key}' (offsets {list(c.offsets)}, sizes "
                    f"{list(c.sizes)}) lies outside its shape {list(size)}; the metadata is corrupt"
                )
            if MetadataIndex(key, c.offsets) not in self.metadata.storage_data:
                raise UserError(
                    f"{self.path / '.metadata'}: a chunk of '{key}' at {list(c.offsets)} has no stored "
                    "bytes; the metadata is corrupt"
                )
            volume = 1
            for n in c.sizes:
                volume *= n
            total += volume
        whole = 1
        for n in size:
            whole *= n
        starts = [c.offsets[0] for c in chunks]
        for i, a in enumerate(chunks):  # only chunks starting before a's end on dim 0 can overlap it
            for b in chunks[i + 1 : bisect.bisect_left(starts, a.offsets[0] + a.sizes[0])]:
                if all(max(x, y) < min(x + n, y + m) for x, n, y, m in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                    raise UserError(
                        f"{self.path / '.metadata'}: chunks of '{key}' at {list(a.offsets)} and "
                        f"{list(b.offsets)} overlap; the metadata is corrupt"
                    )
        if total != whole:
            raise UserError(
                f"{self.path / '.metadata'}: the chunks of '{key}' cover {total} of its {whole} elements "
                "(a hole); the metadata is corrupt or the checkpoint incomplete"
            )

    def dtype(self, name: str) -> torch.dtype:
        if layout.split_state(name)[0] and self._flat_spans(name) is not None:
            return torch.float32
        return self.metadata.state_dict_metadata[self._key(name)].properties.dtype

    def _regions(self, name: str, pieces: list[Piece] | None) -> tuple[str, list[tuple[list[int], list[int]]], int]:
        """DCP key, [(offsets, sizes)] in the stored tensor, and the concat dim in the result."""
        key = self._key(name)
        shape = layout.logical_shape(self.cfg, name)
        lead = list(leading(self.cfg, name)[0])
        lead_size = [1] * len(lead)
        if not pieces:
            return key, [(lead + [0] * len(shape), lead_size + list(shape))], 0
        regions = []
        for p in pieces:
            offsets, sizes = [0] * len(shape), list(shape)
            offsets[p.dim], sizes[p.dim] = p.start, p.length
            regions.append((lead + offsets, lead_size + sizes))
        return key, regions, pieces[0].dim

    def _chunk_index(self, key: str) -> tuple[list[int], list[ChunkStorageMetadata], int]:
        """A key's chunks sorted by their start on dim 0, and the longest extent on dim 0: lookups
        touch only the chunks near a region (a 70B checkpoint has thousands per key)."""
        if key not in self._index:
            chunks = sorted(self.metadata.state_dict_metadata[key].chunks, key=lambda c: c.offsets[0])
            self._index[key] = ([c.offsets[0] for c in chunks], chunks, max((c.sizes[0] for c in chunks), default=1))
        return self._index[key]

    def _overlaps(self, key: str, offsets: list[int], sizes: list[int]):
        starts, chunks, longest = self._chunk_index(key)
        first = bisect.bisect_left(starts, offsets[0] - longest + 1)
        last = bisect.bisect_left(starts, offsets[0] + sizes[0])
        for chunk in chunks[first:last]:
            lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if all(h > l_ for l_, h in zip(lo, hi)):
                yield chunk, lo, hi

    def sources(self, name: str, pieces: list[Piece] | None = None) -> dict[str, int]:
        """Bytes of the requested region in each file (what a reader with the chunk cache reads when
        the request follows the stored chunking)."""
        flat = self._flat_spans(name) if layout.split_state(name)[0] else None
        if flat is not None:  # the bucket ranges read() reads
            kind = layout.split_name(name)[1]
            plan, _ = layout.tp_read_plan(kind, layout.logical_shape(self.cfg, name), len(flat), pieces)
            requests = [
                (key, [a], [b - a]) for r, local in plan for key, a, b, _ in self._flat_spans_of(name, flat[r], local)
            ]
        else:
            key, regions, _ = self._regions(name, pieces)
            requests = [(key, offsets, sizes) for offsets, sizes in regions]
        size = self.dtype(name).itemsize
        out: dict[str, int] = {}
        for key, offsets, sizes in requests:
            for chunk, lo, hi in self._overlaps(key, offsets, sizes):
                info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
                numel = 1
                for a, b in zip(lo, hi):
                    numel *= b - a
                out[info.relative_path] = out.get(info.relative_path, 0) + numel * size
        return out

    def max_chunk_bytes(self) -> int:
        """The largest stored chunk: what the reader's chunk cache may hold."""
        return max((info.length for info in self.metadata.storage_data.values()), default=0)

    def _load_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        """One stored chunk; the last one is kept, so consecutive reads of its row blocks load it once."""
        cache_key = (key, tuple(chunk.offsets))
        if self._last_chunk is not None and self._last_chunk[0] == cache_key:
            return self._last_chunk[1]
        self._last_chunk = None
        tensor = self._torch_load_chunk(key, chunk, "cpu")
        self._last_chunk = (cache_key, tensor)
        return tensor

    def _torch_load_chunk(self, key: str, chunk: ChunkStorageMetadata, map_location: str) -> torch.Tensor:
        """One stored chunk through torch.load (``map_location`` "meta": its layout only, no values read)."""
        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        path = self.path / info.relative_path
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise UserError(
                f"{path}: missing shard file named in {self.path / '.metadata'}; the checkpoint "
                "is incomplete (copy it again)"
            ) from None
        with f:
            if os.fstat(f.fileno()).st_size < info.offset + info.length:
                raise UserError(
                    f"{path}: truncated (chunk of '{key}' ends past the end of the file); the "
                    "checkpoint is incomplete or corrupt"
                )
            if map_location != "meta":
                self._read_ahead.after(f.fileno(), info.relative_path, info.offset)
            try:
                # torch.load reads the storages straight from the file: no second copy of the bytes.
                window = FileWindow(f, info.offset, info.length)
                tensor = torch.load(window, map_location=map_location, weights_only=True)
            except Exception as exc:
                raise UserError(
                    f"{path}: chunk of '{key}' is unreadable ({type(exc).__name__}); the file is corrupt"
                ) from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes):
            raise UserError(f"{path}: chunk of '{key}' does not match its metadata; the file is corrupt")
        return tensor

    @functools.cached_property
    def _read_ahead(self) -> ReadAhead:
        return ReadAhead((i.relative_path, i.offset, i.length) for i in self.metadata.storage_data.values())

    def _assemble(
        self, key: str, offsets: list[int], sizes: list[int], overlaps: list, dtype: torch.dtype
    ) -> torch.Tensor:
        """A region read from the chunks it overlaps: each overlap's bytes go from the file straight into
        place (``preadv``), so no chunk is loaded whole or twice (a row block of a tensor stored as column
        chunks, as fc2 is, touches every chunk; HF's gate or up rows, part of one fc1 chunk, only that one).
        A chunk whose values are not one plain run, or whose overlap is many small scattered pieces, is
        loaded (through the one-chunk cache) and copied from."""
        out = streaming.empty(sizes, dtype)  # a reused buffer while streaming
        covered = 0
        for chunk, lo, hi in overlaps:
            dst = out
            for d, (a, b) in enumerate(zip(lo, hi)):
                dst = dst.narrow(d, a - offsets[d], b - a)
            run = self._stored_run(key, chunk)
            segments = _segments(run, chunk, lo, hi, out, offsets) if run is not None and run.dtype == dtype else None
            if segments is None:
                src = self._load_chunk(key, chunk)
                for d, (a, b) in enumerate(zip(lo, hi)):
                    src = src.narrow(d, a - chunk.offsets[d], b - a)
                dst.copy_(src)
            else:
                fd = os.open(self.path / run.relative_path, os.O_RDONLY)
                try:
                    self._read_ahead.after(fd, run.relative_path, run.span_offset)
                    for start, views in segments:
                        _preadv_all(fd, views, start, self.path / run.relative_path)
                finally:
                    os.close(fd)
            covered += dst.numel()
        if covered != out.numel():
            raise UserError(
                f"{self.path}: the chunks of '{key}' do not cover the requested region; the "
                "checkpoint metadata is inconsistent"
            )
        return out

    def _stored_run(self, key: str, chunk: ChunkStorageMetadata) -> StoredRun | None:
        """Where a stored chunk's values lie when they are one C-contiguous run in the file (torch.save of a
        contiguous tensor: what DCP and megastack write), found by torch's own loader on the meta device (it
        parses the blob and reads no values); None otherwise."""
        cache_key = (key, tuple(chunk.offsets))
        if cache_key in self._runs:
            return self._runs[cache_key]
        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        meta = self._torch_load_chunk(key, chunk, "meta")
        record = getattr(meta.untyped_storage(), "_checkpoint_offset", None)  # the storage's record, in the blob
        first = meta.storage_offset() * meta.element_size()
        last = first + meta.numel() * meta.element_size()
        run = None
        if (
            isinstance(record, int)
            and meta.is_contiguous()
            and record >= 0
            and last <= meta.untyped_storage().nbytes()
            and record + last <= info.length
        ):
            run = StoredRun(info.relative_path, info.offset, info.offset + record + first, meta.dtype)
        self._runs[cache_key] = run
        return run

    def _key(self, name: str) -> str:
        """The DCP key of a logical name (``dcp_key``); the distributed optimizer's model-space save
        (fully_reshardable) names the fp32 master copy 'param', where the plain optimizer says 'fp32_param'."""
        key, _ = dcp_key(name, self.cfg.is_moe, self._moe_norm_is_local)
        if layout.split_state(name)[0] == megatron_optim.MASTER and self._master_is_param:
            key = fully_reshardable_master_key(key)
        return key

    @functools.cached_property
    def _moe_norm_is_local(self) -> bool:
        """A mixture of experts saved by megatron-core's local spec: its MoE norm under the dense fused name."""
        sd = self.metadata.state_dict_metadata
        return MOE_KEYS["mlp_norm"] not in sd and MOE_LOCAL_NORM_KEY in sd

    @property
    def te_names(self) -> bool | None:
        """Whether the norms are named as Transformer Engine's spec names them, where the file tells (a mixture
        of experts; a dense model's torch_dist keys are the same under both specs: None). Output follows it."""
        return not self._moe_norm_is_local if self.cfg.is_moe else None

    @functools.cached_property
    def _master_is_param(self) -> bool:
        """A fully_reshardable save of bf16/fp16 weights: its 'param' entries are the fp32 master copies (in fp32
        training they repeat the weights, and are not read)."""
        sharding = megatron_optim.torch_dist_sharding(self.common, str(self.path / "common.pt"))
        return sharding == "fully_reshardable" and self.dtype("embedding") != torch.float32

    def _flat_spans(self, name: str) -> list[tuple[str, int, int]] | None:
        """Where Adam's state ``name`` lies in the distributed optimizer's buckets, one span per TP shard (None:
        not there)."""
        return self._distributed[0].get(name) if self._distributed is not None else None

    def read(self, name: str, pieces: list[Piece] | None = None) -> torch.Tensor:
        """The requested region. A region that is exactly one stored chunk whose values are not one plain
        run in the file is that chunk's tensor, shared with the chunk cache (no copy): callers must not
        modify what they get in place. Every other region is read into a buffer of ``streaming.empty`` (a
        plain run: a reused buffer, no fresh pages faulted in and zeroed as torch.load's storage would be)."""
        flat = self._flat_spans(name) if layout.split_state(name)[0] else None
        if flat is not None:  # the TP shards' slices of their ranks' buckets that hold the pieces
            kind = layout.split_name(name)[1]
            plan, merge = layout.tp_read_plan(kind, layout.logical_shape(self.cfg, name), len(flat), pieces)
            return layout.tp_join(kind, plan, merge, [self._flat_shard(name, flat[r], local) for r, local in plan])
        key, regions, cat_dim = self._regions(name, pieces)
        lead = len(leading(self.cfg, name)[0])  # leading layer (and expert) dims, dropped here
        parts = []
        for offsets, sizes in regions:
            overlaps = list(self._overlaps(key, offsets, sizes))
            chunk = overlaps[0][0] if len(overlaps) == 1 else None
            if (
                chunk is not None
                and list(chunk.offsets) == offsets
                and list(chunk.sizes) == sizes
                and self._stored_run(key, chunk) is None
            ):
                region = self._load_chunk(key, chunk)  # the whole stored chunk: no copy
            else:
                region = self._assemble(key, offsets, sizes, overlaps, self.dtype(name))
            for _ in range(lead):
                region = region[0]
            parts.append(region)
        return layout.cat(parts, cat_dim)


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
SMALL_READ_BYTES = 64 << 10  # scattered pieces smaller than this on average: load the chunk and copy instead


@dataclass(frozen=True)
class StoredRun:
    """A chunk's values, C-contiguous in ``relative_path`` from ``data_offset``; its blob starts at
    ``span_offset`` (the .metadata entry's offset)."""

    relative_path: str
    span_offset: int
    data_offset: int
    dtype: torch.dtype


def _segments(
    run: StoredRun, chunk: ChunkStorageMetadata, lo: list[int], hi: list[int], out: torch.Tensor, offsets: list[int]
) -> list[tuple[int, list[memoryview]]] | None:
    """The reads that put the box [lo, hi) of a stored chunk into its place in ``out`` (the region at
    ``offsets``): one memoryview per run contiguous in both, runs adjacent in the file joined into one
    ``preadv`` (at most IOV_MAX views). None when that is many small scattered reads."""
    size, dims = run.dtype.itemsize, len(lo)
    src_stride = [1] * dims
    for d in range(dims - 2, -1, -1):
        src_stride[d] = src_stride[d + 1] * chunk.sizes[d + 1]
    dst_stride = out.stride()
    # Inner dims whole in both the chunk and ``out`` join the dim before them into one run.
    inner, length = dims - 1, hi[-1] - lo[-1]
    while inner > 0 and hi[inner] - lo[inner] == chunk.sizes[inner] == out.shape[inner]:
        inner -= 1
        length *= hi[inner] - lo[inner]
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    reads: list[tuple[int, list[memoryview]]] = []
    end = -1
    for index in itertools.product(*(range(lo[d], hi[d]) for d in range(inner))):
        src = sum((i - chunk.offsets[d]) * src_stride[d] for d, i in enumerate(index))
        dst = sum((i - offsets[d]) * dst_stride[d] for d, i in enumerate(index))
        src += (lo[inner] - chunk.offsets[inner]) * src_stride[inner]
        dst += (lo[inner] - offsets[inner]) * dst_stride[inner]
        start = run.data_offset + src * size
        piece = view[dst * size : (dst + length) * size]
        if start == end and len(reads[-1][1]) < IOV_MAX:
            reads[-1][1].append(piece)
        else:
            reads.append((start, [piece]))
        end = start + piece.nbytes
    total = sum(v.nbytes for _, views in reads for v in views)
    return None if len(reads) > 1 and total < len(reads) * SMALL_READ_BYTES else reads


def _preadv_all(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Fill ``views`` from ``offset`` on, however many calls the kernel takes."""
    first = 0
    while first < len(views):
        got = os.preadv(fd, views[first:], offset)
        if got <= 0:
            raise UserError(f"{path}: ended early while reading a chunk; the file is truncated")
        offset += got
        while first < len(views) and got >= views[first].nbytes:
            got -= views[first].nbytes
            first += 1
        if got:
            views[first] = views[first][got:]


class FileWindow(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``start`` in an open file: torch.load on one
    chunk inside a .distcp file without reading the chunk into a bytes object first."""

    def __init__(self, f: io.BufferedReader, start: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.position = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.position))
        self.f.seek(self.start + self.position)
        got = self.f.readinto(memoryview(buffer).cast("B")[:n])
        self.position += got
        return got


@dataclass
class ChunkRecord:
    key: str
    global_size: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    relative_path: str
    offset: int
    length: int


@dataclass
class ObjectRecord:
    key: str
    relative_path: str
    offset: int
    length: int


class TorchDistWriter:
    """Writes a model in megatron-core's torch_dist layout, in chunks of at most ``chunk_bytes``: each
    layer's tensor is cut into row blocks, so memory stays a few chunks whatever the model size
    (megatron-core loads any chunking)."""

    format = "torch_dist"
    # Megatron-LM's torch_dist save writes two files per rank (its thread_count=2); here each file's sha256
    # runs in a thread of its own, so a rank hashes on two cores, not one (sha256 is the writer's largest CPU
    # cost, 1.1 GB/s a thread on this machine, slower than its disk): 7B grow x4 on 1 rank, source cached,
    # 14.2-14.3 s with one file (and 32 MiB chunks), 10.8-11.1 s with two (peak RSS 400 -> 505 MB). Chunks
    # of 16 MiB, so one file's thread may trail by two (HashingWriter.PENDING_BYTES) while the caller writes
    # the next chunk into the other file.
    FILES_PER_RANK = 2

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        chunk_bytes: int = 16 << 20,
        args: Any = None,
        iteration: int = 0,
        optimizer_states: tuple[str, ...] = (),
        resume_state: dict[str, Any] | None = None,
        te_names: bool = True,
    ):
        """``args``: Megatron-LM's args for ``common.pt`` (``megatron_args.output_args``; fresh when None).
        ``te_names``: a mixture of experts' norm under TE's key, else the local spec's (as the run that loads it).
        ``optimizer_states``: Adam's states written beside the weights (fp32, optimizer.state.* keys).
        ``resume_state``: common.pt's optimizer and scheduler entries, so Megatron-LM resumes with them; the
        distributed optimizer's (``megatron_optim.distributed_state``) make the Adam entries its
        fully_reshardable ones: the master named ``param``, and in fp32 training the weight written as it."""
        self.cfg = cfg
        self.resume_state = dict(resume_state or {})
        self.fully_reshardable = megatron_optim.writes_fully_reshardable(resume_state)
        self.dtype = dtype
        self.optimizer_states = tuple(optimizer_states)
        self.chunk_bytes = chunk_bytes
        self.iteration = iteration
        self.te_names = te_names
        self.args = (
            args
            if args is not None
            else megatron_args.output_args(
                None, cfg, None, None, dtype, iteration=iteration, new_stage=False, te_names=te_names
            )
        )

    def units(self) -> list[Unit]:
        units = []
        weights = layout.logical_names(self.cfg)
        states = [layout.state_name(state, name) for state in self.optimizer_states for name in weights]
        # fp32 training under the distributed optimizer: its master copy is the weight, saved as one more entry
        masters_from_weights = self.fully_reshardable and megatron_optim.MASTER not in self.optimizer_states
        entries = [(name, name) for name in weights + states]
        if masters_from_weights:
            entries += [(layout.state_name(megatron_optim.MASTER, name), name) for name in weights]
        for name, source in entries:  # the entry written, the tensor produced for it
            size = DTYPE_BYTES[self.dtype_of(name)]
            shape = layout.logical_shape(self.cfg, name)
            # Cut along the dimension tensor parallelism cuts (columns of proj/fc2, rows elsewhere), as
            # megatron's own chunks are: a block then reads the source chunks it overlaps once.
            dim = 1 if layout.TP_RULE[layout.split_name(name)[1]] == "cols" else 0
            line_bytes = size
            for d, s in enumerate(shape):
                if d != dim:
                    line_bytes *= s
            block = max(1, self.chunk_bytes // line_bytes)
            for start in range(0, shape[dim], block):
                length = min(block, shape[dim] - start)
                whole = length == shape[dim]
                units.append(
                    Unit(
                        key=name if whole else f"{name}#{start}",
                        nbytes=length * line_bytes,
                        requests=[Request(source, None if whole else (Piece(dim, start, length),))],
                        meta={"write_as": name} if source != name else {},
                    )
                )
        # The _extra_state objects are a few bytes each: one unit, written with the first chunks.
        units.append(Unit(key="_extra_state", nbytes=0, requests=[], meta={"objects": True}))
        return units

    def write_units(
        self, directory: str | os.PathLike, units: list[Unit], produce: Produce, rank: int
    ) -> list[ChunkRecord | ObjectRecord]:
        """This rank's chunks, each into the emptier of its FILES_PER_RANK files (``__{rank}_{i}.distcp``,
        as Megatron-LM names them); a file is created with its first chunk."""
        records: list[ChunkRecord | ObjectRecord | FileHash] = []
        if not units:
            return records
        relatives = [f"__{rank}_{i}.distcp" for i in range(self.FILES_PER_RANK)]
        streams: list[HashingWriter | None] = [None] * len(relatives)
        with contextlib.ExitStack() as files:

            def stream_for() -> tuple[HashingWriter, str]:
                index = min(range(len(streams)), key=lambda i: -1 if streams[i] is None else streams[i].tell())
                if streams[index] is None:
                    streams[index] = HashingWriter(
                        files.enter_context(open_output(Path(directory) / relatives[index])), index
                    )
                return streams[index], relatives[index]

            def produced() -> Iterator[tuple[Unit, Request | None, list[Piece] | None, torch.Tensor | None]]:
                for unit in units:
                    if unit.meta.get("objects"):
                        yield unit, None, None, None
                        continue
                    for request in unit.requests:
                        pieces = list(request.pieces) if request.pieces else None
                        yield unit, request, pieces, produce(request.name, pieces)

            for unit, request, pieces, tensor in ahead(produced()):  # the next chunk is read while this is written
                if request is None:
                    stream, relative = stream_for()
                    for key in extra_state_keys(self.cfg):
                        offset = stream.tell()
                        torch.save([None], stream)
                        records.append(ObjectRecord(key, relative, offset, stream.tell() - offset))
                    continue
                name = unit.meta.get("write_as", request.name)
                stream, relative = stream_for()
                records.append(self._write_chunk(stream, relative, name, tensor, pieces))
            for stream in streams:
                if stream is not None:
                    stream.flush()
                    os.fsync(stream.f.fileno())
        records += [stream.file_hash(rel) for stream, rel in zip(streams, relatives) if stream is not None]
        return records

    def dtype_of(self, name: str) -> torch.dtype:
        return torch.float32 if layout.split_state(name)[0] else self.dtype

    def _write_chunk(
        self, stream: HashingWriter, relative: str, name: str, tensor: torch.Tensor, pieces: list[Piece] | None
    ) -> ChunkRecord:
        key, _ = dcp_key(name, self.cfg.is_moe, local_moe_norm=not self.te_names)
        if self.fully_reshardable and layout.split_state(name)[0] == megatron_optim.MASTER:
            key = fully_reshardable_master_key(key)
        shape = layout.logical_shape(self.cfg, name)
        expected = pieces_shape(shape, pieces)
        if tuple(tensor.shape) != expected:
            raise RuntimeError(f"produced {name} with shape {tuple(tensor.shape)}, expected {expected}")
        dtype = self.dtype_of(name)
        tensor = tensor.to(dtype).contiguous()
        offsets = [0] * len(shape)
        if pieces:
            offsets[pieces[0].dim] = pieces[0].start
        lead, lead_size = leading(self.cfg, name)
        for _ in lead:
            tensor = tensor.unsqueeze(0)
        global_size, offsets = (*lead_size, *shape), (*lead, *offsets)
        offset = stream.tell()
        # The format torch.save writes (what DCP's reader torch.loads), its CRC computed beside the write; only
        # this tensor's bytes, so a view is written as it is (torch.save would write its parent's storage).
        save_streaming(LazyTensor(tuple(tensor.shape), dtype, lambda: tensor), stream)
        return ChunkRecord(
            key, tuple(global_size), offsets, tuple(tensor.shape), dtype, relative, offset, stream.tell() - offset
        )

    def finalize(self, directory: str | os.PathLike, results: list[list[Any]]) -> None:
        directory = Path(directory)
        state: dict[str, Any] = {}
        storage: dict[MetadataIndex, Any] = {}
        for records in results:
            for r in records:
                if isinstance(r, FileHash):
                    continue
                if isinstance(r, ObjectRecord):
                    state[r.key] = BytesStorageMetadata()
                    storage[MetadataIndex(r.key)] = StorageInfo(r.relative_path, r.offset, r.length)
                    continue
                md = state.setdefault(
                    r.key,
                    TensorStorageMetadata(
                        properties=TensorProperties(dtype=r.dtype), size=torch.Size(r.global_size), chunks=[]
                    ),
                )
                md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(r.offsets), sizes=torch.Size(r.sizes)))
                storage[MetadataIndex(r.key, r.offsets)] = StorageInfo(r.relative_path, r.offset, r.length)
        for md in state.values():
            if isinstance(md, TensorStorageMetadata):
                md.chunks.sort(key=lambda c: tuple(c.offsets))
        metadata = Metadata(
            state_dict_metadata=state, storage_data=storage, storage_meta=StorageMeta(), version=CURRENT_DCP_VERSION
        )
        write_dcp_metadata(metadata, directory / ".metadata")
        (directory / "metadata.json").write_text(json.dumps(METADATA_JSON))
        save_pt(self.common_state(), directory / "common.pt")

    def common_state(self) -> dict[str, Any]:
        """What Megatron-LM's ``save_checkpoint`` puts in ``common.pt`` and its ``load_checkpoint`` needs to
        resume (``iteration``: without it Megatron-LM exits without training unless --finetune)."""
        version = megatron_args.CHECKPOINT_VERSION
        return {"args": self.args, "checkpoint_version": version, "iteration": self.iteration} | self.resume_state

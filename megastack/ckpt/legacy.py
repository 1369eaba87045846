"""Megatron-LM's legacy per-rank checkpoints: ``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt``.

Each file holds one (TP rank, PP stage)'s ``model`` state dict with stage-local layer numbering, plus
``args`` (Megatron-LM's argparse.Namespace, see ``megatron_args``), ``checkpoint_version`` and ``iteration``;
Megatron-LM's training saves add ``optimizer``, ``opt_param_scheduler``, ``rng_state`` (and
``distrib_optim.pt`` beside the file); growth reads past them, except Adam's moments under
``--carry-optimizer`` (``megatron_optim``: each rank's state mapped onto its weights, then read like them),
and writes Megatron's optimizer back for the grown model: the plain optimizer's ``optimizer``, or the
distributed optimizer's param groups and ``distrib_optim.pt``, and ``opt_param_scheduler``.
Files are opened with ``torch.load(mmap=True, weights_only=True)``: tensors stay on disk until a slice is
copied out, so reading one logical tensor touches only the shards that hold the requested rows.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megastack import layout
from megastack.ckpt import megatron_args, megatron_optim
from megastack.ckpt.base import FileHash, HashingWriter, Produce, Request, Unit
from megastack.ckpt.safe_load import load_pt
from megastack.ckpt.torch_zip import LazyTensor, save_streaming
from megastack.compat import streaming
from megastack.config import ModelConfig
from megastack.errors import NotBuiltError, UserError
from megastack.fsio import open_output, release_mapped_pages
from megastack.layout import Piece, pieces_shape, take_pieces

FILE_NAME = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
BLOCK_BYTES = 32 << 20  # the largest piece of one tensor the writer produces at once


def rank_dir(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """Megatron-LM's get_checkpoint_name: mp_rank_TT, _PPP with pipeline parallelism, _EEE with expert
    parallelism."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def is_legacy(directory: Path) -> bool:
    return directory.is_dir() and any(_RANK_DIR.match(p.name) for p in directory.iterdir())


def scan_layout(directory: Path) -> tuple[int, int, int]:
    """(TP, PP, EP) from the mp_rank_* directories; a UserError if the set is incomplete or mixed. One suffix
    is a PP rank or an EP rank (Megatron-LM names both alike): the args of the first file say which."""
    found = []
    for p in directory.iterdir():
        m = _RANK_DIR.match(p.name)
        if m:
            found.append(tuple(int(g) if g is not None else None for g in m.groups()))
    suffixes = {sum(g is not None for g in f[1:]) for f in found}
    if len(suffixes) > 1:
        raise UserError(
            f"{directory}: mixes mp_rank_TT, mp_rank_TT_PPP and mp_rank_TT_PPP_EEE directories; the checkpoint "
            "is from two different layouts; keep one"
        )
    ranks = {(t, a or 0, b or 0) for t, a, b in found}
    if suffixes == {1} and _expert_parallel_only(directory):
        ranks = {(t, 0, a) for t, a, _ in ranks}
    tp, pp, ep = (1 + max(r[i] for r in ranks) for i in range(3))
    missing = sorted({(t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)} - ranks)
    if missing:
        t, p, e = missing[0]
        raise UserError(
            f"{directory}: shard {rank_dir(t, p, pp, e, ep)} is missing (expected TP={tp} x PP={pp} x EP={ep} "
            "shards); the checkpoint is incomplete"
        )
    return tp, pp, ep


def _expert_parallel_only(directory: Path) -> bool:
    """Whether mp_rank_TT_NNN names expert-parallel ranks (PP 1, EP > 1), from the first file's args."""
    blob = load_pt(directory / "mp_rank_00_000" / FILE_NAME, mmap=True)
    args = blob.get("args") if isinstance(blob, dict) else None
    where = str(directory / "mp_rank_00_000" / FILE_NAME)
    ep = megatron_args.get(args, "expert_model_parallel_size", where) or 1
    pp = megatron_args.get(args, "pipeline_model_parallel_size", where) or 1
    return ep > 1 and pp == 1


class LegacyReader:
    format = "legacy"

    def __init__(self, directory: str | os.PathLike, cfg: ModelConfig | None = None, open_files: int = 4):
        self.path = Path(directory)
        self.tp, self.pp, self.ep = scan_layout(self.path)
        self._cache: OrderedDict[tuple[int, int, int], dict] = OrderedDict()
        self._open_files = open_files
        first = self._file(0, 0)
        where = str(self._file_path(0, 0))
        self.saved_args = first.get("args")
        self.iteration = megatron_args.saved_iteration(first, where)
        self.cfg = cfg or megatron_args.model_config(self.saved_args, where)
        if self.ep > 1 and (not self.cfg.is_moe or self.cfg.num_experts % self.ep):
            raise UserError(
                f"{self.path}: EP={self.ep} rank directories, but the model has {self.cfg.num_experts} experts "
                "(expert parallelism cuts a mixture of experts evenly); the checkpoint does not match its args"
            )
        if self.cfg.num_layers % self.pp:
            raise UserError(f"{self.path}: PP={self.pp} does not divide num_layers={self.cfg.num_layers}")
        self._check_shapes()

    def _file_path(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        return self.path / rank_dir(tp_rank, pp_rank, self.pp, ep_rank, self.ep) / FILE_NAME

    def _file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict:
        key = (tp_rank, pp_rank, ep_rank)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self._file_path(tp_rank, pp_rank, ep_rank)
        data = load_pt(path, mmap=True)
        if isinstance(data, dict) and "model" not in data and isinstance(data.get("model0"), dict):
            raise UserError(
                f"{path}: saved with virtual pipeline parallelism "
                "(model0, model1, ...); reshard it to a plain pipeline with Megatron-LM's "
                "tools/checkpoint/convert.py first"
            )
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise UserError(f"{path}: no 'model' state dict; not a Megatron-LM checkpoint file")
        self._cache[key] = data
        while len(self._cache) > self._open_files:
            self._cache.popitem(last=False)
        return data

    def _stage(self, name: str) -> int:
        for pp_rank in range(self.pp):
            if layout.stage_holds(name, self.cfg, pp_rank, self.pp):
                return pp_rank
        raise KeyError(name)

    def _expert_rank(self, name: str) -> tuple[int, int]:
        """(EP rank whose file holds ``name``, the first global expert of that rank): an expert's own rank;
        rank 0 for every other tensor (each EP rank's file holds a copy)."""
        expert = layout.expert_of(name)
        if expert is None:
            return 0, 0
        rank = layout.expert_rank(self.cfg, expert, self.ep)
        return rank, layout.rank_experts(self.cfg, rank, self.ep).start

    def _local_tensor(self, name: str, tp_rank: int, ep_rank: int | None = None) -> torch.Tensor:
        state, name = layout.split_state(name)
        pp_rank = self._stage(name)
        offset = layout.stage_layers(self.cfg.num_layers, pp_rank, self.pp).start
        own_rank, first_expert = self._expert_rank(name)
        ep_rank = own_rank if ep_rank is None else ep_rank
        model = self._file(tp_rank, pp_rank, ep_rank)["model"]
        for te_names in (True, False):
            key = layout.mcore_name(name, offset, te_names, self.cfg.is_moe, first_expert)
            if key in model:
                return model[key] if state is None else self._optimizer[0][(tp_rank, pp_rank, ep_rank)][key][state]
        raise UserError(
            f"{self._file_path(tp_rank, pp_rank, ep_rank)}: tensor for '{name}' "
            f"({layout.mcore_name(name, offset, True, self.cfg.is_moe, first_expert)}) is missing; the shard "
            "does not match the model"
        )

    def optimizer_states(self) -> tuple[str, ...]:
        """Adam's states (moments; fp32 masters of bf16 training) when every rank file holds Megatron-LM's
        optimizer state (mapped onto the weights, each checked against its weight's shape), () when none does."""
        return self._optimizer[2] if self._optimizer is not None else ()

    def optimizer_step(self) -> int | None:
        """Adam's step of Megatron-LM's optimizer state (the same in every rank file), None without one."""
        return self._optimizer[1] if self._optimizer is not None else None

    @functools.cached_property
    def _optimizer(self) -> tuple[dict[tuple[int, int, int], megatron_optim.RankStates], int, tuple[str, ...]] | None:
        """Every rank file's Megatron-LM optimizer state mapped onto its weights (views into the files), the
        step and the states held; None when no file has one."""
        if self.cfg.is_moe and self.ep > 1:
            raise NotBuiltError(
                f"{self.path}: Megatron-LM's optimizer state of a mixture of experts under expert parallelism "
                f"(EP {self.ep}: the experts in parameter groups of their own) is not read yet; " + megatron_optim.FIX
            )
        shared = megatron_optim.shared_embedding_keys(self.cfg, self.pp)
        found = {
            (t, p, 0): megatron_optim.legacy_rank_states(self._file(t, p), self._file_path(t, p), shared)
            for t in range(self.tp)
            for p in range(self.pp)
        }
        if all(v is None for v in found.values()):
            return None
        missing = [str(self._file_path(t, p)) for (t, p, _), v in found.items() if v is None]
        if missing:
            raise UserError(f"{missing[0]}: no optimizer state while other rank files have it; the checkpoint is mixed")
        states = {rank: rank_states for rank, (rank_states, _) in found.items()}
        step = megatron_optim.one_step([step for _, step in found.values()], str(self.path))
        held = {state for rank_states in states.values() for entry in rank_states.values() for state in entry}
        return states, step, tuple(s for s in layout.OPTIMIZER_STATES if s in held)

    def megatron_resume_state(self, step: int) -> dict[str, Any]:
        """common.pt's optimizer and scheduler entries for a torch_dist output Megatron-LM resumes with Adam's
        state (``megatron_optim.resume_state``), from the first rank file."""
        blob, where = self._file(0, 0), str(self._file_path(0, 0))
        mixed = self.dtype("embedding") != torch.float32
        return megatron_optim.resume_state(blob.get("optimizer"), blob.get("opt_param_scheduler"), step, where, mixed)

    @property
    def te_names(self) -> bool:
        """Whether the files name norms the Transformer Engine way (``linear_qkv.layer_norm_weight``) or
        the local spec's way (``input_layernorm.weight``)."""
        model = self._file(0, 0)["model"]
        return layout.mcore_name(layout.layer_name(0, "attn_norm"), 0, te_names=False) not in model

    @property
    def layer_order(self) -> tuple[str, ...] | None:
        """The module order of a layer's parameters (one of ``megatron_optim.LAYER_ORDERS``) in the files,
        which Megatron-LM's save writes in the run's module order; None when it is none of them."""
        model = self._file(0, 0)["model"]
        return megatron_optim.layer_order_of(megatron_optim.parameter_keys(model), self.te_names, self.cfg.is_moe)

    def _check_shapes(self) -> None:
        """Every tensor of every layer in every rank's file has its TP shard shape: a wrong one anywhere is
        an error now, before anything is written, not a crash inside torch halfway through."""
        expected = {
            name: layout.tp_shard_shape(layout.split_name(name)[1], layout.logical_shape(self.cfg, name), self.tp)
            for name in layout.logical_names(self.cfg)
        }
        for pp_rank in range(self.pp):
            names = [n for n in expected if layout.stage_holds(n, self.cfg, pp_rank, self.pp)]
            held = [  # each EP rank's file: its own experts and a copy of everything else
                (t, e, n)
                for t in range(self.tp)
                for e in range(self.ep)
                for n in names
                if layout.expert_of(n) is None or self._expert_rank(n)[0] == e
            ]
            for tp_rank, ep_rank, name in held:
                tensor = self._local_tensor(name, tp_rank, ep_rank)
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected[name]:
                    got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise UserError(
                        f"{self._file_path(tp_rank, pp_rank, ep_rank)}: '{name}' has shard shape {got} but "
                        f"the model config with TP={self.tp} gives {expected[name]}; the checkpoint "
                        "does not match its args (or pass the matching model config)"
                    )

    def dtype(self, name: str) -> torch.dtype:
        return self._local_tensor(name, 0).dtype

    def _plan_read(self, name: str, pieces: list[Piece] | None):
        """[(tp rank, pieces in that shard's coordinates)], and whether the results need a TP merge."""
        _, kind = layout.split_name(name)
        return layout.tp_read_plan(kind, layout.logical_shape(self.cfg, name), self.tp, pieces)

    def sources(self, name: str, pieces: list[Piece] | None = None) -> dict[str, int]:
        pp_rank = self._stage(name)
        _, kind = layout.split_name(name)
        shard_shape = layout.tp_shard_shape(kind, layout.logical_shape(self.cfg, name), self.tp)
        size = DTYPE_BYTES.get(self.dtype(name), 4)
        out: dict[str, int] = {}
        for r, local_pieces in self._plan_read(name, pieces)[0]:
            rel = str(self._file_path(r, pp_rank, self._expert_rank(name)[0]).relative_to(self.path))
            numel = 1
            for s in pieces_shape(shard_shape, local_pieces):
                numel *= s
            out[rel] = out.get(rel, 0) + numel * size
        return out

    def read(self, name: str, pieces: list[Piece] | None = None) -> torch.Tensor:
        plan, merge = self._plan_read(name, pieces)
        sources = [self._local_tensor(name, r) for r, _ in plan]
        parts = [take_pieces(source, local) for source, (_, local) in zip(sources, plan)]
        out = layout.tp_join(layout.split_name(name)[1], plan, merge, parts)
        mapped = {source.untyped_storage().data_ptr() for source in sources}
        if out.untyped_storage().data_ptr() in mapped:
            # still a view of the mapped file: copied once (a join or a cut of pieces copies), into a reused buffer
            out = streaming.empty(out.shape, out.dtype).copy_(out)
        for source in sources:
            release_mapped_pages(source)  # the file's pages read for this copy leave the resident set
        return out


class LegacyWriter:
    """One unit per (TP rank, PP stage, EP rank) file, written in torch.save's format one tensor at a time
    (ckpt/torch_zip.py: torch.save itself would hold the whole file). Under expert parallelism each EP rank's
    file holds its experts (numbered from 0) and a copy of everything else."""

    format = "legacy"

    def __init__(
        self,
        cfg: ModelConfig,
        tp: int,
        pp: int,
        dtype: torch.dtype,
        iteration: int = 0,
        te_names: bool = True,
        args: argparse.Namespace | None = None,
        ep: int = 1,
        optimizer_states: tuple[str, ...] = (),
        resume_state: dict[str, Any] | None = None,
        layer_order: tuple[str, ...] | None = None,
    ):
        """``args``: Megatron-LM's args to store (``megatron_args.output_args``); fresh ones when None.
        ``optimizer_states`` with ``resume_state`` (a Megatron-LM run's optimizer, ``megatron_optim.
        resume_state``): each file also holds that optimizer's ``optimizer`` and ``opt_param_scheduler``
        entries for its parameters, and for the distributed optimizer a ``distrib_optim.pt`` beside it with
        the flat state in the gradient buffer's layout, so Megatron-LM resumes from it with Adam's state.
        ``layer_order``: the source run's layer module order (the distributed optimizer's buffer follows it)."""
        self.cfg, self.tp, self.pp, self.dtype, self.iteration = cfg, tp, pp, dtype, iteration
        self.ep = ep
        self.optimizer_states, self.resume_state = tuple(optimizer_states), resume_state
        self.distributed = bool(self.optimizer_states) and megatron_optim.writes_fully_reshardable(resume_state)
        self.layer_order = layer_order or megatron_optim.LAYER_ORDERS[0]
        if self.optimizer_states:
            if ep > 1:
                raise NotBuiltError(
                    f"Adam's state of a mixture of experts in legacy output under expert parallelism (--ep {ep}: "
                    "the experts in parameter groups of their own) is not built yet; grow --to torch_dist"
                )
            megatron_optim.check_legacy_groups(resume_state, "--carry-optimizer")
            if self.distributed:
                self.layer_order = megatron_optim.buffer_layer_order(layer_order, te_names, "--carry-optimizer")
                if cfg.is_moe:
                    raise NotBuiltError(
                        "--carry-optimizer: the distributed optimizer's state of a mixture of experts in legacy "
                        "output (its experts in a gradient buffer of their own) is not built yet; grow --to torch_dist"
                    )
        self.te_names = te_names
        self.args = (
            args
            if args is not None
            else megatron_args.output_args(
                None, cfg, tp, pp, dtype, iteration=iteration, new_stage=False, te_names=te_names, ep=ep
            )
        )

    def _holds(self, name: str, ep_rank: int) -> bool:
        expert = layout.expert_of(name)
        return expert is None or expert in layout.rank_experts(self.cfg, ep_rank, self.ep)

    def units(self) -> list[Unit]:
        files = [(p, t, e) for p in range(self.pp) for t in range(self.tp) for e in range(self.ep)]
        return [self._unit(pp_rank, tp_rank, ep_rank) for pp_rank, tp_rank, ep_rank in files]

    def _unit(self, pp_rank: int, tp_rank: int, ep_rank: int) -> Unit:
        requests, nbytes = [], 0
        for name in layout.logical_names(self.cfg):
            if not layout.stage_holds(name, self.cfg, pp_rank, self.pp) or not self._holds(name, ep_rank):
                continue
            _, kind = layout.split_name(name)
            shape = layout.logical_shape(self.cfg, name)
            pieces = tuple(layout.tp_pieces(kind, shape, tp_rank, self.tp))
            requests.append(Request(name, pieces))
            requests += [Request(layout.state_name(state, name), pieces) for state in self.optimizer_states]
            numel = math.prod(layout.tp_shard_shape(kind, shape, self.tp))
            nbytes += numel * (DTYPE_BYTES[self.dtype] + 4 * len(self.optimizer_states))  # Adam's state in fp32
            if self.distributed and megatron_optim.MASTER not in self.optimizer_states:
                nbytes += numel * 4  # distrib_optim.pt's fp32 master: the weight itself once more
        return Unit(
            key=f"{rank_dir(tp_rank, pp_rank, self.pp, ep_rank, self.ep)}/{FILE_NAME}",
            nbytes=nbytes,
            requests=requests,
            meta={"tp": tp_rank, "pp": pp_rank, "ep": ep_rank},
        )

    def write_units(self, directory: str | os.PathLike, units: list[Unit], produce: Produce, rank: int) -> list:
        records = []
        for unit in units:
            pp_rank = unit.meta["pp"]
            offset = layout.stage_layers(self.cfg.num_layers, pp_rank, self.pp).start
            first_expert = layout.rank_experts(self.cfg, unit.meta["ep"], self.ep).start
            model: dict[str, Any] = {}
            states: dict[str, dict[str, LazyTensor]] = {}  # model key -> Adam's state name -> tensor
            tied_copy = layout.holds_tied_copy(self.cfg, pp_rank, self.pp)
            # with Adam's state, in module order: the order Megatron's optimizer numbers its parameters in
            requests = unit.requests
            if self.optimizer_states:
                order = megatron_optim.stage_module_order(self.cfg, self.layer_order, pp_rank, self.pp)
                position = {name: i for i, name in enumerate(order)}
                requests = sorted(requests, key=lambda r: position[layout.split_state(r.name)[1]])
            for request in requests:
                state, weight = layout.split_state(request.name)
                tensor = self._lazy(request, produce)
                key = layout.mcore_name(weight, offset, self.te_names, self.cfg.is_moe, first_expert)
                if weight == "embedding" and tied_copy:
                    key = layout.mcore_name("output")  # megatron's last-stage copy of the tied weight
                if state is None:
                    model[key] = tensor
                else:
                    states.setdefault(key, {})[state] = tensor
            model.update(self._extra_state(pp_rank))
            blob = {
                "model": model,
                "args": self.args,
                "checkpoint_version": megatron_args.CHECKPOINT_VERSION,
                "iteration": self.iteration,
            }
            if self.distributed:  # the param groups here, the flat state in distrib_optim.pt beside the file
                blob["optimizer"] = _lazy_objects(megatron_optim.distributed_optimizer_entry(self.resume_state))
            elif self.optimizer_states:  # the optimizer's tensors are written after the model's, one at a time
                blob["optimizer"] = _lazy_objects(megatron_optim.plain_optimizer_entry(self.resume_state, states))
            if self.optimizer_states and "opt_param_scheduler" in self.resume_state:
                blob["opt_param_scheduler"] = self.resume_state["opt_param_scheduler"]
            records.append(_save(Path(directory), unit.key, blob))
            if self.distributed:
                # fp32 training's master is the weight itself: its record produced once more for this file
                masters = {k: v.get(megatron_optim.MASTER, model[k]) for k, v in states.items()}
                flat = self._distrib_optim(states, masters, pp_rank)
                records.append(_save(Path(directory), str(Path(unit.key).parent / megatron_optim.DISTRIB_FILE), flat))
            del model, blob, states
        return records

    def _distrib_optim(
        self, states: dict[str, dict[str, LazyTensor]], masters: dict[str, LazyTensor], pp_rank: int
    ) -> dict[Any, Any]:
        """distrib_optim.pt of one (TP rank, PP stage) as the distributed optimizer's save (``get_parameter_
        state_dp_zero``) writes it: the stage's parameters (``states``, module order) laid out in its gradient
        buffer (``megatron_optim.flat_layout``: the bucket size of this run's args on the first stage, one
        bucket on later ones, as megatron-core's DDP cuts it), the buckets' end padding cut out, zeros between
        parameters; fp32 ``param`` (the masters) and Adam's moments, each written in blocks."""
        where = f"{megatron_optim.DISTRIB_FILE} (stage {pp_rank})"
        bucket_size = megatron_optim.ddp_bucket_candidates(self.args, where)[0] if pp_rank == 0 else None
        numels = [(key, math.prod(tensor.shape)) for key, tensor in masters.items()]
        shared = megatron_optim.shared_embedding_keys(self.cfg, self.pp)
        spans, total = megatron_optim.flat_layout(numels, bucket_size, shared)
        ordered = sorted(spans.items(), key=lambda item: item[1][0])

        def flat(tensors: dict[str, LazyTensor]) -> LazyTensor:
            def blocks() -> Iterator[torch.Tensor]:
                end = 0
                for key, (start, stop) in ordered:
                    if start > end:
                        yield torch.zeros(start - end)
                    for block in tensors[key].produce_blocks():
                        yield block.to(torch.float32).reshape(-1)
                    end = stop
                if total > end:
                    yield torch.zeros(total - end)

            return LazyTensor((total,), torch.float32, lambda: torch.cat(list(blocks())), blocks)

        tensors = {"param": flat(masters)} | {
            m: flat({k: v[m] for k, v in states.items()}) for m in megatron_optim.MOMENTS
        }
        grad_dtype = (
            torch.float32 if megatron_args.get(self.args, "accumulate_allreduce_grads_in_fp32", where) else self.dtype
        )
        return {"buckets_coalesced": True, 0: {(self.dtype, grad_dtype): tensors | {"numel_unpadded": total}}}

    def _lazy(self, request: Request, produce: Produce) -> LazyTensor:
        """The request's tensor, produced when the file writer reaches its record: in blocks of rows of at
        most BLOCK_BYTES when it is cut by rows (a 7B embedding is 250 MiB), else whole."""
        pieces = list(request.pieces)
        shape = pieces_shape(layout.logical_shape(self.cfg, request.name), pieces)
        dtype = torch.float32 if layout.split_state(request.name)[0] else self.dtype  # Adam's state: fp32
        row_bytes = math.prod(shape[1:]) * DTYPE_BYTES[dtype]
        if pieces[0].dim != 0 or shape[0] * row_bytes <= BLOCK_BYTES:
            return LazyTensor(shape, dtype, lambda: produce(request.name, pieces))
        rows = max(1, BLOCK_BYTES // row_bytes)

        def blocks() -> Iterator[torch.Tensor]:
            for start in range(0, shape[0], rows):
                yield produce(request.name, layout.narrow_pieces(pieces, start, min(shape[0], start + rows)))

        return LazyTensor(shape, dtype, lambda: produce(request.name, pieces), blocks)

    def _extra_state(self, pp_rank: int) -> dict[str, None]:
        """The ``_extra_state`` entries megatron's linear layers put in a state dict (None: no FP8 meta)."""
        modules = list(layout.MCORE_EXTRA_STATE_MODULES)
        if self.cfg.is_moe:  # the experts' linears instead of the dense MLP's (numbered within the EP rank)
            local = len(layout.rank_experts(self.cfg, 0, self.ep))
            modules = [m for m in modules if not m.startswith("mlp.")]
            modules += [f"mlp.experts.local_experts.{k}.linear_fc{i}" for k in range(local) for i in (1, 2)]
        keys = [
            f"decoder.layers.{j}.{module}._extra_state"
            for j in range(self.cfg.num_layers // self.pp)
            for module in modules
        ]
        if pp_rank == self.pp - 1:
            keys.append("output_layer._extra_state")
        return dict.fromkeys(keys)

    def finalize(self, directory: str | os.PathLike, results: list[Any]) -> None:
        pass


def _save(directory: Path, relative: str, obj: Any) -> FileHash:
    """``obj`` written as torch.save would (``save_streaming``: one tensor in memory at a time), hashed as
    written (the manifest does not re-read the file)."""
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_output(path) as f:
        stream = HashingWriter(f)
        save_streaming(obj, stream, read_ahead=True)
    return stream.file_hash(relative)


def _lazy_objects(obj: Any) -> Any:
    """``obj`` with every real tensor in it (Adam's steps, the loss scale) made a LazyTensor of its own, the
    one kind of tensor the streaming writer stores."""
    if isinstance(obj, torch.Tensor):
        value = obj.detach().clone()
        return LazyTensor(tuple(value.shape), value.dtype, lambda: value)
    if isinstance(obj, dict):
        return {k: _lazy_objects(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_lazy_objects(v) for v in obj]
    return obj

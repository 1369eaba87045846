"""Megatron-LM's Adam state, read in model space: each weight's moments from the files Megatron-LM's trainer
saves, so ``grow --carry-optimizer`` continues a Megatron-LM run instead of restarting Adam.

Where Megatron-LM (core 0.16) keeps it, per (TP rank, PP stage) file of a legacy checkpoint:
- ``model_optim_rng.pt['optimizer']`` of the plain optimizer: torch's Adam state dict, the state by parameter
  index (bf16/fp16 training: one level down, beside ``fp32_from_fp16_params``, the fp32 master copies, one list
  per param group). The index order is Megatron's parameter groups (``_get_param_groups``): the
  weight-decayed parameters and the 1-D ones and biases (``wd_mult`` 0), each group told by its own
  ``wd_mult`` (``param_groups``), each in the module's order, which is the order of the file's own ``model``
  dict (``state_dict`` and ``named_parameters`` walk the modules alike). The file's group sizes, ``wd_mult``
  and ``lr_mult`` check that split.
- ``distrib_optim.pt`` of the distributed optimizer (``dp_zero`` save, buckets coalesced): flat fp32
  ``param``/``exp_avg``/``exp_avg_sq`` of the gradient buffer, where DDP lays the parameters out in REVERSE
  module order, each start padded to a multiple of 64 elements (``_ParamAndGradBuffer``), under
  --overlap-grad-reduce in buckets concatenated unpadded (``bucket_sizes``); the walk must end
  exactly at the saved ``numel_unpadded``, and the buffer's own fp32 master ``param`` must hold each weight
  where the layout puts it (first and last rows compared: a wrong order cannot pass, same-shaped weights hold
  different values). The step is the param groups' ``step``.
torch_dist: the plain optimizer's ``optimizer.state.<state>.<weight key>`` entries are the keys megastack's
own trainer writes (the torch_dist reader reads them; ``fp32_param`` is the master copy), its step
``common.pt``'s ``optimizer[.optimizer].state.common_step``; the distributed optimizer's ``dp_reshardable``
buckets follow the same buffer layout (the torch_dist reader maps them with ``buffer_spans``, trying each
module order in ``LAYER_ORDERS`` until the master weights prove one); its ``fully_reshardable`` save is in
model space like the plain optimizer's (master copy named ``param``), the step in its param groups.

Adam's step of the plain optimizer: per parameter under torch's Adam (legacy ``state[i]['step']``, torch_dist
``common_step``), in the param groups under TE's or apex's FusedAdam (Megatron-LM on GPU); both are read.

Written (``resume_state``, ``plain_optimizer_entry``, ``distributed_optimizer_entry``): what Megatron-LM's
load_checkpoint needs to resume the grown model WITH the optimizer: torch_dist common.pt entries (plain, or
the distributed optimizer's fully_reshardable format), and a legacy rank file's ``optimizer`` (the plain
optimizer's, or the distributed optimizer's param groups, its flat state in ``distrib_optim.pt`` laid out by
``flat_layout``), each with the step where the source's Adam kept it.

Not read yet (each refused in one line): the distributed optimizer's older
torch_dist formats, several gradient buffers (MoE), custom
parameter groups (lr_mult, decoupled LR, a no-weight-decay condition).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megastack import untrusted
from megastack.ckpt import megatron_args
from megastack.errors import NotBuiltError, UserError

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32_param"  # bf16/fp16 training's fp32 master copy of a weight (Megatron's and megastack's name)
PARAM_ALIGN = 64  # megatron-core pads each parameter's start in a distributed optimizer's buffer to this
DISTRIB_FILE = "distrib_optim.pt"
FIX = "grow without --carry-optimizer (Adam restarts), or from a checkpoint saved with Adam's state"

# A GPTModel layer's parameters in module order, per transformer implementation: the distributed optimizer's
# torch_dist buckets follow it, and its names do not say which; the buckets' own master weights prove one.
LAYER_ORDERS = (
    ("attn_norm", "proj", "qkv", "mlp_norm", "fc1", "fc2"),  # local spec (separate norm modules first)
    ("proj", "attn_norm", "qkv", "mlp_norm", "fc1", "fc2"),  # TE: LayerNormLinear's norm weight first
    ("proj", "qkv", "attn_norm", "fc1", "mlp_norm", "fc2"),  # TE: its norm weight after the weight
)

RankStates = dict[str, dict[str, torch.Tensor]]  # model key -> {state: tensor of the weight's shard shape}


def parameter_keys(model: dict[str, Any]) -> list[str]:
    """The file's parameters in module order (``_extra_state`` entries are not parameters)."""
    return [k for k, v in model.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]


def _no_weight_decay(key: str, tensor: Any) -> bool:
    """Megatron's default rule (``_get_param_groups``): biases and 1-D tensors take no weight decay."""
    return key.endswith(".bias") or len(tensor.shape) == 1


def param_groups(saved: Any, model: dict[str, Any], keys: list[str], where: str) -> list[tuple[dict, list[str]]]:
    """The file's param groups, each with the parameters it holds (module order). Megatron's default split:
    weight-decayed (``wd_mult`` 1) and 1-D tensors and biases (``wd_mult`` 0), told apart by each group's own
    ``wd_mult``, not by position: Megatron-LM 0.16 sorts them (weight-decayed first, every rank listing both
    even when one is empty, e.g. a last pipeline stage that starts with a norm), older versions list them in
    order of first appearance. Any other group (lr_mult, decoupled LR, a custom rule) is refused."""
    saved = untrusted.typed(saved, list, where, "field 'param_groups'", FIX)
    split = {
        1.0: [k for k in keys if not _no_weight_decay(k, model[k])],
        0.0: [k for k in keys if _no_weight_decay(k, model[k])],
    }
    out: list[tuple[dict, list[str]]] = []
    listed: set[float] = set()
    for group in saved:
        if not isinstance(group, dict):
            raise UserError(f"{where}: field 'param_groups' holds a {type(group).__name__}; the file is corrupt")
        wd, lr = group.get("wd_mult"), group.get("lr_mult", 1.0)
        if not isinstance(wd, (int, float)) or wd not in split or wd in listed or lr != 1.0:
            raise NotBuiltError(
                f"{where}: optimizer param group with wd_mult={wd!r}, lr_mult={lr!r} (custom parameter groups "
                "are not read yet); " + FIX
            )
        listed.add(wd)
        out.append((group, split[wd]))
    if any(ks and wd not in listed for wd, ks in split.items()):
        raise NotBuiltError(
            f"{where}: {len(saved)} optimizer param groups where Megatron's default split has "
            f"{sum(1 for ks in split.values() if ks)} (custom lr_mult, decoupled LR or no-weight-decay rules are "
            "not read yet); " + FIX
        )
    return out


def step_of(value: Any, where: str, field: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    step = untrusted.typed(value, float, where, f"field '{field}'", FIX, minimum=0)
    if step != int(step):
        raise UserError(f"{where}: field '{field}' is {step}, not a whole number of steps; the file is corrupt")
    return int(step)


def one_step(steps: list[int], where: str) -> int:
    if not steps or len(set(steps)) != 1:
        raise UserError(f"{where}: Adam's step differs between parameters ({sorted(set(steps))[:4]}); " + FIX)
    return steps[0]


def fused_groups_step(groups: Any, where: str, field: str = "param_groups") -> int | None:
    """Adam's step where TE's and apex's FusedAdam keep it (Megatron-LM's optimizer whenever either is
    installed, i.e. on GPU): in each param group that holds parameters (an empty one never steps), not per
    parameter as torch's Adam does. None when no group holds one (torch's Adam)."""
    groups = untrusted.typed(groups, list, where, f"field '{field}'", FIX)
    steps = [
        step_of(g["step"], where, f"{field}.step")
        for g in groups
        if isinstance(g, dict) and "step" in g and g.get("params", True)  # common.pt's groups list no params
    ]
    return one_step(steps, where) if steps else None


def groups_step(groups: Any, where: str, field: str = "param_groups") -> int:
    """Adam's step as the distributed optimizer keeps it, in every param group (``step``): the same in all."""
    groups = untrusted.typed(groups, list, where, f"field '{field}'", FIX)
    steps = [step_of(g.get("step") if isinstance(g, dict) else g, where, f"{field}.step") for g in groups]
    return one_step(steps, where)


def _moment(value: Any, shape: torch.Size, where: str, field: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != torch.float32:
        got = type(value).__name__
        if isinstance(value, torch.Tensor):
            got = f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        raise UserError(f"{where}: {field} is {got}, the weight needs {tuple(shape)} float32; the file is corrupt")
    return value


def buffer_spans(numels: list[tuple[str, int]], bucket_sizes: list[int]) -> dict[str, tuple[int, int, int]] | None:
    """Where megatron-core's DDP puts each parameter (``numels`` in module order) in its gradient buffer:
    name -> (bucket, start, end) within the bucket's saved (unpadded) tensor. Parameters go in backwards,
    each start padded to 64 elements; a bucket closes exactly at its saved size (its end padding is not
    saved), after a parameter or, for a parameter that takes a bucket of its own (a tied embedding under
    pipeline parallelism), at its padded start. None when the parameters do not fill the buckets exactly: the
    layout is not this one."""
    spans, bucket, start = {}, 0, 0
    for name, numel in reversed(numels):
        if bucket >= len(bucket_sizes):
            return None
        start = math.ceil(start / PARAM_ALIGN) * PARAM_ALIGN
        if 0 < start == bucket_sizes[bucket]:  # closed before this parameter (tied embeddings: their own bucket)
            bucket, start = bucket + 1, 0
            if bucket >= len(bucket_sizes):
                return None
        spans[name] = (bucket, start, start + numel)
        start += numel
        if start == bucket_sizes[bucket]:
            bucket, start = bucket + 1, 0
        elif start > bucket_sizes[bucket]:
            return None
    return spans if bucket == len(bucket_sizes) and start == 0 else None


def bucket_sizes(numels: list[int], bucket_size: int | None, own_bucket: frozenset[int] = frozenset()) -> list[int]:
    """The unpadded size of each bucket megatron-core's DDP (``_ParamAndGradBuffer``) cuts a gradient buffer
    into: the parameters (``numels``, module order) go in backwards, each start padded to 64 elements from its
    bucket's start (buckets start aligned), and a bucket closes after the parameter that brings it to
    ``bucket_size`` elements (None: one bucket). A parameter in ``own_bucket`` (indices into ``numels``: tied
    embeddings under pipeline parallelism, megatron-core's ``shared_embedding``) closes the open bucket at its
    padded start and takes a bucket of its own. A legacy ``distrib_optim.pt`` concatenates the buckets
    unpadded and does not store these sizes; torch_dist saves them (``per_bucket_numel_unpadded``)."""
    sizes, start, open_bucket = [], 0, False
    for index in reversed(range(len(numels))):
        start = math.ceil(start / PARAM_ALIGN) * PARAM_ALIGN
        own = index in own_bucket
        if own and open_bucket:
            sizes.append(start)
            start = 0
        end, open_bucket = start + numels[index], True
        if own or (bucket_size is not None and end >= bucket_size):
            sizes.append(end)
            end, open_bucket = 0, False
        start = end
    return sizes + ([start] if open_bucket else [])


def flat_layout(
    numels: list[tuple[str, int]], bucket_size: int | None, own_bucket: frozenset[str] = frozenset()
) -> tuple[dict[str, tuple[int, int]], int] | None:
    """Where a legacy ``distrib_optim.pt`` holds each parameter (``numels``: key and element count in module
    order): key -> (start, end) in its flat tensors, and their length. They are megatron-core's gradient
    buffer (``bucket_sizes``, ``buffer_spans``) with each bucket's end padding cut out, the buckets one
    after another (``get_parameter_state_dp_zero``). None when the layout does not close (not this one)."""
    own = frozenset(i for i, (key, _) in enumerate(numels) if key in own_bucket)
    sizes = bucket_sizes([n for _, n in numels], bucket_size, own)
    relative = buffer_spans(numels, sizes)
    if relative is None:
        return None
    first = [sum(sizes[:b]) for b in range(len(sizes))]  # each bucket's start in the file's tensors
    return {key: (first[b] + a, first[b] + e) for key, (b, a, e) in relative.items()}, sum(sizes)


def shared_embedding_keys(cfg: Any, pp: int) -> frozenset[str]:
    """The model keys megatron-core marks ``shared_embedding`` (each put in a DDP bucket of its own): tied
    embeddings under pipeline parallelism, the first stage's embedding and the last stage's copy of it."""
    from megastack import layout

    if not cfg.tie_embeddings or pp == 1:
        return frozenset()
    return frozenset({layout.mcore_name("embedding"), layout.mcore_name("output")})


def ddp_bucket_candidates(args: Any, where: str) -> list[int | None]:
    """The DDP bucket sizes a run with these Megatron-LM args may have used on a rank: --ddp-bucket-size, or
    megatron-core's default max(4e7, 1e6 x DP) under --overlap-grad-reduce; one bucket without it, and on
    pipeline stages after the first (megatron-core turns bucketing off there)."""
    if args is None or not megatron_args.get(args, "overlap_grad_reduce", where):
        return [None]
    size = megatron_args.get(args, "ddp_bucket_size", where)
    if size is None:
        size = max(40_000_000, 1_000_000 * (megatron_args.get(args, "data_parallel_size", where) or 1))
    return [size, None]


def master_matches(
    read_master: Callable[[int, int], torch.Tensor], first: torch.Tensor, last: torch.Tensor, numel: int
) -> bool:
    """A flat fp32 master copy (``read_master(lo, hi)``: its elements lo..hi) holds the weight whose first and
    last rows are ``first`` and ``last`` (a 1-D weight: itself twice): both ends compared, enough to tell
    any two weights apart without reading the whole buffer again."""
    first, last = first.reshape(-1), last.reshape(-1)
    head, tail = read_master(0, first.numel()), read_master(numel - last.numel(), numel)
    return torch.equal(head.to(first.dtype), first) and torch.equal(tail.to(last.dtype), last)


def ends(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (weight, weight) if weight.dim() < 2 else (weight[0], weight[-1])


def legacy_rank_states(
    blob: dict[str, Any], path: Path, own_bucket: frozenset[str] = frozenset()
) -> tuple[RankStates, int] | None:
    """(each weight's Adam moments, the step) of one legacy rank file (``path``), from its ``optimizer`` or
    the ``distrib_optim.pt`` beside it (``own_bucket``: ``shared_embedding_keys``); None when it holds no
    optimizer state."""
    where = str(path)
    optimizer = blob.get("optimizer")
    if optimizer is None:
        return None
    optimizer = untrusted.typed(optimizer, dict, where, "field 'optimizer'", FIX)
    model = blob["model"]
    keys = parameter_keys(model)
    if "state" in optimizer:  # the plain optimizer in fp32: torch's Adam state dict
        return _plain_states(optimizer, model, keys, where)
    inner = optimizer.get("optimizer")
    if "fp32_from_fp16_params" in optimizer and isinstance(inner, dict) and "state" in inner:  # bf16/fp16 training
        return _plain_states(inner, model, keys, where, optimizer["fp32_from_fp16_params"])
    if isinstance(inner, dict) and set(inner) == {"param_groups"}:  # the distributed optimizer
        distrib = path.parent / DISTRIB_FILE
        if not distrib.is_file():
            raise UserError(f"{distrib}: missing (the distributed optimizer's state); the checkpoint is incomplete")
        saved = param_groups(inner["param_groups"], model, keys, where)
        step = groups_step([g for g, _ in saved], where)
        buckets = ddp_bucket_candidates(blob.get("args"), where)
        return _distrib_states(distrib, model, keys, buckets, own_bucket), step
    raise UserError(f"{where}: field 'optimizer' has keys {sorted(map(str, optimizer))[:6]}, not Megatron-LM's; " + FIX)


def _plain_states(
    optimizer: dict, model: dict, keys: list[str], where: str, masters: Any = None
) -> tuple[RankStates, int]:
    """torch's Adam state dict by parameter index, and (bf16/fp16 training) Megatron's fp32 master copies,
    one list per param group in the same order."""
    groups = param_groups(optimizer.get("param_groups"), model, keys, where)
    if masters is not None:
        masters = untrusted.typed(masters, list, where, "field 'fp32_from_fp16_params'", FIX)
        if [len(g) if isinstance(g, list) else None for g in masters] != [len(ks) for _, ks in groups]:
            raise UserError(
                f"{where}: field 'fp32_from_fp16_params' does not list every parameter's master copy; " + FIX
            )
    state = untrusted.typed(optimizer["state"], dict, where, "field 'optimizer.state'", FIX)
    in_groups = fused_groups_step([g for g, _ in groups], where)  # FusedAdam's, or None (torch's Adam)
    out: RankStates = {}
    steps: list[int] = []
    for g, (group, keys) in enumerate(groups):
        ids = group.get("params")
        if not isinstance(ids, list) or len(ids) != len(keys):
            raise UserError(
                f"{where}: an optimizer param group lists {len(ids) if isinstance(ids, list) else ids!r} "
                f"parameters, the model has {len(keys)} in it; the optimizer does not match the model"
            )
        for index, key in zip(ids, keys):
            entry = state.get(index) if isinstance(index, int) else None
            if not isinstance(entry, dict):
                raise UserError(f"{where}: no Adam state for parameter {index!r} ({key}); " + FIX)
            field = f"optimizer.state[{index}]"
            out[key] = {m: _moment(entry.get(m), model[key].shape, where, f"{field}.{m} ({key})") for m in MOMENTS}
            if "step" in entry or in_groups is None:
                steps.append(step_of(entry.get("step"), where, f"{field}.step"))
            else:
                steps.append(in_groups)
        for i, key in enumerate(keys if masters is not None else ()):
            master = _moment(masters[g][i], model[key].shape, where, f"fp32_from_fp16_params[{g}][{i}] ({key})")
            out[key] = {MASTER: master, **out[key]}
    return out, one_step(steps, where)


def _distrib_states(
    path: Path, model: dict, keys: list[str], buckets: list[int | None], own_bucket: frozenset[str]
) -> RankStates:
    """The flat buffers of ``distrib_optim.pt`` cut into each parameter's moments (views, no copies); the
    buckets (unpadded, one after another) laid out for the first of the candidate bucket sizes ``buckets``
    that fills the file and whose master weights prove it (``own_bucket``: the keys of tied embeddings'
    copies, each in a bucket of its own)."""
    from megastack.ckpt.safe_load import load_pt

    where = str(path)
    blob = untrusted.typed(load_pt(path, mmap=True), dict, where, "the file", FIX)
    buffers = [k for k in blob if k != "buckets_coalesced"]
    if blob.get("buckets_coalesced") is not True or buffers != [0]:
        raise NotBuiltError(
            f"{where}: holds gradient buffers {buffers[:4]} (coalesced={blob.get('buckets_coalesced')!r}); only "
            "one coalesced buffer (a dense model's, Megatron-LM >= core 0.8) is read yet; " + FIX
        )
    by_dtype = untrusted.typed(blob[0], dict, where, "buffer 0", FIX)
    if len(by_dtype) != 1:
        raise NotBuiltError(f"{where}: {len(by_dtype)} dtypes in the gradient buffer, one is read yet; " + FIX)
    flat = untrusted.typed(next(iter(by_dtype.values())), dict, where, "buffer 0's tensors", FIX)
    numel = untrusted.typed(flat.get("numel_unpadded"), int, where, "field 'numel_unpadded'", FIX, minimum=0)
    for name in ("param", *MOMENTS):
        t = flat.get(name)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != numel or t.dtype != torch.float32:
            raise UserError(f"{where}: '{name}' is not a float32 vector of numel_unpadded={numel}; the file is corrupt")
    numels = [(key, model[key].numel()) for key in keys]
    param = flat["param"]  # the fp32 master weights: the layout's proof, and bf16/fp16 training's master copies
    spans = None
    for size in buckets:
        found = flat_layout(numels, size, own_bucket)
        if found is not None and found[1] == numel:
            spans = found[0]
            break
    if spans is None:
        raise NotBuiltError(
            f"{where}: the parameters laid out as megatron-core's buffer (bucket sizes {buckets}) do not fill the "
            f"file's {numel} elements (a layout not read yet, e.g. several gradient buffers); " + FIX
        )
    for key, (a, b) in spans.items():
        if not master_matches(lambda lo, hi, a=a: param[a + lo : a + hi], *ends(model[key]), b - a):
            raise UserError(
                f"{where}: the distributed optimizer's master weights at {key}'s offset are not that weight; "
                "the buffer's parameter order or bucketing is not megatron-core's (or the files are from "
                "different steps); " + FIX
            )
    states = (MASTER, *MOMENTS) if any(model[k].dtype != torch.float32 for k in keys) else MOMENTS
    return {
        key: {m: flat["param" if m == MASTER else m][a:b].view(model[key].shape) for m in states}
        for key, (a, b) in spans.items()
    }


def module_order(cfg: Any, kinds: tuple[str, ...]) -> list[str]:
    """A GPTModel's parameters (logical names) in module order: embedding, the layers, final norm, output
    layer (absent when tied). A mixture of experts' layer: its norms and attention in ``kinds``' order, then
    the MoE layer's router and each local expert's fc1 and fc2 (SequentialMLP)."""
    from megastack import layout

    def block(i: int) -> list[str]:
        if not cfg.is_moe:
            return [layout.layer_name(i, k) for k in kinds]
        experts = [layout.layer_name(i, k, e) for e in range(cfg.num_experts) for k in layout.EXPERT_KINDS]
        return [layout.layer_name(i, k) for k in kinds if k not in ("fc1", "fc2")] + [
            layout.layer_name(i, "router"),
            *experts,
        ]

    names = ["embedding"] + [n for i in range(cfg.num_layers) for n in block(i)]
    return names + ["final_norm"] + ([] if cfg.tie_embeddings else ["output"])


def stage_module_order(cfg: Any, kinds: tuple[str, ...], stage: int, pp: int) -> list[str]:
    """The parameters pipeline stage ``stage`` of ``pp`` holds, in its module order (``module_order``); a last
    stage's copy of tied embeddings is its output layer, so it comes last there."""
    from megastack import layout

    names = [n for n in module_order(cfg, kinds) if layout.stage_holds(n, cfg, stage, pp)]
    return names[1:] + names[:1] if layout.holds_tied_copy(cfg, stage, pp) else names


def layer_order_of(keys: list[str], te_names: bool, moe: bool) -> tuple[str, ...] | None:
    """Which of ``LAYER_ORDERS`` a first-stage rank file's parameter keys (``keys``, in the file's order:
    Megatron-LM's save walks the modules, so it is their order) list layer 0 in; None when none."""
    from megastack import layout

    positions = {key: i for i, key in enumerate(keys)}
    for kinds in LAYER_ORDERS:
        dense = [k for k in kinds if not (moe and k in ("fc1", "fc2"))]  # a MoE layer's experts come after
        found = [positions.get(layout.mcore_name(layout.layer_name(0, k), 0, te_names, moe)) for k in dense]
        if None not in found and found == sorted(found):
            return kinds
    return None


SCALER_TRACKERS = ("growth_tracker", "hysteresis_tracker")  # a dynamic loss scaler's counters beside its scale


def loss_scaler(value: Any, where: str) -> dict[str, Any] | None:
    """fp16 training's loss scaler state as megatron-core saves it (``DynamicGradScaler.state_dict``: the scale
    and its growth and hysteresis trackers; a constant scaler's is empty), checked field by field. It carries
    through growth unchanged: the grown run starts at the scale the source reached, and a scale that now
    overflows is halved within the hysteresis steps, as after any resume."""
    if value is None:
        return None
    field = "field 'grad_scaler'"
    value = untrusted.typed(value, dict, where, field, FIX)
    if not value:
        return {}
    scale = value.get("scale")
    if not (isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.is_floating_point()):
        raise UserError(f"{where}: {field}.scale is not a one-element float tensor; the file is corrupt")
    untrusted.typed(scale.item(), float, where, f"{field}.scale", FIX, positive=True)
    trackers = {k: untrusted.typed(value.get(k), int, where, f"{field}.{k}", FIX, minimum=0) for k in SCALER_TRACKERS}
    return {"scale": scale.detach().reshape(1).to(torch.float32).clone(), **trackers}


def resume_state(
    optimizer: Any, scheduler: Any, step: int, where: str, mixed: bool = False, grad_scaler: Any = None
) -> dict[str, Any]:
    """What Megatron-LM's load_checkpoint needs beside the sharded moments to resume a grown torch_dist
    checkpoint WITH its optimizer (common.pt): the source's param groups (hyperparameters; the grown model's
    parameters fall in the same groups) and Adam's step, and its LR scheduler at step 0 (a new stage warms up
    again, as megastack's trainer does; Megatron-LM checks its values against the new run's flags unless
    --override-opt_param-scheduler). ``mixed``: bf16/fp16 weights, whose Megatron optimizer (mixed precision)
    nests its torch state one level down, beside the fp32 masters (the sharded optimizer.state.fp32_param.*)
    and, in fp16, its loss scaler (``grad_scaler``: the source's, from its optimizer entry unless given).
    A source trained with the distributed optimizer gets its ``fully_reshardable`` entries instead
    (``distributed_state``): the run resumes with --use-distributed-optimizer, as it was trained. Adam's step
    goes where the source's optimizer kept it: torch's Adam per parameter (``common_step``), TE's or apex's
    FusedAdam (Megatron-LM on GPU) in the groups; each loads only its own way (FusedAdam's load_state_dict
    takes every per-parameter entry for a moment and fails on ``step``)."""
    optimizer = untrusted.typed(optimizer, dict, where, "field 'optimizer'", FIX)
    scaler = loss_scaler(optimizer.get("grad_scaler") if grad_scaler is None else grad_scaler, where)
    distributed = is_distributed(optimizer)
    if isinstance(optimizer.get("optimizer"), dict):  # the distributed or the mixed-precision optimizer's
        optimizer = optimizer["optimizer"]
    groups = untrusted.typed(optimizer.get("param_groups"), list, where, "field 'optimizer.param_groups'", FIX)
    if not all(isinstance(g, dict) for g in groups):
        raise UserError(f"{where}: field 'optimizer.param_groups' holds a non-dict; the file is corrupt")
    fused = not distributed and fused_groups_step(groups, where, "optimizer.param_groups") is not None
    groups = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in groups]
    if distributed:
        out = distributed_state(groups, step, scaler)
    elif fused:  # as megatron-core saves FusedAdam's: the step stays in the groups, no common_step
        inner = {"param_groups": [g | {"step": step} for g in groups], "state": {}}
    else:
        inner = {"param_groups": groups, "state": {"common_step": torch.tensor(float(step))}}
    if not distributed:
        outer = {"optimizer": inner} | ({"grad_scaler": scaler} if scaler is not None else {})
        out = {"optimizer": outer if mixed else inner}
    if scheduler is not None:
        scheduler = untrusted.typed(scheduler, dict, where, "field 'opt_param_scheduler'", FIX)
        out["opt_param_scheduler"] = {**scheduler, "num_steps": 0}
    return out


def is_distributed(optimizer: dict[str, Any]) -> bool:
    """Whether a Megatron-LM optimizer entry (a legacy rank file's, a torch_dist common.pt's or stored
    object's) is the distributed optimizer's: its torch state is elsewhere (distrib_optim.pt, buckets or
    sharded entries), so its inner dict holds the param groups without ``state``."""
    inner = optimizer.get("optimizer")
    return isinstance(inner, dict) and "param_groups" in inner and "state" not in inner


# The content metadata Megatron-LM's save writes with --dist-ckpt-optim-fully-reshardable; its load_checkpoint
# hands it to the distributed optimizer's sharded_state_dict, which then asks for the model-space entries.
FULLY_RESHARDABLE_CONTENT = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": False,
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def distributed_state(groups: list[dict[str, Any]], step: int, scaler: dict[str, Any] | None) -> dict[str, Any]:
    """common.pt of a torch_dist checkpoint with the distributed optimizer's state in its ``fully_reshardable``
    format (the layout the grown model's own DP ranks cut it from; any TP, PP and DP size): the param groups
    with Adam's step (that format keeps it there), the loss scaler, and the content metadata that tells
    Megatron-LM's load which format this is. The sharded entries are ``optimizer.state.{param,exp_avg,
    exp_avg_sq}.<weight key>``, ``param`` the fp32 master (in fp32 training the weight itself)."""
    inner = {"param_groups": [g | {"step": float(step)} for g in groups]}
    optimizer = {"optimizer": inner, "param_state_sharding_type": "fully_reshardable"}
    if scaler is not None:
        optimizer["grad_scaler"] = scaler
    return {"optimizer": optimizer, "content_metadata": dict(FULLY_RESHARDABLE_CONTENT)}


def writes_fully_reshardable(resume: dict[str, Any] | None) -> bool:
    """Whether a writer's ``resume_state`` is the distributed optimizer's (``distributed_state``)."""
    optimizer = (resume or {}).get("optimizer")
    return isinstance(optimizer, dict) and optimizer.get("param_state_sharding_type") == "fully_reshardable"


# torch_dist optimizer layouts read: the plain optimizer's and the distributed optimizer's in model space
# (--dist-ckpt-optim-fully-reshardable), both optimizer.state.<state>.<weight key> sharded like the weight,
# and the distributed optimizer's buckets (dp_reshardable, Megatron-LM 0.16's default)
TORCH_DIST_SHARDINGS = ("plain", "fully_reshardable", "dp_reshardable")
FULLY_RESHARDABLE_MASTER = "param"  # the fully_reshardable format's name of the fp32 master copy


def torch_dist_sharding(common: dict[str, Any], where: str) -> str | None:
    """How a Megatron-LM torch_dist checkpoint saved Adam's state: one of TORCH_DIST_SHARDINGS, None (no
    optimizer)."""
    optimizer = common.get("optimizer")
    if optimizer is None:
        return None
    optimizer = untrusted.typed(optimizer, dict, where, "field 'optimizer'", FIX)
    kind = optimizer.get("param_state_sharding_type", "plain")
    if kind not in TORCH_DIST_SHARDINGS:
        raise NotBuiltError(
            f"{where}: the distributed optimizer's torch_dist state {str(kind)[:40]!r} is not read yet "
            "(dp_reshardable, Megatron-LM's default, and fully_reshardable are; or save with the plain "
            "optimizer); " + FIX
        )
    return kind


def torch_dist_step(common: dict[str, Any], where: str) -> int | None:
    """Adam's step of a Megatron-LM torch_dist checkpoint's model-space optimizer state (common.pt), None
    without one: the plain optimizer's ``state.common_step`` (torch's Adam) or its param groups' ``step``
    (FusedAdam), the distributed optimizer's param groups' ``step`` (fully_reshardable)."""
    kind = torch_dist_sharding(common, where)
    if kind is None:
        return None
    optimizer = common["optimizer"]
    if isinstance(optimizer.get("optimizer"), dict):  # the mixed-precision or distributed optimizer's torch state
        optimizer = optimizer["optimizer"]
    if kind == "fully_reshardable":
        return groups_step(optimizer.get("param_groups"), where, "optimizer.param_groups")
    state = optimizer.get("state")
    if isinstance(state, dict) and "common_step" in state:  # torch's Adam: one step for every parameter
        return step_of(state["common_step"], where, "optimizer.state.common_step")
    step = fused_groups_step(optimizer.get("param_groups"), where, "optimizer.param_groups")  # FusedAdam's
    if step is None:
        raise UserError(
            f"{where}: Adam's step is missing (neither field 'optimizer.state.common_step' nor a param group's "
            "'step'); " + FIX
        )
    return step


def plain_optimizer_entry(resume: dict[str, Any], states: dict[str, dict[str, Any]]) -> Any:
    """A legacy rank file's ``optimizer``: Megatron's plain optimizer's state_dict (what Megatron-LM's
    load_checkpoint hands to ``optimizer.load_state_dict``) for the parameters in ``states`` (model key -> Adam
    state -> tensor or LazyTensor, in module order). From ``resume`` (``resume_state``'s
    output of a plain-optimizer source): the source's param groups, each holding its parameters by Megatron's
    default weight-decay split, numbered across groups as torch's state_dict numbers them; Adam's step per
    parameter (torch's Adam, one tensor each: it is incremented in place) or in the groups (FusedAdam), as the
    source kept it; bf16/fp16's fp32 masters (``fp32_from_fp16_params``, one list per group) and loss scaler."""
    outer = resume["optimizer"]
    mixed = "state" not in outer
    inner = outer["optimizer"] if mixed else outer
    common = inner["state"].get("common_step")  # None: FusedAdam's step, in the groups
    split = {
        1.0: [k for k, v in states.items() if not _no_weight_decay(k, v[MOMENTS[0]])],
        0.0: [k for k, v in states.items() if _no_weight_decay(k, v[MOMENTS[0]])],
    }
    groups, state, masters = [], {}, []
    for group in inner["param_groups"]:
        members = split[group["wd_mult"]]
        ids = list(range(len(state), len(state) + len(members)))
        for index, key in zip(ids, members):
            step = {"step": common.clone()} if common is not None else {}
            state[index] = step | {m: states[key][m] for m in MOMENTS}
        masters.append([states[key][MASTER] for key in members] if mixed else [])
        groups.append({**group, "params": ids})
    torch_state = {"state": state, "param_groups": groups}
    if not mixed:
        return torch_state
    scaler = {"grad_scaler": outer["grad_scaler"]} if "grad_scaler" in outer else {}
    return {"optimizer": torch_state, **scaler, "fp32_from_fp16_params": masters}


def distributed_optimizer_entry(resume: dict[str, Any]) -> dict[str, Any]:
    """A legacy rank file's ``optimizer`` of the distributed optimizer (``DistributedOptimizer.state_dict``):
    its param groups with Adam's step and no parameters (the DP-rank-independent part; the tensors go in
    ``distrib_optim.pt``), and fp16's loss scaler; from ``resume`` (``distributed_state``'s)."""
    outer = resume["optimizer"]
    scaler = {"grad_scaler": outer["grad_scaler"]} if "grad_scaler" in outer else {}
    return {"optimizer": {"param_groups": outer["optimizer"]["param_groups"]}, **scaler}


def buffer_layer_order(known: tuple[str, ...] | None, te_names: bool, where: str) -> tuple[str, ...]:
    """The layer module order a distributed optimizer's buffer of the grown run follows: the source run's
    (``known``: its legacy files', or what its buckets proved), which must be the one its norm names imply
    (the local spec's order with local names); unknown only for the local spec's names, whose order is one."""
    local = LAYER_ORDERS[0]
    if known is None and not te_names:
        return local
    if known is None or (known == local) == te_names:
        raise NotBuiltError(
            f"{where}: the distributed optimizer's state in legacy output for a Transformer Engine run whose "
            "parameter order this source does not show (a model-space save, or --norm-names changed the spec) is "
            "not built yet; grow --to torch_dist, which carries it in any order (its fully_reshardable format)"
        )
    return known


def check_legacy_groups(resume: dict[str, Any] | None, where: str) -> None:
    """Legacy output carries Megatron's optimizer (plain: ``plain_optimizer_entry``; distributed:
    ``distributed_optimizer_entry`` and distrib_optim.pt) of a Megatron-LM run in its default parameter
    groups; anything else is refused in one line before any file is written."""
    to_torch_dist = "grow --to torch_dist, which carries it"
    if resume is None:
        raise NotBuiltError(
            f"{where}: Adam's state in legacy output is written for Megatron-LM training saves (its optimizer's "
            f"param groups go with it); this source is megastack's: {to_torch_dist}"
        )
    outer = resume["optimizer"]
    inner = outer["optimizer"] if "state" not in outer else outer
    wds = [g.get("wd_mult") for g in inner["param_groups"]]
    if sorted(wds) != [0.0, 1.0] or any(g.get("lr_mult", 1.0) != 1.0 for g in inner["param_groups"]):
        raise NotBuiltError(
            f"{where}: optimizer param groups with wd_mult {wds} (Megatron's default split has 1.0 and 0.0, "
            f"lr_mult 1) are not written in legacy output yet; {to_torch_dist}"
        )

"""``megastack inspect CKPT [--json]``: what a checkpoint is, from metadata only (no tensor data is read).

The JSON form is a stable interface (README, "Converting and inspecting checkpoints"): always exactly
the keys in ``KEYS``, ``null`` where a value is unknown, sorted keys, tensors in a fixed order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from megastack.ckpt import formats
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.manifest import MANIFEST, check_hashes, read_manifest, resolve_iteration_dir
from megastack.config import to_dict
from megastack.errors import UserError

KEYS = (
    "format",
    "path",
    "model",
    "parameters",
    "layout",
    "iteration",
    "tensors",
    "total_bytes",
    "files",
    "manifest",
    "history",
    "megatron",
)
# What grow and convert read past and do not write (Megatron-LM resumes with --no-load-optim --no-load-rng).
NOT_CARRIED = ("optimizer", "opt_param_scheduler", "rng_state", "rerun_state_machine")
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.bool: "bool",
}
_ITER = re.compile(r"^iter_(\d+)$")


def _tensor(name: str, shape, dtype: torch.dtype, file: str | None) -> dict[str, Any]:
    numel = 1
    for s in shape:
        numel *= int(s)
    return {
        "name": name,
        "shape": [int(s) for s in shape],
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "bytes": numel * dtype.itemsize,
        "file": file,
    }


def _files(directory: Path) -> dict[str, int]:
    count = size = 0
    for root, _, names in os.walk(directory):
        for name in names:
            count += 1
            size += (Path(root) / name).stat().st_size
    return {"count": count, "bytes": size}


def _megatron_state(directory: Path, fmt: str) -> dict[str, Any] | None:
    """What Megatron-LM saved beside the weights (args, optimizer, scheduler, rng), from the format's
    rank 0 file or common.pt and its sharded entries; None for a checkpoint with no Megatron-LM state."""
    from megastack.ckpt import megatron_args

    read_state = formats.FORMATS[fmt].saved_state
    if read_state is None:
        return None
    blob, sharded, optimizer = read_state(directory)
    args = blob.get("args")
    if args is None and optimizer is None and not blob:
        return None
    where = str(directory)
    eps_name = next((n for n in megatron_args.FIELDS["norm_epsilon"].names if getattr(args, n, None) is not None), None)
    present = [k for k in NOT_CARRIED if k in blob or any(s == k or s.startswith(k + "/") for s in sharded)]
    if optimizer is not None and "optimizer" not in present:
        present.insert(0, "optimizer")
    return {
        "args": args is not None,
        "checkpoint_version": blob.get("checkpoint_version")
        if isinstance(blob.get("checkpoint_version"), (int, float))
        else None,
        "epsilon_field": eps_name,
        "transformer_impl": megatron_args.get(args, "transformer_impl", where) if args is not None else None,
        "tokenizer_type": megatron_args.get(args, "tokenizer_type", where) if args is not None else None,
        "optimizer": optimizer,
        "rng_state": "rng_state" in present,
        "not_carried": present,
    }


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The stable description of a checkpoint (see ``KEYS``)."""
    directory = resolve_iteration_dir(path)
    if not directory.is_dir():
        raise UserError(f"{path}: not a directory; pass a checkpoint directory")
    fmt = formats.detect_format(directory)
    cfg, stored, extra = formats.FORMATS[fmt].stored(directory)
    tensors = [_tensor(*entry) for entry in stored]
    manifest = read_manifest(directory)
    iteration = None
    if manifest is not None and isinstance(manifest.get("iteration"), int):
        iteration = manifest["iteration"]
    elif extra is not None:
        iteration = extra["iteration"]
    elif formats.FORMATS[fmt].iteration_dirs and _ITER.match(directory.name):
        iteration = int(_ITER.match(directory.name).group(1))
    summary = None
    if manifest is not None:
        summary = {k: v for k, v in manifest.items() if k not in ("files", "history", "model")}
        summary["files_listed"] = len(manifest.get("files") or {})
    return {
        "format": fmt,
        "path": str(directory),
        "model": to_dict(cfg) if cfg is not None else None,
        "parameters": cfg.total_parameters() if cfg is not None else None,
        "layout": {"tp": extra["tp"], "pp": extra["pp"]} if extra is not None else None,
        "iteration": iteration,
        "tensors": tensors,
        "total_bytes": sum(t["bytes"] for t in tensors),
        "files": _files(directory),
        "manifest": summary,
        "history": list((manifest or {}).get("history") or []),
        "megatron": _megatron_state(directory, fmt),
    }


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _event(e: dict[str, Any]) -> str:
    kind = e.get("event", "?")
    if kind == "convert":
        where = f" TP={e['tp']} x PP={e['pp']}" if "tp" in e else ""
        return f"convert {e.get('from')} -> {e.get('to')}{where} ({e.get('dtype')}) from {e.get('source')}"
    if kind == "grow":
        return (
            f"grow {e.get('operator')} {e.get('source_layers')} -> {e.get('target_layers')} layers "
            f"from {e.get('source')}"
        )
    rest = ", ".join(f"{k}={v}" for k, v in sorted(e.items()) if k != "event" and not isinstance(v, (list, dict)))
    return f"{kind} {rest}".strip()


def describe(info: dict[str, Any]) -> str:
    """The human table."""
    lines = [
        f"{info['path']}: {info['format']} checkpoint"
        + (f", iteration {info['iteration']}" if info["iteration"] is not None else "")
    ]
    m = info["model"]
    if m is None:
        lines.append("model:     unknown (no megastack.json and no Megatron args; convert it with --model CONFIG)")
    else:
        groups = m["num_query_groups"] or m["num_attention_heads"]
        lines.append(
            f"model:     Llama, {m['num_layers']} layers, hidden {m['hidden_size']}, "
            f"{m['num_attention_heads']} heads / {groups} query groups "
            f"(head dim {m['hidden_size'] // m['num_attention_heads']}), ffn {m['ffn_hidden_size']}, "
            f"vocab {m['vocab_size']}, seq {m['seq_length']}, rope base {m['rotary_base']:g}, "
            f"{'tied' if m['tie_embeddings'] else 'untied'} embeddings, {m['dtype']}; "
            f"{info['parameters']:,} parameters"
        )
    if info["layout"] is not None:
        lines.append(
            f"layout:    TP={info['layout']['tp']} x PP={info['layout']['pp']} "
            f"({info['layout']['tp'] * info['layout']['pp']} rank files)"
        )
    else:
        lines.append(f"layout:    {formats.FORMATS[info['format']].layout_note(info['tensors'])}")
    lines.append(
        f"tensors:   {len(info['tensors'])}, {_size(info['total_bytes'])} "
        f"({info['files']['count']} files, {_size(info['files']['bytes'])} on disk)"
    )
    width = max([len(t["name"]) for t in info["tensors"]] + [4])
    with_file = formats.FORMATS[info["format"]].files_per_tensor
    lines.append(f"  {'name':<{width}}  {'shape':<20} {'dtype':<9} {'bytes':>12}" + ("  file" if with_file else ""))
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(
            f"  {t['name']:<{width}}  {shape:<20} {t['dtype']:<9} {t['bytes']:>12,}"
            + (f"  {t['file']}" if with_file else "")
        )
    man = info["manifest"]
    if man is None:
        lines.append("manifest:  none")
    else:
        lines.append(
            f"manifest:  megastack.json ({man['files_listed']} files listed, consumed_tokens "
            f"{man.get('consumed_tokens', 0)}, cumulative_flops {man.get('cumulative_flops', 0.0):.3g})"
        )
    mlm = info.get("megatron")
    if mlm is not None:
        parts = [
            f"args ({mlm['epsilon_field'] or 'no epsilon'} field"
            + (f", checkpoint_version {mlm['checkpoint_version']:g}" if mlm["checkpoint_version"] else "")
            + (f", transformer_impl {mlm['transformer_impl']}" if mlm["transformer_impl"] else "")
            + (f", tokenizer {mlm['tokenizer_type']}" if mlm["tokenizer_type"] else "")
            + ")"
            if mlm["args"]
            else "no args"
        ]
        parts.append(f"optimizer: {mlm['optimizer'] or 'none'}")
        parts.append(f"rng state: {'yes' if mlm['rng_state'] else 'no'}")
        lines.append("megatron:  " + "; ".join(parts))
        if mlm["not_carried"]:
            lines.append(
                f"           not carried by grow/convert: {', '.join(mlm['not_carried'])} (resume the "
                "output in Megatron-LM with --no-load-optim --no-load-rng)"
            )
        if mlm["optimizer"]:
            lines.append(
                "           except by grow --carry-optimizer --to torch_dist: Adam's moments, param groups and "
                "step (Megatron-LM resumes that output without --no-load-optim)"
            )
    if info["history"]:
        lines.append("history:")
        lines += [f"  {i + 1}. {_event(e)}" for i, e in enumerate(info["history"])]
    else:
        lines.append("history:   none")
    return "\n".join(lines)


def cli_inspect(args: Any) -> int:
    info = inspect_checkpoint(args.ckpt)
    try:
        print(json.dumps(info, indent=2, sort_keys=True) if args.json else describe(info), flush=True)
    except BrokenPipeError:  # `megastack inspect CKPT | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return 0


# ----------------------------------------------------------------------------- verify


def verify(path: str | os.PathLike) -> list[str]:
    """Problems with a checkpoint against its manifest (empty when it is intact)."""
    directory = resolve_iteration_dir(path)
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{directory}: no {MANIFEST}; nothing to verify against"]
    problems = check_hashes(directory, manifest)
    if not problems and "model" in manifest:
        try:
            open_checkpoint(directory)  # checks every tensor's shape against the model config
        except UserError as exc:
            problems.append(str(exc))
    return problems


def cli_verify(args: Any) -> int:
    problems = verify(args.ckpt)
    if problems:
        for line in problems:
            print(line)
        raise UserError(
            f"{args.ckpt}: {len(problems)} problem(s) found (listed above); restore the checkpoint "
            "from its source or re-run the command that wrote it"
        )
    manifest = read_manifest(resolve_iteration_dir(args.ckpt)) or {}
    print(f"{args.ckpt}: OK ({len(manifest.get('files', {}))} files match {MANIFEST})")
    return 0

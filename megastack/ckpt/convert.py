"""``megastack convert SRC DST --to FORMAT``: Hugging Face <-> torch_dist <-> legacy, with resharding.

A conversion is the identity growth plan written by the target format's writer through the same
executor as ``grow``: every rank computes the same unit list, fills its share tensor by tensor from
the source reader (which opens only the bytes each piece needs), and rank 0 writes the index files,
``megastack.json`` and publishes the result by renaming a finished temporary sibling. Nothing appears
at DST unless the whole conversion succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from megastack.ckpt import formats
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.execute import Comm, Source, comm_from_launcher, dry_run, execute, plan_rows, plan_table
from megastack.ckpt.manifest import build_manifest, lineage, read_manifest, source_identity
from megastack.config import ModelConfig, load_model_config
from megastack.errors import UserError
from megastack.fsio import check_paths
from megastack.plan import identity_plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_KEYS = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass
class Conversion:
    """Everything decided before writing: reader, plan, writer, manifest (also what --dry-run shows)."""

    reader: Any
    plan: Any
    writer: Any
    dtype: torch.dtype
    iteration: int
    manifest: dict[str, Any]
    tp: int
    pp: int


def prepare(
    src: str | os.PathLike,
    to: str,
    tp: int | None = None,
    pp: int | None = None,
    dtype: str | None = None,
    model: ModelConfig | None = None,
    hf_shard_bytes: int | None = None,
    norm_names: str | None = None,
    ep: int | None = None,
) -> Conversion:
    """Open the source, check the target layout and build writer + manifest; reads metadata only."""
    formats.get(to)
    reader = open_checkpoint(src, model)
    cfg = reader.cfg
    if formats.get(to).cut_by_rank and tp is None and pp is None and reader.format == to:
        tp, pp = reader.tp, reader.pp  # legacy -> legacy keeps the layout unless asked to reshard
        ep = ep or getattr(reader, "ep", 1)
    tp, pp, ep = formats.check_layout(cfg, to, tp, pp, ep)
    out_dtype = DTYPES[dtype] if dtype else reader.dtype("embedding")
    if out_dtype not in DTYPE_KEYS:
        raise UserError(f"{src}: weights are {out_dtype}; pass --dtype fp32, bf16 or fp16 for the output")
    target = dataclasses.replace(cfg, dtype=DTYPE_KEYS[out_dtype])
    plan = dataclasses.replace(identity_plan(cfg), target=target)
    source_manifest = read_manifest(reader.path) or {}
    iteration = int(source_manifest.get("iteration", getattr(reader, "iteration", 0)) or 0)
    formats.check_norm_names(to, target, norm_names)
    writer = formats.make_writer(
        to,
        target,
        out_dtype,
        reader,
        tp=tp,
        pp=pp,
        iteration=iteration,
        norm_names=norm_names,
        shard_bytes=hf_shard_bytes,
        ep=ep,
    )
    event = {
        "event": "convert",
        "from": reader.format,
        "to": to,
        "source": str(Path(src).resolve()),
        **source_identity(reader.path),
        "dtype": DTYPE_KEYS[out_dtype],
    }
    if formats.get(to).cut_by_rank:
        event |= {"tp": tp, "pp": pp}
    flops, history = lineage(source_manifest)
    manifest = build_manifest(
        fmt=to,
        model=target,
        iteration=iteration,
        consumed_tokens=int(source_manifest.get("consumed_tokens", 0) or 0),
        cumulative_flops=flops,
        history=history,
        event=event,
    )
    if "growth" in source_manifest:  # a grown checkpoint not trained yet keeps its ramp instructions
        manifest["growth"] = source_manifest["growth"]
    return Conversion(reader, plan, writer, out_dtype, iteration, manifest, tp, pp)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    tp: int | None = None,
    pp: int | None = None,
    dtype: str | None = None,
    comm: Comm | None = None,
    model: ModelConfig | None = None,
    hf_shard_bytes: int | None = None,
    progress: bool = False,
    norm_names: str | None = None,
    check_source: bool = True,
) -> Path:
    """Convert SRC to format ``to`` at DST (all ranks of ``comm`` call it; one process by default).
    ``check_source``: re-hash SRC's files against its megastack.json while writing (a mismatch publishes
    nothing)."""
    check_paths(src, dst)
    job = prepare(src, to, tp, pp, dtype, model, hf_shard_bytes, norm_names)
    return run(job, dst, comm or Comm(), progress, check_source)


def run(job: Conversion, dst: str | os.PathLike, comm: Comm, progress: bool = False, check_source: bool = True) -> Path:
    """Write a prepared conversion (every rank calls it)."""
    to = job.writer.format
    # HF files go straight into DST; Megatron formats get iter_NNNNNNN/ and the tracker, like Megatron-LM.
    execute(
        job.writer,
        job.plan.producer(job.reader, job.dtype),
        dst,
        comm,
        job.manifest,
        iteration=job.iteration if formats.get(to).iteration_dirs else None,
        progress="convert" if progress else None,
        source=Source(job.reader, job.plan.sources_of, check_source),
    )
    return Path(dst)


def describe_dry_run(job: Conversion, plans: list, as_json: bool) -> str:
    rows = plan_rows(plans)
    summary = {
        "from": job.reader.format,
        "to": job.writer.format,
        "tp": job.tp,
        "pp": job.pp,
        "dtype": DTYPE_KEYS[job.dtype],
        "parameters": job.plan.target.total_parameters(),
        "ranks": rows,
    }
    if as_json:
        return json.dumps(summary, indent=2, sort_keys=True)
    layout_text = _layout_text(job) if formats.get(job.writer.format).cut_by_rank else ""
    lines = [
        f"convert: {job.reader.format} -> {job.writer.format}{layout_text}, {DTYPE_KEYS[job.dtype]}, "
        f"{job.plan.target.total_parameters():,} parameters, {len(plans)} rank(s)",
    ]
    return "\n".join([*lines, *plan_table(rows)])


def _layout_text(job: Conversion) -> str:
    ep = getattr(job.writer, "ep", 1)
    return f" TP={job.tp} x PP={job.pp}" + (f" x EP={ep}" if ep > 1 else "")


def cli_convert(args: Any) -> int:
    model = load_model_config(args.model) if getattr(args, "model", None) else None
    if getattr(args, "dry_run", False):
        job = prepare(args.src, args.to, args.tp, args.pp, args.dtype, model, norm_names=args.norm_names, ep=args.ep)
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
        print(
            describe_dry_run(
                job, dry_run(job.writer, job.reader, job.plan.sources_of, world), getattr(args, "json", False)
            )
        )
        return 0
    check_paths(args.src, args.dst)
    job = prepare(args.src, args.to, args.tp, args.pp, args.dtype, model, norm_names=args.norm_names, ep=args.ep)
    comm = comm_from_launcher()
    run(job, args.dst, comm, progress=True, check_source=not args.no_source_check)
    if comm.rank == 0:
        layout_text = _layout_text(job) if formats.get(args.to).cut_by_rank else ""
        print(
            f"converted {args.src} ({job.reader.format}) -> {args.dst} ({args.to}{layout_text}, "
            f"{DTYPE_KEYS[job.dtype]})"
        )
    return 0

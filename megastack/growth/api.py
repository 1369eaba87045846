"""Growth as a library call: ``grow(src, dst, spec)``, and ``prepare(src, spec)`` for dry runs.

The steps are those of ``convert``: open the source, plan (G_learn first learns its maps on data), pick
the writer, build the manifest, execute across the ranks. ``megastack grow``, ``megastack run`` and
bench/speedup.py call these and nothing below them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megastack.ckpt import formats
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.execute import Comm, Source, comm_from_launcher, dry_run, execute, plan_rows, plan_table
from megastack.ckpt.manifest import build_manifest, lineage, optimizer_block, read_manifest, source_identity
from megastack.errors import NotBuiltError, UserError
from megastack.flops import flops_per_token
from megastack.fsio import check_paths
from megastack.growth.operators import make_plan
from megastack.growth.spec import GrowthSpec, operator
from megastack.plan import GrowthRecord, Plan, with_optimizer_state


@dataclass
class GrowthJob:
    """A planned growth: everything ``execute`` needs, and what the dry run and the summary report."""

    src: str
    reader: Any
    plan: Plan
    writer: Any
    manifest: dict[str, Any]
    rank: int = 0  # this process's rank in the growth (0 prints summaries)

    @property
    def learn_report(self) -> dict[str, Any]:
        return dict(self.plan.info.get("learn") or {})


def prepare(
    src: str | os.PathLike,
    spec: GrowthSpec,
    *,
    tp: int | None = None,
    pp: int | None = None,
    norm_names: str | None = None,
    comm: Comm | None = None,
    dry_run: bool = False,
    ep: int | None = None,
    to: str | None = None,
) -> GrowthJob:
    """Open and plan (written as ``to``, default the source's format). G_learn learns its maps here (data
    parallel over ``comm``), except in a dry run, which plans with the maps at their initial value and reads no
    data."""
    src = str(src)
    reader = open_checkpoint(src, check_files=not dry_run)
    step, states, resume = carried_state(reader, src) if spec.carry_optimizer else (0, (), None)
    if operator(spec.operator).needs_data:
        from megastack.growth.learn import initial_learned, learn_maps

        initial = initial_learned(reader.cfg, spec)
        make_plan(reader.cfg, replace(spec, learned=initial))  # bad flags fail before any data is read
        if dry_run:
            spec = replace(spec, learned=initial | {"report": {"dry_run": True}})
        else:
            spec = learn_maps(
                reader,
                spec,
                list(spec.learn_data),
                spec.learn_tokens,
                spec.learn_batch,
                spec.learn_lr,
                comm or comm_from_launcher(),
            )
    plan = make_plan(reader.cfg, spec)
    if states:
        plan = with_optimizer_state(plan, states)
    writer = make_writer(
        reader, plan, tp, pp, fmt=to, norm_names=norm_names, optimizer_states=states, ep=ep, resume_state=resume
    )
    manifest = growth_manifest(reader, plan, src) | {"format": writer.format}
    if states:  # the step Adam's bias correction continues from, as the source's trainer wrote it
        manifest["optimizer"] = {"step": step, "states": list(states)}
    return GrowthJob(src, reader, plan, writer, manifest)


def carried_state(reader: Any, src: str) -> tuple[int, tuple[str, ...], dict[str, Any] | None]:
    """(step, Adam's states, Megatron-LM's resume entries or None) ``src`` holds for every weight: megastack's
    trainer writes them at a stage's end (its step in megastack.json); Megatron-LM's trainer in its own files
    (``ckpt.megatron_optim``), whose param groups and scheduler go on into the output's common.pt."""
    if not formats.get(reader.format).reads_optimizer:
        raise NotBuiltError(
            f"--carry-optimizer from {reader.format} checkpoints is not built yet; grow a Megatron-LM or "
            "megastack checkpoint (torch_dist or legacy), or grow without it"
        )
    manifest = read_manifest(reader.path)
    if manifest is None:  # Megatron-LM's checkpoint: its optimizer files say
        step = reader.optimizer_step()
        stored = reader.optimizer_states()
        if step is None or not stored:
            raise UserError(
                f"--carry-optimizer: {src} holds no optimizer state (saved by Megatron-LM with --no-save-optim, "
                "or a converted checkpoint); grow without --carry-optimizer (Adam restarts)"
            )
        return step, stored, reader.megatron_resume_state(step)
    step, states = optimizer_block(manifest, f"--carry-optimizer: {src}")
    stored = reader.optimizer_states()
    if tuple(states) != stored:
        raise UserError(f"{src}: megastack.json lists Adam's states {list(states)} but the files hold {list(stored)}")
    # grown from a Megatron-LM run before: its resume entries go on, so Megatron-LM resumes after every growth
    return step, stored, reader.megatron_resume_state(step) if reader.optimizer_step() is not None else None


def grow(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    spec: GrowthSpec,
    *,
    tp: int | None = None,
    pp: int | None = None,
    norm_names: str | None = None,
    comm: Comm | None = None,
    progress: bool = False,
    ep: int | None = None,
    to: str | None = None,
    check_source: bool = True,
) -> GrowthJob:
    """Grow checkpoint ``src`` into ``dst`` (collective: every rank of ``comm`` calls it). DST appears only
    when complete; bad input is a one-line UserError with nothing written. ``check_source``: re-hash SRC's
    files against its megastack.json while writing (a mismatch publishes nothing)."""
    check_paths(src, dst)
    job = prepare(src, spec, tp=tp, pp=pp, norm_names=norm_names, comm=comm, ep=ep, to=to)
    # the process group starts after the source is open, as convert's does: started before it, one rank in
    # three aborted at exit with "terminate called without an active exception" (tests/test_reliability.py)
    comm = comm or comm_from_launcher()
    execute(
        job.writer,
        job.plan.producer(job.reader, job.reader.dtype("embedding")),
        dst,
        comm,
        job.manifest,
        iteration=0 if formats.get(job.writer.format).iteration_dirs else None,  # HF files go straight in DST
        progress="grow" if progress else None,
        order_key=job.plan.source_key,
        source=Source(job.reader, job.plan.sources_of, check_source),
    )
    job.rank = comm.rank
    return job


def make_writer(
    reader: Any,
    plan: Plan,
    tp: int | None,
    pp: int | None,
    fmt: str | None = None,
    norm_names: str | None = None,
    optimizer_states: tuple[str, ...] = (),
    ep: int | None = None,
    resume_state: dict[str, Any] | None = None,
):
    """Writer for the target in the source's format (legacy may change TP/PP/EP). The output's Megatron-LM
    args are the source's with the new shape and a new stage's counters (iteration 0, no samples seen)."""
    out = formats.get(fmt or reader.format)
    if not out.cut_by_rank and (tp is not None or pp is not None):
        raise UserError(f"--tp/--pp apply to legacy output; a {out.name} checkpoint loads under any TP/PP")
    formats.check_norm_names(out.name, plan.target, norm_names)
    if out.cut_by_rank:  # the source's layout unless asked to change it
        tp, pp = tp or getattr(reader, "tp", 1), pp or getattr(reader, "pp", 1)
        ep = ep or getattr(reader, "ep", 1)
    tp, pp, ep = formats.check_layout(plan.target, out.name, tp, pp, ep)
    return formats.make_writer(
        out.name,
        plan.target,
        reader.dtype("embedding"),
        reader,
        tp=tp,
        pp=pp,
        iteration=0,
        new_stage=True,
        norm_names=norm_names,
        optimizer_states=optimizer_states,
        ep=ep,
        resume_state=resume_state,
    )


def growth_manifest(reader: Any, plan: Plan, src: str) -> dict[str, Any]:
    """The grown checkpoint's megastack.json (less the file hashes): the source's history and FLOPs plus
    this growth, whose cost (G_learn's map training, 6N per token like training) is counted."""
    event = {
        "event": "grow",
        **plan.info,
        "source": str(Path(src).resolve()),
        **source_identity(reader.path),
        "source_layers": plan.source.num_layers,
        "target_layers": plan.target.num_layers,
    }
    flops, history = lineage(read_manifest(reader.path))
    learned_tokens = (plan.info.get("learn") or {}).get("tokens") or 0
    return build_manifest(
        fmt=None,  # the writer's
        model=plan.target,
        iteration=0,
        consumed_tokens=0,
        cumulative_flops=flops + flops_per_token(plan.target) * float(learned_tokens),
        history=history,
        event=event,
        growth=GrowthRecord.of(plan.info).to_json(),
    )


def describe_dry_run(job: GrowthJob, world: int, as_json: bool) -> str:
    """Per rank: units, bytes read and written, files opened and predicted peak memory."""
    plan, writer = job.plan, job.writer
    plans = dry_run(writer, job.reader, plan.sources_of, world)
    rows = plan_rows(plans)
    summary = {
        "source_layers": plan.source.num_layers,
        "target_layers": plan.target.num_layers,
        "operator": plan.info.get("operator"),
        "format": writer.format,
        "target_parameters": plan.target.total_parameters(),
        "ranks": rows,
    }
    if as_json:
        return json.dumps(summary, indent=2)
    lines = [
        f"plan: {plan.info.get('operator')} {plan.source.num_layers} -> {plan.target.num_layers} layers, "
        f"{writer.format} output, {plan.target.total_parameters() / 1e9:.2f}B parameters, {len(plans)} rank(s)",
    ]
    return "\n".join([*lines, *plan_table(rows)])

"""``megastack grow SRC DST``: plan the growth, then let every rank write its share of the target."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from megastack.ckpt import megatron_args
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.execute import comm_from_launcher, dry_run, execute
from megastack.ckpt.manifest import file_hashes, manifest_digest, read_manifest
from megastack.config import ParallelConfig, to_dict
from megastack.errors import NotBuiltError, UserError
from megastack.fsio import check_paths
from megastack.growth.operators import GrowthSpec, make_plan
from megastack.growth.plan import Plan
from megastack.progress import Progress


def source_digest(reader: Any) -> str:
    """The source checkpoint's checksum: its manifest's sha256, else sha256 over every file's sha256."""
    if read_manifest(reader.path) is not None:
        return manifest_digest(reader.path)
    import hashlib

    return hashlib.sha256(json.dumps(file_hashes(reader.path), sort_keys=True).encode()).hexdigest()


def make_writer(reader: Any, plan: Plan, tp: int | None, pp: int | None, fmt: str | None = None,
                norm_names: str | None = None):
    """Writer for the target in the source's format (legacy may change TP/PP). The output's Megatron-LM
    args are the source's with the new shape and a new stage's counters (iteration 0, no samples seen)."""
    fmt = fmt or reader.format
    dtype = reader.dtype("embedding")
    if fmt == "torch_dist":
        if tp is not None or pp is not None or norm_names is not None:
            raise UserError("--tp/--pp/--norm-names apply to legacy output; a torch_dist checkpoint loads under any "
                            "TP/PP and has one naming")
        from megastack.ckpt.torch_dist import TorchDistWriter

        args, _ = megatron_args.for_output(reader, plan.target, None, None, dtype, iteration=0, new_stage=True,
                                           norm_names=norm_names)
        return TorchDistWriter(plan.target, dtype, args=args, iteration=0)
    if fmt == "legacy":
        from megastack.ckpt.legacy import LegacyWriter

        for flag, value in (("--tp", tp), ("--pp", pp)):
            if value is not None and value < 1:
                raise UserError(f"{flag} {value}: must be a positive integer")
        tp = tp or getattr(reader, "tp", 1)
        pp = pp or getattr(reader, "pp", 1)
        for field_name, problem in ParallelConfig(tensor=tp, pipeline=pp).check_model(plan.target):
            flag = "--tp" if field_name == "tensor" else "--pp"
            raise UserError(f"{flag} {tp if flag == '--tp' else pp}: {problem.split(' ', 1)[1]} of the grown "
                            f"model; choose a {flag} that divides it")
        args, te_names = megatron_args.for_output(reader, plan.target, tp, pp, dtype, iteration=0, new_stage=True,
                                                  norm_names=norm_names)
        return LegacyWriter(plan.target, tp, pp, dtype, te_names=te_names, args=args)
    raise NotBuiltError(f"growing {fmt} checkpoints is not built; convert to torch_dist first")


def describe_dry_run(plans: list, plan: Plan, writer: Any, as_json: bool) -> str:
    rows = [{"rank": p.rank, "units": len(p.units), "write_bytes": p.write_bytes, "read_bytes": p.read_bytes,
             "read_files": len(p.reads), "predicted_peak_bytes": p.peak_bytes, "reads": p.reads} for p in plans]
    summary = {"source_layers": plan.source.num_layers, "target_layers": plan.target.num_layers,
               "operator": plan.info.get("operator"), "format": writer.format,
               "target_parameters": plan.target.total_parameters(), "ranks": rows}
    if as_json:
        return json.dumps(summary, indent=2)
    gib = 1 << 30
    lines = [f"plan: {plan.info.get('operator')} {plan.source.num_layers} -> {plan.target.num_layers} layers, "
             f"{writer.format} output, {plan.target.total_parameters() / 1e9:.2f}B parameters, {len(plans)} rank(s)",
             f"{'rank':>4} {'units':>6} {'read GiB':>9} {'files':>6} {'write GiB':>10} {'peak GiB':>9}"]
    for r in rows:
        lines.append(f"{r['rank']:>4} {r['units']:>6} {r['read_bytes'] / gib:>9.3f} {r['read_files']:>6} "
                     f"{r['write_bytes'] / gib:>10.3f} {r['predicted_peak_bytes'] / gib:>9.3f}")
    return "\n".join(lines)


def growth_manifest(reader: Any, plan: Plan, src: str) -> dict[str, Any]:
    source_manifest = read_manifest(reader.path) or {}
    event = {"event": "grow", **plan.info, "source": str(Path(src).resolve()), "source_sha256": source_digest(reader),
             "source_layers": plan.source.num_layers, "target_layers": plan.target.num_layers}
    return {
        "format": None,  # filled by the caller
        "model": to_dict(plan.target),
        "iteration": 0,
        "consumed_tokens": 0,
        "cumulative_flops": float(source_manifest.get("cumulative_flops", 0.0)),
        "history": list(source_manifest.get("history", [])) + [event],
        "growth": {k: plan.info[k] for k in ("operator", "new_layers", "layer_map", "dimension", "width")
                   if k in plan.info and (k != "dimension" or "width" in plan.info)}
        | {"mask_ramp": bool(plan.info.get("mask_ramp", False))},
    }


def cli_grow(args: Any) -> int:
    if args.carry_optimizer:
        raise NotBuiltError("--carry-optimizer (stacking Adam moments) is not built yet; grow without it "
                            "(the paper re-initialises the optimizer after growth)")
    spec = GrowthSpec(operator=args.operator, factor=args.factor, layer_map=args.layer_map,
                      dimension=args.dimension, noise=args.noise, seed=args.seed,
                      hidden=getattr(args, "hidden", None), ffn=getattr(args, "ffn", None),
                      heads=getattr(args, "heads", None), query_groups=getattr(args, "query_groups", None))
    if not args.dry_run:
        check_paths(args.src, args.dst)
    reader = open_checkpoint(args.src, check_files=not args.dry_run)
    comm = None
    if spec.operator == "learn":  # G_learn: learn the maps first (data parallel over the launcher's ranks)
        from megastack.growth.learn import initial_learned, learn_maps

        initial = initial_learned(reader.cfg, spec)
        make_plan(reader.cfg, replace(spec, learned=initial))  # bad flags fail before any data is read
        if args.dry_run:
            spec = replace(spec, learned=initial | {"report": {"dry_run": True}})
        else:
            comm = comm_from_launcher()
            spec = learn_maps(reader, spec, args.data, args.learn_tokens, args.learn_batch, args.learn_lr, comm)
    plan = make_plan(reader.cfg, spec)
    writer = make_writer(reader, plan, args.tp, args.pp, norm_names=args.norm_names)
    if args.dry_run:
        world = args.ranks or int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
        if world < 1:
            raise UserError(f"--ranks must be positive, got {world}")
        plans = dry_run(writer, reader, plan.sources_of, world)
        print(describe_dry_run(plans, plan, writer, args.json))
        return 0
    comm = comm or comm_from_launcher()
    manifest = growth_manifest(reader, plan, args.src) | {"format": writer.format}
    units = writer.units()
    progress = Progress(sum(len(u.requests) for u in units), "grow", enabled=comm.rank == 0)
    execute(writer, plan.producer(reader, reader.dtype("embedding")), args.dst, comm, manifest,
            progress=progress.update, order_key=plan.source_key, source=reader.path)
    progress.close()
    if comm.rank == 0:
        print(f"grew {args.src} ({plan.source.num_layers} layers) into {args.dst} ({plan.target.num_layers} layers, "
              f"{plan.info['operator']}, {writer.format}); new layers: {plan.info['new_layers'] or 'none'}")
        if "width" in plan.info:
            s, t = plan.source, plan.target
            print(f"width: hidden {s.hidden_size} -> {t.hidden_size}, ffn {s.ffn_hidden_size} -> {t.ffn_hidden_size}, "
                  f"heads {s.num_attention_heads} -> {t.num_attention_heads}, query groups {s.query_groups} -> "
                  f"{t.query_groups}")
        if plan.info.get("learn", {}).get("heldout_loss_learned") is not None:
            r = plan.info["learn"]
            print(f"learn: {r['steps']} steps, {r['tokens']} tokens; held-out loss {r['heldout_loss_stack']:.4f} "
                  f"(stack) -> {r['heldout_loss_learned']:.4f} (learned)")
    return 0



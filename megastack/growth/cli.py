"""``megastack grow SRC DST``: the flags as a GrowthSpec, then ``growth.api`` (plan, write across ranks)."""

from __future__ import annotations

import os
from typing import Any

from megastack.growth.api import describe_dry_run, grow, prepare
from megastack.growth.spec import GrowthSpec


def spec_from_args(args: Any) -> GrowthSpec:
    return GrowthSpec(
        operator=args.operator,
        factor=args.factor,
        layer_map=args.layer_map,
        dimension=args.dimension,
        noise=args.noise,
        seed=args.seed,
        hidden=args.hidden,
        ffn=args.ffn,
        heads=args.heads,
        query_groups=args.query_groups,
        learn_data=tuple(args.data or ()),
        learn_tokens=args.learn_tokens,
        learn_batch=args.learn_batch,
        learn_lr=args.learn_lr,
        carry_optimizer=args.carry_optimizer,
        keep=args.keep,
        experts=args.experts,
        topk=args.topk,
        granularity=args.granularity,
        router_init=args.router_init,
    )


def cli_grow(args: Any) -> int:
    spec = spec_from_args(args)
    layout = {"tp": args.tp, "pp": args.pp, "norm_names": args.norm_names, "ep": args.ep, "to": args.to}
    if args.dry_run:
        job = prepare(args.src, spec, dry_run=True, **layout)
        world = args.ranks or int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
        print(describe_dry_run(job, world, args.json))
        return 0
    job = grow(args.src, args.dst, spec, progress=True, check_source=not args.no_source_check, **layout)
    if job.rank == 0:
        plan = job.plan
        print(
            f"grew {args.src} ({plan.source.num_layers} layers) into {args.dst} ({plan.target.num_layers} layers, "
            f"{plan.info['operator']}, {job.writer.format}); new layers: {plan.info['new_layers'] or 'none'}"
        )
        if plan.info.get("dimension") == "experts":
            t = plan.target
            print(f"experts: {t.num_experts} per layer, top {t.moe_topk}, expert MLP width {t.expert_ffn_size}")
        if "width" in plan.info:
            s, t = plan.source, plan.target
            print(
                f"width: hidden {s.hidden_size} -> {t.hidden_size}, ffn {s.ffn_hidden_size} -> {t.ffn_hidden_size}, "
                f"heads {s.num_attention_heads} -> {t.num_attention_heads}, query groups {s.query_groups} -> "
                f"{t.query_groups}"
            )
        r = job.learn_report
        if r.get("heldout_loss_learned") is not None:
            print(
                f"learn: {r['steps']} steps, {r['tokens']} tokens; held-out loss {r['heldout_loss_stack']:.4f} "
                f"(stack) -> {r['heldout_loss_learned']:.4f} (learned)"
            )
    return 0

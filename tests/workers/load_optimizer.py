"""Worker: megatron-core's own optimizer (get_megatron_optimizer over its DistributedDataParallel, as
Megatron-LM's training builds it) loads grown torch_dist checkpoints WITH Adam's state, the way Megatron-LM's
load_checkpoint does (the model's and the optimizer's sharded state dicts, the checkpoint's content metadata,
dist_checkpointing.load, optimizer.load_state_dict), on every rank (TP1, data parallel over the ranks).

A legacy checkpoint ("format": "legacy") is loaded as that load does it for legacy files: the rank file's
``model`` into the model, its ``optimizer`` through optimizer.load_state_dict, and the distributed
optimizer's ``distrib_optim.pt`` through optimizer.load_parameter_state.

argv: JOB.json: {"checkpoints": [{"name", "path", "precision": fp32|bf16|fp16, "distributed": bool,
"format": torch_dist|legacy}], "out"}.
Each rank saves OUT/<name>_rank<R>.pt: {parameter name: {"start", "end", "exp_avg", "exp_avg_sq", "master"}},
the slice [start, end) of the flattened weight this rank's optimizer holds (all of it unless distributed),
and the step and loss scaler it resumed with; prints RESULT {"name", "rank", "file"}.
"""

import json
import sys
from pathlib import Path

import torch


def load(entry: dict, rank: int) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from megastack.ckpt.detect import open_checkpoint
    from megastack.ckpt.manifest import resolve_iteration_dir
    from megastack.ckpt.safe_load import load_pt
    from megastack.compat import cpu
    from megastack.config import ParallelConfig
    from megastack.dist import init_model_parallel
    from megastack.model.build import build_model, checkpoint_state

    precision, distributed = entry["precision"], entry["distributed"]
    legacy = entry.get("format") == "legacy"
    directory = resolve_iteration_dir(Path(entry["path"]))
    reader = open_checkpoint(entry["path"])
    init_model_parallel(1, 1)
    gpt = build_model(reader.cfg, ParallelConfig())
    model = gpt
    if precision != "fp32":  # as Megatron-LM's get_model wraps a bf16/fp16 model
        gpt.config.bf16, gpt.config.fp16 = precision == "bf16", precision == "fp16"
        model = Float16Module(gpt.config, gpt)
    config = OptimizerConfig(
        optimizer="adam",
        lr=1e-3,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_distributed_optimizer=distributed,
    )
    with cpu.megatron_optimizer_mode():
        # bf16: Megatron-LM's arguments force --accumulate-allreduce-grads-in-fp32 (an fp32 gradient buffer);
        # a legacy file's args say how its run bucketed the buffer, as Megatron-LM's DDP config takes them
        blob = load_pt(directory / "mp_rank_00" / "model_optim_rng.pt") if legacy else {}
        args = blob.get("args")
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=distributed,
            grad_reduce_in_fp32=precision == "bf16",
            overlap_grad_reduce=bool(getattr(args, "overlap_grad_reduce", False)),
            bucket_size=getattr(args, "ddp_bucket_size", None),
        )
        ddp = DistributedDataParallel(gpt.config, ddp_config, model)
        optimizer = get_megatron_optimizer(config, [ddp])
    if distributed:
        cpu.distributed_optimizer_without_te()
        cpu.seed_empty_state(optimizer)
    if legacy:  # Megatron-LM's load_checkpoint of a legacy (TP1 PP1) rank file
        gpt.load_state_dict(blob["model"], strict=True)
        with cpu.megatron_optimizer_mode():
            optimizer.load_state_dict(blob["optimizer"])
            if distributed:  # then each DP rank's range of distrib_optim.pt, scattered from DP rank 0
                # no_grad: in fp32 training megatron-core 0.16.1 copies the loaded master into a view of the
                # parameter that requires grad, which torch refuses outside no_grad (its own saves' load too)
                with torch.no_grad():
                    optimizer.load_parameter_state(str(directory / "mp_rank_00" / "distrib_optim.pt"))
        return holdings(gpt, optimizer)
    metadata = load_pt(directory / "common.pt").get("content_metadata") or {}
    model_state = checkpoint_state(gpt, reader.cfg)
    with cpu.megatron_optimizer_mode():
        optimizer_state = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)
        loaded = dist_checkpointing.load({"model": model_state, "optimizer": optimizer_state}, str(directory))
        gpt.load_state_dict(loaded["model"], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
    return holdings(gpt, optimizer)


def holdings(gpt, optimizer) -> dict:
    """Each parameter's slice of Adam's state this rank holds, by the model's parameter name."""
    (inner,) = optimizer.chained_optimizers
    names = {id(p): name for name, p in gpt.named_parameters()}
    out = {}
    if hasattr(inner, "gbuf_ranges"):  # the distributed optimizer: this rank's range of each parameter
        for buffers in inner.gbuf_ranges:
            for per_dtype in buffers.values():
                for bucket in per_dtype:
                    for param, ranges in bucket["param_map"].items():
                        group, order = inner.model_param_group_index_map[param]
                        main = inner.optimizer.param_groups[group]["params"][order]
                        part = ranges["param"]
                        out[names[id(param)]] = slice_of(inner, main, part.start, part.end)
    else:
        masters = {}
        for model_group, main_group in zip(
            getattr(inner, "float16_groups", []), getattr(inner, "fp32_from_float16_groups", [])
        ):
            masters.update({id(p): q for p, q in zip(model_group, main_group)})
        for name, param in gpt.named_parameters():
            out[name] = slice_of(inner, masters.get(id(param), param), 0, param.numel())
    steps = {float(s["step"]) for s in inner.optimizer.state.values()}
    scaler = inner.grad_scaler.state_dict() if getattr(inner, "grad_scaler", None) is not None else None
    return {"params": out, "steps": sorted(steps), "grad_scaler": scaler}


def slice_of(inner, main: torch.Tensor, start: int, end: int) -> dict:
    state = inner.optimizer.state[main]
    return {
        "start": start,
        "end": end,
        "exp_avg": state["exp_avg"].detach().clone(),
        "exp_avg_sq": state["exp_avg_sq"].detach().clone(),
        "master": main.detach().float().clone(),
    }


def main() -> None:
    from megastack.dist import init_distributed

    job = json.loads(Path(sys.argv[1]).read_text())
    init_distributed()
    rank = torch.distributed.get_rank()
    for entry in job["checkpoints"]:
        path = Path(job["out"]) / f"{entry['name'].replace('/', '_')}_rank{rank}.pt"
        torch.save(load(entry, rank), path)
        print("RESULT " + json.dumps({"name": entry["name"], "rank": rank, "file": str(path)}), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

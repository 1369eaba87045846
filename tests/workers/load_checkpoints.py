"""Worker: load checkpoints in megatron-core under several TP/PP layouts and save the logits.

argv: JOB.json. The job lists {"name", "path", "layouts": [[tp, pp(, ep)], ...], "how"} entries and a "tokens"
file and an "out" directory; "how" is "dist" (torch_dist via megatron's dist_checkpointing, strict),
"legacy" (each rank loads its own model_optim_rng.pt with load_state_dict(strict=True); the layout must be
the checkpoint's) or "reader" (megastack's reader + load_logical). Writes OUT/<name>_tp<T>pp<P>.pt on the
first rank of the last stage and prints RESULT {"name", "tp", "pp", "file"}.
"""

import json
import sys
from pathlib import Path

import torch


def load_legacy_strict(model, reader, cfg) -> None:
    """This rank's model_optim_rng.pt into the local-spec model, strictly (TE norm names mapped)."""
    from megatron.core import parallel_state as ps

    from megastack import layout
    from megastack.ckpt.legacy import rank_dir
    from megastack.ckpt.safe_load import load_pt

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pp, ep = ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    name = rank_dir(tp_rank, pp_rank, pp, ps.get_expert_model_parallel_rank(), ep)
    state = load_pt(Path(reader.path) / name / "model_optim_rng.pt")["model"]
    renamed = {}
    for key, value in state.items():
        for kind in ("attn_norm", "mlp_norm"):
            te, local = layout.MCORE_LAYER_TE[kind], layout.MCORE_LAYER_LOCAL[kind]
            if key.endswith(te):
                key = key[: -len(te)] + local
        renamed[key] = value
    model.load_state_dict(renamed, strict=True)


def main() -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megastack.ckpt.detect import open_checkpoint
    from megastack.ckpt.safe_load import load_pt
    from megastack.config import ParallelConfig
    from megastack.dist import init_distributed, init_model_parallel
    from megastack.model.build import build_model, checkpoint_state
    from megastack.model.forward import forward_logits
    from megastack.model.weights import load_logical

    job = json.loads(Path(sys.argv[1]).read_text())
    init_distributed()
    tokens = load_pt(job["tokens"])
    out = Path(job["out"])
    for entry in job["checkpoints"]:
        reader = open_checkpoint(entry["path"])
        cfg = reader.cfg
        for tp, pp, *ep in entry["layouts"]:
            ep = ep[0] if ep else 1
            init_model_parallel(tp, pp, expert=ep)
            model = build_model(cfg, ParallelConfig(tensor=tp, pipeline=pp, expert=ep))
            if entry["how"] == "dist":
                # As Megatron-LM's load_checkpoint does: the model under "model", common.pt's keys beside it
                # (checkpoint_state: megatron-core's sharded state dict, a MoE norm under TE's name).
                loaded = dist_checkpointing.load(
                    {"model": checkpoint_state(model, cfg)}, str(reader.path), strict=StrictHandling.RAISE_ALL
                )
                assert isinstance(loaded["iteration"], int) and loaded["args"].num_layers == reader.cfg.num_layers
                model.load_state_dict(loaded["model"], strict=True)
            elif entry["how"] == "legacy":
                load_legacy_strict(model, reader, cfg)
            else:
                load_logical(model, cfg, reader.read)
            result = forward_logits(model, tokens)
            if result is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                path = out / f"{entry['name']}_tp{tp}pp{pp}ep{ep}.pt"
                torch.save(result, path)
                print(
                    "RESULT " + json.dumps({"name": entry["name"], "tp": tp, "pp": pp, "ep": ep, "file": str(path)}),
                    flush=True,
                )
            torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

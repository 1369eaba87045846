"""Smoke test of the foundation: the tiny model's forward pass in megatron-core under TP=2 on CPU,
compared with the plain-PyTorch reference. Run: python tools/smoke_forward.py [--nproc 2]."""

import argparse
import sys

import torch


def worker() -> None:
    from megatron.core import parallel_state as ps

    from megastack.ckpt import layout
    from megastack.config import ParallelConfig, load_model_config
    from megastack.dist import init_distributed, init_model_parallel
    from megastack.model.build import build_model
    from megastack.model.forward import forward_logits
    from megastack.model.reference import ReferenceLlama
    from megastack.model.weights import load_logical

    denv = init_distributed()
    cfg = load_model_config("tiny")
    init_model_parallel(tensor=denv.world_size, pipeline=1)
    ref = ReferenceLlama(cfg).init_weights(seed=0)
    model = build_model(cfg, ParallelConfig(tensor=denv.world_size))
    load_logical(model, cfg, layout.logical_from_hf(ref.state_dict(), cfg).__getitem__)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    logits = forward_logits(model, tokens)
    if ps.get_tensor_model_parallel_rank() == 0:
        diff = (logits - ref(tokens)).abs().max().item()
        print(
            f"tiny model ({cfg.total_parameters():,} params), megatron-core TP={denv.world_size} on "
            f"{'GPU' if torch.cuda.is_available() else 'CPU'}: logits {tuple(logits.shape)}, "
            f"max |megatron - reference| = {diff:.2e}",
            flush=True,
        )
        if diff > 1e-4:
            sys.exit(1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
    else:
        from megastack.dist import launch_local, python_argv

        result = launch_local(python_argv(__file__, "--worker"), args.nproc, timeout=300)
        for out in result.outputs:
            print("".join(line + "\n" for line in out.splitlines() if line.startswith("tiny model")), end="")
        if not result.ok:
            print(result.describe(), file=sys.stderr)
            sys.exit(1)

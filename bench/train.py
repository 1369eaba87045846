"""Benchmark: tokens/s of megastack's training engine vs a plain PyTorch loop (not a timed test).

Same tiny model (configs/models/tiny.yaml unless --model), same demo-corpus batches (megatron GPTDataset),
one process, fp32, DP1 TP1 PP1:
- megastack: ``megastack.train.loop.train`` (megatron-core GPTModel, DeepSpeed ZeRO-1 engine, megatron's
  schedule); tokens/s from its own JSONL windows (the first window, with warm-up, is dropped).
- plain: ReferenceLlama + torch.optim.AdamW + clip_grad_norm_, the same micro-batches, timed the same way.
Each is repeated; the medians and their ratio are printed (goal: megastack / plain overhead <= 1.15x).

    python bench/train.py [--steps 60] [--repeats 3] [--model tiny] [--micro 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def megastack_run(model: str, steps: int, micro: int, window: int, out: Path) -> float:
    from megastack.config import from_dict
    from megastack.train.config import TrainConfig
    from megastack.train.loop import train

    config = from_dict(
        TrainConfig,
        {
            "model": model,
            "out_dir": str(out),
            "resume": False,
            "parallel": {"micro_batch_size": micro, "global_batch_size": micro},
            "optimizer": {"lr": 1e-3, "warmup_iters": 10},
            "schedule": {
                "train_iters": steps,
                "eval_interval": 0,
                "eval_iters": 0,
                "save_interval": 0,
                "log_interval": window,
            },
            "data": {"cache_dir": str(out.parent / "cache")},
            "logging": {"tensorboard": False, "progress": "off"},
        },
    )
    train(config, verbose=False)
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["type"] == "train"][1:]
    return statistics.median(rates)


def plain_run(model: str, steps: int, micro: int, window: int, cache: Path) -> float:
    import torch
    import torch.nn.functional as F

    from megastack.config import load_model_config
    from megastack.model.reference import ReferenceLlama
    from megastack.train.data import build_datasets, resolve_data

    cfg = load_model_config(model)
    net = ReferenceLlama(cfg).init_weights(seed=1)
    prefixes, tokenizer = resolve_data([], None, cfg.vocab_size)
    data = build_datasets(prefixes, None, "98,2,0", tokenizer, cfg.seq_length, 1234, steps * micro, 1, cache)
    decay = [p for p in net.parameters() if p.dim() > 1]
    rest = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95)
    )
    rates, start = [], time.monotonic()
    for step in range(steps):
        items = [data.train[i] for i in range(step * micro, (step + 1) * micro)]
        tokens = torch.stack([x["tokens"] for x in items])
        labels = torch.stack([x["labels"] for x in items])
        loss = F.cross_entropy(net(tokens).flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if (step + 1) % window == 0:
            now = time.monotonic()
            rates.append(window * micro * cfg.seq_length / (now - start))
            start = now
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from megastack.dist import init_distributed

    init_distributed()
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so machine load hits both alike
            ours.append(megastack_run(args.model, args.steps, args.micro, args.window, Path(tmp) / f"run{i}"))
            plain.append(plain_run(args.model, args.steps, args.micro, args.window, Path(tmp) / "plain_cache"))
    result = {
        "model": args.model,
        "micro_batch": args.micro,
        "steps": args.steps,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "megastack_tokens_per_s": [round(x) for x in ours],
        "plain_tokens_per_s": [round(x) for x in plain],
        "megastack_median": round(statistics.median(ours)),
        "plain_median": round(statistics.median(plain)),
        "overhead": round(statistics.median(plain) / statistics.median(ours), 3),
    }
    print(json.dumps(result, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

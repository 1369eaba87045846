"""The plain-PyTorch training loop the trainer is compared against: ReferenceLlama, torch AdamW (weight
decay on matrices only, as megastack's param groups), the trainer's LR schedule, the same GPTDataset
batches, clipping, one optimizer step per global batch; and the trainer's side: its stages launched on N
ranks (tests/workers/train_stage.py) and their logged losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def reference_adamw(model: torch.nn.Module, opt_cfg: Any) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt_cfg.lr,
        betas=tuple(opt_cfg.betas),
        eps=opt_cfg.eps,
        foreach=False,
    )


def reference_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    opt_cfg: Any,
    data: Any,
    iters: int,
    global_batch: int,
    micro: int,
) -> list[float]:
    """``iters`` steps of a stage (its schedule starts at 0, its batches at the first sample); the losses."""
    from megastack.train.engine import learning_rate

    history = []
    for step in range(iters):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, opt_cfg, iters)
        chunk_losses = []
        for start in range(step * global_batch, (step + 1) * global_batch, micro):
            items = [data.train[i] for i in range(start, start + micro)]
            tokens = torch.stack([x["tokens"] for x in items])
            labels = torch.stack([x["labels"] for x in items])
            mask = torch.stack([x["loss_mask"] for x in items]).float()
            per_token = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="none")
            chunk_losses.append((per_token * mask.flatten()).sum() / mask.sum())
        loss = torch.stack(chunk_losses).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(loss.item())
    return history


def launch_stages(tmp: Path, name: str, nprocs: int, runs: list[dict]) -> dict[str, dict]:
    """Train each {"name", "config", "stop_at"?} of ``runs`` in one launch of ``nprocs`` ranks; results by name."""
    from conftest import run_workers

    job = tmp / f"{name}.json"
    job.write_text(json.dumps({"runs": runs}))
    return {r["name"]: r for r in run_workers("train_stage.py", nprocs, str(job), timeout=600)}


def stage_logged(out: Path, field: str) -> list:
    """One field of every train record a stage logged, in order."""
    return [r[field] for r in map(json.loads, (out / "train.jsonl").read_text().splitlines()) if r["type"] == "train"]


def stage_losses(out: Path) -> list[float]:
    """The train losses a stage logged, in order."""
    return stage_logged(out, "loss")

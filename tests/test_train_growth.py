"""Growth-aware training: small stage -> `megastack grow` -> large stage from the grown checkpoint.

The large stage must start from exactly the grown weights (its first loss equals the plain-PyTorch
reference's on the same batch), G_random's new blocks must start masked out (first loss equals the
SMALL model's), and FLOPs must add up across stages through megastack.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, run_workers

SMALL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 96,
    "vocab_size": 1024,
    "seq_length": 32,
    "name": "grow-small",
}
LARGE = {**SMALL, "num_layers": 4, "name": "grow-large"}
GLOBAL_BATCH, MICRO, LARGE_ITERS = 8, 2, 3


def stage(model: dict, out: Path, iters: int, **extra) -> dict:
    return {
        "model": model,
        "out_dir": str(out),
        "optimizer": {"lr": 2e-3, "warmup_iters": 2},
        "parallel": {"micro_batch_size": MICRO, "global_batch_size": GLOBAL_BATCH, **extra.pop("parallel", {})},
        "schedule": {"train_iters": iters, "eval_interval": 2, "eval_iters": 1, "save_interval": 0, "log_interval": 1},
        "data": {"cache_dir": str(out.parent / "cache")},
        "logging": {"tensorboard": False, "progress": "off"},
        **extra,
    }


def launch(tmp: Path, name: str, runs: list[dict]) -> dict[str, dict]:
    job = tmp / f"{name}.json"
    job.write_text(json.dumps({"runs": runs}))
    return {r["name"]: r for r in run_workers("train_stage.py", 2, str(job), timeout=600)}


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "train.jsonl").read_text().splitlines()) if r["type"] == kind]


def grown_model(checkpoint: Path) -> dict:
    """The grown checkpoint's model config (width growth changes norm_epsilon too)."""
    from megastack.ckpt.detect import open_checkpoint
    from megastack.config import to_dict

    return to_dict(open_checkpoint(checkpoint).cfg)


def first_batch_loss(checkpoint: str | Path, total_iters: int) -> float:
    """Loss of a checkpoint's weights (plain PyTorch reference) on the large stage's first global batch."""
    from megastack import layout
    from megastack.ckpt.detect import open_checkpoint
    from megastack.model.reference import ReferenceLlama
    from megastack.train.data import build_datasets, resolve_data

    reader = open_checkpoint(checkpoint)
    cfg = reader.cfg
    model = ReferenceLlama(cfg)
    tensors = {name: reader.read(name) for name in layout.logical_names(cfg)}
    model.load_state_dict(layout.hf_from_logical(tensors, cfg))
    prefixes, tokenizer = resolve_data([], None, cfg.vocab_size)
    data = build_datasets(
        prefixes,
        None,
        "98,2,0",
        tokenizer,
        cfg.seq_length,
        1234,
        total_iters * GLOBAL_BATCH,
        GLOBAL_BATCH,
        Path(checkpoint).parent / "ref_cache",
    )
    losses = []
    with torch.no_grad():
        for start in range(0, GLOBAL_BATCH, MICRO):
            items = [data.train[i] for i in range(start, start + MICRO)]
            tokens = torch.stack([x["tokens"] for x in items])
            labels = torch.stack([x["labels"] for x in items])
            losses.append(F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten()).item())
    return sum(losses) / len(losses)


@pytest.mark.timeout(900)
def test_small_grow_large_chain(tmp_path):
    small_out = tmp_path / "small"
    small = launch(tmp_path, "small", [{"name": "small", "config": stage(SMALL, small_out, 4)}])["small"]
    assert small["iterations"] == 4 and small["cumulative_flops"] == pytest.approx(small["flops"])
    for operator in ("stack", "random"):
        proc = run_cli(
            "grow",
            str(small_out),
            str(tmp_path / f"grown_{operator}"),
            "--operator",
            operator,
            "--factor",
            "2",
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
    # G_random in width (TP2) and in depth and width at once (PP2): new heads, FFN neurons, hidden channels
    wide = ["--operator", "random", "--hidden", "128", "--ffn", "192"]
    for name, flags in (("width", ["--dimension", "width"]), ("both", ["--dimension", "both", "--factor", "2"])):
        proc = run_cli("grow", str(small_out), str(tmp_path / f"grown_{name}"), *wide, *flags, timeout=300)
        assert proc.returncode == 0, proc.stderr
    grown_stack, grown_random = tmp_path / "grown_stack", tmp_path / "grown_random"
    grown_width, grown_both = tmp_path / "grown_width", tmp_path / "grown_both"
    runs = [
        {
            "name": "stack",
            "config": stage(
                LARGE, tmp_path / "large_stack", LARGE_ITERS, init_from=str(grown_stack), parallel={"tensor": 2}
            ),
        },
        {
            "name": "random",
            "config": stage(
                LARGE,
                tmp_path / "large_random",
                LARGE_ITERS,
                init_from=str(grown_random),
                mask_ramp_steps=4,
                parallel={"pipeline": 2},
            ),
        },
        {
            "name": "width",
            "config": stage(
                grown_model(grown_width),
                tmp_path / "large_width",
                LARGE_ITERS,
                init_from=str(grown_width),
                mask_ramp_steps=4,
                parallel={"tensor": 2},
            ),
        },
        {
            "name": "both",
            "config": stage(
                grown_model(grown_both),
                tmp_path / "large_both",
                LARGE_ITERS,
                init_from=str(grown_both),
                mask_ramp_steps=4,
                parallel={"pipeline": 2},
            ),
        },
    ]
    large = launch(tmp_path, "large", runs)

    # the large stage starts from exactly the grown weights (TP2 here)
    first = records(tmp_path / "large_stack", "train")[0]["loss"]
    assert first == pytest.approx(first_batch_loss(grown_stack, LARGE_ITERS), rel=1e-5)
    # G_random: new blocks are masked out at step 0, so the grown model computes the small one (PP2 here)
    first_random = records(tmp_path / "large_random", "train")[0]["loss"]
    small_loss = first_batch_loss(small["checkpoint"], LARGE_ITERS)
    assert first_random == pytest.approx(small_loss, rel=1e-5)
    assert first_random != pytest.approx(first_batch_loss(grown_random, LARGE_ITERS), rel=1e-3)
    # width masks (docs/checkpoints.md): at c = 0 the widened model is the small one too, then they ramp in
    for name, grown in (("width", grown_width), ("both", grown_both)):
        assert "error" not in large[name], large[name]
        got = records(tmp_path / f"large_{name}", "train")
        assert got[0]["loss"] == pytest.approx(small_loss, rel=1e-5), name
        assert got[0]["loss"] != pytest.approx(first_batch_loss(grown, LARGE_ITERS), rel=1e-3), name
        assert len(got) == LARGE_ITERS and all(r["loss"] == r["loss"] for r in got), got  # trains on, no NaN

    # FLOPs add up across stages; the history tells the whole story
    summary = large["stack"]
    assert summary["cumulative_flops"] == pytest.approx(small["cumulative_flops"] + summary["flops"])
    manifest = json.loads((Path(summary["checkpoint"]) / "megastack.json").read_text())
    assert [e["event"] for e in manifest["history"]] == ["train", "grow", "train"]
    assert manifest["cumulative_flops"] == pytest.approx(summary["cumulative_flops"])
    assert "growth" not in manifest  # training consumed the growth marker
    evals = records(tmp_path / "large_stack", "eval")
    assert evals and all(e["cumulative_flops"] > small["cumulative_flops"] for e in evals)

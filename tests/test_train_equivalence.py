"""The trainer equals a plain PyTorch loop, under every layout, and resumes exactly.

One reference run (ReferenceLlama + torch.optim.AdamW, same LR schedule, same megatron GPTDataset
batches, fp32) against megastack's engine in single-process, DP2 with ZeRO-0/1/2/3, TP2, PP2 and TP2xPP2
(ZeRO-0 under TP2, PP2 and tied PP2 too), all started from the same torch_dist checkpoint of the
reference's initial weights. Then: 5 steps, stop, resume 5 in a new process gives the same losses and
weights as 10 straight; and a rank killed with SIGKILL in the middle of a save leaves the last complete
checkpoint, from which a relaunch finishes with the same result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from reference_loop import launch_stages, reference_adamw, reference_steps, stage_logged, stage_losses

from ckpt_factory import write_checkpoint
from conftest import WORKERS

MODEL = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 96,
    "vocab_size": 1024,
    "seq_length": 32,
    "name": "eqv",
}
ITERS, GLOBAL_BATCH, MICRO = 10, 8, 2
OPTIMIZER = {"lr": 2e-3, "warmup_iters": 3, "clip_grad": 0.5, "weight_decay": 0.1}
RTOL = 1e-5


TIED = {**MODEL, "tie_embeddings": True, "name": "eqv-tied"}


def stage_config(out: Path, init: Path, model: dict = MODEL, **parallel) -> dict:
    return {
        "model": model,
        "out_dir": str(out),
        "init_from": str(init),
        "optimizer": OPTIMIZER,
        "parallel": {"micro_batch_size": MICRO, "global_batch_size": GLOBAL_BATCH, **parallel},
        "schedule": {"train_iters": ITERS, "eval_interval": 0, "eval_iters": 0, "save_interval": 0, "log_interval": 1},
        "data": {"cache_dir": str(out.parent / "cache")},
        "logging": {"tensorboard": False, "progress": "off"},
    }


def checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from megastack import layout
    from megastack.ckpt.detect import open_checkpoint

    reader = open_checkpoint(path)
    return {name: reader.read(name) for name in layout.logical_names(reader.cfg)}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the tensor. Elementwise, a handful of embedding entries of rare tokens move by
    ~1e-5 of the tensor's max: their gradients are near Adam's eps, where m / (sqrt(v) + eps) turns
    1e-7 rounding differences of the gradient into larger update differences in any implementation."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def reference_run(tmp: Path, model_fields: dict = MODEL) -> tuple[Path, list[float], dict[str, torch.Tensor]]:
    """The plain PyTorch loop: same init (written as the trainer's init_from), data, schedule, optimizer.
    A tied model has one embedding parameter that both the input and the output use."""
    from megastack import layout
    from megastack.config import ModelConfig
    from megastack.model.reference import ReferenceLlama
    from megastack.train.config import OptimizerConfig
    from megastack.train.data import build_datasets, resolve_data

    cfg = ModelConfig(**model_fields)
    torch.manual_seed(0)
    model = ReferenceLlama(cfg).init_weights(seed=5)
    init = write_checkpoint(model, tmp / f"init-{cfg.name}")
    prefixes, tokenizer = resolve_data([], None, cfg.vocab_size)
    data = build_datasets(
        prefixes, None, "98,2,0", tokenizer, cfg.seq_length, 1234, ITERS * GLOBAL_BATCH, 0, tmp / "ref_cache"
    )
    opt_cfg = OptimizerConfig(**OPTIMIZER)
    history = reference_steps(model, reference_adamw(model, opt_cfg), opt_cfg, data, ITERS, GLOBAL_BATCH, MICRO)
    return init, history, layout.logical_from_hf(model.state_dict(), cfg)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_eq")
    init, ref_losses, ref_weights = reference_run(tmp)
    tied_init, tied_losses, tied_weights = reference_run(tmp, TIED)
    single = stage_config(tmp / "single", init)
    stopped = stage_config(tmp / "resumed", init)
    tied_single = stage_config(tmp / "tied_single", tied_init, TIED)
    results = launch_stages(
        tmp,
        "one_rank",
        1,
        [
            {"name": "single", "config": single},
            {"name": "stopped", "config": stopped, "stop_at": 5},
            {"name": "tied_single", "config": tied_single},
        ],
    )
    layouts = {
        "dp2_zero0": {"zero_stage": 0},
        "dp2_zero1": {"zero_stage": 1},
        "dp2_zero2": {"zero_stage": 2},
        "dp2_zero3": {"zero_stage": 3},
        "tp2": {"tensor": 2},
        "pp2": {"pipeline": 2},
        "tp2_zero0": {"tensor": 2, "zero_stage": 0},
        "pp2_zero0": {"pipeline": 2, "zero_stage": 0},
    }
    layouts |= {"bf16_zero2": {"zero_stage": 2, "precision": "bf16"}, "bf16_pp2": {"pipeline": 2, "precision": "bf16"}}
    two = [{"name": n, "config": stage_config(tmp / n, init, **p)} for n, p in layouts.items()]
    # ZeRO-0 keeps its optimizer state in DeepSpeed's model-states file, not in ZeRO partitions: stop it too
    two.append(
        {"name": "dp2_zero0_stopped", "config": stage_config(tmp / "zero0_resumed", init, zero_stage=0), "stop_at": 5}
    )
    two.append({"name": "tied_pp2", "config": stage_config(tmp / "tied_pp2", tied_init, TIED, pipeline=2)})
    tied_zero0 = stage_config(tmp / "tied_pp2_zero0", tied_init, TIED, pipeline=2, zero_stage=0)
    two.append({"name": "tied_pp2_zero0", "config": tied_zero0})
    results |= launch_stages(tmp, "two_ranks", 2, two)
    four = [
        {"name": "tp2pp2", "config": stage_config(tmp / "tp2pp2", init, tensor=2, pipeline=2)},
        {"name": "tied_tp2pp2", "config": stage_config(tmp / "tied_tp2pp2", tied_init, TIED, tensor=2, pipeline=2)},
    ]
    results |= launch_stages(tmp, "four_ranks", 4, four)
    return {
        "tmp": tmp,
        "init": init,
        "ref_losses": ref_losses,
        "ref_weights": ref_weights,
        "tied": {"losses": tied_losses, "weights": tied_weights},
        "results": results,
    }


def assert_equals_reference(equivalence, name: str, expected: list[float], ref_weights: dict) -> None:
    result = equivalence["results"][name]
    assert "error" not in result, result
    got = stage_losses(equivalence["tmp"] / name)
    assert len(got) == ITERS
    assert expected[-1] < expected[0]
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= RTOL * abs(b), (name, step, got, expected)
    weights = checkpoint_tensors(result["checkpoint"])
    assert weights.keys() == ref_weights.keys()
    worst = max((rel_diff(weights[k], v), k) for k, v in ref_weights.items())
    assert worst[0] <= RTOL, (name, worst)
    worst_element = max((max_diff(weights[k], v), k) for k, v in ref_weights.items())
    assert worst_element[0] <= 20 * RTOL, (name, worst_element)


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "name",
    ["single", "dp2_zero0", "dp2_zero1", "dp2_zero2", "dp2_zero3", "tp2", "pp2", "tp2pp2", "tp2_zero0", "pp2_zero0"],
)
def test_losses_and_weights_equal_plain_pytorch(equivalence, name):
    assert_equals_reference(equivalence, name, equivalence["ref_losses"], equivalence["ref_weights"])


@pytest.mark.parametrize("name", ["tied_single", "tied_pp2", "tied_tp2pp2", "tied_pp2_zero0"])
def test_tied_embeddings_equal_plain_pytorch_under_pipeline_parallelism(equivalence, name):
    """Tied input and output embeddings on different pipeline stages (first and last) train as the one shared
    parameter of the reference loop: the two copies' gradients are summed each step and counted once in
    the clipped gradient norm."""
    tied = equivalence["tied"]
    assert_equals_reference(equivalence, name, tied["losses"], tied["weights"])
    if name != "tied_single":  # and equal to the same model trained without pipeline parallelism
        got, single = stage_losses(equivalence["tmp"] / name), stage_losses(equivalence["tmp"] / "tied_single")
        assert all(abs(a - b) <= RTOL * abs(b) for a, b in zip(got, single)), (got, single)


@pytest.mark.parametrize("zero0, zero1", [("dp2_zero0", "dp2_zero1"), ("tp2_zero0", "tp2"), ("pp2_zero0", "pp2")])
def test_zero0_clips_by_the_norm_over_every_stage(equivalence, zero0, zero1):
    """ZeRO-0 reduces and clips in the trainer's step (DeepSpeed's own ZeRO-0 norm skips the second pipeline
    stage's replicated parameters): the norm it logs is the one DeepSpeed's ZeRO-1 optimizer computes."""
    got, expected = (stage_logged(equivalence["tmp"] / run, "grad_norm") for run in (zero0, zero1))
    assert len(got) == ITERS and all(g is not None for g in got)
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(got, expected)), (got, expected)
    assert max(expected) > OPTIMIZER["clip_grad"]  # the clip was active: a wrong norm would change the update


@pytest.mark.parametrize("name", ["bf16_zero2", "bf16_pp2"])
def test_bf16_trains_close_to_fp32(equivalence, name):
    got, expected = stage_losses(equivalence["tmp"] / name), equivalence["ref_losses"]
    assert len(got) == ITERS and got[-1] < got[0]
    assert all(abs(a - b) <= 2e-2 * abs(b) for a, b in zip(got, expected)), (got, expected)


@pytest.mark.timeout(600)
def test_stop_and_resume_is_exact(equivalence):
    tmp = equivalence["tmp"]
    assert equivalence["results"]["stopped"]["iterations"] == 5
    assert (tmp / "resumed" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    config = stage_config(tmp / "resumed", equivalence["init"])
    # the second run finds the stage finished (as a job killed after its last save would): it trains nothing
    results = launch_stages(
        tmp, "resume", 1, [{"name": "resumed", "config": config}, {"name": "again", "config": config}]
    )
    result, again, single = results["resumed"], results["again"], equivalence["results"]["single"]
    assert result["iterations"] == again["iterations"] == ITERS
    assert result["final_train_loss"] == again["final_train_loss"] == single["final_train_loss"] is not None
    assert stage_losses(tmp / "resumed") == stage_losses(tmp / "single")  # bit-identical, data order included
    a, b = checkpoint_tensors(result["checkpoint"]), checkpoint_tensors(equivalence["results"]["single"]["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in b)
    manifest = json.loads((Path(result["checkpoint"]) / "megastack.json").read_text())
    assert manifest["iteration"] == ITERS and manifest["consumed_tokens"] == ITERS * GLOBAL_BATCH * MODEL["seq_length"]


@pytest.mark.timeout(600)
def test_kill_during_save_resumes_from_last_complete_checkpoint(equivalence, tmp_path):
    from megastack.dist import launch_local, python_argv

    config = stage_config(tmp_path / "killed", equivalence["init"], zero_stage=2)
    config["schedule"]["save_interval"] = 3
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"runs": [{"name": "killed", "config": config}]}))
    # rank 1 SIGKILLs itself in the middle of the iteration-6 save (weights written, engine state not yet)
    crashed = launch_local(
        python_argv(str(WORKERS / "train_stage.py"), str(job)),
        2,
        timeout=300,
        env={"MEGASTACK_FAULT_KILL_IN_SAVE": "6:1"},
    )
    assert not crashed.ok and crashed.returncodes[1] == -9, crashed.describe()
    root = tmp_path / "killed"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not (root / "iter_0000006").exists()
    assert (root / ".iter_0000006.partial").exists()  # the half-written save, never published
    result = launch_stages(tmp_path, "relaunch", 2, [{"name": "killed", "config": config}])["killed"]
    assert not (root / ".iter_0000006.partial").exists()
    assert result["iterations"] == ITERS
    expected = stage_losses(equivalence["tmp"] / "dp2_zero2")
    got = stage_losses(root)
    assert len(got) == ITERS and all(math.isclose(a, b, rel_tol=0, abs_tol=0) for a, b in zip(got, expected))
    a = checkpoint_tensors(result["checkpoint"])
    b = checkpoint_tensors(equivalence["results"]["dp2_zero2"]["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.timeout(600)
def test_zero0_stop_and_resume_is_exact(equivalence):
    """Plain data parallelism (ZeRO-0) resumes from its own checkpoint to the same losses and weights as
    the run that was never stopped."""
    tmp = equivalence["tmp"]
    assert equivalence["results"]["dp2_zero0_stopped"]["iterations"] == 5
    config = stage_config(tmp / "zero0_resumed", equivalence["init"], zero_stage=0)
    result = launch_stages(tmp, "zero0_resume", 2, [{"name": "resumed", "config": config}])["resumed"]
    assert result["iterations"] == ITERS
    assert stage_losses(tmp / "zero0_resumed") == stage_losses(tmp / "dp2_zero0")
    a, b = (
        checkpoint_tensors(result["checkpoint"]),
        checkpoint_tensors(equivalence["results"]["dp2_zero0"]["checkpoint"]),
    )
    assert all(torch.equal(a[k], b[k]) for k in b)

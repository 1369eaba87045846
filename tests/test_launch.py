"""Launchers: mpirun, the deepspeed launcher and a real two-node SLURM cluster start megastack for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_cluster
import yaml

from megastack.dist import free_port

from conftest import REPO

MICRO_RECIPE = {
    "name": "micro",
    "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 1, "micro_batch_size": 4, "global_batch_size": 8},
    "data": {"prefixes": [], "split": "98,2,0", "seed": 1234},
    "logging": {"tensorboard": False, "progress": "lines"},
    "small": {
        "model": "tiny-small",
        "optimizer": {"lr": 3.0e-3, "warmup_iters": 2},
        "schedule": {
            "train_iters": 6,
            "eval_interval": 3,
            "eval_iters": 1,
            "save_interval": 3,
            "keep_last": 1,
            "log_interval": 3,
        },
    },
    "growth": {"operator": "stack", "factor": 4},
    "large": {
        "model": "tiny",
        "optimizer": {"lr": 2.0e-3, "warmup_iters": 2},
        "schedule": {
            "train_iters": 6,
            "eval_interval": 3,
            "eval_iters": 1,
            "save_interval": 3,
            "keep_last": 1,
            "log_interval": 3,
        },
    },
}


def train_config(tmp: Path, name: str) -> Path:
    cfg = {
        "model": "tiny-small",
        "out_dir": str(tmp / name),
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"prefixes": [], "split": "98,2,0", "seed": 1234},
        "optimizer": {"lr": 3.0e-3, "warmup_iters": 2},
        "schedule": {
            "train_iters": 4,
            "eval_interval": 0,
            "eval_iters": 1,
            "save_interval": 0,
            "keep_last": 1,
            "log_interval": 2,
        },
        "logging": {"tensorboard": False, "progress": "lines"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_trained(out: Path, iterations: int, ranks: int = 2) -> None:
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == str(iterations)
    # every rank saved its RNG state into the checkpoint: the ranks found each other and trained together
    engine = out / f"iter_{iterations:07d}" / "engine"
    assert sorted(p.name for p in engine.glob("rng_rank*.pt")) == [f"rng_rank{r:05d}.pt" for r in range(ranks)]
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines() if line.strip()]
    assert any(r["type"] == "summary" for r in records)


def launcher_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, **extra}


@pytest.mark.timeout(600)
def test_mpirun_starts_a_tiny_stage(tmp_path):
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        pytest.skip("no mpirun beside this Python (pip install mpich)")
    config = train_config(tmp_path, "mpi")
    proc = subprocess.run(
        [str(REPO / "launch" / "mpirun.sh"), str(config)],
        capture_output=True,
        text=True,
        timeout=500,
        env=launcher_env(NP="2", MPIRUN=str(mpirun), MEGASTACK_COMMAND="train"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_trained(tmp_path / "mpi", 4)  # (not rank 0's "DP2" line: MPICH forwards output unreliably)


@pytest.mark.timeout(600)
def test_deepspeed_launcher_starts_a_tiny_stage(tmp_path):
    config = train_config(tmp_path, "ds")
    proc = subprocess.run(
        [str(REPO / "launch" / "deepspeed.sh"), str(config)],
        capture_output=True,
        text=True,
        timeout=500,
        env=launcher_env(NPROC="2", MASTER_PORT=str(free_port()), MEGASTACK_COMMAND="train"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "DP2" in proc.stdout
    assert_trained(tmp_path / "ds", 4)


@pytest.fixture(scope="module")
def slurm():
    try:
        slurm_cluster.start()
    except slurm_cluster.ClusterUnavailable as exc:
        pytest.skip(f"cannot run a local SLURM cluster here: {exc}")
    yield
    slurm_cluster.stop()


def sbatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sbatch", "--wait", f"--chdir={cwd}", *args], capture_output=True, text=True, timeout=900, cwd=cwd
    )


def assert_recipe_finished(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["small", "grow", "large"]
    for stage in ("small", "grow", "large"):
        assert (out / "stages" / f"{stage}.json").is_file()
    assert (out / "loss_vs_flops.png").stat().st_size > 0
    return summary


@pytest.mark.timeout(1200)
def test_slurm_one_allocation_across_two_nodes(slurm, tmp_path):
    recipe = tmp_path / "micro.yaml"
    recipe.write_text(yaml.safe_dump(MICRO_RECIPE))
    out = tmp_path / "run"
    proc = sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/job-%j.out",
        str(REPO / "launch" / "slurm" / "run.sbatch"),
        str(recipe),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    log = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    assert "DP2" in log  # one rank on each simulated node found the other
    summary = assert_recipe_finished(out)
    assert summary["stages"][2]["tokens"] == 6 * 8 * 128


@pytest.mark.timeout(1200)
def test_slurm_dependency_chain(slurm, tmp_path):
    recipe = tmp_path / "micro.yaml"
    recipe.write_text(yaml.safe_dump(MICRO_RECIPE))
    out = tmp_path / "chain"
    env = {
        **os.environ,
        "SBATCH_ARGS": f"--wait --nodes=2 --ntasks-per-node=1 --chdir={tmp_path} --output={tmp_path}/chain-%j.out",
    }
    proc = subprocess.run(
        [str(REPO / "launch" / "slurm" / "chain.sh"), str(recipe), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1100,
        env=env,
        cwd=tmp_path,
    )
    logs = "\n".join(p.read_text() for p in tmp_path.glob("chain-*.out"))
    assert proc.returncode == 0, proc.stderr + logs[-3000:]
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["small", "grow", "large", "scratch"]
    assert_recipe_finished(out)

"""bench/gpu.py, the GPU check, kept ready on a machine without one: its CPU smoke runs every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


@pytest.mark.timeout(600)
def test_gpu_check_cpu_smoke(tmp_path):
    """megastack train and the plain SDPA loop both train; the grown checkpoint, loaded by megatron-core's
    own dist_checkpointing, gives the logits of the source stacked by hand in plain PyTorch."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["preset"] == "cpu" and report["environment"]["layer_spec"] == "local"
    assert report["megastack"]["tokens_per_s"] > 0 and report["plain"]["tokens_per_s"] > 0
    assert report["ratio"] == pytest.approx(report["megastack"]["tokens_per_s"] / report["plain"]["tokens_per_s"])
    grow = report["grow"]
    assert (grow["source_layers"], grow["target_layers"]) == (2, 8)
    assert grow["equal"] and grow["max_abs_logit_diff"] < 1e-5 < grow["max_abs_logit"]
    assert "| megastack train tiny fp32 |" in proc.stdout


def test_gpu_check_says_when_there_is_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full check would run")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "no GPU here" in proc.stderr
    assert not (tmp_path / "gpu.json").exists()

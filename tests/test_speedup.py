"""bench/speedup.py's smoke preset end to end (2 local ranks), so the speedup harness cannot rot.

The numbers are recomputed here from the runs' own train.jsonl files, independently of the harness's code:
the FLOP matching of the scratch baseline, the FLOPs each grown run needed to reach scratch's final loss,
and speedup = FLOPs_scratch / FLOPs_op - 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "speedup.py"


def speedup(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def evals(stage: Path) -> list[tuple[int, float, float]]:
    """(iteration, cumulative FLOPs, valid loss) of every evaluation a stage logged."""
    records = [json.loads(line) for line in (stage / "train.jsonl").read_text().splitlines() if line.strip()]
    return [(r["iteration"], r["cumulative_flops"], r["valid_loss"]) for r in records if r["type"] == "eval"]


def first_reach(points: list[tuple[int, float, float]], target: float) -> float | None:
    for i, (_, flops, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return flops
            _, f0, l0 = points[i - 1]
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss)
    return None


@pytest.mark.timeout(900)
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "speedup"
    extra = ("--upcycle", "4,2,2", "--sweep-d", "3", "--sweep-g", "2", "--operators", "stack,zero,stack+carried")
    proc = speedup("--preset", "smoke", "--out", str(out), "--json", str(tmp_path / "copy.json"), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "speedup.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == report
    assert report["world"] == 2 and report["seeds"] == [1]
    assert report["operators"] == ["stack", "zero", "stack+carried"]
    assert set(report["not_measured"]) >= {"random", "learn", "width"}
    png = (out / "speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "speedup.md").read_text()
    for row in ("| scratch |", "| stack |", "| zero |", "`learn`: not measured"):
        assert row in md, md

    seed = out / "seed-1"
    setup = report["setup"]
    small, scratch = evals(seed / "small"), evals(seed / "scratch")
    # FLOP matching: scratch trains whole iterations for at least the FLOPs of small + large
    per_iter = setup["scratch_flops"] / setup["scratch_iters"]
    budget = setup["small_flops"] + setup["large_flops"]
    assert budget <= scratch[-1][1] < budget + per_iter
    assert scratch[0][0] == 0 and scratch[0][2] > small[-1][2]  # scratch starts untrained: eval at start
    target, f_scratch = scratch[-1][2], scratch[-1][1]
    row = report["runs"]["1"]
    assert row["scratch"]["final_valid_loss"] == pytest.approx(target)
    for op in ("stack", "zero"):
        large = evals(seed / f"large-{op}")
        assert large[0][0] == 0 and large[0][1] == pytest.approx(small[-1][1])  # small's FLOPs carried over
        assert large[-1][1] == pytest.approx(budget)
        r = row[op]
        assert r["loss_after_growth"] == pytest.approx(large[0][2])
        assert r["final_valid_loss"] == pytest.approx(large[-1][2])
        reached = first_reach(large, target)
        if reached is None:
            assert r["flops_to_scratch_loss"] is None and r["speedup"] is None
        else:
            assert r["flops_to_scratch_loss"] == pytest.approx(reached)
            assert r["speedup"] == pytest.approx(f_scratch / reached - 1)
        assert report["table"][op]["final_valid_loss"]["mean"] == pytest.approx(large[-1][2])
    # G_zero is function preserving: right after growth the 8-layer model scores the small model's loss
    assert row["zero"]["loss_after_growth"] == pytest.approx(small[-1][2], abs=1e-4)
    # identical stacking, different operators: both grown runs start from the same small checkpoint
    assert row["stack"]["small_final_valid_loss"] == row["zero"]["small_final_valid_loss"]
    # stack+carried: the same grown weights (the same loss right after growth), then Adam continued from the
    # small stage's moments and step instead of a fresh AdamW: a different run from there on
    carried = json.loads((seed / "grown-stack+carried" / "iter_0000000" / "megastack.json").read_text())
    assert carried["optimizer"]["step"] == setup["small_iters"]
    assert row["stack+carried"]["loss_after_growth"] == pytest.approx(row["stack"]["loss_after_growth"], rel=1e-6)
    assert row["stack+carried"]["final_valid_loss"] != row["stack"]["final_valid_loss"]
    assert "`stack+carried`: `stack` with Adam's state carried" in md

    # upcycling: the small model continued dense vs upcycled into 4 half-width experts (top 2: the dense
    # FLOPs per token, plus the router) for the same FLOPs; the MoE starts at the small model's loss
    dense, moe = evals(seed / "dense-continued"), evals(seed / "large-upcycle")
    u = row["upcycle"]
    assert dense[0][1] == pytest.approx(small[-1][1]) and moe[0][1] == pytest.approx(small[-1][1])
    assert u["loss_after_growth"] == pytest.approx(moe[0][2]) and moe[0][2] == pytest.approx(small[-1][2], abs=1e-4)
    dense_flops, moe_flops = dense[-1][1] - small[-1][1], moe[-1][1] - small[-1][1]
    assert abs(moe_flops - dense_flops) <= moe_flops / moe[-1][0]  # FLOP-matched to within an iteration
    reached = first_reach(moe, dense[-1][2])
    assert u["saving"] == (None if reached is None else pytest.approx(dense[-1][1] / reached - 1))
    assert "| upcycled |" in md and "4 experts (top 2, granularity 2)" in md

    # sweeps: growth timing d = 3 small iterations and factor g = 2 (a 4-layer small model), each stacked and
    # trained like the stack run, measured against the same scratch run; the recipe's own point is stack's
    for tag, small_layers in (("d3", 2), ("g2", 4)):
        small_run, large = evals(seed / f"small-{tag}"), evals(seed / f"large-{tag}")
        assert large[0][1] == pytest.approx(small_run[-1][1])
        reached = first_reach(large, target)
        r = row[tag]
        assert r["speedup"] == (None if reached is None else pytest.approx(f_scratch / reached - 1))
        grown = json.loads((seed / f"grown-{tag}" / "iter_0000000" / "megastack.json").read_text())
        assert grown["history"][-1]["source_layers"] == small_layers and grown["model"]["num_layers"] == 8
    assert [p["run"] for p in report["sweeps"]["d"]["points"]] == ["d3", "stack"]
    assert [p["run"] for p in report["sweeps"]["g"]["points"]] == ["g2", "stack"]
    assert report["sweeps"]["d"]["predicted_tokens"] > 0 and "Predicted d" in md
    assert (out / "sweeps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # re-running the same command skips every finished run and reports the same numbers
    again = speedup("--preset", "smoke", "--out", str(out), *extra)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    stages = ("small", "grow-stack", "large-stack", "grow-zero", "large-zero", "scratch", "dense-continued")
    for stage in (*stages, "grow-upcycle", "large-upcycle", "small-d3", "large-d3", "small-g2", "large-g2"):
        assert f"{stage}: finished earlier, skipped" in again.stdout, again.stdout
    assert json.loads((out / "speedup.json").read_text())["table"] == report["table"]

    # --scratch-from: the stored report's scratch rows stand in for the scratch stage, which this run does not
    # even look at; the same numbers come out, and the report says where the baseline came from
    stored = tmp_path / "stored.json"
    stored.write_text((out / "speedup.json").read_text())
    reused = speedup("--preset", "smoke", "--out", str(out), "--scratch-from", str(stored), *extra)
    assert reused.returncode == 0, reused.stdout[-3000:] + reused.stderr[-3000:]
    assert "scratch: finished earlier" not in reused.stdout and "stage scratch" not in reused.stdout
    again_report = json.loads((out / "speedup.json").read_text())
    assert again_report["table"] == report["table"] and again_report["runs"] == report["runs"]
    assert again_report["scratch_from"]["file"] == str(stored)
    assert again_report["scratch_from"]["command"] == report["command"]
    assert f"scratch runs of `{stored}`" in (out / "speedup.md").read_text()


def stored_report(**changes) -> dict:
    """A speedup.json as the smoke preset on 2 ranks writes it, as far as --scratch-from reads it."""
    setup = {"large_model": "tiny", "scratch_iters": 1, "scratch_flops": 1.0, "global_batch": 1, "seq_length": 1}
    runs = {"1": {"scratch": {"curve": [[0, 5.0]]}}}
    return {"recipe": "speedup-smoke", "world": 2, "setup": setup, "runs": runs} | changes


@pytest.mark.parametrize(
    "stored, needle",
    [
        (stored_report(recipe="speedup-cpu"), "its scratch run is not this one"),
        (stored_report(), "scratch_iters, scratch_flops, global_batch, seq_length differ"),
        (stored_report(runs={"1": {"scratch": {"curve": "x"}}}), "field 'runs.1.scratch'.curve is \"x\""),
        (stored_report(runs={"1": {"scratch": {"curve": [[0, "5"]]}}}), "expected a finite number"),
        (stored_report(runs={"1": {"scratch": {"curve": []}}}), "is not a seed's evaluation curve"),
        ("{", "not valid JSON"),
    ],
)
def test_scratch_from_refuses_another_runs_baseline(tmp_path, stored, needle):
    path = tmp_path / "stored.json"
    path.write_text(stored if isinstance(stored, str) else json.dumps(stored))
    proc = speedup("--preset", "smoke", "--out", str(tmp_path / "x"), "--scratch-from", str(path), timeout=120)
    assert_one_line_error(proc, needle)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--operators", "stack,bogus"], "--operators 'bogus' is unknown"),
        (["--operators", "stack,stack"], "--operators needs distinct"),
        (["--seeds", "1,x"], "--seeds"),
        (["--learn-tokens", "0"], "--learn-tokens"),
        (["--recipe", "no-such-recipe"], "no-such-recipe"),
        (["--upcycle", "4"], "--upcycle"),
        (["--upcycle", "4,1"], "--topk 1"),
        (["--sweep-g", "3"], "--sweep-g 3"),
        (["--sweep-d", "0"], "--sweep-d"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
    proc = speedup("--preset", "smoke", "--out", str(tmp_path / "x"), *args, timeout=120)
    assert_one_line_error(proc, needle)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()

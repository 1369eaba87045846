"""`megastack data` and `megastack train` as a user runs them: data preparation, the loss going down on
the demo corpus, the logs, and one clear line (and nothing written) for each kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from ckpt_factory import reference, small_config, write_checkpoint
from conftest import assert_one_line_error, run_cli

TINY_STAGE = {
    "model": "tiny-small",
    "parallel": {"micro_batch_size": 8, "global_batch_size": 8},
    "optimizer": {"lr": 3e-3, "warmup_iters": 5},
    "schedule": {"train_iters": 30, "eval_interval": 10, "eval_iters": 2, "save_interval": 15, "log_interval": 5},
    "logging": {"progress": "lines"},
}


def write_config(tmp: Path, name: str, config: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """A few text and jsonl files, prepared with `megastack data` into a 400-token vocabulary."""
    tmp = tmp_path_factory.mktemp("corpus")
    raw = tmp / "raw"
    raw.mkdir()
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("os.py", "json/decoder.py", "textwrap.py"):
        (raw / name.replace("/", "_")).write_text((stdlib / name).read_text())
    (raw / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i}: " + "hello world " * i}) + "\n" for i in range(1, 40))
    )
    out = tmp / "data"
    proc = run_cli("data", str(raw), "--out", str(out), "--vocab-size", "400", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return out


def test_data_writes_tokenizer_and_indexed_dataset_deterministically(small_corpus, tmp_path):
    for name in ("tokenizer.model", "corpus.bin", "corpus.idx", "data.json"):
        assert (small_corpus / name).is_file()
    info = json.loads((small_corpus / "data.json").read_text())
    assert info["vocab_size"] == 400 and info["documents"] == 3 + 39
    again = tmp_path / "again"
    proc = run_cli("data", str(small_corpus.parent / "raw"), "--out", str(again), "--vocab-size", "400")
    assert proc.returncode == 0, proc.stderr
    for name in ("tokenizer.model", "corpus.bin", "corpus.idx"):
        assert (again / name).read_bytes() == (small_corpus / name).read_bytes(), name
    refused = run_cli("data", str(small_corpus.parent / "raw"), "--out", str(again))
    assert_one_line_error(refused, "already exists")


@pytest.mark.timeout(600)
def test_loss_decreases_on_demo_corpus_and_logs(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, "tiny", {**TINY_STAGE, "out_dir": str(out)})
    proc = run_cli("train", str(config), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["iteration"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert [r["iteration"] for r in evals] == [10, 20, 30]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, train
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"], evals
    assert all(r["cumulative_flops"] > 0 and r["tokens_per_s"] > 0 for r in train)
    assert evals[-1]["cumulative_flops"] == pytest.approx(train[-1]["cumulative_flops"])
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_0000015", "iter_0000030"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "valid loss" in proc.stdout
    manifest = json.loads((out / "iter_0000030" / "megastack.json").read_text())
    assert manifest["cumulative_flops"] == pytest.approx(train[-1]["cumulative_flops"])
    assert manifest["history"][-1]["event"] == "train"
    from megastack.ckpt.inspect import verify

    assert verify(out) == []  # megastack verify accepts what training wrote


def expect_user_error(tmp_path: Path, config: dict, *needles: str) -> None:
    out = tmp_path / "never"
    path = write_config(tmp_path, "bad", {**config, "out_dir": str(out)})
    assert_one_line_error(run_cli("train", str(path), timeout=300), *needles)
    assert not out.exists()


def test_missing_dataset_files_is_one_line(tmp_path):
    config = {**TINY_STAGE, "data": {"prefixes": [str(tmp_path / "nowhere" / "corpus")]}}
    expect_user_error(tmp_path, config, "data.prefixes", "corpus.bin not found")


def test_tokenizer_vocab_mismatch_is_one_line(tmp_path, small_corpus):
    config = {**TINY_STAGE, "data": {"prefixes": [str(small_corpus / "corpus")]}}
    expect_user_error(tmp_path, config, "400 tokens", "vocab_size is 1024")


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    other = write_checkpoint(reference(small_config()), tmp_path / "other")
    expect_user_error(tmp_path, {**TINY_STAGE, "init_from": str(other)}, "another architecture", "hidden_size 64")


def test_global_batch_not_divisible_is_one_line(tmp_path):
    config = {**TINY_STAGE, "parallel": {"micro_batch_size": 3, "global_batch_size": 8}}
    expect_user_error(tmp_path, config, "global_batch_size (8)", "micro_batch_size")


def test_unknown_field_and_zero_with_pipeline_are_one_line(tmp_path):
    expect_user_error(tmp_path, {**TINY_STAGE, "optimiser": {}}, "optimiser")
    config = {**TINY_STAGE, "parallel": {"pipeline": 2, "zero_stage": 2}}
    expect_user_error(tmp_path, config, "zero_stage", "pipeline")


def test_zero0_in_mixed_precision_is_one_line(tmp_path):
    config = {**TINY_STAGE, "parallel": {"zero_stage": 0, "precision": "bf16"}}
    expect_user_error(tmp_path, config, "zero_stage 0 with precision bf16", "not built")


def test_out_dir_over_init_from_is_refused_and_the_source_kept(tmp_path):
    """Training prunes old iter_* in out_dir: with out_dir = init_from it would delete the source."""
    source = write_checkpoint(reference(small_config()), tmp_path / "grown")
    before = sorted(p.relative_to(source).as_posix() for p in source.rglob("*"))
    for out_dir in (source, source / "sub", tmp_path):
        config = {
            **TINY_STAGE,
            "out_dir": str(out_dir),
            "init_from": str(source),
            "resume": False,
            "schedule": {**TINY_STAGE["schedule"], "keep_last": 1},
        }
        proc = run_cli("train", str(write_config(tmp_path, "over", config)))
        assert_one_line_error(proc, "out_dir", "must not be, contain or lie inside init_from")
    assert sorted(p.relative_to(source).as_posix() for p in source.rglob("*")) == before


@pytest.mark.timeout(300)
def test_resume_refuses_a_planted_pickle_in_deepspeeds_files(tmp_path):
    """DeepSpeed loads its optimizer files with weights_only=False; megastack's resume must not."""
    import torch

    out = tmp_path / "run"
    stage = {
        **TINY_STAGE,
        "out_dir": str(out),
        "parallel": {"micro_batch_size": 4, "global_batch_size": 4},
        "schedule": {"train_iters": 2, "eval_interval": 2, "eval_iters": 1, "save_interval": 2},
    }
    proc = run_cli("train", str(write_config(tmp_path, "two", stage)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    optim = next((out / "iter_0000002" / "engine").glob("*optim_states.pt"))
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = torch.load(optim, weights_only=False)  # our own file, just written
    state["planted"] = Planted()
    torch.save(state, optim)
    more = {**stage, "schedule": {**stage["schedule"], "train_iters": 4}}
    proc = run_cli("train", str(write_config(tmp_path, "four", more)), timeout=300)
    assert proc.returncode == 1 and "refused to load" in proc.stderr and "posix.system" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert not (out / "iter_0000004").exists()


BLEND_SCRIPT = """
import sys, torch
from pathlib import Path
from megastack.dist import init_distributed
from megastack.train.data import Tokenizer, build_datasets

init_distributed()  # megatron's BlendedDataset consults the process group (rank 0 builds its cache)
corpus, tmp = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = Tokenizer(corpus / "tokenizer.model")
prefix = str(corpus / "corpus")

def build(seed, cache):
    return build_datasets([prefix, prefix], [0.25, 0.75], "90,10,0", tokenizer, 32, seed, 40, 8, tmp / cache)

first, again, other = build(7, "a"), build(7, "b"), build(8, "c")
assert len(first.train) >= 40 and first.valid is not None and len(first.valid) >= 8
assert type(first.train).__name__ == "BlendedDataset"
assert all(torch.equal(first.train[i]["tokens"], again.train[i]["tokens"]) for i in range(40))
assert any(not torch.equal(first.train[i]["tokens"], other.train[i]["tokens"]) for i in range(40))
print("BLEND OK")
"""


def test_blended_split_datasets_are_deterministic_by_seed(small_corpus, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", BLEND_SCRIPT, str(small_corpus), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "BLEND OK" in proc.stdout, proc.stderr[-3000:]

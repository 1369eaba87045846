"""Every checkpoint format's files, mutated by hypothesis (truncated, bytes flipped, a JSON header lying
about a field's type or value): `megastack convert` either succeeds or fails with one UserError line;
it never raises anything else, never publishes a destination on failure, never changes the source, and a
successful conversion of a damaged file is only possible where no checksum guards it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megastack.ckpt.manifest import resolve_iteration_dir
from megastack.cli import main

from ckpt_factory import reference, small_config, write_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "megatron_lm"
SETTINGS = settings(
    max_examples=int(os.environ.get("MEGASTACK_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    model = reference(small_config())
    write_checkpoint(model, root / "td")
    write_checkpoint(model, root / "legacy", fmt="legacy", tp=2, pp=1)
    shutil.copytree(FIXTURES / "hf_tiny", root / "hf")
    shutil.copytree(FIXTURES / "torch_dist", root / "mlm_td")  # no manifest: nothing guards its bytes
    shutil.copytree(FIXTURES / "legacy", root / "mlm_legacy")
    return root


def convert_contract(src: Path, work: Path, must_fail: bool = False) -> None:
    """The contract on one (possibly damaged) source; ``must_fail``: a damage a checksum guards."""
    before = {p: p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    dst = work / "out"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["convert", str(src), str(dst), "--to", "hf"])  # anything but UserError propagates
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        assert dst.is_dir() and not must_fail, "a file changed under its megastack.json was converted"
    else:
        assert code == 1 and len(lines) == 1 and lines[0].startswith("megastack: error: "), err.getvalue()
        assert not dst.exists() and not (work / ".out.partial").exists()
    assert {p: p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()} == before
    shutil.rmtree(dst, ignore_errors=True)


def damaged_copy(sources: Path, name: str, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / name, ignore_errors=True)
    shutil.copytree(sources / name, work / name)
    return work / name


def pick_file(src: Path, index: int) -> Path:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "latest_checkpointed_iteration.txt")
    return files[index % len(files)]


mutations = st.tuples(
    st.sampled_from(["truncate", "flip", "zero"]), st.integers(0, 1 << 30), st.integers(0, 1 << 30), st.integers(1, 255)
)


def mutate(path: Path, how: str, where: int, length: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    if not data:
        return
    at = where % len(data)
    if how == "truncate":
        del data[at:]
    elif how == "flip":
        data[at] ^= value
    else:
        span = 1 + length % 64
        data[at : at + span] = bytes(len(data[at : at + span]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["td", "legacy", "hf", "mlm_td", "mlm_legacy"])
@SETTINGS
@given(file_index=st.integers(0, 100), mutation=mutations)
def test_mutated_files_keep_the_contract(sources, tmp_path, name, file_index, mutation):
    src = damaged_copy(sources, name, tmp_path / "case")
    target = pick_file(src, file_index)
    before = target.read_bytes()
    mutate(target, *mutation)
    guarded = name in ("td", "legacy") and target.name != "megastack.json"  # megastack wrote its sha256
    convert_contract(src, tmp_path / "case", must_fail=guarded and target.read_bytes() != before)


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
    st.recursive(st.none(), lambda inner: st.lists(inner, max_size=2), max_leaves=50),
)


@SETTINGS
@given(
    key=st.sampled_from(
        [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "rms_norm_eps",
            "tie_word_embeddings",
            "rope_theta",
            "max_position_embeddings",
            "head_dim",
            "model_type",
            "rope_parameters",
        ]
    ),
    value=json_values,
)
def test_lying_config_json_keeps_the_contract(sources, tmp_path, key, value):
    src = damaged_copy(sources, "hf", tmp_path / "case")
    config = json.loads((src / "config.json").read_text())
    config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    convert_contract(src, tmp_path / "case")


@SETTINGS
@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=json_values, tensor=st.integers(0, 30))
def test_lying_safetensors_header_keeps_the_contract(sources, tmp_path, field, value, tensor):
    src = damaged_copy(sources, "hf", tmp_path / "case")
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    header[names[tensor % len(names)]][field] = value
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    convert_contract(src, tmp_path / "case")


@SETTINGS
@given(
    field=st.sampled_from(
        ["iteration", "consumed_tokens", "cumulative_flops", "model", "history", "files", "growth", "format"]
    ),
    value=json_values,
)
def test_lying_manifest_keeps_the_contract(sources, tmp_path, field, value):
    src = damaged_copy(sources, "td", tmp_path / "case")
    manifest = resolve_iteration_dir(src) / "megastack.json"
    data = json.loads(manifest.read_text())
    data[field] = value
    manifest.write_text(json.dumps(data))
    convert_contract(src, tmp_path / "case")

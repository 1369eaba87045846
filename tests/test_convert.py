"""Checkpoint conversion and inspection: HF <-> torch_dist <-> legacy, exact bytes, logits, bad input.

The chain HF -> torch_dist -> legacy TP2PP2 -> HF runs through the real command line (the middle step
through tools/convert_checkpoint.py) for a tied single-file and an untied sharded (index) checkpoint,
both with GQA. One 4-rank launch loads the converted Megatron checkpoints into megatron-core under TP2PP2;
its logits are compared here with transformers' LlamaForCausalLM on the original.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megastack import layout
from megastack.ckpt.convert import convert
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.inspect import KEYS, verify

from conftest import REPO, assert_one_line_error, in_process, run_cli, run_workers

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(11))


def make_hf(directory: Path, tie: bool, shard: str | None) -> torch.Tensor:
    """A random-init transformers Llama (4 layers, hidden 64, 4 heads, 2 kv groups), saved; its logits."""
    hc = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(5 + tie)
    model = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():  # norms are ones at init; make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    with torch.no_grad():
        return model(TOKENS).logits


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Both models through HF -> torch_dist -> legacy TP2PP2 -> HF, on the command line."""
    root = tmp_path_factory.mktemp("convert")
    cases = {}
    for label, tie, shard in (("untied", False, "60KB"), ("tied", True, None)):
        d = root / label
        logits = make_hf(d / "hf", tie, shard)
        check(run_cli("convert", str(d / "hf"), str(d / "td"), "--to", "torch_dist"))
        check(
            subprocess.run(
                [
                    sys.executable,
                    str(REPO / "tools" / "convert_checkpoint.py"),
                    str(d / "td"),
                    str(d / "lg"),
                    "--to",
                    "legacy",
                    "--tp",
                    "2",
                    "--pp",
                    "2",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
        )
        check(run_cli("convert", str(d / "lg"), str(d / "hf2"), "--to", "hf"))
        cases[label] = {"dir": d, "logits": logits, "tie": tie}
    return cases


def test_sharded_source_really_is_sharded(chain):
    src = chain["untied"]["dir"] / "hf"
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2


@pytest.mark.parametrize("label", ["untied", "tied"])
def test_round_trip_is_bit_exact(chain, label):
    d = chain[label]["dir"]
    before, after = safetensors_of(d / "hf"), safetensors_of(d / "hf2")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name].view(torch.int32), tensor.view(torch.int32)), name
    if label == "tied":  # single file in, single file out: the very same bytes as save_pretrained's
        assert (d / "hf" / "model.safetensors").read_bytes() == (d / "hf2" / "model.safetensors").read_bytes()
    config = json.loads((d / "hf2" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is chain[label]["tie"] and config["rope_theta"] == 500.0


def test_hf_output_is_produced_a_block_of_rows_at_a_time(chain, tmp_path, monkeypatch):
    """The HF writer never holds a whole large tensor (a 7B embedding is 250 MiB): each HF tensor is produced
    in blocks of rows, q, k and v too (their query groups' rows of the fused QKV). With blocks cut to 512 bytes
    the file is still the very bytes of save_pretrained's, and every block is at most one block or one row."""
    from megastack.ckpt import hf

    monkeypatch.setattr(hf, "BLOCK_BYTES", 512)
    blocks: list[tuple[str, int, int]] = []  # (hf name, bytes, bytes of one row)
    original = hf.HFWriter._blocks

    def recording(self, logical, hf_name, produce):
        for block in original(self, logical, hf_name, produce):
            blocks.append((hf_name, block.nbytes, block[0].nbytes if block.dim() > 1 else block.element_size()))
            yield block

    monkeypatch.setattr(hf.HFWriter, "_blocks", recording)
    d = chain["tied"]["dir"]
    convert(d / "td", tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (d / "hf" / "model.safetensors").read_bytes()
    assert all(nbytes <= max(512, row) for _, nbytes, row in blocks)
    assert len({name for name, _, _ in blocks}) < len(blocks)  # tensors did come in several blocks
    assert any(name.endswith("q_proj.weight") for name, _, _ in blocks)


@pytest.mark.parametrize("label", ["untied", "tied"])
def test_transformers_loads_the_converted_hf(chain, label):
    d = chain[label]["dir"]
    model = transformers.LlamaForCausalLM.from_pretrained(d / "hf2").eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, chain[label]["logits"])


@pytest.mark.timeout(600)
def test_megatron_tp2pp2_logits_equal_transformers(chain, tmp_path):
    spec = {
        "tokens": TOKENS.tolist(),
        "cases": [
            {"label": label, "torch_dist": str(c["dir"] / "td"), "legacy": str(c["dir"] / "lg")}
            for label, c in chain.items()
        ],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    results = run_workers("convert_logits.py", 4, str(tmp_path / "spec.json"), timeout=500)
    seen = {(r["label"], r["source"]) for r in results}
    assert seen == {(label, source) for label in chain for source in ("torch_dist", "legacy")}, seen
    for r in results:
        diff = (torch.tensor(r["logits"]) - chain[r["label"]]["logits"]).abs().max().item()
        print(f"TP2PP2 {r['label']} from {r['source']}: max |logit diff| {diff:.2e}")
        assert diff <= 1e-5, (r["label"], r["source"], diff)


# ----------------------------------------------------------------------------- more conversions


def test_legacy_reshard_and_sharded_hf_output(chain, tmp_path):
    d = chain["untied"]["dir"]
    # legacy TP2PP2 -> legacy TP1PP4 (the reshard users ask Megatron-LM for), then to a sharded HF dir
    convert(d / "lg", tmp_path / "lg14", "legacy", tp=1, pp=4)
    reader = open_checkpoint(tmp_path / "lg14")
    assert (reader.tp, reader.pp) == (1, 4)
    convert(tmp_path / "lg14", tmp_path / "hf", "hf", hf_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert verify(tmp_path / "hf") == []  # every file's sha256 and CRC32, hashed while written two at a time
    before, after = safetensors_of(d / "hf"), safetensors_of(tmp_path / "hf")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, chain["untied"]["logits"])


def test_dtype_conversion_and_legacy_layout_default(chain, tmp_path):
    d = chain["tied"]["dir"]
    check(in_process("convert", str(d / "hf"), str(tmp_path / "bf"), "--to", "legacy", "--dtype", "bf16"))
    reader = open_checkpoint(tmp_path / "bf")
    assert (reader.tp, reader.pp) == (1, 1) and reader.cfg.dtype == "bf16"
    src = open_checkpoint(d / "hf")
    for name in layout.logical_names(src.cfg):
        assert torch.equal(reader.read(name), src.read(name).to(torch.bfloat16)), name
    # legacy -> legacy without --tp/--pp keeps the input's layout
    check(in_process("convert", str(d / "lg"), str(tmp_path / "same"), "--to", "legacy"))
    assert (open_checkpoint(tmp_path / "same").tp, open_checkpoint(tmp_path / "same").pp) == (2, 2)


@pytest.mark.parametrize("column_read_bytes", [8 << 20, 64])
def test_hf_reader_reads_only_requested_pieces(chain, column_read_bytes, monkeypatch):
    """TP pieces read from transformers' files equal the pieces cut from the whole tensors; column pieces
    (proj, fc2) are cut from blocks of whole rows (with 64-byte blocks: a row or two at a time)."""
    from megastack.ckpt import hf

    monkeypatch.setattr(hf, "COLUMN_READ_BYTES", column_read_bytes)
    reader = open_checkpoint(chain["untied"]["dir"] / "hf")
    full = {name: reader.read(name) for name in layout.logical_names(reader.cfg)}
    for name, tensor in full.items():
        _, kind = layout.split_name(name)
        for rank in range(2):
            pieces = layout.tp_pieces(kind, tuple(tensor.shape), rank, 2)
            assert torch.equal(reader.read(name, pieces), layout.tp_shard(kind, tensor, rank, 2)), (name, rank)
    state = safetensors_of(chain["untied"]["dir"] / "hf")
    assert all(torch.equal(full[k], v) for k, v in layout.logical_from_hf(state, reader.cfg).items())


def test_hf_reader_reads_any_row_range_of_the_fused_qkv(chain):
    """Row ranges of the fused QKV that cut query groups anywhere (a torch_dist chunk of a 7B QKV does), read
    run by run from transformers' q, k and v tensors, equal the rows of the QKV fused from the whole
    tensors (layout.logical_from_hf)."""
    reader = open_checkpoint(chain["untied"]["dir"] / "hf")
    state = safetensors_of(chain["untied"]["dir"] / "hf")
    for layer in (0, reader.cfg.num_layers - 1):
        name = layout.layer_name(layer, "qkv")
        fused = layout.logical_from_hf(state, reader.cfg)[name]
        rows = fused.shape[0]
        for start in range(rows):
            for length in {1, 7, 33, 64, rows - start}:
                if start + length <= rows:
                    got = reader.read(name, [layout.Piece(0, start, length)])
                    assert torch.equal(got, fused[start : start + length]), (name, start, length)


def test_hf_reader_casts_parts_stored_in_another_dtype(chain, tmp_path):
    """A checkpoint mixing dtypes within one logical tensor (k and v in bf16 beside an fp32 q; up in bf16
    beside an fp32 gate): each part stored in another dtype is read, then cast into place, for the whole
    tensor and for row ranges that cut q/k/v runs and the gate/up boundary anywhere; every value equals the
    tensor fused from the stored parts cast to fp32 (exact: bf16 -> fp32 loses nothing)."""
    from safetensors.torch import save_file

    state = safetensors_of(chain["untied"]["dir"] / "hf")
    mixed = {
        k: v.to(torch.bfloat16) if k.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")) else v
        for k, v in state.items()
    }
    assert {v.dtype for v in mixed.values()} == {torch.float32, torch.bfloat16}
    src = tmp_path / "mixed"
    src.mkdir()
    shutil.copy(chain["untied"]["dir"] / "hf" / "config.json", src / "config.json")
    save_file(mixed, src / "model.safetensors", metadata={"format": "pt"})
    reader = open_checkpoint(src)
    expected = layout.logical_from_hf({k: v.float() for k, v in mixed.items()}, reader.cfg)
    for layer in (0, reader.cfg.num_layers - 1):
        for kind in ("qkv", "fc1"):
            name = layout.layer_name(layer, kind)
            assert reader.dtype(name) == torch.float32
            assert torch.equal(reader.read(name), expected[name]), name
            rows = expected[name].shape[0]
            for start, length in ((0, 1), (3, 29), (rows // 2 - 5, 10), (rows - 7, 7)):
                got = reader.read(name, [layout.Piece(0, start, length)])
                assert torch.equal(got, expected[name][start : start + length]), (name, start, length)
    check(in_process("convert", str(src), str(tmp_path / "td"), "--to", "torch_dist"))
    converted = open_checkpoint(tmp_path / "td")
    for name in layout.logical_names(reader.cfg):
        assert torch.equal(converted.read(name), expected[name]), name


@pytest.mark.parametrize("fmt", ["hf", "td"])
def test_readers_read_ahead_the_span_stored_next(chain, fmt, monkeypatch):
    """Read-ahead: reading a stored tensor (HF: transformers' sharded files) or chunk (torch_dist) asks the
    kernel for the span stored after it in the same file, so reading everything hints exactly the spans that
    follow a tensor's; the values read are those read without hints."""
    from megastack import fsio

    directory = chain["untied"]["dir"] / fmt
    plain = open_checkpoint(directory)
    values = {name: plain.read(name) for name in layout.logical_names(plain.cfg)}
    hinted: list[tuple[str, int, int]] = []

    def hint(fd: int, offset: int, length: int) -> None:
        hinted.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))

    monkeypatch.setattr(fsio, "read_ahead", hint)
    reader = open_checkpoint(directory)
    for name, tensor in values.items():
        assert torch.equal(reader.read(name), tensor), name
    if fmt == "hf":
        stored = [(e.file, e.start, e.nbytes, True) for e in reader.entries.values()]
        assert len({e.file for e in reader.entries.values()}) > 1  # transformers sharded it
    else:  # the _extra_state objects stored after the chunks are not tensors: never read as chunks
        tensors = {key for key, md in reader.metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
        stored = [
            (info.relative_path, info.offset, info.length, index.fqn in tensors)
            for index, info in reader.metadata.storage_data.items()
        ]
    stored.sort()
    expected = {
        (str((reader.path / b[0]).resolve()), b[1], b[2])
        for a, b in zip(stored, stored[1:])
        if a[0] == b[0] and a[3]  # b follows a tensor span read from the same file
    }
    assert expected and set(hinted) == expected


@pytest.mark.timeout(300)
def test_multi_rank_conversion_matches_single_rank(chain, tmp_path):
    from megastack.dist import launch_local

    d = chain["untied"]["dir"]
    result = launch_local(
        [
            sys.executable,
            "-m",
            "megastack",
            "convert",
            str(d / "hf"),
            str(tmp_path / "lg"),
            "--to",
            "legacy",
            "--tp",
            "2",
            "--pp",
            "2",
        ],
        2,
        timeout=240,
        cwd=REPO,
    )
    assert result.ok, result.describe()
    multi, single = open_checkpoint(tmp_path / "lg"), open_checkpoint(d / "lg")
    for name in layout.logical_names(single.cfg):
        assert torch.equal(multi.read(name), single.read(name)), name
    assert check(in_process("verify", str(tmp_path / "lg"))).stdout.strip().endswith("files match megastack.json)")


def test_dry_run_writes_nothing(chain, tmp_path):
    out = check(
        in_process(
            "convert",
            str(chain["tied"]["dir"] / "hf"),
            str(tmp_path / "x"),
            "--to",
            "legacy",
            "--tp",
            "2",
            "--dry-run",
            "--json",
        )
    ).stdout
    plan = json.loads(out)
    assert plan["tp"] == 2 and plan["ranks"][0]["units"] == 2 and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- inspect


def inspect_json(path: Path) -> dict:
    return json.loads(check(in_process("inspect", str(path), "--json")).stdout)


def test_inspect_each_format(chain):
    d = chain["untied"]["dir"]
    hf, td, lg, hf2 = (inspect_json(d / name) for name in ("hf", "td", "lg", "hf2"))
    for info, fmt in ((hf, "hf"), (td, "torch_dist"), (lg, "legacy"), (hf2, "hf")):
        assert tuple(sorted(info)) == tuple(sorted(KEYS)) and info["format"] == fmt
        m = info["model"]
        assert (
            m["num_layers"],
            m["hidden_size"],
            m["num_attention_heads"],
            m["num_query_groups"],
            m["ffn_hidden_size"],
            m["vocab_size"],
            m["tie_embeddings"],
        ) == (4, 64, 4, 2, 96, 256, False)
        assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
        for t in info["tensors"]:
            assert sorted(t) == ["bytes", "dtype", "file", "name", "shape"] and t["dtype"] == "float32"
    params = hf["parameters"]
    assert hf["total_bytes"] == td["total_bytes"] == params * 4 and hf["layout"] is None
    assert hf["iteration"] is None and hf["manifest"] is None and hf["history"] == []
    assert len({t["file"] for t in hf["tensors"]}) > 2
    assert td["layout"] is None and td["iteration"] == 0
    qkv = next(t for t in td["tensors"] if t["name"] == "decoder.layers.self_attention.linear_qkv.weight")
    assert qkv["shape"] == [4, 128, 64] and qkv["file"] is None  # global shape, layer axis first
    assert lg["layout"] == {"tp": 2, "pp": 2}
    assert {t["file"] for t in lg["tensors"]} == {
        "mp_rank_00_000",
        "mp_rank_01_000",
        "mp_rank_00_001",
        "mp_rank_01_001",
    }
    assert [e["event"] for e in hf2["history"]] == ["convert"] * 3
    assert [(e["from"], e["to"]) for e in hf2["history"]] == [
        ("hf", "torch_dist"),
        ("torch_dist", "legacy"),
        ("legacy", "hf"),
    ]
    assert hf2["manifest"]["format"] == "hf" and hf2["manifest"]["files_listed"] == 2


def test_inspect_json_is_stable(chain):
    path = chain["tied"]["dir"] / "lg"
    assert (
        check(in_process("inspect", str(path), "--json")).stdout
        == check(in_process("inspect", str(path), "--json")).stdout
    )


def test_inspect_human_table_on_the_command_line(chain):
    out = check(run_cli("inspect", str(chain["tied"]["dir"] / "lg"))).stdout
    assert "legacy checkpoint, iteration 0" in out and "TP=2 x PP=2" in out
    assert "4 heads / 2 query groups" in out and "tied embeddings" in out
    assert "convert hf -> torch_dist" in out and "convert torch_dist -> legacy TP=2 x PP=2" in out


# ----------------------------------------------------------------------------- bad input


def copy_hf(chain, tmp_path, label="untied") -> Path:
    dst = tmp_path / "src"
    shutil.copytree(chain[label]["dir"] / "hf", dst)
    return dst


def assert_refused(proc, dst: Path, src: Path, before: dict, *needles: str) -> None:
    assert_one_line_error(proc, *needles)
    assert not dst.exists() and not (dst.parent / f".{dst.name}.partial").exists()
    assert tree_digest(src) == before


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case,needles",
    [
        ("mistral", ("model_type 'mistral'", "only Llama")),
        ("rope_scaling", ("rope_parameters", "RoPE scaling 'llama3'")),
        ("rope_scaling_v4", ("rope_scaling", "RoPE scaling 'linear'")),
        ("bias", ("attention_bias",)),
        ("missing_shard", ("model-00002-of-", "shard missing")),
        ("index_wrong_shard", ("model.safetensors.index.json", "does not match the shard files")),
        ("index_unlisted", ("does not list", "does not match the shard files")),
        ("tp_heads", ("--tp 3", "num_attention_heads (4)")),
        ("tp_groups", ("--tp 4", "num_query_groups (2)")),
        ("tp_torch_dist", ("--tp/--pp apply to legacy output only",)),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(chain, tmp_path, case, needles):
    src = copy_hf(chain, tmp_path)
    index = src / "model.safetensors.index.json"
    extra: list[str] = []
    if case == "mistral":
        edit_json(src / "config.json", lambda c: c.update(model_type="mistral", architectures=["MistralForCausalLM"]))
    elif case == "rope_scaling":
        edit_json(
            src / "config.json",
            lambda c: c.update(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8,
                }
            ),
        )
    elif case == "rope_scaling_v4":  # transformers 4 style: top-level rope_theta + rope_scaling
        edit_json(
            src / "config.json",
            lambda c: c.update(rope_parameters=None, rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0}),
        )
    elif case == "bias":
        edit_json(src / "config.json", lambda c: c.update(attention_bias=True))
    elif case == "missing_shard":
        next(src.glob("model-00002-of-*.safetensors")).unlink()
    elif case == "index_wrong_shard":

        def move(ix):
            name = "model.layers.0.self_attn.q_proj.weight"
            ix["weight_map"][name] = next(
                f for f in sorted(set(ix["weight_map"].values())) if f != ix["weight_map"][name]
            )

        edit_json(index, move)
    elif case == "index_unlisted":
        edit_json(index, lambda ix: ix["weight_map"].pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "tp_heads":
        extra = ["--tp", "3"]
    elif case == "tp_groups":
        extra = ["--tp", "4"]
    to = "torch_dist" if case == "tp_torch_dist" else "legacy"
    if case == "tp_torch_dist":
        extra = ["--tp", "2"]
    before = tree_digest(src)
    dst = tmp_path / "out"
    assert_refused(in_process("convert", str(src), str(dst), "--to", to, *extra), dst, src, before, *needles)


def test_missing_shard_on_the_command_line(chain, tmp_path):
    src = copy_hf(chain, tmp_path)
    next(src.glob("model-00003-of-*.safetensors")).unlink()
    before, dst = tree_digest(src), tmp_path / "out"
    assert_refused(
        run_cli("convert", str(src), str(dst), "--to", "torch_dist"),
        dst,
        src,
        before,
        "model-00003-of-",
        "shard missing",
    )


def test_existing_destination_is_left_alone(chain, tmp_path):
    src = chain["tied"]["dir"] / "hf"
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    before = tree_digest(src)
    assert_one_line_error(in_process("convert", str(src), str(dst), "--to", "torch_dist"), "already exists")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and tree_digest(src) == before


def test_pickle_that_would_run_code_is_refused(chain, tmp_path):
    src = tmp_path / "evil" / "mp_rank_00"
    src.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "args": Evil()}, src / "model_optim_rng.pt")
    dst = tmp_path / "out"
    assert_one_line_error(in_process("convert", str(src.parent), str(dst), "--to", "hf"), "refused to load")
    assert not marker.exists() and not dst.exists()


def test_progress_counts_the_values_written(tmp_path):
    """The progress lines end at exactly 100% for every writer, whatever blocks it asks for (HF's row
    blocks, legacy's TP pieces, torch_dist's chunks, growth's repeated layers): counted in values produced,
    not in requests."""
    from ckpt_factory import reference, small_config, write_checkpoint

    write_checkpoint(reference(small_config()), tmp_path / "td")
    commands = [
        ("convert", str(tmp_path / "td"), str(tmp_path / "hf"), "--to", "hf"),
        ("convert", str(tmp_path / "hf"), str(tmp_path / "lg"), "--to", "legacy", "--tp", "2"),
        ("convert", str(tmp_path / "lg"), str(tmp_path / "td2"), "--to", "torch_dist"),
        ("grow", str(tmp_path / "hf"), str(tmp_path / "g"), "--factor", "2"),
    ]
    for argv in commands:
        run = in_process(*argv)
        assert run.returncode == 0, run.stderr
        lines = [line for line in run.stdout.splitlines() if line.startswith(f"{argv[0]}: ")]
        assert lines and lines[-1].startswith(f"{argv[0]}: 100% ("), (argv, run.stdout)

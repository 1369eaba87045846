"""The bad-input corpus: every case gives one clear line, a non-zero exit, no traceback, and writes nothing.

Static cases are the YAML files under tests/bad_inputs/ (each says its command and the words its error
must contain in its first two lines); checkpoint, dataset, tokenizer and CLI cases are generated here
from good inputs damaged one way each.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from megastack.ckpt.manifest import resolve_iteration_dir

from ckpt_factory import reference, small_config, write_checkpoint
from conftest import assert_one_line_error, run_cli

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
STATIC = sorted((CORPUS / "configs").glob("*.yaml")) + sorted((CORPUS / "recipes").glob("*.yaml"))


def header(path: Path) -> tuple[str, str]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# command: ") and lines[1].startswith("# expect: "), path
    return lines[0].split(": ", 1)[1], lines[1].split(": ", 1)[1]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("path", STATIC, ids=[p.stem for p in STATIC])
def test_static_case(path: Path, tmp_path: Path):
    command, expect = header(path)
    case = tmp_path / path.name
    shutil.copy(path, case)
    args = {
        "validate": ["validate", case.name],
        "train": ["train", case.name],
        "run": ["run", case.name, "--out", "o", "--nproc", "1"],
    }[command]
    proc = run_cli(*args, cwd=tmp_path, env={"MEGASTACK_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(proc, expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == [case.name], "something was written"


# ----------------------------------------------------------------------------- generated cases


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Good inputs of every kind, damaged per case on a copy."""
    root = tmp_path_factory.mktemp("good")
    model = reference(small_config())
    write_checkpoint(model, root / "td")
    write_checkpoint(model, root / "legacy", fmt="legacy", tp=2, pp=2)
    transformers = pytest.importorskip("transformers")
    from megastack import layout

    hf_cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(layout.hf_from_logical(layout.logical_from_hf(model.state_dict(), model.cfg), model.cfg))
    hf.save_pretrained(root / "hf", max_shard_size="100KB")
    text = root / "text.txt"
    text.write_text("\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}" for i in range(400)))
    proc = run_cli("data", str(text), "--out", str(root / "data"), "--vocab-size", "320")
    assert proc.returncode == 0, proc.stderr
    return root


def train_yaml(root: Path, data: Path, vocab_size: int = 320) -> Path:
    """A one-process training config over ``data`` for a 1-layer model (vocab 320 matches the fixture's
    tokenizer)."""
    import yaml

    model = {
        "num_layers": 1,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "ffn_hidden_size": 96,
        "vocab_size": vocab_size,
        "seq_length": 32,
    }
    cfg = {
        "model": model,
        "out_dir": str(root / "out"),
        "parallel": {"micro_batch_size": 2},
        "data": {"prefixes": [str(data / "corpus")]},
        "schedule": {"train_iters": 2, "eval_interval": 0, "save_interval": 0},
        "logging": {"tensorboard": False},
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def copy(good: Path, tmp: Path, name: str) -> Path:
    shutil.copytree(good / name, tmp / name)
    return tmp / name


def damage_td_missing_shard(good, tmp):
    src = copy(good, tmp, "td")
    next(resolve_iteration_dir(src).glob("__*.distcp")).unlink()
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["missing shard"], src


def damage_td_truncated(good, tmp):
    src = copy(good, tmp, "td")
    f = next(resolve_iteration_dir(src).glob("__*.distcp"))
    f.write_bytes(f.read_bytes()[:100])
    return ["convert", str(src), str(tmp / "out"), "--to", "hf"], ["truncated"], src


def damage_td_bad_manifest_json(good, tmp):
    src = copy(good, tmp, "td")
    (resolve_iteration_dir(src) / "megastack.json").write_text("{not json")
    return ["inspect", str(src)], ["megastack.json", "not valid JSON"], src


def damage_td_malicious_metadata(good, tmp):
    src = copy(good, tmp, "td")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (resolve_iteration_dir(src) / ".metadata").write_bytes(pickle.dumps(Evil()))
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["refused"], src


def damage_td_tracker(good, tmp):
    src = copy(good, tmp, "td")
    (src / "latest_checkpointed_iteration.txt").write_text("12\n")
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["iter_0000012 is missing"], src


def damage_legacy_missing_rank(good, tmp):
    src = copy(good, tmp, "legacy")
    shutil.rmtree(resolve_iteration_dir(src) / "mp_rank_01_000")
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["mp_rank_01_000", "missing"], src


def damage_legacy_mixed(good, tmp):
    src = copy(good, tmp, "legacy")
    (resolve_iteration_dir(src) / "mp_rank_00").mkdir()
    return ["inspect", str(src)], ["mixes"], src


def damage_legacy_truncated(good, tmp):
    src = copy(good, tmp, "legacy")
    f = resolve_iteration_dir(src) / "mp_rank_00_001" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[:300])
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["model_optim_rng.pt"], src


def damage_legacy_malicious(good, tmp):
    import torch

    src = copy(good, tmp, "legacy")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "args": Evil()}, resolve_iteration_dir(src) / "mp_rank_00_000" / "model_optim_rng.pt")
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["refused"], src


def damage_hf_not_llama(good, tmp):
    src = copy(good, tmp, "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["config.json"], src


def damage_hf_missing_shard(good, tmp):
    src = copy(good, tmp, "hf")
    sorted(src.glob("model-*.safetensors"))[0].unlink()
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["safetensors"], src


def damage_hf_index_mismatch(good, tmp):
    src = copy(good, tmp, "hf")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    key = next(k for k, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][key] = shards[1]  # the index now names the wrong shard for one tensor
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["index"], src


def damage_convert_tp_not_dividing(good, tmp):
    src = copy(good, tmp, "td")
    return ["convert", str(src), str(tmp / "out"), "--to", "legacy", "--tp", "3"], ["--tp", "3"], src


def damage_dst_exists(good, tmp):
    src = copy(good, tmp, "td")
    (tmp / "out").mkdir()
    (tmp / "out" / "keep").write_text("mine")
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["already exists"], src


def damage_data_missing_bin(good, tmp):
    data = copy(good, tmp, "data")
    (data / "corpus.bin").unlink()
    return ["train", str(train_yaml(tmp, data))], ["corpus.bin not found"], data


def damage_data_corrupt_idx(good, tmp):
    data = copy(good, tmp, "data")
    (data / "corpus.idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01" * 7)
    return ["train", str(train_yaml(tmp, data))], ["corpus"], data


def damage_tokenizer_vocab_mismatch(good, tmp):
    data = copy(good, tmp, "data")  # a 320-token tokenizer for a model with vocab 1024
    return ["train", str(train_yaml(tmp, data, vocab_size=1024))], ["320 tokens", "1024"], data


def damage_tokenizer_garbage(good, tmp):
    data = copy(good, tmp, "data")
    (data / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    return ["train", str(train_yaml(tmp, data))], ["not a sentencepiece model"], data


def damage_data_input_missing(good, tmp):
    return ["data", str(tmp / "nope.txt"), "--out", str(tmp / "out")], ["nope.txt", "not found"], None


def damage_data_bad_jsonl(good, tmp):
    (tmp / "in.jsonl").write_text('{"text": "ok"}\n{broken\n')
    return ["data", str(tmp / "in.jsonl"), "--out", str(tmp / "out")], ["in.jsonl:2", "JSON"], None


def damage_cli_factor_zero(good, tmp):
    return ["grow", str(copy(good, tmp, "td")), str(tmp / "out"), "--factor", "0"], ["--factor"], None


def damage_cli_noise(good, tmp):
    return ["grow", str(copy(good, tmp, "td")), str(tmp / "out"), "--factor", "2", "--noise", "2"], ["--noise"], None


def damage_cli_plan_params(good, tmp):
    return ["plan", "--params", "lots", "--tokens", "1T"], ["--params"], None


def damage_cli_plan_factor(good, tmp):
    return ["plan", "--params", "1B", "--tokens", "1T", "--factor", "0.5"], ["factor"], None


def damage_cli_unknown_command(good, tmp):
    return ["explode"], ["invalid choice"], None


def damage_cli_missing_args(good, tmp):
    return ["convert", str(tmp / "a")], ["required"], None


def _hf_config_field(good, tmp, key, value_json):
    src = copy(good, tmp, "hf")
    text = (src / "config.json").read_text()
    cfg = json.loads(text)
    cfg[key] = "__VALUE__"
    (src / "config.json").write_text(json.dumps(cfg).replace('"__VALUE__"', value_json))
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["config.json", f"'{key}'"], src


def damage_hf_tie_as_string(good, tmp):  # "false" is a true string: read as tied, the output layer was dropped
    return _hf_config_field(good, tmp, "tie_word_embeddings", '"false"')


def damage_hf_eps_nan(good, tmp):  # Python's json reads NaN; JSON has no NaN
    argv, _, src = _hf_config_field(good, tmp, "rms_norm_eps", "NaN")
    return argv, ["config.json", "NaN"], src


def damage_hf_layers_huge(good, tmp):  # was planned before anything checked the weights: OOM-killed
    return _hf_config_field(good, tmp, "num_hidden_layers", "1e30")


def damage_hf_size_as_string(good, tmp):
    return _hf_config_field(good, tmp, "hidden_size", '"64"')


def _rewrite_safetensors_header(src: Path, edit) -> Path:
    """Rewrite the JSON header of the shard holding most tensors with ``edit(header_text) -> header_text``,
    data bytes unchanged."""
    import struct

    from megastack.ckpt.hf import read_header

    shard = max(sorted(src.glob("model-*.safetensors")), key=lambda f: len(read_header(f)))
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = edit(data[8 : 8 + n].decode())
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return shard


def damage_hf_overlapping_offsets(good, tmp):  # two tensors share bytes: layer 1 would read layer 0's weights
    src = copy(good, tmp, "hf")

    def edit(text):
        header = json.loads(text)
        norms = sorted(k for k in header if k.endswith("layernorm.weight"))  # same shape, same dtype
        header[norms[1]]["data_offsets"] = header[norms[0]]["data_offsets"]
        return json.dumps(header)

    _rewrite_safetensors_header(src, edit)
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["data_offsets"], src


def damage_hf_duplicate_header_key(good, tmp):
    src = copy(good, tmp, "hf")

    def edit(text):
        header = json.loads(text)
        name = next(k for k in header if k != "__metadata__")
        body = json.dumps(header)
        return body[:-1] + ", " + json.dumps(name) + ": " + json.dumps(header[name]) + "}"

    _rewrite_safetensors_header(src, edit)
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["twice"], src


def damage_hf_offsets_as_strings(good, tmp):
    src = copy(good, tmp, "hf")

    def edit(text):
        header = json.loads(text)
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [str(v) for v in header[name]["data_offsets"]]
        return json.dumps(header)

    _rewrite_safetensors_header(src, edit)
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["non-integer"], src


def damage_cli_grow_tp_negative(good, tmp):  # once published a checkpoint with no files
    src = copy(good, tmp, "legacy")
    argv = ["grow", str(src), str(tmp / "out"), "--factor", "2", "--tp", "-2"]
    return argv, ["--tp", "positive integer, got -2"], src


def damage_cli_grow_tp_zero(good, tmp):  # once silently meant the default
    src = copy(good, tmp, "legacy")
    return ["grow", str(src), str(tmp / "out"), "--factor", "2", "--tp", "0"], ["--tp", "positive integer, got 0"], src


def _rewrite_dcp_metadata(src: Path, edit) -> None:
    import pickle

    directory = resolve_iteration_dir(src)
    metadata = pickle.loads((directory / ".metadata").read_bytes())  # DCP's own classes, edited as anyone could
    edit(metadata)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


def damage_td_chunk_hole(good, tmp):  # a missing chunk was uninitialised memory in a "verified" output
    src = copy(good, tmp, "td")

    def edit(metadata):
        md = metadata.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"]
        md.chunks = [c for c in md.chunks if c.offsets[0] != 1]

    _rewrite_dcp_metadata(src, edit)
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["linear_qkv.weight", "hole"], src


def damage_td_chunk_overlap(good, tmp):
    src = copy(good, tmp, "td")

    def edit(metadata):
        import torch

        md = metadata.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
        second = md.chunks[1]
        md.chunks[1] = type(second)(offsets=torch.Size([0, *second.offsets[1:]]), sizes=second.sizes)

    _rewrite_dcp_metadata(src, edit)
    return ["convert", str(src), str(tmp / "out"), "--to", "hf"], ["linear_fc2.weight", "overlap"], src


def damage_legacy_wrong_shape_late(good, tmp):  # only layer 0 of TP rank 0 was checked: crashed in torch
    from megastack.ckpt.safe_load import load_pt, save_pt

    src = copy(good, tmp, "legacy")
    f = resolve_iteration_dir(src) / "mp_rank_01_001" / "model_optim_rng.pt"
    blob = load_pt(f)
    key = "decoder.layers.0.mlp.linear_fc2.weight"
    blob["model"][key] = blob["model"][key][:, :-1].clone()
    save_pt(blob, f)
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["mp_rank_01_001", "shard shape"], src


def damage_manifest_negative_iteration(good, tmp):  # produced iter_-000005, which megastack then refused
    src = copy(good, tmp, "td")
    manifest = resolve_iteration_dir(src) / "megastack.json"
    data = json.loads(manifest.read_text())
    data["iteration"] = -5
    manifest.write_text(json.dumps(data))
    return ["convert", str(src), str(tmp / "out"), "--to", "legacy"], ["'iteration'", "integer >= 0"], src


def damage_cli_plan_overflow(good, tmp):  # printed Infinity/NaN: invalid JSON
    return ["plan", "--params", "1e308", "--tokens", "1e308", "--json"], ["--params", "above"], None


def damage_cli_factor_huge(good, tmp):  # built a list of billions of layers: killed by the OOM killer
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(tmp / "out"), "--factor", "1000000000"], ["--factor", "at most"], src


def damage_cli_layer_map_repeat_huge(good, tmp):
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(tmp / "out"), "--layer-map", "0x100000000"], ["--layer-map"], src


def damage_cli_layer_map_digits_huge(good, tmp):
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(tmp / "out"), "--layer-map", "0-1x99999999999999999999"], ["--layer-map"], src


def damage_src_symlink_loop(good, tmp):
    (tmp / "loop").symlink_to(tmp / "loop")
    return ["grow", str(tmp / "loop"), str(tmp / "out"), "--factor", "2"], ["loop"], None


def damage_td_binary_tracker(good, tmp):
    src = copy(good, tmp, "td")
    (src / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe\x00\x01garbage")
    return ["inspect", str(src)], ["latest_checkpointed_iteration.txt", "binary"], src


def damage_config_points_at_a_system_file(good, tmp):  # printed the whole file in the error
    (tmp / "bad.yaml").write_text("model: /etc/passwd\nout_dir: out\n")
    return ["train", str(tmp / "bad.yaml")], ["/etc/passwd", "mapping"], None


def damage_config_nested_deeply(good, tmp):  # RecursionError traceback
    (tmp / "deep.yaml").write_text("model: " + "[" * 50000 + "]" * 50000 + "\n")
    return ["validate", str(tmp / "deep.yaml")], ["nested too deeply"], None


def damage_data_one_document(good, tmp):  # megatron's sample index looped forever on the empty valid split
    text = tmp / "one.txt"
    text.write_text("\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}" for i in range(400)))
    proc = run_cli("data", str(text), "--out", str(tmp / "one"), "--vocab-size", "320")
    assert proc.returncode == 0, proc.stderr
    return ["train", str(train_yaml(tmp, tmp / "one"))], ["1 document", "valid split"], tmp / "one"


def damage_data_vocab_below_characters(good, tmp):  # sentencepiece's RuntimeError traceback
    text = tmp / "chars.txt"
    text.write_text("".join(chr(0x4E00 + i) for i in range(200)) + "\n" + "abc\n" * 10)
    argv = ["data", str(text), "--out", str(tmp / "out"), "--vocab-size", "300"]
    return argv, ["--vocab-size 300", "too small"], None


def damage_td_flipped_byte_under_manifest(good, tmp):  # was grown, and the source's checksum recorded as intact
    src = copy(good, tmp, "td")
    shard = sorted(resolve_iteration_dir(src).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside tensor bytes: every chunk still loads
    shard.write_bytes(bytes(data))
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], [shard.name, "checksum differs"], src


def damage_legacy_flipped_byte_under_manifest(good, tmp):
    src = copy(good, tmp, "legacy")
    f = resolve_iteration_dir(src) / "mp_rank_01_001" / "model_optim_rng.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return ["convert", str(src), str(tmp / "out"), "--to", "hf"], ["model_optim_rng.pt", "checksum"], src


def _edit_legacy(src: Path, rank: str, edit) -> Path:
    from megastack.ckpt.safe_load import load_pt, save_pt

    f = resolve_iteration_dir(src) / rank / "model_optim_rng.pt"
    blob = load_pt(f)
    edit(blob)
    save_pt(blob, f)
    return f


def damage_legacy_iteration_string(good, tmp):  # int('abc') traceback
    src = copy(good, tmp, "legacy")
    _edit_legacy(src, "mp_rank_00_000", lambda blob: blob.__setitem__("iteration", "abc"))
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["'iteration'"], src


def damage_legacy_args_layernorm(good, tmp):  # Megatron-LM args of a model megastack cannot represent
    src = copy(good, tmp, "legacy")
    (resolve_iteration_dir(src) / "megastack.json").unlink()  # a Megatron-LM save: its args are what it is
    for rank in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        _edit_legacy(src, rank, lambda blob: setattr(blob["args"], "normalization", "LayerNorm"))
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["normalization", "LayerNorm"], src


def damage_legacy_planted_in_optimizer(good, tmp):
    import torch

    src = copy(good, tmp, "legacy")
    f = resolve_iteration_dir(src) / "mp_rank_01_001" / "model_optim_rng.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = torch.load(f, weights_only=False)
    blob["optimizer"] = {"state": Evil()}
    torch.save(blob, f)
    return ["inspect", str(src)], ["refused", "mp_rank_01_001"], src


def damage_td_common_planted(good, tmp):
    src = copy(good, tmp, "td")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (resolve_iteration_dir(src) / "common.pt").write_bytes(pickle.dumps({"args": Evil()}))
    return ["convert", str(src), str(tmp / "out"), "--to", "hf"], ["common.pt"], src


def damage_td_common_truncated(good, tmp):
    src = copy(good, tmp, "td")
    f = resolve_iteration_dir(src) / "common.pt"
    f.write_bytes(f.read_bytes()[:64])
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["common.pt"], src


def damage_td_metadata_missing(good, tmp):
    src = copy(good, tmp, "td")
    (resolve_iteration_dir(src) / ".metadata").unlink()
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], [".metadata"], src


def damage_td_metadata_truncated(good, tmp):
    src = copy(good, tmp, "td")
    f = resolve_iteration_dir(src) / ".metadata"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return ["convert", str(src), str(tmp / "out"), "--to", "legacy"], [".metadata"], src


def damage_td_manifest_iteration_string(good, tmp):
    src = copy(good, tmp, "td")
    manifest = resolve_iteration_dir(src) / "megastack.json"
    data = json.loads(manifest.read_text())
    data["iteration"] = "12"
    manifest.write_text(json.dumps(data))
    return ["grow", str(src), str(tmp / "out"), "--factor", "2"], ["megastack.json", "'iteration'"], src


def damage_td_tracker_negative(good, tmp):
    src = copy(good, tmp, "td")
    (src / "latest_checkpointed_iteration.txt").write_text("-3\n")
    return ["inspect", str(src)], ["latest_checkpointed_iteration.txt"], src


def damage_hf_config_not_json(good, tmp):
    src = copy(good, tmp, "hf")
    (src / "config.json").write_text('{"model_type": "llama",')
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["config.json", "JSON"], src


def damage_hf_config_nested_deeply(good, tmp):  # RecursionError traceback
    src = copy(good, tmp, "hf")
    (src / "config.json").write_text("[" * 100000 + "]" * 100000)
    return ["inspect", str(src)], ["config.json"], src


def damage_hf_vocab_negative(good, tmp):
    return _hf_config_field(good, tmp, "vocab_size", "-256")


def damage_hf_heads_as_bool(good, tmp):  # True is an int to Python: one head
    return _hf_config_field(good, tmp, "num_attention_heads", "true")


def damage_hf_header_length_huge(good, tmp):  # a header length of 2^60 bytes: read() of it would be an OOM
    import struct

    src = copy(good, tmp, "hf")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], [shard.name, "header"], src


def damage_hf_data_truncated(good, tmp):
    src = copy(good, tmp, "hf")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return ["convert", str(src), str(tmp / "out"), "--to", "legacy"], [shard.name], src


def damage_hf_dtype_unknown(good, tmp):
    src = copy(good, tmp, "hf")

    def edit(text):
        header = json.loads(text)
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = "Q4_K"
        return json.dumps(header)

    _rewrite_safetensors_header(src, edit)
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["dtype", "Q4_K"], src


def damage_hf_wrong_shape(good, tmp):  # shape and offsets agree with each other, not with config.json
    src = copy(good, tmp, "hf")

    def edit(text):
        header = json.loads(text)
        name = next(k for k in sorted(header) if k.endswith("mlp.down_proj.weight"))
        rows, cols = header[name]["shape"]
        header[name]["shape"] = [cols, rows]
        return json.dumps(header)

    _rewrite_safetensors_header(src, edit)
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["down_proj.weight", "shape"], src


def damage_hf_index_not_json(good, tmp):
    src = copy(good, tmp, "hf")
    (src / "model.safetensors.index.json").write_text("{")
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], ["model.safetensors.index.json"], src


def damage_hf_index_missing_tensor(good, tmp):
    src = copy(good, tmp, "hf")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = sorted(k for k in index["weight_map"] if "layers.1." in k)[0]
    del index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["convert", str(src), str(tmp / "out"), "--to", "torch_dist"], [name], src


def damage_cli_grow_pp_negative(good, tmp):
    src = copy(good, tmp, "td")
    argv = ["grow", str(src), str(tmp / "out"), "--factor", "2", "--pp", "-1"]
    return argv, ["--pp", "positive integer, got -1"], src


def damage_cli_convert_tp_zero(good, tmp):
    src = copy(good, tmp, "td")
    return ["convert", str(src), str(tmp / "out"), "--to", "legacy", "--tp", "0"], ["--tp"], src


def damage_cli_noise_nan(good, tmp):
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(tmp / "out"), "--factor", "2", "--noise", "nan"], ["--noise"], src


def damage_cli_layer_map_empty(good, tmp):
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(tmp / "out"), "--layer-map", " "], ["--layer-map", "empty"], src


def damage_cli_layer_map_out_of_range(good, tmp):
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(tmp / "out"), "--layer-map", "0-5"], ["--layer-map", "5"], src


def damage_cli_grow_operator_unknown(good, tmp):
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(tmp / "out"), "--operator", "glue"], ["invalid choice", "glue"], src


def damage_cli_grow_dst_inside_src(good, tmp):  # the output would be written into the source it reads
    src = copy(good, tmp, "td")
    return ["grow", str(src), str(src / "grown"), "--factor", "2"], ["inside"], src


def damage_cli_convert_dst_is_src(good, tmp):
    src = copy(good, tmp, "legacy")
    return ["convert", str(src), str(src), "--to", "torch_dist"], ["same directory"], src


def damage_cli_plan_tokens_negative(good, tmp):
    return ["plan", "--params", "1B", "--tokens", "-5"], ["--tokens"], None


def damage_cli_inspect_missing(good, tmp):
    return ["inspect", str(tmp / "nothing")], ["nothing", "no such checkpoint"], None


def damage_data_binary_input(good, tmp):  # sentencepiece choked on it with a RuntimeError traceback
    (tmp / "blob.txt").write_bytes(bytes(range(256)) * 64)
    return ["data", str(tmp / "blob.txt"), "--out", str(tmp / "out")], ["blob.txt", "binary"], None


def damage_data_vocab_zero(good, tmp):
    (tmp / "in.txt").write_text("hello world\n" * 50)
    return ["data", str(tmp / "in.txt"), "--out", str(tmp / "out"), "--vocab-size", "0"], ["--vocab-size"], None


def damage_data_vocab_above_the_text(good, tmp):  # sentencepiece's own wording, not what to do
    (tmp / "small.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    return ["data", str(tmp / "small.txt"), "--out", str(tmp / "out")], ["--vocab-size 1024", "too large"], None


def damage_data_empty_input(good, tmp):
    (tmp / "empty.txt").write_text("")
    return ["data", str(tmp / "empty.txt"), "--out", str(tmp / "out")], ["empty.txt"], None


GENERATED: dict[str, Callable] = {
    name[len("damage_") :]: fn for name, fn in globals().items() if name.startswith("damage_")
}


@pytest.mark.parametrize("case", sorted(GENERATED))
def test_generated_case(case: str, good: Path, tmp_path: Path):
    argv, needles, source = GENERATED[case](good, tmp_path)
    before = tree(source) if source is not None else None
    existing = {p.name for p in tmp_path.iterdir()}
    proc = run_cli(*argv, cwd=tmp_path, env={"MEGASTACK_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(proc, *needles)
    assert "pwned" not in proc.stdout + proc.stderr
    assert "daemon:x:1:1" not in proc.stderr, "a file's contents were echoed"
    assert len(proc.stderr) < 1000, "the error line is not short"
    assert {p.name for p in tmp_path.iterdir()} - existing <= {"cache"}, "something was written"
    if (tmp_path / "out").exists():  # a case whose destination existed before: left as it was
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep"]
    if before is not None:
        assert tree(source) == before, "the source was modified"


def test_corpus_has_at_least_120_cases():
    assert len(STATIC) + len(GENERATED) >= 120


def test_no_source_check_takes_the_source_on_trust_and_says_so(good, tmp_path):
    """--no-source-check skips the re-hash (the flipped byte above is then not caught) and the output's
    history records that the source was not checked."""
    src = copy(good, tmp_path, "td")
    shard = sorted(resolve_iteration_dir(src).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    refused = run_cli("convert", str(src), str(tmp_path / "checked"), "--to", "hf")
    assert refused.returncode != 0 and "checksum differs" in refused.stderr
    run = run_cli("convert", str(src), str(tmp_path / "trusted"), "--to", "hf", "--no-source-check")
    assert run.returncode == 0, run.stderr
    event = json.loads((tmp_path / "trusted" / "megastack.json").read_text())["history"][-1]
    assert event["event"] == "convert" and event["source_checked"] is False


def test_a_source_check_started_before_the_command_is_taken_over_once(good, tmp_path):
    """The CLI starts a convert's or grow's source check before it imports torch (early_source_check); the
    command's SourceCheck.of takes over that running check, for the same source and rank share only, and a
    check nobody took over is forgotten with its command: a later one checks afresh and sees a change since."""
    from megastack.ckpt.source_check import SourceCheck, early_source_check
    from megastack.errors import UserError

    src = copy(good, tmp_path, "td")
    directory = resolve_iteration_dir(src)
    with early_source_check(src, (0, 1)):
        assert SourceCheck.of(directory, (1, 2)).thread is None  # another rank's share: a check of its own
        early = SourceCheck.of(directory, (0, 1))
        assert early.thread is not None  # running already
        assert SourceCheck.of(directory, (0, 1)) is not early  # taken over once
        early.result()  # intact
    with early_source_check(src, (0, 1)):
        pass  # not taken over
    shard = sorted(directory.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh = SourceCheck.of(directory, (0, 1))
    assert fresh.thread is None
    fresh.start()
    with pytest.raises(UserError, match="checksum differs"):
        fresh.result()
    with early_source_check(tmp_path / "missing", (0, 1)):  # nothing there: left for the command to say
        pass

"""Growth operators: the plan in memory against the reference, and real checkpoints in megatron-core."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megastack import fsio, layout
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.inspect import verify
from megastack.ckpt.manifest import read_manifest, resolve_iteration_dir
from megastack.ckpt.torch_dist import TorchDistWriter
from megastack.errors import UserError
from megastack.growth.layer_map import first_occurrences, parse_layer_map
from megastack.growth.operators import make_plan
from megastack.growth.spec import GrowthSpec
from megastack.model.reference import ReferenceLlama, stacked_reference

from ckpt_factory import logical_of, logits, reference, sample_tokens, small_config, write_checkpoint
from conftest import assert_one_line_error, run_cli, run_workers

# ----------------------------------------------------------------------------- layer maps


@pytest.mark.parametrize(
    "expr,expected",
    [
        ("0-3x2", [0, 1, 2, 3, 0, 1, 2, 3]),
        ("0-3,0-3", [0, 1, 2, 3, 0, 1, 2, 3]),
        ("0x2,1x2", [0, 0, 1, 1]),
        ("0-2,1-3", [0, 1, 2, 1, 2, 3]),  # SOLAR-style: drop the last of one copy and the first of the other
        ("3-0", [3, 2, 1, 0]),
        (" 1 , 2 ", [1, 2]),
    ],
)
def test_parse_layer_map(expr, expected):
    assert parse_layer_map(expr, 4) == expected


@pytest.mark.parametrize(
    "expr,needle",
    [
        ("", "empty"),
        ("0-4", "does not exist"),
        ("a-b", "cannot parse"),
        ("1x0", "at least 1"),
        ("0--1", "cannot parse"),
    ],
)
def test_parse_layer_map_errors(expr, needle):
    with pytest.raises(UserError, match=needle):
        parse_layer_map(expr, 4)


def test_first_occurrences():
    assert first_occurrences([0, 1, 0, 1]) == [0, 1]
    assert first_occurrences([0, 0, 1, 1]) == [0, 2]


def test_factor_and_map_must_agree():
    with pytest.raises(UserError, match="--factor 3"):
        make_plan(small_config(), GrowthSpec(factor=3, layer_map="0-1x2"))
    with pytest.raises(UserError, match="--factor"):
        make_plan(small_config(), GrowthSpec())


# ----------------------------------------------------------------------------- plans in memory


def grow_in_memory(model: ReferenceLlama, spec: GrowthSpec) -> tuple[ReferenceLlama, dict]:
    """Apply a plan to a dict of logical tensors (no files) and load the result into a reference model."""
    tensors = logical_of(model)
    plan = make_plan(model.cfg, spec)

    class DictReader:
        def read(self, name, pieces=None):
            from megastack.layout import take_pieces

            return take_pieces(tensors[name], pieces).clone()

    produce = plan.producer(DictReader(), torch.float32)
    grown = {name: produce(name, None) for name in layout.logical_names(plan.target)}
    big = ReferenceLlama(plan.target).eval()
    big.load_state_dict(layout.hf_from_logical(grown, plan.target))
    return big, plan.info


def test_stack_equals_reference_stacking():
    small = reference(small_config(num_layers=3))
    big, info = grow_in_memory(small, GrowthSpec(factor=2))
    assert info["layer_map"] == [0, 1, 2, 0, 1, 2] and info["new_layers"] == [3, 4, 5]
    tokens = sample_tokens(small.cfg)
    assert torch.equal(logits(big, tokens), logits(stacked_reference(small, [0, 1, 2, 0, 1, 2]), tokens))


def test_zero_preserves_the_function_exactly():
    small = reference(small_config(num_layers=3))
    tokens = sample_tokens(small.cfg)
    for layer_map in ("0-2x4", "0x2,1x2,2x2"):
        big, _ = grow_in_memory(small, GrowthSpec(operator="zero", layer_map=layer_map))
        assert (logits(big, tokens) - logits(small, tokens)).abs().max().item() < 1e-5


def test_zero_refuses_maps_that_drop_or_reorder_layers():
    with pytest.raises(UserError, match="first copies"):
        make_plan(small_config(num_layers=3), GrowthSpec(operator="zero", layer_map="1,0,2"))


def test_random_keeps_originals_and_initialises_new_blocks():
    small = reference(small_config(num_layers=2, hidden_size=128, ffn_hidden_size=256))
    big, info = grow_in_memory(small, GrowthSpec(operator="random", factor=4, seed=5))
    assert info["new_layers"] == [2, 3, 4, 5, 6, 7]
    s, b = small.state_dict(), big.state_dict()
    assert torch.equal(b["model.layers.1.mlp.up_proj.weight"], s["model.layers.1.mlp.up_proj.weight"])
    q = b["model.layers.5.self_attn.q_proj.weight"]
    down = b["model.layers.5.mlp.down_proj.weight"]
    assert abs(q.std().item() - 0.02) < 0.002  # init_std
    assert abs(down.std().item() - 0.02 / 4.0) < 0.0005  # scaled by 1/sqrt(2 * 8 layers)
    assert torch.equal(b["model.layers.5.input_layernorm.weight"], torch.ones(128))
    again, _ = grow_in_memory(small, GrowthSpec(operator="random", factor=4, seed=5))
    assert torch.equal(again.state_dict()["model.layers.5.self_attn.q_proj.weight"], q)


def test_noise_is_the_papers_formula_and_deterministic():
    small = reference(small_config(num_layers=2))
    big, _ = grow_in_memory(small, GrowthSpec(factor=2, noise=0.2, seed=1))
    again, _ = grow_in_memory(small, GrowthSpec(factor=2, noise=0.2, seed=1))
    w_small = small.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    w_big = big.state_dict()["model.layers.2.mlp.gate_proj.weight"]
    assert torch.equal(w_big, again.state_dict()["model.layers.2.mlp.gate_proj.weight"])
    eps = (w_big - 0.8 * w_small) / (0.2 * 0.02)  # W' = 0.8 W + 0.2 * std * eps
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1.0) < 0.1
    assert torch.equal(
        big.state_dict()["model.layers.2.input_layernorm.weight"],
        small.state_dict()["model.layers.0.input_layernorm.weight"],
    )  # norms untouched
    with pytest.raises(UserError, match="--noise"):
        make_plan(small.cfg, GrowthSpec(factor=2, noise=1.5))


# ----------------------------------------------------------------------------- real checkpoints


@pytest.fixture(scope="module")
def grown_checkpoints(tmp_path_factory):
    """Sources in both formats, grown with the CLI; returns (checkpoints for the worker, expected logits)."""
    tmp = tmp_path_factory.mktemp("growth")
    untied = reference(small_config(num_layers=2))
    tied = reference(small_config(num_layers=2, tie_embeddings=True), seed=4)
    tokens = sample_tokens(untied.cfg)
    write_checkpoint(untied, tmp / "src_td")
    write_checkpoint(tied, tmp / "src_td_tied")
    write_checkpoint(untied, tmp / "src_legacy", fmt="legacy", tp=2, pp=2)
    jobs = {
        "stack_td": (["src_td", "--factor", "2"], stacked_reference(untied, [0, 1, 0, 1])),
        "stack_map_td": (["src_td", "--layer-map", "0x2,1x2"], stacked_reference(untied, [0, 0, 1, 1])),
        "stack_tied_td": (["src_td_tied", "--factor", "2"], stacked_reference(tied, [0, 1, 0, 1])),
        "zero_td": (["src_td", "--operator", "zero", "--factor", "2"], untied),
        "random_td": (["src_td", "--operator", "random", "--factor", "2"], None),
        "noise_td": (["src_td", "--factor", "2", "--noise", "0.2"], None),
        "stack_legacy_tp1pp4": (
            ["src_legacy", "--factor", "2", "--tp", "1", "--pp", "4"],
            stacked_reference(untied, [0, 1, 0, 1]),
        ),
        "zero_legacy_tp2pp1": (["src_legacy", "--operator", "zero", "--factor", "2", "--tp", "2", "--pp", "1"], untied),
    }
    expected = {}
    for name, (args, ref) in jobs.items():
        src, *flags = args
        proc = run_cli("grow", str(tmp / src), str(tmp / name), *flags)
        assert proc.returncode == 0, proc.stderr
        if ref is None:  # random values: the reference is the plain model with the grown tensors
            reader = open_checkpoint(tmp / name)
            ref = ReferenceLlama(reader.cfg).eval()
            ref.load_state_dict(
                layout.hf_from_logical({n: reader.read(n) for n in layout.logical_names(reader.cfg)}, reader.cfg)
            )
        expected[name] = logits(ref, tokens)
    torch.save(tokens, tmp / "tokens.pt")
    checkpoints = []
    for name in jobs:
        if name.endswith("_td"):
            checkpoints.append(
                {"name": name, "path": str(tmp / name), "how": "dist", "layouts": [[1, 1], [2, 2], [1, 4]]}
            )
    checkpoints.append(
        {"name": "stack_legacy_tp1pp4", "path": str(tmp / "stack_legacy_tp1pp4"), "how": "legacy", "layouts": [[1, 4]]}
    )
    checkpoints.append(
        {"name": "zero_legacy_tp2pp1", "path": str(tmp / "zero_legacy_tp2pp1"), "how": "legacy", "layouts": [[2, 1]]}
    )
    checkpoints.append(
        {"name": "stack_legacy_tp1pp4", "path": str(tmp / "stack_legacy_tp1pp4"), "how": "reader", "layouts": [[2, 2]]}
    )
    (tmp / "job.json").write_text(
        json.dumps({"tokens": str(tmp / "tokens.pt"), "out": str(tmp), "checkpoints": checkpoints})
    )
    return tmp, checkpoints, expected, untied


@pytest.mark.timeout(900)
def test_grown_checkpoints_load_in_megatron_and_match_reference(grown_checkpoints):
    tmp, checkpoints, expected, _ = grown_checkpoints
    results = run_workers("load_checkpoints.py", 4, str(tmp / "job.json"))
    wanted = {(c["name"], tp, pp) for c in checkpoints for tp, pp in c["layouts"]}
    assert {(r["name"], r["tp"], r["pp"]) for r in results} == wanted
    for r in results:
        got = torch.load(r["file"], weights_only=True)
        diff = (got - expected[r["name"]]).abs().max().item()
        assert diff <= 1e-5, (r, diff)


def test_grown_manifest_records_growth_and_verifies(grown_checkpoints):
    tmp, _, _, _ = grown_checkpoints
    manifest = read_manifest(resolve_iteration_dir(tmp / "random_td"))
    assert manifest["model"]["num_layers"] == 4 and manifest["iteration"] == 0
    event = manifest["history"][-1]
    assert event["event"] == "grow" and event["operator"] == "random" and event["layer_map"] == [0, 1, 0, 1]
    assert len(event["source_sha256"]) == 64
    assert manifest["growth"] == {
        "operator": "random",
        "new_layers": [2, 3],
        "layer_map": [0, 1, 0, 1],
        "mask_ramp": True,
    }
    assert manifest["history"][0] == {"event": "test"}  # the source's history is carried
    assert verify(tmp / "random_td") == []
    assert verify(tmp / "stack_legacy_tp1pp4") == []
    proc = run_cli("verify", str(tmp / "stack_td"))
    assert proc.returncode == 0 and "OK" in proc.stdout


def test_legacy_output_layout(grown_checkpoints):
    tmp, _, _, _ = grown_checkpoints
    iter_dir = resolve_iteration_dir(tmp / "stack_legacy_tp1pp4")
    assert sorted(p.name for p in iter_dir.iterdir() if p.is_dir()) == [
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_00_002",
        "mp_rank_00_003",
    ]
    assert (tmp / "stack_legacy_tp1pp4" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    from megastack.ckpt.safe_load import load_pt

    blob = load_pt(iter_dir / "mp_rank_00_002" / "model_optim_rng.pt")
    assert blob["checkpoint_version"] == 3.0 and blob["args"].num_layers == 4
    assert blob["args"].pipeline_model_parallel_size == 4 and blob["args"].num_query_groups == 2
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in blob["model"]


def test_verify_detects_corruption(grown_checkpoints, tmp_path):
    import shutil

    tmp, _, _, _ = grown_checkpoints
    copy = tmp_path / "copy"
    shutil.copytree(tmp / "stack_td", copy)
    data = next(resolve_iteration_dir(copy).glob("__*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    problems = verify(copy)
    assert len(problems) == 1 and "checksum" in problems[0]
    assert_one_line_error(run_cli("verify", str(copy)), "problem")


# ----------------------------------------------------------------------------- bad input


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def sources(tmp_path):
    model = reference(small_config(num_layers=2))
    write_checkpoint(model, tmp_path / "td")
    write_checkpoint(model, tmp_path / "legacy", fmt="legacy", tp=2, pp=2)
    return tmp_path


def damage(kind: str, root: Path) -> tuple[Path, list[str], list[str]]:
    """Returns (source, extra CLI flags, words the error must contain)."""
    td, legacy = root / "td", root / "legacy"
    td_iter, legacy_iter = resolve_iteration_dir(td), resolve_iteration_dir(legacy)
    if kind == "missing shard":
        next(td_iter.glob("__*.distcp")).unlink()
        return td, ["--factor", "2"], ["missing shard"]
    if kind == "truncated file":
        f = next(td_iter.glob("__*.distcp"))
        f.write_bytes(f.read_bytes()[:1000])
        return td, ["--factor", "2"], ["truncated"]
    if kind == "missing legacy shard":
        import shutil

        shutil.rmtree(legacy_iter / "mp_rank_01_001")
        return legacy, ["--factor", "2"], ["mp_rank_01_001", "missing"]
    if kind == "mixed tp sizes":
        (legacy_iter / "mp_rank_00").mkdir()
        return legacy, ["--factor", "2"], ["mixes"]
    if kind == "truncated legacy file":
        f = legacy_iter / "mp_rank_00_000" / "model_optim_rng.pt"
        f.write_bytes(f.read_bytes()[:500])
        return legacy, ["--factor", "2"], ["model_optim_rng.pt"]
    if kind == "config shape mismatch":
        manifest = json.loads((td_iter / "megastack.json").read_text())
        manifest["model"]["ffn_hidden_size"] = 128
        (td_iter / "megastack.json").write_text(json.dumps(manifest))
        return td, ["--factor", "2"], ["shape", "model config"]
    if kind == "pp cannot divide":
        return legacy, ["--factor", "2", "--pp", "3"], ["--pp 3", "divide"]
    if kind == "tp cannot divide":
        return legacy, ["--factor", "2", "--tp", "3"], ["--tp 3", "divide"]
    if kind == "layer map out of range":
        return td, ["--layer-map", "0-5"], ["--layer-map", "does not exist"]
    if kind == "tp on torch_dist":
        return td, ["--factor", "2", "--tp", "2"], ["--tp/--pp", "legacy"]
    if kind == "unknown format":
        (root / "junk").mkdir()
        (root / "junk" / "x.bin").write_bytes(b"123")
        return root / "junk", ["--factor", "2"], ["not a recognised checkpoint"]
    raise AssertionError(kind)


BAD = [
    "missing shard",
    "truncated file",
    "missing legacy shard",
    "mixed tp sizes",
    "truncated legacy file",
    "config shape mismatch",
    "pp cannot divide",
    "tp cannot divide",
    "layer map out of range",
    "tp on torch_dist",
    "unknown format",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_growth_input_is_one_line_and_writes_nothing(sources, kind):
    src, flags, needles = damage(kind, sources)
    before = tree_digest(src)
    dst = sources / "out"
    proc = run_cli("grow", str(src), str(dst), *flags)
    assert_one_line_error(proc, *needles)
    assert not dst.exists() and not (sources / ".out.partial").exists()
    assert tree_digest(src) == before


def test_destination_rules(sources):
    td = sources / "td"
    before = tree_digest(td)
    assert_one_line_error(run_cli("grow", str(td), str(td), "--factor", "2"), "same directory")
    assert_one_line_error(run_cli("grow", str(td), str(td / "inner"), "--factor", "2"), "inside")
    (sources / "exists").mkdir()
    assert_one_line_error(run_cli("grow", str(td), str(sources / "exists"), "--factor", "2"), "already exists")
    assert_one_line_error(run_cli("grow", str(sources / "nope"), str(sources / "o"), "--factor", "2"), "not found")
    assert tree_digest(td) == before and not (sources / "o").exists()


def test_carry_optimizer_needs_adams_state(sources):
    """--carry-optimizer (tests/test_carry_optimizer.py and test_megatron_lm.py grow real training checkpoints):
    a checkpoint without Adam's state is one line (exit 1), torch_dist or legacy; the distributed optimizer's
    distrib_optim.pt for a Transformer Engine run grown from a local-spec one (--norm-names te: its buffer's
    parameter order is not the source's) is not built yet (exit 2: --to torch_dist). Nothing is written."""
    for src in ("td", "legacy"):
        proc = run_cli("grow", str(sources / src), str(sources / "o"), "--factor", "2", "--carry-optimizer")
        assert proc.returncode == 1 and "has no Adam state" in proc.stderr and len(proc.stderr.splitlines()) == 1
    megatron_lm = Path(__file__).parent / "fixtures" / "megatron_lm" / "legacy_distopt"  # Megatron-LM's distrib_optim
    proc = run_cli(
        "grow", str(megatron_lm), str(sources / "o"), "--factor", "2", "--carry-optimizer", "--norm-names", "te"
    )
    assert proc.returncode == 2 and "parameter order" in proc.stderr and "grow --to torch_dist" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (sources / "o").exists()


def test_multi_rank_grow_equals_single_rank(sources):
    """The same growth on 2 ranks (torchrun-style) writes the same tensors as on 1."""
    from megastack.dist import launch_local

    single = sources / "single"
    assert run_cli("grow", str(sources / "td"), str(single), "--factor", "2", "--noise", "0.1").returncode == 0
    result = launch_local(
        [
            sys.executable,
            "-m",
            "megastack",
            "grow",
            str(sources / "td"),
            str(sources / "multi"),
            "--factor",
            "2",
            "--noise",
            "0.1",
        ],
        2,
        timeout=300,
    )
    assert result.ok, result.describe()
    a, b = open_checkpoint(single), open_checkpoint(sources / "multi")
    assert sorted(p.name for p in resolve_iteration_dir(sources / "multi").glob("__*.distcp")) == [
        "__0_0.distcp",
        "__0_1.distcp",
        "__1_0.distcp",
        "__1_1.distcp",
    ]  # two files a rank, as Megatron-LM writes them
    for name in layout.logical_names(a.cfg):
        assert torch.equal(a.read(name), b.read(name)), name


# ----------------------------------------------------------------------------- memory and dry run


PEAK_SCRIPT = """
import sys
from megastack.cli import main
from megastack.memory import peak_rss_bytes
import megastack.ckpt.torch_dist, megastack.growth.cli, torch  # imports before the baseline
baseline = peak_rss_bytes()
rc = main(sys.argv[1:])
print("PEAK_BYTES", peak_rss_bytes() - baseline, rc)
"""


@pytest.mark.timeout(600)
def test_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    cfg = small_config(
        num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=2048, vocab_size=512
    )
    write_checkpoint(reference(cfg), tmp_path / "src")
    largest = max(torch.Size(layout.logical_shape(cfg, n)).numel() * 4 for n in layout.logical_names(cfg))
    peaks = {}
    for factor in (2, 8):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK_SCRIPT,
                "grow",
                str(tmp_path / "src"),
                str(tmp_path / f"g{factor}"),
                "--factor",
                str(factor),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        peaks[factor] = int(out.stdout.split("PEAK_BYTES")[1].split()[0])
    model_bytes = 8 * cfg.total_parameters() * 4  # the x8 model, what a full gather would hold
    # the O_DIRECT writers' blocks (a file each): fixed, whatever the model
    staging = TorchDistWriter.FILES_PER_RANK * fsio.DIRECT_BUFFERS * fsio.DIRECT_BLOCK
    assert peaks[8] <= 4 * largest + staging + (8 << 20), (peaks, largest)
    assert peaks[8] - staging < model_bytes / 8, (peaks, model_bytes)
    assert peaks[8] <= peaks[2] + largest + (4 << 20), peaks  # independent of the factor


def write_metadata_only_70b(root: Path, layers: int = 80, tp: int = 8, pp: int = 8) -> None:
    """A torch_dist checkpoint of a 70B-class model with .metadata only (chunks like a TP8 PP8 save)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from megastack.ckpt.torch_dist import METADATA_JSON, dcp_key
    from megastack.config import ModelConfig, to_dict

    cfg = ModelConfig(
        num_layers=layers,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        vocab_size=32000,
        seq_length=4096,
        dtype="bf16",
        name="llama-70b",
    )
    it = root / "iter_0000001"
    it.mkdir(parents=True)
    state, storage = {}, {}
    for name in layout.logical_names(cfg):
        key, layer = dcp_key(name)
        _, kind = layout.split_name(name)
        shape = layout.logical_shape(cfg, name)
        stage = 0 if layer is None else layer // (layers // pp)
        md = state.setdefault(
            key,
            TensorStorageMetadata(
                TensorProperties(dtype=torch.bfloat16), torch.Size(shape if layer is None else (layers, *shape)), []
            ),
        )
        for r in range(tp):
            pieces = (
                layout.tp_pieces(kind, shape, r, tp)
                if layout.TP_RULE[kind] != "replicated"
                else [layout.Piece(0, 0, shape[0])]
            )
            if layout.TP_RULE[kind] == "replicated" and r:
                continue
            for p in pieces:
                offsets, sizes = [0] * len(shape), list(shape)
                offsets[p.dim], sizes[p.dim] = p.start, p.length
                if layer is not None:
                    offsets, sizes = [layer, *offsets], [1, *sizes]
                chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
                md.chunks.append(chunk)
                nbytes = torch.Size(sizes).numel() * 2
                storage[MetadataIndex(key, offsets)] = _StorageInfo(f"__{stage * tp + r}_0.distcp", 0, nbytes)
    import pickle

    (it / ".metadata").write_bytes(pickle.dumps(Metadata(state, storage_data=storage)))
    (it / "metadata.json").write_text(json.dumps(METADATA_JSON))
    (it / "megastack.json").write_text(json.dumps({"format": "torch_dist", "model": to_dict(cfg)}))
    (root / "latest_checkpointed_iteration.txt").write_text("1\n")


@pytest.mark.timeout(300)
def test_dry_run_of_a_70b_checkpoint_from_metadata_alone(tmp_path):
    import time

    write_metadata_only_70b(tmp_path / "src70b", layers=80)
    start = time.monotonic()
    proc = run_cli(
        "grow", str(tmp_path / "src70b"), str(tmp_path / "dst"), "--factor", "2", "--dry-run", "--json", "--ranks", "64"
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["target_layers"] == 160 and len(plan["ranks"]) == 64
    total_write = sum(r["write_bytes"] for r in plan["ranks"])
    from megastack.config import ModelConfig

    cfg = ModelConfig(
        num_layers=160,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        vocab_size=32000,
        seq_length=4096,
    )
    assert total_write == cfg.total_parameters() * 2  # bf16, every target byte written exactly once
    fc1_bytes = 2 * 28672 * 8192 * 2
    assert max(r["predicted_peak_bytes"] for r in plan["ranks"]) <= 3 * fc1_bytes + 2 * 32000 * 8192 * 2
    assert all(r["read_files"] >= 1 for r in plan["ranks"])
    assert not (tmp_path / "dst").exists()
    assert elapsed < 120, elapsed  # "in seconds": generous bound for a loaded 2-core CI machine


def test_growth_record_is_the_typed_contract_with_training():
    """The growth block growth writes is what training reads back, and a malformed one is one line."""
    from megastack.plan import GrowthRecord

    plan = make_plan(small_config(), GrowthSpec(operator="random", factor=2))
    record = GrowthRecord.of(plan.info)
    assert record.new_layers == (2, 3) and record.mask_ramp and record.width is None
    assert GrowthRecord.from_json(json.loads(json.dumps(record.to_json())), "m") == record
    with pytest.raises(UserError, match="growth.new_layers"):
        GrowthRecord.from_json({"operator": "random", "new_layers": ["2"], "mask_ramp": True}, "m")
    with pytest.raises(UserError, match="growth.mask_ramp"):
        GrowthRecord.from_json({"operator": "random", "mask_ramp": "yes"}, "m")


MERGEKIT_SOLAR = """\
slices:
  - sources:
      - model: upstage/base
        layer_range: [0, 4]
  - sources:
      - model: upstage/base
        layer_range: [2, 6]
merge_method: passthrough
dtype: bfloat16
"""


def test_mergekit_passthrough_yaml_is_a_layer_map(tmp_path):
    """mergekit's layer_range is half-open: [0, 4) + [2, 6) of 6 layers is SOLAR's 0-3,2-5."""
    from megastack.growth.operators import make_plan
    from megastack.growth.spec import GrowthSpec

    config = tmp_path / "solar.yaml"
    config.write_text(MERGEKIT_SOLAR)
    assert parse_layer_map(str(config), 6) == parse_layer_map("0-3,2-5", 6) == [0, 1, 2, 3, 2, 3, 4, 5]
    plan = make_plan(small_config(num_layers=6), GrowthSpec(layer_map=str(config)))
    assert plan.target.num_layers == 8 and plan.info["layer_map"] == [0, 1, 2, 3, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("merge_method: passthrough\n", "needs 'slices:'"),
        (MERGEKIT_SOLAR.replace("passthrough", "slerp"), "only passthrough"),
        (MERGEKIT_SOLAR.replace("[2, 6]", "[2, 7]"), "slices[1].layer_range [2, 7] is not within"),
        (MERGEKIT_SOLAR.replace("[0, 4]", "[4, 4]"), "slices[0].layer_range [4, 4]"),
        (MERGEKIT_SOLAR.replace("[0, 4]", "[0, '4']"), "two integers"),
        (
            MERGEKIT_SOLAR.replace(
                "model: upstage/base\n        layer_range: [2, 6]", "model: other\n        layer_range: [2, 6]"
            ),
            "name 2 models",
        ),
        (MERGEKIT_SOLAR + "bogus: 1\n", "'bogus' is not a mergekit passthrough field"),
        ("slices:\n  - sources: []\n", "exactly one model"),
    ],
)
def test_mergekit_yaml_errors_are_one_line(tmp_path, text, needle):
    from megastack.errors import UserError

    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(UserError) as info:
        parse_layer_map(str(config), 6)
    assert needle in str(info.value) and "\n" not in str(info.value) and str(config) in str(info.value)


def test_hf_grows_natively_into_hf_as_mergekit_passthrough_would(tmp_path):
    """HF in, HF out, one command, split over 2 ranks: every output tensor is byte-for-byte the source
    tensor the layer map names (what mergekit's passthrough copies), config.json keeps every field but the
    depth, and transformers' LlamaForCausalLM loads it with the logits of the source stacked by hand."""
    import transformers
    from safetensors.torch import load_file

    from megastack.ckpt.execute import Comm, execute
    from megastack.ckpt.hf import HFWriter
    from megastack.dist import launch_local
    from megastack.layout import take_pieces

    cfg = small_config(num_layers=3)
    source_model = reference(cfg)
    tensors = logical_of(source_model)
    src = tmp_path / "hf"
    manifest = {"format": "hf", "model": {}, "history": []}
    execute(
        HFWriter(cfg, torch.float32, 1 << 30),
        lambda n, p: take_pieces(tensors[n], p),
        src,
        Comm(),
        manifest,
        iteration=None,
    )
    (src / "megastack.json").unlink()  # as downloaded: transformers' files only
    config = tmp_path / "solar.yaml"
    config.write_text(
        "slices:\n"
        + "".join(f"  - sources:\n      - model: m\n        layer_range: [{a}, {b}]\n" for a, b in ((0, 3), (1, 3)))
    )
    dst = tmp_path / "grown"
    argv = [sys.executable, "-m", "megastack", "grow", str(src), str(dst), "--layer-map", str(config)]
    result = launch_local(argv, 2, timeout=300)
    assert result.ok, result.describe()
    layer_map = [0, 1, 2, 1, 2]
    before, after = {}, {}
    for f in src.glob("*.safetensors"):
        before |= load_file(f)
    for f in dst.glob("*.safetensors"):
        after |= load_file(f)
    prefix = "model.layers."
    expected = {k: v for k, v in before.items() if not k.startswith(prefix)}
    for i, j in enumerate(layer_map):
        for k, v in before.items():
            if k.startswith(f"{prefix}{j}."):
                expected[f"{prefix}{i}." + k[len(f"{prefix}{j}.") :]] = v
    assert after.keys() == expected.keys()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    src_config, dst_config = (json.loads((d / "config.json").read_text()) for d in (src, dst))
    assert dst_config.pop("num_hidden_layers") == 5
    assert {k: v for k, v in src_config.items() if k != "num_hidden_layers"} == dst_config
    hf = transformers.LlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
    stacked = ReferenceLlama(replace(cfg, num_layers=5)).eval()
    state = source_model.state_dict()
    stacked.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(prefix)}
        | {
            f"{prefix}{i}." + k[len(f"{prefix}{j}.") :]: v
            for i, j in enumerate(layer_map)
            for k, v in state.items()
            if k.startswith(f"{prefix}{j}.")
        }
    )
    tokens = sample_tokens(cfg)
    with torch.no_grad():
        assert (hf(tokens).logits - stacked(tokens)).abs().max().item() < 1e-5


def test_prune_keeps_the_named_layers_and_records_what_it_dropped(sources, tmp_path):
    """--operator prune --keep: the target's layers are the kept source layers, in order (tensors equal, the
    logits those of the reference with those layers), the history names kept and dropped layers."""
    from megastack.ckpt.manifest import read_manifest

    model = reference(small_config(num_layers=4))
    src = write_checkpoint(model, tmp_path / "four")
    proc = run_cli("grow", str(src), str(tmp_path / "pruned"), "--operator", "prune", "--keep", "0,1,3")
    assert proc.returncode == 0, proc.stderr
    a, b = open_checkpoint(src), open_checkpoint(tmp_path / "pruned")
    assert b.cfg.num_layers == 3
    for target, kept in enumerate([0, 1, 3]):
        for kind in layout.LAYER_KINDS:
            assert torch.equal(b.read(layout.layer_name(target, kind)), a.read(layout.layer_name(kept, kind)))
    small = ReferenceLlama(replace(model.cfg, num_layers=3)).eval()
    state = model.state_dict()
    remap = {f"model.layers.{t}.": f"model.layers.{k}." for t, k in enumerate([0, 1, 3])}
    small.load_state_dict(
        {
            k: state[next((k.replace(t, s, 1) for t, s in remap.items() if k.startswith(t)), k)]
            for k in small.state_dict()
        }
    )
    got = {n: b.read(n) for n in layout.logical_names(b.cfg)}
    pruned = ReferenceLlama(b.cfg).eval()
    pruned.load_state_dict(layout.hf_from_logical(got, b.cfg))
    tokens = sample_tokens(model.cfg)
    assert torch.equal(logits(pruned, tokens), logits(small, tokens))
    event = read_manifest(resolve_iteration_dir(tmp_path / "pruned"))["history"][-1]
    assert (event["operator"], event["kept"], event["dropped"]) == ("prune", [0, 1, 3], [2])
    for flags, needle in [
        ([], "needs --keep"),
        (["--keep", "0,2,1"], "kept in order"),
        (["--keep", "0,1,1"], "kept in order"),
        (["--keep", "0-3"], "keeps all 4 layers"),
        (["--keep", "0,7"], "layer 7"),
        (["--keep", "0,1", "--factor", "2"], "not --factor"),
    ]:
        proc = run_cli("grow", str(src), str(tmp_path / "bad"), "--operator", "prune", *flags)
        assert_one_line_error(proc, needle)
        assert not (tmp_path / "bad").exists()

"""G_learn (LiGO): step 0 is G_stack (and G_direct width), learning lowers held-out loss versus stacking (and
direct width), a fixed seed reproduces the checkpoint bit for bit, two ranks agree with one, data formats,
and bad input."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megastack import layout
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.execute import Comm
from megastack.ckpt.manifest import read_manifest, resolve_iteration_dir
from megastack.errors import UserError
from megastack.growth.learn import initial_maps, learn_maps, load_tokens
from megastack.growth.operators import make_plan
from megastack.growth.spec import GrowthSpec
from megastack.model.reference import ReferenceLlama

from ckpt_factory import logical_of, reference, small_config, write_checkpoint
from conftest import assert_one_line_error, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the CI machine is small and shared: threads only contend
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ("argparse.py", "subprocess.py", "typing.py", "inspect.py", "dataclasses.py")
HELD_OUT_FILES = ("tarfile.py", "pickle.py")  # never seen by the small model nor by the learned maps
SEQ = 64
LEARN = ["--operator", "learn", "--factor", "2", "--learn-tokens", "20000", "--learn-batch", "8", "--seed", "1"]
BOTH = ["--dimension", "both", "--factor", "2", "--hidden", "96", "--ffn", "192", "--query-groups", "2"]
LEARN_BOTH = ["--operator", "learn", *BOTH, "--learn-tokens", "20000", "--seed", "1"]


def byte_tokens(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).to(torch.int64)


def lm_loss(model: ReferenceLlama, stream: torch.Tensor, windows: int = 24) -> float:
    starts = torch.linspace(0, len(stream) - SEQ - 2, windows).long().tolist()
    batch = torch.stack([stream[s : s + SEQ + 1] for s in starts])
    with torch.no_grad():
        out = model(batch[:, :-1])
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1)).item()


def load_model(path: Path) -> ReferenceLlama:
    reader = open_checkpoint(path)
    model = ReferenceLlama(reader.cfg).eval()
    model.load_state_dict(
        layout.hf_from_logical({n: reader.read(n) for n in layout.logical_names(reader.cfg)}, reader.cfg)
    )
    return model


@pytest.fixture(scope="module")
def trained_small(tmp_path_factory):
    """A 2-layer byte-level model trained briefly on standard-library source, as a torch_dist checkpoint."""
    tmp = tmp_path_factory.mktemp("learn")
    (tmp / "train.txt").write_bytes(b"".join((STDLIB / f).read_bytes() for f in TRAIN_FILES))
    (tmp / "held.txt").write_bytes(b"".join((STDLIB / f).read_bytes() for f in HELD_OUT_FILES))
    data = byte_tokens(tmp / "train.txt")
    cfg = small_config(num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=256, seq_length=SEQ)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ReferenceLlama(cfg).init_weights(seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(150):
            starts = torch.randint(0, len(data) - SEQ - 1, (16,), generator=generator).tolist()
            batch = torch.stack([data[s : s + SEQ + 1] for s in starts])
            loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    write_checkpoint(model.eval(), tmp / "small")
    for name, flags in (
        ("stack", ["--factor", "2"]),
        ("learned", LEARN),
        ("learned_again", LEARN),
        ("stack_both", BOTH),
        ("learned_both", LEARN_BOTH),
    ):
        proc = run_cli(
            "grow", str(tmp / "small"), str(tmp / name), *flags, "--data", str(tmp / "train.txt"), env=ONE_THREAD
        )
        assert proc.returncode == 0, proc.stderr
    return tmp


def test_step_zero_is_stack():
    small = reference(small_config(num_layers=3))
    tensors = logical_of(small)

    class DictReader:
        def read(self, name, pieces=None):
            return tensors[name].clone()

    spec = GrowthSpec(operator="learn", layer_map="0-2,1-2")
    learned = make_plan(small.cfg, GrowthSpec(**{**spec.__dict__, "learned": {"maps": initial_maps(small.cfg, spec)}}))
    stacked = make_plan(small.cfg, GrowthSpec(layer_map="0-2,1-2"))
    a, b = learned.producer(DictReader(), torch.float32), stacked.producer(DictReader(), torch.float32)
    for name in layout.logical_names(stacked.target):
        assert torch.equal(a(name, None), b(name, None)), name
    assert learned.info["new_layers"] == [3, 4] and learned.info["layer_map"] == [0, 1, 2, 1, 2]


def test_learned_growth_beats_stacking_on_held_out_data(trained_small):
    tmp = trained_small
    held = byte_tokens(tmp / "held.txt")
    small, stack, learned = (load_model(tmp / n) for n in ("small", "stack", "learned"))
    loss_small, loss_stack, loss_learned = (lm_loss(m, held) for m in (small, stack, learned))
    assert loss_learned < loss_stack - 0.01, (loss_small, loss_stack, loss_learned)
    report = read_manifest(resolve_iteration_dir(tmp / "learned"))["history"][-1]["learn"]
    assert report["steps"] == 39 and report["tokens"] == 39 * 8 * SEQ
    assert report["heldout_loss_learned"] < report["heldout_loss_stack"]


def test_learned_width_beats_direct_width_on_held_out_data(trained_small):
    """LiGO depth + width (D and B) versus G_direct width + G_stack, on files neither has seen."""
    tmp = trained_small
    held = byte_tokens(tmp / "held.txt")
    stack_both, learned_both = (load_model(tmp / n) for n in ("stack_both", "learned_both"))
    assert learned_both.cfg == stack_both.cfg and learned_both.cfg.hidden_size == 96
    loss_stack, loss_learned = lm_loss(stack_both, held), lm_loss(learned_both, held)
    assert loss_learned < loss_stack - 0.01, (loss_stack, loss_learned)
    event = read_manifest(resolve_iteration_dir(tmp / "learned_both"))["history"][-1]
    assert event["dimension"] == "both" and event["width"]["init"] == "direct"
    assert event["learned_width"]["hidden.write"]["shape"] == [96, 64]
    assert event["learned_width"]["layers.1.ffn_in"]["shape"] == [192, 128]


@pytest.mark.parametrize("dimension,extra", [("width", {}), ("both", {"factor": 2})])
def test_learned_width_starts_at_direct_width_and_pieces_agree(dimension, extra):
    """Step 0 of learned width is G_direct width (function preserving); TP shards and row blocks of the
    learned-width recipe are slices of the whole tensor."""
    from megastack.growth.learn import initial_learned
    from megastack.layout import take_pieces

    small = reference(small_config())
    tensors = logical_of(small)

    class DictReader:
        def read(self, name, pieces=None):
            return take_pieces(tensors[name], pieces).clone()

    flags = dict(dimension=dimension, hidden=96, ffn=160, query_groups=2, **extra)
    spec = GrowthSpec(operator="learn", **flags)
    learned = make_plan(small.cfg, GrowthSpec(**{**spec.__dict__, "learned": initial_learned(small.cfg, spec)}))
    direct = make_plan(small.cfg, GrowthSpec(**flags))
    assert learned.target == direct.target
    a, b = learned.producer(DictReader(), torch.float32), direct.producer(DictReader(), torch.float32)
    for name in layout.logical_names(direct.target):
        full = a(name, None)
        assert torch.allclose(full, b(name, None), rtol=0, atol=1e-7), name
        kind = layout.split_name(name)[1]
        for pieces in [layout.tp_pieces(kind, tuple(full.shape), r, 2) for r in range(2)] + [[layout.Piece(0, 3, 5)]]:
            assert torch.allclose(a(name, pieces), take_pieces(full, pieces), rtol=0, atol=1e-7), (name, pieces)


def test_learned_growth_is_reproducible(trained_small):
    tmp = trained_small
    a, b = open_checkpoint(tmp / "learned"), open_checkpoint(tmp / "learned_again")
    for name in layout.logical_names(a.cfg):
        assert torch.equal(a.read(name), b.read(name)), name
    ma, mb = (read_manifest(resolve_iteration_dir(tmp / n)) for n in ("learned", "learned_again"))
    assert ma["history"][-1]["learned_maps"] == mb["history"][-1]["learned_maps"]
    d = ma["history"][-1]["learned_maps"]["fc2"]
    assert len(d) == 4 and len(d[0]) == 2 and d != initial_maps(a.cfg, GrowthSpec(factor=2))["fc2"]
    assert ma["growth"]["operator"] == "learn" and ma["growth"]["mask_ramp"] is False


@pytest.mark.timeout(600)
def test_two_ranks_learn_the_same_maps(trained_small):
    """Data parallel over gloo: the same global batch split over 2 ranks gives the 1-rank maps up to
    float reduction order."""
    from megastack.dist import launch_local

    tmp = trained_small
    result = launch_local(
        [
            sys.executable,
            "-m",
            "megastack",
            "grow",
            str(tmp / "small"),
            str(tmp / "two_ranks"),
            *LEARN,
            "--data",
            str(tmp / "train.txt"),
        ],
        2,
        timeout=500,
        env=ONE_THREAD,
    )
    assert result.ok, result.describe()
    one = read_manifest(resolve_iteration_dir(tmp / "learned"))["history"][-1]
    two = read_manifest(resolve_iteration_dir(tmp / "two_ranks"))["history"][-1]
    assert two["learn"]["ranks"] == 2
    for kind, d in one["learned_maps"].items():
        assert np.allclose(d, two["learned_maps"][kind], atol=2e-3), kind


# ----------------------------------------------------------------------------- data


def test_token_sources(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(100, dtype=np.int32) % 50)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("bb")
    (tmp_path / "docs" / "a.py").write_text("a")
    tokens = load_tokens([str(tmp_path / "ids.npy"), str(tmp_path / "docs")], 256, 1000)
    assert tokens[:100].tolist() == [i % 50 for i in range(100)] and tokens[100:].tolist() == [97, 98, 98]
    assert len(load_tokens([str(tmp_path / "ids.npy")], 256, 10)) == 10

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), dtype=np.uint16)
    for doc in ([5, 6, 7], [8, 9]):
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "corpus.idx"))
    for given in ("corpus", "corpus.bin", ""):  # a prefix, its .bin, or a 'megastack data' directory
        assert load_tokens([str(tmp_path / given)], 256, 1000).tolist() == [5, 6, 7, 8, 9]


def test_bad_learn_input(tmp_path):
    write_checkpoint(reference(small_config()), tmp_path / "src")
    reader = open_checkpoint(tmp_path / "src")
    np.save(tmp_path / "big_ids.npy", np.array([1, 2, 300]))
    (tmp_path / "tiny.txt").write_text("x" * 20)
    spec = GrowthSpec(operator="learn", factor=2)
    for data, kwargs, needle in (
        (None, {}, "give --data"),
        ([str(tmp_path / "nope")], {}, "not found"),
        ([str(tmp_path / "big_ids.npy")], {}, "vocab is 256"),
        ([str(tmp_path / "tiny.txt")], {}, "give more data"),
        ([str(tmp_path / "tiny.txt")], {"batch": 0}, "--learn-batch 0"),
        ([str(tmp_path / "tiny.txt")], {"tokens": 0}, "--learn-tokens"),
    ):
        args = {"tokens": 1000, "batch": 2, "lr": 0.01, **kwargs}
        with pytest.raises(UserError, match=needle):
            learn_maps(reader, spec, data, args["tokens"], args["batch"], args["lr"], Comm())
    with pytest.raises(UserError, match="--noise"):
        learn_maps(reader, GrowthSpec(operator="learn", factor=2, noise=0.2), ["x"], 1000, 2, 0.01, Comm())
    with pytest.raises(UserError, match="give --data"):
        make_plan(reader.cfg, spec)
    proc = run_cli(
        "grow", str(tmp_path / "src"), str(tmp_path / "out"), "--operator", "learn", "--factor", "2", env=ONE_THREAD
    )
    assert_one_line_error(proc, "give --data")
    proc = run_cli(
        "grow",
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "--operator",
        "learn",
        "--dimension",
        "width",
        "--hidden",
        "32",
        "--data",
        str(tmp_path / "tiny.txt"),
        env=ONE_THREAD,
    )
    assert_one_line_error(proc, "--hidden 32", "smaller")
    assert not (tmp_path / "out").exists()

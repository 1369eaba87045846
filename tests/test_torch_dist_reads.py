"""Regions of a torch_dist checkpoint read straight from the chunks' bytes (preadv into place) against the
tensors that were written, for chunks cut by rows and by columns; the same regions through the load-and-copy
path give the same values, on megastack's files and on a DCP file Megatron-LM wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megastack import layout
from megastack.ckpt import torch_dist
from megastack.ckpt.execute import Comm, execute
from megastack.ckpt.manifest import resolve_iteration_dir
from megastack.ckpt.torch_dist import TorchDistReader, TorchDistWriter
from megastack.config import to_dict
from megastack.layout import Piece, take_pieces

from ckpt_factory import logical_of, reference, small_config

REPO = Path(__file__).resolve().parents[1]


def regions(shape: tuple[int, ...]) -> list[list[Piece] | None]:
    """Whole, row blocks that straddle chunks, column blocks, and two pieces at once."""
    rows = shape[0]
    out: list[list[Piece] | None] = [None, [Piece(0, 1, rows - 3)], [Piece(0, rows // 3, rows // 2)]]
    if len(shape) > 1:
        cols = shape[1]
        out += [[Piece(1, 3, cols - 5)], [Piece(1, 0, cols // 2), Piece(1, cols - cols // 4, cols // 4)]]
    return out


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """A checkpoint whose tensors are cut into many small chunks (rows, and columns for proj and fc2)."""
    model = reference(small_config(hidden_size=64, ffn_hidden_size=160))
    tensors = logical_of(model)
    dst = tmp_path_factory.mktemp("chunked") / "td"
    writer = TorchDistWriter(model.cfg, torch.float32, chunk_bytes=3000)
    manifest = {"format": "torch_dist", "model": to_dict(model.cfg), "iteration": 0, "history": [{"event": "test"}]}
    execute(writer, lambda name, pieces: take_pieces(tensors[name], pieces), dst, Comm(), manifest)
    return model.cfg, tensors, resolve_iteration_dir(dst)


def test_regions_match_what_was_written(chunked, monkeypatch):
    """Both paths: every read into place (no piece too small), and scattered pieces loaded and copied."""
    cfg, tensors, directory = chunked
    real_preadv, real_load = torch_dist._preadv_all, TorchDistReader._load_chunk
    counts = {"preadv": 0, "load": 0}

    def preadv(*args):
        counts["preadv"] += 1
        return real_preadv(*args)

    def load(self, *args):
        counts["load"] += 1
        return real_load(self, *args)

    monkeypatch.setattr(torch_dist, "_preadv_all", preadv)
    monkeypatch.setattr(TorchDistReader, "_load_chunk", load)
    seen = {}
    for small_read_bytes in (0, 1 << 40):
        monkeypatch.setattr(torch_dist, "SMALL_READ_BYTES", small_read_bytes)
        counts.update(preadv=0, load=0)
        reader = TorchDistReader(directory, cfg)
        checked = 0
        for name in layout.logical_names(cfg):
            for pieces in regions(tuple(tensors[name].shape)):
                got = reader.read(name, pieces)
                assert torch.equal(got, take_pieces(tensors[name], pieces)), (name, pieces, small_read_bytes)
                checked += 1
        assert checked > 40
        seen[small_read_bytes] = dict(counts)
    assert seen[0]["preadv"] > seen[1 << 40]["preadv"] and seen[0]["load"] < seen[1 << 40]["load"], seen


def test_megatron_lm_dcp_file_reads_as_dcp_loads_it():
    """Megatron-LM's own torch_dist checkpoint (DCP's writer): every region read into place equals the same
    region of what torch.distributed.checkpoint's own loader returns."""
    import torch.distributed.checkpoint as dcp

    from megastack.ckpt import formats

    directory = REPO / "tests/fixtures/megatron_lm/torch_dist/iter_0000002"
    reader = formats.get("torch_dist").open(directory, None, True)
    cfg = reader.cfg
    names = layout.logical_names(cfg)
    keys = {reader._key(name) for name in names}
    entries = reader.metadata.state_dict_metadata
    state = {key: torch.empty(tuple(entries[key].size), dtype=entries[key].properties.dtype) for key in keys}
    dcp.load(state, checkpoint_id=str(directory))
    for name in names:
        full = state[reader._key(name)]
        for index in torch_dist.leading(cfg, name)[0]:
            full = full[index]
        for pieces in regions(tuple(full.shape)):
            assert torch.equal(reader.read(name, pieces), take_pieces(full, pieces)), (name, pieces)

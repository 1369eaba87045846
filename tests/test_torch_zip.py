"""The streaming torch.save-format writer (megastack/ckpt/torch_zip.py) against torch's own loader."""

from __future__ import annotations

import argparse
import hashlib
import struct
import zipfile

import torch

from megastack.ckpt.base import HashingWriter
from megastack.ckpt.safe_load import load_pt
from megastack.ckpt.torch_zip import ALIGNMENT, LazyTensor, save_streaming


def test_streamed_file_is_what_torch_load_reads(tmp_path):
    tensors = {
        "w": torch.randn(33, 7),
        "b16": torch.randn(5, 3).to(torch.bfloat16),
        "h": torch.randn(1000).half(),
        "scalar_row": torch.randn(1, 1),
    }
    produced: list[tuple[str, int]] = []  # (name, bytes written before it was produced)
    path = tmp_path / "model_optim_rng.pt"
    with open(path, "wb") as f:
        stream = HashingWriter(f)

        def lazy(name: str) -> LazyTensor:
            def fill() -> torch.Tensor:
                produced.append((name, stream.tell()))
                return tensors[name]

            return LazyTensor(tensors[name].shape, tensors[name].dtype, fill)

        shared = lazy("w")
        blob = {
            "model": {"a.weight": shared, "tied.weight": shared, "x._extra_state": None}
            | {name: lazy(name) for name in ("b16", "h", "scalar_row")},
            "args": argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16),
            "iteration": 7,
        }
        save_streaming(blob, stream)
    assert stream.digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()  # hashed as written
    # each tensor produced once, after the pickle and the records before it were written
    assert [n for n, _ in produced] == ["w", "b16", "h", "scalar_row"] and produced[0][1] > 0
    assert all(a < b for (_, a), (_, b) in zip(produced, produced[1:]))
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=False, mmap=mmap)
        assert loaded["iteration"] == 7 and loaded["args"].num_layers == 2
        assert loaded["model"]["x._extra_state"] is None
        assert torch.equal(loaded["model"]["a.weight"], tensors["w"])
        assert loaded["model"]["tied.weight"].untyped_storage().data_ptr() == (
            loaded["model"]["a.weight"].untyped_storage().data_ptr()
        )  # one storage, as torch.save writes a tensor saved twice
        for name in ("b16", "h", "scalar_row"):
            assert (
                torch.equal(loaded["model"][name], tensors[name]) and loaded["model"][name].dtype == tensors[name].dtype
            )
    assert load_pt(path)["model"]["h"].dtype == torch.float16  # megastack's weights-only loader reads it too
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC right
        for info in archive.infolist():  # every record's data starts on torch's 64-byte boundary
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % ALIGNMENT == 0, info.filename


def test_legacy_writer_streams_large_tensors_in_row_blocks(tmp_path, monkeypatch):
    """A tensor over BLOCK_BYTES is produced a block of rows at a time (so a 7B embedding never exists whole)
    and the files are byte for byte what producing it whole writes, under TP2 (GLU and row pieces) and PP2."""
    from megastack.ckpt import legacy

    from ckpt_factory import reference, small_config, write_checkpoint

    model = reference(small_config(name="blocks"))
    whole = write_checkpoint(model, tmp_path / "whole", "legacy", tp=2, pp=2)
    produced: list[int] = []
    narrow = legacy.layout.narrow_pieces

    def spy(pieces, start, stop):
        produced.append(stop - start)
        return narrow(pieces, start, stop)

    monkeypatch.setattr(legacy, "BLOCK_BYTES", 1024)  # 4 rows of 64 fp32
    monkeypatch.setattr(legacy.layout, "narrow_pieces", spy)
    blocks = write_checkpoint(model, tmp_path / "blocks", "legacy", tp=2, pp=2)
    assert produced and max(produced) == 4  # written in blocks of 4 rows
    files = sorted(p.relative_to(whole) for p in whole.rglob("model_optim_rng.pt"))
    assert len(files) == 4
    for rel in files:
        assert (whole / rel).read_bytes() == (blocks / rel).read_bytes(), rel


def test_hashing_writer_with_write_behind_keeps_every_byte(tmp_path, monkeypatch):
    """Writes large enough to be hashed in the second thread and to start writeback (thresholds made small):
    the file and the digest hold exactly the bytes written, as they do for an in-memory stream."""
    import io

    monkeypatch.setattr(HashingWriter, "CONCURRENT_BYTES", 1000)
    monkeypatch.setattr(HashingWriter, "WRITE_BEHIND_BYTES", 5000)
    blocks = [bytes([i]) * size for i, size in enumerate([10, 3000, 1, 4096, 7000, 999, 12345])]
    path = tmp_path / "out.bin"
    with open(path, "wb") as f:
        f.write(b"head")  # the writer starts mid-file: write-behind ranges are offset by it
        on_disk = HashingWriter(f)
        for block in blocks:
            on_disk.write(block)
        assert on_disk._kicked > 0  # writeback was started on the way
    in_memory = HashingWriter(io.BytesIO())
    for block in blocks:
        in_memory.write(block)
    expected = b"".join(blocks)
    assert path.read_bytes() == b"head" + expected
    assert on_disk.digest.hexdigest() == in_memory.digest.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert on_disk.tell() == in_memory.tell() == len(expected)

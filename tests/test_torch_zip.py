"""The streaming torch.save-format writer (megastack/ckpt/torch_zip.py) against torch's own loader."""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import zipfile
import zlib

import pytest
import torch

from megastack.ckpt.base import HashingWriter
from megastack.ckpt.safe_load import load_pt
from megastack.ckpt.torch_zip import ALIGNMENT, LazyTensor, ZipStream, save_streaming


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
    digest = stream.file_hash("out.pt").digest  # hashed as written
    assert digest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest.crc32 == f"{zlib.crc32(path.read_bytes()):08x}"
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
    """Writes large enough to be hashed in the second thread, some trailing their write (owned), mixed with
    small ones and a reused buffer, with writeback started on the way (thresholds made small): the file and
    the digest hold exactly the bytes written, in order, as they do for an in-memory stream."""
    monkeypatch.setattr(HashingWriter, "CONCURRENT_BYTES", 1000)
    monkeypatch.setattr(HashingWriter, "WRITE_BEHIND_BYTES", 5000)
    monkeypatch.setattr(HashingWriter, "PENDING_BYTES", 6000)  # a few blocks trail, a larger one is waited for
    sizes = [10, 3000, 1, 4096, 7000, 999, 12345, 5, 2000, 2000, 2000, 2000, 7]

    def write_all(stream: HashingWriter) -> bytes:
        reused = bytearray(3000)  # written without owned=True, then overwritten at once
        expected = b""
        for i, size in enumerate(sizes):
            if i % 4 == 3:
                reused[:] = bytes([i]) * 3000
                stream.write(memoryview(reused))
                expected += bytes(reused)
                reused[:] = b"\xff" * 3000
            else:
                block = bytes([i]) * size
                stream.write(memoryview(block), owned=i % 2 == 0)
                expected += block
        return expected

    path = tmp_path / "out.bin"
    with open(path, "wb") as f:
        f.write(b"head")  # the writer starts mid-file: write-behind ranges are offset by it
        on_disk = HashingWriter(f)
        expected = write_all(on_disk)
        assert on_disk._kicked > 0  # writeback was started on the way
    in_memory = HashingWriter(io.BytesIO())
    assert write_all(in_memory) == expected
    assert path.read_bytes() == b"head" + expected
    assert on_disk.file_hash("x") == in_memory.file_hash("x")
    assert on_disk.file_hash("x").digest == (hashlib.sha256(expected).hexdigest(), f"{zlib.crc32(expected):08x}")
    assert on_disk.tell() == in_memory.tell() == len(expected)


def test_zip_records_are_crc32d_once_and_the_file_crc32_follows(tmp_path, monkeypatch):
    """Records written through a HashingWriter are CRC32'd by ZipStream only; the writer folds each record's
    CRC32 into the file's (crc32_combine). With thresholds made small, so blocks trail their write in both
    helper threads, the file's CRC32 and sha256 are still zlib's and hashlib's of the bytes on disk; a
    writer owed a CRC32 it was never given refuses to report one."""
    from megastack.compat import crc

    monkeypatch.setattr(HashingWriter, "CONCURRENT_BYTES", 1000)
    monkeypatch.setattr(HashingWriter, "PENDING_BYTES", 6000)
    monkeypatch.setattr(ZipStream, "CONCURRENT_BYTES", 1000)
    monkeypatch.setattr(ZipStream, "PENDING_BYTES", 6000)
    updated: list[int] = []
    real = crc.crc32
    monkeypatch.setattr(
        "megastack.ckpt.base.crc32", lambda data, value=0: updated.append(len(data)) or real(data, value)
    )
    path = tmp_path / "records.zip"
    with open(path, "wb") as f:
        stream = HashingWriter(f)
        archive = ZipStream(stream)
        for i, sizes in enumerate([[10], [3000, 4096, 1, 7000], [], [12345, 5]]):
            archive.record(f"r{i}", [bytes([i + 1]) * size for size in sizes])
        archive.close()
        digest = stream.file_hash("records.zip").digest
    data = path.read_bytes()
    assert digest == (hashlib.sha256(data).hexdigest(), f"{zlib.crc32(data):08x}")
    assert sum(updated) == len(data) - (10 + 3000 + 4096 + 1 + 7000 + 12345 + 5)  # headers only
    with zipfile.ZipFile(path) as z:
        assert z.read("r1") == b"\x02" * 3000 + b"\x02" * 4096 + b"\x02" + b"\x02" * 7000
    owing = HashingWriter(io.BytesIO())
    owing.write(b"x" * 5000, crc_later=True)
    with pytest.raises(RuntimeError, match="5000"):
        owing.add_crc(zlib.crc32(b"x" * 4999), 4999)
    with pytest.raises(RuntimeError, match="never added"):
        owing.file_hash("x")


class _OffsetStream:
    """A write-only, unseekable stream whose tell() starts at ``base``: records then sit past the 2 GiB line
    where zip64 fields begin, without writing gigabytes."""

    def __init__(self, base: int):
        self.base, self.buffer = base, bytearray()

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def tell(self) -> int:
        return self.base + len(self.buffer)

    def flush(self) -> None:
        pass


def _zipfile_reference(records: list[tuple[str, list[bytes]]], base: int) -> bytes:
    """What Python's zipfile writes for the records, padded as torch pads (the writer megastack used before)."""
    stream = _OffsetStream(base)
    with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, blocks in records:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            header = archive.fp.tell() + 30 + len(name) + 20 + 4
            pad = (-header) % ALIGNMENT
            info.extra = b"FB" + pad.to_bytes(2, "little") + b"\0" * pad
            with archive.open(info, "w", force_zip64=True) as out:
                for block in blocks:
                    out.write(block)
    return bytes(stream.buffer)


@pytest.mark.parametrize("base", [0, 3 << 30])
def test_zip_stream_writes_what_zipfile_writes(base, monkeypatch):
    """ZipStream (CRC in a helper thread) against the standard library's zipfile, byte for byte: headers,
    padding, data descriptors, central directory, and the zip64 end records once offsets pass 2 GiB."""
    monkeypatch.setattr(ZipStream, "CONCURRENT_BYTES", 100)
    monkeypatch.setattr(ZipStream, "PENDING_BYTES", 600)
    records = [
        ("archive/data.pkl", [b"\x80\x02}q\x00."]),
        ("archive/byteorder", [b"little"]),
        ("archive/data/0", [bytes(range(256)) * 3, b"", b"x" * 99, bytes(500)]),
        ("archive/data/1", []),
        ("archive/version", [b"3\n"]),
    ]
    stream = _OffsetStream(base)
    archive = ZipStream(stream, origin=0)  # zipfile counts offsets from the stream's position 0
    for name, blocks in records:
        archive.record(name, blocks)
    archive.close()
    assert bytes(stream.buffer) == _zipfile_reference(records, base)
    if base == 0:
        with zipfile.ZipFile(io.BytesIO(bytes(stream.buffer))) as z:  # zipfile checks every CRC on read
            assert z.read("archive/data/0") == b"".join(records[2][1])
            assert z.testzip() is None


def test_an_archive_after_other_bytes_loads_from_its_own_start(tmp_path):
    """A DCP file is torch.save blobs back to back, each loaded from its own first byte: zip offsets count
    from where the archive starts, not from the file's start."""
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64).to(torch.float32).bfloat16()]
    buffer = io.BytesIO(b"x" * 100)
    buffer.seek(100)
    spans = []
    for t in tensors:
        start = buffer.tell()
        save_streaming(LazyTensor(tuple(t.shape), t.dtype, lambda t=t: t), buffer)
        spans.append((start, buffer.tell()))
    data = buffer.getvalue()
    for t, (start, end) in zip(tensors, spans):
        assert torch.equal(torch.load(io.BytesIO(data[start:end]), weights_only=True), t)


def test_storage_records_of_a_direct_file_start_on_its_blocks_and_are_written_in_place(tmp_path, monkeypatch):
    """Blobs back to back in a file written with O_DIRECT, as a DCP file is: each tensor's storage record starts
    on a DIRECT_ALIGN boundary of the file (so a page-aligned block is written from its own memory, not
    staged), the small records stay packed on torch's 64 bytes of their archive, and every blob loads with
    torch.load from its own first byte, its CRCs right."""
    from megastack import fsio
    from megastack.compat import streaming

    monkeypatch.setattr(fsio, "IN_PLACE_MIN_BYTES", 4096)
    in_place = []
    real = fsio.DirectFile._write_in_place
    monkeypatch.setattr(fsio.DirectFile, "_write_in_place", lambda self, v: (in_place.append(len(v)), real(self, v)))
    path = tmp_path / "blobs.distcp"
    f = fsio.open_output(path)
    if not isinstance(f, fsio.DirectFile):
        f.close()
        pytest.skip("this file system refuses O_DIRECT")
    spans, tensors = [], []
    with streaming.streaming_settings(), f:
        stream = HashingWriter(f)
        stream.write(b"x" * 100)
        for rows in (512, 300, 1024):
            t = streaming.empty((rows, 1024), torch.float32)  # page-aligned, as a reader's blocks are
            t.copy_(torch.randn(rows, 1024))
            tensors.append(t.clone())
            start = stream.tell()
            save_streaming(LazyTensor(tuple(t.shape), t.dtype, lambda t=t: t), stream)
            spans.append((start, stream.tell()))
            del t
        stream.flush()
        digest = stream.file_hash("blobs.distcp")
    raw = path.read_bytes()
    assert digest.digest.sha256 == hashlib.sha256(raw).hexdigest()
    for t, (start, end) in zip(tensors, spans):
        blob = raw[start:end]
        assert torch.equal(torch.load(io.BytesIO(blob), weights_only=True), t)
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            assert archive.testzip() is None
            for info in archive.infolist():
                name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
                data = info.header_offset + 30 + name_len + extra_len
                if "/data/" in info.filename:
                    assert (start + data) % fsio.DIRECT_ALIGN == 0, info.filename
                else:
                    assert data % ALIGNMENT == 0 and extra_len < ALIGNMENT + 24, info.filename
    assert sum(in_place) == sum(t.numel() * 4 for t in tensors)  # every tensor's bytes went in place


def test_crc32_is_zlibs():
    """compat.crc's CRC32 (libdeflate where present) gives zlib's values: whole, continued, read-only
    bytes, a tensor's memory, below and above the size where it switches implementation; and crc32_combine
    joins two spans' CRC32s as zlib's crc32 of the joined bytes."""
    import zlib

    from megastack.compat import crc

    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8, generator=generator).numpy().tobytes()
    for size in (0, 1, 1000, crc._NATIVE_BYTES - 1, crc._NATIVE_BYTES, 3 << 20):
        assert crc.crc32(data[:size]) == zlib.crc32(data[:size]), size
    running = crc.crc32(data[: 2 << 20])
    assert crc.crc32(data[2 << 20 :], running) == zlib.crc32(data)
    matrix = torch.randn(512, 300)
    view = memoryview(matrix.numpy())  # 2-D, float
    assert crc.crc32(view, 7) == zlib.crc32(matrix.numpy().tobytes(), 7)
    assert crc.backend() in ("zlib", "libdeflate")
    for cut in (0, 1, 1000, 2 << 20, len(data)):  # joined spans, either one empty
        head, tail = data[:cut], data[cut:]
        assert crc.crc32_combine(zlib.crc32(head), zlib.crc32(tail), len(tail)) == zlib.crc32(data), cut


def test_ahead_keeps_order_bounds_its_lead_raises_in_place_and_stops_early():
    import threading
    import time

    from megastack.ckpt.base import ahead

    made: list[int] = []

    def items(n: int, fail_at: int | None = None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"bad item {i}")
            made.append(i)
            yield i

    assert list(ahead(items(50))) == list(range(50))
    for depth in (1, 2):
        made.clear()
        got = []
        for i in ahead(items(50), depth=depth):
            time.sleep(0.01)  # the producer runs ahead, at most depth items beyond the one held
            assert len(made) <= i + 1 + depth
            got.append(i)
        assert got == list(range(50)) and len(made) == 50
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for i in ahead(items(10, fail_at=3)):
            got.append(i)
    assert got == [0, 1, 2]  # every item before the failing one was delivered
    made.clear()
    threads = threading.active_count()
    for i in ahead(items(10**6)):
        if i == 5:
            break
    assert len(made) < 10 and threading.active_count() == threads  # the producer stopped and was joined


def test_read_ahead_writes_the_same_bytes_as_without(tmp_path):
    tensors = {"a": torch.randn(70, 3), "b": torch.randn(4).half(), "c": torch.randn(2, 2).to(torch.bfloat16)}

    def blob() -> dict:
        blocks = {"a": lambda: iter([tensors["a"][:30], tensors["a"][30:]])}
        return {name: LazyTensor(t.shape, t.dtype, lambda t=t: t, blocks.get(name)) for name, t in tensors.items()}

    files = []
    for read_ahead in (False, True):
        path = tmp_path / f"ahead{read_ahead}.pt"
        with open(path, "wb") as f:
            save_streaming(blob(), HashingWriter(f), read_ahead=read_ahead)
        files.append(path.read_bytes())
    assert files[0] == files[1]
    loaded = torch.load(tmp_path / "aheadTrue.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    bad = blob()
    bad["b"] = LazyTensor((5,), torch.float16, lambda: tensors["b"])  # produces 4 values, the pickle says 5
    with open(tmp_path / "bad.pt", "wb") as f, pytest.raises(RuntimeError, match="shape"):
        save_streaming(bad, HashingWriter(f), read_ahead=True)

"""A torch.save-compatible file written tensor by tensor: the legacy writer's memory is one tensor, not a file.

``torch.save`` pickles the whole object, then writes every storage: it needs every tensor in memory at
once (a 1.1B-shape legacy rank file: 3.8 GB resident). The format is a documented zip (PyTorch's
serialization notes): ``archive/data.pkl`` (the pickle; a tensor is ``_rebuild_tensor_v2`` of a storage named
by a persistent id ``("storage", FloatStorage, key, "cpu", numel)``), ``archive/byteorder``, one uncompressed
record ``archive/data/<key>`` per storage, aligned to 64 bytes as torch aligns them (so ``mmap=True`` loads
them in place), and ``archive/version``. Every shape and dtype is known before any value is, so the pickle
is written first with placeholders, then each storage as its tensor is produced. Records use zip data
descriptors (CRC and sizes after the data): nothing is rewritten, so the file is hashed as written.

The zip itself is written by ``ZipStream`` (the same bytes as Python's ``zipfile`` writes for these records),
which computes each block's CRC32 in a helper thread while the block is written and the next one produced
(zipfile computes it inline), with libdeflate where the system has it (megastack/compat/crc.py).
"""

from __future__ import annotations

import collections
import io
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megastack.ckpt.base import HashingWriter, Trailing, ahead
from megastack.ckpt.safe_load import _Pickler
from megastack.compat.crc import crc32
from megastack.fsio import DIRECT_ALIGN

ALIGNMENT = 64  # torch's own storage alignment
PROTOCOL = 2  # torch.save's default pickle protocol
STORAGE_TYPES = {
    torch.float32: torch.FloatStorage,
    torch.bfloat16: torch.BFloat16Storage,
    torch.float16: torch.HalfStorage,
    torch.float64: torch.DoubleStorage,
}
CHUNK = 16 << 20  # bytes handed to the zip writer at a time


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


class LazyTensor:
    """A tensor to be written later: pickled as a contiguous tensor of ``shape`` and ``dtype`` whose storage
    is record ``key``; ``fill`` produces its values when that record is written."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        fill: Callable[[], torch.Tensor],
        blocks: Callable[[], Iterator[torch.Tensor]] | None = None,
    ):
        """``blocks``: the same values as consecutive blocks of rows, produced one at a time as the record is
        written (a large tensor then never exists whole in memory); ``fill`` is used when it is None."""
        self.shape, self.dtype, self.fill, self.blocks = tuple(shape), dtype, fill, blocks
        self.storage: _Storage | None = None

    def produce_blocks(self) -> Iterator[torch.Tensor]:
        """The values, block by block when ``blocks`` is given, else whole in one block."""
        return self.blocks() if self.blocks is not None else iter([self.fill()])

    def __reduce_ex__(self, protocol: int):
        stride, step = [], 1
        for size in reversed(self.shape):
            stride.append(step)
            step *= size
        return torch._utils._rebuild_tensor_v2, (
            self.storage,
            0,
            torch.Size(self.shape),
            tuple(reversed(stride)),
            False,
            collections.OrderedDict(),
        )


class _StreamingPickler(_Pickler):
    def persistent_id(self, obj: Any):
        if isinstance(obj, _Storage):
            return ("storage", STORAGE_TYPES[obj.dtype], obj.key, "cpu", obj.numel)
        return None


class ZipStream:
    """Stored (uncompressed) zip records written in order to a stream that only needs ``write`` and ``tell``,
    each with its data aligned to 64 bytes and a zip64 data descriptor after it; ``close`` writes the
    central directory. Byte for byte what ``zipfile.ZipFile(unseekable, "w", allowZip64=True)`` writes for
    ``open(info, "w", force_zip64=True)`` records of the same names and data (tests/test_torch_zip.py)."""

    CONCURRENT_BYTES = 1 << 20  # smaller blocks are checksummed inline when nothing is pending
    PENDING_BYTES = 16 << 20

    def __init__(self, stream: Any, origin: int | None = None):
        """``origin``: the stream position zip offsets count from (default: where the archive starts, so
        an archive written after other data, as in a DCP file, is read from its own first byte)."""
        self.stream = stream
        self.origin = stream.tell() if origin is None else origin
        self.direct = getattr(stream, "direct", False)  # an fsio.DirectFile (inside a HashingWriter)
        self.entries: list[tuple[bytes, bytes, int, int, int]] = []  # name, extra, crc, size, header offset

    def record(self, name: str, blocks: Iterable[Any], storage: bool = False) -> None:
        """One record holding the concatenation of ``blocks`` (bytes-like), written as they come. A block must
        not change once yielded (it is checksummed and hashed after the write; a tensor's fresh bytes).

        ``storage``: a tensor's bytes. In a file written with O_DIRECT its data starts on a DIRECT_ALIGN
        boundary of the file (counted from the file's start, not the archive's as torch's 64 bytes are:
        torch.load reads data at any offset), where fsio.DirectFile writes an owned block from its own memory."""
        encoded = name.encode("ascii")
        offset = self.stream.tell() - self.origin
        data_start = offset + _LOCAL.size + len(encoded) + _ZIP64_LOCAL.size + 4
        if self.direct and storage:
            pad = -(self.origin + data_start) % DIRECT_ALIGN
        else:
            pad = (-data_start) % ALIGNMENT  # torch pads in an extra field of its own, header id 'FB'
        extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad
        local_extra = extra + _ZIP64_LOCAL.pack(1, 16, 0, 0)
        self.stream.write(
            _LOCAL.pack(
                b"PK\x03\x04", 45, 0, _DATA_DESCRIPTOR, 0, 0, _DOS_DATE, 0, _FFFF, _FFFF, len(encoded), len(local_extra)
            )
            + encoded
            + local_extra
        )
        # The CRC of each large block is computed in a helper thread and may trail the writes by PENDING_BYTES
        # (one thread: the blocks are checksummed in order, each continuing the last one's CRC).
        running, size, checksumming = [0], 0, Trailing("crc32")

        def checksum(view: memoryview) -> None:
            running[0] = crc32(view, running[0])

        # A HashingWriter takes the record's CRC32 from here instead of computing it again.
        hashing = isinstance(self.stream, HashingWriter)
        owned = {"owned": True, "crc_later": True} if hashing else {}
        for block in blocks:
            view = memoryview(block).cast("B")
            if view.nbytes < self.CONCURRENT_BYTES and not checksumming:
                checksum(view)
            else:
                checksumming.submit(checksum, view, view.nbytes)
            self.stream.write(view, **owned)
            size += view.nbytes
            checksumming.wait(self.PENDING_BYTES)
        checksumming.wait()
        crc = running[0]
        if hashing:
            self.stream.add_crc(crc, size)
        self.stream.write(struct.pack("<LLQQ", 0x08074B50, crc, size, size))
        self.entries.append((encoded, extra, crc, size, offset))

    def close(self) -> None:
        start = self.stream.tell() - self.origin
        for encoded, extra, crc, size, offset in self.entries:
            zip64 = [size, size] if size > _ZIP64_LIMIT else []
            if offset > _ZIP64_LIMIT:
                zip64.append(offset)
            if zip64:
                extra = struct.pack(f"<HH{len(zip64)}Q", 1, 8 * len(zip64), *zip64) + extra
            self.stream.write(
                _CENTRAL.pack(
                    b"PK\x01\x02",
                    45,
                    _CREATE_SYSTEM,
                    45,
                    0,
                    _DATA_DESCRIPTOR,
                    0,
                    0,
                    _DOS_DATE,
                    crc,
                    _FFFF if size > _ZIP64_LIMIT else size,
                    _FFFF if size > _ZIP64_LIMIT else size,
                    len(encoded),
                    len(extra),
                    0,
                    0,
                    0,
                    0o600 << 16,
                    _FFFF if offset > _ZIP64_LIMIT else offset,
                )
                + encoded
                + extra
            )
        end = self.stream.tell() - self.origin
        count, length = len(self.entries), end - start
        if count > 0xFFFF or start > _ZIP64_LIMIT or length > _ZIP64_LIMIT:
            self.stream.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, length, start))
            self.stream.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1))
            count, length, start = min(count, 0xFFFF), min(length, _FFFF), min(start, _FFFF)
        self.stream.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, length, start, 0))


_LOCAL = struct.Struct("<4s2B4HL2L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_ZIP64_LOCAL = struct.Struct("<HHQQ")
_ZIP64_LIMIT = (1 << 31) - 1  # zipfile's threshold for zip64 fields in the central directory
_FFFF = 0xFFFFFFFF
_DATA_DESCRIPTOR = 0x08  # flag: CRC and sizes follow the data
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, time 00:00
_CREATE_SYSTEM = 0 if sys.platform == "win32" else 3  # as zipfile records it


def _lazy_tensors(obj: Any, found: list[LazyTensor]) -> None:
    if isinstance(obj, LazyTensor):
        if all(obj is not other for other in found):  # one storage however often it appears (pickle memoizes)
            found.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _lazy_tensors(value, found)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _lazy_tensors(value, found)


def save_streaming(obj: Any, f: Any, read_ahead: bool = False) -> None:
    """Write ``obj`` (LazyTensors inside dicts, lists and tuples) to the binary stream ``f`` as torch.save
    would, producing each tensor only when its record is written (``read_ahead``: the next block is produced
    in a helper thread while this one is written, see base.ahead)."""
    lazies: list[LazyTensor] = []
    _lazy_tensors(obj, lazies)
    for i, lazy in enumerate(lazies):
        numel = 1
        for size in lazy.shape:
            numel *= size
        lazy.storage = _Storage(str(i), lazy.dtype, numel)
    buffer = io.BytesIO()
    _StreamingPickler(buffer, protocol=PROTOCOL).dump(obj)
    archive = ZipStream(f)
    archive.record("archive/data.pkl", [buffer.getvalue()])
    archive.record("archive/byteorder", [sys.byteorder.encode()])
    blocks = _tensor_blocks(lazies)
    if read_ahead:
        blocks = ahead(blocks)
    for lazy in lazies:
        archive.record(f"archive/data/{lazy.storage.key}", _record_chunks(blocks), storage=True)
    archive.record("archive/version", [b"3\n"])
    archive.close()


def _tensor_blocks(lazies: list[LazyTensor]) -> Iterator[memoryview | None]:
    """Each tensor's bytes, block by block, checked against its pickled shape; None after each tensor."""
    for lazy in lazies:
        rows = 0
        for block in lazy.produce_blocks():
            if tuple(block.shape[1:]) != lazy.shape[1:] or (lazy.blocks is None and tuple(block.shape) != lazy.shape):
                raise RuntimeError(
                    f"produced a tensor of shape {tuple(block.shape)}, the file's pickle has {lazy.shape}"
                )
            rows += block.shape[0] if block.dim() else 1
            yield memoryview(block.to(lazy.dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
            del block
        if rows != (lazy.shape[0] if lazy.shape else 1):
            raise RuntimeError(f"produced {rows} rows, the file's pickle has {lazy.shape}")
        yield None


def _record_chunks(blocks: Iterator[memoryview | None]) -> Iterator[memoryview]:
    """One tensor's record: the blocks up to the next None, in CHUNK pieces."""
    for data in blocks:
        if data is None:
            return
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]
        del data

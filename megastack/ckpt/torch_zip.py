"""A torch.save-compatible file written tensor by tensor: the legacy writer's memory is one tensor, not a file.

``torch.save`` pickles the whole object, then writes every storage: it needs every tensor in memory at
once (a 1.1B-shape legacy rank file: 3.8 GB resident). The format is a documented zip (PyTorch's
serialization notes): ``archive/data.pkl`` (the pickle; a tensor is ``_rebuild_tensor_v2`` of a storage named
by a persistent id ``("storage", FloatStorage, key, "cpu", numel)``), ``archive/byteorder``, one uncompressed
record ``archive/data/<key>`` per storage, aligned to 64 bytes as torch aligns them (so ``mmap=True`` loads
them in place), and ``archive/version``. Every shape and dtype is known before any value is, so the pickle
is written first with placeholders, then each storage as its tensor is produced. Records use zip data
descriptors (CRC and sizes after the data): nothing is rewritten, so the file is hashed as written.
"""

from __future__ import annotations

import collections
import io
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megastack.ckpt.safe_load import _Pickler

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


class _Unseekable(io.RawIOBase):
    """The output as zipfile sees it: tell() but no seek(), so it writes data descriptors instead of going
    back to patch local headers (the bytes then leave in order, hashed once)."""

    def __init__(self, f: Any):
        super().__init__()
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.f.write(data)
        return len(data)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise OSError("not seekable")

    def flush(self) -> None:
        self.f.flush()


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


def save_streaming(obj: Any, f: Any) -> None:
    """Write ``obj`` (LazyTensors inside dicts, lists and tuples) to the binary stream ``f`` as torch.save
    would, producing each tensor only when its record is written."""
    lazies: list[LazyTensor] = []
    _lazy_tensors(obj, lazies)
    for i, lazy in enumerate(lazies):
        numel = 1
        for size in lazy.shape:
            numel *= size
        lazy.storage = _Storage(str(i), lazy.dtype, numel)
    buffer = io.BytesIO()
    _StreamingPickler(buffer, protocol=PROTOCOL).dump(obj)
    with zipfile.ZipFile(_Unseekable(f), "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        _record(archive, "archive/data.pkl", [buffer.getvalue()])
        _record(archive, "archive/byteorder", [sys.byteorder.encode()])
        for lazy in lazies:
            _record(archive, f"archive/data/{lazy.storage.key}", _tensor_bytes(lazy))
        _record(archive, "archive/version", [b"3\n"])


def _tensor_bytes(lazy: LazyTensor):
    rows = 0
    for block in lazy.produce_blocks():
        if tuple(block.shape[1:]) != lazy.shape[1:] or (lazy.blocks is None and tuple(block.shape) != lazy.shape):
            raise RuntimeError(f"produced a tensor of shape {tuple(block.shape)}, the file's pickle has {lazy.shape}")
        rows += block.shape[0] if block.dim() else 1
        data = memoryview(block.to(lazy.dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]
        del block, data
    if rows != (lazy.shape[0] if lazy.shape else 1):
        raise RuntimeError(f"produced {rows} rows, the file's pickle has {lazy.shape}")


def _record(archive: zipfile.ZipFile, name: str, chunks) -> None:
    """One stored record whose data starts on a 64-byte boundary (padding in the local header's extra
    field, as torch pads: header id 'FB')."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    zip64_extra = 20  # force_zip64: the local header carries a zip64 extra field
    header = archive.fp.tell() + 30 + len(name.encode()) + zip64_extra + 4
    info.extra = b"FB" + ((-header) % ALIGNMENT).to_bytes(2, "little") + b"\0" * ((-header) % ALIGNMENT)
    with archive.open(info, "w", force_zip64=True) as out:
        for chunk in chunks:
            out.write(chunk)

"""What every checkpoint format provides: a reader of logical-tensor slices and a writer of output units.

A reader answers ``read(name, pieces)``: the concatenation of the given pieces (rows/cols ranges of one
dimension, see ``layout.Piece``) of a logical tensor, opening only the files that hold them. A writer
lists its output units (a file, or a chunk of one) and fills each from a ``produce(name, pieces)``
callback, one unit at a time; the executor decides which rank writes which units.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from megastack.config import ModelConfig
from megastack.layout import Piece

# produce(logical name, pieces or None for the whole tensor) -> tensor
Produce = Callable[[str, "list[Piece] | None"], torch.Tensor]


@dataclass(frozen=True)
class Request:
    """One logical tensor (or its TP pieces) that an output unit needs."""

    name: str
    pieces: tuple[Piece, ...] | None  # None: the whole tensor


@dataclass
class Unit:
    """A piece of output work: a file (legacy, hf) or a group of chunks (torch_dist)."""

    key: str  # stable id, e.g. the file's relative path
    nbytes: int  # bytes it writes
    requests: list[Request]
    meta: dict[str, Any] = field(default_factory=dict)


class Reader(Protocol):
    format: str
    path: Any
    cfg: ModelConfig

    def read(self, name: str, pieces: list[Piece] | None = None) -> torch.Tensor: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def sources(self, name: str, pieces: list[Piece] | None = None) -> dict[str, int]:
        """Files (relative paths) and bytes a ``read`` of these pieces would touch (for --dry-run)."""
        ...


class Writer(Protocol):
    format: str

    def units(self) -> list[Unit]: ...

    def write_units(self, directory, units: list[Unit], produce: Produce, rank: int) -> Any: ...

    def finalize(self, directory, results: list[Any]) -> None: ...


_HASHER: concurrent.futures.ThreadPoolExecutor | None = None  # one hashing thread per process, made on first use


class HashingWriter:
    """A write-only file wrapper that hashes what passes through (torch.save writes via ``write``). A large
    block is hashed in a second thread while this one writes it (both drop the GIL: sha256 at ~1 GB/s here is
    the writer's largest CPU cost), and ``write`` returns only when both are done: the caller may then free or
    reuse the buffer (torch.save hands over views of memory it owns), so nothing is copied.

    Write-behind: every ``WRITE_BEHIND_BYTES`` the kernel is told to start writing back what was written
    (``posix_fadvise(DONTNEED)``: asynchronous writeback, then the pages already written back leave the page
    cache). The disk then works while the next blocks are produced, instead of the final fsync waiting for
    the whole file, and the output does not push the input out of the page cache."""

    CONCURRENT_BYTES = 1 << 20  # smaller writes are hashed inline
    WRITE_BEHIND_BYTES = 64 << 20

    def __init__(self, f):
        self.f, self.digest, self.position = f, hashlib.sha256(), 0
        self._fd, self._start = _file_descriptor(f)
        self._kicked = self._released = 0  # bytes handed to writeback; bytes whose pages were released

    def write(self, data) -> int:
        global _HASHER
        self.position += len(data)
        if len(data) < self.CONCURRENT_BYTES:
            self.digest.update(data)
            written = self.f.write(data)
        else:
            if _HASHER is None:
                _HASHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sha256")
            hashed = _HASHER.submit(self.digest.update, data)
            try:
                written = self.f.write(data)
            finally:
                hashed.result()
        if self._fd is not None and self.position - self._kicked >= self.WRITE_BEHIND_BYTES:
            self._write_behind()
        return written

    def _write_behind(self) -> None:
        """Start writeback of everything not yet handed to it; release the pages of the previous round's
        range (written back by now, or skipped by the kernel if still under writeback)."""
        self.f.flush()
        os.posix_fadvise(self._fd, self._start + self._released, self.position - self._released, os.POSIX_FADV_DONTNEED)
        self._released, self._kicked = self._kicked, self.position

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.f.flush()


def _file_descriptor(f: Any) -> tuple[int | None, int]:
    """The OS file behind ``f`` and its current offset, or (None, 0) for an in-memory stream or a platform
    without posix_fadvise (write-behind is then skipped)."""
    if not hasattr(os, "posix_fadvise"):
        return None, 0
    try:
        fd = f.fileno()
        return fd, f.tell()
    except (AttributeError, OSError, ValueError):
        return None, 0


@dataclass
class FileHash:
    """sha256 of a file a rank wrote, computed while writing so the manifest need not re-read it."""

    relative_path: str
    sha256: str

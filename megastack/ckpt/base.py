"""What every checkpoint format provides: a reader of logical-tensor slices and a writer of output units.

A reader answers ``read(name, pieces)``: the concatenation of the given pieces (rows/cols ranges of one
dimension, see ``layout.Piece``) of a logical tensor, opening only the files that hold them. A writer
lists its output units (a file, or a chunk of one) and fills each from a ``produce(name, pieces)``
callback, one unit at a time; the executor decides which rank writes which units.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from megastack.compat.crc import crc32, crc32_combine
from megastack.config import ModelConfig
from megastack.fsio import FileDigest, crc32_hex
from megastack.layout import Piece

# produce(logical name, pieces or None for the whole tensor) -> tensor
Produce = Callable[[str, "list[Piece] | None"], torch.Tensor]
T = TypeVar("T")


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
    cfg: ModelConfig

    def units(self) -> list[Unit]: ...

    def write_units(self, directory, units: list[Unit], produce: Produce, rank: int) -> Any: ...

    def finalize(self, directory, results: list[Any]) -> None: ...


class _Worker:
    """One daemon thread making calls in the order submitted. Not a ThreadPoolExecutor: its threads are
    not daemons, so a process could not leave at once while they idle (cli._exit_now)."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, call: Callable[[Any], Any], block: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, call, block))
        return future

    def _run(self) -> None:
        while True:
            future, call, block = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result, error = call(block), None
            except BaseException as exc:  # the caller's future.result() raises it
                result, error = None, exc
            del call, block  # freed before the caller hears the call is done
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


class Trailing:
    """Calls on a writer's blocks, made in order by one helper thread per ``name`` (per process), that may
    trail the writer: ``submit`` queues one, ``wait(keep_bytes)`` returns once at most ``keep_bytes`` of
    blocks are still queued (each stays alive until its call is done). The sha256 of HashingWriter and the
    CRC32 of ZipStream run this way beside the write."""

    _threads: dict[str, _Worker] = {}

    def __init__(self, name: str):
        self.name, self.pending_bytes = name, 0
        self._pending: collections.deque[tuple[concurrent.futures.Future, int]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._pending)

    def submit(self, call: Callable[[Any], Any], block: Any, nbytes: int) -> None:
        if self.name not in self._threads:
            self._threads[self.name] = _Worker(self.name)
        self._pending.append((self._threads[self.name].submit(call, block), nbytes))
        self.pending_bytes += nbytes

    def wait(self, keep_bytes: int = 0) -> None:
        """Return once at most ``keep_bytes`` are queued; with 0, once every call is done (a call may be
        queued with 0 bytes)."""
        while self._pending and (self.pending_bytes > keep_bytes or not keep_bytes):
            future, nbytes = self._pending.popleft()
            future.result()
            self.pending_bytes -= nbytes


_DONE = object()


def ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """``items``, each computed in a helper thread at most ``depth`` ahead of the one the caller holds.

    A writer's loop alternates reading (the source's bytes, often from a disk the page cache does not hold)
    and writing (copying into the output, hashing); drawn through ``ahead`` the next block is read while
    this one is written. Memory: ``depth`` more blocks alive (the thread starts an item only once the caller
    has taken the one before it). An exception of ``items`` is raised to the caller at the item it replaced;
    a caller that stops early stops the thread."""
    done: queue.Queue = queue.Queue()
    room = threading.Semaphore(depth)  # items the thread may make before the caller takes one
    stop = threading.Event()

    def fill() -> None:
        try:
            iterator = iter(items)
            while True:
                while not room.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(iterator, _DONE)
                done.put((item, None))
                if item is _DONE:
                    return
        except BaseException as exc:  # handed to the caller, who raises it
            done.put((_DONE, exc))

    thread = threading.Thread(target=fill, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = done.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            room.release()
            yield item
    finally:
        stop.set()
        thread.join()


class HashingWriter:
    """A write-only file wrapper that checksums what passes through (sha256 and CRC32, for the manifest;
    torch.save writes via ``write``). A large block is hashed in a second thread while this one writes it
    (both drop the GIL: sha256, 1.1-1.8 GB/s a thread on the machines measured, is the writer's largest CPU
    cost); nothing is copied.

    ``write(data)`` returns once ``data`` is hashed, so the caller may reuse the buffer (torch.save hands over
    views of memory it owns). ``write(data, owned=True)`` promises that nobody changes ``data`` any more (a
    freshly produced tensor's bytes): its hashing may trail the write by up to ``PENDING_BYTES`` (so the
    disk, the hash and the caller's next block proceed at once, and memory held for it stays bounded; a larger
    block is hashed before ``write`` returns). ``file_hash`` waits for every pending block.

    ``write(data, crc_later=True)``: the writer (ZipStream, whose records carry their CRC32) checksums these
    bytes itself and hands the CRC32 of all of them since its last call to ``add_crc``, which folds it into
    the file's (crc32_combine): each byte is CRC32'd once, not by both.

    Write-behind: every ``WRITE_BEHIND_BYTES`` the kernel is told to start writing back what was written
    (``posix_fadvise(DONTNEED)``: asynchronous writeback, then the pages already written back leave the page
    cache). The disk then works while the next blocks are produced, instead of the final fsync waiting for
    the whole file, and the output does not push the input out of the page cache."""

    CONCURRENT_BYTES = 1 << 20  # smaller writes are hashed inline when nothing is pending
    # Two of TorchDistWriter's chunks: while one file's thread hashes, the caller writes the rank's other file
    # (7B grow, 1 rank, cached, 16 MiB chunks: 13.5-13.8 s with 16 MiB pending, 10.8-11.1 s with 32 MiB).
    PENDING_BYTES = 32 << 20
    WRITE_BEHIND_BYTES = 64 << 20

    def __init__(self, f, lane: int = 0):
        """``lane``: which helper thread hashes (``sha256-{lane}``); files written at once hash in parallel
        when each has its own lane."""
        self.f, self.position, self._digest, self._crc32 = f, 0, hashlib.sha256(), 0
        self.direct = getattr(f, "direct", False)  # an fsio.DirectFile: owned blocks may be written in place
        self._crc_owed = 0  # bytes written with crc_later whose CRC32 add_crc has not brought yet
        self._hashing = Trailing(f"sha256-{lane}")
        self._fd, self._start = _file_descriptor(f)
        self._kicked = self._released = 0  # bytes handed to writeback; bytes whose pages were released

    def file_hash(self, relative_path: str) -> FileHash:
        """The checksums of everything written so far, for the manifest's entry of ``relative_path``."""
        if self._crc_owed:
            raise RuntimeError(f"{relative_path}: the CRC32 of the last {self._crc_owed} bytes was never added")
        self._hashing.wait()
        return FileHash(relative_path, FileDigest(self._digest.hexdigest(), crc32_hex(self._crc32)))

    def _update(self, data: Any) -> None:
        self._digest.update(data)
        self._crc32 = crc32(data, self._crc32)

    def _combine(self, crc_and_length: tuple[int, int]) -> None:
        self._crc32 = crc32_combine(self._crc32, *crc_and_length)

    def add_crc(self, crc: int, nbytes: int) -> None:
        """The CRC32 of the ``nbytes`` written with ``crc_later`` since the last call (all of them)."""
        if nbytes != self._crc_owed:
            raise RuntimeError(f"add_crc for {nbytes} bytes; {self._crc_owed} were written with crc_later")
        self._crc_owed = 0
        if self._hashing:
            self._hashing.submit(self._combine, (crc, nbytes), 0)  # in order, after the blocks before it
        else:
            self._combine((crc, nbytes))

    def write(self, data, owned: bool = False, crc_later: bool = False) -> int:
        nbytes = memoryview(data).nbytes
        update = self._digest.update if crc_later else self._update
        self._crc_owed += nbytes if crc_later else 0
        if nbytes < self.CONCURRENT_BYTES and not self._hashing:
            update(data)
        else:
            if not owned and nbytes < self.CONCURRENT_BYTES:
                data, owned = bytes(data), True  # a small copy waits its turn behind the pending blocks
            self._hashing.submit(update, data, nbytes)
        self.position += nbytes
        try:
            written = self.f.write(data, owned=True) if owned and self.direct else self.f.write(data)
        finally:
            self._hashing.wait(self.PENDING_BYTES if owned else 0)
        if self._fd is not None and self.position - self._kicked >= self.WRITE_BEHIND_BYTES:
            self._write_behind()
        return written

    def _write_behind(self) -> None:
        """Start writeback of everything not yet handed to it; release the pages of the previous round's
        range (written back by now, or skipped by the kernel if still under writeback)."""
        self.f.flush()
        try:
            os.posix_fadvise(
                self._fd, self._start + self._released, self.position - self._released, os.POSIX_FADV_DONTNEED
            )
        except OSError:  # a file system that refuses the advice: write without it
            self._fd = None
        self._released, self._kicked = self._kicked, self.position

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.f.flush()


def _file_descriptor(f: Any) -> tuple[int | None, int]:
    """The OS file behind ``f`` and its current offset, or (None, 0) for an in-memory stream or a platform
    without posix_fadvise, or a ``fsio.DirectFile`` (write-behind is then skipped)."""
    if not hasattr(os, "posix_fadvise") or getattr(f, "direct", False):  # O_DIRECT: no page cache to manage
        return None, 0
    try:
        fd = f.fileno()
        return fd, f.tell()
    except (AttributeError, OSError, ValueError):
        return None, 0


@dataclass
class FileHash:
    """The checksums of a file a rank wrote, computed while writing so the manifest need not re-read it."""

    relative_path: str
    digest: FileDigest

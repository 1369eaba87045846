"""Crash-safe file publishing: every write goes to a temporary sibling and is renamed into place.

A reader therefore sees either the old state or the complete new one, never a half-written file or
directory. ``publish_dir`` is how checkpoints appear; ``atomic_write_*`` is how tracker files change.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import json
import mmap
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from megastack.compat.crc import crc32
from megastack.errors import UserError


def read_ahead(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading ``length`` bytes at ``offset`` into the page cache now
    (``posix_fadvise(WILLNEED)``, asynchronous), so a read that comes later finds them there; a hint only:
    nothing where the platform has no posix_fadvise."""
    if hasattr(os, "posix_fadvise") and length > 0:
        with contextlib.suppress(OSError):  # advice a file system refuses changes nothing
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


class ReadAhead:
    """Read-ahead for a reader of stored spans (file, offset, length): after a span is read, the kernel is
    asked for the one stored after it in the same file, once (reads mostly walk a file in order, so its I/O
    overlaps the work on this one; repeat passes find it cached)."""

    def __init__(self, spans: Iterable[tuple[str, int, int]]):
        in_order = sorted(set(spans))
        self._following = {(a[0], a[1]): b for a, b in zip(in_order, in_order[1:]) if a[0] == b[0]}
        self._hinted: set[tuple[str, int, int]] = set()

    def after(self, fd: int, file: str, offset: int) -> None:
        """``fd``: ``file`` open for reading; ``offset``: where the span just read starts."""
        following = self._following.get((file, offset))
        if following is not None and following not in self._hinted:
            self._hinted.add(following)
            read_ahead(fd, following[1], following[2])


POPULATE_WINDOW = 16 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11 lacks the name


def prefetch_files(directory: str | os.PathLike, reads: dict[str, int]) -> None:
    """Read into the page cache, each front to back, the files a command is about to read mostly (``reads``:
    bytes it reads per file, relative to ``directory``), when they fit in three quarters of the memory available
    (the output, written with ``O_DIRECT``, takes none of the page cache: 7B torch_dist -> HF on 1 rank, source
    evicted, 11.05 GiB of ~22 GiB available: 23.1-37.8 s when it had to fit in half, 22.4-23.2 s in 3/4).

    A conversion reads its source in the output's order (an HF file holds its tensors sorted by name: layers
    0, 1, 10, 11, ...): on a source not in the page cache, scattered reads the disk serves slowly (1.1B
    torch_dist -> HF on 1 rank: 9.5-11.9 s with the source evicted, 5.2 s cached, 6.5-7.8 s reading it in
    order first). A window at a time is mapped and populated (``MADV_POPULATE_READ``: the kernel reads the
    pages, nothing is copied, the window is unmapped after); on pages already cached it costs ~0.1 s per
    11 GiB. ``posix_fadvise(WILLNEED)`` is not enough: the kernel cached 1.4 GiB of an 11 GiB request."""
    sizes = {}
    for relative, nbytes in reads.items():
        with contextlib.suppress(OSError):
            size = (Path(directory) / relative).stat().st_size
            if size and 2 * nbytes >= size:  # a file read mostly (not, e.g., weights beside Adam's state)
                sizes[Path(directory) / relative] = size
    if not sizes or sum(sizes.values()) > available_memory() * 3 // 4 or not hasattr(mmap.mmap, "madvise"):
        return
    for path, size in sorted(sizes.items()):
        try:
            with open(path, "rb") as f:
                for offset in range(0, size, POPULATE_WINDOW):
                    length = min(POPULATE_WINDOW, size - offset)
                    with mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=offset) as window:
                        populate(window)
        except (OSError, ValueError):  # a kernel without the advice, a file gone: the reads will tell
            return


def populate(window: mmap.mmap) -> None:
    """Read a mapping's pages into memory (``MADV_POPULATE_READ``) with the GIL released: ``mmap.madvise``
    holds it, so a thread populating pages from the disk stopped every other thread as long (1 GiB not
    cached: 0.48 s, the main thread stalled 0.47 s; released: 5 ms at most). OSError as madvise fails
    (EFAULT: the file is shorter than the mapping; EINVAL: a kernel before 5.14, for the caller to tell apart)."""
    madvise = _madvise()
    if madvise is None:
        window.madvise(MADV_POPULATE_READ)
        return
    address = np.frombuffer(window, dtype=np.uint8).ctypes.data  # the array (a buffer export) is dropped at once
    if madvise(address, len(window), MADV_POPULATE_READ) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


DIRECT_ALIGN = 4096  # O_DIRECT's alignment of buffer, offset and length (the largest logical block in use)
DIRECT_BLOCK = 8 << 20  # bytes per O_DIRECT write
DIRECT_BUFFERS = 4  # one being filled, up to three queued or being written
DIRECT_WRITERS = 2  # writes in flight at once, so the disk's queue does not empty between blocks
IN_PLACE_MIN_BYTES = 1 << 20  # an owned, aligned write this large goes to disk from the caller's memory
IN_PLACE_PENDING_BYTES = 32 << 20  # caller's memory held by in-place writes in flight (as the staging blocks)


class DirectFile:
    """A new file written front to back with ``O_DIRECT``: bytes are copied into aligned staging blocks and
    two helper threads write the full blocks while the caller fills the next. ``write(data, owned=True)``
    (nobody changes ``data`` any more: a freshly produced tensor's bytes) of a block that starts on
    DIRECT_ALIGN in memory and in the file is written from ``data`` itself, not copied (its last partial
    alignment unit is staged): a tensor read into a page-aligned buffer (``streaming.empty``) and written
    where torch_zip aligns its records is not copied again on its way to the disk.

    A buffered write costs the kernel a page-cache page per 4 KiB (allocated, copied into, written back,
    released) and a conversion never reads its output again, so the page cache gains nothing from holding
    it. Measured here (BENCHMARKS.md): writing 2.3 GiB alone took 3.2-4.5 s of CPU buffered against 0.4-0.6
    s direct; 7B torch_dist -> HF on 1 rank 22.3-22.6 s -> 18.2-18.6 s, 4-6 s less system CPU.

    ``flush`` writes what is staged (a partial last block is written padded and the file cut to its size, so
    the file holds exactly the bytes written so far); ``close`` flushes. Memory: DIRECT_BUFFERS blocks, and
    up to IN_PLACE_PENDING_BYTES of the callers' blocks kept alive until written.
    Open with ``open_output``, which falls back to a buffered file where ``O_DIRECT`` is refused."""

    direct = True

    def __init__(self, fd: int, name: str):
        import concurrent.futures

        import numpy as np

        self.name, self._fd, self.position = name, fd, 0
        self._np = np  # its copies drop the GIL, so the checksum threads run beside them
        self._blocks = [_aligned_block(np) for _ in range(DIRECT_BUFFERS)]
        self._writes: list[Any] = [None] * DIRECT_BUFFERS  # each block's write in flight
        self._current, self._filled, self._block_offset = 0, 0, 0  # block being filled, its bytes, its offset
        self._tail_written = True  # the partial block is on disk as it is (nothing written since a flush)
        self._in_place: collections.deque[tuple[Any, int]] = collections.deque()  # (write, bytes) in flight
        self._in_place_bytes = 0
        self._io = concurrent.futures.ThreadPoolExecutor(DIRECT_WRITERS, thread_name_prefix="direct-write")
        self.closed = False

    def write(self, data: Any, owned: bool = False) -> int:
        view = self._np.frombuffer(memoryview(data).cast("B"), dtype=self._np.uint8)
        total = len(view)
        in_place = total - total % DIRECT_ALIGN
        if (
            owned
            and in_place >= IN_PLACE_MIN_BYTES
            and self.position % DIRECT_ALIGN == 0
            and view.ctypes.data % DIRECT_ALIGN == 0
        ):
            self._write_in_place(view[:in_place])
            view = view[in_place:]
        self._tail_written = self._tail_written and not len(view)
        done = 0
        while done < len(view):
            n = min(DIRECT_BLOCK - self._filled, len(view) - done)
            self._blocks[self._current][self._filled : self._filled + n] = view[done : done + n]
            self._filled += n
            done += n
            if self._filled == DIRECT_BLOCK:
                self._submit(DIRECT_BLOCK)
                self._next_block()
        self.position += done
        return total

    def _write_in_place(self, view: Any) -> None:
        """Write ``view`` (aligned, a multiple of DIRECT_ALIGN) from where it lies, at the current position:
        the staged bytes before it are handed to the writers first, and staging goes on after it."""
        if self._filled:  # block_offset and position are aligned, so the staged bytes are whole units
            self._submit(self._filled)
            self._next_block()  # its offset is set below, after the in-place bytes
        self._in_place.append((self._io.submit(_pwrite_all, self._fd, view, self.position), len(view)))
        self._in_place_bytes += len(view)
        while self._in_place_bytes > IN_PLACE_PENDING_BYTES:
            self._wait_in_place()
        self.position += len(view)
        self._block_offset = self.position
        self._tail_written = True

    def _wait_in_place(self) -> None:
        pending, nbytes = self._in_place.popleft()
        self._in_place_bytes -= nbytes
        pending.result()  # an OSError of the write surfaces here

    def _submit(self, length: int) -> None:
        """Hand the current block's first ``length`` bytes (aligned) to the writer thread."""
        block = self._blocks[self._current][:length]
        self._writes[self._current] = self._io.submit(_pwrite_all, self._fd, block, self._block_offset)

    def _next_block(self) -> None:
        self._block_offset += DIRECT_BLOCK
        self._current = (self._current + 1) % DIRECT_BUFFERS
        self._filled = 0
        self._wait(self._current)

    def _wait(self, index: int) -> None:
        pending, self._writes[index] = self._writes[index], None
        if pending is not None:
            pending.result()  # an OSError of the write (ENOSPC, EIO) surfaces here

    def flush(self) -> None:
        """Write every staged byte; the partial last block is padded to the alignment, then cut off."""
        if self._filled and not self._tail_written:
            padded = -(-self._filled // DIRECT_ALIGN) * DIRECT_ALIGN
            self._blocks[self._current][self._filled : padded] = 0
            self._submit(padded)
            self._wait(self._current)  # the block stays current: later writes fill it further
            self._tail_written = True
        for index in range(DIRECT_BUFFERS):
            self._wait(index)
        while self._in_place:
            self._wait_in_place()
        if os.fstat(self._fd).st_size != self.position:
            os.ftruncate(self._fd, self.position)

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self._io.shutdown(wait=True)
            os.close(self._fd)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # the error is what matters; the file goes with its staging directory, unfinished
            self.closed = True
            self._io.shutdown(wait=True)
            os.close(self._fd)


def _aligned_block(np: Any) -> Any:
    """DIRECT_BLOCK bytes of fresh memory starting on a DIRECT_ALIGN boundary (a numpy uint8 array)."""
    raw = np.empty(DIRECT_BLOCK + DIRECT_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % DIRECT_ALIGN
    return raw[start : start + DIRECT_BLOCK]


def _pwrite_all(fd: int, block: Any, offset: int) -> None:
    while len(block):
        try:
            n = os.pwrite(fd, block, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not _stop_direct(fd):
                raise
            continue  # written through the page cache from now on
        if n <= 0:
            raise OSError(28, os.strerror(28))
        block, offset = block[n:], offset + n


def _stop_direct(fd: int) -> bool:
    """Turn ``O_DIRECT`` off on ``fd`` (a file system that opened with it but refuses the writes, e.g. one
    whose blocks are larger than DIRECT_ALIGN); False if it was off already."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    return True


def open_output(path: str | os.PathLike) -> Any:
    """``path`` created for writing front to back: a ``DirectFile`` where the platform and file system take
    ``O_DIRECT`` (Linux: ext4, xfs, Lustre, GPFS...), else a buffered ``open(path, "wb")`` (tmpfs, macOS).
    ``MEGASTACK_DIRECT_IO=0`` asks for the buffered file everywhere."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag and os.environ.get("MEGASTACK_DIRECT_IO", "1") != "0":
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system refuses O_DIRECT
                raise
        else:
            return DirectFile(fd, os.fspath(path))
    return open(path, "wb")


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where there is none to read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class FileDigest(NamedTuple):
    """A file's two checksums, as megastack.json lists them: sha256 (its identity, what ``megastack verify``
    checks) and zlib's CRC32 (8 hex digits: a corruption check, 0.9 s for an 11 GiB cached file here against
    sha256's 6.7 s, so checking a source costs a fraction of the CPU writing the output does)."""

    sha256: str
    crc32: str


def _read_blocks(path: str | os.PathLike) -> Iterator[Any]:
    """The file's bytes, front to back, a mapped window at a time (each valid until the next is drawn; keep
    no view of it). Mapped, not read: a read copies every byte out of the page cache, which cost more CPU
    than CRC32 itself (11 GiB cached: 1.3-2.6 s read, 0.9 s mapped). A window is populated first
    (``MADV_POPULATE_READ``), so a file cut shorter since it was opened is a UserError, not a fault."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, POPULATE_WINDOW):
            with mapped_range(f.fileno(), offset, min(POPULATE_WINDOW, size - offset), path) as window:
                yield window


@contextlib.contextmanager
def mapped_range(fd: int, offset: int, length: int, path: str | os.PathLike) -> Iterator[memoryview]:
    """Bytes [offset, offset + length) of ``path`` (open as ``fd``), mapped privately and populated: a
    reader that needs part of each row (columns of a matrix stored whole-row) copies just that part out of
    the page cache, where a read would copy every row whole. Writable (copy on write, for torch), never
    written; valid inside the block only (drop every tensor on it before leaving). A file cut shorter
    since it was opened is a UserError, not a fault."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        window = mmap.mmap(fd, offset - start + length, flags=mmap.MAP_PRIVATE, offset=start)
    except ValueError:  # Python's own size check: the file is shorter than the range
        raise _changed(path, offset, "now shorter") from None
    with window:
        try:
            populate(window)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: a kernel without the advice (before 5.14)
                raise _changed(path, offset, exc.strerror) from None
        with memoryview(window)[offset - start :] as view:
            yield view


def _changed(path: str | os.PathLike, offset: int, why: str) -> UserError:
    return UserError(
        f"{path}: could not be read at byte {offset} ({why}): the file changed while being read; re-run once "
        "nothing writes to it"
    )


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for block in _read_blocks(path):
        h.update(block)
    return h.hexdigest()


def crc32_file(path: str | os.PathLike) -> str:
    value = 0
    for block in _read_blocks(path):
        value = crc32(block, value)
    return crc32_hex(value)


def file_digest(path: str | os.PathLike) -> FileDigest:
    """Both checksums of a file, read once."""
    h, value = hashlib.sha256(), 0
    for block in _read_blocks(path):
        h.update(block)
        value = crc32(block, value)
    return FileDigest(h.hexdigest(), crc32_hex(value))


def crc32_hex(value: int) -> str:
    return f"{value:08x}"


def staging_dir(final: str | os.PathLike) -> Path:
    """The temporary sibling a directory is built in before ``publish_dir`` renames it."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


class DestinationLock:
    """``.NAME.lock`` beside a destination: who is building it (host and pid), created exclusively, so
    two commands writing one DST cannot delete each other's partial output. A lock left by a process
    that no longer runs (on this host) is cleared with a message; one from another host is reported."""

    def __init__(self, final: str | os.PathLike):
        final = Path(final)
        self.path = final.parent / f".{final.name}.lock"
        self.held = False

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return
        raise UserError(f"{self.path}: could not take the lock; another command is writing this destination")

    def _clear_if_stale(self) -> None:
        try:
            host, pid_text = self.path.read_text()[:200].split()[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            host, pid = "", -1
        if host == socket.gethostname() and pid > 0 and not _alive(pid):
            print(f"megastack: removing a stale lock {self.path} (pid {pid} is gone)", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        where = f"pid {pid} on {host}" if pid > 0 else "an unknown process"
        raise UserError(
            f"{self.path}: {where} is writing this destination; wait for it, or remove the lock if that process is gone"
        )

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_paths(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """SRC must exist, DST must not, and neither may contain the other (a symlink loop is an error too)."""
    try:
        s, d = Path(src).resolve(), Path(dst).resolve()
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{src} or {dst}: cannot resolve the path ({str(exc)[:80]}); a symlink loop?") from None
    if not s.exists():
        raise UserError(f"{src}: source checkpoint not found")
    if s == d:
        raise UserError(f"source and destination are the same directory ({src}); give a new DST")
    if d.is_relative_to(s) or s.is_relative_to(d):
        raise UserError(f"{dst}: the destination must not be inside the source (or the other way round)")
    refuse_existing(dst)


def refuse_existing(dst: str | os.PathLike, what: str = "destination") -> None:
    if os.path.lexists(dst):
        raise UserError(f"{what} {dst} already exists; choose a new directory or remove it first")


@contextlib.contextmanager
def building_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory at a temporary sibling; on success rename it to ``final``, on failure remove it.

    A stale sibling from a crashed earlier attempt is cleared first, so re-running a command completes.
    """
    final = Path(final)
    refuse_existing(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """fsync every file in ``tmp`` and rename it to ``final`` (which must not exist)."""
    tmp, final = Path(tmp), Path(final)
    for root, _, files in os.walk(tmp):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)
    os.rename(tmp, final)
    fsync_dir(final.parent)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise() -> Any:
    """libc's madvise, or None where there is none (then pages stay until the kernel reclaims them)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not sys.platform.startswith("linux") or not hasattr(libc, "madvise"):
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


def release_mapped_pages(tensor: Any) -> None:
    """Drop the resident pages behind ``tensor``, a view into a file torch.load mapped PRIVATELY (mmap=True)
    and never written: the kernel maps the file again on the next touch, so the bytes are unchanged, and a
    reader that copies slices out of a large mapped file holds only what it copied, not every page it read.
    Only for read-only file mappings: on anonymous memory this would zero the data."""
    madvise = _madvise()
    nbytes = tensor.numel() * tensor.element_size()
    if madvise is None or nbytes < _PAGE:
        return
    start = tensor.data_ptr() // _PAGE * _PAGE
    end = -(-(tensor.data_ptr() + nbytes) // _PAGE) * _PAGE
    madvise(start, end - start, _MADV_DONTNEED)

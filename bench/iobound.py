"""The I/O bound the grow, convert and mergekit benches compare against, measured in the same run.

Bound = read every input file once + write the output's byte count once with fsync, on the same filesystem,
no compute. Written three times, in turn: plainly (write, then one fsync), with write-behind (the kernel told
to start writeback every 64 MiB, as megastack's buffered writers do), and with O_DIRECT (two 16 MiB writes in
flight from one aligned block, as fsio.DirectFile writes where the file system takes it); the bound is the
fastest of them, the disk's best in that minute. Every time is kept.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import time
from pathlib import Path

BLOCK = 16 << 20
WRITE_BEHIND = 64 << 20
ALIGN = 4096  # O_DIRECT's alignment of buffer, offset and length


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def read_all(src: Path) -> None:
    for p in sorted(Path(src).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(BLOCK):
                    pass


def write_once(out_bytes: int, scratch: Path, write_behind: bool) -> None:
    block = os.urandom(BLOCK)
    with open(scratch, "wb") as f:
        written = kicked = released = 0
        while written < out_bytes:
            written += f.write(block[: min(out_bytes - written, BLOCK)])
            if write_behind and written - kicked >= WRITE_BEHIND:
                f.flush()
                os.posix_fadvise(f.fileno(), released, written - released, os.POSIX_FADV_DONTNEED)
                released, kicked = kicked, written
        f.flush()
        os.fsync(f.fileno())
    scratch.unlink()


def write_direct(out_bytes: int, scratch: Path) -> bool:
    """``out_bytes`` written with O_DIRECT, two aligned 16 MiB writes in flight, then fsync; False where the
    file system refuses O_DIRECT."""
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        return False
    block = mmap.mmap(-1, BLOCK)  # page-aligned
    block.write(os.urandom(BLOCK))
    aligned = -(-out_bytes // ALIGN) * ALIGN
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            writes = [
                pool.submit(os.pwrite, fd, memoryview(block)[: min(BLOCK, aligned - offset)], offset)
                for offset in range(0, aligned, BLOCK)
            ]
            for w in writes:
                w.result()
        os.ftruncate(fd, out_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
        scratch.unlink()
    return True


def settle(src: Path) -> None:
    """Read a freshly written source once from the disk before anything is timed. On this virtual disk the
    first read of blocks written minutes before was 1.5-3.5x slower than later reads of them (sixth and
    seventh sessions: the first run after the bench wrote a source was the slow one, every time), and the
    bound, measured after each run, never paid it; now neither does the first run."""
    evict(src)
    read_all(src)


def evict(src: Path) -> None:
    """Drop ``src``'s files from the page cache (clean pages only: they were fsync'd), so the next read comes
    from the disk, as it does for a checkpoint written hours ago or on another node."""
    os.sync()
    for p in sorted(Path(src).rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def io_bound(src: Path, out_bytes: int, scratch: Path, cold: bool = False) -> dict[str, float]:
    """Seconds to read ``src`` once and write ``out_bytes`` once with fsync: ``plain_s``, ``write_behind_s``,
    ``direct_s`` (where O_DIRECT is taken) and ``bound_s`` (the smallest). ``cold``: ``src`` evicted from the
    page cache before each."""
    times = {}
    modes = ("plain", "write_behind", "direct") if hasattr(os, "posix_fadvise") else ("plain",)
    for mode in modes:
        if cold:
            evict(src)
        start = time.monotonic()
        read_all(src)
        if mode == "direct":
            if not write_direct(out_bytes, scratch):
                continue
        else:
            write_once(out_bytes, scratch, mode == "write_behind")
        times[f"{mode}_s"] = time.monotonic() - start
    return times | {"bound_s": min(times.values())}

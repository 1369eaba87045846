"""The I/O bound the grow, convert and mergekit benches compare against, measured in the same run.

Bound = read every input file once + write the output's byte count once with fsync, on the same filesystem,
no compute. Written twice, in turn: plainly (write, then one fsync) and with write-behind (the kernel told to
start writeback every 64 MiB, as megastack's writers do); the bound is the faster of the two, the disk's best
in that minute. Both times are kept.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

BLOCK = 16 << 20
WRITE_BEHIND = 64 << 20


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
    """Seconds to read ``src`` once and write ``out_bytes`` once with fsync: ``plain_s``, ``write_behind_s``
    and ``bound_s`` (the smaller). ``cold``: ``src`` evicted from the page cache before each."""
    times = {}
    for write_behind in (False, True) if hasattr(os, "posix_fadvise") else (False,):
        if cold:
            evict(src)
        start = time.monotonic()
        read_all(src)
        write_once(out_bytes, scratch, write_behind)
        times["write_behind_s" if write_behind else "plain_s"] = time.monotonic() - start
    return times | {"bound_s": min(times.values())}

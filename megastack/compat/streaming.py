"""The process settings a streamed conversion wants, applied only while it writes.

A conversion or growth moves one 8-32 MiB block after another from reader to writer while two helper
threads checksum what was written (sha256, CRC32). Two process-wide defaults fight that, each measured
on the 7B HF -> torch_dist conversion (1 rank, 2 cores; BENCHMARKS.md):

- glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap: a page fault
  and a zeroed page per 4 KiB, an munmap when freed. That was half the command's system time (14 s of
  21.7 s wall; with freed blocks reused, 7 s of 16.5 s). Here blocks come from the heap and freed ones are
  reused (the blocks alive at once are the same; peak RSS as measured in BENCHMARKS.md).
- torch's intra-op OpenMP threads spin after each parallel copy, a core's worth that the checksum threads
  need (10% of all CPU samples in libgomp). Here torch runs one intra-op thread.

Everything goes back on leaving: glibc's thresholds to its steady state (mmap above 32 MiB, trim above
64 MiB) and the heap trimmed, torch's thread count, so a training run later in the same
process (``megastack run``) sees the usual defaults. The allocator part does nothing off glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Iterator

import torch

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
REUSE_MMAP_THRESHOLD = 1 << 30  # every block a streamed conversion holds comes from the heap
REUSE_TRIM_THRESHOLD = 2 << 30  # freed blocks stay for the next one rather than going back to the kernel
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX, where its dynamic threshold ends up
STEADY_TRIM_THRESHOLD = 64 << 20  # twice the mmap threshold, as glibc's dynamic adjustment sets it

_lock = threading.Lock()
_depth = 0
_saved: dict[str, int] = {}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def streaming_settings() -> Iterator[None]:
    """Apply the settings above for the duration of the block (nestable)."""
    global _depth
    with _lock:
        if _depth == 0:
            libc = _glibc()
            if libc is not None:
                libc.mallopt(M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD)
            _saved["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.set_num_threads(_saved.pop("threads"))
                libc = _glibc()
                if libc is not None:
                    libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
                    libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
                    libc.malloc_trim(0)

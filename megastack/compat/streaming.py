"""The process settings a streamed conversion wants, applied only while it writes.

A conversion or growth moves one block (8-250 MiB) after another from reader to writer while two helper
threads checksum what was written (sha256, CRC32). Four process-wide defaults do not suit that:

- glibc's allocator. Above its mmap threshold (dynamic, at most 32 MiB) every block is a fresh mmap,
  faulted in and zeroed page by page and unmapped when freed; below it, freed blocks stay resident in
  the heap as holes, however many. Here every block comes from the heap, so a freed block's pages serve
  the next one, and before each block is produced the heap's free pages go back to the kernel
  (``malloc_trim``) once more than ``KEEP_FREE_BYTES`` of them are resident. Memory is then the blocks
  alive at once plus about 128 MiB. Measured on 7B conversions, 1 rank (BENCHMARKS.md): keeping every
  freed block was 20-35% faster than glibc's defaults but peaked at up to 762 MB; trimming all free
  memory over 64 MiB peaked at 428-508 MB but gave most of the speed back; 128 MiB of resident free
  pages: 488-522 MB, 21-23 s where the 64 MiB rule took 27-32 s.
- fresh memory for every block. Even from the heap, a block read into memory that the trim above handed
  back is faulted in and zeroed again, and blocks of varying sizes leave the heap fragmented (a 7B
  HF -> torch_dist conversion: ~150 MiB of blocks alive in a 400-500 MiB heap, trimmed every few blocks,
  15% of its CPU samples faulting and zeroing pages). Readers take their blocks from ``empty``, which
  hands out buffers freed since (at most ``POOL_KEEP_BYTES`` of them kept idle, each used for a block at
  least half its size; they count toward ``KEEP_FREE_BYTES``); a buffer comes back when the last tensor
  on it is gone. Source cached, 1 rank: 7B HF -> torch_dist 18.1-18.6 -> 12.8-13.7 s (system CPU 10-11
  -> 3.6-4.3 s), 7B legacy growth x4 13.6-14.8 -> 10.7-11.1 s, peak RSS lower (BENCHMARKS.md).
- Python's cyclic garbage collector: each full collection walks every object alive, most of them torch's
  modules (~40 ms each, three or four per 1.1B conversion). Here what exists when writing starts is frozen
  (``gc.freeze``: kept out of collections), so a collection walks only what the conversion made.
- torch's intra-op OpenMP threads spin after each parallel copy, a core's worth of CPU the checksum
  threads need (10% of all CPU samples of a 7B conversion were in libgomp). Here torch runs one
  intra-op thread.

Everything goes back on leaving: the idle buffers, glibc's thresholds to its steady state (mmap above 32
MiB, trim above 64 MiB), the heap trimmed, the frozen objects collectable again, torch's thread count, so a
training run later in the same process (``megastack run``) sees the usual defaults. The allocator part does
nothing off glibc; ``empty`` is torch.empty outside the settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import os
import platform
import threading
import weakref
from collections.abc import Iterator

import numpy as np
import torch

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 1 << 30  # every block a streamed conversion holds comes from the heap
HEAP_TRIM_THRESHOLD = 2 << 30  # free() never trims by itself; release_idle_blocks decides
KEEP_FREE_BYTES = 128 << 20  # idle resident heap kept for the next blocks; more is handed back
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX, where its dynamic threshold ends up
STEADY_TRIM_THRESHOLD = 64 << 20  # twice the mmap threshold, as glibc's dynamic adjustment sets it
POOL_MIN_BYTES = 1 << 20  # smaller tensors come from torch.empty
POOL_KEEP_BYTES = 96 << 20  # idle buffers kept for the next blocks (three 32 MiB blocks)
POOL_ROUND_BYTES = 1 << 20  # a new buffer's size is rounded up to this, so near sizes share buffers
POOL_ALIGN = 4096  # buffers start on a page, so an O_DIRECT file writes them in place (fsio.DirectFile)

_lock = threading.Lock()
_depth = 0
_saved_threads: list[int] = []
_froze: list[bool] = []  # whether the outermost block froze the objects alive at its start
_baseline: list[int] = []  # resident memory outside malloc's blocks in use, at the first block
_idle: list[np.ndarray] = []  # buffers no tensor uses, largest last
_pool_lock = threading.RLock()  # a buffer may come back (a tensor freed) in any thread, even inside empty()
_generation = [0]  # bumped on leaving: buffers handed out before then are not taken back


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def streaming_settings() -> Iterator[None]:
    """Apply the settings above for the duration of the block (nestable)."""
    global _depth
    with _lock:
        if _depth == 0:
            libc = _glibc()
            if libc is not None:
                libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
            _saved_threads.append(torch.get_num_threads())
            torch.set_num_threads(1)
            _froze[:] = [gc.get_freeze_count() == 0]  # someone else's freeze is left as it is
            if _froze[0]:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if _froze and _froze.pop():
                    gc.unfreeze()
                torch.set_num_threads(_saved_threads.pop())
                _baseline.clear()
                with _pool_lock:
                    _idle.clear()
                    _generation[0] += 1
                libc = _glibc()
                if libc is not None:
                    libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
                    libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
                    libc.malloc_trim(0)


def _resident_anonymous() -> int:
    """Resident pages that are no file's (statm: resident minus shared), in bytes."""
    with open("/proc/self/statm") as f:
        _, resident, shared = (int(v) for v in f.read().split()[:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


def release_idle_blocks() -> None:
    """Hand the heap's free pages back to the kernel once more than KEEP_FREE_BYTES of resident memory is
    idle: neither in malloc's blocks in use nor there at the first call, or an idle buffer of ``empty``'s
    (called before each block is produced, inside ``streaming_settings``; mallinfo2 counts every arena)."""
    libc = _glibc() if _depth else None
    if libc is None:
        return
    info = libc.mallinfo2()
    with _pool_lock:
        pooled = sum(b.nbytes for b in _idle)
    idle = _resident_anonymous() - info.uordblks - info.hblkhd + pooled
    if not _baseline:
        _baseline.append(idle)
    elif idle - _baseline[0] > KEEP_FREE_BYTES:
        libc.malloc_trim(0)


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)``; inside ``streaming_settings`` a block of POOL_MIN_BYTES or more
    takes the smallest idle buffer that holds it and is at most twice its size, else a new one (starting on
    a page: POOL_ALIGN). Like torch.empty its bytes are whatever was there: the caller writes every one."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _depth or nbytes < POOL_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _pool_lock:
        generation = _generation[0]
        fits = [i for i, b in enumerate(_idle) if nbytes <= b.nbytes <= 2 * nbytes]
        buffer = _idle.pop(fits[0]) if fits else None
    if buffer is None:
        size = -(-nbytes // POOL_ROUND_BYTES) * POOL_ROUND_BYTES
        raw = np.empty(size + POOL_ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % POOL_ALIGN
        buffer = raw[start : start + size]
    view = buffer[:nbytes]  # the tensor holds this view; when it goes, so do all tensors on the buffer
    weakref.finalize(view, _give_back, buffer, generation)
    return torch.from_numpy(view).view(dtype).view(shape)


def _give_back(buffer: np.ndarray, generation: int) -> None:
    """Keep a buffer nobody uses for the next block; drop the smallest idle ones beyond POOL_KEEP_BYTES."""
    with _pool_lock:
        if generation != _generation[0]:
            return
        _idle.append(buffer)
        _idle.sort(key=lambda b: b.nbytes)
        while sum(b.nbytes for b in _idle) > POOL_KEEP_BYTES:
            _idle.pop(0)

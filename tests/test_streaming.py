"""compat/streaming.py: inside ``streaming_settings`` a large block comes from glibc's heap, free heap beyond
the allowance goes back to the kernel, torch runs one intra-op thread; afterwards glibc's and torch's usual
settings are back (checked with glibc's own counters and the process's resident memory). And fsio's
prefetch of a source into the page cache (checked with mincore)."""

import ctypes
import os
import platform
from pathlib import Path

import pytest
import torch

from megastack.compat import streaming
from megastack.compat.streaming import (
    KEEP_FREE_BYTES,
    POOL_KEEP_BYTES,
    POOL_MIN_BYTES,
    empty,
    release_idle_blocks,
    streaming_settings,
)

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator"
)


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def mallinfo() -> MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def mapped_bytes() -> int:
    """Bytes glibc holds in separate mmaps (``hblkhd``): what it does not serve from the heap."""
    return mallinfo().hblkhd


def resident_anonymous() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))


@glibc_only
def test_large_blocks_come_from_the_heap_only_inside():
    block = 40 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
    with streaming_settings():
        before = mapped_bytes()
        held = torch.empty(block, dtype=torch.uint8)
        assert mapped_bytes() - before < block  # not a fresh mmap
        del held
        assert mallinfo().fordblks >= block  # freed into the heap, for the next block to reuse
    before = mapped_bytes()
    held = torch.empty(block, dtype=torch.uint8)
    assert mapped_bytes() - before >= block  # glibc's usual behaviour is back
    del held


def test_one_intra_op_thread_and_frozen_objects_inside_and_nesting_restores():
    import gc

    threads, frozen = torch.get_num_threads(), gc.get_freeze_count()
    with streaming_settings():
        assert torch.get_num_threads() == 1 and gc.get_freeze_count() > frozen
        with streaming_settings():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1 and gc.get_freeze_count() > frozen  # the outer block still runs
    assert torch.get_num_threads() == threads and gc.get_freeze_count() == frozen


@glibc_only
def test_idle_heap_beyond_the_allowance_goes_back_to_the_kernel():
    block = 40 << 20
    with streaming_settings():
        release_idle_blocks()  # the first call notes what is resident before any block
        blocks = [torch.ones(block, dtype=torch.uint8) for _ in range(4)]  # touched: resident
        keep = torch.ones(1 << 20, dtype=torch.uint8)  # allocated after them: they are holes, not the top
        del blocks
        assert mallinfo().fordblks > KEEP_FREE_BYTES  # 160 MiB free, resident
        before = resident_anonymous()
        release_idle_blocks()
        assert before - resident_anonymous() > 3 * block  # their pages are gone
        del keep


def test_blocks_reuse_the_buffers_of_blocks_gone_only_inside():
    """``empty``: a block takes the buffer of one no tensor holds any more (whatever held its bytes: here a
    numpy view of it), if at most twice its size; while any view lives the buffer stays taken; idle buffers
    beyond POOL_KEEP_BYTES are dropped; outside the settings (or for a small block) it is torch.empty."""
    block = 8 << 20
    with streaming_settings():
        first = empty((block // 2,), torch.bfloat16)
        assert first.shape == (block // 2,) and first.dtype == torch.bfloat16
        address = first.data_ptr()
        view = first.view(torch.uint8).numpy()[10:]
        del first
        other = empty((block // 2,), torch.bfloat16)
        assert other.data_ptr() != address  # the numpy view still holds the first buffer
        del view
        again = empty((block // 4, 2), torch.bfloat16)  # same bytes, another shape
        assert again.data_ptr() == address and again.shape == (block // 4, 2)
        del again, other
        assert empty((block // 16,), torch.int32).data_ptr() != address  # under half its size: a new buffer
        held = [empty((block,), torch.uint8) for _ in range(POOL_KEEP_BYTES // block + 2)]
        assert address in {t.data_ptr() for t in held}
        del held
        assert [b.nbytes for b in streaming._idle] == [block] * (POOL_KEEP_BYTES // block)  # the rest dropped
        kept = empty((block,), torch.uint8)
    del kept  # handed out before leaving: not taken back
    assert not streaming._idle
    outside = empty((block,), torch.uint8)
    with streaming_settings():
        tiny = empty((POOL_MIN_BYTES // 2,), torch.uint8)
        del outside, tiny
        assert not streaming._idle  # neither went to the pool


def _resident_fraction(path: Path) -> float:
    """Fraction of a file's pages in the page cache (mincore on a private mapping, whose untouched pages
    are the cache's)."""
    import mmap

    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        start = ctypes.c_char.from_buffer(m)
        status = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec)
        del start
    assert status == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec) / pages


@glibc_only
def test_prefetch_reads_the_files_read_mostly_into_the_page_cache(tmp_path, monkeypatch):
    from megastack import fsio

    read, skipped, other = tmp_path / "read.bin", tmp_path / "partly.bin", tmp_path / "big.bin"
    for path in (read, skipped, other):
        path.write_bytes(os.urandom(3 << 20))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if max(_resident_fraction(p) for p in (read, skipped, other)) >= 0.5:
        pytest.skip("this file system keeps the pages cached (tmpfs?)")
    fsio.prefetch_files(tmp_path, {"read.bin": 3 << 20, "partly.bin": 1 << 20})
    assert _resident_fraction(read) == 1.0
    assert _resident_fraction(skipped) < 0.5  # a third of it is read: left to the reads
    monkeypatch.setattr(fsio, "available_memory", lambda: 7 << 19)  # 3 MiB do not fit in 3/4 of 3.5 MiB
    fsio.prefetch_files(tmp_path, {"big.bin": 3 << 20})
    assert _resident_fraction(other) < 0.5


def _direct_or_skip(path: Path):
    from megastack import fsio

    f = fsio.open_output(path)
    if not isinstance(f, fsio.DirectFile):
        f.close()
        pytest.skip("this file system refuses O_DIRECT")
    return f


def test_direct_file_holds_exactly_the_bytes_written_across_blocks_and_flushes(tmp_path, monkeypatch):
    from megastack import fsio

    monkeypatch.setattr(fsio, "DIRECT_BLOCK", 64 << 10)  # many blocks and wrap-arounds of the 3 buffers
    path = tmp_path / "out.bin"
    pieces = [os.urandom(n) for n in (10, 4096, 65536 - 4106, 1, 200_000, 4095, 70_000)]
    with _direct_or_skip(path) as f:
        for i, piece in enumerate(pieces):
            assert f.write(memoryview(piece)) == len(piece)
            if i in (0, 3, 5):  # mid-block: the padded block is written, the file cut, then written over
                f.flush()
                assert path.read_bytes() == b"".join(pieces[: i + 1])
    assert path.read_bytes() == b"".join(pieces)
    assert f.tell() == sum(map(len, pieces))


def test_direct_file_writes_owned_aligned_blocks_in_place_and_keeps_every_byte(tmp_path, monkeypatch):
    """Owned blocks that start on DIRECT_ALIGN in memory and in the file go to disk from their own memory (their
    last partial unit staged); everything else is staged. Mixed with flushes, staged blocks before and after,
    and blocks not aligned in memory or in the file, the file holds exactly the bytes written."""
    import numpy as np

    from megastack import fsio

    monkeypatch.setattr(fsio, "DIRECT_BLOCK", 64 << 10)
    monkeypatch.setattr(fsio, "IN_PLACE_MIN_BYTES", 8192)
    monkeypatch.setattr(fsio, "IN_PLACE_PENDING_BYTES", 100_000)  # some writes wait for earlier ones
    in_place = []
    real = fsio.DirectFile._write_in_place
    monkeypatch.setattr(fsio.DirectFile, "_write_in_place", lambda self, v: (in_place.append(len(v)), real(self, v)))

    def page_aligned(data: bytes, shift: int = 0) -> np.ndarray:
        raw = np.empty(len(data) + 2 * fsio.DIRECT_ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % fsio.DIRECT_ALIGN + shift
        raw[start : start + len(data)] = np.frombuffer(data, dtype=np.uint8)
        return raw[start : start + len(data)]

    rng = np.random.default_rng(0)
    # positions: 4096, 16384 (1 in place), 86384, 126976 (back on a unit), ... 131072 bytes staged by 5 and 6
    sizes = [4096, 3 * 4096, 70_000, 40_592, 200 * 4096, 5000, 126_072, 64 << 10, 9 * 4096 + 100]
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    written = []
    with _direct_or_skip(tmp_path / "out.bin") as f:
        for i, piece in enumerate(pieces):
            shift = 8 if i == 6 else 0  # not on a page in memory: staged
            assert f.write(page_aligned(piece, shift), owned=i != 2) == len(piece)  # 2: not owned, staged
            written.append(piece)
            if i in (1, 5):  # 5: the padded partial block is written, then handed over again before 7
                f.flush()
                assert (tmp_path / "out.bin").read_bytes() == b"".join(written)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
    # staged: 0 and 5 (under 8192 bytes), 2 (not owned), 3 (off a unit of the file), 6 (off a page in
    # memory), and the last 100 bytes of 8
    assert in_place == [3 * 4096, 200 * 4096, 64 << 10, 9 * 4096], in_place
    assert f.tell() == sum(sizes)


def test_direct_file_write_errors_surface_and_output_falls_back_where_refused(tmp_path, monkeypatch):
    from megastack import fsio

    f = _direct_or_skip(tmp_path / "full.bin")

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsio.os, "pwrite", disk_full)
    with pytest.raises(OSError, match="No space"):
        with f:
            f.write(bytes(3 * fsio.DIRECT_BLOCK))  # a full block goes to the writer thread, which fails
            f.flush()
    monkeypatch.undo()
    monkeypatch.setenv("MEGASTACK_DIRECT_IO", "0")
    with fsio.open_output(tmp_path / "buffered.bin") as g:
        assert not isinstance(g, fsio.DirectFile)
    monkeypatch.delenv("MEGASTACK_DIRECT_IO")
    real_open = os.open

    def refuse_direct(path, flags, *args):  # what tmpfs answers
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(fsio.os, "open", refuse_direct)
    with fsio.open_output(tmp_path / "fallback.bin") as h:
        h.write(b"abc")
        assert not isinstance(h, fsio.DirectFile)
    assert (tmp_path / "fallback.bin").read_bytes() == b"abc"


def test_direct_file_goes_on_buffered_where_the_writes_are_refused(tmp_path, monkeypatch):
    import fcntl

    from megastack import fsio

    monkeypatch.setattr(fsio, "DIRECT_BLOCK", 64 << 10)
    real_pwrite, refused = os.pwrite, []

    def refuse_direct(fd, data, offset):  # a file system whose blocks are larger than DIRECT_ALIGN
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, offset)

    data = os.urandom(300_000)
    with _direct_or_skip(tmp_path / "out.bin") as f:
        monkeypatch.setattr(fsio.os, "pwrite", refuse_direct)
        f.write(data)
    assert refused and (tmp_path / "out.bin").read_bytes() == data


def test_file_checksums_read_through_mapped_windows_match_hashlib_and_zlib(tmp_path, monkeypatch):
    """sha256 and CRC32 of files across window boundaries (and an empty one) are hashlib's and zlib's; a file
    cut shorter while it is read is a one-line UserError, not a bus error."""
    import hashlib
    import zlib

    from megastack import fsio
    from megastack.errors import UserError

    monkeypatch.setattr(fsio, "POPULATE_WINDOW", 1 << 16)
    for size in (0, 1, (1 << 16) - 1, 1 << 16, 3 * (1 << 16) + 5):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        expected = (hashlib.sha256(data).hexdigest(), f"{zlib.crc32(data):08x}")
        assert fsio.file_digest(path) == expected
        assert (fsio.sha256_file(path), fsio.crc32_file(path)) == expected
    path = tmp_path / "shrinks"
    path.write_bytes(os.urandom(4 << 16))
    blocks = fsio._read_blocks(path)
    next(blocks)
    os.truncate(path, 1 << 16)
    with pytest.raises(UserError, match="changed while being read"):
        next(blocks)


def test_mapped_range_gives_the_bytes_at_any_offset_and_refuses_a_range_past_the_end(tmp_path):
    """fsio.mapped_range: a range starting anywhere (not on a page) holds the file's bytes there, a tensor
    may be built on it and dropped inside; a range past the end (the file cut shorter since its header was
    read) is a one-line UserError, not a bus error."""
    from megastack import fsio
    from megastack.errors import UserError

    data = os.urandom(3 * mmap_granularity() + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in ((0, 10), (5, mmap_granularity()), (mmap_granularity() + 7, 2 * mmap_granularity())):
            with fsio.mapped_range(fd, offset, length, path) as raw:
                assert bytes(raw) == data[offset : offset + length]
                values = torch.frombuffer(raw, dtype=torch.uint8)
                assert values[-1].item() == data[offset + length - 1]
                del values
        with pytest.raises(UserError, match="changed while being read"):
            with fsio.mapped_range(fd, len(data) - 10, 4 * mmap_granularity(), path):
                pass
    finally:
        os.close(fd)


def test_populate_reads_a_mapping_in_and_fails_on_one_past_the_end_of_the_file(tmp_path):
    """fsio.populate (madvise through ctypes, so the GIL is released while the disk reads): a mapping of a
    file is read in; one left reaching past the file's end (cut shorter since it was mapped) is an OSError
    (EFAULT), which mapped_range turns into a UserError."""
    import errno
    import mmap

    from megastack import fsio

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 1 << 20, prot=mmap.PROT_READ) as window:
        fsio.populate(window)
        os.truncate(path, 4096)
        with pytest.raises(OSError) as raised:
            fsio.populate(window)
    assert raised.value.errno == errno.EFAULT


def mmap_granularity() -> int:
    import mmap

    return mmap.ALLOCATIONGRANULARITY


def test_trailing_calls_run_in_order_on_a_daemon_thread_and_raise_where_waited():
    """base.Trailing: calls made in the order submitted by one daemon thread per name (a process may then
    leave at once, cli._exit_now); a call's exception is raised by the wait that reaches it; each block is
    let go once its call is done."""
    import threading
    import weakref

    from megastack.ckpt.base import Trailing

    seen: list[int] = []
    trailing = Trailing("test-trailing")
    for i in range(50):
        trailing.submit(seen.append, i, 1)
    trailing.wait()
    assert seen == list(range(50)) and not trailing
    assert [t.daemon for t in threading.enumerate() if t.name == "test-trailing"] == [True]

    block = torch.zeros(4)
    gone = weakref.ref(block)
    trailing.submit(lambda b: None, block, 16)
    del block
    trailing.wait()
    assert gone() is None

    def fail(_):
        raise ValueError("bad block")

    trailing.submit(fail, None, 1)
    trailing.submit(seen.append, 99, 1)
    with pytest.raises(ValueError, match="bad block"):
        trailing.wait()
    trailing.wait()
    assert seen[-1] == 99

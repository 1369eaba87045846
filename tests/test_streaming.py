"""compat/streaming.py: inside ``streaming_settings`` a large block comes from glibc's heap and is reused,
torch runs one intra-op thread; afterwards both are back (checked with glibc's own counters)."""

import ctypes
import platform

import pytest
import torch

from megastack.compat.streaming import streaming_settings

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator"
)


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def mapped_bytes() -> int:
    """Bytes glibc holds in separate mmaps (``hblkhd``): what it does not serve from the heap."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


@glibc_only
def test_large_blocks_come_from_the_heap_only_inside():
    block = 40 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
    with streaming_settings():
        before = mapped_bytes()
        held = torch.empty(block, dtype=torch.uint8)
        assert mapped_bytes() - before < block  # not a fresh mmap
        address = held.data_ptr()
        del held
        again = torch.empty(block, dtype=torch.uint8)
        assert again.data_ptr() == address  # the freed block is reused, its pages already there
        del again
    before = mapped_bytes()
    held = torch.empty(block, dtype=torch.uint8)
    assert mapped_bytes() - before >= block  # glibc's usual behaviour is back
    del held


def test_one_intra_op_thread_inside_and_nesting_restores():
    threads = torch.get_num_threads()
    with streaming_settings():
        assert torch.get_num_threads() == 1
        with streaming_settings():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # the outer block still runs
    assert torch.get_num_threads() == threads

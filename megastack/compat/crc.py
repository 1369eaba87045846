"""CRC32 as zlib computes it, from libdeflate where the system has it.

Every record of a torch.save zip (legacy rank files, the tensors inside torch_dist's .distcp files) carries
the CRC32 of its bytes, so a writer checksums every byte it writes. zlib 1.2.13 (what Python links on
Debian 12) does it at ~4 GB/s per core here; libdeflate (carry-less multiplication) at ~14 GB/s, the same
values. On a 2-core machine whose cores also copy and sha256 every byte, that is CPU the write needs.
libdeflate is a common system library (a dependency of libtiff); without it this is zlib.crc32.
"""

from __future__ import annotations

import ctypes
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

_NATIVE_BYTES = 1 << 16  # below this the call overhead outweighs libdeflate's speed


def _libdeflate_crc32() -> Callable[..., int] | None:
    try:
        lib = ctypes.CDLL("libdeflate.so.0")  # the library's soname since its first release
        native = lib.libdeflate_crc32
    except (OSError, AttributeError):
        return None
    native.restype = ctypes.c_uint32
    native.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]  # ctypes releases the GIL
    return native


_NATIVE = _libdeflate_crc32()


def crc32(data: Any, value: int = 0) -> int:
    """``zlib.crc32(data, value)`` for any contiguous bytes-like ``data``."""
    view = memoryview(data)
    if _NATIVE is None or view.nbytes < _NATIVE_BYTES:
        return zlib.crc32(view, value)
    array = np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=np.uint8)
    return _NATIVE(value, array.ctypes.data, array.nbytes)


def backend() -> str:
    """Which implementation ``crc32`` uses ("zlib" or "libdeflate")."""
    return "zlib" if _NATIVE is None else "libdeflate"

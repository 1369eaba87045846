"""CRC32 as zlib computes it, from libdeflate where the system has it.

Every record of a torch.save zip (legacy rank files, the tensors inside torch_dist's .distcp files) carries
the CRC32 of its bytes, so a writer checksums every byte it writes. zlib 1.2.13 (what Python links on
Debian 12) does it at ~4 GB/s per core here; libdeflate (carry-less multiplication) at ~14 GB/s, the same
values. On a 2-core machine whose cores also copy and sha256 every byte, that is CPU the write needs.
libdeflate is a common system library (a dependency of libtiff); without it this is zlib.crc32.

``crc32_combine`` gives the CRC32 of two spans joined from theirs (zlib's function, which Python's zlib
module does not expose): a zip's records are checksummed once, and the file's CRC32 follows from theirs.
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


_POLY = 0xEDB88320  # CRC32's polynomial, bit-reflected as zlib uses it


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (zlib's multmodp; bit 31 is x^0)."""
    product, bit = 0, 1 << 31
    while bit:
        if a & bit:
            product ^= b
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers() -> list[int]:
    """x^(2^k) modulo the polynomial for k in 0..31."""
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multiply(table[-1], table[-1]))
    return table


_X_TO_2_TO_THE = _powers()


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32 of span1 + span2 from ``crc32(span1)``, ``crc32(span2)`` and the length of span2 in bytes
    (zlib's crc32_combine: crc1 shifted by length2 zero bytes, that is times x^(8 * length2))."""
    shift, k, n = 1 << 31, 3, length2  # x^0; 8 * length2 = length2 * 2^3
    while n:
        if n & 1:
            shift = _multiply(_X_TO_2_TO_THE[k & 31], shift)
        n >>= 1
        k += 1
    return _multiply(shift, crc1) ^ crc2


def backend() -> str:
    """Which implementation ``crc32`` uses ("zlib" or "libdeflate")."""
    return "zlib" if _NATIVE is None else "libdeflate"

"""Loading checkpoint files that may come from anyone, without running their code.

Every ``.pt`` goes through ``torch.load(weights_only=True)``. Megatron-LM's legacy files also hold an
``argparse.Namespace`` and numpy RNG states, so exactly those few globals are allowed, nothing else.
DCP's ``.metadata`` is a plain pickle that torch reads with ``pickle.load``; ``read_dcp_metadata``
reads it with an unpickler that only admits the checkpoint metadata classes.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from megastack.errors import UserError


def _numpy_globals() -> list[Any]:
    """The numpy objects a pickled ``np.random.get_state()`` or numpy scalar refers to."""
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    allowed += [_reconstruct, scalar]
    allowed += [type(np.dtype(name)) for name in ("uint32", "int64", "float64", "float32", "bool")]
    return allowed


SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def load_pt(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` plus the Namespace/numpy globals Megatron-LM pickles.

    A file whose pickle would import anything else is refused with one line, never executed.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS + _numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; the checkpoint is incomplete") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise UserError(f"{path}: refused to load: the pickle asks for something outside the allowlist "
                        f"({first[:160]}); only tensors and Megatron's args/RNG state are accepted") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path}: not a readable torch file ({str(exc).splitlines()[0][:120]}); "
                        "it may be truncated or corrupt") from None


# DCP metadata is built from the dataclasses and enums of these modules (megatron also pickles its
# cached SavePlan there); any class defined in them may be rebuilt, no function, no other module.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_DCP_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
} | {("torch", name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                 "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_ALLOWED:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def read_dcp_metadata(directory: str | os.PathLike):
    """The ``.metadata`` of a DCP (torch_dist) checkpoint, unpickled with a class allowlist."""
    path = Path(directory) / ".metadata"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {directory} is not a complete torch_dist checkpoint") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused: {exc}; the metadata may be corrupt or malicious") from None
    except Exception as exc:  # truncated or garbage pickles raise many types
        raise UserError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}); the file is "
                        "truncated or corrupt") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise UserError(f"{path}: does not hold DCP checkpoint metadata")
    return metadata

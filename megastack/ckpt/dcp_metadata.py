"""torch.distributed.checkpoint's metadata classes, mirrored, so a torch_dist checkpoint's ``.metadata`` is
read and written without importing DCP.

Importing ``torch.distributed.checkpoint`` pulls in DTensor, torch.fx and sympy: 0.56 s and 48 MiB of every
command that touches a torch_dist checkpoint (measured here), for eight small dataclasses. The mirrors have
DCP's fields and pickled state, and each names the DCP class it stands for (``origin``): megastack's pickler
writes them under those names, so torch and megatron-core load the file into their own classes; megastack's
unpickler reads a file written by them into the mirrors (tests/test_torch_dist_metadata.py checks both
directions against the real classes). Any other class of DCP's modules a file names (megatron-core pickles
its cached SavePlan into ``storage_meta``) is read as an inert stand-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

METADATA_MODULE = "torch.distributed.checkpoint.metadata"
FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"
PLANNER_MODULE = "torch.distributed.checkpoint.planner"
DCP_MODULES = (METADATA_MODULE, FILESYSTEM_MODULE, PLANNER_MODULE)
CURRENT_DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION (torch 2.6 to 2.13)


@dataclass
class ChunkStorageMetadata:
    origin: ClassVar[tuple[str, str]] = (METADATA_MODULE, "ChunkStorageMetadata")
    offsets: torch.Size
    sizes: torch.Size


class MemFormatEncoding(Enum):
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


MemFormatEncoding.origin = (METADATA_MODULE, "_MEM_FORMAT_ENCODING")  # type: ignore[attr-defined]  # not a member


_MEMORY_FORMATS = {
    MemFormatEncoding.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
    MemFormatEncoding.TORCH_CHANNELS_LAST: torch.channels_last,
    MemFormatEncoding.TORCH_PRESERVE_FORMAT: torch.preserve_format,
}


@dataclass
class TensorProperties:
    """Pickled as DCP's: a tuple, the memory format encoded as the enum above."""

    origin: ClassVar[tuple[str, str]] = (METADATA_MODULE, "TensorProperties")
    dtype: torch.dtype = field(default_factory=torch.get_default_dtype)
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False

    def __getstate__(self) -> tuple:
        encoding = next(e for e, f in _MEMORY_FORMATS.items() if f == self.memory_format)
        return (self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise ValueError("TensorProperties state is not DCP's 5-tuple")
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        if encoding not in _MEMORY_FORMATS:
            raise ValueError(f"unknown memory format encoding {encoding!r:.40}")
        self.memory_format = _MEMORY_FORMATS[encoding]


@dataclass
class TensorStorageMetadata:
    origin: ClassVar[tuple[str, str]] = (METADATA_MODULE, "TensorStorageMetadata")
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    origin: ClassVar[tuple[str, str]] = (METADATA_MODULE, "BytesStorageMetadata")


@dataclass
class StorageMeta:
    origin: ClassVar[tuple[str, str]] = (METADATA_MODULE, "StorageMeta")
    checkpoint_id: Any = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    origin: ClassVar[tuple[str, str]] = (METADATA_MODULE, "Metadata")
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass(frozen=True)
class MetadataIndex:
    """A storage entry's key: the name, and a tensor chunk's offsets (``index`` is a lookup hint that takes
    no part in equality, as in DCP)."""

    origin: ClassVar[tuple[str, str]] = (METADATA_MODULE, "MetadataIndex")
    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(hash=False, compare=False, default=None)

    def __init__(self, fqn: str, offset: Sequence[int] | None = None, index: int | None = None):
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "offset", None if offset is None else torch.Size(offset))


@dataclass
class StorageInfo:
    """Where an entry's bytes are: DCP's filesystem ``_StorageInfo``."""

    origin: ClassVar[tuple[str, str]] = (FILESYSTEM_MODULE, "_StorageInfo")
    relative_path: str
    offset: int
    length: int
    transform_descriptors: Sequence[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


MIRRORS: dict[tuple[str, str], type] = {
    cls.origin: cls
    for cls in (
        ChunkStorageMetadata,
        MemFormatEncoding,
        TensorProperties,
        TensorStorageMetadata,
        BytesStorageMetadata,
        StorageMeta,
        Metadata,
        MetadataIndex,
        StorageInfo,
    )
}


def pickled_name(cls: type) -> tuple[str, str] | None:
    """The (module, name) a mirror class is pickled as, None for any other class."""
    return cls.origin if MIRRORS.get(getattr(cls, "origin", None)) is cls else None  # type: ignore[arg-type]

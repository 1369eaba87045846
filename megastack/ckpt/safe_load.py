"""Loading checkpoint files that may come from anyone, without running their code.

Every ``.pt`` goes through ``torch.load(weights_only=True)``. Megatron-LM's files also hold its ``args``
(an ``argparse.Namespace`` with enums and ``signal.Signals`` in it), numpy/python RNG states and optimizer
config objects: exactly those classes are allowed, Megatron's own as inert stand-ins, nothing else.
DCP's ``.metadata`` is a plain pickle that torch reads with ``pickle.load``; ``read_dcp_metadata``
reads it with an unpickler that only admits the checkpoint metadata classes.
"""

from __future__ import annotations

import argparse
import copyreg
import io
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from megastack.ckpt import dcp_metadata
from megastack.errors import UserError
from megastack.untrusted import is_counts


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


class MegatronObject:
    """An inert stand-in for a Megatron-LM class found in a checkpoint's pickle (an enum member or a
    config dataclass inside ``args``, rng or optimizer state), or for the DCP planner's classes in the SavePlan
    megatron-core caches in ``.metadata``.

    Unpickling builds this instead of importing megatron: it only records the constructor arguments
    (an enum's value) or the state dict (a dataclass's fields). ``save_pt`` writes it back under the
    original class name, so Megatron-LM reads its own object again."""

    origin: tuple[str, str] = ("", "")
    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        return self.args[0] if len(self.args) == 1 else self.args

    def __reduce__(self) -> tuple:
        if self.state is not None:
            return copyreg.__newobj__, (type(self), *self.args), self.state
        return type(self), self.args

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.args, self.state) == (other.args, other.state)

    def __hash__(self) -> int:
        return hash((self.origin, self.args))

    def __repr__(self) -> str:
        inside = repr(self.value) if self.args else ("" if self.state is None else f"**{self.state!r}")
        return f"{'.'.join(self.origin)}({inside})"


# Every class Megatron-LM (core 0.12 to 0.16 and main) pickles into args, rng, optimizer or rerun state,
# as megatron.core.safe_globals lists them, by the module that defines it. Each is rebuilt as an inert
# MegatronObject; nothing is imported.
MEGATRON_CLASSES: tuple[tuple[str, str], ...] = (
    ("megatron.core.enums", "ModelType"),
    ("megatron.core.enums", "Fp8Recipe"),
    ("megatron.core.enums", "Fp4Recipe"),
    ("megatron.core.transformer.enums", "AttnBackend"),
    ("megatron.core.transformer.enums", "AttnMaskType"),
    ("megatron.core.transformer.enums", "CudaGraphScope"),
    ("megatron.core.transformer.enums", "CudaGraphModule"),
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
    ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunState"),
    ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),
    ("megatron.core.optimizer.optimizer_config", "AdamOptimizerConfig"),
    ("megatron.core.optimizer.optimizer_config", "SGDOptimizerConfig"),
)
STAND_INS: dict[str, type[MegatronObject]] = {
    f"{module}.{name}": type(name, (MegatronObject,), {"origin": (module, name), "__module__": __name__})
    for module, name in MEGATRON_CLASSES
}


def _standard_globals() -> list[Any]:
    """Harmless standard classes Megatron-LM's args and rng state hold (its own safe_globals list)."""
    import pathlib
    import signal
    import types

    return [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, signal.Signals, io.BytesIO, torch.Generator]


_registered = False


def _allow_megatron_globals() -> None:
    """Add megastack's allowlist to torch's, once per process and never removed: torch's ``safe_globals``
    context would, on exit, also remove entries another library registered (megatron-core registers the
    same Namespace and numpy classes at import), breaking its later loads."""
    global _registered
    if not _registered:
        torch.serialization.add_safe_globals(
            _standard_globals() + _numpy_globals() + [(cls, name) for name, cls in STAND_INS.items()]
        )
        _registered = True


def allow_deepspeed_globals() -> None:
    """DeepSpeed's own data classes in its ZeRO optimizer files (a loss scaler, the ZeRO stage enum,
    fp32 fragment addresses): plain attribute holders, rebuilt without running code. Added once, process
    wide, by the trainer before DeepSpeed loads anything."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


# torch warns on stderr about any pickle protocol but 2 before the weights-only unpickler refuses or reads the
# file: a second line beside the one-line error (or beside a good load: Megatron-LM writes protocol 2, other
# tools do not). Filtered once per process: warnings.catch_warnings is not thread-safe and readers use threads.
warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)


def load_pt(path: str | os.PathLike, *, mmap: bool = False, data: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` plus the few objects Megatron-LM pickles (its args
    Namespace, numpy/python rng state, its enums and optimizer config as inert stand-ins).

    A file whose pickle would import anything else is refused with one line naming the global, never
    executed. ``data``: a file-like object to read instead of ``path`` (which then only names it in errors,
    e.g. an object stored inside a DCP file)."""
    path = Path(path)
    try:
        _allow_megatron_globals()
        return torch.load(path if data is None else data, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; the checkpoint is incomplete") from None
    except pickle.UnpicklingError as exc:
        found = _REFUSED_GLOBAL.search(str(exc))
        what = (
            f"global '{found.group(1)}'"
            if found
            else f"content ({(str(exc).strip().splitlines() or ['unsafe'])[0][:120]})"
        )
        raise UserError(
            f"{path}: refused to load: its pickle asks for {what}, which is not a tensor nor one "
            "of the Megatron-LM args/rng/optimizer objects megastack admits; the file may be "
            "malicious, or written by a tool megastack does not know (nothing was executed)"
        ) from None
    except Exception as exc:  # a corrupt pickle or zip raises many types (IndexError, KeyError, EINVAL, ...)
        # OSError: torch's mmap of a truncated zip fails with EINVAL ("cannot write DST: Invalid argument" once)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"{path}: not a readable torch file ({first}); it may be truncated or corrupt") from None


class _Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """pickle's Python pickler, writing each MegatronObject stand-in and each DCP mirror (dcp_metadata) under
    the name of the class it stands for (pickle's own ``save_global`` would insist the name resolves to the
    same object, i.e. import megatron or torch.distributed.checkpoint)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        origin = None
        if isinstance(obj, type):
            is_stand_in = issubclass(obj, MegatronObject) and obj is not MegatronObject
            origin = obj.origin if is_stand_in else dcp_metadata.pickled_name(obj)
        if origin is not None:
            module, qualname = origin
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _PickleModule:
    """What ``torch.save(pickle_module=...)`` needs: a module-like object with ``Pickler``."""

    Pickler = _Pickler
    Unpickler = pickle.Unpickler
    load = staticmethod(pickle.load)
    dump = staticmethod(pickle.dump)


def save_pt(obj: Any, path_or_file: Any) -> None:
    """``torch.save`` that writes MegatronObject stand-ins back as the Megatron-LM classes they came from."""
    torch.save(obj, path_or_file, pickle_module=_PickleModule)


# DCP metadata is built from the dataclasses and enums of DCP's metadata module (read into megastack's
# mirrors, dcp_metadata) and, as megatron-core caches its SavePlan in it, those of the planner and file
# system modules (read as inert stand-ins); no function, no other class.
DCP_STAND_INS: dict[tuple[str, str], type[MegatronObject]] = {
    (module, name): type(name, (MegatronObject,), {"origin": (module, name), "__module__": __name__})
    for module, names in (
        (
            dcp_metadata.PLANNER_MODULE,
            ("WriteItemType", "LoadItemType", "BytesIOWriteData", "TensorWriteData", "WriteItem", "ReadItem")
            + ("SavePlan", "LoadPlan"),
        ),
        (dcp_metadata.FILESYSTEM_MODULE, ("_StoragePrefix",)),
    )
    for name in names
}
_DCP_ALLOWED = {
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # DCP's own save records its checkpoint_id as one (a path object: inert)
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
} | {
    ("torch", name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int8",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    )
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_ALLOWED:
            return super().find_class(module, name)
        if (module, name) in dcp_metadata.MIRRORS:
            return dcp_metadata.MIRRORS[module, name]
        if (module, name) in DCP_STAND_INS:
            return DCP_STAND_INS[module, name]
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
        raise UserError(
            f"{path}: unreadable checkpoint metadata ({type(exc).__name__}); the file is truncated or corrupt"
        ) from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UserError(f"{path}: does not hold DCP checkpoint metadata")
    problem = _metadata_problem(metadata)
    if problem:
        raise UserError(f"{path}: malformed checkpoint metadata ({problem}); the file is corrupt")
    return metadata


def write_dcp_metadata(metadata: dcp_metadata.Metadata, path: str | os.PathLike) -> None:
    """Pickle ``metadata`` (mirror classes) as DCP's own ``.metadata``: what torch.distributed.checkpoint's
    reader and megatron-core load."""
    with open(path, "wb") as f:
        _Pickler(f, protocol=pickle.DEFAULT_PROTOCOL).dump(metadata)


def _metadata_problem(metadata: Any) -> str | None:
    """What is wrong with an unpickled DCP Metadata's fields (the classes are right, their contents are
    the file's: any type may sit in any field), or None."""
    from megastack.ckpt.dcp_metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    entries, storage = getattr(metadata, "state_dict_metadata", None), getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "state_dict_metadata and storage_data must be mappings"
    for key, md in entries.items():
        if not isinstance(key, str):
            return f"key {key!r:.40} is not a string"
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata):
            return f"'{key}' has entry type {type(md).__name__}"
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        if not isinstance(dtype, torch.dtype) or not is_counts(getattr(md, "size", None)):
            return f"'{key}' has no valid dtype and size"
        if not isinstance(md.chunks, list):
            return f"'{key}' has no chunk list"
        for chunk in md.chunks:
            if not (
                is_counts(getattr(chunk, "offsets", None), len(md.size))
                and is_counts(getattr(chunk, "sizes", None), len(md.size))
            ):
                return f"a chunk of '{key}' has offsets/sizes that are not {len(md.size)} non-negative integers"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(getattr(index, "fqn", None), str):
            return "a storage entry is not indexed by name"
        if not (
            isinstance(getattr(info, "relative_path", None), str)
            and is_counts([getattr(info, "offset", None), getattr(info, "length", None)])
        ):
            return f"the storage of '{index.fqn}' has no valid file, offset and length"
    return None

"""``megastack.json``: what a checkpoint is (model config, iteration, FLOPs, history) and the sha256 and CRC32
of every file in it, so ``megastack verify`` can tell a complete checkpoint from a damaged one, and grow and
convert refuse a damaged source (by its CRC32: a quarter of the CPU of sha256, read included) before
publishing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from megastack import untrusted
from megastack.config import ModelConfig, from_dict
from megastack.errors import UserError
from megastack.fsio import (
    FileDigest,
    atomic_write_json,
    atomic_write_text,
    crc32_file,
    file_digest,
    fsync_dir,
    sha256_file,
)

MANIFEST = "megastack.json"
TRACKER = "latest_checkpointed_iteration.txt"


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    fix = "the manifest is corrupt (restore it or re-run the command that wrote the checkpoint)"
    data = untrusted.read_json(path, MAX_MANIFEST_BYTES, fix)
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object; {fix}")
    for key, kind in _FIELDS.items():
        if key in data:
            untrusted.typed(data[key], kind, path, f"field '{key}'", fix, minimum=0)
    for key, what in (("files", "sha256"), ("crc32", "CRC32")):
        if key in data and not all(isinstance(k, str) and isinstance(v, str) for k, v in data[key].items()):
            raise UserError(f"{path}: field '{key}' must map file names to {what} strings; {fix}")
    return data


MAX_MANIFEST_BYTES = 64 << 20
# Fields megastack reads from a manifest, by type: anything else is corrupt, never half-used.
_FIELDS: dict[str, type] = {
    "iteration": int,
    "consumed_tokens": int,
    "cumulative_flops": float,
    "model": dict,
    "history": list,
    "files": dict,  # file -> sha256
    "crc32": dict,  # file -> zlib's CRC32, 8 hex digits (since 2026-12; older manifests have only sha256)
    "growth": dict,
    "format": str,
    "optimizer": dict,  # Adam's step and which states the checkpoint carries (train/optimizer_state.py)
}


def build_manifest(
    *,
    fmt: str | None,
    model: ModelConfig,
    iteration: int,
    consumed_tokens: int,
    cumulative_flops: float,
    history: list[dict[str, Any]],
    event: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """megastack.json's fields, less the file hashes ``write_manifest`` adds: the one schema training,
    growth and conversion write. ``history`` is what came before; ``event`` is what made this checkpoint."""
    from megastack.config import to_dict

    return {
        "format": fmt,
        "model": to_dict(model),
        "iteration": int(iteration),
        "consumed_tokens": int(consumed_tokens),
        "cumulative_flops": float(cumulative_flops),
        "history": [*history, event],
        **extra,
    }


def lineage(manifest: dict[str, Any] | None) -> tuple[float, list[dict[str, Any]]]:
    """(cumulative FLOPs, history) a checkpoint made from this one carries on (a source without a
    manifest, e.g. a Megatron-LM checkpoint, starts the count at zero)."""
    manifest = manifest or {}
    return float(manifest.get("cumulative_flops") or 0.0), list(manifest.get("history") or [])


def checked_relative(name: str, where: Path) -> str:
    """A manifest or shard file name that stays inside its checkpoint directory."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in name:
        raise UserError(
            f"{where}: refuses file name '{name}' (absolute or outside the checkpoint); the manifest may be malicious"
        )
    return str(pure)


def file_hashes(
    directory: str | os.PathLike, known: dict[str, FileDigest] | None = None, share: tuple[int, int] = (0, 1)
) -> dict[str, FileDigest]:
    """The checksums of every file below ``directory`` except the manifest itself (``known``: already
    hashed while they were written). ``share`` = (rank, world): this rank's files only, every world-th in
    name order, so ranks hash a checkpoint together and gather the parts."""
    directory = Path(directory)
    known = known or {}
    names = []
    for root, _, files in os.walk(directory):
        names += [(Path(root) / name).relative_to(directory).as_posix() for name in files]
    rank, world = share
    mine = sorted(rel for rel in names if rel != MANIFEST)[rank::world]
    return {rel: known.get(rel) or file_digest(directory / rel) for rel in mine}


def write_manifest(
    directory: str | os.PathLike, data: dict[str, Any], known_hashes: dict[str, FileDigest] | None = None
) -> dict[str, Any]:
    """Seal a checkpoint before it is published: megastack.json with the checksums of everything else in
    ``directory`` (call it last), then the directory fsynced, so the rename that publishes it (fsio.publish_dir)
    never exposes a name whose entries are not on disk. Training, growth and conversion all seal this way."""
    digests = file_hashes(directory, known_hashes)
    data = {
        **data,
        "files": {rel: d.sha256 for rel, d in digests.items()},
        "crc32": {rel: d.crc32 for rel, d in digests.items()},
    }
    atomic_write_json(Path(directory) / MANIFEST, data)
    fsync_dir(directory)
    return data


def manifest_digest(directory: str | os.PathLike) -> str:
    """One checksum of a checkpoint: sha256 of its manifest file (which lists every file's sha256)."""
    return sha256_file(Path(directory) / MANIFEST)


def resolve_iteration_dir(path: str | os.PathLike) -> Path:
    """ROOT with a tracker -> ROOT/iter_N; an iter dir (or any checkpoint dir) -> itself."""
    path = Path(path)
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint directory") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission problem on the way
        raise UserError(
            f"{path}: cannot be opened ({type(exc).__name__}: {str(exc)[:80]}); pass a checkpoint directory"
        ) from None
    named = read_tracker(path)
    if named is None:
        return path
    target = path / ("release" if named == "release" else iter_dir_name(named))
    if not target.is_dir():
        raise UserError(
            f"{path / TRACKER}: names {'iteration ' if named != 'release' else ''}{named} but {target.name} is "
            "missing; the checkpoint is incomplete"
        )
    return target


def read_tracker(root: str | os.PathLike) -> int | str | None:
    """What ``ROOT/latest_checkpointed_iteration.txt`` names: an iteration, "release" (Megatron-LM's name
    for a converted checkpoint), or None when there is no tracker. Anything else is one line."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_bytes()[:64].decode("ascii").strip()
    except UnicodeDecodeError:
        raise UserError(f"{tracker}: not a text iteration number (binary content); the tracker is corrupt") from None
    except OSError as exc:
        raise UserError(f"{tracker}: cannot be read ({type(exc).__name__}); check its permissions") from None
    if text == "release":
        return text
    if not text.isdigit():
        raise UserError(f"{tracker}: expected an iteration number, got {text[:40]!r}")
    return int(text)


def write_tracker(root: str | os.PathLike, iteration: int) -> None:
    """Name ``iteration`` as the newest complete one, atomically (Megatron-LM's tracker file)."""
    atomic_write_text(Path(root) / TRACKER, f"{iteration}\n")


def check_hashes(
    directory: str | os.PathLike,
    manifest: dict[str, Any],
    part: tuple[int, int] = (0, 1),
    extra_files: bool = True,
    fast: bool = False,
) -> list[str]:
    """Problems of the files in ``directory`` against the manifest's checksums: missing, changed, (with
    ``extra_files``) unlisted. Every checksum listed is checked, or with ``fast`` the CRC32 alone where the
    manifest has one (a corruption check; what a source read for conversion needs). ``part`` (i, n) checks
    every n-th listed file from the i-th, so n ranks share the hashing."""
    directory = Path(directory)
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return [f"{directory / MANIFEST}: has no 'files' table"]
    crcs = manifest.get("crc32") or {}
    actual = {}
    for root, _, files in os.walk(directory):
        for name in files:
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel != MANIFEST:
                actual[rel] = Path(root) / name
    problems = []
    index, count = part
    for name, digest in sorted(listed.items())[index::count]:
        rel = checked_relative(name, directory / MANIFEST)
        if rel not in actual:
            problems.append(f"{directory / rel}: missing")
            continue
        crc = crcs.get(name)
        if crc is not None and fast:
            intact = crc32_file(actual[rel]) == crc
        elif crc is not None:
            intact = file_digest(actual[rel]) == FileDigest(digest, crc)
        else:
            intact = sha256_file(actual[rel]) == digest
        if not intact:
            problems.append(f"{directory / rel}: checksum differs from the manifest (corrupt or modified)")
    if extra_files and index == 0:
        problems += [
            f"{directory / rel}: not in the manifest (unexpected file)" for rel in sorted(set(actual) - set(listed))
        ]
    return problems


def model_from_manifest(directory: str | os.PathLike) -> ModelConfig | None:
    """The model a checkpoint's megastack.json records, checked field by field; None without one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest and isinstance(manifest.get("model"), dict):
        return from_dict(ModelConfig, manifest["model"], where=str(directory / MANIFEST), path="model")
    return None


def source_identity(directory: str | os.PathLike) -> dict[str, Any]:
    """How a grow or convert event names its source: the manifest's sha256 when the source has one (it lists
    every file's sha256); otherwise file names and sizes, so conversion never re-reads the whole source
    just to hash it."""
    directory = Path(directory)
    if read_manifest(directory) is not None:
        return {"source_sha256": manifest_digest(directory)}
    sizes = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            sizes[path.relative_to(directory).as_posix()] = path.stat().st_size
    listing = json.dumps(dict(sorted(sizes.items())), sort_keys=True)
    return {"source_files_sha256": hashlib.sha256(listing.encode()).hexdigest(), "source_bytes": sum(sizes.values())}


def optimizer_block(manifest: dict[str, Any], where: str) -> tuple[int, tuple[str, ...]]:
    """(step, states) of megastack.json's ``optimizer`` block, typed; a checkpoint without one is refused
    (init_optimizer: carried and grow --carry-optimizer need Adam's state)."""
    from megastack.layout import OPTIMIZER_STATES

    block = manifest.get("optimizer")
    fix = "start with a fresh optimizer, or from a checkpoint that carries Adam's state"
    if not isinstance(block, dict):
        raise UserError(
            f"{where} has no Adam state (megastack.json has no 'optimizer' block: saved with "
            "export_optimizer: never, not a stage's last checkpoint, or not written by megastack's trainer); "
            f"{fix}"
        )
    step = untrusted.typed(block.get("step"), int, where, "field 'optimizer.step'", fix, minimum=0)
    states = untrusted.typed(block.get("states"), list, where, "field 'optimizer.states'", fix)
    if not all(s in OPTIMIZER_STATES for s in states) or not {"exp_avg", "exp_avg_sq"} <= set(states):
        raise UserError(f"{where}: field 'optimizer.states' {str(states)[:80]} lacks Adam's moments; {fix}")
    return step, tuple(states)

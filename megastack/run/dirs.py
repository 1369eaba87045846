"""A run's folders and stage markers: where each stage writes, and whether it is done."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megastack import untrusted
from megastack.errors import UserError
from megastack.fsio import atomic_write_json

# ----------------------------------------------------------------------------- stage bookkeeping


@dataclass
class RunDirs:
    out: Path

    @property
    def markers(self) -> Path:
        return self.out / "stages"

    def stage_dir(self, stage: str) -> Path:
        """OUT/<stage>; a growth's output is a checkpoint, OUT/grown (OUT/grown1, ... in progressive runs)."""
        return self.out / (f"grown{stage[4:]}" if re.fullmatch(r"grow\d*", stage) else stage)

    def marker(self, stage: str) -> Path:
        return self.markers / f"{stage}.json"


def settings(obj: Any) -> Any:
    """What a config asks for: its dataclasses as mappings of the fields that differ from their defaults
    (recursively), so a field a later megastack adds, left at its default, changes no stage's hash and a
    finished run resumes across the upgrade."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if value != default:
                out[f.name] = settings(value)
        return out
    if isinstance(obj, dict):
        return {k: settings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [settings(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """A stage's identity: the hash of its config's settings (dataclasses anywhere inside ``obj``)."""
    return hashlib.sha256(json.dumps(settings(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(dirs: RunDirs, stage: str) -> dict[str, Any] | None:
    path = dirs.marker(stage)
    if not path.is_file():
        return None
    marker = untrusted.read_json(path, 1 << 20, f"the stage marker is corrupt; delete it to re-run stage '{stage}'")
    if not isinstance(marker, dict):
        raise UserError(f"{path}: the stage marker is corrupt; delete it to re-run stage '{stage}'")
    return marker


def check_marker(dirs: RunDirs, stage: str, digest: str) -> dict[str, Any] | None:
    """The finished stage's marker, or None if the stage still has to run; a changed config is refused."""
    marker = read_marker(dirs, stage)
    if marker is None:
        return None
    if marker.get("config_hash") != digest:
        raise UserError(
            f"stage '{stage}' in {dirs.out} finished with a different config (hash "
            f"{marker.get('config_hash')}, now {digest}); keep the recipe as it was, or use a new --out "
            f"(or delete {dirs.stage_dir(stage)} and {dirs.marker(stage)} to redo it)"
        )
    return marker


def write_marker(dirs: RunDirs, stage: str, digest: str, result: dict[str, Any]) -> None:
    from megastack.ckpt.manifest import manifest_digest, resolve_iteration_dir

    checkpoint = result.get("checkpoint")
    output_sha = manifest_digest(resolve_iteration_dir(checkpoint)) if checkpoint else None
    dirs.markers.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        dirs.marker(stage),
        {
            "stage": stage,
            "config_hash": digest,
            "output_sha256": output_sha,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **result,
        },
    )

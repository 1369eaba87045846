"""A source's files re-checked against its megastack.json while a command writes its output.

Free of torch, so the CLI can start the check before it imports torch (``early_source_check``): the import
keeps one core busy for ~0.9 s, and the check (read, CRC32) uses the other; the command's own
``SourceCheck.of`` then takes over the check already running instead of starting another.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from megastack.ckpt.manifest import MANIFEST, check_hashes, read_manifest, resolve_iteration_dir
from megastack.errors import UserError

# (resolved source directory, (rank, world)) -> a check started before the command got to it
_EARLY: dict[tuple[str, tuple[int, int]], SourceCheck] = {}


class SourceCheck:
    """The source's files against its manifest's checksums (the CRC32 where it lists one), in a thread while
    the output is written, so a corrupt source is refused before anything is published (and its checksum
    never recorded as if intact). ``part`` (rank, world): each rank checks its share of the files."""

    def __init__(self, source: Path | None, part: tuple[int, int]):
        self.source, self.part = source, part
        self.manifest = read_manifest(source) if source is not None else None
        self.problems: list[str] = []
        self.thread: threading.Thread | None = None

    @classmethod
    def of(cls, source: Path | None, part: tuple[int, int]) -> SourceCheck:
        """The check of ``source`` started early for this ``part`` (running already), else a new one."""
        early = _EARLY.pop(_key(source, part), None) if source is not None else None
        return early if early is not None else cls(source, part)

    def start(self) -> None:
        """Start checking, once (a check taken over from ``early_source_check`` is running already)."""
        if self.manifest is None or self.thread is not None:
            return

        def run() -> None:
            try:
                self.problems = check_hashes(self.source, self.manifest, self.part, extra_files=False, fast=True)
            except UserError as exc:
                self.problems = [str(exc)]
            except OSError as exc:  # e.g. no permission to read
                self.problems = [f"{exc.filename or self.source}: cannot be read ({exc.strerror or exc})"]

        self.thread = threading.Thread(target=run, name="source-check", daemon=True)
        self.thread.start()

    def result(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.problems:
            raise UserError(
                f"{self.problems[0]}; the source does not match its {MANIFEST}: restore it or "
                "re-run the command that wrote it (nothing was published)"
            )


@contextlib.contextmanager
def early_source_check(src: str | os.PathLike | None, part: tuple[int, int]) -> Iterator[None]:
    """Start checking checkpoint ``src`` now, for the command run inside the block to take over; one not
    taken over is forgotten when the block ends (a later command re-reads the files). Anything wrong with
    ``src`` (missing, no manifest, a bad one) is left for the command to report."""
    key = None
    if src is not None:
        with contextlib.suppress(UserError, OSError, ValueError):
            directory = resolve_iteration_dir(src)
            check = SourceCheck(directory, part)
            if check.manifest is not None:
                check.start()
                key = _key(directory, part)
                _EARLY[key] = check
    try:
        yield
    finally:
        if key is not None:
            _EARLY.pop(key, None)


def _key(source: Path, part: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    return os.path.realpath(source), part

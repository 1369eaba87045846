"""Shared test helpers: running the CLI, launching N-rank workers with hard timeouts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


def run_cli(
    *args: str, cwd: str | os.PathLike | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m megastack ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "megastack", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def in_process(*argv: str) -> subprocess.CompletedProcess:
    """``megastack ARGV`` in this process (saves a torch import per call), as a CompletedProcess."""
    from megastack.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, exactly one line on stderr, no traceback, naming what is wrong."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_workers(script: str, nprocs: int, *args: str, timeout: float = 600) -> list[dict]:
    """Run tests/workers/SCRIPT on ``nprocs`` local ranks; return the parsed 'RESULT {json}' lines."""
    from megastack.dist import launch_local, python_argv

    result = launch_local(python_argv(str(WORKERS / script), *args), nprocs, timeout=timeout, cwd=REPO)
    if not result.ok:
        pytest.fail(f"{script} failed:\n{result.describe()}")
    return [
        json.loads(line[len("RESULT ") :])
        for out in result.outputs
        for line in out.splitlines()
        if line.startswith("RESULT ")
    ]

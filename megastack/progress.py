"""Progress for long work: a tqdm bar on a terminal, a few plain lines in CI and logs."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(n)`` as work is done (``total`` in the same unit); a bar on a TTY (stderr), otherwise a line
    every few seconds (stdout)."""

    def __init__(self, total: int, label: str, enabled: bool = True, unit: str = "item"):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.enabled = enabled
        self.start = time.monotonic()
        self._bar = None
        self._last_line = self.start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, unit_scale=unit != "item", leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_line >= 5.0 or self.done == self.total:
            self._last_line = time.monotonic()
            elapsed = self._last_line - self.start
            # stdout, with the command's other output: stderr holds only the one-line error if one comes
            print(f"{self.label}: {100 * self.done // self.total}% ({elapsed:.1f}s)", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

"""Peak memory of this process, for benchmarks and the bounded-memory tests."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """High-water resident set size of this process (Linux VmHWM).

    Not ``ru_maxrss``: that one is inherited across fork+exec, so a child started by a big parent
    reports the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

"""The build's peak memory, for the build summary: this process's peak resident set, measured afresh for
each build where Linux allows it (``/proc/self/clear_refs``), and each compile worker's own.

May not: change anything: it measures."""
from __future__ import annotations

import resource


def reset_peak_rss() -> None:
    """Start measuring this process's peak resident memory afresh (Linux; elsewhere the peak stays the
    process's lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """This process's peak resident memory in bytes since ``reset_peak_rss`` (VmHWM), else since it began."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

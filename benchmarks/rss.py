"""The process's memory as the benchmarks measure it (Linux): resident set now, and its peak since a reset.

`reset_peak_rss()` starts the kernel's high-water mark (VmHWM) again from the current RSS
(`/proc/self/clear_refs` 5, Linux >= 4.0), so a later `peak_rss()` is what the code between them needed, not
set-up's. Where the kernel refuses the reset, the peak counts from the process's start.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Start the peak RSS again from the current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS since the last `reset_peak_rss` (else since the process started), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

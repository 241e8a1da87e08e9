"""What the benchmarks record about the machine they ran on (imported by the bench scripts beside it)."""

from __future__ import annotations

import os


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo and the core count, e.g. "AMD EPYC, 2 cores"."""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    return "unknown"

"""`server.workers`: how many processes serve the one listening socket."""

from __future__ import annotations

import os

from ccproxy.config._reader import ConfigError, Section

MAX_WORKERS = 256
AUTO = "auto"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and systemd's
    CPUAffinity= narrow), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_workers(s: Section) -> int:
    """An integer from 1 to MAX_WORKERS, or `auto` for the usable CPUs; 1 by default (one process)."""
    value = s.raw("workers", 1)
    if isinstance(value, str) and value.strip() == AUTO:
        return min(usable_cpus(), MAX_WORKERS)
    if isinstance(value, str) and not value.strip().isdigit():
        raise ConfigError(s.at("workers"), f"expected an integer or {AUTO!r}, got {value!r}")
    count: int = s.integer("workers", 1, min=1, max=MAX_WORKERS)
    return count

"""Processes as /proc shows them (Linux): whether one still runs, waiting for some to exit, a process's children."""

from __future__ import annotations

import time
from pathlib import Path


def state(pid: int) -> str:
    """The process state letter of ``pid`` (R, S, D, Z...), "gone" when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its parent's wait() counts as gone)."""
    return state(pid) not in ("Z", "X", "gone")


def wait_gone(pids: list[int], limit_s: float = 30.0) -> list[int]:
    """The pids still alive after waiting up to ``limit_s`` for them to exit (a liveness wait, not a timing)."""
    deadline = time.monotonic() + limit_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def children(pid: int) -> list[int]:
    """The running processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if parent == pid and alive(int(stat.parent.name)):
            found.append(int(stat.parent.name))
    return found

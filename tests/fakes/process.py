"""The fakes as a process of their own (``python -m tests.fakes``), for benchmarks and tests that need them outside
the calling interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_fakes_process(*args: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start ``python -m tests.fakes --port 0 ARGS``; return the process once it printed READY, and the ``NAME=value``
    lines it printed before (the harvester's settings pointing at it, and FAKES_STATS_URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes", "--port", "0", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    env: dict[str, str] = {}
    for line in proc.stdout:
        line = line.strip()
        if line == "READY":
            return proc, env
        name, _, value = line.partition("=")
        env[name] = value
    proc.wait(10)
    raise RuntimeError(f"the fakes did not start (exit code {proc.returncode})")

"""Runs of the command line in a process of their own, killed for real once they have finished some rounds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def medpfl(*args: str) -> subprocess.Popen:
    """`medpfl ARGS` on this checkout's code, one thread, its output captured."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medpfl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_after_lines(process: subprocess.Popen, file: Path, lines: int, timeout: float = 300) -> None:
    """SIGKILL `process` as soon as `file` holds `lines` lines; fails if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if file.exists() and len(file.read_text().splitlines()) >= lines:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"

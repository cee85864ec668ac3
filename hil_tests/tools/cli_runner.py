"""Run the `fogmesh` command line as a user would: a separate process, exit code and output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fogmesh(
    *args: str, cwd: Path | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd or ROOT,
    )

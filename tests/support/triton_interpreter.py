"""Running Triton kernels on the CPU: Triton picks its interpreter (numpy) when it is imported with
TRITON_INTERPRET=1, so a case runs as a script in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

from . import REPO_ROOT


def run_interpreted(script: str, timeout: float = 600) -> None:
    """Run `script` under Triton's interpreter from the repository root; it must print "ok" last. Fails the calling
    test with the script's output otherwise."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert completed.returncode == 0 and completed.stdout.endswith("ok\n"), completed.stdout + completed.stderr

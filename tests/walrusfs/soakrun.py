"""Running a soak script (chaos.py, powerloss.py) from a test, as a user runs it.

The script works in the test's own directory, so whatever a killed run leaves mounted
there is detached by the leftovers plugin. A run that is interrupted (Ctrl-C, a timeout)
first gets SIGTERM and a minute to clean up after itself (unmount, stop its servers,
restore the sysctls it changed) before SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def run_soak(script: str, *args: str, workdir: Path, timeout: float = 600) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of scripts/<script> run with --dir `workdir`."""
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args, "--dir", str(workdir)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return proc.returncode, out, err

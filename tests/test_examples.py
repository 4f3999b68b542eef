"""Every example in examples/ runs as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT, worker_env


def test_quickstart_estimates_pi_and_prints_the_address() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--tasks", "8"],
                          capture_output=True, text=True, timeout=120, env=worker_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"foreman listening at ws://127\.0\.0\.1:\d+", done.stdout)
    estimate = float(re.search(r"pi ~= ([\d.]+)", done.stdout).group(1))
    assert abs(estimate - 3.14159) < 0.01

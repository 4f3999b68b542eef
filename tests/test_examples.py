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


def test_fleet_dashboard_example_reports_its_job() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "fleet_dashboard.py"), "--tasks", "20000"],
                          capture_output=True, text=True, timeout=120, env=worker_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", done.stdout)
    assert "longest Collatz chain below 20,001: 17,647 (278 steps)" in done.stdout
    assert re.search(r"job 1 \(collatz_steps\): done, 20,000 tasks", done.stdout)
    assert "20000/20000" in done.stderr  # the tqdm progress bar

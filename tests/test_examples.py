"""Every example in examples/ runs as a user would run it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, worker_env


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run examples/NAME as a user would; it must exit 0."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=120, env=worker_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done


def test_quickstart_estimates_pi_and_prints_the_address() -> None:
    done = run_example("quickstart.py", "--tasks", "8")
    assert re.search(r"foreman listening at ws://127\.0\.0\.1:\d+", done.stdout)
    assert re.search(r"dashboard at http://127\.0\.0\.1:\d+/", done.stdout)
    estimate = float(re.search(r"pi ~= ([\d.]+)", done.stdout).group(1))
    assert abs(estimate - 3.14159) < 0.01


def test_fleet_dashboard_example_reports_its_job() -> None:
    done = run_example("fleet_dashboard.py", "--tasks", "20000")
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", done.stdout)
    assert "longest Collatz chain below 20,001: 17,647 (278 steps)" in done.stdout
    assert re.search(r"job 1 \(collatz_steps\): done, 20,000 tasks", done.stdout)
    assert "20000/20000" in done.stderr  # the tqdm progress bar


def test_worker_dashboard_example_prints_its_address_and_stats() -> None:
    done = run_example("worker_dashboard.py", "--below", "50000")
    assert re.search(r"worker dashboard at http://127\.0\.0\.1:\d+/", done.stdout)
    assert "5,133 primes below 50,000" in done.stdout
    stats = json.loads(done.stdout.split("GET /stats -> ", 1)[1])
    assert stats["tasks_completed"] == 50_000 and stats["tasks_failed"] == 0


def test_job_options_example() -> None:
    done = run_example("job_options.py")
    assert "fetched 20 pages" in done.stdout
    assert "failures: [(1, 'builtins.ValueError'" in done.stdout
    assert "with task_timeout=1: [0.1, 'TaskTimeoutError']" in done.stdout
    assert "urgent checkpointed sum: 333332833333500000" in done.stdout


def test_secure_fleet_example() -> None:
    done = run_example("secure_fleet.py")
    assert re.search(r"foreman at wss://127\.0\.0\.1:\d+, dashboard at https://", done.stdout)
    assert "worker volunteer-1 verified the foreman and joined" in done.stdout
    assert "cubes: [0, 1, 8, 27, 64, 125, 216, 343, 512, 729]" in done.stdout


def test_foreman_service_example() -> None:
    done = run_example("foreman_service.py")
    assert "map: [0, 1, 7, 2, 5, 8, 16, 3, 19, 6]" in done.stdout
    job_id = re.search(r"submitted detached job (\d+)", done.stdout).group(1)
    assert f"job {job_id}: done, 10,000 results, longest chain 261 steps" in done.stdout
    assert "asyncio: longest Collatz chain below 2,001 takes 181 steps; 27 takes 111" in done.stdout


def test_volunteer_prefs_example_pauses_while_the_owner_types_and_resumes_from_the_checkpoint() -> None:
    done = run_example("volunteer_prefs.py")
    assert "worker paused: the keyboard or mouse was used 1s ago (resume after 120s idle)" in done.stdout
    assert re.search(r"worker resumed: (idle|busy)", done.stdout)
    first = int(re.search(r"the task counted to 200, resuming from step (\d+) rather than from 0", done.stdout)[1])
    assert 0 < first < 200


def test_trusted_results_example() -> None:
    done = run_example("trusted_results.py")
    assert "200 results with redundancy=2, all correct: True" in done.stdout
    assert "harmonic numbers agreed within 1e-12: H(50) ~= 4.499205" in done.stdout
    assert "spot-checked job: 100 results, 27 takes 111 steps" in done.stdout
    assert re.search(r"^mallory: quarantined \(0 agreed, \d+ disagreed\)$", done.stdout, re.MULTILINE)
    assert re.search(r"^alice: ok \(\d+ agreed, 0 disagreed\)$", done.stdout, re.MULTILINE)
    assert re.search(r"^local: trusted \(\d+ agreed, 0 disagreed\)$", done.stdout, re.MULTILINE)
    board = dict(re.findall(r"^  (\w+): (\d+) / \d+$", done.stdout, re.MULTILINE))
    assert "mallory" not in board and int(board["alice"]) > 0 and int(board["local"]) > 0

"""Settings of the chaos suite: how long the chaos lasts, its seed, and the job's size.

A plain ``pytest`` run (CI) gets the short form: 20,000 tasks and at most 25 s of faults, seed 6. Longer runs:

    CROWDCOMPUTE_CHAOS_SECONDS=300 CROWDCOMPUTE_CHAOS_SEED=7 .venv/bin/python -m pytest tests/chaos -s

or, when ``tests/chaos`` (or a file in it) is named on the command line, the same by flags:

    .venv/bin/python -m pytest tests/chaos -s --chaos-seconds 300 --chaos-seed 7 [--chaos-tasks 200000]

The flags exist only then: pytest registers command-line options from the conftest files it loads before
collecting, i.e. those of the directories named on the command line and their parents, and a bare ``pytest``
names ``tests`` (setup.cfg's testpaths), whose ``chaos`` subdirectory is found later. The environment variables
(``CROWDCOMPUTE_CHAOS_SECONDS``, ``CROWDCOMPUTE_CHAOS_SEED``, ``CROWDCOMPUTE_CHAOS_TASKS``) work always; a flag
wins over its variable. The job has ``20,000 x seconds / 25`` tasks (at least 20,000) unless given, so that it
lasts about as long as its chaos.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

CHAOS_DIR = Path(__file__).resolve().parent
DEFAULT_SECONDS = 25.0
DEFAULT_SEED = 6
BASE_TASKS = 20_000


@dataclass(frozen=True)
class ChaosSettings:
    seconds: float  # faults are injected for at most this long (and stop once 90% of the job is done)
    seed: int
    tasks: int

    @property
    def job_timeout(self) -> float:
        """The job must finish within this (imap's timeout): generous, but a hang fails instead of hanging."""
        return 150.0 + 4.0 * self.seconds + self.tasks / 500

    @property
    def test_timeout(self) -> float:
        return self.job_timeout + 120.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "CrowdCompute chaos suite (tests/chaos)")
    group.addoption("--chaos-seconds", type=float, default=None,
                    help=f"seconds of fault injection (env CROWDCOMPUTE_CHAOS_SECONDS; default {DEFAULT_SECONDS:g})")
    group.addoption("--chaos-seed", type=int, default=None,
                    help=f"seed of the fault schedule (env CROWDCOMPUTE_CHAOS_SEED; default {DEFAULT_SEED})")
    group.addoption("--chaos-tasks", type=int, default=None,
                    help="tasks in the chaos job (env CROWDCOMPUTE_CHAOS_TASKS; default 20000 x seconds / 25)")


def settings_from(config: pytest.Config) -> ChaosSettings:
    def pick(option: str, env: str) -> str | None:
        value = config.getoption(option, default=None)
        return str(value) if value is not None else os.environ.get(env) or None

    seconds = float(pick("chaos_seconds", "CROWDCOMPUTE_CHAOS_SECONDS") or DEFAULT_SECONDS)
    seed = int(pick("chaos_seed", "CROWDCOMPUTE_CHAOS_SEED") or DEFAULT_SEED)
    tasks_given = pick("chaos_tasks", "CROWDCOMPUTE_CHAOS_TASKS")
    tasks = int(tasks_given) if tasks_given else max(BASE_TASKS, round(BASE_TASKS * seconds / DEFAULT_SECONDS))
    if seconds < 0 or tasks < 1:
        raise pytest.UsageError("chaos seconds must be >= 0 and chaos tasks >= 1")
    return ChaosSettings(seconds, seed, tasks)


@pytest.fixture
def chaos_settings(request: pytest.FixtureRequest) -> ChaosSettings:
    return settings_from(request.config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long chaos test's pytest-timeout follows its settings (setup.cfg's 300 s is for the short form)."""
    settings = settings_from(config)
    for item in items:
        if item.get_closest_marker("chaos_job") and CHAOS_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.timeout(settings.test_timeout))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos_job: the long chaos job; its timeout follows --chaos-seconds")

"""The joblib backend (foreman/joblib_backend.py) and a foreman's notebook summary: real workers on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

joblib = pytest.importorskip("joblib")
sklearn = pytest.importorskip("sklearn")

from sklearn.datasets import make_classification  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

import foreman.joblib_backend  # noqa: E402,F401 - registers "crowdcompute"
from foreman import Foreman  # noqa: E402
from tasks import boom, square, whoami  # noqa: E402

SHORT = 60


@pytest.fixture(scope="module")
def fm() -> Iterator[Foreman]:
    with Foreman(port=0, local_workers=2, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        fm.wait_for_workers(2, timeout=SHORT)
        yield fm


def test_parallel_runs_on_the_fleet(fm: Foreman) -> None:
    with joblib.parallel_config(backend="crowdcompute", foreman=fm):
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(whoami)(i) for i in range(40))
    assert [x for x, _ in results] == list(range(40))
    assert {pid for _, pid in results} <= _local_workers(), "some calls ran outside the fleet's local workers"


def _local_workers() -> set[int]:
    """Pids of this process's children that run ``python -m worker``."""
    pids = set()
    for child in psutil.Process().children():
        try:
            if child.cmdline()[1:3] == ["-m", "worker"]:
                pids.add(child.pid)
        except psutil.Error:  # ended meanwhile
            pass
    return pids


def test_n_jobs_minus_one_is_every_slot_of_the_fleet(fm: Foreman) -> None:
    with joblib.parallel_config(backend="crowdcompute", foreman=fm):
        assert joblib.effective_n_jobs(-1) == fm.slots == 2
        assert joblib.effective_n_jobs(3) == 3


def test_a_failing_call_raises_its_exception(fm: Foreman) -> None:
    from tasks import CustomError

    with joblib.parallel_config(backend="crowdcompute", foreman=fm), pytest.raises(CustomError, match="bad input"):
        joblib.Parallel(n_jobs=-1)(joblib.delayed(boom)(i) for i in range(6))
    with joblib.parallel_config(backend="crowdcompute", foreman=fm):  # the backend is usable after
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("batching", ["joblib", "none"])
def test_grid_search_gives_the_serial_result(fm: Foreman, batching: str) -> None:
    X, y = make_classification(n_samples=120, n_features=6, random_state=0)
    grid = {"max_depth": [1, 2, 3, None], "min_samples_leaf": [1, 5]}
    serial = GridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=3, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="crowdcompute", foreman=fm, batching=batching):
        fleet = GridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=3, n_jobs=-1).fit(X, y)
    assert fleet.best_params_ == serial.best_params_
    assert list(fleet.cv_results_["mean_test_score"]) == list(serial.cv_results_["mean_test_score"])


def test_unknown_batching_is_refused() -> None:
    with pytest.raises(ValueError, match="batching must be"):
        foreman.joblib_backend.CrowdComputeBackend(batching="sometimes")


# -- notebooks -----------------------------------------------------------------------------------------------------

def test_notebook_summary_shows_workers_slots_and_dashboard(fm: Foreman) -> None:
    page = fm._repr_html_()
    assert "<table>" in page
    assert "<th style=\"text-align:left\">Workers</th><td style=\"text-align:left\">2</td>" in page
    assert "<th style=\"text-align:left\">Task slots</th><td style=\"text-align:left\">2</td>" in page
    assert fm.dashboard_url and f'href="{fm.dashboard_url}"' in page
    assert fm.address.split("//")[1] in page


def test_notebook_summary_of_a_closed_foreman() -> None:
    fm = Foreman(port=0, dashboard=False)
    fm.close()
    page = fm._repr_html_()
    assert "closed" in page and "Workers" not in page


def test_notebook_summary_escapes_what_it_shows() -> None:
    from foreman.notebook import foreman_summary_html

    page = foreman_summary_html("ws://<b>x</b>", 1, 1, 'http://h/"><script>alert(1)</script>')
    assert "<script>" not in page and "<b>x</b>" not in page

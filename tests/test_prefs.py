"""The owner's rules, judged on injected readings with a fake clock; their configuration by file and flags."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from worker.__main__ import _prefs, build_parser, main
from worker.config import WorkerConfig
from worker.policy import Policy, Readings, Window
from worker.prefs import Prefs
from worker.throttle import duty_for

NOON = datetime.time(12, 0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(prefs: Prefs, steps: list[tuple[float, dict]]) -> list[tuple[bool, str]]:
    """Feed ``(seconds later, readings)`` steps to a policy; returns (paused, reason) after each."""
    clock = FakeClock()
    policy = prefs.policy(clock)
    out = []
    for later, fields in steps:
        clock.now += later
        policy.update(Readings(**{"local_time": NOON, **fields}))
        out.append((policy.paused, policy.reason))
    return out


def paused(results: list[tuple[bool, str]]) -> list[bool]:
    return [p for p, _ in results]


def test_owner_cpu_pauses_after_the_dwell_and_resumes_only_below_its_lower_threshold() -> None:
    prefs = Prefs(max_owner_cpu=50, resume_owner_cpu=20, pause_after=5, resume_after=30)
    results = run(prefs, [
        (0, {"owner_cpu": 90}),  # objects, but not yet for 5 s
        (3, {"owner_cpu": 10}),  # the spike is over: the dwell starts again
        (3, {"owner_cpu": 90}),
        (4, {"owner_cpu": 90}),
        (1, {"owner_cpu": 90}),  # 5 s of objection: paused
        (1, {"owner_cpu": 30}),  # below 50 but not below 20: still objects
        (60, {"owner_cpu": 30}),
        (1, {"owner_cpu": 19}),  # below 20: no objection, the resume dwell starts
        (29, {"owner_cpu": 19}),
        (1, {"owner_cpu": 5}),  # 30 s without objection: resumed
    ])
    assert paused(results) == [False, False, False, False, True, True, True, True, True, False]
    assert results[4][1] == "the owner's CPU use is 90% (pause above 50%, resume below 20%)"
    assert results[6][1].startswith("the owner's CPU use is 30%")  # the reason follows the figures


def test_owner_cpu_at_exactly_the_threshold_does_not_pause() -> None:
    assert paused(run(Prefs(max_owner_cpu=50, pause_after=0), [(0, {"owner_cpu": 50}), (1, {"owner_cpu": 51})])) \
        == [False, True]


def test_keyboard_use_pauses_and_the_worker_resumes_after_the_idle_minutes() -> None:
    prefs = Prefs(min_user_idle=60, resume_user_idle=300, pause_after=0, resume_after=0)
    results = run(prefs, [
        (0, {"idle_seconds": 600}),
        (1, {"idle_seconds": 2}),  # the owner typed
        (100, {"idle_seconds": 100}),  # idle 100 s: past the pause threshold, short of the resume one
        (200, {"idle_seconds": 300}),
    ])
    assert paused(results) == [False, True, True, False]
    assert results[1][1] == "the keyboard or mouse was used 2s ago (resume after 300s idle)"


def test_unknown_readings_skip_their_rule() -> None:
    prefs = Prefs(max_owner_cpu=50, min_user_idle=60, min_battery=20, pause_on_battery=True, max_cpu_temp=80,
                  pause_after=0)
    assert paused(run(prefs, [(0, {}), (10, {})])) == [False, False]


def test_on_battery_pauses_until_on_mains() -> None:
    prefs = Prefs(pause_on_battery=True, pause_after=0, resume_after=10)
    results = run(prefs, [(0, {"on_battery": False}), (1, {"on_battery": True}), (1, {"on_battery": False}),
                          (10, {"on_battery": False})])
    assert results == [(False, ""), (True, "running on battery"), (True, "running on battery"), (False, "")]


def test_low_battery_pauses_on_battery_and_resumes_five_points_higher_or_on_mains() -> None:
    prefs = Prefs(min_battery=30, pause_after=0, resume_after=0)
    results = run(prefs, [
        (0, {"on_battery": True, "battery_percent": 50}),
        (1, {"on_battery": True, "battery_percent": 29}),
        (1, {"on_battery": True, "battery_percent": 32}),  # above 30 but not by 5 points
        (1, {"on_battery": True, "battery_percent": 35}),
        (1, {"on_battery": False, "battery_percent": 10}),  # charging: no objection however low
    ])
    assert paused(results) == [False, True, True, False, False]
    assert results[1][1] == "the battery is at 29% (pause below 30%)"
    assert paused(run(prefs, [(0, {"on_battery": True, "battery_percent": 10}),
                              (1, {"on_battery": False, "battery_percent": 11})])) == [True, False]


def test_hot_cpu_pauses_and_resumes_five_degrees_cooler() -> None:
    prefs = Prefs(max_cpu_temp=85, pause_after=2, resume_after=0)
    results = run(prefs, [(0, {"cpu_temp": 90}), (2, {"cpu_temp": 90}), (1, {"cpu_temp": 82}),
                          (1, {"cpu_temp": 80})])
    assert paused(results) == [False, True, True, False]
    assert results[1][1] == "the CPU is at 90 °C (pause above 85 °C)"


def test_active_hours_windows_may_cross_midnight() -> None:
    prefs = Prefs(active_hours=("22:00-07:00", "12:00-13:00"), pause_after=0, resume_after=0)
    times = [datetime.time(23, 30), datetime.time(6, 59), datetime.time(7, 0), datetime.time(12, 30),
             datetime.time(21, 59)]
    results = run(prefs, [(1, {"local_time": moment}) for moment in times])
    assert paused(results) == [False, False, True, False, True]
    assert results[2][1] == "outside the active hours 22:00-07:00, 12:00-13:00"
    assert datetime.time(3, 0) in Window.parse("00:00-00:00")  # all day


def test_every_rule_that_holds_the_worker_is_in_the_reason() -> None:
    prefs = Prefs(max_owner_cpu=50, pause_on_battery=True, pause_after=0, resume_after=0)
    results = run(prefs, [(0, {"owner_cpu": 80, "on_battery": True}), (1, {"owner_cpu": 1, "on_battery": True})])
    assert results[0] == (True, "the owner's CPU use is 80% (pause above 50%, resume below 25%); running on battery")
    assert results[1] == (True, "running on battery")


def test_no_rules_never_pause() -> None:
    policy = Policy([], FakeClock())
    assert policy.update(Readings(NOON, owner_cpu=100, on_battery=True)) is False and policy.reason == ""


@pytest.mark.parametrize("kwargs, message", [
    ({"max_owner_cpu": 150}, "max_owner_cpu is a percent between 0 and 100"),
    ({"max_owner_cpu": 20, "resume_owner_cpu": 40}, "would flap"),
    ({"active_hours": ("7-9",)}, "an active-hours window is HH:MM-HH:MM"),
    ({"max_cores": 0}, "max_cores must be >= 1"),
    ({"pause_grace": -1}, "pause_grace is a number of seconds >= 0"),
    ({"pause_after": float("nan")}, "pause_after is a number of seconds >= 0"),
    ({"max_owner_cpu": True}, "max_owner_cpu must be a number, got True"),
    ({"max_cores": 2.5}, "max_cores must be a whole number, got 2.5"),
    ({"pause_on_battery": "yes"}, "pause_on_battery must be true or false"),
    ({"active_hours": (7,)}, "an active-hours window is HH:MM-HH:MM"),
])
def test_bad_preferences_say_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Prefs(**kwargs)


def test_a_config_file_is_read_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "prefs.toml"
    path.write_text('max_owner_cpu = 40\nactive_hours = ["19:00-08:00"]\nmax_cores = 2\npause_on_battery = true\n')
    args = build_parser().parse_args(["--config", str(path), "--max-owner-cpu", "30", "--pause-grace", "5"])
    prefs = _prefs(args)
    assert prefs == Prefs(max_owner_cpu=30, active_hours=("19:00-08:00",), max_cores=2, pause_on_battery=True,
                          pause_grace=5)
    assert [rule.name for rule in prefs.rules()] == ["owner_cpu", "on_battery", "active_hours"]
    assert WorkerConfig(max_concurrent_tasks=8, prefs=prefs, dashboard=False).max_concurrent_tasks == 2


def test_a_bad_config_file_names_the_file_and_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "prefs.toml"
    path.write_text("max_owner_cpu = 40\nmax_cpus = 2\n")
    with pytest.raises(ValueError, match=r"prefs.toml: unknown setting\(s\) max_cpus; known: active_hours"):
        Prefs.load(path)
    path.write_text("max_owner_cpu = 'lots'\n")
    with pytest.raises(ValueError, match="prefs.toml: max_owner_cpu must be a number, got 'lots'"):
        Prefs.load(path)
    with pytest.raises(ValueError, match="cannot read the preferences file"):
        Prefs.load(tmp_path / "missing.toml")


def test_the_cpu_cap_sets_the_duty_cycle() -> None:
    assert duty_for(50, slots=2, cpus=2) == 0.5
    assert duty_for(25, slots=1, cpus=2) == 0.5  # half of one core is a quarter of two
    assert duty_for(100, slots=4, cpus=8) == 1.0


def test_the_command_line_refuses_bad_preferences_with_their_reason(tmp_path: Path, capsys) -> None:
    assert main(["--no-dashboard", "--max-owner-cpu", "500"]) == 2
    assert "max_owner_cpu is a percent between 0 and 100, got 500.0" in capsys.readouterr().err
    assert main(["--no-dashboard", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read the preferences file" in capsys.readouterr().err

"""The benchmark runs end to end with --quick (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, worker_env

pytestmark = pytest.mark.slow  # runs the benchmark's quick smoke run


def test_quick_benchmark_prints_a_table_and_writes_json_lines(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick",
                           "--backends", "crowdcompute,multiprocessing", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=worker_env(), cwd=ROOT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| workload | CrowdCompute | multiprocessing.Pool |" in done.stdout, done.stdout
    assert "trivial `inc` through `map`, tasks/s" in done.stdout
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["workload"] == "machine"
    errors = [r for r in records if r["metric"] == "error"]
    assert not errors, errors
    measured = {(r["backend"], r["workload"]) for r in records[1:] if r["value"] is not None}
    for workload in ("startup", "trivial", "roundtrip", "cpu", "payload"):
        assert ("crowdcompute", workload) in measured
        assert ("multiprocessing", workload) in measured
    for workload in ("imap", "scaling", "fleet"):
        assert ("crowdcompute", workload) in measured


def test_floor_benchmark_measures_each_transport() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "floor.py")], capture_output=True, text=True,
                          timeout=120, env=worker_env(), cwd=ROOT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line.endswith(" |")]
    figures = [float(row.rsplit("|", 2)[1]) for row in rows[1:]]  # after the header row
    assert len(figures) == 6 and all(f > 0 for f in figures)
    hop, websocket, local, pipe, over_websocket, over_local = figures
    assert abs(hop + websocket + pipe - over_websocket) < 0.002
    assert abs(hop + local + pipe - over_local) < 0.002

"""Benchmark CrowdCompute against its peers: ``python bench/run.py [--quick]``.

Runs every installed backend (CrowdCompute, multiprocessing.Pool, ProcessPoolExecutor, Dask distributed,
Ray) over the same workloads in one process run, one backend at a time (each shut down fully before the
next), then prints a Markdown table, appends JSON lines to ``OUT/results.jsonl``, writes the table to
``OUT/table.md`` and draws ``OUT/benchmarks.png`` (when matplotlib is installed). Installs nothing:
``pip install -e .[bench]`` brings Dask, Ray and matplotlib; a backend whose package is missing is skipped
with a note.

Options: ``--quick`` (small sizes, about a minute), ``--only trivial,roundtrip`` (workloads),
``--backends crowdcompute,multiprocessing``, ``--out DIR`` (default ``bench/results``), ``--workers N``.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
# Benchmark the checkout this file is in (a git worktree of another commit, say), not whatever copy of
# CrowdCompute is installed: its root goes before site-packages, and worker processes inherit the path.
sys.path.insert(1, str(BENCH_DIR.parent))

import backends  # noqa: E402
import report  # noqa: E402
from load import DISTURBED_CORES, ForeignLoad, Window  # noqa: E402
import workloads  # noqa: E402


def machine_facts() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gb = None
    try:  # caps the local link's socket buffers, which decide how many system calls a 4 MiB batch takes
        with open("/proc/sys/net/core/wmem_max") as f:
            wmem_max: int | None = int(f.read())
    except (OSError, ValueError):
        wmem_max = None
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory_gib": memory_gb,
            "python": platform.python_version(), "platform": platform.platform(), "wmem_max": wmem_max,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **git_facts()}


def git_facts() -> dict[str, Any]:
    """The commit measured, and whether foreman/ or worker/ had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=BENCH_DIR.parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return {}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--", "foreman", "worker"))}


def versions(names: list[str]) -> dict[str, str]:
    from importlib import metadata

    packages = {"crowdcompute": "crowdcompute", "dask": "distributed", "ray": "ray"}
    out = {}
    for name in names:
        package = packages.get(name)
        if package:
            try:
                out[name] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about a minute")
    parser.add_argument("--only", default=",".join(workloads.ALL),
                        help=f"comma-separated workloads (default all: {','.join(workloads.ALL)})")
    parser.add_argument("--backends", default=",".join(backends.BACKENDS),
                        help=f"comma-separated backends (default all installed: {','.join(backends.BACKENDS)})")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results folder")
    parser.add_argument("--workers", type=int, default=2, help="workers (processes) per backend")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument("--retries", type=int, default=None,
                        help="rerun a workload disturbed by other work up to this many times (default 2; 0 with --quick)")
    parser.add_argument("--disturbed", type=float, default=DISTURBED_CORES,
                        help=f"cores of other work that count as disturbed (default {DISTURBED_CORES})")
    args = parser.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in args.only if w not in workloads.ALL]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(workloads.ALL)}")
    args.backends = backends.resolve(args.backends)
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    return args


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = workloads.Sizes.for_run(args.quick)
        if args.workers != self.sizes.workers:
            from dataclasses import replace

            self.sizes = replace(self.sizes, workers=args.workers)
        self.records: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.skipped: dict[str, str] = {}
        self.load: ForeignLoad | None = None

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", file=sys.stderr, flush=True)

    def guarded(self, label: str, fn: Any, *args: Any, retry: bool = True) -> list[dict[str, Any]] | None:
        """Run one workload; an exception is noted and recorded, a hang dumps every thread's stack and exits.

        When other work kept more than ``--disturbed`` cores busy meanwhile, the workload is run again (up to
        ``--retries`` times) and the least disturbed attempt is kept.
        """
        best: list[dict[str, Any]] | None = None
        best_foreign = None
        attempts = 1 + (self.args.retries if retry else 0)
        for attempt in range(1, attempts + 1):
            print(f"  {label} ...", file=sys.stderr, end="", flush=True)
            faulthandler.dump_traceback_later(self.sizes.workload_timeout, exit=True)
            t0 = time.perf_counter()
            window = Window(self.load)
            try:
                out = fn(*args)
            except Exception as exc:  # a workload failing on one backend must not end the run
                print(" failed", file=sys.stderr, flush=True)
                traceback.print_exc()
                self.note(f"{label} failed: {type(exc).__name__}: {exc}")
                self.records.append({"backend": label.split(":")[0], "workload": label.split(":")[-1],
                                     "metric": "error", "value": None, "unit": "", "n": None,
                                     "error": f"{type(exc).__name__}: {exc}"})
                return None
            finally:
                faulthandler.cancel_dump_traceback_later()
            elapsed = time.perf_counter() - t0
            foreign = window.cores()
            busy = f" (other work on the machine: {foreign:.2f} cores)" if foreign is not None and foreign >= 0.05 else ""
            print(f" {elapsed:.1f}s{busy}", file=sys.stderr, flush=True)
            for rec in out:
                rec["foreign_cores"] = None if foreign is None else round(foreign, 3)
                rec["attempt"] = attempt
            if best is None or (foreign or 0.0) < (best_foreign or 0.0):
                best, best_foreign = out, foreign
            if (foreign or 0.0) < self.args.disturbed:
                break
        assert best is not None
        self.records.extend(best)
        return best

    def run_backend(self, name: str) -> None:
        cls = backends.BACKENDS[name]
        why = cls.missing()
        if why:
            self.skipped[name] = why
            self.note(f"skipping {name}: {why}")
            return
        selected = [w for w in workloads.SHARED if w in self.args.only]
        if not selected:
            return
        print(f"{name}:", file=sys.stderr, flush=True)
        backend = cls()
        first: list[float] = []

        def start() -> list[dict[str, Any]]:
            first.append(backend.start(self.sizes.workers))
            return []

        try:
            if self.guarded(f"{name}:start", start, retry=False) is None:
                return
            for workload in selected:
                if workload != "startup":
                    self.guarded(f"{name}:{workload}", getattr(workloads, workload), backend, self.sizes)
        finally:
            faulthandler.dump_traceback_later(self.sizes.workload_timeout, exit=True)
            try:
                backend.close()
            except Exception as exc:
                self.note(f"{name}: close failed: {type(exc).__name__}: {exc}")
            finally:
                faulthandler.cancel_dump_traceback_later()
        if "startup" in selected:
            self.guarded(f"{name}:startup", workloads.startup, cls, first[0], self.sizes)

    def run(self) -> int:
        for name in self.args.backends:
            self.run_backend(name)
        if "crowdcompute" in self.args.backends and "crowdcompute" not in self.skipped:
            extra = [w for w in workloads.CROWDCOMPUTE_ONLY if w in self.args.only]
            if extra:
                print("crowdcompute only:", file=sys.stderr, flush=True)
            for workload in extra:
                fn = {"imap": workloads.imap_rss, "scaling": workloads.scaling, "fleet": workloads.fleet,
                      "joblib": workloads.joblib_backends}[workload]
                self.guarded(f"crowdcompute:{workload}", fn, self.sizes)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = Runner(args)
    facts = machine_facts()
    facts["versions"] = versions(args.backends)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    print(f"CrowdCompute benchmark {'(quick) ' if args.quick else ''}on {facts['nproc']} x {facts['cpu_model']}, "
          f"Python {facts['python']}, {facts['date']}", file=sys.stderr, flush=True)
    facts["loadavg_start"] = round(os.getloadavg()[0], 2)
    runner.load = ForeignLoad().start()
    whole = Window(runner.load)
    t0 = time.perf_counter()
    try:
        runner.run()
        facts["foreign_cores"] = whole.cores()
    finally:
        runner.load.stop()
    facts["seconds"] = round(time.perf_counter() - t0, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    common = {"run": run_id, "date": facts["date"], "quick": args.quick, "workers": runner.sizes.workers,
              "nproc": facts["nproc"], "python": facts["python"]}
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps({**common, "backend": None, "workload": "machine", "metric": "facts", **facts,
                            "skipped": runner.skipped, "notes": runner.notes}) + "\n")
        for rec in runner.records:
            f.write(json.dumps({**common, **rec}) + "\n")

    text = report.markdown(runner.records, args.backends, runner.skipped, facts, args.quick, args.disturbed)
    (args.out / "table.md").write_text(text)
    print(text, flush=True)
    if not args.no_chart:
        chart = report.chart(runner.records, args.backends, facts, args.out / "benchmarks.png")
        if chart is None:
            print("note: matplotlib is not installed: no chart (pip install -e .[bench])", file=sys.stderr)
        else:
            print(f"chart: {chart}", file=sys.stderr)
    print(f"results appended to {args.out / 'results.jsonl'} ({facts['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

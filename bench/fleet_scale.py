"""One foreman, a simulated fleet of 100 to 1,000 workers: ``python -m bench.fleet_scale [--sizes 100,1000]``.

For each fleet size the foreman runs in its own process (so psutil can measure it alone) and the simulated
workers (:mod:`bench.simfleet`) in a few others. Measured per size:

- at rest: the foreman's CPU % and RSS while every worker heartbeats (every ``--heartbeat-interval`` s);
- dispatch: a map of ``10 x workers`` trivial tasks in one-task batches: batches/s, and foreman CPU per batch
  (one TASKS out, one RESULTS in, the map's own pickling included, since the map runs in the foreman process);
- loss: 10 % of the workers (100 of 1,000) vanish at once while each holds work, frozen with SIGSTOP (sockets
  open, only the heartbeat timeout tells) or with ``--vanish kill`` killed (the kernel closes their sockets).
  Reported: seconds until the foreman has dropped all of them, and until every batch they held has been
  reassigned and completed elsewhere.

Prints a Markdown table and appends JSON lines to ``OUT/fleet_scale.jsonl`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.simfleet import ROOT, SimFleet, slow_square, square
from foreman import Foreman

#: Simulated workers per process beyond the vanishing group.
PER_PROCESS = 300
#: One-task batches per worker in the dispatch map.
DISPATCH_TASKS_PER_WORKER = 10
#: 0.3 s tasks per worker in the loss map: about 3.6 s of work each, so the map still runs when a silent
#: worker is declared lost (after the 3 s default timeout).
LOSS_TASKS_PER_WORKER = 12
#: Seconds a poll on the foreman side waits for the fleet to reach a state before giving up.
POLL_LIMIT = 120.0


# -- the foreman's side: a Foreman in this process, driven by JSON lines on stdin --------------------------------

class Served:
    """Commands the driver sends to the foreman process; each returns the JSON reply."""

    def __init__(self, fm: Foreman) -> None:
        self.fm = fm
        self.scheduler = fm._server.scheduler
        self.loss_job: Any = None
        self.held: set[tuple[int, int]] = set()
        self.doomed = ""
        self.loss_tasks = 0

    def workers(self, n: int) -> dict[str, Any]:
        self.fm.wait_for_workers(n, timeout=POLL_LIMIT)
        return {"workers": len(self.fm.workers)}

    def map(self, tasks: int) -> dict[str, Any]:
        started = time.monotonic()
        exact = self.fm.map(square, range(tasks), chunksize=1) == [x * x for x in range(tasks)]
        return {"seconds": time.monotonic() - started, "exact": exact}

    def loss_start(self, tasks: int, prefix: str) -> dict[str, Any]:
        """Start a map of slow tasks; return once every worker of the doomed group holds some of it."""
        self.doomed = f"{prefix}-"
        self.loss_tasks = tasks
        self.loss_job = self.fm.imap(slow_square, range(tasks), chunksize=1, timeout=POLL_LIMIT)
        deadline = time.monotonic() + POLL_LIMIT
        while True:
            held = self._on_loop(self._held_by_doomed)
            if held and all(held.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the doomed workers never all held work")
            time.sleep(0.01)
        self.held = {(job, start) for keys in held.values() for job, start, _ in keys}
        return {"held": len(self.held)}

    def loss_wait(self, t0: float) -> dict[str, Any]:
        """Poll until the doomed workers are dropped and their batches done; times are from ``t0``."""
        detected = recovered = None
        deadline = time.monotonic() + POLL_LIMIT
        while recovered is None or detected is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"loss not recovered: detected={detected} recovered={recovered}")
            gone, left = self._on_loop(self._loss_state)
            now = time.monotonic()
            if detected is None and gone:
                detected = now - t0
            if recovered is None and not left:
                recovered = now - t0
            time.sleep(0.01)
        exact = list(self.loss_job) == [x * x for x in range(self.loss_tasks)]
        return {"detected": detected, "recovered": recovered, "exact": exact,
                "reassigned": self._on_loop(lambda: self.scheduler.reassigned)}

    def _held_by_doomed(self) -> dict[str, list[tuple[int, int, int]]]:
        return {w.id: list(w.batches) for w in self.scheduler.workers.values() if w.id.startswith(self.doomed)}

    def _loss_state(self) -> tuple[bool, int]:
        gone = not any(w.startswith(self.doomed) for w in self.scheduler.workers)
        left = sum(1 for job, start in self.held if job in self.scheduler.jobs
                   and start in self.scheduler.jobs[job].live)
        return gone, left

    def _on_loop(self, fn: Any) -> Any:
        return self.fm._call(fn)


def serve(interval: float, timeout: float, speculation: bool) -> int:
    logging.basicConfig(level=logging.ERROR)
    with Foreman(port=0, dashboard=False, heartbeat_interval=interval, heartbeat_timeout=timeout,
                 speculation=3.0 if speculation else None) as fm:
        print(json.dumps({"address": fm.address}), flush=True)
        served = Served(fm)
        for line in sys.stdin:
            command = json.loads(line)
            op = command.pop("op")
            if op == "quit":
                break
            try:
                reply = getattr(served, op)(**command)
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which records it in the row
                reply = {"error": f"{op}: {type(exc).__name__}: {exc}"[:500]}
            print(json.dumps(reply), flush=True)
    return 0


# -- the driver --------------------------------------------------------------------------------------------------

class ForemanProcess:
    """The foreman's process, driven through :class:`Served` by JSON lines; its log is appended to ``log``."""

    def __init__(self, interval: float, timeout: float, speculation: bool, log: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        with log.open("a") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "bench.fleet_scale", "--serve",
                                             "--heartbeat-interval", str(interval), "--heartbeat-timeout",
                                             str(timeout), *([] if speculation else ["--no-speculation"])],
                                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True)
        self.address = self._reply()["address"]
        self.ps = psutil.Process(self.process.pid)

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the foreman process exited (code {self.process.wait(30)})")
        return json.loads(line)

    def close(self) -> None:
        """Ask the foreman to stop (it closes its workers' connections); kill it if it has not after 30 s."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write('{"op": "quit"}\n')
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it has exited already
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def measure(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fleet size; a step that fails (the foreman overwhelmed, say) ends the row with its ``error``."""
    doomed = size // 10
    groups = {"gone": doomed}
    rest = size - doomed
    for index in range(-(-rest // PER_PROCESS)):
        groups[f"s{index}"] = min(PER_PROCESS, rest - index * PER_PROCESS)
    row: dict[str, Any] = {"workers": size, "processes": len(groups), "vanished": doomed, "vanish": args.vanish,
                           "speculation": args.speculation}
    foreman = ForemanProcess(args.heartbeat_interval, args.heartbeat_timeout, args.speculation,
                             args.out / "fleet_scale-foreman.log")
    fleet = SimFleet(foreman.address, groups)
    try:
        fleet.wait_ready()
        foreman.ask("workers", n=size)
        time.sleep(2 * args.heartbeat_interval)  # settle: every worker has beaten at least once
        foreman.ps.cpu_percent(None)
        time.sleep(args.rest)
        rest_cpu = foreman.ps.cpu_percent(None)
        row.update(rest_cpu_percent=round(rest_cpu, 2),
                   rest_cpu_percent_per_1000_workers=round(rest_cpu * 1000 / size, 2),
                   rss_mib=round(foreman.ps.memory_info().rss / 2**20, 1))

        tasks = DISPATCH_TASKS_PER_WORKER * size
        before = foreman.cpu_seconds()
        mapped = foreman.ask("map", tasks=tasks)
        row.update(map_tasks=tasks, map_seconds=round(mapped["seconds"], 3), map_exact=mapped["exact"],
                   batches_per_s=round(tasks / mapped["seconds"], 1),
                   cpu_us_per_batch=round((foreman.cpu_seconds() - before) / tasks * 1e6, 1))

        row["held_batches"] = foreman.ask("loss_start", tasks=LOSS_TASKS_PER_WORKER * size, prefix="gone")["held"]
        t0 = time.monotonic()
        (fleet.freeze if args.vanish == "stop" else fleet.kill)("gone")
        loss = foreman.ask("loss_wait", t0=t0)
        row.update(detect_s=round(loss["detected"], 3), recover_s=round(loss["recovered"], 3),
                   loss_exact=loss["exact"], reassigned=loss["reassigned"])
    except RuntimeError as exc:
        row["error"] = str(exc)
    finally:
        foreman.close()
        fleet.close()
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    how = "SIGSTOP: silent" if args.vanish == "stop" else "SIGKILL"
    lines = [(f"Heartbeat every {args.heartbeat_interval:g} s, timeout {args.heartbeat_timeout:g} s; "
              f"10 % of the fleet vanishes ({how}); speculative copies {'on' if args.speculation else 'off'}."), "",
             ("| workers | CPU at rest | CPU at rest per 1,000 workers | RSS | RSS per worker | batches/s | "
              "foreman CPU per batch | vanished (batches held) | all dropped after | all reassigned and done after |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [f"{row['workers']:,}", _cell(row, "rest_cpu_percent", "{:.1f} %"),
                 _cell(row, "rest_cpu_percent_per_1000_workers", "{:.1f} %"), _cell(row, "rss_mib", "{:.0f} MiB"),
                 _cell(row, "rss_kib_per_worker", "{:.0f} KiB"), _cell(row, "batches_per_s", "{:,.0f}"),
                 _cell(row, "cpu_us_per_batch", "{:.0f} µs"),
                 f"{row['vanished']} ({row.get('held_batches', '')})", _cell(row, "detect_s", "{:.2f} s"),
                 _cell(row, "recover_s", "{:.2f} s")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\n{row['workers']:,} workers: {row['error']}" for row in rows if "error" in row]
    return "\n".join(lines)


def _cell(row: dict[str, Any], key: str, form: str) -> str:
    return "" if row.get(key) is None else form.format(row[key])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,250,500,1000", help="fleet sizes (default 100,250,500,1000)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0, help="silence that loses a worker")
    parser.add_argument("--rest", type=float, default=8.0, help="seconds over which CPU at rest is measured")
    parser.add_argument("--vanish", choices=("stop", "kill"), default="stop",
                        help="how the 10 %% vanish: SIGSTOP (silent, sockets open) or SIGKILL (sockets closed)")
    parser.add_argument("--no-speculation", dest="speculation", action="store_false",
                        help="no speculative copies: lost batches are rerun only once their workers are dropped")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.heartbeat_interval, args.heartbeat_timeout, args.speculation)
    sizes = [int(s) for s in args.sizes.split(",")]
    limit = max(sizes) + 100
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < limit:
        parser.error(f"the foreman needs a file descriptor per worker: raise `ulimit -n` to at least {limit} "
                     f"(it is {soft})")
    facts = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
             "python": platform.python_version(), "loadavg_start": round(os.getloadavg()[0], 2)}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        print(f"{size} workers ...", file=sys.stderr, flush=True)
        row = measure(size, args)
        rows.append(row)
        print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
    for row in rows[1:]:  # memory each worker adds, over the smallest fleet
        if "rss_mib" in row and "rss_mib" in rows[0]:
            row["rss_kib_per_worker"] = round((row["rss_mib"] - rows[0]["rss_mib"]) * 1024
                                              / (row["workers"] - rows[0]["workers"]), 1)
    text = table(rows, args)
    print(text, flush=True)
    with open(args.out / "fleet_scale.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps({**facts, **row, "heartbeat_interval": args.heartbeat_interval,
                                "heartbeat_timeout": args.heartbeat_timeout}) + "\n")
    return 0 if all(r.get("map_exact") and r.get("loss_exact") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

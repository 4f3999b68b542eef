"""Where CrowdCompute spends its time on the trivial-task and round-trip workloads: ``python bench/profile.py``.

Starts ``Foreman(local_workers=2)``, warms it up, then attaches py-spy (``pip install py-spy``) to it, its
local workers and their task processes (``--subprocesses``), sampling in each process only the thread that
holds the GIL (``--gil``): that is Python CPU time, with waits on sockets, pipes and locks left out (py-spy's
own idle detection counts many of those waits as busy). Prints per process role the share of wall time it
held the GIL, its threads, the top functions by own samples ("self", C calls included in their Python caller)
and the top CrowdCompute functions including callees ("total"). The round-trip phase also splits the latency
into its two legs with a task that returns ``time.monotonic()``. Raw collapsed stacks are kept in
``OUT/profile-*.txt`` (for flamegraph.pl or speedscope).

Usage: ``python bench/profile.py [--phases trivial,roundtrip,payload] [--seconds 6] [--rate 250] [--out DIR]``
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
# Benchmark the checkout this file is in (a git worktree of another commit, say), not whatever copy of
# CrowdCompute is installed: its root goes before site-packages, and worker processes inherit the path.
sys.path.insert(1, str(BENCH_DIR.parent))

PHASES = ("trivial", "roundtrip", "payload")


def workload(phase: str, seconds: float) -> None:
    """Run one phase for about ``seconds`` (inside the profiled process), after printing READY.

    Start-up is left out of the profile: the parent attaches py-spy once READY is printed.
    """
    import tasks
    from foreman import Foreman

    payloads = [bytes([i]) * 1_000_000 for i in range(50)] if phase == "payload" else []
    with Foreman(port=0, local_workers=2) as fm:
        fm.wait_for_workers(2, timeout=120)
        fm.map(tasks.inc, range(1000))
        for i in range(50):
            fm.submit(tasks.inc, i).result()
        print("READY", flush=True)
        time.sleep(0.5)  # py-spy attaches
        calls = 0
        legs: list[tuple[float, float]] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            if phase == "trivial":
                fm.map(tasks.inc, range(200_000))
                calls += 200_000
            elif phase == "payload":
                fm.map(tasks.payload_len, payloads)
                calls += len(payloads)
            else:
                for _ in range(100):
                    sent = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes on Linux
                    ran = fm.submit(tasks.stamp).result()
                    legs.append((ran - sent, time.monotonic() - ran))
                calls += 100
        elapsed = time.perf_counter() - t0
        print(f"{phase}: {calls} tasks in {elapsed:.1f} s = {calls / elapsed:,.0f} tasks/s "
              f"({1000 * elapsed / calls:.3f} ms each)", flush=True)
        if payloads:
            print(f"payload: {calls / elapsed:,.0f} MB/s", flush=True)
        if legs:
            there = sorted(a for a, _ in legs)
            back = sorted(b for _, b in legs)
            print(f"round trip legs (median): submit -> task runs {1000 * there[len(there) // 2]:.3f} ms, "
                  f"task ran -> result in the caller {1000 * back[len(back) // 2]:.3f} ms", flush=True)


_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def role_of(stack: list[str]) -> tuple[str, str, str, list[str]]:
    """(process role, process id, thread name, the Python frames) of one collapsed py-spy stack."""
    role, pid, thread, frames = "foreman (bench process)", "?", "?", []
    for frame in stack:
        if frame.startswith("process "):
            pid, command = frame[len("process "):].split(":", 1)
            if "-m worker" in command:
                role = "worker"
            elif "multiprocessing" in command:
                role = "task process"
            elif "ray" in command or "dask" in command:
                role = "other"
        elif frame.startswith("thread ("):
            name = frame.split(":", 1)[1].strip() if ":" in frame else "main"
            thread = re.sub(r"[-_]\d+$", "-N", name)
        else:
            frames.append(frame)
    return role, pid, thread, frames


def short(frame: str) -> str:
    """'dumps (cloudpickle/cloudpickle.py:1510)' -> 'cloudpickle/cloudpickle.py:dumps'."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib:" + path.split("/", 1)[-1]
    return f"{path}:{m.group('fn')}"


def ours(frame: str) -> bool:
    return frame.startswith(("foreman/", "worker/"))


def summarize(raw: Path, top: int = 12, rate: float | None = None, seconds: float | None = None) -> str:
    """Per process role: GIL-held share, threads, top functions by own and by total samples."""
    by_role: dict[str, int] = collections.Counter()
    pids: dict[str, set[str]] = collections.defaultdict(set)
    by_thread: dict[tuple[str, str], int] = collections.Counter()
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        role, pid, thread, frames = role_of(stack_text.split(";"))
        pids[role].add(pid)
        by_role[role] += count
        by_thread[(role, thread)] += count
        names = [short(f) for f in frames]
        if names:
            own[role][names[-1]] += count
        for name in set(names):
            if ours(name):
                total[role][name] += count
    grand = sum(by_role.values()) or 1
    out = [f"{grand} samples of the thread holding the GIL in each process (py-spy --gil); percentages are "
           f"of all samples"]
    for role, n in sorted(by_role.items(), key=lambda kv: -kv[1]):
        threads = ", ".join(f"{t} {100 * c / grand:.0f}%" for (r, t), c in
                            sorted(by_thread.items(), key=lambda kv: -kv[1]) if r == role and c / grand >= 0.01)
        busy = ""
        if rate and seconds:
            busy = (f"; each of its {len(pids[role])} process(es) held the GIL "
                    f"{100 * n / len(pids[role]) / (rate * seconds):.0f}% of the wall time")
        out.append(f"\n[{role}] {100 * n / grand:.1f}% of samples{busy}; threads: {threads}")
        out.append("  self:")
        for name, c in own[role].most_common(top):
            out.append(f"    {100 * c / grand:5.1f}%  {name}")
        out.append("  total (CrowdCompute code, including callees):")
        for name, c in total[role].most_common(top):
            out.append(f"    {100 * c / grand:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/profile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--run-phase", help=argparse.SUPPRESS)  # inside the profiled process
    args = parser.parse_args(argv)
    if args.run_phase:
        workload(args.run_phase, args.seconds)
        return 0
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(py_spy):
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for phase in [p.strip() for p in args.phases.split(",") if p.strip()]:
        raw = args.out / f"profile-{phase}.txt"
        raw.unlink(missing_ok=True)
        print(f"== {phase} ==", flush=True)
        target = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-phase", phase,
                                   "--seconds", str(args.seconds + 1.0)], stdout=subprocess.PIPE, text=True)
        assert target.stdout is not None
        if target.stdout.readline().strip() != "READY":
            target.kill()
            print("the profiled process did not get ready", file=sys.stderr)
            return 1
        spy = subprocess.run([py_spy, "record", "--pid", str(target.pid), "--format", "raw", "--output", str(raw),
                              "--rate", str(args.rate), "--duration", str(int(args.seconds)), "--subprocesses",
                              "--threads", "--nonblocking", "--gil"], capture_output=True, text=True,
                             timeout=120 + args.seconds)
        rest, _ = target.communicate(timeout=120 + args.seconds)
        print(rest.strip())
        if spy.returncode != 0 or not raw.exists():
            print(spy.stderr[-3000:], file=sys.stderr)
            return 1
        print(summarize(raw, rate=args.rate, seconds=int(args.seconds)))
        print(f"(raw stacks: {raw})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

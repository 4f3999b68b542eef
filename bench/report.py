"""Turning records into a Markdown report (tables and the issue's targets) and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends import LABELS
from load import DISTURBED_CORES

Records = list[dict[str, Any]]


def find(records: Records, backend: str | None, workload: str, metric: str, **match: Any) -> dict[str, Any] | None:
    for rec in records:
        if (rec["workload"] == workload and rec["metric"] == metric
                and (backend is None or rec["backend"] == backend)
                and all(rec.get(k) == v for k, v in match.items())):
            return rec
    return None


def value(records: Records, backend: str | None, workload: str, metric: str, **match: Any) -> float | None:
    rec = find(records, backend, workload, metric, **match)
    return None if rec is None else rec["value"]


def failed(records: Records, backend: str, workload: str) -> bool:
    return find(records, backend, workload, "error") is not None


def human(x: float | None, digits: int = 3) -> str:
    """1234567 -> '1.23 M', 0.00123 -> '0.00123'."""
    if x is None:
        return "–"
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


def tick(x: float) -> str:
    """Axis labels: 100000 -> '100 k', 0.01 -> '0.01'."""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def count(n: int | None) -> str:
    if n is None:
        return ""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000} M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000} k"
    return str(n)


#: Rows of the main table: (label, workload, metric, format).
ROWS = [
    ("start-up to first result, s (median)", "startup", "startup_s", lambda v: f"{v:.2f}"),
    ("trivial `inc` through `map`, tasks/s", "trivial", "tasks_per_s", human),
    ("one task round trip, median ms", "roundtrip", "median_ms", lambda v: f"{v:.2f}"),
    ("one task round trip, p99 ms", "roundtrip", "p99_ms", lambda v: f"{v:.2f}"),
    ("20 ms CPU tasks, parallel efficiency", "cpu", "efficiency_pct", lambda v: f"{v:.1f} %"),
    ("20 ms CPU tasks: CPU the system used besides the tasks, ms per task", "cpu", "overhead_cpu_ms_per_task",
     lambda v: f"{max(v, 0.0):.2f}"),  # clock granularity can make "none" read as -0.00
    ("1 MB `bytes` argument each, MB/s", "payload", "mb_per_s", lambda v: f"{v:.0f}"),
]


def main_table(records: Records, names: list[str], skipped: dict[str, str]) -> list[str]:
    shown = [n for n in names if n not in skipped]
    lines = ["| workload | " + " | ".join(LABELS.get(n, n) for n in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for label, workload, metric, fmt in ROWS:
        cells = []
        for name in shown:
            rec = find(records, name, workload, metric)
            if rec is not None and rec["value"] is not None:
                cell = fmt(rec["value"])
                if workload in ("trivial", "cpu", "payload", "roundtrip", "startup") and rec.get("n"):
                    what = "workers" if workload == "startup" else "calls" if workload == "roundtrip" else "tasks"
                    cell += f" ({count(rec['n'])} {what})" if workload in ("trivial", "cpu", "payload") else ""
                cells.append(cell)
            elif failed(records, name, workload) or failed(records, name, "start"):
                cells.append("error")
            else:
                cells.append("–")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    peak = find(records, "crowdcompute", "imap", "peak_rss_mb")
    if peak is not None:
        growth = value(records, "crowdcompute", "imap", "rss_growth_mb")
        first = peak["runs"][0]["n"]
        cells = [f"{peak['value']:.0f} MiB peak over {count(peak['n'])} items "
                 f"(+{growth:.1f} MiB vs {count(first)})" if n == "crowdcompute" else "–" for n in shown]
        lines.append("| `imap` foreman-process peak RSS | " + " | ".join(cells) + " |")
    return lines


def targets(records: Records) -> list[str]:
    """The issue's targets for ``Foreman(local_workers=2)``, judged against this run's numbers."""
    cc = "crowdcompute"
    rows = []

    def row(target: str, measured: str, ok: bool | None) -> None:
        verdict = "–" if ok is None else ("**met**" if ok else "**missed**")
        rows.append(f"| {target} | {measured} | {verdict} |")

    tps, pool_tps = value(records, cc, "trivial", "tasks_per_s"), value(records, "multiprocessing", "trivial",
                                                                           "tasks_per_s")
    if tps is not None:
        if pool_tps:
            row("trivial tasks: >= 0.1x multiprocessing.Pool's tasks/s",
                f"{human(tps)}/s = {tps / pool_tps:.2f}x Pool ({human(pool_tps)}/s)", tps >= 0.1 * pool_tps)
        else:
            row("trivial tasks: >= 0.1x multiprocessing.Pool's tasks/s", f"{human(tps)}/s (Pool not run)", None)
    median, p99 = value(records, cc, "roundtrip", "median_ms"), value(records, cc, "roundtrip", "p99_ms")
    if median is not None and p99 is not None:
        row("round trip: median <= 0.5 ms, p99 <= 2 ms", f"median {median:.2f} ms, p99 {p99:.2f} ms",
            median <= 0.5 and p99 <= 2.0)
    eff = value(records, cc, "cpu", "efficiency_pct")
    if eff is not None:
        row("20 ms CPU tasks: parallel efficiency >= 97 %", f"{eff:.1f} %", eff >= 97.0)
    mbs, pool_mbs = value(records, cc, "payload", "mb_per_s"), value(records, "multiprocessing", "payload",
                                                                       "mb_per_s")
    if mbs is not None:
        if pool_mbs:
            row("1 MB payloads: >= 1x multiprocessing.Pool's MB/s",
                f"{mbs:.0f} MB/s = {mbs / pool_mbs:.2f}x Pool ({pool_mbs:.0f} MB/s)", mbs >= pool_mbs)
        else:
            row("1 MB payloads: >= 1x multiprocessing.Pool's MB/s", f"{mbs:.0f} MB/s (Pool not run)", None)
    peak = find(records, cc, "imap", "peak_rss_mb")
    if peak is not None:
        growth = value(records, cc, "imap", "rss_growth_mb") or 0.0
        first = peak["runs"][0]
        row(f"`imap` over {count(peak['n'])} items: peak RSS < 300 MB, not growing with the input",
            f"{peak['value']:.0f} MiB peak; {first['peak_mb']:.0f} MiB at {count(first['n'])} items "
            f"(growth {growth:+.1f} MiB, criterion <= 10 MiB)", peak["value"] * 1.048576 < 300 and growth <= 10)
    start = value(records, cc, "startup", "startup_s")
    if start is not None:
        row("start-up to the first result < 1.5 s (2 local workers)", f"{start:.2f} s", start < 1.5)
    if not rows:
        return []
    return ["| target | measured (this run) | verdict |", "|---|---|---|", *rows]


def scaling_table(records: Records) -> list[str]:
    workers = sorted({r["workers"] for r in records if r["workload"] == "scaling" and "workers" in r})
    if not workers:
        return []
    lines = ["| local workers | start-up s | `inc` tasks/s | 20 ms CPU tasks: time s | speed-up vs 1 | "
             "efficiency vs min(workers, cores) |", "|---|---|---|---|---|---|"]
    for n in workers:
        def get(metric: str) -> float | None:
            return value(records, "crowdcompute", "scaling", metric, workers=n)

        start, tps, secs, speedup, eff = (get(m) for m in ("startup_s", "tiny_tasks_per_s", "cpu_seconds",
                                                           "cpu_speedup", "cpu_efficiency_pct"))
        lines.append(f"| {n} | {_f(start, '.2f')} | {human(tps)} | {_f(secs, '.2f')} | {_f(speedup, '.2f')}x | "
                     f"{_f(eff, '.1f')} % |")
    tiny = find(records, "crowdcompute", "scaling", "tiny_tasks_per_s")
    cpu = find(records, "crowdcompute", "scaling", "cpu_seconds")
    if tiny and cpu:
        lines.append("")
        lines.append(f"`inc` over {count(tiny['n'])} items; {cpu['n']} tasks of 20 ms CPU each.")
    return lines


def fleet_table(records: Records) -> list[str]:
    rows = [r for r in records if r["workload"] == "fleet" and r["metric"] == "seconds"]
    if not rows:
        return []
    lines = ["| tasks | batching | job time s | ideal s | efficiency | tasks on the slow worker (ideal) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        what = f"{count(r['n'])} × {r['task_seconds'] * 1000:g} ms"
        lines.append(f"| {what} | {r['batching']} | {r['value']:.2f} | {r['ideal_seconds']:.2f} | "
                     f"{r['efficiency_pct']:.0f} % | {100 * r['slow_share']:.0f} % ({100 * r['ideal_slow_share']:.0f} %) |")
    lines.append("")
    lines.append(f"One fast and one {rows[0]['slowdown']:g}x slower worker (`python -m worker --concurrency 1`, "
                 "BENCH_SLOWDOWN); ideal = the work split in proportion to speed.")
    return lines


def _f(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(records: Records, names: list[str], skipped: dict[str, str], facts: dict[str, Any],
             quick: bool, disturbed: float = DISTURBED_CORES) -> str:
    out = [f"## Results{' (--quick: small sizes, not comparable)' if quick else ''}", "",
           f"{facts['nproc']} CPUs ({facts['cpu_model']}), {facts.get('memory_gib')} GiB, Python {facts['python']}, "
           f"{facts['date']}, commit {facts.get('commit', '?')}{' + uncommitted foreman/worker changes' if facts.get('dirty') else ''}, "
           f"whole run {facts.get('seconds', '?')} s; other work on the machine: 1-minute load average "
           f"{facts.get('loadavg_start', '?')} before the run, {_f(facts.get('foreign_cores'), '.2f')} cores busy "
           f"on average during it.", ""]
    out += main_table(records, names, skipped)
    for name, why in skipped.items():
        out.append(f"\n{LABELS.get(name, name)} skipped: {why}")
    disturbed = sorted({f"{LABELS.get(r['backend'], r['backend'])} {r['workload']} ({r['foreign_cores']:.2f})"
                        for r in records if (r.get("foreign_cores") or 0) >= disturbed})
    if disturbed:
        out.append("\nCaution: other work on the machine kept CPU busy (average cores; where a workload was rerun, "
                   "the least disturbed attempt is shown) during: " + ", ".join(disturbed))
    errors = [r for r in records if r["metric"] == "error"]
    for r in errors:
        out.append(f"\nerror: {r['backend']} {r['workload']}: {r['error']}")
    for title, lines in (("Targets for `Foreman(local_workers=2)`", targets(records)),
                         ("Scaling (CrowdCompute)", scaling_table(records)),
                         ("Fleet of a fast and a slow worker (CrowdCompute)", fleet_table(records))):
        if lines:
            out += ["", f"### {title}", "", *lines]
    return "\n".join(out) + "\n"


# -- chart ----------------------------------------------------------------------------------------------------

SHORT = {"crowdcompute": "Crowd\nCompute", "multiprocessing": "mp.Pool", "processpool": "PPE", "dask": "Dask",
         "ray": "Ray"}

COLORS = {"crowdcompute": "#d62728", "multiprocessing": "#1f77b4", "processpool": "#2ca02c", "dask": "#ff7f0e",
          "ray": "#9467bd"}


def chart(records: Records, names: list[str], facts: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return None

    def log_axis(ax: Any) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())

    shown = [n for n in names if any(r["backend"] == n and r["value"] is not None for r in records)]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    fig.suptitle(f"CrowdCompute vs peers, 2 workers each (mp.Pool = multiprocessing.Pool, PPE = "
                 f"ProcessPoolExecutor, chunksize 1) — {facts['nproc']} CPUs ({facts['cpu_model']}), "
                 f"Python {facts['python']}, {facts['date'][:10]}", fontsize=11)

    def bars(ax: Any, workload: str, metric: str, title: str, log: bool = False, fmt: Any = human) -> None:
        xs, ys, cs = [], [], []
        for n in shown:
            v = value(records, n, workload, metric)
            if v is not None:
                xs.append(SHORT.get(n, n))
                ys.append(v)
                cs.append(COLORS.get(n, "grey"))
        ax.set_title(title, fontsize=10)
        if not ys:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            return
        b = ax.bar(range(len(ys)), ys, color=cs)
        ax.set_xticks(range(len(ys)), xs, fontsize=8)
        if log:
            log_axis(ax)
        ax.bar_label(b, labels=[fmt(y) for y in ys], fontsize=7)
        ax.margins(y=0.15)

    bars(axes[0, 0], "trivial", "tasks_per_s", "trivial tasks through map, tasks/s (log)", log=True)
    ax = axes[0, 1]
    ax.set_title("one task round trip, ms (log)", fontsize=10)
    pts = [(n, value(records, n, "roundtrip", "median_ms"), value(records, n, "roundtrip", "p99_ms")) for n in shown]
    pts = [p for p in pts if p[1] is not None]
    if pts:
        xs = range(len(pts))
        b1 = ax.bar([x - 0.2 for x in xs], [p[1] for p in pts], 0.4, color=[COLORS.get(p[0], "grey") for p in pts],
                    label="median")
        b2 = ax.bar([x + 0.2 for x in xs], [p[2] for p in pts], 0.4, color=[COLORS.get(p[0], "grey") for p in pts],
                    alpha=0.45, label="p99")
        ax.bar_label(b1, labels=[f"{p[1]:.2g}" for p in pts], fontsize=6)
        ax.bar_label(b2, labels=[f"{p[2]:.2g}" for p in pts], fontsize=6)
        ax.set_xticks(list(xs), [SHORT.get(p[0], p[0]) for p in pts], fontsize=7)
        log_axis(ax)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.legend(fontsize=7, loc="upper left")
    cpu = find(records, None, "cpu", "efficiency_pct")
    bars(axes[0, 2], "cpu", "efficiency_pct",
         f"{cpu['n'] if cpu else ''} x 20 ms CPU tasks, parallel efficiency %",
         fmt=lambda v: f"{v:.0f}")
    axes[0, 2].axhline(97, color="grey", ls=":", lw=1)
    bars(axes[0, 3], "payload", "mb_per_s", "1 MB bytes argument each, MB/s", fmt=lambda v: f"{v:.0f}")
    bars(axes[1, 0], "startup", "startup_s", "start-up to first result, s (log)", log=True,
         fmt=lambda v: f"{v:.2g}")
    # Scaling: tiny-task throughput and CPU speed-up against the number of local workers.
    scale = [r for r in records if r["workload"] == "scaling"]
    ax = axes[1, 1]
    ax.set_title("CrowdCompute scaling: inc tasks/s", fontsize=10)
    tiny = sorted((r["workers"], r["value"]) for r in scale if r["metric"] == "tiny_tasks_per_s")
    if tiny:
        ax.plot([w for w, _ in tiny], [v for _, v in tiny], "o-", color=COLORS["crowdcompute"])
        ax.set_xscale("log", base=2)
        ax.set_xticks([w for w, _ in tiny], [str(w) for w, _ in tiny])
        ax.set_xlabel("local workers", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick(v)))
    ax = axes[1, 2]
    ax.set_title(f"CrowdCompute scaling: 20 ms CPU tasks ({facts['nproc']} cores)", fontsize=10)
    speed = sorted((r["workers"], r["value"]) for r in scale if r["metric"] == "cpu_speedup")
    if speed:
        ax.plot([w for w, _ in speed], [v for _, v in speed], "o-", color=COLORS["crowdcompute"], label="speed-up")
        ideal = [min(w, facts["nproc"] or 1) / speed[0][0] for w, _ in speed]
        ax.plot([w for w, _ in speed], ideal, ":", color="grey", label="ideal")
        ax.set_xscale("log", base=2)
        ax.set_xticks([w for w, _ in speed], [str(w) for w, _ in speed])
        ax.set_xlabel("local workers", fontsize=8)
        ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
    ax = axes[1, 3]
    ax.set_title("fleet (1 fast + 1 4x slow worker): efficiency %", fontsize=10)
    fleet = [r for r in records if r["workload"] == "fleet" and r["metric"] == "seconds"]
    if fleet:
        kinds = list(dict.fromkeys(r["tasks"] for r in fleet))
        modes = ["adaptive", "chunksize=1", "large"]
        width = 0.27
        for i, mode in enumerate(modes):
            ys = []
            for kind in kinds:
                match = [r for r in fleet if r["tasks"] == kind
                         and (r["batching"] == mode or (mode == "large" and r["batching"] not in modes[:2]))]
                ys.append(match[0]["efficiency_pct"] if match else 0)
            b = ax.bar([k + (i - 1) * width for k in range(len(kinds))], ys, width,
                       label=mode if mode != "large" else "chunksize=N/8", alpha=[1, 0.4, 0.7][i],
                       color=["#d62728", "#7f7f7f", "#8c564b"][i])
            ax.bar_label(b, labels=[f"{y:.0f}" for y in ys], fontsize=7)
        labels = []
        for kind in kinds:
            r = next(r for r in fleet if r["tasks"] == kind)
            labels.append(f"{count(r['n'])} x {r['task_seconds'] * 1000:g} ms")
        ax.set_xticks(range(len(kinds)), labels, fontsize=8)
        ax.set_ylim(0, 115)
        ax.legend(fontsize=7, loc="upper right", ncol=3)
    for ax in axes.flat:
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path

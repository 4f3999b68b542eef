"""``python -m worker ws://HOST:PORT [--token T] [--concurrency N] ...``: run a worker until stopped.

Every flag can also be set by an environment variable (shown in ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from foreman import protocol
from foreman.tls import parse_fingerprint
from worker import malloc, polling
from foreman.version import VERSION
from worker.config import WorkerConfig, default_worker_id, unsupported_platform
from worker.limits import format_size, parse_size
from worker.prefs import Prefs
from worker.sysinfo import cpu_count
from worker.worker import FatalConnectionError, Worker


def _env(name: str, default: str | None = None) -> str | None:
    """A flag's default from the environment, as a string: argparse converts it with the flag's ``type``, so a
    malformed value is a usage error like a malformed flag."""
    return os.environ.get(f"CROWDCOMPUTE_{name}", default)


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that shows the parser's own message for a bad value."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"must be a number of seconds > 0, got {text!r}")
    return value


#: The owner's preferences as flags: (name in Prefs, type, metavar, help). Each overrides the --config file.
PREFS_FLAGS: list[tuple[str, Callable[[str], Any], str, str]] = [
    ("max_owner_cpu", float, "PCT", "pause while your own programs use more than PCT %% of the machine"),
    ("resume_owner_cpu", float, "PCT", "resume once they use less than PCT %% (default: half of --max-owner-cpu)"),
    ("min_user_idle", float, "S", "pause when the keyboard or mouse was used in the last S seconds (X11 with "
                                  "xprintidle; elsewhere the rule is skipped)"),
    ("resume_user_idle", float, "S", "resume once they were left alone S seconds (default: 2 x --min-user-idle)"),
    ("min_battery", float, "PCT", "pause while on battery below PCT %%"),
    ("max_cpu_temp", float, "C", "pause while the CPU is hotter than C degrees Celsius (where sensors exist)"),
    ("active_hours", lambda text: tuple(w.strip() for w in text.split(",") if w.strip()), "HH:MM-HH:MM,...",
     "run only inside these daily windows, e.g. 19:00-08:00"),
    ("max_cores", int, "N", "run at most N tasks at once"),
    ("max_cpu", float, "PCT", "task processes together use at most PCT %% of the machine (POSIX)"),
    ("pause_grace", float, "S", "on a pause, running tasks get S seconds to finish before going back (default 30)"),
    ("pause_after", float, "S", "a rule must object S seconds before the worker pauses (default 10)"),
    ("resume_after", float, "S", "no rule may object for S seconds before the worker resumes (default 60)"),
    ("sample_interval", float, "S", "seconds between readings of the machine (default 2)"),
]


def _add_prefs_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the owner's preferences", "when the worker steps aside for you, and how "
                                      "much of the machine it may use (docs/worker-api.md)")
    group.add_argument("--config", metavar="FILE", help="a TOML file of these preferences (same names, with _)")
    group.add_argument("--pause-on-battery", action="store_const", const=True, default=None,
                       help="pause while the machine runs on battery")
    for name, convert, metavar, text in PREFS_FLAGS:
        group.add_argument(f"--{name.replace('_', '-')}", type=_checked(convert), metavar=metavar, help=text)


def _prefs(args: argparse.Namespace) -> Prefs:
    """The preferences of the --config file, overridden by the flags given; ValueError saying what is wrong."""
    names = ["pause_on_battery", *(name for name, *_ in PREFS_FLAGS)]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return Prefs.load(args.config, **given) if args.config else Prefs(**given)


def build_parser(prog: str = "python -m worker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a CrowdCompute worker: dial out to a foreman and run the tasks it sends. Runs on "
                    "Linux and macOS.",
        epilog="Environment variables: CROWDCOMPUTE_FOREMAN, CROWDCOMPUTE_TOKEN, CROWDCOMPUTE_CONCURRENCY, "
               "CROWDCOMPUTE_WORKER_ID, CROWDCOMPUTE_CAPABILITIES, CROWDCOMPUTE_HEARTBEAT_INTERVAL, "
               "CROWDCOMPUTE_DRAIN_TIMEOUT, CROWDCOMPUTE_MAX_MESSAGE_SIZE, CROWDCOMPUTE_LOG_LEVEL, "
               "CROWDCOMPUTE_DASHBOARD_HOST, CROWDCOMPUTE_DASHBOARD_PORT, CROWDCOMPUTE_DASHBOARD_TOKEN, "
               "CROWDCOMPUTE_CAFILE, CROWDCOMPUTE_FINGERPRINT, CROWDCOMPUTE_MAX_TASK_SECONDS, "
               "CROWDCOMPUTE_MAX_MEMORY. The dashboard needs the web stack: pip install 'crowdcompute[dashboard]'.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument("foreman_url", nargs="?", default=_env("FOREMAN", "ws://127.0.0.1:9000"),
                        help="the foreman's address, ws://HOST:PORT, or wss://HOST:PORT for TLS, or unix:PATH "
                             "for the private socket of a foreman on this machine (env CROWDCOMPUTE_FOREMAN; "
                             "default ws://127.0.0.1:9000); an address printed as ws://HOST:PORT/?token=T carries "
                             "the token (--token wins)")
    parser.add_argument("--token", default=_env("TOKEN"), help="shared secret the foreman expects "
                        "(env CROWDCOMPUTE_TOKEN; prefer the variable: command lines are visible to other users)")
    parser.add_argument("--token-stdin", action="store_true",
                        help="read the token from the first line of standard input, then close it: a secret no "
                             "task process can read from this worker's environment or command line (how a "
                             "foreman hands its local workers theirs)")
    parser.add_argument("--concurrency", type=int, default=_env("CONCURRENCY", str(cpu_count())),
                        help="tasks run at once, each in its own process (env CROWDCOMPUTE_CONCURRENCY; "
                             "default: CPU count)")
    parser.add_argument("--worker-id", default=_env("WORKER_ID") or default_worker_id(),
                        help="stable name of this worker (env CROWDCOMPUTE_WORKER_ID; default: hostname plus a "
                             "random suffix)")
    parser.add_argument("--capabilities", default=_env("CAPABILITIES", ""),
                        help="comma-separated labels jobs may require, e.g. gpu,high-memory (env "
                             "CROWDCOMPUTE_CAPABILITIES; default: none)")
    parser.add_argument("--heartbeat-interval", type=float, default=_env("HEARTBEAT_INTERVAL", "5"),
                        help="seconds between heartbeats until the foreman sets its own (env "
                             "CROWDCOMPUTE_HEARTBEAT_INTERVAL; default 5)")
    parser.add_argument("--drain-timeout", type=float, default=_env("DRAIN_TIMEOUT", "30"),
                        help="on SIGTERM, seconds running tasks get to finish before being handed back (env "
                             "CROWDCOMPUTE_DRAIN_TIMEOUT; default 30)")
    parser.add_argument("--max-message-size", type=_checked(parse_size), metavar="SIZE",
                        default=_env("MAX_MESSAGE_SIZE", format_size(protocol.DEFAULT_MAX_MESSAGE_SIZE)),
                        help="largest message taken from the foreman, e.g. 256M: a task's pickled argument must "
                             "fit; bounds this worker's memory per message (env CROWDCOMPUTE_MAX_MESSAGE_SIZE; "
                             "default 64M, the foreman's default)")
    parser.add_argument("--no-reconnect", action="store_true", help="exit when the connection drops")
    parser.add_argument("--cafile", default=_env("CAFILE"),
                        help="wss:// only: verify the foreman's certificate against this PEM CA file instead of "
                             "the system's CA store (env CROWDCOMPUTE_CAFILE)")
    parser.add_argument("--fingerprint", type=_checked(parse_fingerprint), default=_env("FINGERPRINT"),
                        metavar="sha256:HEX",
                        help="wss:// only: accept only a foreman certificate with this SHA-256 fingerprint (its "
                             "operator gets it from python -m foreman --print-fingerprint CERT; env "
                             "CROWDCOMPUTE_FINGERPRINT)")
    parser.add_argument("--max-task-seconds", type=_checked(_seconds), default=_env("MAX_TASK_SECONDS"),
                        metavar="S", help="your cap on one task's run time: a task running longer fails with "
                                          "TaskTimeoutError (env CROWDCOMPUTE_MAX_TASK_SECONDS)")
    parser.add_argument("--max-memory", type=_checked(parse_size), default=_env("MAX_MEMORY"), metavar="SIZE",
                        help="your cap on a task process's memory (address space), e.g. 512M or 2G: a task "
                             "allocating more gets MemoryError (env CROWDCOMPUTE_MAX_MEMORY; POSIX)")
    parser.add_argument("--dashboard-host", default=_env("DASHBOARD_HOST", "127.0.0.1"),
                        help="address of the dashboard and HTTP API (default 127.0.0.1; any other needs a "
                             "--dashboard-token or --insecure)")
    parser.add_argument("--dashboard-port", type=int, default=_env("DASHBOARD_PORT", "8001"),
                        help="its port (default 8001; when taken, the next free one; 0: any free port)")
    parser.add_argument("--dashboard-token", default=_env("DASHBOARD_TOKEN"),
                        help="secret needed to restart the worker or watch it live (env CROWDCOMPUTE_DASHBOARD_TOKEN;"
                             " not the foreman's token)")
    parser.add_argument("--no-dashboard", action="store_true", help="no dashboard or HTTP API (tiny devices)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a dashboard beyond localhost without a token: anyone who reaches it can "
                             "restart this worker")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING or ERROR (env CROWDCOMPUTE_LOG_LEVEL; default INFO)")
    _add_prefs_flags(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m worker") -> int:
    args = build_parser(prog).parse_args(argv)
    refusal = unsupported_platform()
    if refusal is not None:
        print(f"worker: {refusal}", file=sys.stderr)
        return 2
    if args.token_stdin:
        args.token = sys.stdin.readline().strip() or None
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the pipe is closed: nothing left to read through /proc/<worker>/fd/0
        os.close(devnull)
    os.environ.pop("CROWDCOMPUTE_TOKEN", None)  # task processes inherit the environment: not the credential
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = WorkerConfig(
            foreman_url=args.foreman_url, worker_id=args.worker_id, token=args.token,
            max_concurrent_tasks=args.concurrency, auto_restart=not args.no_reconnect,
            heartbeat_interval=args.heartbeat_interval, drain_timeout=args.drain_timeout,
            capabilities=[c.strip() for c in args.capabilities.split(",") if c.strip()],
            parent_pid=args.parent_pid, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
            dashboard_port=args.dashboard_port, dashboard_token=args.dashboard_token,
            dashboard_insecure=args.insecure, cafile=args.cafile, fingerprint=args.fingerprint,
            max_task_seconds=args.max_task_seconds, max_memory=args.max_memory, prefs=_prefs(args),
            max_message_size=args.max_message_size)
    except ValueError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    malloc.reuse_large_blocks()
    try:
        worker = Worker(config)
        if worker.polls:
            polling.run(worker.run(), polling.PollingSelector(worker.may_poll))
        else:
            asyncio.run(worker.run())
    except (FatalConnectionError, RuntimeError) as exc:  # RuntimeError: a preference this machine cannot honour
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

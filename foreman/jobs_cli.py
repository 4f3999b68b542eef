"""``crowdcompute jobs``: list, inspect, fetch and cancel the stored jobs of a standalone foreman.

A thin wrapper over the client API (``Foreman.connect(...).jobs()``, ``.job(id)``), so it sees exactly what a
script with the same token sees: its own jobs, or every job with the admin token.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from typing import Any


def build_parser(prog: str = "crowdcompute jobs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="List and inspect the stored jobs (detached jobs, remote clients' "
                                                 "jobs) of a standalone foreman. The connection flags may come "
                                                 "before or after the command: jobs list --address ws://H:9000.")
    _add_connection_flags(parser, defaults=True)
    # The same flags after the command: SUPPRESS keeps a value given before it unless given again after.
    connection = argparse.ArgumentParser(add_help=False)
    _add_connection_flags(connection, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,show,results,cancel}")
    listing = commands.add_parser("list", help="the stored jobs, newest first", parents=[connection])
    listing.add_argument("--state", choices=["running", "done", "cancelled", "failed"])
    listing.add_argument("--json", action="store_true", help="one JSON object per job")
    for name, text in (("show", "one job's record"), ("results", "a job's results, one per line, when it is "
                                                                   "over"), ("cancel", "cancel a running job")):
        command = commands.add_parser(name, help=text, parents=[connection])
        command.add_argument("job", type=int)
        if name == "results":
            command.add_argument("--timeout", type=float, default=None, help="seconds to wait for the end")
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    def default(value: str | None) -> str | None:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--address", default=default(os.environ.get("CROWDCOMPUTE_FOREMAN", "ws://127.0.0.1:9000")),
                        help="the foreman's ws:// or wss:// address (env CROWDCOMPUTE_FOREMAN; default "
                             "ws://127.0.0.1:9000)")
    parser.add_argument("--token", default=default(os.environ.get("CROWDCOMPUTE_TOKEN")),
                        help="a client token of the foreman, or its admin token (env CROWDCOMPUTE_TOKEN)")
    parser.add_argument("--cafile", default=default(None),
                        help="wss:// only: verify the foreman's certificate with this CA file")
    parser.add_argument("--fingerprint", default=default(None),
                        help="wss:// only: accept only this certificate fingerprint")


def main(argv: list[str] | None = None, prog: str = "crowdcompute jobs") -> int:
    args = build_parser(prog).parse_args(argv)
    from foreman.client import Foreman
    from foreman.errors import CrowdComputeError

    try:
        fm = Foreman.connect(args.address, token=args.token, cafile=args.cafile, fingerprint=args.fingerprint)
    except (OSError, ValueError, CrowdComputeError) as exc:  # refused, unreachable, a bad address or token
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 2
    with fm:
        try:
            return _run(fm, args, prog)
        except (LookupError, CrowdComputeError, concurrent.futures.TimeoutError) as exc:
            print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
            return 1


def _one_line(exc: BaseException) -> str:
    """An error as one line: its message (a LookupError's without the quotes), else its type's name."""
    text = str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _run(fm: Any, args: argparse.Namespace, prog: str) -> int:
    if args.command == "list":
        jobs = fm.jobs(state=args.state)
        if args.json:
            for job in jobs:
                print(json.dumps(job))
            return 0
        print(f"{'id':>6}  {'state':<9} {'done':>9} {'total':>9}  {'owner':<12} {'created':<19}  name")
        for job in jobs:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created"]))
            total = "?" if job["total"] is None else job["total"]
            print(f"{job['id']:>6}  {job['state']:<9} {job['done'] + job['failed']:>9} {total:>9}  "
                  f"{job['owner']:<12} {created:<19}  {job['name']}")
        return 0
    if args.command == "show":
        print(json.dumps(fm.job(args.job).info(), indent=2))
        return 0
    job = fm.job(args.job)
    if args.command == "cancel":
        state = job.state
        if state != "running":
            print(f"{prog}: job {args.job} is already {state}: nothing to cancel", file=sys.stderr)
            return 1
        job.cancel()
        print(f"job {args.job} cancelled")
        return 0
    try:
        results = job.results(timeout=args.timeout, return_exceptions=True)
    except concurrent.futures.CancelledError:
        print(f"{prog}: job {args.job} was cancelled: it has no complete results ({prog} show {args.job} "
              "counts what was done)", file=sys.stderr)
        return 1
    for value in results:
        print(repr(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())

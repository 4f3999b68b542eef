"""``crowdcompute jobs``: list, inspect, fetch and cancel the stored jobs of a standalone foreman.

A thin wrapper over the client API (``Foreman.connect(...).jobs()``, ``.job(id)``), so it sees exactly what a
script with the same token sees: its own jobs, or every job with the admin token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crowdcompute jobs",
                                     description="List and inspect the stored jobs (detached jobs, remote clients' "
                                                 "jobs) of a standalone foreman.")
    parser.add_argument("--address", default=os.environ.get("CROWDCOMPUTE_FOREMAN", "ws://127.0.0.1:9000"),
                        help="the foreman's ws:// or wss:// address (env CROWDCOMPUTE_FOREMAN; default "
                             "ws://127.0.0.1:9000)")
    parser.add_argument("--token", default=os.environ.get("CROWDCOMPUTE_TOKEN"),
                        help="a client token of the foreman, or its admin token (env CROWDCOMPUTE_TOKEN)")
    parser.add_argument("--cafile", help="wss:// only: verify the foreman's certificate with this CA file")
    parser.add_argument("--fingerprint", help="wss:// only: accept only this certificate fingerprint")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the stored jobs, newest first")
    listing.add_argument("--state", choices=["running", "done", "cancelled", "failed"])
    listing.add_argument("--json", action="store_true", help="one JSON object per job")
    for name, text in (("show", "one job's record"), ("results", "a job's results, one per line, when it is "
                                                                   "over"), ("cancel", "cancel a running job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job", type=int)
        if name == "results":
            command.add_argument("--timeout", type=float, default=None, help="seconds to wait for the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from foreman.client import Foreman

    try:
        fm = Foreman.connect(args.address, token=args.token, cafile=args.cafile, fingerprint=args.fingerprint)
    except (OSError, ValueError) as exc:
        print(f"crowdcompute jobs: {exc}", file=sys.stderr)
        return 2
    with fm:
        try:
            return _run(fm, args)
        except LookupError as exc:
            print(f"crowdcompute jobs: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 1


def _run(fm: Any, args: argparse.Namespace) -> int:
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
    if args.command == "cancel":
        fm.job(args.job).cancel()
        print(f"job {args.job} cancelled")
        return 0
    for value in fm.job(args.job).results(timeout=args.timeout, return_exceptions=True):
        print(repr(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())

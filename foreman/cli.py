"""The ``crowdcompute`` command: ``crowdcompute foreman ...``, ``crowdcompute worker ...`` and
``crowdcompute jobs ...``."""

from __future__ import annotations

import sys

USAGE = """usage: crowdcompute {foreman,worker,jobs} [options]

  crowdcompute foreman --port 9000 --token T     run a foreman (see: crowdcompute foreman --help)
  crowdcompute worker ws://HOST:9000 --token T   run a worker  (see: crowdcompute worker --help)
  crowdcompute jobs list --address ws://HOST:9000   list a foreman's stored jobs (see: crowdcompute jobs --help)
  crowdcompute --version                         print the version
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from foreman.version import VERSION

        print(f"crowdcompute {VERSION}")
        return 0
    command, rest = args[0], args[1:]
    if command == "foreman":
        from foreman.__main__ import main as run
    elif command == "worker":
        from worker.__main__ import main as run
    elif command == "jobs":
        from foreman.jobs_cli import main as run
    else:
        print(f"crowdcompute: unknown command {command!r}\n{USAGE}", end="", file=sys.stderr)
        return 2
    return run(rest, prog=f"crowdcompute {command}")


if __name__ == "__main__":
    sys.exit(main())

"""``python -m foreman [--host H] [--port P] [--token T] [--data-dir D] [--certfile C] [--local-workers N]``: run a
foreman as a service until stopped (SIGTERM, Ctrl-C). ``python -m foreman --print-fingerprint CERT`` prints the
fingerprint workers and clients can pin."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading

from foreman import protocol
from foreman.errors import PortInUseError
from foreman.version import VERSION


def build_parser(prog: str = "python -m foreman") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a CrowdCompute foreman: workers dial in to ws://HOST:PORT (wss:// with --certfile).",
        epilog="Environment variables: CROWDCOMPUTE_TOKEN, CROWDCOMPUTE_TOKEN_FILE, CROWDCOMPUTE_DATA_DIR, "
               "CROWDCOMPUTE_CERTFILE, CROWDCOMPUTE_KEYFILE, CROWDCOMPUTE_LOG_LEVEL. Scripts connect with "
               "Foreman.connect('ws://HOST:PORT', token=...) using the --token (which serves workers and "
               "clients alike) or a [clients] token of the --token-file.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs --token)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000; 0 picks a free one)")
    parser.add_argument("--token", default=os.environ.get("CROWDCOMPUTE_TOKEN"),
                        help="the admin secret: workers join with it, scripts connect with it as clients "
                             "(Foreman.connect, crowdcompute jobs), and the dashboard's controls need it "
                             "(env CROWDCOMPUTE_TOKEN; on loopback without it, the foreman makes up one and prints it)")
    parser.add_argument("--token-file", default=os.environ.get("CROWDCOMPUTE_TOKEN_FILE"),
                        help="TOML file of per-worker and per-client tokens ([workers] name = \"token\", "
                             "[clients] ...), re-read when it changes (env CROWDCOMPUTE_TOKEN_FILE)")
    parser.add_argument("--data-dir", default=os.environ.get("CROWDCOMPUTE_DATA_DIR"),
                        help="keep stored jobs (remote clients', detached ones), their results and the worker "
                             "history in DATA_DIR/journal.sqlite, so that a restarted foreman resumes them "
                             "(env CROWDCOMPUTE_DATA_DIR; default: in memory, lost on exit)")
    parser.add_argument("--retention", type=float, default=7 * 86400,
                        help="seconds a finished stored job and its results are kept (default 7 days)")
    parser.add_argument("--client-grace", type=float, default=300.0,
                        help="seconds a remote client may be gone before its jobs (not detached ones) are "
                             "cancelled (default 300)")
    parser.add_argument("--certfile", default=os.environ.get("CROWDCOMPUTE_CERTFILE"),
                        help="PEM certificate (chain): serve wss:// and the dashboard over https; workers verify "
                             "it with --cafile or pin it with --fingerprint (env CROWDCOMPUTE_CERTFILE)")
    parser.add_argument("--keyfile", default=os.environ.get("CROWDCOMPUTE_KEYFILE"),
                        help="the certificate's PEM private key, if not in --certfile (env CROWDCOMPUTE_KEYFILE)")
    parser.add_argument("--print-fingerprint", metavar="CERT",
                        help="print the SHA-256 fingerprint of a PEM certificate (for a worker's --fingerprint) "
                             "and exit")
    parser.add_argument("--http-port", type=int, default=None,
                        help="port of the dashboard, JSON API and metrics (default: --port + 1)")
    parser.add_argument("--no-dashboard", action="store_true", help="serve no HTTP dashboard or API")
    parser.add_argument("--local-workers", type=int, default=0,
                        help="worker processes to start on this machine (default 0)")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0,
                        help="seconds between worker heartbeats (default 5)")
    parser.add_argument("--heartbeat-timeout", type=float, default=30.0,
                        help="seconds of silence after which a worker is declared lost (default 30)")
    parser.add_argument("--max-message-size", type=_size, default=protocol.DEFAULT_MAX_MESSAGE_SIZE,
                        metavar="SIZE",
                        help="largest message in either direction, e.g. 256M: a task's pickled argument or "
                             "result must fit in one; bounds the memory of each connection (default 64M; "
                             "workers and clients learn it when they connect)")
    parser.add_argument("--speculation", type=float, default=3.0, metavar="FACTOR",
                        help="at a job's tail, start a second copy of a batch running this many times longer than "
                             "the job's typical task on an idle worker, or held by a worker seen to be twice as "
                             "slow, first result wins (default 3; 0: never, so no task is ever run twice on "
                             "purpose)")
    parser.add_argument("--log-level", default=os.environ.get("CROWDCOMPUTE_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (env CROWDCOMPUTE_LOG_LEVEL)")
    parser.add_argument("--log-json", action="store_true",
                        help="log one JSON object per line, with job, task and worker ids as fields")
    return parser


def _size(text: str) -> int:
    """Bytes from ``"67108864"``, ``"256M"``, ``"1G"`` (K, M, G are powers of 1024), for --max-message-size."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    size = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()] if match else 0
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(f"give a size of at least 1M, e.g. 256M or 1G, not {text!r}")
    return size


def main(argv: list[str] | None = None, prog: str = "python -m foreman") -> int:
    args = build_parser(prog).parse_args(argv)
    from foreman.logs import configure_logging

    configure_logging(args.log_level, args.log_json)
    from foreman.addresses import is_loopback, split_token
    from foreman.tls import certificate_fingerprint

    if args.print_fingerprint:
        try:
            print(certificate_fingerprint(args.print_fingerprint))
        except (OSError, ValueError) as exc:
            print(f"foreman: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.keyfile and not args.certfile:
        print("foreman: --keyfile needs --certfile", file=sys.stderr)
        return 2

    if not is_loopback(args.host) and not (args.token or args.token_file):
        print("foreman: listening on a non-loopback address needs --token or --token-file (workers run the code "
              "this foreman sends, so it must not accept strangers)", file=sys.stderr)
        return 2
    from foreman.client import Foreman

    stop = threading.Event()

    def on_signal(sig: int, frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C or SIGTERM while stopping: stop at once, as kill -9 would
            print("foreman: stopping at once", file=sys.stderr, flush=True)
            os._exit(130)
        stop.set()

    # Both set explicitly: a foreman started with ``&`` from a shell script inherits an ignored SIGINT, and
    # Python then installs no KeyboardInterrupt for it (the worker does the same with its loop's handlers).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fm = Foreman(host=args.host, port=args.port, token=args.token, token_file=args.token_file,
                     local_workers=args.local_workers,
                     heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
                     speculation=args.speculation or None,
                     dashboard=not args.no_dashboard, http_port=args.http_port, certfile=args.certfile,
                     keyfile=args.keyfile, data_dir=args.data_dir, retention=args.retention,
                     client_grace=args.client_grace, max_message_size=args.max_message_size)
    except ValueError as exc:
        print(f"foreman: {exc}", file=sys.stderr)
        return 2
    except PortInUseError as exc:
        advice = ("choose another with --http-port, or serve none with --no-dashboard" if exc.role == "http_port"
                  else "choose another with --port (0 picks a free one)")
        print(f"foreman: {exc}: {advice}", file=sys.stderr)
        return 1
    except OSError as exc:  # another address error: a host name that does not resolve, a port not allowed
        print(f"foreman: cannot listen on {args.host} port {args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with fm:
        address, worker_token = split_token(fm.address)
        print(f"foreman ready at {address}", flush=True)
        if worker_token is not None:  # no token given: it made up its own (nobody connects without one)
            print(f"workers join with: python -m worker '{fm.address}'", flush=True)
            print(f"clients connect with: Foreman.connect({address!r}, token={fm.token!r})", flush=True)
        if args.certfile:
            print(f"workers pin its certificate with --fingerprint {certificate_fingerprint(args.certfile)} "
                  "(or verify it with --cafile)", flush=True)
        if fm.dashboard_url:
            print(f"dashboard at {fm.dashboard_login_url if worker_token else fm.dashboard_url}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        print("foreman stopping", flush=True)
    print("foreman stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The foreman's journal: stored jobs, their unfinished input, their results and the worker history, in SQLite.

With ``--data-dir`` the journal is a file (WAL mode), so a foreman killed mid-job and restarted resumes its stored
jobs: their unfinished input is queued again, finished results are still there, and the foreman keeps its session
id so that reconnecting workers hand in the work they held (see :mod:`foreman.recovery`). Without a data dir it is
an in-memory database: the same code path, nothing survives the process.

Only *stored* jobs are journaled: those of remote clients and detached jobs (see :mod:`foreman.stored`). An
embedded foreman's own ``map`` keeps its results in the calling process and never touches the journal.

Every write commits before the foreman acts on it (forwards a result, confirms input), so what a client was told
is never lost by a crash. Writes are per batch, never per task: one result batch is one row. In WAL mode with
``synchronous=NORMAL`` a commit is a write to the log without an fsync, so it survives the process being killed
(not the machine losing power) and costs tens of microseconds. All calls happen on the foreman's event loop thread.

After a power loss the last commits may be gone, among them results already sent to a client: their tasks run
again. Their new results must not reuse the sequence numbers the client already has (it would drop them as seen),
so each opening of a journal file bumps an *epoch*, written with an fsync (``synchronous=FULL``) before anything
else, and a job's results from then on are numbered from ``epoch << 32`` (:attr:`Journal.seq_floor`) or later:
above any number handed out before, whether or not it reached the disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    call TEXT NOT NULL,
    function BLOB NOT NULL,
    options TEXT NOT NULL,
    total INTEGER,
    detached INTEGER NOT NULL,
    fed INTEGER NOT NULL DEFAULT 0,
    input_closed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'running',
    error TEXT,
    tasks_done INTEGER NOT NULL DEFAULT 0,
    tasks_failed INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS inputs (
    job INTEGER NOT NULL, start INTEGER NOT NULL, count INTEGER NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (job, start));
CREATE TABLE IF NOT EXISTS outputs (
    job INTEGER NOT NULL, seq INTEGER NOT NULL, start INTEGER NOT NULL, count INTEGER NOT NULL,
    status TEXT NOT NULL, payload BLOB NOT NULL, error TEXT, elapsed REAL NOT NULL, worker TEXT,
    PRIMARY KEY (job, seq));
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, principal TEXT, address TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    connected INTEGER NOT NULL, sessions INTEGER NOT NULL DEFAULT 1, left_reason TEXT);
"""

#: Job states in the journal: ``running`` jobs are resumed after a restart; the others (the JOB_END states of
#: the protocol) are kept until the retention has passed.
RUNNING = "running"

#: Pages (4 KiB) of write-ahead log between checkpoints.
WAL_CHECKPOINT_PAGES = 4096

#: Seconds a finished, not detached job stays listed once its client has acknowledged all its results.
ACKED_JOB_RETENTION = 60.0

#: Departed workers the ``workers`` table keeps (the most recently seen), and for how long at most: bounds the
#: table (about 200 bytes a row: 10,000 rows are about 2 MiB) however many worker ids come and go. Pruned by
#: :meth:`Journal.purge` at most every :data:`WORKER_PRUNE_INTERVAL` seconds, so the table holds at most this many
#: departed rows plus the workers that left within that interval.
MAX_DEPARTED_WORKERS = 10_000
DEPARTED_WORKER_RETENTION = 30 * 86400.0
WORKER_PRUNE_INTERVAL = 10.0


@dataclass
class JobRow:
    """A stored job as the journal holds it."""

    id: int
    owner: str
    name: str
    digest: str
    call: str
    function: bytes
    options: dict[str, Any]
    total: int | None
    detached: bool
    fed: int
    input_closed: bool
    state: str
    error: str | None
    tasks_done: int
    tasks_failed: int
    next_seq: int
    created: float
    finished: float | None

    def summary(self) -> dict[str, Any]:
        """The JSON-able description clients and the CLI see."""
        return {"id": self.id, "owner": self.owner, "name": self.name, "state": self.state,
                "detached": self.detached, "total": self.total, "submitted": self.fed,
                "input_closed": self.input_closed, "done": self.tasks_done, "failed": self.tasks_failed,
                "created": self.created, "finished": self.finished, "error": self.error}


@dataclass(frozen=True)
class Output:
    """One result batch of a stored job: ``status`` is ``ok`` (payload: pickled results) or ``failed``
    (``error``: JSON of the exception's type name and message)."""

    job: int
    seq: int
    start: int
    count: int
    status: str
    payload: bytes
    error: str | None
    elapsed: float
    worker: str | None


class Journal:
    """SQLite storage of stored jobs. ``path`` None: in memory.

    :param retention: seconds a finished job (its results, for a detached one) is kept before
        :meth:`purge` deletes it.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, retention: float = 7 * 86400) -> None:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path) if path is not None else ":memory:"
        self.retention = retention
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (which fsync) every 16 MiB of log rather than 4: input and result batches are large
            # rows that are soon deleted again. The log is cut back to 64 MiB after a checkpoint.
            self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            self.db.execute("PRAGMA journal_size_limit=67108864")
        self.db.executescript(SCHEMA)
        self._saved: dict[str, str] = {}  # name -> the JSON last written by save_state
        self._workers_pruned = 0.0  # when purge last pruned the workers table
        #: Result sequence numbers of this run start here at least (see the module docstring); 0 in memory.
        self.seq_floor = self._next_epoch() << 32 if path is not None else 0

    def _next_epoch(self) -> int:
        """Count this opening of the file, durably (fsynced) before any result is numbered."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        epoch = int(row[0]) + 1 if row is not None else 1
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))
        self.db.execute("PRAGMA synchronous=NORMAL")
        return epoch

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Statements that commit together or not at all (outside one, each statement commits by itself)."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @property
    def persistent(self) -> bool:
        return self.path != ":memory:"

    def close(self) -> None:
        self.db.close()

    # -- identity --------------------------------------------------------------------------------------------

    def session(self) -> str:
        """The foreman's session id: new for an in-memory journal, kept across restarts for a file."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()
        if row is not None:
            return str(row[0])
        session = uuid.uuid4().hex[:12]
        self.db.execute("INSERT INTO meta VALUES ('session', ?)", (session,))
        return session

    def last_job_id(self) -> int:
        """The highest job id ever journaled, so new ids never reuse a stored job's."""
        row = self.db.execute("SELECT MAX(CAST(value AS INTEGER)) FROM meta WHERE key = 'last_job'").fetchone()
        return int(row[0] or 0)

    def reserve_job_id(self, job_id: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_job', ?)", (str(job_id),))

    # -- jobs ------------------------------------------------------------------------------------------------

    def add_job(self, job_id: int, owner: str, name: str, digest: str, call: str, function: bytes,
                options: dict[str, Any], total: int | None, detached: bool) -> None:
        with self._transaction():
            self.db.execute("INSERT INTO jobs (id, owner, name, digest, call, function, options, total, detached,"
                            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (job_id, owner, name, digest, call, function, json.dumps(options), total, detached,
                             time.time()))
            self.reserve_job_id(job_id)

    def add_input(self, job_id: int, start: int, count: int, payload: bytes | memoryview) -> None:
        with self._transaction():
            self.db.execute("INSERT INTO inputs VALUES (?, ?, ?, ?)", (job_id, start, count, payload))
            self.db.execute("UPDATE jobs SET fed = ? WHERE id = ?", (start + count, job_id))

    def close_input(self, job_id: int) -> None:
        self.db.execute("UPDATE jobs SET input_closed = 1 WHERE id = ?", (job_id,))

    def add_output(self, output: Output) -> None:
        """Store a result batch and drop the input it answers, in one transaction."""
        failed = output.count if output.status != "ok" else 0
        with self._transaction():
            self.db.execute("INSERT INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (output.job, output.seq, output.start, output.count, output.status, output.payload,
                             output.error, output.elapsed, output.worker))
            self.db.execute("DELETE FROM inputs WHERE job = ? AND start >= ? AND start < ?",
                            (output.job, output.start, output.start + output.count))
            self.db.execute("UPDATE jobs SET next_seq = ?, tasks_done = tasks_done + ?,"
                            " tasks_failed = tasks_failed + ? WHERE id = ?",
                            (output.seq + 1, output.count - failed, failed, output.job))

    def acknowledge(self, job_id: int, seq: int) -> None:
        """The client has results up to ``seq``: they need not be kept (unless the job is detached)."""
        self.db.execute("DELETE FROM outputs WHERE job = ? AND seq <= ? AND job NOT IN"
                        " (SELECT id FROM jobs WHERE detached)", (job_id, seq))

    def finish_job(self, job_id: int, state: str, error: str | None = None) -> None:
        with self._transaction():
            self.db.execute("UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ?",
                            (state, error, time.time(), job_id))
            self.db.execute("DELETE FROM inputs WHERE job = ?", (job_id,))

    def delete_job(self, job_id: int) -> None:
        with self._transaction():
            for table, column in (("jobs", "id"), ("inputs", "job"), ("outputs", "job")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))

    def purge(self, now: float | None = None) -> list[int]:
        """Delete finished jobs older than the retention, and a client's (not detached) finished jobs a minute
        after it has all their results; returns their ids. Prunes departed workers too (:meth:`prune_workers`)."""
        now = time.time() if now is None else now
        ids = [row[0] for row in self.db.execute(
            "SELECT id FROM jobs WHERE state != 'running' AND (finished < ? OR (NOT detached AND finished < ?"
            " AND NOT EXISTS (SELECT 1 FROM outputs WHERE job = jobs.id)))",
            (now - self.retention, now - ACKED_JOB_RETENTION))]
        for job_id in ids:
            self.delete_job(job_id)
        if now - self._workers_pruned >= WORKER_PRUNE_INTERVAL:
            self._workers_pruned = now
            self.prune_workers(now)
        return ids

    # -- reading ---------------------------------------------------------------------------------------------

    def job(self, job_id: int) -> JobRow | None:
        row = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_row(row) if row is not None else None

    def jobs(self, owner: str | None = None, state: str | None = None) -> list[JobRow]:
        """Stored jobs, newest first; only ``owner``'s when given; only in ``state`` when given."""
        query, args = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE 1", []
        if owner is not None:
            query, args = query + " AND owner = ?", [*args, owner]
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        return [_job_row(row) for row in self.db.execute(query + " ORDER BY id DESC", args)]

    def inputs(self, job_id: int) -> list[tuple[int, int, bytes]]:
        """A job's input batches that have no result yet, in order."""
        return [(start, count, bytes(payload)) for start, count, payload in self.db.execute(
            "SELECT start, count, payload FROM inputs WHERE job = ? ORDER BY start", (job_id,))]

    def outputs(self, job_id: int, after: int = 0, limit: int = -1) -> Iterator[Output]:
        """A job's stored result batches with ``seq > after``, in order; the first ``limit`` only if >= 0."""
        rows = self.db.execute("SELECT job, seq, start, count, status, payload, error, elapsed, worker FROM outputs"
                               " WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, after, limit)).fetchall()
        for row in rows:
            yield Output(*row[:5], bytes(row[5]), *row[6:])

    # -- state of other parts --------------------------------------------------------------------------------

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """Keep a part's JSON-able state (the credit ledger, reputations) under ``name``; written only when it
        changed since the last save."""
        text = json.dumps(state, sort_keys=True)
        if self._saved.get(name) != text:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"state:{name}", text))
            self._saved[name] = text

    def load_state(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"state:{name}",)).fetchone()
        if row is None:
            return None
        self._saved[name] = row[0]
        return dict(json.loads(row[0]))

    # -- workers ---------------------------------------------------------------------------------------------

    def worker_joined(self, worker_id: str, principal: str, address: str) -> None:
        now = time.time()
        self.db.execute("INSERT INTO workers (id, principal, address, first_seen, last_seen, connected)"
                        " VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT(id) DO UPDATE SET principal = excluded.principal,"
                        " address = excluded.address, last_seen = excluded.last_seen, connected = 1,"
                        " sessions = sessions + 1, left_reason = NULL", (worker_id, principal, address, now, now))

    def worker_owner(self, worker_id: str) -> str | None:
        """The principal that registered ``worker_id`` (see :func:`foreman.admission.worker_id_refusal`); None if
        the journal does not know that id (never seen, or pruned)."""
        row = self.db.execute("SELECT principal FROM workers WHERE id = ?", (worker_id,)).fetchone()
        return None if row is None else row[0]

    def prune_workers(self, now: float | None = None, keep: int = MAX_DEPARTED_WORKERS,
                      retention: float = DEPARTED_WORKER_RETENTION) -> int:
        """Forget departed workers last seen more than ``retention`` seconds ago, and all but the ``keep`` most
        recently seen; returns how many were forgotten. Connected workers are never forgotten. A forgotten id is
        free again for any token (see :meth:`worker_owner`)."""
        now = time.time() if now is None else now
        cursor = self.db.execute(
            "DELETE FROM workers WHERE NOT connected AND (last_seen < ? OR id IN (SELECT id FROM workers WHERE NOT"
            " connected ORDER BY last_seen DESC LIMIT -1 OFFSET ?))", (now - retention, keep))
        return cursor.rowcount

    def worker_left(self, worker_id: str, reason: str) -> None:
        self.db.execute("UPDATE workers SET connected = 0, last_seen = ?, left_reason = ? WHERE id = ?",
                        (time.time(), reason, worker_id))

    def connected_workers(self) -> set[str]:
        """Workers the journal saw connected: after a crash, those that may hold stored jobs' work."""
        return {row[0] for row in self.db.execute("SELECT id FROM workers WHERE connected")}

    def worker_history(self) -> list[dict[str, Any]]:
        keys = ("id", "principal", "address", "first_seen", "last_seen", "connected", "sessions", "left_reason")
        return [dict(zip(keys, row)) for row in self.db.execute(
            f"SELECT {', '.join(keys)} FROM workers ORDER BY last_seen DESC")]

    def all_disconnected(self) -> None:
        """Mark every worker disconnected (a fresh start: none is connected to this process yet)."""
        self.db.execute("UPDATE workers SET connected = 0, left_reason = 'foreman restarted' WHERE connected")


_JOB_COLUMNS = ("id, owner, name, digest, call, function, options, total, detached, fed, input_closed, state, error,"
                " tasks_done, tasks_failed, next_seq, created, finished")


def _job_row(row: tuple[Any, ...]) -> JobRow:
    values = list(row)
    values[5] = bytes(values[5])
    values[6] = json.loads(values[6])
    values[8] = bool(values[8])
    values[10] = bool(values[10])
    return JobRow(*values)

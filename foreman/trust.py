"""The server's trust desk: replica results in, verdicts acted on; reputation, bans and credit kept.

Runs on the foreman's event loop, called from :class:`~foreman.server.ForemanServer`. The comparing is
:mod:`foreman.validation`'s, the bookkeeping :mod:`foreman.reputation`'s and :mod:`foreman.credit`'s; this module
moves results between them, the scheduler, the job's sink and the workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from foreman import protocol
from foreman.credit import Ledger
from foreman.errors import SerializationError
from foreman.protocol import Kind
from foreman.reputation import Reputation
from foreman.scheduler import Batch, State
from foreman.serialization import dumps_results, loads_results
from foreman.validation import Candidate, Verdict, decide

if TYPE_CHECKING:
    from foreman.server import ForemanServer, Peer, _JobRecord

log = logging.getLogger("crowdcompute.foreman")


@dataclass(frozen=True)
class Report:
    """What a worker said about its copy of a batch, for credit once the verdict is in."""

    volunteer: str
    elapsed: float
    cpu: float
    gpus: int


class Trust:
    """Validation of replicated batches, reputation and quarantine, operator bans, and the credit ledger."""

    def __init__(self, server: ForemanServer) -> None:
        self.server = server
        self.reputation = Reputation()
        self.ledger = Ledger()
        self._candidates: dict[tuple[int, int, int], list[Candidate]] = {}
        self._reports: dict[tuple[int, int, int], dict[str, Report]] = {}

    # -- credit ----------------------------------------------------------------------------------------------

    def report(self, peer: Peer, header: dict[str, Any]) -> Report:
        """The credit claims in a RESULTS header: elapsed seconds, CPU seconds (at most elapsed times the
        worker's CPUs), and the worker's GPU count. Self-reported by the worker."""
        elapsed = header.get("elapsed")
        elapsed = float(elapsed) if isinstance(elapsed, (int, float)) and elapsed >= 0 else 0.0
        cpu = header.get("cpu")
        cpus = peer.hello.get("cpu_count") if isinstance(peer.hello.get("cpu_count"), int) else 1
        cpu = min(float(cpu), elapsed * max(cpus, 1)) if isinstance(cpu, (int, float)) and cpu >= 0 else 0.0
        gpus = peer.hello.get("gpus")
        return Report(peer.principal.name, elapsed, cpu, len(gpus) if isinstance(gpus, list) else 0)

    def credit(self, worker_id: str, record: _JobRecord, count: int, report: Report, validated: int = 0) -> None:
        gpu_seconds = report.elapsed * report.gpus if record.wants_gpu else 0.0
        self.ledger.credit(worker_id, report.volunteer, count, report.cpu, gpu_seconds, validated)

    # -- replicated batches ----------------------------------------------------------------------------------

    def answer(self, peer: Peer, record: _JobRecord, header: dict[str, Any], payload: bytes | memoryview) -> None:
        """A worker's results for its copy of a batch of a validated job."""
        server, worker_id = self.server, peer.worker_id
        batch = server.scheduler.answer(worker_id, record.id, header["start"], header["count"])
        if batch is None:
            return
        if server.trusts(peer):
            self._decoded(peer, record, header, batch, payload, True)
            return
        # An untrusted worker's results are loaded with the restricted loader, and never on the event loop: a
        # thread decodes them, and the loop takes the verdict up again if the batch still waits for it.
        data = bytes(payload)
        decoding = asyncio.get_running_loop().run_in_executor(None, _try_loads, data, batch.count)
        decoding.add_done_callback(lambda done: self._decoded(peer, record, header, batch, done.result(), False))

    def _decoded(self, peer: Peer, record: _JobRecord, header: dict[str, Any], batch: Batch,
                 payload: Any, trusted: bool) -> None:
        server, worker_id = self.server, peer.worker_id
        if not trusted and (server.jobs.get(record.id) is not record or batch.state is not State.ASSIGNED):
            return  # the job or batch ended while its results were decoded
        try:
            if isinstance(payload, BaseException):
                raise payload
            results, errors = loads_results(payload, batch.count, True) if trusted else payload
        except SerializationError as exc:
            log.warning("worker %s sent unusable results for job %s: %s", worker_id, record.id, exc)
            if self.reputation.error(worker_id, peer.principal.trusted):
                self.bar(worker_id, self.reputation.barred(worker_id))
            server.scheduler.add_copies(batch, 1)
            return
        self._candidates.setdefault(batch.key, []).append(Candidate(worker_id, results, errors,
                                                                    peer.principal.trusted))
        self._reports.setdefault(batch.key, {})[worker_id] = self.report(peer, header)
        self._judge(record, batch)
        if not trusted:
            server._maybe_finish(record.id)
            server._pump()

    def _judge(self, record: _JobRecord, batch: Batch) -> None:
        """Ask for the verdict on a batch's candidates so far, and act on it."""
        server, candidates = self.server, self._candidates[batch.key]
        assert record.validation is not None
        verdict = decide(record.validation, candidates, batch.count, batch.copies - len(batch.answered),
                         len(batch.holders), batch.spot_check, batch.start, server.trust_workers)
        if verdict.more:
            server.scheduler.add_copies(batch, verdict.more)
            server.fleet.event(time.time(), "replica", f"job {record.id} tasks {batch.start}-"
                                                       f"{batch.start + batch.count - 1}: replicas disagree, "
                                                       f"{verdict.more} more copy asked for")
        elif verdict.finished:
            self._settle(record, batch, candidates, verdict)

    def _settle(self, record: _JobRecord, batch: Batch, candidates: list[Candidate], verdict: Verdict) -> None:
        server = self.server
        reports = self._reports.pop(batch.key)
        del self._candidates[batch.key]
        done = server.scheduler.settle(batch)
        for other in done.cancel_on:
            if other in server.peers:
                server.peers[other].send(protocol.encode(Kind.CANCEL, {"job": record.id, "start": batch.start}))
        trusted = {c.worker for c in candidates if c.trusted}
        checked = len(verdict.accepted) if len(candidates) > 1 else 0
        for worker_id in verdict.agreed:
            self.reputation.agreed(worker_id)
            self.credit(worker_id, record, batch.count, reports[worker_id], checked)
        for worker_id in verdict.disagreed:
            if self.reputation.disagreed(worker_id, worker_id in trusted):
                self.bar(worker_id, self.reputation.barred(worker_id))
        self._deliver(record, batch, verdict, reports)

    def _deliver(self, record: _JobRecord, batch: Batch, verdict: Verdict, reports: dict[str, Report]) -> None:
        """Hand the accepted results to the job, a run of consecutive tasks at a time; failed tasks one by one."""
        server, start = self.server, batch.start
        winner = verdict.accepted[min(verdict.accepted)].worker if verdict.accepted else ""
        elapsed = reports[winner].elapsed if winner else 0.0
        errors = sum(1 for o, c in verdict.accepted.items() if o in c.errors) + len(verdict.failed)
        described = [[o, "foreman.errors.ValidationError", str(e)[:300]] for o, e in verdict.failed.items()]
        server.fleet.batch_done(time.time(), winner or "?", record.id, start, batch.count, elapsed, errors,
                                described)
        offset = 0
        while offset < batch.count:
            if offset in verdict.failed:
                record.sink.fail(start + offset, 1, verdict.failed[offset])
                offset += 1
                continue
            end = offset
            while end < batch.count and end not in verdict.failed:
                end += 1
            results, errors_of_run = [], {}
            for o in range(offset, end):
                failed, value = verdict.accepted[o].outcome(o)
                if failed:
                    errors_of_run[o - offset] = value
                results.append(None if failed else value)
            record.sink.deliver(start + offset, end - offset, dumps_results(results, errors_of_run), elapsed,
                                verdict.accepted[offset].worker)
            offset = end
        server.checkpoints.drop(record.id, start, batch.count)

    def forget_job(self, job_id: int) -> None:
        """Drop the candidates of a finished (or cancelled) job."""
        for key in [k for k in self._candidates if k[0] == job_id]:
            del self._candidates[key]
            self._reports.pop(key, None)

    # -- quarantine and bans ---------------------------------------------------------------------------------

    def bar(self, worker_id: str, reason: str) -> None:
        """Give the worker no more work; what it holds goes back to the queue and is cancelled there."""
        server = self.server
        server.fleet.event(time.time(), "trust", f"worker {worker_id} {reason}")
        log.warning("worker %s %s", worker_id, reason)
        if worker_id not in server.scheduler.workers:
            return
        for batch in server.scheduler.bar(worker_id, reason):
            peer = server.peers.get(worker_id)
            if peer is not None:
                peer.send(protocol.encode(Kind.CANCEL, {"job": batch.job_id, "start": batch.start}))
            record = server.jobs.get(batch.job_id)
            if record is not None and batch.key in self._candidates:
                self._judge(record, batch)  # a spot check's trusted answer may now stand alone
                server._maybe_finish(batch.job_id)

    def ban(self, worker_id: str, reason: str = "") -> None:
        """An operator's ban (kept when the worker reconnects, until :meth:`unban`)."""
        self.reputation.ban(worker_id, f"banned by the operator{': ' + reason if reason else ''}")
        self.bar(worker_id, self.reputation.barred(worker_id))
        self.server._pump()

    def unban(self, worker_id: str) -> bool:
        """Lift a ban or a quarantine; False if the worker had neither."""
        if not self.reputation.unban(worker_id):
            return False
        self.server.fleet.event(time.time(), "trust", f"worker {worker_id} may work again")
        if worker_id in self.server.scheduler.workers:
            self.server.scheduler.unbar(worker_id)
            self.server._pump()
        return True


def _try_loads(data: bytes, count: int) -> Any:
    """An untrusted worker's result batch loaded with the restricted loader (off the loop), or the error."""
    try:
        return loads_results(data, count, trusted=False)
    except SerializationError as exc:
        return exc

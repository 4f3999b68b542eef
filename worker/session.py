"""The worker's session with its foreman, as pure state: when to dial again, which results the foreman still needs,
and what a closed connection or a stop keeps, hands back or drops.

No asyncio, no sockets, no clock reads: :class:`worker.worker.Worker` feeds it events (a connection was welcomed,
closed, refused; a batch finished; the foreman confirmed a result) with the time passed in, and acts on what it
returns. Tests drive it with a fake clock (tests/test_worker_session.py).

The lifecycle contract it implements (docs/protocol.md, "Lifecycle"):

* A connection that ends for any reason but the foreman's SHUTTING_DOWN close keeps the worker's running tasks and
  every result the foreman has not confirmed: they are handed in on the next connection to the same foreman
  session (a foreman restarted from its journal keeps its session), and the batches the worker still runs are
  announced in its HELLO (:meth:`Session.holding`), so that the foreman does not run them again.
* SHUTTING_DOWN (a foreman without stored jobs going away), or a WELCOME from another foreman session, drops
  them: that foreman will never ask for them.
* Reconnecting: the delay grows only while dialling fails, and resets at each WELCOME. For
  :attr:`Session.fast_window` seconds after a connection that worked was lost (a foreman restarting), the delay
  stays under :attr:`Session.fast_delay`, so that the fleet is back within about that long of the foreman
  listening again, however many times it restarted.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from foreman.protocol import CloseCode

#: A batch, as the foreman names it: (job id, first task, task count).
Key = tuple[int, int, int]


class Link(enum.Enum):
    """Where the session stands. Invariant: results are written to a connection only while WELCOMED."""

    DIALLING = "dialling"  # no connection yet, or dialling again after one ended
    WELCOMED = "welcomed"  # the foreman accepted us: messages flow
    STOPPED = "stopped"  # the worker is leaving: no more dialling


@dataclass
class Session:
    """Reconnect backoff, the outbox of results, and what a close or stop hands back.

    :param max_delay: cap of the reconnect backoff, in seconds (a foreman long gone is dialled this rarely).
    :param base: the first delay's cap; each failed dial doubles it, up to the cap in force.
    :param fast_delay: cap of the delay while a foreman that was just there may be restarting (``fast_window``
        seconds after a working connection was lost). Costs the foreman one refused dial per worker per
        ``fast_delay / 2`` seconds on average while it is down.
    :param fast_window: seconds after losing a working connection during which ``fast_delay`` caps the delay.
    :param rng: the jitter (full jitter: uniform from 0 to the cap), so that a fleet does not return in lockstep.

    Memory: the outbox holds every result message the foreman has not confirmed (a foreman with a journal
    confirms each with RECEIVED; one without, once written to the socket): at most the batches the worker ran
    since the last confirmation, each at most the message size limit.
    """

    max_delay: float = 30.0
    base: float = 0.05
    fast_delay: float = 0.5
    fast_window: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    link: Link = Link.DIALLING
    foreman: str | None = None  # the session id of the foreman whose work we hold (WELCOME's "session")
    confirms: bool = False  # that foreman journals results and confirms each (RECEIVED)
    attempt: int = 0  # dials failed since the last WELCOME
    lost_at: float | None = None  # when the last working connection ended
    connections: int = 0
    # Results not yet confirmed, in the order they finished: sent, or to send on the next connection.
    unconfirmed: dict[Key, bytes] = field(default_factory=dict)
    unsent: dict[Key, None] = field(default_factory=dict)  # those of them not written to a connection yet
    handed_back: int = 0  # batches given back unstarted (drain, pause, restart), for the final report
    dropped: int = 0  # results dropped because their foreman went away for good

    @property
    def connected(self) -> bool:
        return self.link is Link.WELCOMED

    # -- the connection --------------------------------------------------------------------------------------

    def welcomed(self, now: float, foreman: str, confirms: bool) -> tuple[bool, list[bytes]]:
        """The foreman accepted us. Returns (whether it is another foreman than the one whose work we hold, so
        that its tasks must be killed; the result messages to send it now, oldest first)."""
        assert self.link is Link.DIALLING, self.link
        other = foreman != self.foreman
        if other:
            self._forget()
            self.foreman = foreman
        self.link = Link.WELCOMED
        self.confirms = confirms
        self.attempt = 0
        self.lost_at = None
        self.connections += 1
        resend = list(self.unconfirmed.values())
        self.unsent.clear()
        if not confirms:  # a foreman without a journal confirms nothing: what is written is its
            self.unconfirmed.clear()
        return other, resend

    def closed(self, now: float, code: int | None, unwritten: Iterable[tuple[Key, bytes]] = ()) -> bool:
        """The connection ended (``code`` None: lost without a close frame); ``unwritten``: result messages still
        queued for it. Returns True if the foreman is gone for good (SHUTTING_DOWN): drop its work, kill its
        tasks. Otherwise everything is kept for the next connection."""
        if self.link is Link.WELCOMED:
            self.lost_at = now
        if self.link is not Link.STOPPED:
            self.link = Link.DIALLING
        for key, data in unwritten:
            self.unconfirmed[key] = data
            self.unsent[key] = None
        if code == CloseCode.SHUTTING_DOWN:
            self._forget()
            return True
        return False

    def refused(self, now: float) -> None:
        """A dial failed before any WELCOME (refused, timed out, closed during the handshake)."""
        if self.link is not Link.STOPPED:
            self.link = Link.DIALLING

    def next_delay(self, now: float) -> float:
        """Seconds to wait before the next dial; each call counts one more failed attempt."""
        fast = self.lost_at is not None and now - self.lost_at < self.fast_window
        cap = min(self.fast_delay, self.max_delay) if fast else self.max_delay
        delay = self.rng.uniform(0, min(cap, self.base * 2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay

    def stop(self) -> None:
        self.link = Link.STOPPED

    # -- results ---------------------------------------------------------------------------------------------

    def finished(self, key: Key, data: bytes) -> bool:
        """A batch's result message is ready. Returns True if it is to be written now; otherwise it waits for the
        next connection."""
        if self.connected:
            if self.confirms:
                self.unconfirmed[key] = data
            return True
        self.unconfirmed[key] = data
        self.unsent[key] = None
        return False

    def received(self, key: Key) -> None:
        """The foreman confirmed (journaled) a result: it will not need it again."""
        self.unconfirmed.pop(key, None)
        self.unsent.pop(key, None)

    def returned(self, count: int = 1) -> None:
        """Batches handed back unstarted (draining, pausing, restarting)."""
        self.handed_back += count

    def holding(self, running: list[Key]) -> dict[str, object]:
        """The HELLO's account of the work of the last foreman: batches still running here and results not
        confirmed, which a foreman restarted from its journal (same session) counts as in flight here."""
        if self.foreman is None:
            return {}
        held = [list(key) for key in running]
        held.extend(list(key) for key in self.unconfirmed)
        return {"foreman_session": self.foreman, "holding": held}

    def stop_report(self, running: int) -> str:
        """The worker's last line: what it handed back, and what it could not hand in."""
        parts = [f"handed back {self.handed_back} unstarted batch(es)"]
        if running:
            parts.append(f"{running} batch(es) still running were stopped and go back to the foreman")
        waiting = len(self.unconfirmed) - len(self.unsent)
        if self.unsent:
            parts.append(f"{len(self.unsent)} result(s) never reached the foreman and are lost with this process "
                         "(it runs those tasks again)")
        elif waiting:
            parts.append(f"every result was sent ({waiting} not yet confirmed)")
        else:
            parts.append("every result was handed in")
        return "stopped: " + "; ".join(parts)

    def _forget(self) -> None:
        self.dropped += len(self.unconfirmed)
        self.unconfirmed.clear()
        self.unsent.clear()
        self.foreman = None

"""The worker's session core (worker/session.py) driven by events under a fake clock: reconnect backoff, the outbox
of unconfirmed results, and what a close or a stop keeps, hands back or drops. No sockets, no sleeps."""

from __future__ import annotations

import random

import pytest

from foreman.protocol import CloseCode
from worker.session import Link, Session

FOREMAN = "session-a"


def welcomed(s: Session, now: float, foreman: str = FOREMAN, confirms: bool = True) -> tuple[bool, list[bytes]]:
    return s.welcomed(now, foreman, confirms)


def outage(s: Session, start: float, seconds: float) -> float:
    """Dial (and be refused) from ``start`` until ``seconds`` later, waiting as the session says; returns the time
    of the first dial at or after the end of the outage (when the foreman listens again)."""
    now = start
    while now < start + seconds:
        s.refused(now)
        now += s.next_delay(now)
    return now


@pytest.fixture
def s() -> Session:
    return Session(max_delay=30.0, rng=random.Random(7))


# -- reconnect backoff ---------------------------------------------------------------------------------------------


def test_backoff_grows_while_dialling_fails_and_resets_at_a_welcome(s: Session) -> None:
    caps = []
    for _ in range(12):
        s.refused(0.0)
        s.next_delay(0.0)
        caps.append(min(s.max_delay, s.base * 2 ** (s.attempt - 1)))
    assert caps == sorted(caps) and caps[-1] == s.max_delay  # never connected: grows up to the cap
    welcomed(s, 100.0)
    assert s.attempt == 0
    s.closed(101.0, CloseCode.GOING_AWAY)
    assert s.next_delay(101.0) <= s.base  # the first delay after a working connection is the shortest


def test_after_any_number_of_restarts_the_worker_is_back_within_a_second(s: Session) -> None:
    """The issue's case: a foreman restarted again and again, each time down for 4 s (and once for 40 s). The
    worker's first dial after it listens again comes within fast_delay (jitter included), every time."""
    now = 0.0
    welcomed(s, now)
    for outage_seconds in [4.0] * 20 + [40.0, 4.0, 0.5, 4.0]:
        now += 10.0
        s.closed(now, CloseCode.GOING_AWAY)
        back = outage(s, now, outage_seconds)
        assert back - (now + outage_seconds) <= s.fast_delay < 1.0
        now = back
        welcomed(s, now)


def test_a_foreman_gone_for_long_is_dialled_ever_more_rarely(s: Session) -> None:
    welcomed(s, 0.0)
    s.closed(0.0, None)
    now = 0.0
    delays = []
    while now < 3600:
        s.refused(now)
        delay = s.next_delay(now)
        delays.append((now, delay))
        now += delay
    late = [d for t, d in delays if t > s.fast_window + 60]
    assert max(d for _, d in delays) <= s.max_delay
    assert max(late) > 10 * s.fast_delay  # past the fast window the backoff grows to the cap
    assert len(delays) < 600  # an hour of a foreman being down costs a few hundred dials, not thousands


def test_never_connected_starts_with_exponential_backoff(s: Session) -> None:
    """A worker started before its foreman (or against a wrong address) backs off as before: no fast window."""
    assert s.lost_at is None
    s.refused(0.0)
    for _ in range(10):
        s.next_delay(0.0)
    assert s.base * 2 ** (s.attempt - 1) > s.fast_delay


# -- the outbox of results -----------------------------------------------------------------------------------------


def test_results_of_a_journaling_foreman_are_kept_until_confirmed_and_resent_after_a_restart(s: Session) -> None:
    welcomed(s, 0.0, confirms=True)
    assert s.finished((1, 0, 10), b"r0") is True  # written now, and kept
    assert s.finished((1, 10, 10), b"r1") is True
    s.received((1, 0, 10))
    assert s.holding([(1, 20, 10)]) == {"foreman_session": FOREMAN, "holding": [[1, 20, 10], [1, 10, 10]]}
    assert s.closed(1.0, CloseCode.GOING_AWAY) is False  # a graceful stop of a journaling foreman: keep it all
    assert s.finished((1, 20, 10), b"r2") is False  # finished while the foreman is down: waits
    other, resend = welcomed(s, 5.0, confirms=True)  # the same foreman session, restarted from its journal
    assert other is False
    assert resend == [b"r1", b"r2"]  # oldest first, the confirmed one not again


def test_unwritten_results_of_a_closed_connection_are_sent_on_the_next(s: Session) -> None:
    welcomed(s, 0.0, confirms=False)
    assert s.finished((1, 0, 1), b"a") is True  # a foreman without a journal: not kept once written
    assert s.finished((1, 1, 1), b"b") is True
    s.closed(1.0, None, unwritten=[((1, 1, 1), b"b")])  # the connection dropped before b was written
    assert s.holding([]) == {"foreman_session": FOREMAN, "holding": [[1, 1, 1]]}
    other, resend = welcomed(s, 2.0, confirms=False)
    assert (other, resend) == (False, [b"b"])
    assert s.unconfirmed == {}


@pytest.mark.parametrize("code", [None, CloseCode.GOING_AWAY, CloseCode.HEARTBEAT_TIMEOUT, CloseCode.REPLACED,
                                  CloseCode.NORMAL])
def test_a_close_keeps_the_work_unless_the_foreman_is_gone_for_good(s: Session, code: int | None) -> None:
    welcomed(s, 0.0)
    s.finished((1, 0, 1), b"a")
    assert s.closed(1.0, code) is False
    assert s.holding([(1, 1, 1)])["holding"] == [[1, 1, 1], [1, 0, 1]]


def test_shutting_down_drops_the_work_of_that_foreman(s: Session) -> None:
    welcomed(s, 0.0)
    s.finished((1, 0, 1), b"a")
    assert s.closed(1.0, CloseCode.SHUTTING_DOWN) is True  # the shell kills that foreman's tasks
    assert s.holding([]) == {} and s.unconfirmed == {} and s.dropped == 1


def test_another_foreman_session_gets_none_of_the_old_work(s: Session) -> None:
    welcomed(s, 0.0)
    s.finished((1, 0, 1), b"a")
    s.closed(1.0, None)
    other, resend = welcomed(s, 2.0, foreman="session-b")
    assert other is True and resend == [] and s.foreman == "session-b"


# -- what a stop hands back ----------------------------------------------------------------------------------------


def test_the_stop_report_says_what_was_handed_back_and_what_is_lost(s: Session) -> None:
    welcomed(s, 0.0)
    s.returned(3)
    s.finished((1, 0, 1), b"a")
    s.received((1, 0, 1))
    s.stop()
    assert s.link is Link.STOPPED
    assert s.stop_report(running=0) == "stopped: handed back 3 unstarted batch(es); every result was handed in"
    s.finished((1, 1, 1), b"b")  # stopped, never written
    report = s.stop_report(running=1)
    assert "1 batch(es) still running" in report and "1 result(s) never reached the foreman" in report


def test_a_stopped_session_does_not_dial_again(s: Session) -> None:
    welcomed(s, 0.0)
    s.stop()
    s.closed(1.0, CloseCode.NORMAL)
    s.refused(1.0)
    assert s.link is Link.STOPPED

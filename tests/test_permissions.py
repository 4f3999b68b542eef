"""The one decision on who may do what (:mod:`foreman.permissions`), as pure tables: roles x actions x owners, and
the browser checks (Host, Origin). No sockets; the attacks that drive them over HTTP and WebSockets are in
test_attack_web.py."""

from __future__ import annotations

import pytest

from foreman.addresses import split_token, with_token
from foreman.auth import ADMIN, CLIENT, VIEWER, WORKER, Authenticator, Principal
from foreman.permissions import Action, authorize, host_allowed, origin_allowed
from foreman.views import dashboard_link, worker_facts

ADMIN_P = Principal("admin", ADMIN, "a-token-1")
ALICE = Principal("alice", CLIENT, "c-alice-1")
BOB = Principal("bob", CLIENT, "c-bob-001")
VOLUNTEER = Principal("volunteer", WORKER, "w-vol-001")
VIEWER_P = Principal("viewer", VIEWER, "")

A, S, R, SEE, CAN, CTL = (Action.JOIN, Action.SUBMIT, Action.READ, Action.SEE_JOB, Action.CANCEL_JOB,
                          Action.CONTROL_WORKER)

# principal, action, job owner, allowed
TABLE = [
    (ADMIN_P, A, None, True), (ADMIN_P, S, None, True), (ADMIN_P, R, None, True), (ADMIN_P, CTL, None, True),
    (ADMIN_P, SEE, "alice", True), (ADMIN_P, CAN, "alice", True), (ADMIN_P, CAN, "", True),
    (ALICE, A, None, False), (ALICE, S, None, True), (ALICE, R, None, True), (ALICE, CTL, None, False),
    (ALICE, SEE, "alice", True), (ALICE, CAN, "alice", True),
    (ALICE, SEE, "bob", False), (ALICE, CAN, "bob", False), (ALICE, SEE, "", False), (ALICE, CAN, "admin", False),
    (BOB, SEE, "alice", False), (BOB, CAN, "alice", False), (BOB, CAN, "bob", True),
    (VOLUNTEER, A, None, True), (VOLUNTEER, S, None, False), (VOLUNTEER, R, None, False),
    (VOLUNTEER, CTL, None, False), (VOLUNTEER, SEE, "volunteer", False), (VOLUNTEER, CAN, "volunteer", False),
    (VIEWER_P, R, None, True), (VIEWER_P, SEE, "", True), (VIEWER_P, SEE, "admin", True),
    (VIEWER_P, SEE, "alice", False), (VIEWER_P, CAN, "", False), (VIEWER_P, CTL, None, False),
    (VIEWER_P, S, None, False), (VIEWER_P, A, None, False),
    (None, R, None, False), (None, A, None, False), (None, S, None, False), (None, SEE, "", False),
]


@pytest.mark.parametrize("principal, action, owner, allowed", TABLE,
                         ids=[f"{p.role if p else 'nobody'}-{a.name}-{o}" for p, a, o, _ in TABLE])
def test_authorize_table(principal, action, owner, allowed) -> None:
    assert authorize(principal, action, owner) is allowed


def test_every_role_and_action_is_in_the_table() -> None:
    covered = {(p.role if p else None, a) for p, a, _, _ in TABLE}
    for role in (ADMIN, CLIENT, WORKER, VIEWER):
        for action in (A, S, R, CTL, SEE, CAN):
            assert (role, action) in covered, (role, action)


def test_a_client_named_like_a_role_gains_nothing() -> None:
    impostor = Principal("admin", CLIENT, "c-x-00001")  # a [clients] entry called "admin"
    assert not authorize(impostor, CTL)
    assert not authorize(Principal("viewer", WORKER, "w-x-00001"), R)


def test_no_token_means_nobody() -> None:
    open_foreman = Authenticator()
    assert open_foreman.identify(None) is None and open_foreman.identify("") is None
    assert open_foreman.identify("anything") is None
    made_up = Authenticator.generated()
    assert made_up.token and made_up.worker_token and made_up.token != made_up.worker_token
    assert made_up.identify(made_up.token).role == ADMIN
    assert made_up.identify(made_up.worker_token).role == WORKER
    assert made_up.identify(None) is None


@pytest.mark.parametrize("host, bound, allowed", [
    ("127.0.0.1:9000", "127.0.0.1", True), ("localhost:9000", "127.0.0.1", True), ("[::1]:9000", "::1", True),
    ("localhost", "localhost", True), (None, "127.0.0.1", True),
    ("evil.example:9000", "127.0.0.1", False), ("evil.example", "localhost", False),
    ("10.0.0.5:9000", "127.0.0.1", False), ("127.0.0.1.evil.example", "127.0.0.1", False),
    ("evil.example:9000", "0.0.0.0", True), ("foreman.example", "10.0.0.5", True),
])
def test_host_allowed(host, bound, allowed) -> None:
    assert host_allowed(host, bound) is allowed


@pytest.mark.parametrize("origin, host, ports, allowed", [
    (None, "127.0.0.1:9000", (), True),  # not a browser
    ("http://127.0.0.1:9000", "127.0.0.1:9000", (), True),
    ("http://127.0.0.1:9001", "127.0.0.1:9000", (9000, 9001), True),  # the dashboard's page, on the ws port
    ("http://127.0.0.1:9002", "127.0.0.1:9000", (9000, 9001), False),
    ("http://evil.example", "127.0.0.1:9000", (9000, 9001), False),
    ("http://evil.example:9001", "127.0.0.1:9000", (9000, 9001), False),
    ("null", "127.0.0.1:9000", (9000,), False), ("file://", "127.0.0.1:9000", (9000,), False),
    ("https://foreman.example", "foreman.example", (443,), True),
    ("http://foreman.example:bad", "foreman.example:9000", (9000,), False),
])
def test_origin_allowed(origin, host, ports, allowed) -> None:
    assert origin_allowed(origin, host, ports) is allowed


def test_an_address_carries_a_token_and_gives_it_back() -> None:
    address = with_token("ws://127.0.0.1:9000", "abc/+=")
    assert address == "ws://127.0.0.1:9000/?token=abc%2F%2B%3D"
    assert split_token(address) == ("ws://127.0.0.1:9000", "abc/+=")
    assert split_token("ws://127.0.0.1:9000") == ("ws://127.0.0.1:9000", None)
    assert split_token("wss://h:1/path?x=1&token=t") == ("wss://h:1/path?x=1", "t")
    assert split_token("unix:/tmp/f.sock") == ("unix:/tmp/f.sock", None)


@pytest.mark.parametrize("link, kept", [
    ("http://10.0.0.5:8001/", True), ("https://w.example/", True),
    ("javascript:alert(1)", False), ("JavaScript:alert(1)", False), (" javascript:alert(1)", False),
    ("data:text/html,<script>", False), ("//evil.example/", False), ("http:///x", False),
    (5, False), (None, False), (["http://x"], False), ("http://" + "a" * 300, False),
])
def test_worker_dashboard_links_are_http_only(link, kept) -> None:
    assert dashboard_link(link) == (link if kept else None)


def test_worker_facts_take_the_shapes_the_page_expects() -> None:
    facts = worker_facts({"host": {"a": 1}, "platform": None, "machine": "x" * 1000, "python": 3, "version": "1",
                          "cpu_count": "8", "memory": float("nan"), "concurrency": -1,
                          "capabilities": "gpu", "gpus": [{"name": "A100", "memory_total": 4, "x": {}}, 5, {}],
                          "dashboard": "javascript:x"})
    assert facts["host"] == "{'a': 1}" and facts["platform"] is None and len(facts["machine"]) == 200
    assert facts["python"] == "3"
    assert facts["cpu_count"] is None and facts["memory"] is None and facts["concurrency"] is None
    assert facts["capabilities"] == []
    assert facts["gpus"] == [{"name": "A100", "memory_total": 4}, {"name": "GPU"}]
    assert facts["dashboard"] is None

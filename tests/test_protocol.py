"""Tests of the wire protocol: framing, validation, limits, and that decode fails only with ProtocolError."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foreman import protocol
from foreman.errors import CrowdComputeError, ProtocolError
from foreman.protocol import MAX_HEADER_SIZE, PAYLOAD_KINDS, SCHEMAS, Kind, Message, decode, encode

REPO = Path(__file__).resolve().parents[1]

#: One valid header per kind.
VALID: dict[Kind, dict[str, Any]] = {
    Kind.HELLO: {"protocol": 1, "worker_id": "w1", "token": None, "python": "3.11.7", "cloudpickle": "3.0.0",
                 "concurrency": 4, "capabilities": ["gpu"]},
    Kind.WELCOME: {"session": "s1", "heartbeat_interval": 5, "heartbeat_timeout": 30.0, "max_message_size": 1024},
    Kind.JOB: {"job": 1, "digest": "ab12", "call": "one"},
    Kind.TASKS: {"job": 1, "start": 0, "count": 3},
    Kind.RESULTS: {"job": 1, "start": 4, "count": 2, "status": "ok", "elapsed": 0.25},
    Kind.CANCEL: {"job": 1},
    Kind.JOB_DONE: {"job": 2},
    Kind.HEARTBEAT: {},
    Kind.RESTART: {"hard": False},
    Kind.DRAIN: {},
    Kind.CHECKPOINT: {"job": 1, "task": 3},
    Kind.PAUSE: {"paused": True, "reason": "the owner's CPU use is 90%"},
    Kind.CONNECT: {"protocol": 1, "client": "c1", "token": "t", "python": "3.11.7", "cloudpickle": "3.0.0"},
    Kind.SUBMIT: {"ref": 1, "name": "f", "digest": "ab12", "call": "one", "detached": False, "options": {}},
    Kind.ACCEPTED: {"ref": 1, "job": 4},
    Kind.INPUT: {"job": 4, "start": 0, "count": 2},
    Kind.INPUT_END: {"job": 4},
    Kind.ABORT: {"job": 4},
    Kind.ATTACH: {"job": 4, "after": 0},
    Kind.ATTACHED: {"job": 4, "fed": 10},
    Kind.ACK: {"job": 4, "seq": 3},
    Kind.OUTPUT: {"job": 4, "seq": 1, "start": 0, "count": 2, "status": "ok", "fed": 10},
    Kind.JOB_END: {"job": 4, "state": "done"},
    Kind.QUERY: {"ref": 2, "what": "jobs"},
    Kind.REPLY: {"ref": 2, "jobs": []},
    Kind.RECEIVED: {"job": 4, "start": 0, "count": 2},
}

PAYLOAD = b"\x80\x05pickled\x00bytes"
#: INPUT's payload is framed per task: a table of the 2 tasks' pickle sizes, then the pickles.
FRAMED = struct.pack(">2I", 7, len(PAYLOAD) - 7) + PAYLOAD


def payload_of(kind: Kind) -> bytes:
    return (FRAMED if kind is Kind.INPUT else PAYLOAD) if kind in PAYLOAD_KINDS else b""


def frame(kind: Kind, header: Any, payload: bytes = b"", code: int | None = None) -> bytes:
    """Build a frame by hand, bypassing encode's checks (any JSON value as header)."""
    raw = json.dumps(header).encode()
    return struct.pack(">BI", int(kind) if code is None else code, len(raw)) + raw + payload


def raw_frame(code: int, header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", code, len(header)) + header + payload


def with_field(kind: Kind, field: str, value: Any) -> bytes:
    header = dict(VALID[kind], **{field: value})
    return frame(kind, header, payload_of(kind))


def test_valid_headers_cover_every_kind() -> None:
    """The fixtures above cover every kind and satisfy its schema."""
    assert set(VALID) == set(Kind) == set(SCHEMAS)
    for kind, header in VALID.items():
        assert set(SCHEMAS[kind]) <= set(header)


# -- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_round_trip(kind: Kind) -> None:
    """encode then decode gives back the kind, the header and (for payload kinds) the payload as a memoryview."""
    payload = payload_of(kind)
    data = encode(kind, VALID[kind], payload)
    msg = decode(data)
    assert isinstance(msg, Message)
    assert msg.kind is kind
    assert msg.header == VALID[kind]
    assert isinstance(msg.payload, memoryview)
    assert msg.payload == payload and bytes(msg.payload) == payload


@pytest.mark.parametrize("kind", sorted(PAYLOAD_KINDS - {Kind.INPUT}), ids=lambda k: k.name)
def test_round_trip_empty_and_large_payload(kind: Kind) -> None:
    """Payload kinds accept an empty payload and a payload larger than any header."""
    assert decode(encode(kind, VALID[kind])).payload == b""
    big = bytes(range(256)) * 1024
    assert decode(encode(kind, VALID[kind], big)).payload == big


def test_decode_accepts_bytearray_and_memoryview() -> None:
    """Any bytes-like input decodes; the payload is a view of it."""
    data = encode(Kind.TASKS, VALID[Kind.TASKS], PAYLOAD)
    for form in (bytearray(data), memoryview(data)):
        msg = decode(form)
        assert msg.kind is Kind.TASKS and msg.payload == PAYLOAD


def test_encode_defaults_and_unknown_fields() -> None:
    """encode(kind) sends an empty header; unknown header fields are ignored and kept."""
    assert decode(encode(Kind.HEARTBEAT)) == (Kind.HEARTBEAT, {}, b"")
    header = dict(VALID[Kind.CANCEL], start=8, future="x")
    assert decode(encode(Kind.CANCEL, header)).header == header


@pytest.mark.parametrize("status", sorted(protocol.RESULT_STATUSES))
def test_every_results_status_accepted(status: str) -> None:
    assert decode(with_field(Kind.RESULTS, "status", status)).header["status"] == status


@pytest.mark.parametrize("call", sorted(protocol.CALLS))
def test_every_call_style_accepted(call: str) -> None:
    assert decode(with_field(Kind.JOB, "call", call)).header["call"] == call


def test_numbers_accept_int_or_float_and_token_string() -> None:
    """Fields typed as numbers take ints or floats; the HELLO token may be a string or null."""
    assert decode(with_field(Kind.RESULTS, "elapsed", 3)).header["elapsed"] == 3
    assert decode(with_field(Kind.WELCOME, "heartbeat_interval", 2.5)).header["heartbeat_interval"] == 2.5
    assert decode(with_field(Kind.HELLO, "token", "secret")).header["token"] == "secret"
    assert decode(with_field(Kind.RESTART, "hard", True)).header["hard"] is True


# -- rejections --------------------------------------------------------------------------------------------------


def rejects(data: Any, match: str | None = None, **kwargs: Any) -> ProtocolError:
    """decode must raise exactly ProtocolError (a CrowdComputeError)."""
    with pytest.raises(ProtocolError, match=match) as info:
        decode(data, **kwargs)
    assert type(info.value) is ProtocolError and isinstance(info.value, CrowdComputeError)
    return info.value


def test_text_frame_rejected() -> None:
    rejects("hello", match="text frame")
    rejects(encode(Kind.HEARTBEAT).decode("latin-1"), match="text frame")


def test_oversized_message_rejected() -> None:
    """A message over max_size is refused; exactly max_size is fine."""
    data = encode(Kind.TASKS, VALID[Kind.TASKS], PAYLOAD)
    rejects(data, match="over the", max_size=len(data) - 1)
    assert decode(data, max_size=len(data)).kind is Kind.TASKS


@pytest.mark.parametrize("data", [b"", b"\x08", b"\x08\x00\x00\x00"], ids=["empty", "1", "4"])
def test_truncated_prefix_rejected(data: bytes) -> None:
    rejects(data, match="shorter than")


@pytest.mark.parametrize("code", [0, 99, 200, 255])
def test_unknown_kind_rejected(code: int) -> None:
    rejects(frame(Kind.HEARTBEAT, {}, code=code), match=f"unknown message kind {code}")


def test_header_length_beyond_data_rejected() -> None:
    """A header length pointing past the end of the message is refused."""
    data = encode(Kind.CANCEL, VALID[Kind.CANCEL])
    rejects(data[:-1], match="truncated")
    rejects(struct.pack(">BI", Kind.HEARTBEAT, 100) + b"{}", match="truncated")


def test_header_over_limit_rejected() -> None:
    """A header over MAX_HEADER_SIZE is refused, whether claimed or real; encode refuses to build one."""
    rejects(struct.pack(">BI", Kind.HEARTBEAT, MAX_HEADER_SIZE + 1) + b"{}", match="over the")
    rejects(struct.pack(">BI", Kind.HEARTBEAT, 2**32 - 1), match="over the")
    big = json.dumps({"pad": "x" * MAX_HEADER_SIZE}).encode()
    rejects(raw_frame(Kind.HEARTBEAT, big), match="over the")
    with pytest.raises(ProtocolError):
        encode(Kind.HEARTBEAT, {"pad": "x" * MAX_HEADER_SIZE})
    # just under the limit is fine
    pad = "x" * (MAX_HEADER_SIZE - len(json.dumps({"pad": ""}, separators=(",", ":"))))
    assert decode(encode(Kind.HEARTBEAT, {"pad": pad})).header["pad"] == pad


@pytest.mark.parametrize("header", [b"{not json", b"", b"{\"job\": 1", b"\xff\xfe\xfa", b"{'job': 1}"])
def test_non_json_header_rejected(header: bytes) -> None:
    rejects(raw_frame(Kind.CANCEL, header), match="not valid JSON")


@pytest.mark.parametrize("header", [[], [1], 1, "text", None, True, 2.5])
def test_non_object_header_rejected(header: Any) -> None:
    rejects(frame(Kind.HEARTBEAT, header), match="must be a JSON object")


@pytest.mark.parametrize("header", [b"[" * 50_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000], ids=["array", "obj"])
def test_deeply_nested_header_rejected(header: bytes) -> None:
    assert len(header) <= MAX_HEADER_SIZE
    rejects(raw_frame(Kind.HEARTBEAT, header))


@pytest.mark.parametrize("kind, field", [(k, f) for k in Kind for f in SCHEMAS[k]],
                         ids=lambda v: v.name if isinstance(v, Kind) else v)
def test_missing_required_field_rejected(kind: Kind, field: str) -> None:
    header = dict(VALID[kind])
    del header[field]
    rejects(frame(kind, header), match=f"lacks the required field '{field}'")


def _wrong_values(expected: Any) -> list[Any]:
    """Values of the wrong JSON type for a schema entry (bool counts as wrong for numbers)."""
    types = expected if isinstance(expected, tuple) else (expected,)
    candidates = ["1", 1, 1.5, True, None, [], {}]
    out = []
    for value in candidates:
        if isinstance(value, bool):
            ok = bool in types
        else:
            ok = isinstance(value, types)
        if not ok:
            out.append(value)
    return out


WRONG_TYPES = [(k, f, v) for k in Kind for f, t in SCHEMAS[k].items() for v in _wrong_values(t)]


@pytest.mark.parametrize("kind, field, value", WRONG_TYPES,
                         ids=[f"{k.name}-{f}-{type(v).__name__}" for k, f, v in WRONG_TYPES])
def test_wrong_field_type_rejected(kind: Kind, field: str, value: Any) -> None:
    rejects(with_field(kind, field, value), match=f"field '{field}' has the wrong type")


def test_bool_rejected_where_int_required() -> None:
    """JSON true is not an int, even though bool subclasses int in Python."""
    for kind, field in [(Kind.TASKS, "start"), (Kind.TASKS, "count"), (Kind.CANCEL, "job"),
                        (Kind.HELLO, "protocol"), (Kind.HELLO, "concurrency"), (Kind.RESULTS, "elapsed"),
                        (Kind.WELCOME, "heartbeat_timeout")]:
        rejects(with_field(kind, field, True), match="wrong type bool")


@pytest.mark.parametrize("kind", sorted(set(Kind) - PAYLOAD_KINDS), ids=lambda k: k.name)
def test_payload_on_non_payload_kind_rejected(kind: Kind) -> None:
    rejects(frame(kind, VALID[kind], b"x"), match="must not carry a payload")


@pytest.mark.parametrize("kind", [Kind.TASKS, Kind.RESULTS], ids=lambda k: k.name)
@pytest.mark.parametrize("start, count", [(-1, 1), (0, 0), (0, -5), (-3, 0)])
def test_invalid_range_rejected(kind: Kind, start: int, count: int) -> None:
    header = dict(VALID[kind], start=start, count=count)
    rejects(frame(kind, header), match="invalid range")


@pytest.mark.parametrize("status", ["OK", "done", "", "failed"])
def test_unknown_results_status_rejected(status: str) -> None:
    rejects(with_field(Kind.RESULTS, "status", status), match="unknown status")


@pytest.mark.parametrize("call", ["ONE", "kwargs", ""])
def test_unknown_call_style_rejected(call: str) -> None:
    rejects(with_field(Kind.JOB, "call", call), match="unknown call style")


def test_tasks_buffers_split_the_payload_into_views() -> None:
    """TASKS may end its payload with out-of-band buffers whose sizes its ``buffers`` field lists."""
    header = dict(VALID[Kind.TASKS], buffers=[3, 0, 2])
    msg = decode(encode(Kind.TASKS, header, PAYLOAD, b"abc", b"", b"de"))
    parts = protocol.payload_parts(msg)
    assert [bytes(p) for p in parts] == [PAYLOAD, b"abc", b"", b"de"]
    assert all(isinstance(p, memoryview) for p in parts)
    assert [bytes(p) for p in protocol.payload_parts(decode(encode(Kind.TASKS, VALID[Kind.TASKS], PAYLOAD)))] == [
        PAYLOAD]


@pytest.mark.parametrize("sizes, match", [
    ("3", "list of sizes"), ([1, -1], "list of sizes"), ([1.5], "list of sizes"), ([True], "list of sizes"),
    ([len(PAYLOAD) + 1], "do not fit"), ([len(PAYLOAD), 1], "do not fit")])
def test_malformed_tasks_buffers_rejected(sizes: Any, match: str) -> None:
    rejects(encode(Kind.TASKS, dict(VALID[Kind.TASKS], buffers=sizes), PAYLOAD), match=match)


# -- fuzzing -----------------------------------------------------------------------------------------------------


def decode_or_protocol_error(data: bytes, max_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE) -> Message | None:
    """decode either returns a well-formed Message or raises ProtocolError; anything else fails the test."""
    try:
        msg = decode(data, max_size)
    except ProtocolError:
        return None
    assert isinstance(msg, Message) and isinstance(msg.kind, Kind) and isinstance(msg.header, dict)
    assert set(SCHEMAS[msg.kind]) <= set(msg.header)
    assert msg.kind in PAYLOAD_KINDS or not msg.payload
    return msg


def test_input_and_framed_tasks_must_be_framed_per_task() -> None:
    """INPUT, and TASKS with ``framed``, are one pickle per task behind a table of their sizes: the table must
    describe exactly ``count`` pickles filling the payload (checked before anything is unpickled)."""
    assert bytes(decode(encode(Kind.INPUT, VALID[Kind.INPUT], FRAMED)).payload) == FRAMED
    tasks = dict(VALID[Kind.TASKS], count=2, framed=True)
    assert decode(encode(Kind.TASKS, tasks, FRAMED)).header["framed"] is True
    rejects(encode(Kind.INPUT, VALID[Kind.INPUT], PAYLOAD), match="table of per-task sizes adds up")
    rejects(encode(Kind.INPUT, VALID[Kind.INPUT], b""), match="needs a 8-byte table")
    rejects(encode(Kind.INPUT, dict(VALID[Kind.INPUT], count=2**40), FRAMED), match="table of sizes")
    rejects(encode(Kind.INPUT, VALID[Kind.INPUT], FRAMED + b"x"), match="adds up")
    rejects(encode(Kind.TASKS, tasks, PAYLOAD), match="adds up")
    rejects(encode(Kind.TASKS, dict(tasks, buffers=[1]), FRAMED, b"x"), match="no out-of-band buffers")
    rejects(encode(Kind.TASKS, dict(tasks, framed=1), FRAMED), match="must be a boolean")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.sampled_from([protocol.DEFAULT_MAX_MESSAGE_SIZE, 64, 5]))
def test_decode_arbitrary_bytes(data: bytes, max_size: int) -> None:
    """Arbitrary bytes decode or raise ProtocolError."""
    decode_or_protocol_error(data, max_size)


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(list(Kind)))
    payload = draw(st.binary(max_size=64)) if kind in PAYLOAD_KINDS else b""
    return encode(kind, VALID[kind], payload)


MUTATION = st.tuples(st.sampled_from(["truncate", "flip", "insert", "delete", "set"]),
                     st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, byte in ops:
        at = pos % (len(buf) + 1)
        if op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = bytes([byte])
        elif buf and op == "flip":
            buf[at % len(buf)] ^= 1 << (byte % 8)
        elif buf and op == "set":
            buf[at % len(buf)] = byte
        elif buf and op == "delete":
            del buf[at % len(buf)]
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(valid_frames(), st.lists(MUTATION, min_size=1, max_size=6))
def test_decode_mutated_frames(data: bytes, ops: list[tuple[str, int, int]]) -> None:
    """Truncated, bit-flipped, edited or extended valid frames decode or raise ProtocolError."""
    decode_or_protocol_error(mutate(data, ops))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Kind)),
       st.dictionaries(st.sampled_from(sorted({f for s in SCHEMAS.values() for f in s} | {"x"})),
                       st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False)
                       | st.text(max_size=8) | st.lists(st.integers(), max_size=2), max_size=8),
       st.binary(max_size=8))
def test_decode_random_headers(kind: Kind, overrides: dict[str, Any], payload: bytes) -> None:
    """Valid headers with randomly replaced fields decode or raise ProtocolError, never anything else."""
    header = dict(VALID[kind], **overrides)
    msg = decode_or_protocol_error(frame(kind, header, payload))
    if msg is not None:
        assert msg.header == header


# -- import hygiene ----------------------------------------------------------------------------------------------


def test_protocol_and_worker_import_without_server_stack() -> None:
    """Importing foreman.protocol and the worker package pulls in neither the server, the client nor the web stack."""
    code = ("import sys, json, foreman.protocol, worker; "
            "print(json.dumps(sorted(m for m in ('foreman.server', 'foreman.client', 'fastapi', 'uvicorn') "
            "if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []

"""The CrowdCompute wire protocol: message kinds, framing, validation and limits.

Both the foreman and the worker import this module, so it imports nothing beyond the standard library.
The format is documented for humans in ``docs/protocol.md``; keep the two in step.

Every WebSocket message is one binary frame::

    [kind: u8][header length: u32, big-endian][header: UTF-8 JSON object][payload: raw bytes]

The header is plain JSON (never pickle), so a peer can be validated before anything is unpickled.
The payload carries pickled data (a job's function, a batch of arguments, a batch of results) as raw bytes.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, NamedTuple

from foreman.errors import ProtocolError

#: Bumped on any incompatible change to framing, kinds, required header fields or payload layout.
#: 2: PAUSE, RECEIVED, the client kinds (20-32), HELLO holding. 3: TASKS payloads may end with out-of-band
#: buffers (the ``buffers`` header field). 4: WELCOME says which Python and cloudpickle the foreman's jobs need
#: (``jobs_env``), so a worker that differs tells its owner why it gets no work. 5: arguments framed per task:
#: INPUT payloads always, TASKS payloads with ``framed`` (one pickle per task behind a table of their sizes), so
#: the foreman never unpickles a client's arguments to split a batch.
PROTOCOL_VERSION = 5

#: Largest message either side accepts. Protects memory: a peer can make us buffer at most this much per
#: connection before the message is refused. Argument and result batches are cut to fit under it.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

#: Largest pickled state one ``checkpoint()`` may save. The foreman holds the latest one per task in flight,
#: so this bounds its memory per running task.
MAX_CHECKPOINT_SIZE = 1024 * 1024

#: Largest JSON header. Headers carry ids and small settings only.
MAX_HEADER_SIZE = 64 * 1024

#: Deepest nesting of lists and objects in a header (real ones nest 3 levels at most). Bounds the stack of any code
#: that walks a header recursively (json.dumps into the journal or a log) against a peer's 64 KiB of brackets.
MAX_HEADER_DEPTH = 32

#: Pickled arguments in one batch at most, by default (``Batcher.target_bytes``); the send buffers of the local
#: link and of a worker's task processes are asked for this size, so that a batch goes out in one piece.
BATCH_BYTES = 4 * 1024 * 1024

_PREFIX = struct.Struct(">BI")


class Kind(enum.IntEnum):
    """Message kinds. Direction: W = worker to foreman, F = foreman to worker."""

    HELLO = 1  # W: handshake, the first message on a connection
    WELCOME = 2  # F: handshake accepted
    JOB = 3  # F: a job's function (payload: cloudpickle), sent once per job and worker
    TASKS = 4  # F: a batch of tasks (payload: pickled list of arguments, then its out-of-band buffers; or framed)
    RESULTS = 5  # W: the outcome of a batch (payload: pickled results and errors)
    CANCEL = 6  # F: drop queued and kill running tasks of a job (or of one batch)
    JOB_DONE = 7  # F: the job is over; the worker may forget its function
    HEARTBEAT = 8  # W and F: liveness, with a small status in the header
    RESTART = 9  # F: restart the worker (relayed control)
    DRAIN = 10  # F: finish or hand back work, then leave. W: I am draining, send no more
    CHECKPOINT = 11  # W: a task saved its progress. F: resume this task from it (sent before its TASKS)
    PAUSE = 12  # W: the owner's rules paused me (send no more; "reason" says why), or let me resume
    # Clients (C) of a standalone foreman: scripts that submit jobs (see foreman/clients.py, foreman/remote.py).
    CONNECT = 20  # C: handshake, the first message of a client connection (answered by WELCOME)
    SUBMIT = 21  # C: a new job (payload: its function); answered by ACCEPTED
    ACCEPTED = 22  # F: the job id of a SUBMIT, or why it was refused
    INPUT = 23  # C: a batch of a job's tasks (payload: arguments framed per task), in order
    INPUT_END = 24  # C: the job has no more input
    ABORT = 25  # C: cancel the job
    ATTACH = 26  # C: send me this job's results after seq ``after``, and its end; answered by ATTACHED
    ATTACHED = 27  # F: the job's state (including ``fed``: tasks received) before its results follow
    ACK = 28  # C: results up to ``seq`` are safe with the client; the foreman may drop them
    OUTPUT = 29  # F: a result batch of a job (payload: pickled results, or empty when failed)
    JOB_END = 30  # F: the job is over (state done, cancelled or failed), after its last OUTPUT
    QUERY = 31  # C: a question about jobs or the fleet; answered by REPLY
    REPLY = 32  # F: the answer to a QUERY (JSON in the header)
    RECEIVED = 33  # F: a worker's RESULTS are safe (journaled); sent only when WELCOME says confirms_results


class Message(NamedTuple):
    kind: Kind
    header: dict[str, Any]
    payload: bytes | memoryview = b""


# Required header fields and their JSON types, per kind. Unknown fields are ignored (forward compatible).
_NUM = (int, float)
SCHEMAS: dict[Kind, dict[str, type | tuple[type, ...]]] = {
    Kind.HELLO: {"protocol": int, "worker_id": str, "token": (str, type(None)), "python": str,
                 "cloudpickle": str, "concurrency": int, "capabilities": list},
    Kind.WELCOME: {"session": str, "heartbeat_interval": _NUM, "heartbeat_timeout": _NUM,
                   "max_message_size": int},
    Kind.JOB: {"job": int, "digest": str, "call": str},
    Kind.TASKS: {"job": int, "start": int, "count": int},
    Kind.RESULTS: {"job": int, "start": int, "count": int, "status": str, "elapsed": _NUM},
    Kind.CANCEL: {"job": int},
    Kind.JOB_DONE: {"job": int},
    Kind.HEARTBEAT: {},
    Kind.RESTART: {"hard": bool},
    Kind.DRAIN: {},
    Kind.CHECKPOINT: {"job": int, "task": int},
    Kind.PAUSE: {"paused": bool},
    Kind.CONNECT: {"protocol": int, "client": str, "token": (str, type(None)), "python": str, "cloudpickle": str},
    Kind.SUBMIT: {"ref": int, "name": str, "digest": str, "call": str, "detached": bool, "options": dict},
    Kind.ACCEPTED: {"ref": int},
    Kind.INPUT: {"job": int, "start": int, "count": int},
    Kind.INPUT_END: {"job": int},
    Kind.ABORT: {"job": int},
    Kind.ATTACH: {"job": int, "after": int},
    Kind.ATTACHED: {"job": int},
    Kind.ACK: {"job": int, "seq": int},
    Kind.OUTPUT: {"job": int, "seq": int, "start": int, "count": int, "status": str, "fed": int},
    Kind.JOB_END: {"job": int, "state": str},
    Kind.QUERY: {"ref": int, "what": str},
    Kind.REPLY: {"ref": int},
    Kind.RECEIVED: {"job": int, "start": int, "count": int},
}

#: Kinds whose payload is meaningful; any other kind must arrive with an empty payload.
PAYLOAD_KINDS = frozenset({Kind.JOB, Kind.TASKS, Kind.RESULTS, Kind.CHECKPOINT, Kind.SUBMIT, Kind.INPUT,
                           Kind.OUTPUT})

#: Values of the RESULTS ``status`` field.
STATUS_OK = "ok"  # the batch ran; per-task exceptions travel inside the payload
STATUS_CRASHED = "crashed"  # the process running the batch died (header "error" says how)
STATUS_RETURNED = "returned"  # handed back (draining, restarting, paused); not the batch's fault
STATUS_CANCELLED = "cancelled"  # stopped on the foreman's request
RESULT_STATUSES = frozenset({STATUS_OK, STATUS_CRASHED, STATUS_RETURNED, STATUS_CANCELLED})
#: An OUTPUT's tasks failed for good (lost as poison, cancelled...): header ``error_type`` and ``error`` say why.
STATUS_FAILED = "failed"
OUTPUT_STATUSES = frozenset({STATUS_OK, STATUS_FAILED})

#: JOB_END states, also the states of stored jobs (see foreman/journal.py).
JOB_DONE_STATE, JOB_CANCELLED_STATE, JOB_FAILED_STATE = "done", "cancelled", "failed"

#: Ways a job's function is applied to one item of a TASKS batch.
CALL_ONE = "one"  # fn(item)
CALL_STAR = "star"  # fn(*item)
CALL_FULL = "full"  # fn(*item[0], **item[1])
CALLS = frozenset({CALL_ONE, CALL_STAR, CALL_FULL})


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by CrowdCompute (4000-4999 is the application range)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 4000
    AUTH_FAILED = 4001
    VERSION_MISMATCH = 4002
    HEARTBEAT_TIMEOUT = 4003
    REPLACED = 4004
    SHUTTING_DOWN = 4005
    TRY_LATER = 4006  # refused for now (too many failed attempts from this address)


#: Kinds by their code, and one JSON encoder and decoder for every header (cheaper than ``Kind(code)``, and than
#: ``json.dumps``/``json.loads``, which build an encoder or sniff the encoding on each call).
_KINDS = {kind.value: kind for kind in Kind}
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))
_JSON_DECODER = json.JSONDecoder()

#: Close codes after which a worker must not reconnect: retrying cannot succeed without a human.
FATAL_CLOSE_CODES = frozenset({CloseCode.AUTH_FAILED, CloseCode.VERSION_MISMATCH})


#: One message as the parts that, joined, make it (see :func:`encode_parts`).
Parts = tuple[bytes | memoryview, ...]


def encode(kind: Kind, header: dict[str, Any] | None = None, *payload: bytes | memoryview) -> bytes:
    """Frame one message whose payload is ``payload``'s parts, joined. Raises ProtocolError if the header is too
    large."""
    return b"".join((_head(kind, header), *payload))


def encode_parts(kind: Kind, header: dict[str, Any] | None = None, *payload: bytes | memoryview) -> Parts:
    """The message :func:`encode` would make, as its kind and header, then ``payload``'s parts as they are: a
    link that writes the parts one by one sends megabytes of arguments without copying them. The parts must not
    change until the message is sent (``bytes`` cannot)."""
    return (_head(kind, header), *payload)


def message_size(data: bytes | memoryview | Parts) -> int:
    """Bytes in a message, joined or as its parts."""
    return sum(memoryview(part).nbytes for part in data) if type(data) is tuple else memoryview(data).nbytes


def _head(kind: Kind, header: dict[str, Any] | None) -> bytes:
    raw = _JSON_ENCODER.encode(header or {}).encode()
    if len(raw) > MAX_HEADER_SIZE:
        raise ProtocolError(f"{kind.name} header is {len(raw)} bytes, over the {MAX_HEADER_SIZE}-byte limit")
    return _PREFIX.pack(kind, len(raw)) + raw


def payload_parts(msg: Message) -> list[memoryview]:
    """A TASKS payload as its parts: the pickled arguments, then the out-of-band buffers that end the payload,
    whose sizes the header's ``buffers`` field lists in order (checked by :func:`decode`). Views, not copies."""
    view = memoryview(msg.payload)
    sizes = msg.header.get("buffers") or []
    end = view.nbytes - sum(sizes)
    parts = [view[:end]]
    for size in sizes:
        parts.append(view[end:end + size])
        end += size
    return parts


#: A framed payload (INPUT, TASKS with ``framed``) starts with one of these per task: the size of its pickle.
FRAME_SIZE = struct.Struct(">I")


def check_framed(kind: Kind, count: int, payload: bytes | memoryview) -> None:
    """ProtocolError unless ``payload`` is ``count`` per-task pickles behind the table of their sizes (see
    :func:`foreman.serialization.dumps_framed`). Reads the table only; unpickles nothing."""
    table = FRAME_SIZE.size * count
    size = memoryview(payload).nbytes
    if size < table:
        raise ProtocolError(f"{kind.name} of {count} tasks framed per task needs a {table}-byte table of sizes; "
                            f"its payload has {size} bytes")
    total = table + sum(struct.unpack_from(f">{count}I", payload))
    if total != size:
        raise ProtocolError(f"{kind.name}'s table of per-task sizes adds up to {total} bytes, its payload holds "
                            f"{size}")


def decode(data: bytes | bytearray | memoryview | str, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Message:
    """Parse and validate one message; raise ProtocolError saying what is wrong with it.

    The payload is returned as a memoryview of ``data`` (no copy).
    """
    if isinstance(data, str):
        raise ProtocolError("text frame received; CrowdCompute speaks binary frames only")
    size = len(data)
    if size > max_size:
        raise ProtocolError(f"message of {size} bytes is over the {max_size}-byte limit")
    if size < _PREFIX.size:
        raise ProtocolError(f"message of {size} bytes is shorter than the {_PREFIX.size}-byte prefix")
    code, header_len = _PREFIX.unpack_from(data)
    kind = _KINDS.get(code)
    if kind is None:
        raise ProtocolError(f"unknown message kind {code}")
    end = _PREFIX.size + header_len
    if header_len > MAX_HEADER_SIZE:
        raise ProtocolError(f"{kind.name} header of {header_len} bytes is over the {MAX_HEADER_SIZE}-byte limit")
    if end > size:
        raise ProtocolError(f"{kind.name} message truncated: header needs {header_len} bytes, "
                            f"{size - _PREFIX.size} present")
    view = memoryview(data)
    try:
        text = str(view[_PREFIX.size:end], "utf-8")
        header = _JSON_DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind.name} header is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{kind.name} header must be a JSON object, not {type(header).__name__}")
    # Python 3.12+ parses thousands of levels without a RecursionError: the cap is checked here, on the rare
    # header with enough brackets to exceed it (a count in C, so the common header pays next to nothing).
    if text.count("{") + text.count("[") > MAX_HEADER_DEPTH and _too_deep(header, MAX_HEADER_DEPTH):
        raise ProtocolError(f"{kind.name} header nests lists and objects deeper than {MAX_HEADER_DEPTH} levels")
    for field, expected in SCHEMAS[kind].items():
        value = header.get(field, _MISSING)
        if value is _MISSING:
            raise ProtocolError(f"{kind.name} header lacks the required field {field!r}")
        if not isinstance(value, expected) or (isinstance(value, bool) and expected in (int, _NUM)):
            raise ProtocolError(f"{kind.name} field {field!r} has the wrong type {type(value).__name__}")
    payload = view[end:]
    if payload.nbytes and kind not in PAYLOAD_KINDS:
        raise ProtocolError(f"{kind.name} message must not carry a payload ({payload.nbytes} bytes found)")
    _check_values(kind, header, payload)
    return Message(kind, header, payload)


_MISSING = object()


def _too_deep(value: Any, limit: int) -> bool:
    """Whether lists and objects nest deeper than ``limit`` levels in ``value`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _check_values(kind: Kind, header: dict[str, Any], payload: memoryview) -> None:
    payload_size = payload.nbytes
    if kind in (Kind.TASKS, Kind.RESULTS, Kind.INPUT, Kind.OUTPUT) and (header["start"] < 0 or header["count"] < 1):
        raise ProtocolError(f"{kind.name} has an invalid range start={header['start']} count={header['count']}")
    if kind is Kind.INPUT or (kind is Kind.TASKS and header.get("framed") is True):
        if kind is Kind.TASKS and "buffers" in header:
            raise ProtocolError("a framed TASKS carries no out-of-band buffers")
        check_framed(kind, header["count"], payload)
    elif kind is Kind.TASKS and header.get("framed", False) is not False:
        raise ProtocolError("TASKS field 'framed' must be a boolean")
    if kind is Kind.TASKS and "buffers" in header:
        sizes = header["buffers"]
        if not (isinstance(sizes, list) and all(type(size) is int and size >= 0 for size in sizes)):
            raise ProtocolError("TASKS field 'buffers' must be a list of sizes (non-negative integers)")
        if sum(sizes) > payload_size:
            raise ProtocolError(f"TASKS buffers of {sum(sizes)} bytes in all do not fit its {payload_size}-byte "
                                "payload")
    if kind is Kind.RESULTS and header["status"] not in RESULT_STATUSES:
        raise ProtocolError(f"RESULTS has an unknown status {header['status']!r}")
    if kind is Kind.OUTPUT and header["status"] not in OUTPUT_STATUSES:
        raise ProtocolError(f"OUTPUT has an unknown status {header['status']!r}")
    if kind in (Kind.JOB, Kind.SUBMIT) and header["call"] not in CALLS:
        raise ProtocolError(f"JOB has an unknown call style {header['call']!r}")

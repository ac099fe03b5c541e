"""Unit tests for ``runtime.protocol``: round trips and the guarantee that ``decode`` only raises
``ProtocolError``."""

from __future__ import annotations

import contextlib
import pickle
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtime.protocol import (
    MAX_TASKS_PER_FRAME,
    PROTOCOL_VERSION,
    Alloc,
    ArtifactAnswer,
    Burn,
    Call,
    Counters,
    DoneAnswer,
    Echo,
    Embed,
    Heartbeat,
    Hello,
    Invoke,
    InvokeReport,
    Message,
    ProtocolError,
    ReadArtifactCall,
    RefusedAnswer,
    Reply,
    Request,
    Result,
    Shutdown,
    Sleep,
    StopThink,
    Task,
    Tasks,
    TaskSpec,
    Think,
    ThinkReport,
    TransferCall,
    Usage,
    decode,
    decode_invoke,
    decode_think,
    encode,
)

COUNTERS = Counters(
    cpu_total=1.5, startup=0.25, idle=0.5, measurement=0.125, tasks=0.625, tasks_done=7, memory_bytes=12345
)
SPECS: list[TaskSpec] = [
    Burn(ms=120),
    Burn(ms=5, threads=64),
    Alloc(mb=64),
    Alloc(mb=1, hold_ms=100),
    Sleep(ms=0),
    Sleep(ms=400),
    Echo(),
    Echo(data="héllo \x00 wörld"),
    Call(payload=pickle.dumps((len, ([1, 2],), {}))),
    Call(payload=b""),
    Invoke(code="world.result(sum(world.args))", args=b"[1, 2]", cpu_seconds=0.5, wall_seconds=2, memory_bytes=1 << 20),
    Invoke(code=""),
    Think(system="sys", prompt="héllo", schema=b'{"type":"object"}', max_tokens=4, temperature=0, seed=3),
    Think(system="", prompt="", endpoint="http://127.0.0.1:1", price_prompt_per_1k=0.5),
    Embed(texts=["one"]),
    Embed(texts=["a", "b" * 300], embedder="minilm"),
]
MESSAGES: list[Message] = [
    Hello(worker_id=0, pid=4242, memory_probe="vmhwm", counters=COUNTERS),
    Hello(worker_id=3, pid=1, memory_probe="cgroup-v1", counters=COUNTERS),
    Hello(worker_id=3, pid=1, memory_probe="cgroup-v2", counters=COUNTERS),
    Hello(worker_id=3, pid=1, memory_probe="off", counters=COUNTERS),
    Hello(worker_id=3, pid=1, memory_probe="off", counters=COUNTERS, secret=bytes(range(32))),
    *[Task(id=i, spec=spec) for i, spec in enumerate(SPECS)],
    Task(id=2**40, spec=Echo(data="x"), measure=False),
    Tasks(tasks=[Task(id=i, spec=spec) for i, spec in enumerate(SPECS)]),
    Tasks(tasks=[Task(id=1, spec=Echo(), measure=False, memory_limit=1 << 20)]),
    Result(
        task_id=9,
        ok=True,
        output=b"\x00\xffbytes",
        error=None,
        usage=Usage(cpu_seconds=0.1, peak_memory_bytes=2**31, baseline_memory_bytes=2**20, wall_seconds=0.2),
        counters=COUNTERS,
    ),
    Result(task_id=10, ok=False, output=b"", error="Traceback ...\nValueError: x", usage=None, counters=COUNTERS),
    Heartbeat(counters=COUNTERS),
    Shutdown(),
    StopThink(task_id=7, index=3),
    Request(task_id=4, seq=1, call=ReadArtifactCall(id="notes")),
    Request(task_id=4, seq=2, call=TransferCall(to="bob", amount=2**62)),
    Reply(task_id=4, seq=1, answer=ArtifactAnswer(content=b"\x00\xff")),
    Reply(task_id=4, seq=2, answer=DoneAnswer()),
    Reply(task_id=4, seq=3, answer=RefusedAnswer(error="over what was authorised")),
]
#: What tasks return, each decoded by its own typed decoder.
THINK_REPORTS: list[ThinkReport | InvokeReport] = [
    ThinkReport(text='{"kind":"noop"}', prompt_tokens=10, completion_tokens=5, finish_reason="stop"),
    ThinkReport(text="", prompt_tokens=0, completion_tokens=0, valid=False, error="cut", cost_usd=0.25),
]
INVOKE_REPORTS: list[ThinkReport | InvokeReport] = [
    InvokeReport(ok=True, value=b"[1, 2]", error="", error_code="", stdout="hi", cpu_seconds=0.1, peak_memory_bytes=1),
    InvokeReport(
        ok=False, value=b"", error="boom", error_code="code_error", stdout="", cpu_seconds=0, peak_memory_bytes=0
    ),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    frame = encode(msg)
    assert isinstance(frame, bytes)
    back = decode(frame)
    assert back == msg
    assert type(back) is type(msg)
    assert back.v == PROTOCOL_VERSION


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_task_spec_kinds_survive(spec: TaskSpec) -> None:
    back = decode(encode(Task(id=1, spec=spec)))
    assert isinstance(back, Task)
    assert type(back.spec) is type(spec)
    assert back.spec == spec
    assert back.measure is True


def test_call_payload_still_unpickles() -> None:
    back = decode(encode(Task(id=1, spec=Call(payload=pickle.dumps((len, ([1, 2, 3],), {}))))))
    assert isinstance(back, Task) and isinstance(back.spec, Call)
    fn, args, kwargs = pickle.loads(back.spec.payload)
    assert fn(*args, **kwargs) == 3


def test_frame_is_tagged_and_versioned() -> None:
    raw = msgspec.msgpack.decode(encode(Shutdown()))
    assert raw == {"type": "shutdown", "v": PROTOCOL_VERSION}
    raw = msgspec.msgpack.decode(encode(Task(id=1, spec=Burn(ms=3))))
    assert raw["spec"]["kind"] == "burn"


def raises_protocol_error(frame: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    return str(info.value)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # never-used msgpack opcode
        b"\xff\xff\xff",
        b"hello world",
        b"\x82",  # a map with 2 entries, then nothing
        b"\xdb\xff\xff\xff\xff",  # str32 with an absurd length
        encode(Shutdown()) + b"\x00",  # trailing bytes
        encode(Shutdown())[:-1],  # truncated
    ],
)
def test_garbage_bytes(frame: bytes) -> None:
    raises_protocol_error(frame)


def test_empty_bytes_message() -> None:
    assert "0 bytes" in raises_protocol_error(b"")


@pytest.mark.parametrize(
    "obj",
    [
        None,
        1,
        "shutdown",
        [1, 2],
        ["shutdown", 1],
        {},
        {"v": 1},  # no tag
        {"type": "shutdown", "v": 1, "extra": 0},  # unknown field
        {"type": "shutdown", "v": "1"},
        {"type": "shutdown", "v": True},
        {"type": "hello", "v": 1, "worker_id": 1, "pid": 2, "memory_probe": "vmhwm"},  # no counters
        {
            "type": "hello",
            "v": 1,
            "worker_id": 1,
            "pid": 2,
            "memory_probe": "psychic",
            "counters": [0.0, 0.0, 0.0, 0.0, 0.0, 0, 0],
        },
        {"type": "heartbeat", "v": 1, "counters": [0.0, 0.0]},  # short array-like struct
        {"type": "task", "v": 1, "id": 1, "spec": {"kind": "burn", "ms": 0}},  # ms must be > 0
        {"type": "task", "v": 1, "id": 1, "spec": {"kind": "burn", "ms": 1, "threads": 65}},
        {"type": "task", "v": 1, "id": 1, "spec": {"kind": "teleport"}},
        {"type": "task", "v": 1, "id": 1, "spec": {"kind": "echo", "data": b"bytes-not-str"}},
        {"type": "task", "v": 1, "id": "one", "spec": {"kind": "echo"}},
    ],
)
def test_valid_msgpack_wrong_shape(obj: Any) -> None:
    raises_protocol_error(msgspec.msgpack.encode(obj))


@pytest.mark.parametrize("v", [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, -1, 2**64 - 1])
def test_other_version(v: int) -> None:
    msg = raises_protocol_error(encode(Shutdown(v=v)))
    assert f"protocol version {v}" in msg


def test_a_tasks_frame_holds_one_to_its_most_tasks_each_of_this_version() -> None:
    echo = Task(id=1, spec=Echo())
    assert decode(encode(Tasks(tasks=[echo] * MAX_TASKS_PER_FRAME))) == Tasks(tasks=[echo] * MAX_TASKS_PER_FRAME)
    raises_protocol_error(encode(Tasks(tasks=[])))
    raises_protocol_error(encode(Tasks(tasks=[echo] * (MAX_TASKS_PER_FRAME + 1))))
    assert "protocol version" in raises_protocol_error(encode(Tasks(tasks=[echo, Task(id=2, spec=Echo(), v=1)])))
    raises_protocol_error(encode(Tasks(tasks=[echo])).replace(b"echo", b"ecko"))  # an unknown kind inside


def test_other_version_of_a_full_message() -> None:
    raises_protocol_error(encode(Heartbeat(counters=COUNTERS, v=PROTOCOL_VERSION + 1)))


def test_missing_v_defaults_to_current_version() -> None:
    # ``v`` has a default, so a frame without it is read as the current version.
    assert decode(msgspec.msgpack.encode({"type": "shutdown"})) == Shutdown()


@pytest.mark.parametrize("tag", ["nope", "Hello", "SHUTDOWN", "", "task "])
def test_unknown_type_tag(tag: str) -> None:
    raises_protocol_error(msgspec.msgpack.encode({"type": tag, "v": PROTOCOL_VERSION}))


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


def test_deeply_nested_value_before_tag_is_a_protocol_error() -> None:
    depth = sys.getrecursionlimit() + 10  # 1010 with the default limit: a ~1 KiB frame
    # {"x": [[[...[]...]]], "type": "shutdown"}: msgspec looks ahead for the tag by skipping "x".
    frame = b"\x82\xa1x" + b"\x91" * depth + b"\x90" + b"\xa4type\xa8shutdown"
    with pytest.raises(ProtocolError):  # any other exception escapes and fails the test too
        decode(frame)


INVALID_UTF8_FRAMES = {
    # the `type` tag itself: {"type": "\x80", "v": 1}
    "tag": b"\x82\xa4type\xa1\x80\xa1v\x01",
    "echo-data": encode(Task(id=1, spec=Echo(data="Z"))).replace(b"\xa1Z", b"\xa1\x80"),
    "memory-probe": encode(Hello(worker_id=0, pid=1, memory_probe="vmhwm", counters=COUNTERS)).replace(
        b"vmhwm", b"vmhw\x80"
    ),
    "result-error": encode(Result(task_id=1, ok=False, output=b"", error="Z", usage=None, counters=COUNTERS)).replace(
        b"\xa1Z", b"\xa1\x80"
    ),
}


@pytest.mark.parametrize("where", sorted(INVALID_UTF8_FRAMES))
def test_invalid_utf8_string_is_a_protocol_error(where: str) -> None:
    frame = INVALID_UTF8_FRAMES[where]
    assert b"\x80" in frame
    with pytest.raises(ProtocolError):
        decode(frame)


def test_deeply_nested_value_after_tag_is_a_protocol_error() -> None:
    frame = b"\x82\xa4type\xa8shutdown\xa1x" + b"\x91" * 5000 + b"\x90"
    raises_protocol_error(frame)


# --- property tests ---------------------------------------------------------------------------------


def decode_or_protocol_error(frame: bytes) -> None:
    """Every outcome of ``decode`` is a Message or a ProtocolError; anything else fails the test."""
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert isinstance(msg, Hello | Task | Tasks | Result | Heartbeat | Shutdown | StopThink | Request | Reply)
    assert msg.v == PROTOCOL_VERSION
    # what decodes re-encodes to something that decodes to the same message
    assert decode(encode(msg)) == msg


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(frame: bytes) -> None:
    decode_or_protocol_error(frame)


KEYS = st.sampled_from(
    [
        "type",
        "v",
        "worker_id",
        "pid",
        "memory_probe",
        "counters",
        "id",
        "spec",
        "tasks",
        "measure",
        "kind",
        "ms",
        "threads",
        "mb",
        "hold_ms",
        "data",
        "payload",
        "task_id",
        "ok",
        "output",
        "error",
        "usage",
        "seq",
        "call",
        "answer",
        "content",
        "amount",
        "to",
        "code",
        "args",
        "system",
        "prompt",
        "schema",
        "texts",
        "text",
        "prompt_tokens",
        "value",
    ]
)
TAGS = st.sampled_from(
    [
        "hello",
        "task",
        "tasks",
        "result",
        "heartbeat",
        "shutdown",
        "request",
        "reply",
        "burn",
        "alloc",
        "sleep",
        "echo",
        "call",
        "invoke",
        "think",
        "embed",
        "read_artifact",
        "transfer",
        "artifact",
        "done",
        "refused",
        "vmhwm",
    ]
)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from([0, 1, PROTOCOL_VERSION, 2])
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | TAGS
    | st.binary(max_size=20)
)
OBJECTS = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=8) | st.dictionaries(KEYS | st.text(max_size=8), children, max_size=8),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OBJECTS)
def test_arbitrary_msgpack_objects(obj: Any) -> None:
    decode_or_protocol_error(msgspec.msgpack.encode(obj))


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"type": TAGS, "v": st.sampled_from([PROTOCOL_VERSION, 0, 2])},
        optional={
            "worker_id": LEAVES,
            "pid": LEAVES,
            "memory_probe": LEAVES,
            "counters": st.lists(st.floats() | st.integers(min_value=0, max_value=2**40), max_size=8),
            "id": LEAVES,
            "spec": st.dictionaries(KEYS, LEAVES, max_size=4),
            "tasks": st.lists(st.dictionaries(KEYS, LEAVES | TAGS, max_size=4), max_size=3),
            "measure": LEAVES,
            "task_id": LEAVES,
            "ok": LEAVES,
            "output": LEAVES,
            "error": LEAVES,
            "usage": st.none() | st.lists(st.floats() | st.integers(min_value=0, max_value=2**40), max_size=5),
            "seq": LEAVES,
            "call": st.dictionaries(KEYS, LEAVES, max_size=4),
            "answer": st.dictionaries(KEYS, LEAVES, max_size=4),
        },
    )
)
def test_near_valid_messages(obj: dict[str, Any]) -> None:
    decode_or_protocol_error(msgspec.msgpack.encode(obj))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MESSAGES), st.integers(min_value=0), st.integers(min_value=0, max_value=255))
@example(msg=MESSAGES[0], pos=7, value=0x80)  # the "h" of "hello" becomes 0x80
def test_single_byte_corruption(msg: Message, pos: int, value: int) -> None:
    frame = bytearray(encode(msg))
    frame[pos % len(frame)] = value
    decode_or_protocol_error(bytes(frame))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MESSAGES), st.integers(min_value=0))
def test_truncation(msg: Message, cut: int) -> None:
    frame = encode(msg)
    decode_or_protocol_error(frame[: cut % len(frame)])


@pytest.mark.parametrize("report", THINK_REPORTS + INVOKE_REPORTS, ids=lambda r: type(r).__name__)
def test_task_outputs_round_trip_through_their_typed_decoders(report: ThinkReport | InvokeReport) -> None:
    raw = msgspec.msgpack.encode(report)
    back = decode_think(raw) if isinstance(report, ThinkReport) else decode_invoke(raw)
    assert back == report


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(THINK_REPORTS + INVOKE_REPORTS), st.binary(max_size=64), st.integers(min_value=0))
def test_a_corrupt_task_output_is_a_protocol_error(report: ThinkReport | InvokeReport, junk: bytes, at: int) -> None:
    """A worker's output that is not its report (truncated, overwritten, or the other report) raises
    ``ProtocolError`` from the typed decoder, never anything else."""
    raw = msgspec.msgpack.encode(report)
    cut = at % (len(raw) + 1)
    for frame in (raw[:cut], raw[:cut] + junk, junk):
        for dec in (decode_think, decode_invoke):
            with contextlib.suppress(ProtocolError):
                dec(frame)

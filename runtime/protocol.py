"""Wire messages between the supervisor and its workers.

Every frame is one msgpack-encoded message from the ``Message`` union, tagged by ``type`` and carrying
``v`` (the protocol version). The supervisor's ROUTER sees ``[identity, frame]``; a worker's DEALER
sees ``[frame]``. A frame that does not decode, carries another version or is of a type the receiver
does not expect is dropped and logged by the receiver: it never raises into the pool or the worker loop.

These Structs are also the task specifications used in configuration files (``kind: burn`` …), so
there is exactly one definition of what a task looks like.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from runtime.errors import AecoError, ErrorCode

#: 2: typed inner messages (``ThinkReport``, ``InvokeReport``, ``WorldCall``/``WorldAnswer``).
#: 3: ``Hello`` carries the secret the supervisor handed the worker (``WorkerKeys``).
#: 4: the ``think_batch`` task (``ThinkBatch``/``ThinkBatchReport``).
#: 5: ``StopThink`` (one think of a running batch stopped, the others go on).
#: 6: ``Tasks`` (several tasks in one frame).
PROTOCOL_VERSION = 6

_R = TypeVar("_R")
PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
#: A non-negative amount that must also be finite: ``inf`` passes ``ge=0``, and one infinite charge
#: would poison every sum it enters.
FiniteNonNegFloat = Annotated[float, Meta(ge=0, le=1e15)]


class _Spec(Struct, tag_field="kind", forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of task specifications; the ``kind`` tag selects the handler in the worker."""


class Burn(_Spec, tag="burn", frozen=True):
    """Spin the CPU for ``ms`` milliseconds of CPU time in each of ``threads`` threads.

    The threads release the GIL while they spin, so ``threads`` threads cost ``threads`` × ``ms``.
    """

    ms: PositiveInt
    threads: Annotated[int, Meta(ge=1, le=64)] = 1


class Alloc(_Spec, tag="alloc", frozen=True):
    """Touch every page of ``mb`` MiB of fresh anonymous memory and hold it for ``hold_ms``."""

    mb: PositiveInt
    hold_ms: NonNegInt = 0


class Sleep(_Spec, tag="sleep", frozen=True):
    """Sleep ``ms`` milliseconds without using the CPU."""

    ms: NonNegInt


class Echo(_Spec, tag="echo", frozen=True):
    """Return ``data`` unchanged: the no-op used to measure dispatch overhead."""

    data: str = ""


class Call(_Spec, tag="call", frozen=True):
    """Call an importable Python callable: ``payload`` is ``pickle((fn, args, kwargs))``."""

    payload: bytes


class Invoke(_Spec, tag="invoke", frozen=True):
    """Run an agent's code artifact confined (``workers.sandbox``): ``args`` is JSON; the limits bound
    the confined child. The code reaches the world only through ``Request``/``Reply`` messages that
    the supervisor serves with the invoker's identity. The output is an ``InvokeReport`` (msgpack)."""

    code: str
    args: bytes = b"null"
    cpu_seconds: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    wall_seconds: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    memory_bytes: Annotated[int, Meta(gt=0)] = 256 << 20


class Think(_Spec, tag="think", frozen=True):
    """Generate with the worker's local model, constrained to a JSON schema (``native.llama``).

    The output is a ``ThinkReport`` (msgpack).
    """

    system: str
    prompt: str
    #: JSON schema the completion must follow (compiled to a grammar); empty: free text.
    schema: bytes = b""
    max_tokens: Annotated[int, Meta(ge=1, le=4096)] = 256
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.7
    seed: NonNegInt = 0
    #: A GGUF path; empty: the worker's default model (see ``native.models``). With ``endpoint``: the
    #: model name the server knows.
    model: str = ""
    #: An OpenAI-compatible server (``http://host:port``) to generate with instead of the local model;
    #: charged by the tokens it reports, at these prices (US dollars per 1,000 tokens).
    endpoint: str = ""
    price_prompt_per_1k: NonNegFloat = 0.0
    price_completion_per_1k: NonNegFloat = 0.0


#: Most sequences one ``think_batch`` decodes together (llama.cpp's own bound on a context is 256).
MAX_BATCH = 64


class ThinkBatch(_Spec, tag="think_batch", frozen=True):
    """Several generations decoded together in one context of the worker's local model
    (``native.batch``): one ``llama_decode`` per step for all live sequences, each with its own
    grammar and stop condition. All thinks use the same local model (no ``endpoint``), the one of the
    first. The output is a ``ThinkBatchReport`` (msgpack), one report per think in order, and the
    work each sequence caused, by which ``runtime.economy.split`` divides the batch's measured CPU.
    """

    thinks: Annotated[list[Think], Meta(min_length=1, max_length=MAX_BATCH)]
    #: Evaluate the thinks' common token prefix once and copy it into each sequence, and keep it in
    #: the worker for the next batch that starts with it.
    reuse_prefix: bool = True
    #: One key per think (its agent's id), all different, or none: each think's prompt is kept in the
    #: worker after the batch, and the next think with the same key evaluates only what changed since.
    keys: list[str] = []


class Embed(_Spec, tag="embed", frozen=True):
    """Embed texts with the worker's embedder (``native.embed``); output: msgpack list of float lists."""

    texts: Annotated[list[str], Meta(min_length=1, max_length=256)]
    #: ``hash`` (fast, offline) or a sentence-embedding model name when installed.
    embedder: str = "hash"


TaskSpec = Burn | Alloc | Sleep | Echo | Call | Invoke | Think | ThinkBatch | Embed


# ----------------------------------------------------------------------------- what tasks return
# A task's output travels as bytes in ``Result.output``; these are its types, decoded with
# ``decode_output``. A ``call`` returns a pickle, an ``embed`` a list of vectors, ``burn``/``alloc``/
# ``sleep`` nothing, ``echo`` its data.


class ThinkReport(Struct, frozen=True, forbid_unknown_fields=True):
    """What a ``think`` returns: the completion, its token counts (the model's own), and whether it
    matched the schema. An invalid completion is not a failed task: its tokens were spent and are
    charged, and ``error`` tells the agent why it was refused."""

    text: str
    prompt_tokens: NonNegInt
    completion_tokens: NonNegInt
    finish_reason: str = ""
    #: The completion matched the schema (always true without a schema).
    valid: bool = True
    error: str = ""
    #: What the tokens cost at the task's prices (remote servers; 0 for local inference).
    cost_usd: FiniteNonNegFloat = 0.0

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens: what the agent's token bucket is charged."""
        return self.prompt_tokens + self.completion_tokens


class SeqWork(Struct, frozen=True, forbid_unknown_fields=True):
    """The work one sequence of a ``think_batch`` caused, in tokens evaluated (``runtime.economy.split``)."""

    #: Prompt tokens evaluated for this sequence alone (after the shared prefix).
    own_tokens: NonNegInt
    #: Tokens of the batch's shared prefix (the prompts' common start) evaluated in this batch: their cost
    #: is shared by the sequences that used them.
    shared_tokens: NonNegInt = 0
    #: Tokens of the shared prefix kept in the worker from an earlier batch: they cost this batch no
    #: evaluation (only a copy, part of the batch's overhead).
    kept_tokens: NonNegInt = 0
    #: Decode steps (``llama_decode`` calls after the prompts) this sequence took part in. Every
    #: sequence takes part from the first step on, so step ``k`` holds the sequences with ``decode_steps > k``.
    decode_steps: NonNegInt = 0
    #: Completion tokens the grammar forced, evaluated for this sequence alone beyond its one row per
    #: decode step (``native.batch``'s jump-forward: with the prompt, or after a step's drawn token).
    forced_tokens: NonNegInt = 0


class ThinkBatchReport(Struct, frozen=True, forbid_unknown_fields=True):
    """What a ``think_batch`` returns: one ``ThinkReport`` and one ``SeqWork`` per think, in order."""

    reports: list[ThinkReport]
    work: list[SeqWork]


#: How confined code can end: ok (empty), or why it failed. A subset of ``runtime.errors.ErrorCode``.
InvokeEnding = Literal[
    "",
    "code_error",
    "cpu_exceeded",
    "memory_exceeded",
    "deadline_exceeded",
    "killed",
    "output_too_large",
    "sandbox_error",
    "cancelled",
]


class InvokeReport(Struct, frozen=True, forbid_unknown_fields=True):
    """How a confined invocation ended (an ``invoke`` task). A failure of the agent's code is a report
    with ``ok`` false and its ``error_code``, not a failed task: the task itself ran as asked."""

    ok: bool
    #: JSON text of the code's result (``null`` when it set none); empty when not ok.
    value: bytes
    error: str
    #: Why it failed (empty when ok).
    error_code: InvokeEnding
    #: What the code printed (stdout and stderr, bounded), decoded leniently.
    stdout: str
    cpu_seconds: NonNegFloat
    peak_memory_bytes: NonNegInt
    #: The isolation layers that were applied (``mountns``, ``netns``, ``seccomp`` …).
    isolation: list[str] = []


class ReadArtifactCall(Struct, tag="read_artifact", tag_field="call", frozen=True, forbid_unknown_fields=True):
    """Confined code asks for an artifact's content at HEAD (as its invoker may read it)."""

    id: Annotated[str, Meta(max_length=256)]


class TransferCall(Struct, tag="transfer", tag_field="call", frozen=True, forbid_unknown_fields=True):
    """Confined code moves an asset (scrip unless it says) from its invoker, within what the invoker
    authorised for that asset."""

    to: Annotated[str, Meta(max_length=64)]
    amount: Annotated[int, Meta(gt=0, le=1 << 62)]
    asset: Annotated[str, Meta(max_length=32)] = "scrip"


#: What confined code may ask of the world (``world.read_artifact``, ``world.transfer``).
WorldCall = ReadArtifactCall | TransferCall


class ArtifactAnswer(Struct, tag="artifact", tag_field="answer", frozen=True, forbid_unknown_fields=True):
    """The content of the artifact asked for."""

    content: bytes


class DoneAnswer(Struct, tag="done", tag_field="answer", frozen=True, forbid_unknown_fields=True):
    """The call was carried out."""


class RefusedAnswer(Struct, tag="refused", tag_field="answer", frozen=True, forbid_unknown_fields=True):
    """The call was refused; ``error`` says why, for the agent's code to read."""

    error: str


WorldAnswer = ArtifactAnswer | DoneAnswer | RefusedAnswer
#: The tasks a configuration may ask for directly: the instruments the accounting is checked with.
InstrumentSpec = Burn | Alloc | Sleep | Echo

MemoryProbe = Literal["cgroup-v1", "cgroup-v2", "vmhwm", "off"]


class Usage(Struct, frozen=True, array_like=True):
    """What one task cost, as the worker measured it."""

    cpu_seconds: float
    #: Highest memory use of the worker while the task ran (bytes, absolute).
    peak_memory_bytes: int
    #: Memory use of the worker when the task started; peak minus baseline is what the task added.
    baseline_memory_bytes: int
    wall_seconds: float


class Counters(Struct, frozen=True, array_like=True):
    """A worker's cumulative CPU, split into task time and named overhead (seconds).

    ``startup + idle + measurement + tasks == cpu_total`` at the moment of the report: every
    segment of the worker's life is assigned to exactly one of them.
    """

    cpu_total: float
    startup: float
    idle: float
    measurement: float
    tasks: float
    tasks_done: int
    memory_bytes: int


class _Msg(Struct, tag_field="type", forbid_unknown_fields=True, frozen=True, kw_only=True):
    v: int = PROTOCOL_VERSION


class Hello(_Msg, tag="hello", frozen=True):
    """First frame of a worker: it is ready for a task. ``secret`` proves the supervisor spawned it
    (``WorkerKeys``); a peer whose hello lacks it is never given a task."""

    worker_id: int
    pid: int
    memory_probe: MemoryProbe
    counters: Counters
    secret: bytes = b""
    #: The executor's initializer raised (its traceback): the worker exits after this hello.
    init_error: str = ""


class Task(_Msg, tag="task", frozen=True):
    """One unit of work for one worker. ``measure=False`` skips every probe (benchmarks only)."""

    id: int
    spec: TaskSpec
    measure: bool = True
    #: Bytes the task may add to the worker's memory (0: no limit); over it the task fails with
    #: ``memory_exceeded`` (the worker's memory cgroup limit, else ``RLIMIT_AS``).
    memory_limit: NonNegInt = 0


#: Most tasks one ``Tasks`` frame carries.
MAX_TASKS_PER_FRAME = 256


class Tasks(_Msg, tag="tasks", frozen=True):
    """Several tasks for one worker in one frame (the pool's ``prefetch``: all but the first wait behind
    the one it runs). It runs them one at a time in this order, measures each alone and answers each
    with its own ``Result``, as if they had come one per frame: a frame is only cheaper to carry."""

    tasks: Annotated[list[Task], Meta(min_length=1, max_length=MAX_TASKS_PER_FRAME)]


class Result(_Msg, tag="result", frozen=True):
    """The outcome of a task. ``error`` is set iff the task failed in the worker."""

    task_id: int
    ok: bool
    output: bytes
    error: str | None
    usage: Usage | None
    counters: Counters
    #: Why it failed, when the worker can tell more than "the task raised" (``cancelled``: it stopped
    #: because the supervisor asked it to, with SIGUSR1).
    error_code: Literal["", "memory_exceeded", "cancelled"] = ""


class Heartbeat(_Msg, tag="heartbeat", frozen=True):
    """Sent by an idle worker every ``heartbeat_s``: it is alive and this is its CPU so far."""

    counters: Counters


class Shutdown(_Msg, tag="shutdown", frozen=True):
    """Ask a worker to exit after its current task."""


class StopThink(_Msg, tag="stop_think", frozen=True):
    """Stop think ``index`` of the ``think_batch`` ``task_id`` the worker runs; the others go on. The
    worker reads it between two decode steps; that think's report says ``cancelled``."""

    task_id: int
    index: NonNegInt


class Request(_Msg, tag="request", frozen=True):
    """From a busy worker: the confined code it runs calls the world."""

    task_id: int
    seq: int
    call: WorldCall


class Reply(_Msg, tag="reply", frozen=True):
    """The supervisor's answer to a ``Request``, given as the task's invoker."""

    task_id: int
    seq: int
    answer: WorldAnswer


Message = Hello | Task | Tasks | Result | Heartbeat | Shutdown | StopThink | Request | Reply

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(AecoError, ValueError):
    """A frame that is not a valid message of this protocol version."""

    default_code: ErrorCode = "protocol"


def encode(msg: Message) -> bytes:
    """Encode one message to a frame."""
    return _encoder.encode(msg)


def decode(frame: bytes) -> Message:
    """Decode one frame, raising ``ProtocolError`` with the reason if it is not a valid message."""
    try:
        msg: Message = _decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # DecodeError covers ValidationError; a non-UTF-8 string and a value nested a thousand
        # deep before the tag escape it, and a frame must never raise anything but ProtocolError.
        raise ProtocolError(f"undecodable frame ({len(frame)} bytes): {type(exc).__name__}: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {msg.v}, expected {PROTOCOL_VERSION}")
    if isinstance(msg, Tasks) and any(t.v != PROTOCOL_VERSION for t in msg.tasks):
        raise ProtocolError(f"a task of another protocol version in a tasks frame, expected {PROTOCOL_VERSION}")
    return msg


class WorkerBoot(Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker is told at start (JSON in the ``AECO_WORKER_BOOT`` environment variable)."""

    worker_id: int
    endpoint: str
    parent_pid: int
    heartbeat_s: float
    #: The worker's own memory cgroup (directory, version), or None to fall back to /proc probes.
    memory_cgroup: tuple[str, int] | None = None
    #: The worker's own cgroup directory per controller: confined code gets a child cgroup under each.
    cgroup_dirs: dict[str, str] = {}
    #: Paths confined code must not see (the data directory, the pool's socket directory).
    sandbox_hide: list[str] = []
    #: An inherited pipe holding the worker's ``WorkerKeys`` (-1: none, a worker started by hand).
    keys_fd: int = -1
    #: An inherited memory file the worker counts the tasks it begins in (``runtime.host.tally``; -1: none).
    tally_fd: int = -1
    #: A pickled ``(fn, args)`` to call before saying hello (``WorkerPoolExecutor``'s initializer).
    initializer: bytes = b""


class WorkerKeys(Struct, frozen=True, forbid_unknown_fields=True):
    """What makes a worker one of its supervisor's, handed over through an inherited pipe (``WorkerBoot.
    keys_fd``) that the worker reads and closes before anything else: never in its argv or environment,
    which its own confined code or any process of the same user could read from ``/proc``.

    ``identity`` is its ZeroMQ routing id (random: a process that guesses the next one cannot take a
    replacement worker's place), ``secret`` what it proves itself with in its ``Hello``.
    """

    identity: bytes
    secret: bytes


_think_report = msgspec.msgpack.Decoder(ThinkReport)
_invoke_report = msgspec.msgpack.Decoder(InvokeReport)
_think_batch_report = msgspec.msgpack.Decoder(ThinkBatchReport)


def decode_think(output: bytes) -> ThinkReport:
    """A ``think`` task's output; ``ProtocolError`` if it is not a ``ThinkReport``."""
    return _decode_output(_think_report, output)


def decode_think_batch(output: bytes) -> ThinkBatchReport:
    """A ``think_batch`` task's output; ``ProtocolError`` if it is not a ``ThinkBatchReport``."""
    return _decode_output(_think_batch_report, output)


def decode_invoke(output: bytes) -> InvokeReport:
    """An ``invoke`` task's output; ``ProtocolError`` if it is not an ``InvokeReport``."""
    return _decode_output(_invoke_report, output)


def _decode_output(decoder: msgspec.msgpack.Decoder[_R], output: bytes) -> _R:
    try:
        return decoder.decode(output)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        name = decoder.type.__name__ if isinstance(decoder.type, type) else str(decoder.type)
        raise ProtocolError(f"a task output that is not a {name} ({len(output)} bytes): {exc}") from None


def kind_of(spec: Struct) -> str:
    """The ``kind`` tag of a task specification or an action (``"burn"``, ``"write_artifact"`` …)."""
    return str(spec.__struct_config__.tag)

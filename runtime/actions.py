"""What an agent can do to the world, as typed actions (the placeholder agents' workload today, the
LLM's action schema later). Each is executed by the supervisor with the acting agent's identity."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

ArtifactIdText = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")]


class _Action(Struct, tag_field="kind", forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class WriteArtifact(_Action, tag="write_artifact", frozen=True):
    """Create or overwrite an artifact the agent owns."""

    id: ArtifactIdText
    content: str
    artifact_kind: Literal["data", "code"] = "data"
    price: Annotated[int, Meta(ge=0)] = 0
    readable: Literal["public", "owner"] = "public"


class ReadArtifact(_Action, tag="read_artifact", frozen=True):
    """Read an artifact at HEAD."""

    id: ArtifactIdText


class DeleteArtifact(_Action, tag="delete_artifact", frozen=True):
    """Delete an artifact the agent owns."""

    id: ArtifactIdText


class InvokeArtifact(_Action, tag="invoke_artifact", frozen=True):
    """Run a code artifact confined; ``max_transfer`` is the scrip the code may move on the agent's behalf."""

    id: ArtifactIdText
    args: Any = None
    max_transfer: Annotated[int, Meta(ge=0)] = 0


class TransferScrip(_Action, tag="transfer", frozen=True):
    """Give scrip to another agent."""

    to: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    amount: Annotated[int, Meta(gt=0)]


class Remember(_Action, tag="remember", frozen=True):
    """Store a memory (embedded on a worker, charged, counted against the agent's memory quota)."""

    text: Annotated[str, Meta(min_length=1, max_length=4096)]


class RecallMemories(_Action, tag="recall", frozen=True):
    """Recall the memories closest to ``query``."""

    query: Annotated[str, Meta(min_length=1, max_length=1024)]
    k: Annotated[int, Meta(ge=1, le=20)] = 5


class SleepFor(_Action, tag="sleep", frozen=True):
    """Sleep ``seconds``, or until an event of kind ``until`` arrives (whichever comes first)."""

    seconds: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    until: Annotated[str, Meta(pattern=r"^[a-z_]{1,32}$")] | None = None


class Noop(_Action, tag="noop", frozen=True):
    """Do nothing this turn."""


#: Everything an agent can do. The placeholder agents' workloads use the artifact actions.
AgentAction = (
    WriteArtifact
    | ReadArtifact
    | DeleteArtifact
    | InvokeArtifact
    | TransferScrip
    | Remember
    | RecallMemories
    | SleepFor
    | Noop
)
Action = WriteArtifact | ReadArtifact | DeleteArtifact | InvokeArtifact

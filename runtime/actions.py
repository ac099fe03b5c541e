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


Action = WriteArtifact | ReadArtifact | DeleteArtifact | InvokeArtifact

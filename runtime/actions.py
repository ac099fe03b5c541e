"""What an agent can do to the world: the typed actions (an LLM's output is decoded into one; scripted
policies and placeholder workloads list them), and ``perform``, the one way any of them is carried out —
by the supervisor, with the acting agent's identity.

With ``runtime.protocol`` (supervisor and workers) and ``runtime.config`` (operator and runtime), this is
one of the languages the runtime speaks: agents and the world. It imports nothing above it at run time.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta, Struct

if TYPE_CHECKING:
    from runtime.world.world import World

ArtifactIdText = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")]
AgentIdText = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
#: The ledger's assets (``runtime.economy.ledger.ASSETS``; a unit test keeps the two lists equal).
TradeAsset = Literal["scrip", "cpu_rate", "llm_rate", "disk_quota", "memory_quota", "llm_budget"]
#: What can be sold for scrip: every asset but scrip.
RightAsset = Literal["cpu_rate", "llm_rate", "disk_quota", "memory_quota", "llm_budget"]
#: ``runtime.world.store.READABLE_PATTERN`` (a unit test keeps the two equal).
ReadableText = Annotated[
    str,
    Meta(
        pattern=r"^(public|owner|allow:[a-z][a-z0-9_-]{0,31}(\+[a-z][a-z0-9_-]{0,31}){0,15}|price:[0-9]{1,15}"
        r"|contract:[A-Za-z0-9][A-Za-z0-9_-]{0,127})$"
    ),
]
OfferIdText = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
#: ``runtime.economy.ledger.TriggerId`` (a unit test keeps the two equal).
TriggerIdText = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]


class _Action(Struct, tag_field="kind", forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class WriteArtifact(_Action, tag="write_artifact", frozen=True):
    """Create or overwrite an artifact the agent owns."""

    id: ArtifactIdText
    content: str
    artifact_kind: Literal["data", "code"] = "data"
    price: Annotated[int, Meta(ge=0)] = 0
    #: Its access policy: public, owner, allow:<agent>+<agent>, price:<scrip>, contract:<artifact id>.
    readable: ReadableText = "public"


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
    #: Who is charged the run's CPU and memory: the invoker, or the owner within what it sponsors.
    charge_to: Literal["invoker", "owner"] = "invoker"


class Sponsor(_Action, tag="sponsor", frozen=True):
    """Pay up to ``cpu_seconds`` in all for others' runs of one of the agent's artifacts (``charge_to`` owner)."""

    id: ArtifactIdText
    cpu_seconds: Annotated[float, Meta(ge=0, le=3600)]


class TransferScrip(_Action, tag="transfer", frozen=True):
    """Give scrip (or any other asset: a rate right, a quota) to another agent."""

    to: AgentIdText
    amount: Annotated[int, Meta(gt=0)]
    asset: TradeAsset = "scrip"


class MakeOffer(_Action, tag="offer", frozen=True):
    """Offer ``amount`` of a right or quota for ``price`` scrip, to whoever accepts it first."""

    asset: RightAsset
    amount: Annotated[int, Meta(gt=0)]
    price: Annotated[int, Meta(ge=0)]
    #: Names the offer ``<agent>.<name>`` (so a partner can know its id in advance); else one is made up.
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,24}$")] | None = None


class AcceptOffer(_Action, tag="accept_offer", frozen=True):
    """Buy the whole of an open offer: its asset for its price, atomically."""

    offer: OfferIdText


class CancelOffer(_Action, tag="cancel_offer", frozen=True):
    """Withdraw one of the agent's own open offers."""

    offer: OfferIdText


class SubmitTask(_Action, tag="submit", frozen=True):
    """Submit one of the agent's code artifacts for an operator's task: passing its tests earns the reward."""

    task: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
    id: ArtifactIdText


class Subscribe(_Action, tag="subscribe", frozen=True):
    """Run a code artifact on every event of kind ``on`` (by or about ``actor``, about artifact ``about``),
    charged to the agent; it stops if the agent cannot pay."""

    id: ArtifactIdText
    on: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    actor: AgentIdText | None = None
    about: ArtifactIdText | None = None


class Unsubscribe(_Action, tag="unsubscribe", frozen=True):
    """Stop one of the agent's own triggers for good (its id is what ``subscribe`` answered)."""

    trigger: TriggerIdText


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
    | Sponsor
    | TransferScrip
    | MakeOffer
    | AcceptOffer
    | CancelOffer
    | SubmitTask
    | Subscribe
    | Unsubscribe
    | Remember
    | RecallMemories
    | SleepFor
    | Noop
)
Action = WriteArtifact | ReadArtifact | DeleteArtifact | InvokeArtifact


class Performed(Struct, frozen=True):
    """What an action did: one line for the agent's next context and for status displays."""

    text: str
    #: For ``recall``: the texts found, most similar first.
    recalled: tuple[str, ...] | None = None
    #: Whether what it did is already durable when ``perform`` returns — a ledger operation or a store
    #: commit — and so recorded by the ledger's journal or the store's history: the agent's ``action``
    #: event then restates it, and the agent need not wait for that event before it thinks again.
    durable: bool = False


async def perform(world: World, agent: str, action: AgentAction) -> Performed:
    """Carry out ``action`` as ``agent``; raise the world's ``AecoError`` when it is refused.

    Every agent loop (LLM, scripted, placeholder) comes here: an action means the same whoever decided it.
    The supervisor's CPU spent on it is the agent's to pay (``runtime.economy.metering``).
    """
    return await world.economy.meter.metered(agent, _perform(world, agent, action))


async def _perform(world: World, agent: str, action: AgentAction) -> Performed:
    match action:
        case WriteArtifact():
            r = await world.write_artifact(
                agent,
                action.id,
                action.content.encode(),
                kind=action.artifact_kind,
                price=action.price,
                readable=action.readable,
            )
            return Performed(f"wrote {action.id} ({r.size} bytes, {r.owned_bytes} owned)", durable=True)
        case ReadArtifact():
            art = await world.read_artifact(agent, action.id)
            return Performed(f"{action.id} ({art.size} bytes): {art.content[:80].decode('utf-8', 'replace')}")
        case DeleteArtifact():
            await world.delete_artifact(agent, action.id)
            return Performed(f"deleted {action.id}", durable=True)
        case InvokeArtifact():
            inv = await world.invoke_artifact(
                agent, action.id, action.args, max_transfer=action.max_transfer, charge_to=action.charge_to
            )
            return Performed(f"{action.id} returned {json.dumps(inv.value)[:80]} (paid {inv.paid})")
        case Sponsor():
            await world.sponsor(agent, action.id, action.cpu_seconds)
            return Performed(f"pays up to {action.cpu_seconds:g} CPU-s for others' runs of {action.id}", durable=True)
        case TransferScrip():
            await world.give(agent, action.to, action.asset, action.amount)
            return Performed(f"gave {action.amount} {action.asset} to {action.to}", durable=True)
        case MakeOffer():
            offer = await world.post_offer(agent, action.asset, action.amount, action.price, action.name)
            return Performed(
                f"offered {action.amount} {action.asset} for {action.price} scrip as {offer.offer}", durable=True
            )
        case AcceptOffer():
            bought = await world.accept_offer(agent, action.offer)
            return Performed(
                f"bought {bought.amount} {bought.asset} from {bought.seller} for {bought.price} scrip", durable=True
            )
        case CancelOffer():
            await world.cancel_offer(agent, action.offer)
            return Performed(f"withdrew offer {action.offer}", durable=True)
        case SubmitTask():
            award = await world.submit_task(agent, action.task, action.id)
            return Performed(f"{action.id} solved task {award.task}: earned {award.reward} scrip", durable=True)
        case Subscribe():
            trigger = await world.subscribe(agent, action.id, action.on, action.actor, action.about)
            return Performed(f"subscribed {action.id} to {action.on} as {trigger.id}", durable=True)
        case Unsubscribe():
            await world.unsubscribe(agent, action.trigger)
            return Performed(f"ended trigger {action.trigger}", durable=True)
        case Remember():
            item = await world.remember(agent, action.text)
            return Performed(f"remembered ({item.size_bytes} bytes)")
        case RecallMemories():
            found = await world.recall(agent, action.query, action.k)
            return Performed(f"recalled {len(found)}", tuple(r.item.text[:80] for r in found))
        case SleepFor():
            woken = await world.sleep(agent, action.seconds, action.until)
            # The seq names the event that woke it (which may have come from another node).
            return Performed(f"woke on {woken.kind} #{woken.seq}" if woken else f"slept {action.seconds:g} s")
        case Noop():
            return Performed("nothing")

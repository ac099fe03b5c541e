"""Where a supervisor keeps its state, decided in one place.

Embedded (the default): the LMDB ledger, the Git artifact store and the LMDB event log under the data
directory. Shared (``node.postgres_url``, from ``POSTGRES_URL``): the ledger, the artifacts and the
event log in PostgreSQL, so that several nodes run one world; with ``node.redis_url`` (``REDIS_URL``)
a Redis relay carries wake-ups between the nodes (the PostgreSQL log stays the source of truth).
Either way a ZeroMQ PUB socket under ``<data>/run`` serves this node's live observers.

``python -m runtime.backends setup [--config FILE]`` prepares a shared database once per deployment:
it applies the schema migrations and creates the login role of ``POSTGRES_AGENT_URL`` (a member of the
restricted ``aeco_agent`` group), which only the operator's role may do. It refuses to create that role
without a password: there is no default one to fall back on.

A server that is merely slow to come up is waited for, with back-off, up to ``node.connect_timeout_s``;
one that rejects the node (bad URL, unknown database or role) fails at once. Both raise
``BackendUnavailable`` with one line that names the URL without its password.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from runtime import config as config_mod
from runtime.config import Config, node_id
from runtime.economy.ledger import Ledger
from runtime.errors import RESTORE, Damaged, Parser, Unavailable, report
from runtime.world.events import Event, Events
from runtime.world.events.pub import EventPublisher
from runtime.world.store import Store

if TYPE_CHECKING:
    from runtime.economy.ledger.postgres import PostgresLedger
    from runtime.world.events.base import Follower
    from runtime.world.events.redis import RedisRelay
    from runtime.world.store.postgres import PostgresStore


class BackendUnavailable(Unavailable):
    """PostgreSQL or Redis could not be used; the message is one line naming the (redacted) URL."""


@dataclass
class Backends:
    """The opened ledger, store and event log, with what else must be closed after them."""

    ledger: Ledger
    store: Store
    events: Events
    publisher: EventPublisher
    #: One line for the start-up banner: where the state lives.
    where: str
    #: The Redis relay of a shared deployment's wake-ups, if any (closed before the event log it reads).
    relay: RedisRelay | None = None

    def close(self) -> None:
        """Close everything: queued writes are committed first."""
        if self.relay is not None:
            self.relay.close()
        self.events.close()
        self.publisher.close()
        self.store.close()
        self.ledger.close()


def follow_shared_caches(ledger: PostgresLedger, store: PostgresStore) -> Follower:
    """The rules that keep a node's caches of the shared state true across nodes, driven by the events
    other nodes commit (the node's own writes put their results into the caches themselves):

    - a ``transfer`` (addressed to the recipient, with the journal seq of its operation) is added to the
      recipient's cached holdings, once (``HoldingsCache.credit``); one without a seq makes the node
      forget them. Every debit of an agent is an operation of the node that runs it; a credit may
      come from any node, and announces itself this way;
    - ``artifact_written`` and ``artifact_deleted`` mark the artifact for reading again before the
      next listing; ``system_reset`` (a rollback) drops the copy of HEAD.

    What announces itself to nobody is bounded by each cache's maximum age.
    """

    def follow(events: Sequence[Event], local: bool) -> None:
        if local:
            return
        changed: list[str] = []
        for ev in events:
            if ev.kind == "transfer" and ev.agent is not None:
                asset, amount, seq = (ev.fields.get(k) for k in ("asset", "amount", "ledger_seq"))
                if isinstance(asset, str) and isinstance(amount, int) and amount > 0 and isinstance(seq, int):
                    ledger.holdings_cache.credit(ev.agent, asset, amount, seq)
                else:
                    ledger.holdings_cache.forget(ev.agent)
            elif ev.kind in ("artifact_written", "artifact_deleted") and isinstance(ev.fields.get("id"), str):
                changed.append(ev.fields["id"])
            elif ev.kind == "system_reset":
                store.head_cache.drop()
        if changed:
            store.head_cache.dirty(changed)

    return follow


def _has_lmdb(path: Path) -> bool:
    """An LMDB environment with something in it is at ``path`` (an empty file is what a new one starts as)."""
    try:
        return (path / "data.mdb").stat().st_size > 0
    except FileNotFoundError:
        return False


def open_backends(cfg: Config, data: Path) -> Backends:
    """Open the ledger, the store and the event log ``cfg`` asks for (see the module docstring).

    Raises ``BackendUnavailable`` when a server cannot be used, ``Damaged`` (naming the file and what to
    do) when a file of an embedded store is damaged, or missing while the others say a run used it;
    nothing stays open then.
    """
    with contextlib.ExitStack() as opened:
        node = cfg.node
        relay: RedisRelay | None = None
        ledger: Ledger
        store: Store
        events: Events
        if not node.postgres_url:
            from runtime.economy.ledger.open import open_ledger
            from runtime.world.events.log import EVENTS_FIX, EventLog
            from runtime.world.store.git import GitStore

            had_events = _has_lmdb(data / "events")
            if not _has_lmdb(data / "ledger") and had_events:
                raise Damaged(
                    data / "ledger" / "data.mdb",
                    "missing, but the event log of a run is there",
                    f"the ledger is the record of who holds what and nothing rebuilds it: {RESTORE}, or start "
                    "a new world in an empty data_dir",
                )
            ledger = open_ledger(data)
            opened.callback(ledger.close)
            if not had_events and "agent" in ledger.accounts().values():
                raise Damaged(data / "events" / "data.mdb", "missing, but the ledger of a run is there", EVENTS_FIX)
            store = GitStore(data / "artifacts.git")
            opened.callback(store.close)
            try:
                events = EventLog(data / "events")
            except lmdb.Error as exc:
                raise Damaged(
                    data / "events" / "data.mdb", f"damaged ({type(exc).__name__}: {exc})", EVENTS_FIX
                ) from exc
            opened.callback(events.close)
            where = f"LMDB ledger, Git store and LMDB events in {data}"
        else:
            from runtime.economy.ledger.postgres import PostgresLedger
            from runtime.host.postgres import DatabaseUnavailable, redact
            from runtime.world.events.postgres import PostgresEventLog
            from runtime.world.events.redis import RedisRelay, RedisUnavailable
            from runtime.world.store.postgres import PostgresStore

            deadline = node.connect_timeout_s
            try:
                pg_ledger = PostgresLedger(node.postgres_url, connect_deadline_s=deadline)
                opened.callback(pg_ledger.close)
                ledger = pg_ledger
                pg_store = PostgresStore(
                    node.postgres_url, agent_url=node.postgres_agent_url or None, deadline_s=deadline
                )
                opened.callback(pg_store.close)
                store = pg_store
                pg_events = PostgresEventLog(node.postgres_url, deadline_s=deadline)
                opened.callback(pg_events.close)
                pg_events.follow(follow_shared_caches(pg_ledger, pg_store))
                events = pg_events
                where = f"PostgreSQL at {redact(node.postgres_url)}"
                if node.redis_url:
                    relay = RedisRelay(
                        node.redis_url,
                        pg_events,
                        namespace=node.namespace,
                        node=node_id(cfg) or None,
                        deadline_s=deadline,
                    )
                    opened.callback(relay.close)
                    where += f", wake-ups through Redis at {redact(node.redis_url)} ({relay.channel})"
            except (DatabaseUnavailable, RedisUnavailable) as exc:
                raise BackendUnavailable(" ".join(str(exc).split())) from exc
        (data / "run").mkdir(exist_ok=True)
        publisher = EventPublisher(run_dir=str(data / "run"))
        opened.callback(publisher.close)
        events.attach(publisher)
        opened.pop_all()
        return Backends(ledger, store, events, publisher, where, relay)


def setup(cfg: Config) -> str:
    """Migrate the shared schemas and create the agent-facing login role; return what was done.

    Raises ``ConfigError`` when ``POSTGRES_AGENT_URL`` names no role or no password (before connecting),
    ``BackendUnavailable`` when there is no PostgreSQL to set up or it cannot be used.
    """
    from urllib.parse import unquote, urlsplit

    from runtime.economy.ledger.postgres import PostgresLedger
    from runtime.host.postgres import DatabaseUnavailable, connect, redact
    from runtime.world.events.postgres import PostgresEventLog
    from runtime.world.store.postgres import PostgresStore, ensure_agent_login

    node = cfg.node
    if not node.postgres_url:
        raise BackendUnavailable("nothing to set up: POSTGRES_URL (node.postgres_url) is not set")
    login: tuple[str, str] | None = None
    if node.postgres_agent_url:
        agent = urlsplit(node.postgres_agent_url)
        if not agent.username:
            raise config_mod.ConfigError(
                f"POSTGRES_AGENT_URL={redact(node.postgres_agent_url)!r} names no role (postgresql://ROLE:PASSWORD@...)"
            )
        if not agent.password:
            # A login role that answers over the network with no password is an open door; there is no
            # default password to fall back on.
            raise config_mod.ConfigError(
                f"POSTGRES_AGENT_URL={redact(node.postgres_agent_url)!r} has no password: setup will not create "
                f"the login role {agent.username!r} without one (postgresql://ROLE:PASSWORD@...)"
            )
        login = (unquote(agent.username), unquote(agent.password))
    deadline = node.connect_timeout_s
    try:
        # Opening each backend applies its migrations (under an advisory lock).
        PostgresLedger(node.postgres_url, connect_deadline_s=deadline).close()
        PostgresStore(node.postgres_url, deadline_s=deadline).close()
        PostgresEventLog(node.postgres_url, deadline_s=deadline).close()
        done = f"schemas migrated at {redact(node.postgres_url)}"
        if login is not None:
            with connect(node.postgres_url, deadline_s=deadline) as conn:
                ensure_agent_login(conn, *login)
            done += f"; agent role {login[0]!r} ready"
    except DatabaseUnavailable as exc:
        raise BackendUnavailable(" ".join(str(exc).split())) from exc
    return done


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``setup``)."""
    ap = Parser(prog="python -m runtime.backends", description="Prepare the shared PostgreSQL.")
    ap.add_argument("command", choices=["setup"], help="migrate the schemas and create the agent login role")
    ap.add_argument("--config", default="config/scale-out.yaml", help="YAML configuration (and the environment)")
    args = ap.parse_args(argv)
    try:
        print(f"setup: {setup(config_mod.load(args.config))}")
    except (config_mod.ConfigError, BackendUnavailable) as exc:
        report(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

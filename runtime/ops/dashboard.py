"""The web dashboard: served by the supervisor on its metrics port (``127.0.0.1`` by default), next to
``/metrics``, on one port.

    GET  /                  the page (static HTML and JS, no build step: ``dashboard_static/``)
    GET  /metrics           Prometheus (``runtime.ops.metrics``)
    GET  /api/status        the status snapshot the live view shows (``runtime.ops.status.Status``; the
                            first ``?agents=N`` agents' rows, 100 by default, and the totals of all)
    GET  /api/artifacts     artifacts at HEAD with their owners and sizes
    GET  /api/history/{id}  the newest commits that changed an artifact (what a rollback goes to)
    GET  /api/bill/{agent}  the agent's bill from the ledger (``runtime.ops.bill``)
    GET  /api/events        the event stream, live (server-sent events, from ``?since=SEQ``)
    POST /api/control       an operator control, with ``Authorization: Bearer <token>``

Reading needs nothing; a control needs the token generated at start, printed once and kept (0600) in
``<data>/run/dashboard.token``. Every control is an ordinary journaled operation: pause and resume are
``agent_paused``/``agent_resumed`` events (the agent finishes its turn, then waits; a restarted supervisor
replays them, ``runtime.node.replay_operator``), grant and burn
are ledger ``Mint``/``Burn`` ops under the ledger's rules (a rate right re-rates the agent's bucket, as a
trade does; a ``cpu_rate`` grant must fit the container's CPU, as at a start), an
injected note is an ``operator_note`` event, a rollback is a store commit announced by ``system_reset``, a
posted task is a ledger ``PostTask`` op announced by ``task_posted`` (``runtime.world.tasks``).

The server runs in its own thread ("dashboard") with its own event loop, so a slow page never holds the
agents' loop back and what it costs is that thread's CPU (``benchmarks/dashboard.py`` measures it). Its
reads are the stores' thread-safe synchronous reads and the status the supervisor encodes once per
interval, whatever the number of readers; a control is run on the supervisor's loop, where the agents and
the economy live. The page polls the status every 2 s and keeps its own history for the sparklines
and plots, so the supervisor holds none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal, Protocol

import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from runtime.config import TaskConfig
from runtime.economy.charging import Economy
from runtime.economy.ledger import Burn, Ledger, Mint
from runtime.economy.ledger.open import NoLedger, open_ledger
from runtime.economy.rights import RATE_RIGHTS, cpu_rate_held
from runtime.errors import AecoError, ErrorCode, Parser, report
from runtime.ops import bill as bill_mod
from runtime.ops.status import STATUS_NAME, Status
from runtime.world.events import Events
from runtime.world.events.log import EventLog
from runtime.world.store import Store, StoreError
from runtime.world.store.open import open_store
from runtime.world.tasks import TaskMint

STATIC = Path(__file__).with_name("dashboard_static")
TOKEN_NAME = "dashboard.token"
#: Where a running supervisor's dashboard is, for ``python -m runtime.admin control``.
URL_NAME = "dashboard.url"
#: How often an event stream looks for new events: what a browser waits at most, against one read of
#: the log per stream per period.
EVENTS_POLL_S = 1.0
#: The most events a stream sends per period: at 1,000 agents the world makes more than a page can show,
#: so a live stream that falls behind jumps to the newest and says how many it skipped (a replay's does not).
EVENTS_BATCH = 100
#: Agents' rows in a status unless ``?agents=N`` asks for another number (the totals cover every agent).
STATUS_AGENTS = 100
#: Commits of an artifact's history the page lists, newest first (a long run has thousands).
HISTORY_ROWS = 50
Asset = Literal["scrip", "cpu_rate", "llm_rate", "disk_quota", "memory_quota", "llm_budget"]


class Pause(msgspec.Struct, tag="pause", frozen=True):
    """Pause an agent after its current turn."""

    agent: str


class Resume(msgspec.Struct, tag="resume", frozen=True):
    """Let a paused agent take turns again."""

    agent: str


class Grant(msgspec.Struct, tag="grant", frozen=True):
    """Mint ``amount`` of ``asset`` to ``agent``."""

    agent: str
    asset: Asset
    amount: Annotated[int, msgspec.Meta(gt=0)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "operator grant"


class BurnAsset(msgspec.Struct, tag="burn", frozen=True):
    """Burn ``amount`` of ``asset`` held by ``agent``."""

    agent: str
    asset: Asset
    amount: Annotated[int, msgspec.Meta(gt=0)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "operator burn"


class Inject(msgspec.Struct, tag="inject", frozen=True):
    """An ``operator_note`` event, to ``agent`` (None: everyone)."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    agent: str | None = None


class Rollback(msgspec.Struct, tag="rollback", frozen=True):
    """Reset the artifact store to a commit (as a new commit) and announce it."""

    to: str


class PostTaskControl(msgspec.Struct, tag="post_task", frozen=True):
    """Post (or re-state) a task with its hidden tests (``runtime.world.tasks``)."""

    task: TaskConfig


Control = Pause | Resume | Grant | BurnAsset | Inject | Rollback | PostTaskControl
_control = msgspec.json.Decoder(Control)


class Pausable(Protocol):
    """An agent the operator can pause."""

    @property
    def id(self) -> str: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...


class Dashboard:
    """The app over a node's parts; ``status`` (the encoded ``Status``) is replaced by the supervisor
    every interval. Replaying a stopped run (``replay``): no token, no economy, no metrics; read-only."""

    def __init__(
        self,
        token: str | None,
        registry: CollectorRegistry | None,
        ledger: Ledger,
        events: Events,
        store: Store,
        agents: Callable[[], Sequence[object]],
        economy: Economy | None = None,
        cpu_capacity: int | None = None,
        mint: TaskMint | None = None,
    ) -> None:
        self._token = token
        self.mint = mint
        self._registry = registry
        self.ledger, self.events, self.store, self.agents, self.economy = ledger, events, store, agents, economy
        #: The millicores of ``cpu_rate`` the agents may hold in all (None: no such bound here, as on a node
        #: of a shared deployment): a grant past it would leave the books over the container's CPU.
        self.cpu_capacity = cpu_capacity
        #: Grants and burns one at a time: a grant's room is checked and used in one step.
        self._rights = asyncio.Lock()
        #: The latest status, set by the supervisor each interval; encoded here, in the dashboard's thread,
        #: once per status whatever the number of readers, without the text table (the page lays out its own).
        self.status: Status | None = None
        self._encoded: tuple[tuple[Status, int] | None, bytes] = (None, b"{}")
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        routes = [
            Route("/", self._index),
            Route("/api/status", self._status),
            Route("/api/artifacts", self._artifacts),
            Route("/api/history/{id}", self._history),
            Route("/api/bill/{agent}", self._bill),
            Route("/api/events", self._events),
            Route("/api/control", self._controlled, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=STATIC)),
        ]
        if registry is not None:
            routes.append(Route("/metrics", self._metrics))
        self.app = Starlette(routes=routes)

    async def _metrics(self, request: Request) -> Response:
        assert self._registry is not None
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

    async def _index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def _status(self, request: Request) -> Response:
        try:
            n = int(request.query_params.get("agents", STATUS_AGENTS))
        except ValueError:
            return JSONResponse({"error": "agents must be a number of agents"}, status_code=400)
        current = self.status
        if current is not None and (current, n) != self._encoded[0]:
            short = msgspec.structs.replace(current, table="", agents=current.agents[:n])
            self._encoded = ((current, n), msgspec.json.encode(short))
        return Response(self._encoded[1], media_type="application/json", headers={"Cache-Control": "no-store"})

    async def _artifacts(self, request: Request) -> Response:
        found = self.store.indexed()
        infos = sorted((info for info, _ in found.values()), key=lambda i: i.id)
        return Response(msgspec.json.encode(infos), media_type="application/json")

    async def _history(self, request: Request) -> Response:
        try:
            found = self.store.history(request.path_params["id"])[:HISTORY_ROWS]
        except StoreError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return Response(msgspec.json.encode(found), media_type="application/json")

    async def _bill(self, request: Request) -> Response:
        agent = request.path_params["agent"]
        b = bill_mod.bill(agent, self.ledger.journal())
        return Response(msgspec.json.encode(b), media_type="application/json")

    async def _events(self, request: Request) -> Response:
        try:
            since = int(request.query_params.get("since", "-1"))
        except ValueError:
            return JSONResponse({"error": "since must be an event sequence number"}, status_code=400)
        if since < 0:  # from now on (a fresh page): the last few for context
            since = max(0, self.events.last_seq() - 20)
        return StreamingResponse(self._stream(request, since), media_type="text/event-stream")

    async def _stream(self, request: Request, since: int) -> AsyncIterator[bytes]:
        while not self._closing and not await request.is_disconnected():
            last = self.events.last_seq()
            chunk = []
            if self._token is not None and last - since > EVENTS_BATCH:  # live; a replay sends all, in turn
                chunk.append(f"event: skipped\ndata: {last - since - EVENTS_BATCH}\n\n".encode())
                since = last - EVENTS_BATCH
            for ev in self.events.read(since, limit=EVENTS_BATCH):
                since = ev.seq
                chunk += (b"data: ", msgspec.json.encode(ev), b"\n\n")
            if chunk:  # one write per period, not one per event: each costs the server a trip through HTTP
                yield b"".join(chunk)
            await asyncio.sleep(EVENTS_POLL_S)

    async def _controlled(self, request: Request) -> Response:
        if self._token is None:
            return JSONResponse({"error": "a replay of a stopped run is read-only"}, status_code=403)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given, self._token):
            return JSONResponse(
                {"error": "a control needs the operator's token (Authorization: Bearer ...; see dashboard.token)"},
                status_code=401,
            )
        try:
            control = _control.decode(await request.body())
        except msgspec.ValidationError as exc:
            return JSONResponse({"error": f"bad control: {exc}"}, status_code=400)
        except msgspec.DecodeError as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        if self._loop is None:
            return JSONResponse({"error": "no supervisor loop to carry out controls on"}, status_code=503)
        try:
            done = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.apply(control), self._loop))
        except (AecoError, LookupError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"ok": True, "done": done})

    async def apply(self, control: Control) -> str:
        """Carry out one control as journaled operations, on the supervisor's loop; what was done, in words."""
        match control:
            case Pause(agent=a) | Resume(agent=a):
                target = self._agent(a)
                if isinstance(control, Pause):
                    ev = await self.events.publish("agent_paused", a, by="operator")
                    target.pause()
                else:
                    ev = await self.events.publish("agent_resumed", a, by="operator")
                    target.resume()
                return f"{ev.kind} {a} (event {ev.seq})"
            case (
                Grant(agent=a, asset=asset, amount=n, reason=why)
                | BurnAsset(agent=a, asset=asset, amount=n, reason=why)
            ):
                op_id = f"operator:{secrets.token_hex(8)}"
                op = (Mint if isinstance(control, Grant) else Burn)(
                    id=op_id, account=a, asset=asset, amount=n, reason=why
                )
                async with self._rights:
                    if isinstance(op, Mint) and asset == "cpu_rate" and self.cpu_capacity is not None:
                        held = await asyncio.to_thread(cpu_rate_held, self.ledger)
                        if held + n > self.cpu_capacity:
                            raise ControlRefused(
                                f"agents hold {held} millicores of cpu_rate of the {self.cpu_capacity} the container "
                                f"offers: {n} more would not fit (burn some first)"
                            )
                    receipt = await self.ledger.submit_async(op)
                    if self.economy is not None and asset in RATE_RIGHTS and a in self.economy.buckets.agents():
                        await self.economy.rerate(a, asset, op_id)
                return f"{op.__struct_config__.tag} {n} {asset} for {a} (journal {receipt.seq})"
            case Inject(text=text, agent=a):
                ev = await self.events.publish("operator_note", a, text=text)
                return f"operator_note (event {ev.seq})"
            case Rollback(to=commit):
                new = await asyncio.to_thread(self.store.rollback, commit, "operator")
                ev = await self.events.publish("system_reset", None, commit=new, to=commit)
                return f"rolled back to {commit}: HEAD {new} (event {ev.seq})"
            case PostTaskControl(task=task):
                if self.mint is None:
                    raise LookupError("this supervisor has no task mint")
                posted = await self.mint.post(task)
                return f"posted task {task.id}: {task.reward} scrip, at most {task.max_awards} award(s) ({posted.id})"
        raise AssertionError(control)

    def _agent(self, agent: str) -> Pausable:
        for a in self.agents():
            if getattr(a, "id", None) == agent and hasattr(a, "pause"):
                return a  # type: ignore[return-value]
        raise LookupError(f"no agent {agent!r} here that can be paused")

    async def serve(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until ``close`` (on the calling loop: the replay's, which has no controls)."""
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        await self._server.serve(sockets=[sock])

    def start(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``sock`` from the "dashboard" thread; controls are carried out on ``loop``."""
        self._loop = loop
        self._thread = threading.Thread(target=asyncio.run, args=(self.serve(sock),), name="dashboard", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (event streams end within ``EVENTS_POLL_S``) and wait for the thread, if any."""
        self._closing = True
        if hasattr(self, "_server"):
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def new_token(run_dir: Path, url: str) -> str:
    """A fresh operator token, written (0600) to ``run_dir/dashboard.token``; ``url`` to ``dashboard.url``."""
    token = secrets.token_urlsafe(24)
    path = run_dir / TOKEN_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    (run_dir / URL_NAME).write_text(url + "\n")
    return token


def send(run_dir: Path, control: Control) -> str:
    """Send ``control`` to the running supervisor whose run directory is ``run_dir``, with its token;
    what it did. ``ControlRefused`` with the supervisor's reason otherwise."""
    try:
        token = (run_dir / TOKEN_NAME).read_text().strip()
        url = (run_dir / URL_NAME).read_text().strip()
    except OSError as exc:
        raise NotRunning(f"no running dashboard in {run_dir} ({exc.strerror}): is the supervisor running?") from exc
    req = urllib.request.Request(
        f"{url}/api/control",
        data=msgspec.json.encode(control),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(json.loads(resp.read())["done"])
    except urllib.error.HTTPError as exc:
        raise ControlRefused(f"refused ({exc.code}): {json.loads(exc.read()).get('error', '')}") from exc
    except OSError as exc:
        raise NotRunning(f"the supervisor at {url} does not answer: {exc}") from exc


class ControlRefused(AecoError):
    """An operator control that could not be carried out; the message says why."""

    default_code: ErrorCode = "invalid"


class NotRunning(ControlRefused):
    """No supervisor answers for this data directory (none runs, or it left its token behind)."""

    default_code: ErrorCode = "unavailable"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (``OSError`` when the port is taken: the caller says so and runs on)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def replay(data: Path, host: str, port: int, say: Callable[[str], None] = print) -> None:
    """Serve a stopped run's data directory read-only: its last status, its event log, its ledger's
    bills and its store's artifacts, until cancelled."""
    status = msgspec.json.decode((data / "run" / STATUS_NAME).read_bytes(), type=Status)
    ledger = open_ledger(data, None, create=False)
    store = open_store(data, None, create=False)
    events = EventLog(str(data / "events"), readonly=True)
    try:
        dash = Dashboard(None, None, ledger, events, store, list)
        dash.status = status
        sock = bind(host, port)
        say(f"replaying {data}: http://{host}:{sock.getsockname()[1]}/ (read-only)")
        await dash.serve(sock)
    finally:
        events.close()
        store.close()
        ledger.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.ops.dashboard --data-dir DIR [--host H] [--port P]``: replay a stopped run."""
    ap = Parser(prog="python -m runtime.ops.dashboard", description=main.__doc__)
    ap.add_argument("--data-dir", required=True, help="the stopped run's data directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9465, help="0: any free port")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    if not (data / "run" / STATUS_NAME).exists():
        report(f"no {STATUS_NAME} under {data / 'run'}: not a run's data directory")
        return 2
    try:
        asyncio.run(replay(data, args.host, args.port, lambda line: print(line, flush=True)))
    except (NoLedger, StoreError, OSError) as exc:
        report(str(exc))
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Control", "ControlRefused", "Dashboard", "bind", "new_token", "replay", "send"]

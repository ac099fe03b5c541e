"""The run's dollar cap (``budget.max_usd``) through the real path: LLM agents on a paid model served by a
local OpenAI-compatible stand-in (a real HTTP server in this process), workers calling it, the ledger
charging what it reports — never more than the cap in all, under concurrent thinks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec

from runtime.actions import Noop
from runtime.agents.loop import Agent
from runtime.config import AgentConfig, BudgetConfig, Config, EconomyConfig, LlmConfig, ModelPrice, PoolConfig
from runtime.economy.dollars import worst_case_microusd
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.node import Node
from runtime.protocol import Think
from runtime.world.events.log import EventLog

#: A cent per 1,000 tokens, both ways: a think of a few hundred tokens costs a few tenths of a cent, so
#: the cap holds a few dozen; its worst case reserved (every prompt byte a token: about a cent) is a tenth
#: of the cap, so the thinking pauses past 80% of it whatever the prompt's exact length.
PRICE = ModelPrice(prompt_per_1k=0.01, completion_per_1k=0.01)
MAX_USD = 0.1


class _Completions(BaseHTTPRequestHandler):
    """``POST /v1/chat/completions``: a valid action, with honest token counts (4 prompt bytes a token)."""

    calls = 0
    #: The longest prompt served, in bytes (system and user messages).
    largest = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body: dict[str, Any] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = sum(len(m["content"].encode()) for m in body["messages"])
        text = json.dumps({"kind": "noop"})
        with self.lock:
            type(self).calls += 1
            type(self).largest = max(type(self).largest, prompt)
        answer = {
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt // 4 + 10, "completion_tokens": min(40, body["max_tokens"])},
        }
        raw = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def stand_in(handler: type[BaseHTTPRequestHandler] = _Completions) -> Iterator[str]:
    """An OpenAI-compatible server on localhost (answering with ``handler``); its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_dollar_cap_is_never_exceeded_and_only_paid_thinking_pauses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    thinkers = [f"p{i}" for i in range(6)]
    agents = [
        msgspec.convert({"id": a, "brain": "llm", "cpu_rate": 100, "llm_rate": 5000, "llm_budget_usd": 10}, AgentConfig)
        for a in thinkers
    ]
    agents.append(AgentConfig(id="worker", brain="scripted", policy=[Noop()], cpu_rate=100))
    with stand_in() as base:
        cfg = Config(
            data_dir=str(data),
            pool=PoolConfig(workers=2),
            economy=EconomyConfig(burst_seconds=30),
            llm=LlmConfig(model="stand-in", endpoint=base, max_tokens=64, prices={"stand-in": PRICE}),
            budget=BudgetConfig(max_usd=MAX_USD),
            agents=agents,
        )

        async def main() -> tuple[int, int]:
            async with Node(cfg) as node:
                assert node.economy.dollars is not None
                node.start_agents()
                paused = await node.events.wait("worker", kinds={"budget_paused"}, since=0, timeout=120)
                assert paused, "the cap was never reached"
                worker = next(a for a in node.agents if a.id == "worker")
                assert isinstance(worker, Agent)
                before = worker.actions
                # Everything but paid thinking goes on: the scripted agent keeps acting.
                for _ in range(200):
                    if worker.actions >= before + 5:
                        break
                    await asyncio.sleep(0.05)
                assert worker.actions >= before + 5
                return node.economy.dollars.spent, node.economy.dollars.limit

        spent, limit = asyncio.run(main())
    assert _Completions.calls > 10  # many paid thinks ran, concurrently from six agents
    with LmdbLedger(data / "ledger") as ledger:
        report = check(ledger)
        assert report.ok, report.problems
        paid = sum(r.llm_cost_microusd for r in ledger.usage_records())
    assert paid == spent <= limit == round(MAX_USD * 1e6)
    # The cap, not something else, stopped the thinking: the room left cannot hold one more think's worst
    # case, which is reserved before each paid call (the prompt's length sets it, so no fixed share would do).
    longest = Think(
        system="",
        prompt="x" * _Completions.largest,
        max_tokens=64,
        price_prompt_per_1k=PRICE.prompt_per_1k,
        price_completion_per_1k=PRICE.completion_per_1k,
    )
    assert limit - paid < worst_case_microusd(longest), (limit, paid, worst_case_microusd(longest))
    with EventLog(data / "events", readonly=True) as events:
        alerts = [e.fields["percent"] for e in events.read(kinds={"budget_alert"})]
        assert alerts == [50, 80, 95] or alerts == [50, 80]  # 95% is reached only if a last think fitted
        assert len(events.read(kinds={"budget_paused"})) == 1

"""Earned scrip: the task mint.

    operator: config ``tasks``, or ``python -m runtime.admin task post`` ──► ledger ``PostTask`` (terms,
              description and hidden tests; who was paid)
    agent: submit(task, its code artifact) ──► hidden tests run confined, charged to the agent
        ──► pass: ledger ``AwardTask`` mints the reward (journalled with the task, the artifact and
            the Git blob id of the version tested) — at most ``max_awards`` agents, each once
        ──► fail: nothing is minted; the agent is told it failed

The tests run in one confined interpreter after the submission's code, in its namespace: they call
what it defines and fail it by raising. The run passes only when it ends by setting a result the
submission cannot know in advance (a fresh random token, set after the tests). Submission and tests
share that interpreter, so a submission written to subvert the tests could; the journalled blob id
lets the operator read what was paid for (``python -m runtime.admin``).

The ledger is where the tasks are: the mint loads them at start (the configuration's are posted first),
takes a task the operator posts to the running supervisor at once (``post``), and looks in the ledger
again for a task it does not know when one is submitted (posted into the ledger by another process).

Once-only is the ledger's rule, not this module's: concurrent passing submissions each ask for the
award, and the ledger grants the first ``max_awards`` agents and refuses the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from runtime import protocol as p
from runtime.config import TaskConfig
from runtime.economy.ledger import AwardTask, Ledger, LedgerError, PostTask
from runtime.errors import AecoError, ErrorCode
from runtime.pool import TaskFailed
from runtime.world.store import check_id

if TYPE_CHECKING:
    from runtime.world.world import World

#: The limits of one test run: a task's tests are a few assertions over small inputs.
TEST_CPU_S = 5.0
TEST_WALL_S = 10.0
TEST_MEMORY_BYTES = 256 << 20

_RUNNER = """
_source = world.args["source"]
_ns = {"__name__": "submission", "world": world}
exec(compile(_source, "<submission>", "exec"), _ns)
exec(compile(%(tests)r, "<tests>", "exec"), _ns)
world.result(%(token)r)
"""


class TaskError(AecoError):
    """A submission that earned nothing: ``not_found`` (no such task), ``forbidden`` (not the agent's
    code), ``code_error`` (it failed the tests), ``conflict`` (the task paid out already)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)


class Award(msgspec.Struct, frozen=True):
    """A paid submission."""

    task: str
    reward: int
    blob: str


def blob_id(content: bytes) -> str:
    """The Git object id of ``content`` as a blob: names the exact version tested, in either store."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content, usedforsecurity=False).hexdigest()


def post_op(task: TaskConfig) -> PostTask:
    """The ledger op that posts ``task``: its id carries the terms and a digest of the description and
    tests, so posting the same task again (a restart with the same configuration) changes nothing."""
    digest = hashlib.sha256(f"{task.description}\x00{task.tests}".encode()).hexdigest()[:12]
    return PostTask(
        id=f"task:{task.id}:{task.reward}x{task.max_awards}:{digest}",
        task=task.id,
        reward=task.reward,
        max_awards=task.max_awards,
        description=task.description,
        tests=task.tests,
    )


def post_tasks(ledger: Ledger, tasks: list[TaskConfig]) -> None:
    """Post (or re-state) ``tasks`` (the configured ones at start, or the operator's into a stopped ledger)."""
    for t in tasks:
        ledger.apply(post_op(t))


def posted_tasks(ledger: Ledger, configured: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
    """Every task the ledger holds, with its description and tests (from ``configured`` for a post
    written before posts carried them), by task id."""
    found: dict[str, TaskConfig] = {}
    for state in ledger.tasks():
        post = state.post
        if post.tests and post.description:
            found[post.task] = TaskConfig(
                id=post.task,
                description=post.description,
                reward=post.reward,
                tests=post.tests,
                max_awards=post.max_awards,
            )
        elif post.task in configured:
            found[post.task] = configured[post.task]
    return found


class TaskMint:
    """The tasks of one world and their hidden tests (see the module docstring)."""

    def __init__(
        self,
        world: World,
        configured: list[TaskConfig],
        supply_cap: int | None,
        emit: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.world = world
        self.configured = {t.id: t for t in configured}
        self.tasks = posted_tasks(world.economy.ledger, self.configured)
        self.supply_cap = supply_cap
        self.emit = emit

    def open_tasks(self) -> list[TaskConfig]:
        """The tasks that still pay, as the ledger says."""
        if not self.tasks:  # in every agent's context: no ledger read for a runtime without tasks
            return []
        paid = {s.post.task: len(s.awarded) for s in self.world.economy.ledger.tasks()}
        return [t for t in self.tasks.values() if paid.get(t.id, 0) < t.max_awards]

    async def post(self, task: TaskConfig) -> PostTask:
        """Post (or re-state) ``task`` while the runtime runs: journaled, then open to every agent at once
        (a ``task_posted`` event to everyone, without the tests)."""
        op = post_op(task)
        receipt = await self.world.economy.ledger.submit_async(op)
        self.tasks[task.id] = task
        if receipt.fresh:
            fields = {"task": task.id, "reward": task.reward, "max_awards": task.max_awards}
            self.emit("task_posted", {**fields, "description": task.description})
        return op

    async def submit(self, agent: str, task_id: str, artifact_id: str) -> Award:
        """Test ``agent``'s code artifact against task ``task_id``; mint the reward when it passes."""
        task = self.tasks.get(task_id)
        if task is None:  # posted into the ledger by another process (the operator, another node)?
            self.tasks = await asyncio.to_thread(posted_tasks, self.world.economy.ledger, self.configured)
            task = self.tasks.get(task_id)
        if task is None:
            raise TaskError("not_found", f"no task `{task_id}`; tasks are {', '.join(self.tasks) or 'none'}")
        art = await self.world.store.read_async(agent, check_id(artifact_id))
        if art.owner != agent or art.kind != "code":
            raise TaskError(
                "forbidden", f"submit a code artifact of your own, not `{art.id}` ({art.kind}, {art.owner}'s)"
            )
        token = secrets.token_hex(16)
        spec = p.Invoke(
            code=_RUNNER % {"tests": task.tests, "token": token},
            args=json.dumps({"source": art.content.decode("utf-8", "replace")}).encode(),
            cpu_seconds=TEST_CPU_S,
            wall_seconds=TEST_WALL_S,
            memory_bytes=TEST_MEMORY_BYTES,
        )

        async def serve(call: p.WorldCall) -> p.WorldAnswer:
            return p.RefusedAnswer(error="code under test reaches nothing")

        try:
            out = await self.world.economy.run(agent, spec, serve=serve)
        except TaskFailed as exc:
            raise TaskError("code_error", f"`{art.id}` did not finish task `{task_id}`'s tests: {exc.code}") from None
        report = p.decode_invoke(out.output)
        if not (report.ok and report.value and msgspec.json.decode(report.value) == token):
            why = report.error.strip().splitlines()[-1:] if report.error else ["it did not run to the end"]
            raise TaskError("code_error", f"`{art.id}` failed task `{task_id}`'s tests: {why[0][:200]}")
        blob = blob_id(art.content)
        op = AwardTask(
            id=f"award:{task_id}:{agent}",
            task=task_id,
            agent=agent,
            artifact=art.id,
            blob=blob,
            supply_cap=self.supply_cap,
        )
        try:
            receipt = await self.world.economy.ledger.submit_async(op)
        except LedgerError as exc:
            raise TaskError(
                "conflict", f"`{art.id}` passed, but task `{task_id}` pays no more: {exc.message}"
            ) from None
        if receipt.fresh:
            self.emit("task_solved", {"agent": agent, "task": task_id, "reward": task.reward, "artifact": art.id})
        return Award(task_id, task.reward, blob)

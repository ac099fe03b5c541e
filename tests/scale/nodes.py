"""Agent nodes as real processes: ``python -m runtime.supervisor`` with a node's environment.

Used by the scale-out tests and by ``benchmarks.scale``. Each node gets its own data directory, its
``AGENT_RANGE``, and the shared PostgreSQL database and Redis namespace; its stdout and stderr go to
files in its data directory's parent so that a failure can be shown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.harness import ROOT

_RUN_LINE = re.compile(r"^node (\S+), run (\S+): ", re.MULTILINE)


class NodeFailed(AssertionError):
    """A node did not start or stop as expected; the message carries the end of its output."""


class Node:
    """One supervisor process running the agents of ``agent_range``."""

    def __init__(self, name: str, agent_range: str, config: Path, where: Path, env: dict[str, str]) -> None:
        self.name = name
        self.agent_range = agent_range
        self.config = config
        self.data = where / name
        self.where = where
        self.env = {
            **os.environ,
            **env,
            "AGENT_RANGE": agent_range,
            "AECO_DATA_DIR": str(self.data),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",  # the output files show progress as it happens
        }
        self.proc: subprocess.Popen[bytes] | None = None
        #: The run id of each start, in order (task ids are ``<run>-<n>``).
        self.runs: list[str] = []
        self._starts = 0

    @property
    def agents(self) -> range:
        """The 1-based positions of this node's agents."""
        first, last = (int(x) for x in self.agent_range.split("-"))
        return range(first, last + 1)

    def _out(self) -> Path:
        return self.where / f"{self.name}-{self._starts}.out"

    def _err(self) -> Path:
        return self.where / f"{self.name}-{self._starts}.err"

    def start(self, extra: Sequence[str] = (), preexec: Callable[[], None] | None = None) -> None:
        """Start the supervisor (without waiting for it to be up: see ``wait_up``); ``preexec`` runs in
        the child before it executes (to enter a cgroup, say)."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self._starts += 1
        with self._out().open("wb") as out, self._err().open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.supervisor", "--config", str(self.config), "--no-live", *extra],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=err,
                preexec_fn=preexec,
            )

    def output(self) -> str:
        """What the current run printed (stdout then stderr)."""
        return self._out().read_text(errors="replace") + self._err().read_text(errors="replace")

    def wait_up(self, timeout_s: float = 120.0) -> str:
        """Wait for the start-up line of the current run; return its run id."""
        assert self.proc is not None
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            found = _RUN_LINE.findall(self._out().read_text(errors="replace"))
            if found:
                run: str = found[-1][1]
                self.runs.append(run)
                return run
            if self.proc.poll() is not None:
                raise NodeFailed(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise NodeFailed(f"{self.name} did not come up within {timeout_s:g} s:\n{self.output()[-3000:]}")

    def alive(self) -> bool:
        """Whether the current run is still running."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 the supervisor (its workers die with it)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 90.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise NodeFailed(f"{self.name} did not stop within {timeout_s:g} s:\n{self.output()[-3000:]}") from None


def agent_position(agent: str) -> int:
    """``a007`` -> 7 (the population's ids are the template id and the 1-based position)."""
    return int(agent.lstrip("abcdefghijklmnopqrstuvwxyz_-"))


def node_of(nodes: Sequence[Node], agent: str) -> Node:
    """The node that runs ``agent``."""
    pos = agent_position(agent)
    return next(n for n in nodes if pos in n.agents)

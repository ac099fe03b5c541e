"""``docker-compose.yml`` brought up by ``podman-compose`` with ``deploy/compose/offline.yml``.

One ``Deployment`` is one compose project under a name of its own (so that runs of other working trees
on the same engine cannot collide with it): it brings the files up, finds its containers by the labels
podman-compose gives them, runs commands and health checks in them, and takes everything down again
— containers, pod, network and volumes — whatever state a failed test left it in.

Podman runs health checks from systemd timers, which these hosts lack; ``healthy`` runs the service's
own health check on demand instead (``podman healthcheck run``), as the timer would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.engine import ROOT, Build, Engine

FILES = (ROOT / "docker-compose.yml", ROOT / "deploy" / "compose" / "offline.yml")
#: The images offline.yml stands in for the official ones: name -> build context.
INFRA = {"aeco-postgres": ROOT / "deploy" / "compose" / "postgres", "aeco-redis": ROOT / "deploy" / "compose" / "redis"}
PODMAN_COMPOSE = Path(sys.executable).with_name("podman-compose")
_PROJECT = "io.podman.compose.project"
_SERVICE = "com.docker.compose.service"


def infra_images(engine: Engine) -> dict[str, Build]:
    """The PostgreSQL and Redis images of offline.yml, built once per content of their directories."""
    return {
        name: engine.ensure_image(name, root, tuple(sorted(p.name for p in root.iterdir())))
        for name, root in INFRA.items()
    }


def stamp(text: str) -> float:
    """A time.time() from the engine's RFC 3339 timestamps (``.State.StartedAt`` and friends)."""
    return datetime.fromisoformat(text.strip()).timestamp()


@dataclass
class Deployment:
    """One compose project: ``project`` names it, ``env`` holds the variables the files interpolate."""

    engine: Engine
    project: str
    env: dict[str, str]

    def compose(self, *args: str, timeout_s: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``podman-compose -p PROJECT -f docker-compose.yml -f offline.yml ARGS…`` from the repository root."""
        files = [a for f in FILES for a in ("-f", str(f))]
        cmd = [str(PODMAN_COMPOSE), "-p", self.project, *files, *args]
        out = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check and out.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return out

    def containers(self, service: str) -> list[str]:
        """The names of the service's containers (running or not)."""
        out = self.engine.run(
            "ps", "--all", "--format", "{{.Names}}",
            "--filter", f"label={_PROJECT}={self.project}", "--filter", f"label={_SERVICE}={service}",
        )  # fmt: skip
        return out.stdout.split()

    def container(self, service: str) -> str:
        """The service's one container."""
        names = self.containers(service)
        assert len(names) == 1, f"{service}: expected one container, found {names}"
        return names[0]

    def state(self, service: str) -> dict[str, Any]:
        """``.State`` of the service's container, with ``RestartCount`` added."""
        name = self.container(service)
        state: dict[str, Any] = json.loads(self.engine.inspect(name, "{{json .State}}"))
        state["RestartCount"] = int(self.engine.inspect(name, "{{.RestartCount}}"))
        return state

    def logs(self, service: str) -> str:
        """Everything the service's container printed, across its restarts."""
        out = self.engine.run("logs", self.container(service), check=False)
        return out.stdout + out.stderr

    def exec(self, service: str, *cmd: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a command in the service's running container (as its user, with its environment)."""
        return self.engine.run("exec", self.container(service), *cmd, timeout_s=timeout_s, check=False)

    def healthy(self, service: str, timeout_s: float, interval_s: float = 2.0) -> float:
        """Run the service's health check until it passes; return the seconds it took."""
        start = time.monotonic()
        last = ""
        while time.monotonic() - start < timeout_s:
            out = self.engine.run("healthcheck", "run", self.container(service), check=False, timeout_s=60.0)
            if out.returncode == 0:
                return time.monotonic() - start
            last = (out.stdout + out.stderr).strip()
            time.sleep(interval_s)
        raise AssertionError(f"{service} not healthy within {timeout_s:g} s ({last}):\n{self.logs(service)[-3000:]}")

    def network(self) -> str:
        """The project's network (the one every service joins)."""
        out = self.engine.run("network", "ls", "--format", "{{.Name}}", "--filter", f"label={_PROJECT}={self.project}")
        (name,) = out.stdout.split()
        return name

    def down(self) -> None:
        """Remove everything of the project, volumes included; never raises (runs after failures too)."""
        self.compose("down", "--volumes", "--timeout", "10", timeout_s=300.0, check=False)
        # Whatever podman-compose left (it stops at the first error): by label, in dependency order.
        label = f"label={_PROJECT}={self.project}"
        left = self.engine.run("ps", "--all", "--format", "{{.Names}}", "--filter", label, check=False)
        for name in left.stdout.split():
            self.engine.remove(name)
        # The pod carries no project label: podman-compose names it pod_<project>.
        self.engine.run("pod", "rm", "--force", "--ignore", f"pod_{self.project}", check=False, timeout_s=120.0)
        for kind in ("volume", "network"):
            listing = self.engine.run(kind, "ls", "--format", "{{.Name}}", "--filter", label, check=False)
            for name in listing.stdout.split():
                self.engine.run(kind, "rm", "--force", name, check=False, timeout_s=120.0)


def until(what: str, ready: Callable[[], bool], timeout_s: float, interval_s: float = 2.0) -> float:
    """Wait until ``ready()``; return the seconds it took, or fail saying what did not happen."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)
    return time.monotonic() - start

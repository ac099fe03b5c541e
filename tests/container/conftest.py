"""Fixtures for tests that build the image and run it under a real container engine.

The engine is made available by ``../shared/container/prepare-engine.sh`` (Podman on this project's
hosts; it installs itself on first use), never skipped: these tests are part of ``make test``. The
image is built once per session, and not at all when an image labelled with the same build-input
hash already exists (see ``benchmarks.engine``).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.engine import IMAGE, Engine, image_uid, limit_args, prepare_engine, volume_dir

_names = itertools.count()


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The container engine (installed if needed), as ``docker`` or ``podman``."""
    return Engine(prepare_engine())


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    """The image for the working tree: reused if up to date, else built (minutes when llama.cpp compiles)."""
    build = engine.ensure_image(IMAGE)
    how = f"built in {build.seconds:.0f} s" if build.built else "up to date, reused"
    print(f"image {build.image}: {how}")
    return build.image


@pytest.fixture(scope="session")
def uid(engine: Engine, image: str) -> int:
    """The uid the image runs as."""
    return image_uid(engine, image)


class Box:
    """One test's containers, sharing a data directory (``/data``) and a config directory (``/config``)."""

    def __init__(self, engine: Engine, image: str, uid: int, tmp: Path) -> None:
        self.engine, self.image = engine, image
        self.data = volume_dir(tmp / "data", uid)
        self.config = tmp / "config"
        self.config.mkdir()
        self.containers: list[str] = []

    def write_config(self, name: str, text: str) -> str:
        """Write a configuration file; return its path inside the container."""
        (self.config / name).write_text(text)
        return f"/config/{name}"

    def _mounts(self) -> list[str]:
        return ["--volume", f"{self.data}:/data", "--volume", f"{self.config}:/config:ro"]

    def start(self, *cmd: str, cpus: float | None = 2, memory: str | None = "4g", restart: str | None = None) -> str:
        """Start a detached container on the shared directories; return its name."""
        name = f"aeco-test-{os.getpid()}-{next(_names)}"
        opts = ["--detach", "--name", name, *limit_args(cpus, memory), *self._mounts()]
        if restart is not None:
            opts.append(f"--restart={restart}")
        self.containers.append(name)
        self.engine.run("run", *opts, self.image, *cmd)
        return name

    def wait(self, name: str, timeout_s: float = 300.0) -> int:
        """Wait for a container to stop; return its exit status."""
        return int(self.engine.run("wait", name, timeout_s=timeout_s).stdout.strip().splitlines()[-1])

    def logs(self, name: str) -> str:
        """Everything the container printed (for assertion messages)."""
        out = self.engine.run("logs", name, check=False)
        return out.stdout + out.stderr

    def inside(self, *cmd: str, timeout_s: float = 120.0) -> Any:
        """Run a one-off command in a fresh container on the same directories (no limits)."""
        return self.engine.run("run", "--rm", *self._mounts(), self.image, *cmd, timeout_s=timeout_s, check=False)

    def admin(self, *args: str) -> Any:
        """``python -m runtime.admin`` on the data directory, inside the image."""
        return self.inside("python", "-m", "runtime.admin", "--data-dir", "/data", *args)

    def journal(self) -> list[dict[str, Any]]:
        """Every ledger journal entry (``seq``, ``at``, ``op``), oldest first."""
        out = self.admin("journal")
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    def events(self, *kinds: str) -> list[dict[str, Any]]:
        """The durable event log (optionally only some kinds)."""
        args = [a for k in kinds for a in ("--kind", k)]
        out = self.inside("python", "-m", "runtime.events", "dump", "/data/events", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    def status(self) -> dict[str, Any] | None:
        """``/data/run/status.json`` as the supervisor last wrote it, None if there is none yet."""
        try:
            return dict(json.loads((self.data / "run" / "status.json").read_bytes()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def summary(self) -> dict[str, Any]:
        """``/data/usage-summary.json`` (written when the supervisor stops cleanly)."""
        return dict(json.loads((self.data / "usage-summary.json").read_bytes()))

    def wait_running(self, name: str, since: float, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until a running supervisor has refreshed its status after ``since`` (a time.time())."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            st = self.status()
            if st is not None and st["running"] and st["at"] > since:
                return st
            time.sleep(0.5)
        raise AssertionError(f"no running status within {timeout_s} s:\n{self.logs(name)}")

    def health(self, name: str) -> int:
        """Run the image's HEALTHCHECK now; 0 when healthy. (Podman runs health checks from systemd
        timers, which this host lacks, so it is asked to run one; Docker runs them itself.)"""
        if self.engine.cmd == "podman":
            return self.engine.run("healthcheck", "run", name, check=False, timeout_s=60.0).returncode
        end = time.monotonic() + 120.0
        while time.monotonic() < end:
            state = self.engine.inspect(name, "{{.State.Health.Status}}")
            if state != "starting":
                return 0 if state == "healthy" else 1
            time.sleep(1.0)
        raise AssertionError(f"{name}: still no health status after 120 s")

    def supervisor_pid(self, name: str) -> int:
        """The host pid of the supervisor: the child of the container's init (tini)."""
        init = int(self.engine.inspect(name, "{{.State.Pid}}"))
        children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        assert len(children) == 1, f"expected the supervisor alone under tini, got {children}"
        return int(children[0])

    def remove_all(self) -> None:
        """Remove every container this test started."""
        for name in self.containers:
            self.engine.remove(name)


@pytest.fixture
def box(engine: Engine, image: str, uid: int, tmp_path: Path) -> Iterator[Box]:
    """A data directory owned by the image's user, and the containers run on it (removed afterwards)."""
    b = Box(engine, image, uid, tmp_path)
    try:
        yield b
    finally:
        b.remove_all()

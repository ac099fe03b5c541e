"""Driving a container engine (Docker or Podman) for the image ``agent-ecology-local``.

Shared by ``tests/container`` and ``python -m benchmarks container``: make an engine available
(``../shared/container/prepare-engine.sh`` on this project's hosts, else a ``docker`` that answers),
build the image once per set of build inputs, run containers with limits and a data directory, and
read what they left there.

The image is labelled with a hash of its build inputs (the files the Dockerfile copies): an image
whose label matches the working tree is reused as it is, so a test session or a benchmark run builds
only when something the image contains has changed. Each build is also tagged ``NAME:<hash prefix>``,
and that pinned tag is what a run should use: several working trees on one host share the engine's
image store, and another tree's build moves ``NAME`` (``:latest``) but never this tree's pinned tag.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "agent-ecology-local"
#: What the image is built from (the Dockerfile's COPY sources and the Dockerfile itself).
BUILD_INPUTS = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "requirements.lock",
    "runtime",
    "workers",
    "native",
    "config",
)
INPUTS_LABEL = "org.agent-ecology.inputs"
#: Where prepare-engine.sh lies on this project's hosts: beside the clone.
PREPARE_ENGINE = ROOT.parent / "shared" / "container" / "prepare-engine.sh"


class EngineError(RuntimeError):
    """A container engine command failed; the message holds the command and the tail of its output."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def prepare_engine(script: Path = PREPARE_ENGINE, timeout_s: float = 900.0) -> str:
    """Make an engine usable and return its command (``docker`` or ``podman``).

    With the project's ``prepare-engine.sh`` beside the clone it is run (it installs Podman and the
    base image when needed, and prints the engine on its last line); without it, a ``docker`` or
    ``podman`` already on PATH is used."""
    if script.exists():
        out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise EngineError(f"{script} failed (exit {out.returncode}):\n{_tail(out.stderr + out.stdout)}")
        lines = out.stdout.strip().splitlines()
        if not lines or lines[-1] not in ("docker", "podman"):
            raise EngineError(f"{script} did not name an engine on its last line: {out.stdout!r}")
        return lines[-1]
    for cmd in ("docker", "podman"):
        if shutil.which(cmd):
            return cmd
    raise EngineError(f"no container engine: neither {script} nor docker/podman on PATH")


def inputs_hash(root: Path = ROOT, inputs: Sequence[str] = BUILD_INPUTS) -> str:
    """A SHA-256 over the names and contents of every build input (caches and bytecode excluded)."""
    h = hashlib.sha256()
    for name in inputs:
        top = root / name
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for f in files:
            rel = f.relative_to(root)
            if "__pycache__" in rel.parts or f.suffix == ".pyc":
                continue
            h.update(str(rel).encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def pinned_tag(image: str, digest: str) -> str:
    """``image`` tagged with the first 12 hex digits of its inputs' hash (``agent-ecology-local:3f2a…``)."""
    return f"{image}:{digest[:12]}"


@dataclass(frozen=True, slots=True)
class Build:
    """How the image came to be: built now (and how long it took) or reused."""

    #: The pinned tag (``pinned_tag``) of the image for these inputs.
    image: str
    inputs: str
    built: bool
    seconds: float


@dataclass(frozen=True, slots=True)
class Engine:
    """One container engine command (``docker`` or ``podman``)."""

    cmd: str

    def run(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``<engine> args…``; raise ``EngineError`` (with the output's tail) if it fails and ``check``."""
        try:
            out = subprocess.run([self.cmd, *args], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"{self.cmd} {' '.join(args)}: no answer within {timeout_s:g} s") from exc
        if check and out.returncode != 0:
            raise EngineError(
                f"{self.cmd} {' '.join(args)} failed (exit {out.returncode}):\n{_tail(out.stderr + out.stdout)}"
            )
        return out

    def label(self, image: str, key: str) -> str | None:
        """A label of a local image, None if the image or the label is missing."""
        out = self.run("image", "inspect", "--format", f'{{{{index .Config.Labels "{key}"}}}}', image, check=False)
        value = out.stdout.strip()
        return value if out.returncode == 0 and value and value != "<no value>" else None

    def build(
        self,
        image: str = IMAGE,
        root: Path = ROOT,
        *,
        inputs: Sequence[str] = BUILD_INPUTS,
        no_cache: bool = False,
        timeout_s: float = 3600.0,
    ) -> Build:
        """Build ``image`` from ``root``'s Dockerfile, labelled with the hash of its ``inputs`` (paths
        under ``root``) and tagged both ``image`` and its pinned tag."""
        digest = inputs_hash(root, inputs)
        pinned = pinned_tag(image, digest)
        args = ["build", "--tag", image, "--tag", pinned, "--label", f"{INPUTS_LABEL}={digest}"]
        if self.cmd == "podman":
            args.append("--format=docker")  # an OCI image cannot carry the HEALTHCHECK
        if no_cache:
            args.append("--no-cache")
        start = time.monotonic()
        self.run(*args, str(root), timeout_s=timeout_s)
        return Build(pinned, digest, True, time.monotonic() - start)

    def ensure_image(self, image: str = IMAGE, root: Path = ROOT, inputs: Sequence[str] = BUILD_INPUTS) -> Build:
        """The image for ``root`` as it is: reused if its pinned tag carries the inputs' hash, else built.
        Either way ``image`` itself is left pointing at it too."""
        digest = inputs_hash(root, inputs)
        pinned = pinned_tag(image, digest)
        if self.label(pinned, INPUTS_LABEL) == digest:
            self.run("tag", pinned, image)
            return Build(pinned, digest, False, 0.0)
        return self.build(image, root, inputs=inputs)

    def image_size(self, image: str = IMAGE) -> int:
        """The image's size in bytes, as the engine reports it."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def inspect(self, container: str, template: str) -> str:
        """``<engine> inspect --format TEMPLATE container``, stripped."""
        return self.run("inspect", "--format", template, container).stdout.strip()

    def remove(self, container: str) -> None:
        """Remove a container, running or not (no error if it is already gone)."""
        self.run("rm", "--force", "--time", "2", container, check=False, timeout_s=60.0)


def limit_args(cpus: float | None, memory: str | None) -> list[str]:
    """The ``--cpus``/``--memory`` options, and no pids limit (Podman's default of 2048 is too few
    for a pool whose sandboxes start processes of their own)."""
    args = ["--pids-limit=-1"]
    if cpus is not None:
        args.append(f"--cpus={cpus:g}")
    if memory is not None:
        args.append(f"--memory={memory}")
    return args


def volume_dir(path: Path, image_uid: int) -> Path:
    """Make ``path`` a data directory the image's non-root user owns (as a bind-mounted ``/data``)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, image_uid, image_uid)
    path.chmod(0o700)
    return path


def image_uid(engine: Engine, image: str = IMAGE) -> int:
    """The uid the image runs as (its ``USER``), asked of the image itself."""
    return int(engine.run("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip())


def supervisor_command(config: str, duration_s: float | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The command that runs the supervisor on ``config`` (a path inside the container)."""
    cmd = ["python", "-m", "runtime.supervisor", "--config", config, "--no-live", *extra]
    if duration_s is not None:
        cmd += ["--duration", f"{duration_s:g}"]
    return cmd

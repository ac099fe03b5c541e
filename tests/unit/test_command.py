"""``runtime.errors.command``, the one way every ``python -m`` entry point runs, on a module made here."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from runtime.errors import command

MODULE = """
from runtime.errors import AecoError, Parser

def main(argv):
    ap = Parser(prog="python -m failing")
    ap.add_argument("what")
    args = ap.parse_args(argv)
    what = args.what
    if what == "bad":
        raise AecoError("thing 'x': out of range (give 1 to 9)", code="invalid")
    if what == "broken":
        raise AecoError("the store: closed (start it)", code="closed")
    if what == "unexpected":
        {}["missing"]
    if what == "ctrl-c":
        raise KeyboardInterrupt
    return 0 if not args.debug else 3
"""
#: What an unexpected failure's line ends with when there is no --debug.
HINT = " (an unexpected failure: run again with --debug for the traceback)"


@pytest.fixture
def failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "failing_cmd.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "failing_cmd", raising=False)
    return "failing_cmd"


@pytest.mark.parametrize(
    ("what", "code", "line"),
    [
        ("bad", 2, "error: invalid: thing 'x': out of range (give 1 to 9)"),
        ("broken", 1, "error: closed: the store: closed (start it)"),
        (
            "unexpected",
            1,
            "error: KeyError: 'missing' (an unexpected failure: run again with --debug for the traceback)",
        ),
        ("ctrl-c", 130, "error: interrupted (Ctrl-C)"),
    ],
)
def test_what_escapes_main_is_one_line_with_its_exit_status(
    failing: str, what: str, code: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert command(failing, [what]) == code
    err = capsys.readouterr().err
    assert err.splitlines() == [line]
    assert command(failing, [what, "--debug"]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == line.replace(
        " (an unexpected failure: run again with --debug for the traceback)", ""
    )


def test_debug_is_taken_out_of_the_arguments_and_the_signals_given_back(failing: str) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert command(failing, ["fine"]) == 0
    assert command(failing, ["--debug", "fine"]) == 0  # main never saw --debug (it would return 3)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_mistake_on_the_command_line_is_one_line(failing: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        command(failing, ["--nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith("(see python -m failing --help)"), err

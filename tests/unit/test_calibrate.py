"""Unit tests for ``runtime.ops.calibrate``: the decision rule, convergence, the file it writes, its arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.config import Calibration, load_calibration
from runtime.ops.calibrate import Window, converged, decide, main, over, write_calibration


@pytest.mark.parametrize(
    ("u", "decision", "factor"),
    [
        (0.0, "raise", 1.25),
        (0.30, "raise", 1.25),
        (0.4999, "raise", 1.25),
        (0.50, "step up", 1.25),  # the proportional half-step meets the big step at the edge
        (0.60, "step up", 1.125),
        (0.70, "in band", 1.0),
        (0.75, "in band", 1.0),
        (0.80, "in band", 1.0),
        (0.82, "step down", 1 + (0.75 / 0.82 - 1) / 2),
        (0.85, "step down", 1 + (0.75 / 0.85 - 1) / 2),
        (0.8501, "lower", 0.8),
        (1.0, "lower", 0.8),
        (3.0, "lower", 0.8),
    ],
)
def test_the_rule(u: float, decision: str, factor: float) -> None:
    got, rate = decide(20.0, u)
    assert got == decision and rate == pytest.approx(20.0 * factor)


@given(st.floats(min_value=0.01, max_value=1e5), st.floats(min_value=0.0, max_value=10.0))
def test_every_step_moves_toward_the_band_and_never_by_more_than_the_big_steps(rate: float, u: float) -> None:
    decision, new = decide(rate, u)
    assert 0.8 * rate * (1 - 1e-12) <= new <= 1.25 * rate * (1 + 1e-12)
    if u < 0.70:
        assert new > rate
    elif u > 0.80:
        assert new < rate
    else:
        assert new == rate and decision == "in band"


def test_bad_inputs_to_the_rule() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        decide(0.0, 0.5)
    with pytest.raises(ValueError, match="utilisation >= 0"):
        decide(1.0, float("nan"))


def w(n: int, decision: str) -> Window:
    return Window(n, 10.0, 50.0, 0.75 if decision == "in band" else 0.3, decision, 10.0)  # type: ignore[arg-type]


def test_converged_is_two_windows_in_band_in_a_row() -> None:
    assert not converged([])
    assert not converged([w(1, "in band")])
    assert not converged([w(1, "in band"), w(2, "raise")])
    assert not converged([w(1, "in band"), w(2, "step up"), w(3, "in band")])
    assert converged([w(1, "raise"), w(2, "in band"), w(3, "in band")])


def test_a_squeezed_window_is_never_in_band_for_convergence() -> None:
    assert over(None, None) == "" and over(0.89, 0.89) == ""  # a quota held at its target throttles a lot
    assert "memory at 90%" in over(0.9, None)
    assert "95% of CPU periods throttled" in over(0.5, 0.95)
    assert "memory" in over(0.95, 0.95) and "throttled" in over(0.95, 0.95)
    squeezed = Window(2, 10.0, 50.0, 0.75, "in band", 10.0, over=over(0.95, None))
    assert not converged([w(1, "in band"), squeezed])
    assert not converged([squeezed, w(3, "in band")])
    assert converged([squeezed, w(3, "in band"), w(4, "in band")])


def test_the_file_reads_back_and_replaces_the_old_one_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "calibration.yaml"
    first = Calibration(llm_rate=12, agents=5, cpu_capacity=2.0, cpu_source="x", utilisation=0.74, model="m.gguf")
    write_calibration(path, first)
    assert load_calibration(path) == first
    assert path.read_text().startswith("# Written by python -m runtime.calibrate")
    second = Calibration(llm_rate=30, agents=3, cpu_capacity=0.5, date="2025-06-01T00:00:00Z", windows=7, window_s=2.0)
    write_calibration(path, second)
    assert load_calibration(path) == second
    assert [p.name for p in path.parent.iterdir()] == ["calibration.yaml"]  # no temporary file left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agents", "0"], "--agents must be at least 1, got 0"),
        (["--window-s", "0"], "--window-s must be positive, got 0.0"),
        (["--start-rate", "-3"], "--start-rate must be in (0, 1e6] tokens/s, got -3.0"),
        (["--max-windows", "1"], "--max-windows must be at least 2"),
        (["--agents", "many"], "argument --agents: invalid int value: 'many'"),
    ],
)
def test_bad_arguments_are_named(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_config_or_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: cannot read" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path}\nllm: {{model: {tmp_path / 'missing.gguf'}}}\n")
    assert main(["--config", str(cfg)]) == 2
    assert "missing.gguf' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "calibration.yaml").exists()

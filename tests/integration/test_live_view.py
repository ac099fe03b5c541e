"""The live view as a user sees it: ``python -m runtime.supervisor`` on a real pseudo-terminal of a given
size, its output read back as a screen by a terminal emulator (``pyte``)."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte
import pytest

from tests.harness import ROOT

ROWS = 50

# A long agent id and a deep data directory: the cells and the footer's lines (which name the data
# directory's cgroup and the limits' sources) are wider than a narrow terminal, which is what made the
# hand-written redraw leave a copy of a wrapped line behind at every frame.
CONFIG = """
data_dir: {data}
pool: {{workers: 2, heartbeat_s: 0.5}}
agents:
  - id: cruncher-with-a-long-long-name
    workload: [{{kind: burn, ms: 30}}]
  - id: napper
    workload: [{{kind: sleep, ms: 50}}]
status_interval_s: 0.1
"""

FRAMES = 15
#: How ``rich.live.Live`` begins each redraw after the first: back to the frame's first line.
REDRAW = b"\r\x1b[2K\x1b[1A"


def _run_on_terminal(config: Path, width: int) -> tuple[bytes, int, bytes]:
    """Run the supervisor on a pseudo-terminal ``width`` × ``ROWS`` until it has drawn ``FRAMES`` frames,
    stop it with SIGTERM; return everything it wrote, the frames counted, and what it had written when
    it was stopped (taken between two frames: when the terminal had been quiet for 30 ms)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, width, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR"}}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.supervisor", "--config", str(config)],
        cwd=ROOT,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 60
    stopped = False
    running = b""
    try:
        while True:
            enough = not stopped and out.count(b"elapsed") >= FRAMES
            assert time.monotonic() < deadline, f"no {FRAMES} frames within 60 s: {bytes(out[-2000:])!r}"
            ready, _, _ = select.select([master], [], [], 0.03 if enough else 1.0)
            if not ready:
                if enough:
                    # Up to the last redraw's start (rich's cursor-up): what the frames before it left
                    # on screen. A redraw is bigger than the terminal's buffer, so a writer the host
                    # did not schedule for a while can fall silent in the middle of one.
                    running = bytes(out[: out.rfind(REDRAW)])
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's slave side has closed it
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    assert proc.returncode == 0, bytes(out[-3000:]).decode(errors="replace")
    return bytes(out), out.count(b"elapsed"), running


@pytest.mark.parametrize("width", [60, 120, 200])
def test_the_live_view_redraws_in_place_at_any_width(tmp_path: Path, width: int) -> None:
    config = tmp_path / "live.yaml"
    config.write_text(CONFIG.format(data=tmp_path / "long-data-dir"))
    out, frames, _ = _run_on_terminal(config, width)
    assert frames >= FRAMES
    screen = pyte.Screen(width, ROWS)
    pyte.ByteStream(screen).feed(out)
    lines = [line.rstrip() for line in screen.display]

    def starting(prefix: str) -> list[str]:
        return [line for line in lines if line.startswith(prefix)]

    shown = "\n".join(lines)
    # One frame on screen, whole: each of its lines once, none left over from an earlier frame.
    assert len(starting("agent ")) == 1, shown
    assert len(starting("cruncher-")) == 1, shown
    assert len(starting("napper ")) == 1, shown
    for footer in (
        "pool: ",
        "container: ",
        "data volume: ",
        "measuring: ",
        "overhead: ",
        "books vs kernel: ",
        "elapsed ",
    ):
        assert len(starting(footer)) == 1, f"{footer!r} not once:\n{shown}"
    # Nothing was wrapped: the over-long lines were cut at the edge.
    assert starting("container: ")[0].endswith("…") or len(starting("container: ")[0]) < width, shown
    assert all(len(line) <= width for line in lines)
    # The final frame is the one left on screen, with the summary's path under it.
    assert starting("elapsed ")[0].endswith(" s"), shown
    assert "usage summary:" in shown


def test_more_agents_than_the_terminal_has_rows_are_summed_up_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "crowd.yaml"
    nappers = "".join(f"  - id: napper-{i:02d}\n    workload: [{{kind: sleep, ms: 50}}]\n" for i in range(70))
    config.write_text(CONFIG.format(data=tmp_path / "data").replace("status_interval_s", nappers + "status_interval_s"))
    _, _, running = _run_on_terminal(config, 120)
    screen = pyte.Screen(120, ROWS)
    pyte.ByteStream(screen).feed(running)
    lines = [line.rstrip() for line in screen.display]
    shown = "\n".join(lines)
    assert sum(1 for line in lines if line.startswith("agent ")) == 1, shown
    (more,) = [line for line in lines if line.startswith("… and ")]
    listed = [line for line in lines if line.startswith("napper-")]
    assert len(set(listed)) == len(listed)  # no row twice
    # The rows shown and the ones summed up are every agent.
    assert int(more.split()[2]) + len(listed) + len([x for x in lines if x.startswith(("cruncher-", "napper "))]) == 72
    assert sum(1 for line in lines if line.startswith("elapsed ")) == 1, shown
    assert lines[-1].startswith("elapsed ") or not lines[-1], shown  # the frame fits the screen


def test_off_a_terminal_the_view_is_one_line_per_interval(tmp_path: Path) -> None:
    config = tmp_path / "pipe.yaml"
    config.write_text(CONFIG.format(data=tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.supervisor", "--config", str(config), "--duration", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    # 30 frames were built in 3 s; off a terminal, one summary line per 10 s interval is printed.
    assert len(summaries) == 1, proc.stdout
    assert "2 agents" in summaries[0] and "pool " in summaries[0]
    assert "\x1b[" not in proc.stdout  # no cursor movement written to a pipe
    assert proc.stdout.count("elapsed ") == 1  # the last frame, once, as plain text

"""The sandbox's attacks inside the image: the shipped user (uid 10001), no writable cgroups, the
engine's masked ``/proc`` and its own seccomp profile around the sandbox's.

The attack driver (``tests/sandbox_attacks.py``, which needs only the runtime and the standard
library) is copied into the container's config directory and plays every attack through a real world
(ledger, store, pool) on the data volume; the host asserts on its report as it does for the host's own
workers, and runs ``git fsck --strict`` on the store the container wrote.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests import sandbox_attacks
from tests.container.conftest import Box

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]


def test_attacks_through_the_world_inside_the_image(box: Box, uid: int) -> None:
    assert uid != 0
    shutil.copy(Path(sandbox_attacks.__file__), box.config / "sandbox_attacks.py")
    box.write_config("params.json", json.dumps(sandbox_attacks.syscall_params()))
    cmd = ["env", "PYTHONPATH=/app", "python", "/config/sandbox_attacks.py", "/data/attacks", "/config/params.json"]
    out = box.inside(*cmd, timeout_s=900.0)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    print(f"\nworkers measured by: {report['cgroups']}")
    for name, a in report["attacks"].items():
        c = a["charged"][0] if a["charged"] else {}
        print(f"  {name:24} {'ok' if a['ok'] else a['code']:18} memory {c.get('memory', 0) >> 20} MiB")
    assert "no " in report["cgroups"], report["cgroups"]  # the image's user cannot write cgroups
    sandbox_attacks.verify(report, socket.gethostname())
    fsck = subprocess.run(
        ["git", "-c", "safe.directory=*", "--git-dir", str(box.data / "attacks" / "artifacts.git"), "fsck", "--strict"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

"""The plan of the sandbox's minimal root (``workers.rootfs``), checked against this host's files."""

from __future__ import annotations

import os
import sys

from workers import rootfs


def _resolve(plan: tuple[rootfs.Step, ...], path: str) -> str | None:
    """Where ``path`` leads in the planned root: the bind that holds it, or None (not there)."""
    links = {s[1]: s[2] for s in plan if s[0] == "link"}
    binds = [s[1] for s in plan if s[0] == "bind"]
    for _ in range(40):
        for bind in binds:
            if path == bind or path.startswith(bind + "/"):
                return bind
        for link, target in links.items():
            if path == link or path.startswith(link + "/"):
                path = os.path.normpath(os.path.join(os.path.dirname(link), target) + path[len(link) :])
                break
        else:
            return None
    raise AssertionError("link loop")


def test_the_plan_holds_what_the_interpreter_needs_and_nothing_of_the_project() -> None:
    plan = rootfs.plan(())
    made: set[str] = {"/"}
    for step in plan:  # every step's parent exists by the time it runs, and nothing is made twice
        assert os.path.dirname(step[1]) in made or _resolve(plan, os.path.dirname(step[1])), step
        assert step[1] not in made, step
        made.add(step[1])
    exe = os.path.realpath(sys.executable)
    for needed in (exe, os.__file__, os.path.dirname(os.__file__) + "/lib-dynload"):
        assert _resolve(plan, needed), needed
    interp = rootfs.elf_interpreter(exe)
    assert interp is None or _resolve(plan, interp), interp  # /lib64/ld-linux-x86-64.so.2, through its links
    repo = os.path.dirname(os.path.dirname(os.path.abspath(rootfs.__file__)))
    for absent in (repo, sys.prefix, "/home", "/var", "/sys", "/etc/passwd", "/etc/os-release"):
        assert not _resolve(plan, absent), absent
    assert not any(step[1].startswith(repo) for step in plan), plan


def test_hidden_paths_inside_a_bind_are_covered_others_need_nothing() -> None:
    stdlib = os.path.dirname(os.__file__)
    plan = rootfs.plan((f"{stdlib}/json", "/srv/elsewhere", f"{stdlib}/no-such-module"))
    covers = [s[1] for s in plan if s[0] == "cover"]
    assert f"{stdlib}/json" in covers and "/srv/elsewhere" not in covers and f"{stdlib}/no-such-module" not in covers

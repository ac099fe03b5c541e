"""The one direction of imports (ARCHITECTURE.md): a module imports its own layer and the layers below,
never one above; workers and native engines import no supervisor-side state.

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are not counted; an import
inside a function is (it runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness import ROOT

#: The supervisor's layers, lowest first: the languages and the machine, dispatch, charging and recording,
#: the world, the agents, composition, then what operators run.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "runtime.errors",
            "runtime.protocol",
            "runtime.config",
            "runtime.actions",
            "runtime.groupcommit",
            "runtime.host",
        ),
    ),
    ("pool", ("runtime.pool",)),
    ("economy", ("runtime.economy",)),
    ("world", ("runtime.world",)),
    ("agents", ("runtime.agents",)),
    ("composition", ("runtime.backends", "runtime.node")),
    (
        "ops",
        ("runtime.ops", "runtime.supervisor", "runtime.status", "runtime.admin", "runtime.calibrate", "runtime.events"),
    ),
]
#: What a worker process may import from the supervisor's side: stateless definitions only.
WORKER_MAY_USE = ("runtime.errors", "runtime.protocol", "runtime.host.cgroups", "runtime.host.tally")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> int | None:
    """Index of ``module``'s layer, or None outside the supervisor (workers, native, stdlib …)."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if _within(module, prefixes):
            return i
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every project import in ``source`` that runs (not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(source)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from runtime.host import cgroups` imports runtime.host.cgroups when that is a module.
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / sub.replace(".", "/")
                ).is_dir()
                found.append((node.lineno, sub if is_module else node.module))
    return [(line, m) for line, m in found if m.split(".")[0] in ("runtime", "workers", "native")]


SOURCES = sorted(p for d in ("runtime", "workers", "native") for p in (ROOT / d).rglob("*.py"))


def violations(me: str, source: str) -> list[str]:
    """Why each import of module ``me`` (its ``source``) goes the wrong way (empty: none does)."""
    out: list[str] = []
    for line, target in imports(source):
        where = f"{me}:{line}: imports {target}"
        if me.startswith(("workers", "native")):
            if target.startswith("runtime") and not _within(target, WORKER_MAY_USE):
                out.append(f"{where} (the worker side imports no supervisor-side state)")
            if me.startswith("native") and target.startswith("workers"):
                out.append(f"{where} (native engines do not know the worker loop)")
            continue
        mine, theirs = layer_of(me), layer_of(target)
        if target.startswith(("workers", "native")) and mine is not None:
            continue  # the supervisor may name worker-side types (task handlers run in workers)
        assert mine is not None, f"{me} is in no layer: add it to LAYERS"
        if theirs is None:
            out.append(f"{where} ({target} is in no layer)")
        elif theirs > mine:
            out.append(f"{where} ({LAYERS[mine][0]} may not import {LAYERS[theirs][0]})")
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path: Path) -> None:
    assert violations(module_name(path), path.read_text()) == []


@pytest.mark.parametrize(
    ("me", "source", "why"),
    [
        ("runtime.economy.probe", "from runtime.world.world import World\n", "economy may not import world"),
        ("runtime.pool.probe", "def f():\n    from runtime.node import Node\n", "pool may not import composition"),
        ("workers.probe", "from runtime.economy import ledger\n", "imports no supervisor-side state"),
        ("native.probe", "import workers.worker\n", "do not know the worker loop"),
    ],
)
def test_the_check_catches_a_wrong_way_import(me: str, source: str, why: str) -> None:
    """The check itself can fail: each kind of wrong-way import is reported."""
    found = violations(me, source)
    assert len(found) == 1 and why in found[0]


def test_annotations_only_imports_are_not_dependencies() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from runtime.world.world import World\n"
    assert violations("runtime.actions", source) == []

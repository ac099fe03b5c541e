"""CPython 3.11's own ``Lib/test/test_concurrent_futures.py``, unmodified, run with ``WorkerPoolExecutor``.

The file comes from Debian's ``libpython3.11-testsuite`` package (PSF licence), fetched once with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into ``~/.cache/agent-ecology/cpython-tests``.
It is imported as ``test.test_concurrent_futures``, the name its own child scripts import it by: a
``test`` package in the cache extends the standard library's ``test`` package (``test.support`` stays
the interpreter's), and the workers find it because they inherit this process's ``sys.path``.

The suite's test classes are built by its own ``create_executor_tests`` with one more executor mixin,
``WorkerPoolMixin``. What the adapter changes is only the harness around the tests:

- ``assert_python_ok`` child scripts import the executor type by name from ``concurrent.futures``;
  the adapter's wrapper prepends one line making ``concurrent.futures.WorkerPoolExecutor`` the
  project's, and passes the cache and the repository on ``PYTHONPATH`` (which ``-I`` would drop).

The generated classes live in this module (``tests.stdlib_futures``), made when it is imported, so
that a worker unpickling a reference to one (``submit(self._test_traceback)``) finds it. Every test
that does not run is in ``EXCLUDED`` with its reason. tests/integration/test_stdlib_futures.py runs
``SUITE`` and prints the pass count.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime.pool import WorkerPoolExecutor
from tests.harness import ROOT

CACHE = Path.home() / ".cache" / "agent-ecology" / "cpython-tests" / "3.11"
PACKAGE = "libpython3.11-testsuite"
SUITE_FILE = "test_concurrent_futures.py"

#: The suite's mixins that exercise an executor (FutureTests, the Future's own tests, need none).
MIXINS = (
    "InitializerMixin",
    "FailingInitializerMixin",
    "ProcessPoolShutdownTest",
    "WaitTests",
    "AsCompletedTests",
    "ProcessPoolExecutorTest",
    "ExecutorDeadlockTest",
)
_PRIVATE = "reads ProcessPoolExecutor's private attributes"
_OWN_TYPE = "tests ProcessPoolExecutor itself (constructs futures.ProcessPoolExecutor, not the executor under test)"
_ON_DEMAND = (
    "expects workers spawned on demand (few processes after a few tasks); WorkerPoolExecutor starts "
    "all its workers in its constructor, as ProcessPoolExecutor does with the fork start method"
)
#: Tests not run, each with why. Keyed by the suite's method name (the same in every generated class).
EXCLUDED: dict[str, str] = {
    "test_processes_terminate": _PRIVATE + " (_processes) and expects workers spawned on demand",
    "test_context_manager_shutdown": _OWN_TYPE,
    "test_del_shutdown": _OWN_TYPE,
    "test_shutdown_no_wait": _OWN_TYPE,
    "test_idle_process_reuse_one": _ON_DEMAND,
    "test_idle_process_reuse_multiple": _ON_DEMAND,
    "test_max_tasks_per_child_defaults_to_spawn_context": _PRIVATE + " (_mp_context); mp_context is ignored",
    "test_initializer": "only in FailingInitializerMixin (InitializerMixin's runs: see suite()): expects the "
    "failure logged after the constructor returns, as ProcessPoolExecutor starts workers on first submit; "
    "WorkerPoolExecutor starts them, and logs it, in its constructor (the rest is checked in "
    "tests/integration/test_executor.py::test_a_failing_initializer_breaks_the_executor)",
    "test_ressources_gced_in_workers": "passes a multiprocessing Manager proxy to a worker; proxies "
    "authenticate with the authkey only multiprocessing's own children inherit",
}


def fetch_suite() -> Path:
    """The directory holding ``test/test_concurrent_futures.py`` (fetched from Debian on first use)."""
    target = CACHE / "test" / SUITE_FILE
    if target.exists():
        return CACHE
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"need apt-get and dpkg-deb to fetch {PACKAGE} (CPython's own tests)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        (found,) = Path(f"{tmp}/x").rglob(f"python3.11/test/{SUITE_FILE}")
        target.parent.mkdir(parents=True, exist_ok=True)
        # A package that extends the standard library's ``test``: ``test.support`` stays the interpreter's.
        (target.parent / "__init__.py").write_text(
            "from pkgutil import extend_path\n__path__ = extend_path(__path__, __name__)\n"
        )
        shutil.copyfile(found, f"{target}.part")
        os.replace(f"{target}.part", target)  # whole or absent, for a run interrupted half way
    return CACHE


def load_suite() -> ModuleType:
    """Import the suite as ``test.test_concurrent_futures``, with the cache first on ``sys.path``."""
    root = str(fetch_suite())
    if root not in sys.path:
        sys.path.insert(0, root)
    test = importlib.import_module("test")
    if str(CACHE / "test") not in test.__path__:
        test.__path__.insert(0, str(CACHE / "test"))
    return importlib.import_module("test.test_concurrent_futures")


def build(mod: ModuleType) -> list[type[unittest.TestCase]]:
    """The suite's executor test classes with ``WorkerPoolExecutor`` as the executor type, made here."""

    class WorkerPoolMixin(mod.ExecutorMixin):  # type: ignore[name-defined,misc]
        executor_type = WorkerPoolExecutor

        def get_context(self) -> Any:
            # No ``ctx`` attribute, so the mixin does not pass ``mp_context``; tests that make their own
            # locks and semaphores get spawn's (usable from any process they are pickled to).
            return mp.get_context("spawn")

    original = mod.assert_python_ok
    prelude = (
        "import concurrent.futures, runtime.pool\n"
        "concurrent.futures.WorkerPoolExecutor = runtime.pool.WorkerPoolExecutor\n"
    )

    def assert_python_ok(*args: str, **env: str) -> Any:
        assert args[0] == "-c", args
        path = os.pathsep.join([str(CACHE), str(ROOT)])
        return original("-c", prelude + args[1], *args[2:], __isolated=False, PYTHONPATH=path, **env)

    setattr(mod, "assert_python_ok", assert_python_ok)  # noqa: B010 (mypy cannot see the module's names)
    before = set(vars(mod))
    for name in MIXINS:
        mod.create_executor_tests(getattr(mod, name), executor_mixins=(WorkerPoolMixin,))
    classes = []
    for name in sorted(set(vars(mod)) - before):
        cls = vars(mod).pop(name)
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
        classes.append(cls)
    return classes


CLASSES = build(load_suite())


def suite() -> unittest.TestSuite:
    """Every test of ``CLASSES`` not in ``EXCLUDED``."""
    loader = unittest.TestLoader()
    return unittest.TestSuite(
        cls(name)
        for cls in CLASSES
        for name in loader.getTestCaseNames(cls)
        if name not in EXCLUDED or (name == "test_initializer" and "Failing" not in cls.__name__)
    )

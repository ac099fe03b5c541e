"""CPython 3.11's own ``test_concurrent_futures`` with ``WorkerPoolExecutor`` (adapter: tests/stdlib_futures.py)."""

from __future__ import annotations

import sys
import unittest

import pytest

from tests import stdlib_futures


@pytest.mark.timeout(1200)  # 49 tests of up to a few seconds each, on a loaded 2-core host
def test_cpython_concurrent_futures_suite(capsys: pytest.CaptureFixture[str]) -> None:
    """Every applicable test of CPython's suite passes with ``WorkerPoolExecutor``."""
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(stdlib_futures.suite())
    problems = [f"{t.id()}:\n{tb}" for t, tb in result.failures + result.errors]
    problems += [f"{t.id()}: passed unexpectedly" for t in result.unexpectedSuccesses]
    passed = result.testsRun - len(result.failures) - len(result.errors) - len(result.skipped)
    with capsys.disabled():
        print(
            f"\nCPython 3.11 test_concurrent_futures with WorkerPoolExecutor: {passed} passed, "
            f"{len(result.failures) + len(result.errors)} failed, {len(result.skipped)} skipped by the suite, "
            f"{len(stdlib_futures.EXCLUDED)} excluded"
        )
    assert not problems, "\n".join(problems)
    assert passed >= 40, f"only {passed} tests ran and passed"

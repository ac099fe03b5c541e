"""A real worker (``workers.worker``: its pipe, its secret, its hello) whose reports lie about one field.

``python -m tests.integration.forging_worker FIELD VALUE``: every ``Result`` it sends carries ``VALUE``
(``1e12``, ``-1``, ``nan``, ``inf`` …) in its usage's ``FIELD`` (``cpu_seconds``, ``peak_memory_bytes``,
``wall_seconds``; ``usage`` with ``none`` sends no usage at all; a ``ThinkReport`` field such as
``completion_tokens`` or ``cost_usd`` changes a think's output; a ``Counters`` field such as ``idle``
its books). ``die_before_begin MARKER``: it dies (once: the first to create ``MARKER``) when an
``Echo`` of ``die-before-begin`` reaches it, before it counts the task begun. It lives in the tests only: the pool
starts it through ``WorkerPool(worker_command=…)``, as it would start any worker program.
"""

from __future__ import annotations

import os
import sys

import msgspec

from runtime import protocol as p
from workers import worker


def _forge(field: str, value: str) -> None:
    honest = worker.Worker._run

    def lying(self: worker.Worker, msg: p.Task) -> p.Result:
        res = honest(self, msg)
        if field == "usage":
            return msgspec.structs.replace(res, usage=None)
        if field in p.Counters.__struct_fields__:  # the worker's books, sent with every result
            return msgspec.structs.replace(res, counters=msgspec.structs.replace(res.counters, **{field: float(value)}))
        if field in p.ThinkReport.__struct_fields__:  # the think's own report, in its output
            report = msgspec.structs.replace(p.decode_think(res.output), **{field: float(value)})
            return msgspec.structs.replace(res, output=msgspec.msgpack.encode(report))
        assert res.usage is not None
        forged = int(value) if field.endswith("_bytes") else float(value)
        return msgspec.structs.replace(res, usage=msgspec.structs.replace(res.usage, **{field: forged}))

    worker.Worker._run = lying  # type: ignore[method-assign]


def _die_before_begin(marker: str) -> None:
    """The window between two tasks: the worker dies with a task in hand it has not begun."""
    counted = worker.Worker._run_counted

    def dying(self: worker.Worker, task: p.Task) -> p.Result:
        if isinstance(task.spec, p.Echo) and task.spec.data == "die-before-begin":
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # died once already: the task runs here
            else:
                os._exit(7)
        return counted(self, task)

    worker.Worker._run_counted = dying  # type: ignore[method-assign]


if __name__ == "__main__":
    if sys.argv[1] == "die_before_begin":
        _die_before_begin(sys.argv[2])
    else:
        _forge(sys.argv[1], sys.argv[2])
    sys.exit(worker.main())

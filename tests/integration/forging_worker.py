"""A real worker (``workers.worker``: its pipe, its secret, its hello) whose reports lie about one field.

``python -m tests.integration.forging_worker FIELD VALUE``: every ``Result`` it sends carries ``VALUE``
(``1e12``, ``-1``, ``nan``, ``inf`` …) in its usage's ``FIELD`` (``cpu_seconds``, ``peak_memory_bytes``,
``wall_seconds``; ``usage`` with ``none`` sends no usage at all; a ``ThinkReport`` field such as
``completion_tokens`` or ``cost_usd`` changes a think's output; a ``Counters`` field such as ``idle``
its books). It lives in the tests only: the pool
starts it through ``WorkerPool(worker_command=…)``, as it would start any worker program.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    _forge(sys.argv[1], sys.argv[2])
    sys.exit(worker.main())

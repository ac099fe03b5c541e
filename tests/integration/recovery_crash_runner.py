"""The real supervisor, killed (SIGKILL, by itself) in the middle of its start-up recovery.

``python -m tests.integration.recovery_crash_runner CONFIG AFTER`` runs ``python -m runtime.supervisor
--config CONFIG --no-live`` in this process, except that the ledger kills the process right after the
``AFTER``-th recovery charge (a ``RecordUsage`` with the crash code) is durable, before the supervisor
could log its event or clear its record: the worst moment for a charge to be applied twice. Before
dying it prints ``charged <task id>`` (flushed) for each such charge, for the test to check.
"""

from __future__ import annotations

import os
import signal
import sys

from runtime.economy.ledger import Op, Receipt, RecordUsage
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.economy.ledger.writer import GroupCommitted
from runtime.ops import supervisor
from runtime.pool.inflight import CRASH_CODE


def main() -> int:
    """Patch the ledger's ``apply``, then run the supervisor."""
    config, after = sys.argv[1], int(sys.argv[2])
    charged = 0
    real_apply = LmdbLedger.apply

    def apply(self: GroupCommitted, op: Op) -> Receipt:
        nonlocal charged
        receipt = real_apply(self, op)
        if isinstance(op, RecordUsage) and op.error == CRASH_CODE:
            charged += 1
            print(f"charged {op.task_id}", flush=True)
            if charged == after:
                os.kill(os.getpid(), signal.SIGKILL)
        return receipt

    LmdbLedger.apply = apply  # type: ignore[method-assign]
    return supervisor.main(["--config", config, "--no-live"])


if __name__ == "__main__":
    sys.exit(main())

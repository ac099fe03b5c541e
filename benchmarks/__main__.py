"""``python -m benchmarks NAME [--quick] [--json PATH] [--profile]``: run one benchmark.

Each benchmark is a module with ``run(opts: benchmarks.common.Options) -> int``, registered in
``BENCHMARKS`` by name. Modules are imported only when chosen, so one benchmark's heavy imports do not
slow down or break another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from benchmarks.common import RESULTS_DIR, Options
from runtime.errors import AecoError, Parser, command

#: Benchmark name -> (module that implements it, one-line description).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "container": (
        "benchmarks.container",
        "the same workload on the host and in the image, 2 CPUs/4g: throughput, books vs cgroup",
    ),
    "ecology": ("benchmarks.ecology", "end-to-end actions/s and supervisor RSS with 10, 100 and 1,000 scripted agents"),
    "dashboard": (
        "benchmarks.dashboard",
        "the web dashboard's cost: supervisor CPU per action at 1,000 agents, off vs one browser attached",
    ),
    "dispatch": ("benchmarks.dispatch", "no-op round trips/s and latency: this pool vs its peers"),
    "ledger": ("benchmarks.ledger", "durable transfers/s: LMDB group commit vs per-op and SQLite WAL"),
    "llm": ("benchmarks.llm", "local inference tokens/s: Think tasks through the pool vs LlamaBackend directly"),
    "soak": (
        "benchmarks.soak",
        "1,000 scripted agents with retention on: supervisor RSS, data-dir bytes and actions/s over time",
    ),
    "think": (
        "benchmarks.think",
        "decisions and tokens per CPU-second at 1, 8, 20 agents: one think per task vs batched (+ prefix reuse)",
    ),
    "sandbox": ("benchmarks.sandbox", "a confined invocation's round trip vs a bare fork+exec of Python and bwrap"),
    "store": ("benchmarks.store", "artifact writes/s and reads/s vs the git CLI"),
    "scale": (
        "benchmarks.scale",
        "actions/s of 1, 2 and 3 nodes sharing PostgreSQL + Redis; PostgreSQL vs LMDB ledger",
    ),
}


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in BENCHMARKS.items())
    ap = Parser(
        prog="python -m benchmarks",
        description="Run one benchmark; print a table and write JSON (and a plot) under benchmarks/results/.",
        epilog=f"benchmarks:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("name", metavar="NAME", help="the benchmark to run (see below)")
    ap.add_argument("--quick", action="store_true", help="short measurements (~0.5 s per case), for a smoke test")
    ap.add_argument(
        "--json",
        metavar="PATH",
        type=Path,
        help="where to write the results (default: benchmarks/results/NAME.json); "
        "a plot, if the benchmark makes one, goes next to it with the .png suffix",
    )
    ap.add_argument("--minutes", type=float, metavar="N", help="how long a timed benchmark (soak) runs")
    ap.add_argument("--profile", action="store_true", help="also record py-spy flame graphs into benchmarks/results/")
    ap.add_argument(
        "--sizes",
        metavar="N[,N...]",
        help="only these numbers of agents (ecology: each with all its interleaved runs; the 10,000-agent run "
        "only if named, the dashboard's phase not); the JSON then goes to NAME-sizes-N-N.json unless --json says",
    )
    return ap


def _sizes(ap: argparse.ArgumentParser, text: str | None) -> tuple[int, ...] | None:
    """``--sizes`` as numbers (None when not given); a usage error when they are not positive integers."""
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        ap.error(f"--sizes takes positive integers separated by commas, got {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, import the chosen benchmark and run it; return its exit status."""
    ap = _parser()
    args = ap.parse_args(argv)
    name: str = args.name
    if name not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        raise AecoError(f"benchmark {name!r}: there is none of that name (choose one of {names})")
    module = importlib.import_module(BENCHMARKS[name][0])
    run = cast(Callable[[Options], int], module.run)
    sizes = _sizes(ap, args.sizes)
    # A run of some sizes only does not overwrite the results of a whole run.
    default = f"{name}.json" if sizes is None else f"{name}-sizes-{'-'.join(map(str, sizes))}.json"
    json_path: Path = args.json if args.json is not None else RESULTS_DIR / default
    if args.minutes is not None and not 0 < args.minutes <= 24 * 60:
        ap.error(f"--minutes must be in (0, 1440], got {args.minutes}")
    return run(Options(quick=args.quick, json_path=json_path, profile=args.profile, minutes=args.minutes, sizes=sizes))


if __name__ == "__main__":
    # Run through the shared entry point (one-line errors, --debug): it imports this file once more as
    # ``benchmarks.__main__``, whose ``main`` it calls.
    sys.exit(command("benchmarks.__main__"))

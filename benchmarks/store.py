"""Artifact store throughput: durable 1 KB artifact writes and reads per second, GitStore against the git CLI.

Every system makes the same commits on a bare repository in one temporary directory: per write, the
content blob and its metadata blob, the three fanned-out trees on the artifact's path, a commit authored
by the agent, and ``refs/heads/main`` moved to it. Systems, each measured for a fixed time:

- ``store-pipelined-new`` / ``store-pipelined-rewrite``: ``GitStore.submit_write`` from one thread keeping
  two windows of 512 futures in flight (group commit: one pack and one ref update per batch), creating
  new ids, or rewriting 1,000 existing ones;
- ``store-sync-new`` / ``store-sync-rewrite``: ``GitStore.write``, one durable write at a time;
- ``store-sync-16-threads``: ``GitStore.write`` from 16 threads at once, each waiting for its own write
  (what many agents writing at the same time look like: their writes share group commits);
- ``store-read``: ``GitStore.read`` of random ids among 1,000 (index lookup plus one blob), one thread;
- ``git-cli``: the git CLI driven by ``subprocess``, per write: ``hash-object -w`` twice, ``mktree``
  three times, ``commit-tree`` and ``update-ref`` (git's default ``core.fsync``: loose objects and refs
  are not fsync'd, so this baseline is not durable on power loss);
- ``git-cli-fsync``: the same with ``core.fsync=all``, durable like the store.

After each run the numbers are checked against the repository: the commit count must equal the writes
counted (``git rev-list --count``), and for the store ``runtime.world.store.verify`` must pass.

``SYSTEMS`` is a plain list: another comparison is one more ``System`` with its own ``kind``. (Confined
invocations against fork+exec and bubblewrap: ``python -m benchmarks sandbox``.)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from benchmarks import common
from benchmarks.common import Budget, Options, Skipped, System, closed_loop_threads, measure_each, publish
from runtime.world.store import WriteReceipt, verify
from runtime.world.store.git import GitStore, fanout

FULL_S, QUICK_S = 3.0, 1.0
SIZE = 1024
AGENTS = tuple(f"agent{i:02d}" for i in range(50))
REWRITE_IDS = 1000
THREADS = 16
WINDOW = 512
QUOTA = 1 << 40
TARGET_VS_GIT = 5.0
TARGET_RATE = 500

Kind = Literal["write", "read"]


class Entry(msgspec.Struct, omit_defaults=True):
    """One system's result."""

    name: str
    ops_per_s: float
    kind: Kind
    ops: int
    seconds: float
    #: Every counted write was on disk (fsync'd) before it was counted (reads: not applicable).
    durable: bool
    describe: str


class Report(common.ReportHead):
    """The JSON file."""

    artifact_bytes: int
    results: list[Entry]
    ratios: dict[str, float]
    skipped: list[Skipped]


@dataclass(frozen=True, slots=True)
class Measured:
    """Operations counted over the measured interval."""

    ops: int
    seconds: float


class Mismatch(Exception):
    """The repository does not hold what the benchmark counted."""


def _content(rng: random.Random) -> bytes:
    return rng.randbytes(SIZE)


def _git(repo: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        ["git", "-C", str(repo), *args], input=stdin, capture_output=True, env=env or _GIT_ENV, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout.decode().strip()


_GIT_ENV = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null", LC_ALL="C")


def _commit_count(repo: Path) -> int:
    return int(_git(repo, "rev-list", "--count", "HEAD"))


# -------------------------------------------------------------------------------------- the store


def _check_store(store: GitStore, base_commits: int, counted: int) -> None:
    commits = _commit_count(store.path)
    if commits != base_commits + counted:
        raise Mismatch(f"the repository has {commits - base_commits} new commits, the benchmark counted {counted}")
    problems = verify(store)
    if problems:
        raise Mismatch(f"verify: {problems[:3]}")


def _prepare_rewrites(store: GitStore) -> list[str]:
    rng = random.Random(1)
    ids = [f"rw-{i}" for i in range(REWRITE_IDS)]
    futs = [store.submit_write(AGENTS[i % len(AGENTS)], aid, _content(rng), quota=QUOTA) for i, aid in enumerate(ids)]
    for f in futs:
        f.result()
    return ids


Target = Callable[[int], tuple[str, str]]


def _store_runner(
    rewrite: bool, load: Callable[[GitStore, Target, random.Random, float], tuple[int, float]]
) -> Callable[[Path, float], Measured]:
    """A runner: a fresh store (with the ids to rewrite, if ``rewrite``), ``load`` on it for the duration
    (it writes ``target(i)``, an agent and an id, for i = 0, 1, … and returns how many and how long),
    then the repository checked against that count."""

    def run(path: Path, duration: float) -> Measured:
        store = GitStore(path / "store.git")
        try:
            ids = _prepare_rewrites(store) if rewrite else []

            def target(i: int) -> tuple[str, str]:
                if rewrite:
                    return AGENTS[(i % len(ids)) % len(AGENTS)], ids[i % len(ids)]
                return AGENTS[i % len(AGENTS)], f"new-{i}"

            base = _commit_count(store.path)
            n, seconds = load(store, target, random.Random(0), duration)
            _check_store(store, base, n)
            return Measured(n, seconds)
        finally:
            store.close()

    return run


def _store_pipelined(rewrite: bool) -> Callable[[Path, float], Measured]:
    def load(store: GitStore, target: Target, rng: random.Random, duration: float) -> tuple[int, float]:
        seq = itertools.count()

        def batch() -> list[Future[WriteReceipt]]:
            return [store.submit_write(*target(next(seq)), _content(rng), quota=QUOTA) for _ in range(WINDOW)]

        return common.pipelined_batches(batch, duration)

    return _store_runner(rewrite, load)


def _store_sync(rewrite: bool) -> Callable[[Path, float], Measured]:
    def load(store: GitStore, target: Target, rng: random.Random, duration: float) -> tuple[int, float]:
        n = 0
        start = now = time.perf_counter()
        deadline = start + duration
        while now < deadline:
            store.write(*target(n), _content(rng), quota=QUOTA)
            n += 1
            now = time.perf_counter()
        return n, now - start

    return _store_runner(rewrite, load)


def _store_sync_threads(path: Path, duration: float) -> Measured:
    """``THREADS`` closed-loop clients, each calling ``GitStore.write`` and waiting for it: concurrent
    callers' writes share a group commit, as many agents' writes do."""
    store = GitStore(path / "store.git")
    try:
        base = _commit_count(store.path)

        def client(k: int) -> Callable[[], object]:
            rng, ids, agent = random.Random(k), itertools.count(), AGENTS[k % len(AGENTS)]
            return lambda: store.write(agent, f"t{k}-{next(ids)}", _content(rng), quota=QUOTA)

        sample = closed_loop_threads([client(k) for k in range(THREADS)], Budget(0, duration, sys.maxsize))
        measured = Measured(sample.round_trips, sample.seconds)
        _check_store(store, base, measured.ops)
        return measured
    finally:
        store.close()


def _store_read(path: Path, duration: float) -> Measured:
    store = GitStore(path / "store.git")
    try:
        ids = _prepare_rewrites(store)
        rng = random.Random(0)
        n = 0
        start = now = time.perf_counter()
        deadline = start + duration
        while now < deadline:
            for _ in range(100):
                art = store.read("reader", rng.choice(ids))
                if art.size != SIZE:
                    raise Mismatch(f"read {art.id}: {art.size} bytes, expected {SIZE}")
            n += 100
            now = time.perf_counter()
        return Measured(n, now - start)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------- git CLI


class GitCli:
    """The same commits as the store, made with git plumbing commands, one subprocess per step."""

    def __init__(self, repo: Path, config: list[str]) -> None:
        self.repo = repo
        self.config = config
        subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(repo)], check=True, env=_GIT_ENV)
        self.dirs: dict[str, dict[str, tuple[str, str, str]]] = {"": {}}  # path -> name -> (mode, type, sha)
        empty = self._run("mktree", stdin=b"")
        self.head = self._run("commit-tree", empty, "-m", "create artifact store", env=self._ident("agent-ecology"))
        self._run("update-ref", "refs/heads/main", self.head)

    def _run(self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
        return _git(self.repo, *self.config, *args, stdin=stdin, env=env)

    @staticmethod
    def _ident(agent: str) -> dict[str, str]:
        return _GIT_ENV | {
            "GIT_AUTHOR_NAME": agent,
            "GIT_AUTHOR_EMAIL": f"{agent}@agents.invalid",
            "GIT_COMMITTER_NAME": "agent-ecology",
            "GIT_COMMITTER_EMAIL": "runtime@agents.invalid",
        }

    def _mktree(self, entries: dict[str, tuple[str, str, str]]) -> str:
        lines = "".join(f"{mode} {kind} {sha}\t{name}\n" for name, (mode, kind, sha) in entries.items())
        return self._run("mktree", stdin=lines.encode())

    def write(self, agent: str, aid: str, content: bytes) -> None:
        """One artifact write: two blobs, three trees, a commit and the ref."""
        now = time.time()
        meta = {"kind": "data", "creator": agent, "owner": agent, "price": 0, "readable": "public"}
        meta |= {"created": now, "updated": now, "size": len(content)}
        blob = self._run("hash-object", "-w", "--stdin", stdin=content)
        meta_blob = self._run("hash-object", "-w", "--stdin", stdin=json.dumps(meta).encode())
        levels = fanout(aid)
        paths = ["/".join(levels[:i]) for i in range(len(levels) + 1)]
        leaf = self.dirs.setdefault(paths[-1], {})
        leaf[aid] = ("100644", "blob", blob)
        leaf[f"{aid}.meta.json"] = ("100644", "blob", meta_blob)
        child = self._mktree(leaf)
        for depth in range(len(levels) - 1, -1, -1):
            parent = self.dirs.setdefault(paths[depth], {})
            parent[levels[depth]] = ("040000", "tree", child)
            child = self._mktree(parent)
        message = f"write {aid} ({len(content)} bytes)"
        commit = self._run("commit-tree", child, "-p", self.head, "-m", message, env=self._ident(agent))
        self._run("update-ref", "refs/heads/main", commit, self.head)
        self.head = commit


def _git_cli(config: list[str]) -> Callable[[Path, float], Measured]:
    def run(path: Path, duration: float) -> Measured:
        cli = GitCli(path / "cli.git", config)
        rng = random.Random(0)
        n = 0
        start = now = time.perf_counter()
        deadline = start + duration
        while now < deadline:
            cli.write(AGENTS[n % len(AGENTS)], f"new-{n}", _content(rng))
            n += 1
            now = time.perf_counter()
        measured = Measured(n, now - start)
        if _commit_count(cli.repo) != n + 1:
            raise Mismatch(f"the repository has {_commit_count(cli.repo) - 1} commits, the benchmark counted {n}")
        return measured

    return run


# ------------------------------------------------------------------------------------------- main


SYSTEMS: list[System[Measured]] = [
    System(
        "store-pipelined-new",
        f"GitStore.submit_write, new ids, two windows of {WINDOW} futures in flight (group commit)",
        True,
        _store_pipelined(rewrite=False),
        "write",
    ),
    System(
        "store-pipelined-rewrite",
        f"GitStore.submit_write, rewrites of {REWRITE_IDS:,} ids, two windows of {WINDOW} futures in flight",
        True,
        _store_pipelined(rewrite=True),
        "write",
    ),
    System(
        "store-sync-new",
        "GitStore.write, new ids, one durable write at a time",
        True,
        _store_sync(False),
        "write",
    ),
    System(
        "store-sync-rewrite",
        f"GitStore.write, rewrites of {REWRITE_IDS:,} ids, one durable write at a time",
        True,
        _store_sync(True),
        "write",
    ),
    System(
        f"store-sync-{THREADS}-threads",
        f"GitStore.write from {THREADS} threads, each waiting for its own write (callers share group commits)",
        True,
        _store_sync_threads,
        "write",
    ),
    System(
        "git-cli",
        "git CLI per write: hash-object -w ×2, mktree ×3, commit-tree, update-ref (default fsync: not durable)",
        False,
        _git_cli([]),
        "write",
    ),
    System(
        "git-cli-fsync",
        "the same git CLI commands with core.fsync=all (durable)",
        True,
        _git_cli(["-c", "core.fsync=all", "-c", "core.fsyncMethod=fsync"]),
        "write",
    ),
    System(
        "store-read",
        f"GitStore.read of random ids among {REWRITE_IDS:,}, one thread",
        True,
        _store_read,
        "read",
    ),
]


def _ratios(by: dict[str, Entry]) -> dict[str, float]:
    def r(a: str, b: str) -> float | None:
        x, y = by.get(a), by.get(b)
        return round(x.ops_per_s / y.ops_per_s, 2) if x and y and y.ops_per_s > 0 else None

    pairs = {
        "store-pipelined-new / git-cli": r("store-pipelined-new", "git-cli"),
        "store-pipelined-new / git-cli-fsync": r("store-pipelined-new", "git-cli-fsync"),
        "store-sync-new / git-cli": r("store-sync-new", "git-cli"),
        "store-sync-new / git-cli-fsync": r("store-sync-new", "git-cli-fsync"),
        f"store-sync-{THREADS}-threads / git-cli": r(f"store-sync-{THREADS}-threads", "git-cli"),
        "store-pipelined-new / store-sync-new": r("store-pipelined-new", "store-sync-new"),
    }
    return {k: v for k, v in pairs.items() if v is not None}


def print_table(entries: list[Entry]) -> None:
    """One row per system, with its speed relative to the git CLI."""
    by = {e.name: e for e in entries}
    git = by.get("git-cli")
    head = f"{'system':<24} {'kind':<6} {'ops/s':>10} {'ops':>9} {'seconds':>8} {'durable':>8} {'× git-cli':>10}"
    print()
    print(head)
    print("-" * len(head))
    for e in entries:
        ratio = f"{e.ops_per_s / git.ops_per_s:.1f}×" if git and e.kind == "write" and git.ops_per_s else "n/a"
        durable = "n/a" if e.kind == "read" else ("yes" if e.durable else "NO")
        print(f"{e.name:<24} {e.kind:<6} {e.ops_per_s:>10,.0f} {e.ops:>9,} {e.seconds:>8.2f} {durable:>8} {ratio:>10}")


def print_targets(entries: list[Entry], ratios: dict[str, float]) -> None:
    """The two targets: 5× the git CLI, and 500 durable writes per second."""
    by = {e.name: e for e in entries}
    print()
    r = ratios.get("store-pipelined-new / git-cli")
    if r is None:
        print(f"store writes vs git CLI: n/a (target ≥ {TARGET_VS_GIT:g}×)")
    else:
        verdict = "met" if r >= TARGET_VS_GIT else "NOT met"
        print(f"store writes vs git CLI: {r:.1f}× (target ≥ {TARGET_VS_GIT:g}×) — {verdict}")
    best = max((e for e in entries if e.name.startswith("store-pipelined")), key=lambda e: e.ops_per_s, default=None)
    if best is not None:
        verdict = "met" if best.ops_per_s >= TARGET_RATE else "NOT met"
        print(f"store: {best.ops_per_s:,.0f} writes/s (target ≥ {TARGET_RATE}) — {verdict} ({best.name})")
    for name in ("store-sync-new / git-cli-fsync", "store-sync-new / git-cli"):
        if name in ratios:
            print(f"one write at a time, {name}: {ratios[name]:.1f}×")
    sync = by.get("store-sync-new")
    if sync is not None:
        print(f"store-sync-new: {sync.ops_per_s:,.0f} writes/s (one caller: each write waits for its own fsyncs)")
    threaded = by.get(f"store-sync-{THREADS}-threads")
    if threaded is not None:
        print(f"store-sync-{THREADS}-threads: {threaded.ops_per_s:,.0f} writes/s (concurrent callers share commits)")
    reads = by.get("store-read")
    if reads is not None:
        print(f"store reads: {reads.ops_per_s:,.0f}/s")


def _color(e: Entry) -> str:
    if e.kind == "read":
        return "tab:purple"
    return (
        "tab:green"
        if e.name.startswith("store-pipelined")
        else "tab:blue"
        if e.name.startswith("store")
        else "tab:gray"
    )


def plot(entries: list[Entry], path: Path, title_note: str) -> None:
    """Bars of operations per second on a log scale; non-durable writes hatched; the 500/s target as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    vals = [e.ops_per_s for e in entries]
    bars = ax.bar(range(len(entries)), vals, color=[_color(e) for e in entries])
    for bar, e in zip(bars, entries, strict=True):
        if e.kind == "write" and not e.durable:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    ax.bar_label(bars, labels=[f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}" for v in vals], fontsize=9)
    ax.axhline(TARGET_RATE, color="tab:red", linestyle="--", linewidth=1, label=f"target {TARGET_RATE} writes/s")
    ax.set_yscale("log")
    ax.set_xticks(range(len(entries)), [f"{e.name}\n({e.kind})" for e in entries], rotation=15, ha="right")
    ax.set_ylabel("operations per second (log scale)")
    ax.set_title(
        f"Artifact store: {SIZE // 1024} KB artifacts, durable writes and reads per second "
        "(higher is better; hatched = not durable)\n" + title_note
    )
    ax.legend(loc="upper left")
    common.save_figure(fig, path, grid=ax, which="both")


def run(opts: Options) -> int:
    """Measure every system; print the table and targets; write the JSON and the plot.

    Returns 1 if a system failed or its repository disagreed with what was counted, else 0.
    """
    duration = QUICK_S if opts.quick else FULL_S
    mode = "quick" if opts.quick else "full"
    tmp, host = common.scratch("store", ["dulwich", "lmdb", "msgspec"])
    host["git"] = subprocess.run(["git", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    what = f"{duration:g} s per system, {SIZE:,}-byte artifacts, files in {tmp}"
    common.announce("store", opts, what, host, f"dulwich {host['packages']['dulwich']}", host["git"])
    entries: list[Entry] = []
    skipped: list[Skipped] = []
    try:
        for system, m in measure_each(SYSTEMS, tmp, duration, skipped):
            tag = f"[{system.name}]"
            e = Entry(
                name=system.name,
                ops_per_s=round(m.ops / m.seconds, 1),
                kind="read" if system.kind == "read" else "write",
                ops=m.ops,
                seconds=round(m.seconds, 3),
                durable=system.durable,
                describe=system.describe,
            )
            entries.append(e)
            checked = {"write": "verified against the repository", "read": "sizes checked"}.get(
                e.kind, "results checked"
            )
            print(f"{tag} done: {e.ops_per_s:,.0f} ops/s ({e.ops:,} in {e.seconds:.2f} s, {checked})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = _ratios({e.name: e for e in entries})
    print_table(entries)
    print_targets(entries, ratios)
    report = Report("store", mode, host, duration, SIZE, entries, ratios, skipped)
    note = f"{host['cpus_usable']} CPUs, dulwich {host['packages']['dulwich']}, {host['git']}, {mode} run"
    publish(opts.json_path, report, lambda png: plot(entries, png, note) if entries else None)
    return 1 if skipped else 0

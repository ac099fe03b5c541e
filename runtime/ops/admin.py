"""Operator commands: ``python -m runtime.admin [--config FILE | --data-dir DIR] [--postgres URL] COMMAND``.

The ledger (in PostgreSQL with ``--postgres URL``, by default ``$POSTGRES_URL`` when set; else the LMDB
ledger in the data directory):

- ``balances``: every account's holdings, and each asset's supply (minted − burned);
- ``journal [--since SEQ] [--limit N]``: the append-only journal, one operation per line (JSON);
- ``check``: the ledger's invariants; exit status 1 when one is violated;
- ``bill AGENT [--since WHEN] [--json]``: what the agent's tasks used, by resource and task kind, from the
  usage records in the journal (``WHEN``: ``90s``, ``15m``, ``2h``, ``1d`` back, or a UTC time).

Operator controls on a running supervisor, sent to its dashboard with the token it wrote at start
(``<data>/run/dashboard.token``), each an ordinary journaled event or ledger op:

- ``control pause AGENT`` / ``control resume AGENT`` (a pause outlasts a restart: the next supervisor
  replays the latest of them per agent from the event log);
- ``control grant AGENT ASSET AMOUNT`` / ``control burn AGENT ASSET AMOUNT [--reason TEXT]``;
- ``control note TEXT [--agent AGENT]``: an ``operator_note`` event;
- ``control rollback COMMIT``: roll the store back while the supervisor runs (announced at once).

The operator's tasks (``runtime.world.tasks``; the ledger's ``PostTask`` ops):

- ``task post ID --reward N --tests FILE [--max-awards K] --description TEXT``: post (or re-state) a task
  with its hidden tests — to the running supervisor as a control (agents hear ``task_posted`` at once),
  or, when none answers, into the ledger directly (the supervisor takes it up when it starts);
- ``task list``: every task, its reward, how many it paid of how many it may, and its description.

The artifact store's history, which no agent can reach (with ``--postgres URL``, default
``$POSTGRES_URL``, the PostgreSQL store; else the Git store of the data directory, which has one
writer: stop the supervisor first):

- ``history ID``: every commit that changed an artifact, newest first;
- ``show ID@COMMIT``: an artifact as it was at a commit (its bytes to stdout);
- ``rollback --to COMMIT``: a new commit whose tree is that commit's; agents see a ``system_reset``
  event when the supervisor next starts, and disk usage is recomputed from the new HEAD.

Retention, on a stopped data directory (``runtime.ops.compact``; the ``retention:`` section runs it inside
a running supervisor):

- ``compact [--horizon WHEN] [--archive-max-mb N]``: the store's history older than ``WHEN`` (default
  ``1d`` back) squashed into one commit per artifact, the journal's older entries folded into the
  ledger's checkpoint, older events archived under ``<data>/archive``. With ``--postgres URL`` (nodes
  may run meanwhile; ``WHEN`` at least a minute back): the PostgreSQL journal folded into its checkpoint
  and older events archived under ``<data>/archive`` (refused while the node with ``retention.shared``
  runs its pass over them); the store's history stays.

``repair`` (stop the supervisor first): rebuild what is derived in the data directory — the ledger from
its journal, the store's ``HEAD``, branch ref and index, the event log's cursors — charge and discard
the in-flight log, and refuse in one line what nothing can rebuild (``runtime.ops.repair``).

``--debug`` anywhere on the line: a failure shows its traceback, not only its one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import msgspec

from runtime import config as config_mod
from runtime.economy.ledger import ASSETS, Ledger
from runtime.economy.ledger.check import check
from runtime.economy.ledger.open import NoLedger, open_ledger
from runtime.errors import Damaged, Parser, report
from runtime.host.postgres import DatabaseUnavailable
from runtime.ops import bill as bill_mod
from runtime.ops import compact, dashboard, preflight
from runtime.ops import repair as repair_mod
from runtime.world.store import StoreError, check_id
from runtime.world.store.open import open_store
from runtime.world.tasks import post_tasks


def _balances(ledger: Ledger) -> int:
    balances = ledger.balances()
    kinds = ledger.accounts()
    print(f"{'account':<14} {'kind':<7}" + "".join(f"{a:>16}" for a in ASSETS))
    for account in sorted(kinds, key=lambda a: (kinds[a] != "system", a)):
        held = balances.get(account, {})
        print(f"{account:<14} {kinds[account]:<7}" + "".join(f"{held.get(a, 0):>16}" for a in ASSETS))
    supply = ledger.supply()
    print(f"{'supply':<22}" + "".join(f"{supply.get(a, (0, 0))[0] - supply.get(a, (0, 0))[1]:>16}" for a in ASSETS))
    return 0


def _journal(ledger: Ledger, since: int, limit: int | None) -> int:
    out = sys.stdout.buffer
    for n, entry in enumerate(ledger.journal(since)):
        if limit is not None and n >= limit:
            break
        out.write(msgspec.json.encode(entry) + b"\n")
    out.flush()
    return 0


def _check(ledger: Ledger) -> int:
    report = check(ledger, ledger.checkpoint())
    print(f"{report.accounts} accounts, {report.journal_entries} journal entries, {report.usage_records} usage records")
    for problem in report.problems:
        print(f"VIOLATION: {problem}")
    print("all invariants hold" if report.ok else f"{len(report.problems)} violation(s)")
    return 0 if report.ok else 1


def _bill(ledger: Ledger, agent: str, since: str | None, as_json: bool) -> int:
    if agent not in ledger.accounts():
        report(f"no account {agent!r} in the ledger")
        return 2
    try:
        start = bill_mod.parse_since(since, time.time()) if since is not None else 0.0
    except ValueError as exc:
        report(str(exc))
        return 2
    b = bill_mod.bill(agent, ledger.journal(), start)
    if as_json:
        sys.stdout.buffer.write(msgspec.json.encode(b) + b"\n")
    else:
        print(bill_mod.render(b))
    return 0


def _control(data: Path, args: argparse.Namespace) -> int:
    ctl: dashboard.Control
    match args.action:
        case "pause":
            ctl = dashboard.Pause(args.agent)
        case "resume":
            ctl = dashboard.Resume(args.agent)
        case "grant":
            ctl = dashboard.Grant(args.agent, args.asset, args.amount, args.reason or "operator grant")
        case "burn":
            ctl = dashboard.BurnAsset(args.agent, args.asset, args.amount, args.reason or "operator burn")
        case "note":
            ctl = dashboard.Inject(args.text, args.agent)
        case _:
            ctl = dashboard.Rollback(args.commit)
    try:
        print(dashboard.send(data / "run", ctl))
    except dashboard.ControlRefused as exc:
        report(f"{exc.message}")
        return 1
    return 0


def _task_post(data: Path, postgres_url: str | None, args: argparse.Namespace) -> int:
    try:
        tests = Path(args.tests).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: --tests {args.tests}: {exc} (give a readable UTF-8 Python file)", file=sys.stderr)
        return 2
    fields = {"id": args.id, "description": args.description, "reward": args.reward, "max_awards": args.max_awards}
    try:
        task = msgspec.convert({**fields, "tests": tests}, config_mod.TaskConfig)
    except msgspec.ValidationError as exc:
        print(f"error: task {args.id!r}: {exc} (see `task post --help`)", file=sys.stderr)
        return 2
    try:
        print(dashboard.send(data / "run", dashboard.PostTaskControl(task)))
        return 0
    except dashboard.NotRunning:
        pass  # no supervisor answers: into the ledger it starts from
    except dashboard.ControlRefused as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    ledger = open_ledger(data, postgres_url, create=False)
    try:
        post_tasks(ledger, [task])
    finally:
        ledger.close()
    print(f"posted task {task.id} into the ledger: {task.reward} scrip, at most {task.max_awards} award(s)")
    return 0


def _task_list(ledger: Ledger) -> int:
    print(f"{'task':<20} {'reward':>8} {'paid':>9}  description")
    for state in ledger.tasks():
        post = state.post
        paid = f"{len(state.awarded)}/{post.max_awards}"
        print(f"{post.task:<20} {post.reward:>8} {paid:>9}  {post.description or '(from the configuration)'}")
    return 0


def _store_command(data: Path, postgres_url: str | None, args: argparse.Namespace) -> int:
    try:
        store = open_store(data, postgres_url, create=False)
    except DatabaseUnavailable as exc:
        report(str(exc))
        return 2
    except StoreError as exc:
        hint = " (stop the supervisor first: the store has one writer)" if exc.code == "closed" else ""
        report(f"{exc.message}{hint}")
        return 2
    try:
        if args.command == "history":
            for e in store.history(check_id(args.id)):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time))
                print(f"{e.commit}  {when}Z  {e.author:<16} {e.action:<6} {e.size:>10} B")
            return 0
        if args.command == "show":
            aid, sep, commit = args.target.partition("@")
            if not sep or not commit:
                report(f"expected ID@COMMIT, got {args.target!r}")
                return 2
            art = store.show(check_id(aid), commit)
            print(f"# {art.id} at {commit}: {art.kind}, owner {art.owner}, {art.size} B", file=sys.stderr)
            sys.stdout.buffer.write(art.content)
            return 0
        new = store.rollback(args.to, operator="operator")
        print(f"rolled back to {args.to}: new HEAD {new}; usage now {store.usage()}")
        return 0
    except StoreError as exc:  # what the operator asked for does not exist or is malformed: bad input
        report(str(exc))
        return 2 if exc.code in ("invalid", "invalid_id", "not_found") else 1
    finally:
        store.close()


def _repair(data: Path, postgres_url: str | None) -> int:
    if postgres_url:
        report(
            "repair: the data directory's stores only (PostgreSQL is repaired by its own tools; unset $POSTGRES_URL)"
        )
        return 2
    if not data.is_dir():
        report(f"repair: no data directory at {data} (give the one the supervisor ran with)")
        return 2
    claim = preflight.claim_data_dir(data)  # no supervisor may run while its files are rewritten
    try:
        repair_mod.repair(data, print)
    except Damaged as exc:
        report(f"repair: {exc}")
        return 1
    finally:
        os.close(claim)
    print(f"repaired {data}: what is derived is rebuilt, and the rest read whole")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = Parser(prog="python -m runtime.admin", description=(__doc__ or "").splitlines()[0])
    config_mod.add_data_dir_options(ap)
    ap.add_argument(
        "--postgres",
        metavar="URL",
        default=os.environ.get("POSTGRES_URL") or None,
        help="the shared PostgreSQL database, as its operator (default: $POSTGRES_URL when set, "
        "else the LMDB ledger and the Git store in the data directory)",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("balances", help="holdings of every account and the supply of each asset")
    j = sub.add_parser("journal", help="the journal, one JSON operation per line")
    j.add_argument("--since", type=int, default=0, metavar="SEQ", help="entries after this sequence number")
    j.add_argument("--limit", type=int, metavar="N", help="at most N entries")
    sub.add_parser("check", help="check every invariant (exit 1 on a violation)")
    b = sub.add_parser("bill", help="one agent's usage by resource and task kind")
    b.add_argument("agent")
    b.add_argument("--since", metavar="WHEN", help="only usage from then on: 90s, 15m, 2h, 1d back, or a UTC time")
    b.add_argument("--json", action="store_true", help="the bill as JSON")
    c = sub.add_parser("control", help="an operator control on the running supervisor").add_subparsers(
        dest="action", required=True
    )
    for action in ("pause", "resume"):
        c.add_parser(action, help=f"{action} an agent").add_argument("agent")
    for action in ("grant", "burn"):
        g = c.add_parser(action, help=f"{'mint' if action == 'grant' else 'burn'} an asset of an agent's")
        g.add_argument("agent")
        g.add_argument("asset", choices=ASSETS)
        g.add_argument("amount", type=int)
        g.add_argument("--reason", help="journaled with the op")
    n = c.add_parser("note", help="an operator_note event")
    n.add_argument("text")
    n.add_argument("--agent", help="to this agent (default: everyone)")
    c.add_parser("rollback", help="roll the store back while the supervisor runs").add_argument("commit")
    t = sub.add_parser("task", help="the operator's tasks").add_subparsers(dest="action", required=True)
    tp = t.add_parser("post", help="post (or re-state) a task with its hidden tests")
    tp.add_argument("id", help="the task's id: lowercase letters, digits, - and _")
    tp.add_argument("--reward", type=int, required=True, metavar="N", help="scrip minted to each solver")
    tp.add_argument("--tests", required=True, metavar="FILE", help="Python run after the submission; raise to fail")
    tp.add_argument("--max-awards", type=int, default=1, metavar="K", help="at most K agents are paid (default 1)")
    tp.add_argument("--description", required=True, help="what agents are told (200 characters at most)")
    t.add_parser("list", help="every task and what it paid")
    h = sub.add_parser("history", help="the commits that changed an artifact")
    h.add_argument("id")
    s = sub.add_parser("show", help="an artifact as it was at a commit")
    s.add_argument("target", metavar="ID@COMMIT")
    r = sub.add_parser("rollback", help="reset the store to a commit (as a new commit)")
    r.add_argument("--to", required=True, metavar="COMMIT")
    k = sub.add_parser("compact", help="squash old store history, fold the old journal, archive old events")
    k.add_argument(
        "--horizon", default="1d", metavar="WHEN", help="what is older goes: 90s, 15m, 2h, 1d back, or a UTC time"
    )
    k.add_argument("--archive-max-mb", type=int, default=1024, metavar="N", help="archived events kept, newest first")
    rp = sub.add_parser("repair", help="rebuild what is derived in the data directory; refuse what cannot be")
    rp.add_argument("--data-dir", default=argparse.SUPPRESS, help="the data directory (also before the command)")
    args = ap.parse_args(argv)
    try:
        data = config_mod.data_dir_of(args.data_dir, args.config)
    except config_mod.ConfigError as exc:
        report(str(exc))
        return 2
    if args.command == "repair":
        return _repair(data, args.postgres)
    if args.command == "control":
        return _control(data, args)
    if args.command == "compact":
        return compact.command(data, args.horizon, args.archive_max_mb, args.postgres)
    if args.command == "task" and args.action == "post":
        try:
            return _task_post(data, args.postgres, args)
        except (NoLedger, DatabaseUnavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command in ("history", "show", "rollback"):
        return _store_command(data, args.postgres, args)
    try:
        ledger = open_ledger(data, args.postgres, create=False)
    except (NoLedger, DatabaseUnavailable) as exc:
        report(str(exc))
        return 2
    try:
        if args.command == "balances":
            return _balances(ledger)
        if args.command == "journal":
            return _journal(ledger, args.since, args.limit)
        if args.command == "bill":
            return _bill(ledger, args.agent, args.since, args.json)
        if args.command == "task":
            return _task_list(ledger)
        return _check(ledger)
    finally:
        ledger.close()


if __name__ == "__main__":
    sys.exit(main())

"""The artifact store on real repositories: ids, ownership, quota, history and rollback, a 10,000-operation
workload checked with the git CLI, SIGKILL, and a stale index.

Every repository lives in ``tmp_path``. What the store claims is checked against Git itself wherever it
can be: ``git fsck --strict``, ``git log``, ``git ls-tree`` and ``git cat-file`` run on the bare repository.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest

from runtime.world.store import (
    Artifact,
    ArtifactInfo,
    Kind,
    Readable,
    Store,
    StoreError,
    WriteReceipt,
    check_id,
    verify,
)
from runtime.world.store.git import GitStore
from tests.crash import kill_mid_write, live_children
from tests.harness import ROOT
from tests.integration.store_backends import (
    BACKENDS,
    Backend,
    GitBackend,
    PostgresBackend,
    assert_fsck,
    git,
    git_head,
    usage_by_git,
)
from tests.integration.store_crash_writer import agent_for, content_for, version_of
from tests.services import ADMIN_URL

Make = Callable[..., GitStore]
BIG = 1 << 40  # a quota that never binds


@pytest.fixture(params=sorted(BACKENDS))
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn (tests taking it run on Git and on PostgreSQL); stores closed afterwards."""
    backend = BACKENDS[request.param](tmp_path)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def store(store_backend: Backend) -> Any:
    """A fresh store of the backend under test."""
    return store_backend.open()


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Make]:
    """``make(name="store", **options)``: a GitStore at ``tmp_path/<name>.git``, closed after the test."""
    backend = GitBackend(tmp_path)
    yield backend.open
    backend.close()


@pytest.fixture
def git_store(make_store: Make) -> GitStore:
    """A fresh durable Git store (for the tests of what only the Git backend has)."""
    return make_store()


def code_of(call: Callable[[], object]) -> tuple[str, str]:
    """Run ``call``, which must raise ``StoreError``; return (code, message)."""
    with pytest.raises(StoreError) as err:
        call()
    return err.value.code, str(err.value)


# --------------------------------------------------------------------------------------------- ids

BAD_IDS: list[tuple[object, str]] = [
    ("", "artifact id is empty"),
    (b"", "artifact id is empty"),
    ("a" * 129, "too long (129 > 128 characters)"),
    ("../x", "path traversal"),
    ("a/b", "path traversal"),
    ("..", "path traversal"),
    (".", "path traversal"),
    ("a\\b", "path traversal"),
    (b"\xff\xfeab", "not UTF-8 (byte 0xff at position 0)"),
    (b"ab\xc3", "not UTF-8 (byte 0xc3 at position 2)"),
    ("a b", "bad character ' ' at position 1"),
    ("-lead", "bad character '-' at position 0"),
    ("_lead", "bad character '_' at position 0"),
    ("x.meta.json", "bad character '.' at position 1"),
    ("caf\u00e9", "bad character 'é' at position 3"),
    ("nul\x00", "bad character '\\x00' at position 3"),
    ("a\nb", "bad character '\\n' at position 1"),
    (42, "must be a string, not int"),
]


@pytest.mark.parametrize(("raw", "words"), BAD_IDS, ids=[repr(r)[:24] for r, _ in BAD_IDS])
def test_check_id_refuses_bad_ids_saying_what_is_wrong(raw: Any, words: str) -> None:
    code, message = code_of(lambda: check_id(raw))
    assert code == "invalid_id"
    assert words in message, message


@pytest.mark.parametrize("raw", ["a", "Z", "0", "A-b_9", "x" * 128, b"bytes-ok", "9lives"])
def test_check_id_accepts_good_ids(raw: str | bytes) -> None:
    assert check_id(raw) == (raw.decode() if isinstance(raw, bytes) else raw)


def test_every_store_call_refuses_bad_ids_and_writes_nothing(store: Any, store_backend: Backend) -> None:
    store.write("alice", "ok", b"x", quota=BIG)
    head = store.head()
    calls: list[Callable[[str], object]] = [
        lambda i: store.write("alice", i, b"data", quota=BIG),
        lambda i: store.submit_write("alice", i, b"data", quota=BIG).result(timeout=10),
        lambda i: store.delete("alice", i),
        lambda i: store.read("alice", i),
        lambda i: store.history(i),
        lambda i: store.show(i, head),
    ]
    for raw, words in [("../etc/passwd", "path traversal"), ("", "empty"), ("a" * 200, "too long (200 > 128")]:
        for call in calls:
            code, message = code_of(functools.partial(call, raw))
            assert code == "invalid_id" and words in message, message
    assert store.head() == head == store_backend.head(store)


def test_msgspec_refuses_bad_kind_price_and_id() -> None:
    good = {
        "id": "a1",
        "kind": "code",
        "creator": "alice",
        "owner": "alice",
        "price": 3,
        "readable": "owner",
        "created": 1.0,
        "updated": 2.0,
        "size": 2,
        "content": "aGk=",
    }
    art = msgspec.convert(good, Artifact)
    assert art.content == b"hi" and art.price == 3
    assert msgspec.convert({k: v for k, v in good.items() if k != "content"}, ArtifactInfo) == art.info()
    for field, value in [
        ("kind", "exe"),
        ("kind", 1),
        ("price", -1),
        ("price", "5"),
        ("price", 1.5),
        ("price", 1 << 63),
        ("readable", "everyone"),
        ("id", "../x"),
        ("id", ""),
        ("owner", "Alice B"),
        ("size", -1),
    ]:
        with pytest.raises(msgspec.ValidationError) as err:
            msgspec.convert({**good, field: value}, Artifact)
        assert f"$.{field}" in str(err.value), str(err.value)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**good, "extra": 1}, Artifact)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"kind": "exe"}, "kind must be one of data, code"),
        ({"price": -1}, "price must be an integer >= 0"),
        ({"price": 1.5}, "price must be an integer"),
        ({"price": True}, "price must be an integer"),
        ({"price": 1 << 63}, "at most"),
        ({"readable": "everyone"}, "readable must be public, owner, allow:<agent>+<agent>"),
        ({"quota": -5}, "quota must be an integer >= 0"),
        ({"agent": "Alice B"}, "agent 'Alice B' is not a valid name"),
        ({"content": "text, not bytes"}, "content must be bytes, not str"),
    ],
)
def test_the_store_refuses_bad_fields_and_writes_nothing(
    store: Any, store_backend: Backend, kwargs: dict[str, Any], words: str
) -> None:
    store.write("alice", "a1", b"before", quota=BIG)
    head, usage = store.head(), store.usage()
    args: dict[str, Any] = {"agent": "alice", "id": "a1", "content": b"after", "quota": BIG, **kwargs}
    code, message = code_of(lambda: store.write(**args))
    assert code == "invalid" and words in message, message
    assert store.head() == head == store_backend.head(store)
    assert store.usage() == usage and store.read("alice", "a1").content == b"before"


# ------------------------------------------------------------------------------ basic semantics


def test_a_new_store_is_one_empty_commit(store: Any, store_backend: Backend) -> None:
    assert store.list("alice") == [] and store.usage() == {} and store.owned_bytes("alice") == 0
    assert store_backend.log(store) == [(store.head(), "agent-ecology", "create artifact store")]
    assert store.head() == store_backend.head(store)
    last = store.last_commit()
    assert (last.commit, last.action, last.author, last.id) == (store.head(), "create", "agent-ecology", None)
    assert verify(store) == []
    store_backend.check(store)


def test_a_new_git_store_is_a_bare_repository(git_store: GitStore) -> None:
    store = git_store
    log = git(store.path, "log", "--format=%an|%cn <%ce>|%s").stdout.decode().splitlines()
    assert log == ["agent-ecology|agent-ecology <runtime@agents.invalid>|create artifact store"]
    assert git(store.path, "symbolic-ref", "HEAD").stdout.decode().strip() == "refs/heads/main"
    assert git(store.path, "rev-parse", "--is-bare-repository").stdout.decode().strip() == "true"
    assert_fsck(store.path)


def test_write_rewrite_and_metadata(store: Any, store_backend: Backend) -> None:
    s: Store = store  # the backend satisfies the protocol the runtime uses
    r1 = s.write("alice", "doc", b"hello", kind="data", price=0, quota=BIG)
    assert (r1.id, r1.created, r1.size, r1.owned_bytes) == ("doc", True, 5, 5)
    first = s.read("bob", "doc")
    assert first.content == b"hello" and first.creator == first.owner == "alice" and first.created == first.updated
    time.sleep(0.01)
    r2 = s.write("alice", "doc", b"print('hi')", kind="code", price=7, readable="public", quota=BIG)
    assert (r2.created, r2.size, r2.owned_bytes) == (False, 11, 11)
    second = s.read("bob", "doc")
    assert (second.kind, second.price, second.content) == ("code", 7, b"print('hi')")
    assert second.created == first.created and second.updated > first.updated
    assert s.list("bob") == [second.info()]
    # One commit per write, authored by the agent, in order.
    assert store_backend.log(store)[1:] == [
        (r1.commit, "alice", "write doc (5 bytes)"),
        (r2.commit, "alice", "write doc (11 bytes)"),
    ]
    assert s.head() == r2.commit == store_backend.head(store)
    assert verify(s) == []
    store_backend.check(store)


def test_the_reads_for_the_event_loop_agree_with_the_synchronous_ones(store: Any, store_backend: Backend) -> None:
    for aid, owner, readable in (("b-pub", "bob", "public"), ("a-pub", "alice", "public"), ("a-own", "alice", "owner")):
        store.write(owner, aid, aid.encode(), readable=readable, quota=BIG)

    async def body() -> None:
        for agent in ("alice", "bob", "carol"):
            assert await store.list_async(agent) == store.list(agent)
            for limit in (1, 2, 5):  # the Git store's scan stops at the limit
                assert await store.list_async(agent, limit) == store.list(agent)[:limit]
        assert await store.read_async("alice", "a-own") == store.read("alice", "a-own")
        with pytest.raises(StoreError) as err:
            await store.read_async("bob", "a-own")  # owner-only: it does not exist for bob
        assert err.value.code == "not_found"
        with pytest.raises(StoreError) as err:
            await store.read_async("bob", "../x")
        assert err.value.code == "invalid_id"
        # A write and a delete are seen by the next listing.
        store.write("bob", "b-two", b"2", quota=BIG)
        store.delete("alice", "a-pub")
        assert [i.id for i in await store.list_async("carol")] == ["b-pub", "b-two"]
        assert await store.list_async("alice") == store.list("alice")

    asyncio.run(body())


def test_git_commits_chain_and_carry_the_metadata_beside_the_content(git_store: GitStore) -> None:
    store = git_store
    r1 = store.write("alice", "doc", b"hello", kind="data", price=0, quota=BIG)
    r2 = store.write("alice", "doc", b"print('hi')", kind="code", price=7, readable="public", quota=BIG)
    # Authored by the agent, committed by the runtime, parent = previous commit.
    log = git(store.path, "log", "--format=%H|%P|%an <%ae>|%cn <%ce>|%s").stdout.decode().splitlines()
    assert [line.split("|")[0] for line in log[:2]] == [r2.commit, r1.commit]
    assert log[0].split("|")[1] == r1.commit
    assert log[0].split("|")[2:] == [
        "alice <alice@agents.invalid>",
        "agent-ecology <runtime@agents.invalid>",
        "write doc (11 bytes)",
    ]
    # The metadata travels with the content: a blob beside it, at a fanned-out path.
    paths = sorted(git(store.path, "ls-tree", "-r", "--name-only", "HEAD").stdout.decode().split())
    assert len(paths) == 2 and paths[1] == paths[0] + ".meta.json" and paths[0].endswith("/doc")
    assert all(len(p.split("/")) == 3 and all(len(d) == 1 for d in p.split("/")[:2]) for p in paths)
    meta = json.loads(git(store.path, "show", f"HEAD:{paths[1]}").stdout)
    assert meta | {"created": 0, "updated": 0} == {
        "kind": "code",
        "creator": "alice",
        "owner": "alice",
        "price": 7,
        "readable": "public",
        "created": 0,
        "updated": 0,
        "size": 11,
    }
    assert verify(store) == []
    assert_fsck(store.path)


def test_empty_content_and_large_content(store: Any, store_backend: Backend) -> None:
    store.write("alice", "empty", b"", quota=BIG)
    big = os.urandom(3 << 20)
    store.write("alice", "big", big, quota=BIG)
    assert store.read("bob", "empty").content == b""
    assert store.read("bob", "big").content == big
    assert store.owned_bytes("alice") == len(big)
    assert verify(store) == [] and store_backend.usage(store) == {"alice": len(big)}
    store_backend.check(store)


def test_no_agent_call_returns_an_overwritten_version_but_the_operator_can(store: Any, store_backend: Backend) -> None:
    v1, v2 = b"version one, the longer one", b"v2"
    c1 = store.write("alice", "doc", v1, price=1, quota=BIG).commit
    store.write("alice", "later", b"created after v1", quota=BIG)
    c2 = store.write("alice", "doc", v2, price=2, quota=BIG).commit
    # Agent-facing calls: only HEAD.
    for who in ("alice", "bob"):
        assert store.read(who, "doc").content == v2
        listed = {a.id: a for a in store.list(who)}
        assert listed["doc"].size == len(v2) and listed["doc"].price == 2
        assert all(not isinstance(a, Artifact) for a in listed.values())  # no content in listings
    assert store.owned_bytes("alice") == len(v2) + len(b"created after v1")
    # Operator calls: history and the old version.
    hist = store.history("doc")
    assert [(h.commit, h.action, h.author, h.size) for h in hist] == [
        (c2, "write", "alice", len(v2)),
        (c1, "write", "alice", len(v1)),
    ]
    old = store.show("doc", c1)
    assert (old.content, old.price, old.size) == (v1, 1, len(v1))
    if isinstance(store, GitStore):
        assert store.show("doc", c1[:10]) == old  # a unique prefix names a commit too
    assert code_of(lambda: store.show("later", c1))[0] == "not_found"
    # Rollback: a new commit, by the operator, that restores c1's state.
    before = store.head()
    reset = store.rollback(c1, operator="ops")
    assert reset != c1 and store.head() == reset == store_backend.head(store)
    assert store.read("bob", "doc").content == v1 and store.read("bob", "doc").price == 1
    assert code_of(lambda: store.read("alice", "later"))[0] == "not_found"
    assert store.usage() == {"alice": len(v1)} == store_backend.usage(store)
    assert store_backend.log(store)[-1] == (reset, "ops", f"system reset to {c1}")
    if isinstance(store, GitStore):
        line = git(store.path, "log", "-1", "--format=%P|%an|%cn|%s").stdout.decode().strip()
        assert line == f"{before}|ops|agent-ecology|system reset to {c1}"
        tree = git(store.path, "rev-parse", f"{c1}^{{tree}}", "HEAD^{tree}").stdout.decode().split()
        assert tree[0] == tree[1]
    assert store.history("doc")[0].action == "reset" and store.history("doc")[0].author == "ops"
    assert store.history("later")[0].action == "reset" and store.history("later")[0].size == 0
    # Writing after a rollback continues the chain; rolling forward again is another reset.
    store.write("alice", "doc", b"v3", quota=BIG)
    store.rollback(c2)
    assert store.read("bob", "doc").content == v2 and store.read("bob", "later").content == b"created after v1"
    assert verify(store) == [] and store.usage() == store_backend.usage(store)
    store_backend.check(store)


def test_rollback_and_show_refuse_unknown_commits(store: Any, store_backend: Backend) -> None:
    store.write("alice", "doc", b"x", quota=BIG)
    head = store.head()
    assert code_of(lambda: store.rollback("not-a-sha"))[0] == "invalid"
    assert code_of(lambda: store.rollback("0" * 40))[0] == "not_found"
    assert code_of(lambda: store.show("doc", "abc"))[0] == "invalid"  # shorter than 4 digits
    assert code_of(lambda: store.rollback(head, operator="Not Valid"))[0] == "invalid"
    if isinstance(store, GitStore):
        # A commit outside HEAD's history (here: a dangling one made with the git CLI) is not a target.
        tree = git(store.path, "rev-parse", "HEAD^{tree}").stdout.decode().strip()
        stray = git(store.path, "commit-tree", tree, "-m", "stray", "-p", head).stdout.decode().strip()
    else:
        stray = str(int(head) + 1)  # a commit that does not exist (yet)
    assert stray and code_of(lambda: store.rollback(stray))[0] == "not_found"
    assert code_of(lambda: store.show("doc", stray))[0] == "not_found"
    assert store.head() == head == store_backend.head(store)


def test_history_lists_writes_deletes_and_resets_newest_first(store: Any) -> None:
    c1 = store.write("alice", "doc", b"one", quota=BIG).commit
    store.write("bob", "other", b"unrelated", quota=BIG)
    c2 = store.write("alice", "doc", b"two!", quota=BIG).commit
    c3 = store.delete("alice", "doc")
    # Deleted ids are free again: the first writer after the delete owns it.
    c4 = store.write("bob", "doc", b"bob's", quota=BIG).commit
    c5 = store.rollback(c2, operator="admin")
    got = [(h.commit, h.action, h.author, h.size) for h in store.history("doc")]
    assert got == [
        (c5, "reset", "admin", 4),
        (c4, "write", "bob", 5),
        (c3, "delete", "alice", 0),
        (c2, "write", "alice", 4),
        (c1, "write", "alice", 3),
    ]
    assert all(h.time > 0 for h in store.history("doc"))
    assert store.read("bob", "doc").owner == "alice"
    assert store.history("never") == []
    last = store.last_commit()
    assert (last.commit, last.author, last.action, last.id) == (c5, "admin", "reset", None)
    assert last.subject == f"system reset to {c2}"
    c6 = store.delete("alice", "doc")
    assert (store.last_commit().commit, store.last_commit().action, store.last_commit().id) == (c6, "delete", "doc")


# ------------------------------------------------------------------------------------ ownership


def test_first_writer_wins_and_others_change_nothing(store: Any, store_backend: Backend) -> None:
    store.write("alice", "mine", b"alice's", quota=BIG)
    store.write("alice", "hidden", b"secret", readable="owner", quota=BIG)
    head, usage = store.head(), store.usage()
    assert code_of(lambda: store.write("bob", "mine", b"bob's", quota=BIG)) == (
        "forbidden",
        "forbidden: artifact id `mine` is taken by another agent",
    )
    assert code_of(lambda: store.write("bob", "hidden", b"bob's", quota=BIG))[0] == "forbidden"
    assert code_of(lambda: store.delete("bob", "mine"))[0] == "forbidden"
    # An owner-only artifact does not exist for others: not found, whatever they try to read or delete.
    for call in (lambda: store.read("bob", "hidden"), lambda: store.delete("bob", "hidden")):
        code, message = code_of(call)
        assert (code, message) == ("not_found", "not_found: no artifact `hidden`")
    assert code_of(lambda: store.read("bob", "ghost")) == ("not_found", "not_found: no artifact `ghost`")
    assert code_of(lambda: store.delete("alice", "ghost"))[0] == "not_found"
    assert [a.id for a in store.list("bob")] == ["mine"]
    assert [a.id for a in store.list("alice")] == ["hidden", "mine"]
    assert store.read("alice", "hidden").content == b"secret"
    assert store.head() == head == store_backend.head(store) and store.usage() == usage
    # The owner can change readability, price and kind; the creator stays.
    store.write("alice", "hidden", b"now public", readable="public", kind="code", price=4, quota=BIG)
    art = store.read("bob", "hidden")
    assert (art.readable, art.kind, art.price, art.creator) == ("public", "code", 4, "alice")
    assert verify(store) == []


def test_policies_other_than_owner_only_are_visible_and_kept_as_written(store: Any, store_backend: Backend) -> None:
    """The store hides owner-only artifacts alone; the other policies are enforced by the world
    (``runtime.world.access``), so the store shows them to everyone and returns them as written."""
    policies = ["allow:bob+carol", "price:5", "contract:gate"]
    for i, policy in enumerate(policies):
        store.write("alice", f"p{i}", b"x", readable=policy, quota=BIG)
    store.write("alice", "hidden", b"secret", readable="owner", quota=BIG)
    assert [a.readable for a in store.list("dave")] == policies
    assert [store.read("dave", f"p{i}").readable for i in range(3)] == policies
    assert code_of(lambda: store.read("dave", "hidden"))[0] == "not_found"
    assert verify(store) == []


def test_checks_see_earlier_operations_of_the_same_batch(store: Any, store_backend: Backend) -> None:
    """Hold the writer on its first batch while the next operations queue up, so they form one batch."""
    hold = store.hold()
    first = store.submit_write("alice", "warm", b"x", quota=BIG)
    assert hold.waiting.wait(10)  # the writer has taken `first` and waits
    futs: list[Future[Any]] = [
        store.submit_write("alice", "race", b"alice first", quota=100),
        store.submit_write("bob", "race", b"bob second", quota=100),  # forbidden: alice's, same batch
        store.submit_write("alice", "fill", b"y" * 80, quota=100),  # 1 + 11 + 80 = 92 <= 100
        store.submit_write("alice", "over", b"z" * 10, quota=100),  # 102 > 100: refused
        store.submit_delete("alice", "fill"),  # gives 80 back
        store.submit_write("alice", "over", b"z" * 10, quota=100),  # now fits
        store.submit_delete("bob", "race"),  # forbidden
    ]
    hold.release()
    first.result(timeout=10)
    outcomes = [f.exception(timeout=10) for f in futs]
    assert hold.sizes == [1, len(futs)]
    codes = [e.code if isinstance(e, StoreError) else None for e in outcomes]
    assert codes == [None, "forbidden", None, "quota_exceeded", None, None, "forbidden"]
    assert store.read("bob", "race").content == b"alice first"
    assert store.usage() == {"alice": 1 + 11 + 10} == store_backend.usage(store)
    # One commit per accepted operation of the second batch, in submission order.
    subjects = [subject for _, _, subject in store_backend.log(store)]
    assert subjects == [
        "create artifact store",
        "write warm (1 bytes)",
        "write race (11 bytes)",
        "write fill (80 bytes)",
        "delete fill",
        "write over (10 bytes)",
    ]
    assert verify(store) == []
    store_backend.check(store)


# ---------------------------------------------------------------------------------------- quota


def test_quota_refuses_and_gives_back(store: Any, store_backend: Backend) -> None:
    store.write("alice", "a", b"a" * 600, quota=1000)
    head = store.head()
    code, message = code_of(lambda: store.write("alice", "b", b"b" * 500, quota=1000))
    assert code == "quota_exceeded"
    assert "owns 600 bytes" in message and "make it 1100" in message and "quota of 1000" in message
    assert store.head() == head == store_backend.head(store)
    assert store.owned_bytes("alice") == 600 and code_of(lambda: store.read("alice", "b"))[0] == "not_found"
    # Growing an existing artifact over the quota is refused too.
    assert code_of(lambda: store.write("alice", "a", b"a" * 1001, quota=1000))[0] == "quota_exceeded"
    # Shrinking gives bytes back...
    assert store.write("alice", "a", b"a" * 100, quota=1000).owned_bytes == 100
    assert store.write("alice", "b", b"b" * 500, quota=1000).owned_bytes == 600
    # ...and so does deleting: what did not fit before fits after.
    assert code_of(lambda: store.write("alice", "c", b"c" * 450, quota=1000))[0] == "quota_exceeded"
    store.delete("alice", "b")
    assert store.owned_bytes("alice") == 100
    assert store.write("alice", "c", b"c" * 450, quota=1000).owned_bytes == 550
    # Exactly at the quota is allowed; quotas are per agent.
    assert store.write("alice", "d", b"d" * 450, quota=1000).owned_bytes == 1000
    assert store.write("bob", "e", b"e" * 1000, quota=1000).owned_bytes == 1000
    # An agent above a lowered quota may still shrink, but not grow.
    assert store.write("alice", "d", b"d" * 400, quota=10).owned_bytes == 950
    assert code_of(lambda: store.write("alice", "d", b"d" * 401, quota=10))[0] == "quota_exceeded"
    assert store.usage() == {"alice": 950, "bob": 1000} == store_backend.usage(store)
    store.delete("bob", "e")
    assert store.usage() == {"alice": 950}
    assert verify(store) == []


# ------------------------------------------------------------------------------- the big workload


class Model:
    """What the store should hold, kept by the test: the same rules, applied independently."""

    def __init__(self) -> None:
        self.arts: dict[str, tuple[str, bytes, str]] = {}  # id -> (owner, content, readable)
        self.usage: dict[str, int] = {}

    def write(self, agent: str, aid: str, content: bytes, readable: str, quota: int) -> str | None:
        old = self.arts.get(aid)
        if old is not None and old[0] != agent:
            return "forbidden"
        before = self.usage.get(agent, 0)
        after = before - (len(old[1]) if old else 0) + len(content)
        if after > before and after > quota:
            return "quota_exceeded"
        self.arts[aid] = (agent, content, readable)
        self.usage[agent] = after
        return None

    def delete(self, agent: str, aid: str) -> str | None:
        old = self.arts.get(aid)
        if old is None or (old[0] != agent and old[2] == "owner"):
            return "not_found"
        if old[0] != agent:
            return "forbidden"
        del self.arts[aid]
        self.usage[agent] -= len(old[1])
        return None


@pytest.mark.slow
def test_ten_thousand_operations_by_fifty_agents(store: Any, store_backend: Backend) -> None:
    rng = random.Random(20261201)
    agents = [f"agent{i:02d}" for i in range(50)]
    quota = 40_000
    model = Model()
    owned: dict[str, list[str]] = {a: [] for a in agents}
    # (kind, agent, id, future, expected error, message of the commit it makes)
    plan: list[tuple[str, str, str, Future[Any], str | None, str]] = []
    n_ids = 0
    for _ in range(10_000):
        agent = rng.choice(agents)
        roll = rng.random()
        mine = owned[agent]
        if roll < 0.10 and mine:  # delete one of mine
            aid = mine.pop(rng.randrange(len(mine)))
            expected = model.delete(agent, aid)
            plan.append(("delete", agent, aid, store.submit_delete(agent, aid), expected, f"delete {aid}"))
            continue
        readable: Readable = "owner" if rng.random() < 0.2 else "public"
        kind: Kind = rng.choice(["data", "code"])
        if roll < 0.15:  # someone else's id, or a hidden one: refused without a commit
            aid = rng.choice(list(model.arts)) if model.arts else "none"
        elif roll < 0.55 and mine:  # rewrite: grow or shrink
            aid = rng.choice(mine)
        else:
            aid = f"art-{n_ids}"
            n_ids += 1
        content = rng.randbytes(rng.choice([0, rng.randint(1, 300), rng.randint(300, 3000)]))
        expected = model.write(agent, aid, content, readable, quota)
        if expected is None and aid not in mine:
            mine.append(aid)
        fut = store.submit_write(agent, aid, content, readable=readable, kind=kind, quota=quota)
        plan.append(("write", agent, aid, fut, expected, f"write {aid} ({len(content)} bytes)"))
    commits: list[tuple[str, str, str]] = []  # (commit, author, subject) of every successful operation
    codes: dict[str | None, int] = {}
    for op, agent, aid, fut, expected, subject in plan:
        exc = fut.exception(timeout=120)
        got = exc.code if isinstance(exc, StoreError) else None
        assert got == expected, f"{op} {aid} by {agent}: expected {expected}, got {exc!r}"
        codes[got] = codes.get(got, 0) + 1
        if got is None:
            result = fut.result()
            commits.append((result.commit if isinstance(result, WriteReceipt) else result, agent, subject))
    # The workload exercised what it claims to: creates, rewrites, deletes and both refusals.
    assert codes[None] > 8000 and codes.get("forbidden", 0) > 100 and codes.get("quota_exceeded", 0) > 50
    assert sum(1 for k, *_ in plan if k == "delete") > 500
    # The log: exactly one commit per successful operation, authored by its agent, in order.
    log = store_backend.log(store)
    assert log[0][1:] == ("agent-ecology", "create artifact store")
    assert log[1:] == commits
    assert len(set(c for c, _, _ in commits)) == len(commits)
    # Usage: the store, the model and the storage read without the store's code agree.
    expected_usage = {a: n for a, n in model.usage.items() if n}
    assert store.usage() == expected_usage == store_backend.usage(store)
    assert all(store.owned_bytes(a) == model.usage.get(a, 0) for a in agents)
    assert verify(store) == []
    # What each agent sees, and a sample of reads.
    for agent in agents[:5]:
        want = sorted(i for i, (o, _, r) in model.arts.items() if r == "public" or o == agent)
        assert [a.id for a in store.list(agent)] == want
    for aid in rng.sample(sorted(model.arts), 300):
        owner, content, seen_by = model.arts[aid]
        art = store.read(owner, aid)
        assert (art.owner, art.content, art.readable) == (owner, content, seen_by)
    store_backend.check(store)
    if isinstance(store, GitStore):
        # The packs were rolled up as they went, not left as one per batch.
        assert len(list((store.path / "objects" / "pack").glob("*.idx"))) <= 17


# ---------------------------------------------------------------------------- concurrent readers


def test_readers_see_whole_versions_while_writes_and_rollups_go_on(store_backend: Backend) -> None:
    store = store_backend.open("busy", **({"max_packs": 3} if store_backend.name == "git" else {}))
    ids = [f"k{i}" for i in range(40)]
    for aid in ids:
        store.write("alice", aid, content_for(aid, 0), quota=BIG)
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader() -> None:
        rng = random.Random(threading.get_ident())
        try:
            while not stop.is_set():
                aid = rng.choice(ids)
                art = store.read("bob", aid)
                version = version_of(art.content)
                if art.content != content_for(aid, version) or art.size != len(art.content):
                    errors.append(f"{aid}: torn read {art.content[:40]!r}")
                reads[0] += 1
        except Exception as exc:
            errors.append(f"reader: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 30):
            futs = [store.submit_write("alice", aid, content_for(aid, version), quota=BIG) for aid in ids]
            for f in futs:
                f.result(timeout=30)
            store.write("alice", ids[0], content_for(ids[0], version), quota=BIG)  # small batches: more packs
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == [] and reads[0] > 100
    if isinstance(store, GitStore):
        assert len(list((store.path / "objects" / "pack").glob("*.idx"))) <= 4
    assert verify(store) == []
    store_backend.check(store)


# ------------------------------------------------------------------------------ crash and restart


@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    rng = random.Random(20261202)
    repo = tmp_path / "crash.git"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    latest: dict[str, int] = {}  # id -> last acknowledged version
    deleted: set[str] = set()
    for rnd in range(6):
        cmd = [sys.executable, "-m", "tests.integration.store_crash_writer", str(repo), "--round", str(rnd)]
        delay = rng.uniform(0.2, 0.9)
        lines = kill_mid_write(cmd, env=env, errlog=tmp_path / f"writer-{rnd}.err", delay_s=delay, after_acks=51)
        acked = [line.split() for line in lines]
        assert len(acked) > 50, f"round {rnd}: only {len(acked)} acknowledgements"
        for fields in acked:
            if fields[0] == "w":
                latest[fields[1]] = max(latest.get(fields[1], -1), int(fields[2]))
            else:
                deleted.add(fields[1])

        with GitStore(repo) as store:
            problems = verify(store)
            assert problems == [], f"round {rnd}: {problems[:5]}"
            for aid, version in latest.items():
                art = store.read("reader", aid)
                # The last acknowledged version, or a later one that was in flight when the writer died.
                got = version_of(art.content)
                assert got >= version and art.content == content_for(aid, got), f"round {rnd}: {aid}"
                assert art.owner == agent_for(aid)
            for aid in deleted:
                assert code_of(functools.partial(store.read, "reader", aid))[0] == "not_found"
            assert store.usage() == usage_by_git(repo)
            assert store.head() == git_head(repo)
        assert_fsck(repo)
    assert live_children("store_crash_writer") == []


def test_a_stale_or_missing_index_is_rebuilt_from_head(make_store: Make, tmp_path: Path) -> None:
    store = make_store("stale")
    for i in range(30):
        store.write(f"agent{i % 3}", f"a{i}", b"x" * i, readable="owner" if i % 4 == 0 else "public", quota=BIG)
    store.close()
    saved = tmp_path / "saved-index"
    shutil.copytree(f"{store.path}.index", saved)
    store = make_store("stale")
    assert not store.rebuilt_index
    store.write("agent0", "a0", b"rewritten", quota=BIG)
    store.delete("agent1", "a1")
    store.write("agent2", "new", b"brand new", quota=BIG)
    expected = (store.usage(), store.indexed(), store.head())
    store.close()
    # As if the process died after moving the ref but before the index committed.
    shutil.rmtree(f"{store.path}.index")
    shutil.copytree(saved, f"{store.path}.index")
    store = make_store("stale")
    assert store.rebuilt_index
    assert (store.usage(), store.indexed(), store.head()) == expected
    assert store.read("agent0", "a0").content == b"rewritten" and store.read("x", "new").content == b"brand new"
    assert code_of(lambda: store.read("agent1", "a1"))[0] == "not_found"
    assert verify(store) == []
    store.close()
    # And with no index at all.
    shutil.rmtree(f"{store.path}.index")
    store = make_store("stale")
    assert store.rebuilt_index and (store.usage(), store.indexed(), store.head()) == expected


def test_verify_notices_an_index_that_disagrees_with_head(git_store: GitStore) -> None:
    store = git_store
    store.write("alice", "a", b"12345", quota=BIG)
    store.write("bob", "b", b"123", quota=BIG)
    assert verify(store) == []
    with store.env.begin(write=True) as txn:
        txn.put(b"alice", (4).to_bytes(8, "big"), db=store._usage)
        txn.delete(b"b", db=store._arts)
    problems = verify(store)
    assert any("usage of `alice`" in p for p in problems)
    assert any("`b` is in HEAD's tree but not in the index" in p for p in problems)


def test_a_git_store_is_opened_by_one_process(make_store: Make) -> None:
    store = make_store("once")
    store.write("alice", "a", b"x", quota=BIG)
    probe = (
        "import sys; from runtime.world.store import StoreError; from runtime.world.store.git import GitStore\n"
        "try:\n    GitStore(sys.argv[1])\nexcept StoreError as e:\n    print(e.code, e)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, str(store.path)],
        capture_output=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )
    assert b"open in another process" in res.stdout, res.stdout + res.stderr


def test_a_closed_store_refuses_work_and_reopened_has_everything(store_backend: Backend) -> None:
    store = store_backend.open("once")
    store.write("alice", "a", b"x", quota=BIG)
    store.close()
    for call in (
        lambda: store.write("alice", "b", b"y", quota=BIG),
        lambda: store.submit_write("alice", "b", b"y", quota=BIG).result(timeout=5),
        lambda: store.delete("alice", "a"),
        lambda: store.read("alice", "a"),
        lambda: store.list("alice"),
        lambda: store.usage(),
        lambda: store.history("a"),
    ):
        assert code_of(call)[0] == "closed"
    store.close()  # closing twice is harmless
    reopened = store_backend.open("once")
    assert reopened.read("alice", "a").content == b"x" and reopened.usage() == {"alice": 1}


def test_a_batch_that_fails_before_the_ref_moves_writes_nothing(
    git_store: GitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = git_store
    from runtime.world.store import git_packs

    store.write("alice", "keep", b"kept", quota=BIG)
    head, usage = store.head(), store.usage()
    real = git_packs.write_pack
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> str:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(git_packs, "write_pack", failing)
    futs = [store.submit_write("alice", f"lost{i}", b"x" * 10, quota=BIG) for i in range(20)]
    errors = [f.exception(timeout=10) for f in futs]
    # The first batch failed as a whole (later ones may have committed): no partial commit, no stale tree.
    assert isinstance(errors[0], OSError)
    failed = [i for i, e in enumerate(errors) if e is not None]
    assert failed == list(range(len(failed))) and all(isinstance(errors[i], OSError) for i in failed)
    committed = len(futs) - len(failed)
    assert store.usage()["alice"] == usage["alice"] + 10 * committed
    for i in failed:
        assert code_of(functools.partial(store.read, "alice", f"lost{i}"))[0] == "not_found"
    count = int(git(store.path, "rev-list", "--count", "HEAD").stdout)
    assert count == 2 + committed and (committed or store.head() == head)
    # The writer's in-memory trees were reset: the next commit builds on the real HEAD.
    store.write("alice", "after", b"after", quota=BIG)
    assert store.read("bob", "keep").content == b"kept" and store.read("bob", "after").content == b"after"
    assert verify(store) == [] and store.usage() == usage_by_git(store.path)
    assert_fsck(store.path)


def test_a_batch_whose_index_commit_fails_after_the_ref_moved_is_still_durable(git_store: GitStore) -> None:
    store = git_store
    store.write("alice", "a", b"1", quota=BIG)
    real_env = store.env

    class FailingTxn:
        def __init__(self, txn: Any) -> None:
            self.txn = txn

        def __getattr__(self, name: str) -> Any:
            return getattr(self.txn, name)

        def commit(self) -> None:
            self.txn.abort()
            raise OSError(5, "Input/output error")

    class OnceFailingEnv:
        armed = True

        def __getattr__(self, name: str) -> Any:
            return getattr(real_env, name)

        def begin(self, write: bool = False, **kw: Any) -> Any:
            txn = real_env.begin(write=write, **kw)
            if write and self.armed:
                self.armed = False
                return FailingTxn(txn)
            return txn

    store.env = OnceFailingEnv()  # type: ignore[assignment]
    receipt = store.write("alice", "b", b"22", quota=BIG)  # durable in Git: acknowledged
    store.env = real_env
    assert receipt.commit == store.head() == git_head(store.path)
    assert store.read("bob", "b").content == b"22"  # the index was rebuilt from HEAD
    assert store.usage() == {"alice": 3} and verify(store) == []


def test_leftovers_of_a_killed_writer_are_cleaned_up_on_open(make_store: Make) -> None:
    store = make_store("left")
    store.write("alice", "a", b"x", quota=BIG)
    store.close()
    packs = store.path / "objects" / "pack"
    some_pack = next(packs.glob("pack-*.pack"))
    debris = [
        packs / "tmp_pack_0123456789abcdef",  # a pack being written
        packs / "tmp_idx_0123456789abcdef",
        packs / f"pack-{'0' * 40}.pack",  # renamed into place, killed before its index was
        store.path / "refs" / "heads" / "main.lock",  # killed while moving the ref
    ]
    for path in debris:
        if path.suffix == ".pack":
            shutil.copy(some_pack, path)
        else:
            path.write_bytes(b"partial")
    store = make_store("left")
    assert not any(p.exists() for p in debris)
    store.write("alice", "b", b"y", quota=BIG)
    assert [a.id for a in store.list("bob")] == ["a", "b"] and verify(store) == []
    assert_fsck(store.path)


# ------------------------------------------------------------------------------ operator commands


def _admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if k != "POSTGRES_URL"}
    return subprocess.run(
        [sys.executable, "-m", "runtime.admin", *args],
        capture_output=True,
        cwd=ROOT,
        env=dict(clean, PYTHONPATH=str(ROOT), **(env or {})),
        timeout=120,
    )


def test_admin_history_show_and_rollback_work_the_same_on_both_backends(store_backend: Backend, tmp_path: Path) -> None:
    url = empty_url = ""
    if isinstance(store_backend, PostgresBackend):
        url, empty_url = store_backend.url("artifacts"), store_backend.url("empty")
    pg = bool(url)
    store = store_backend.open("artifacts")  # Git: tmp_path/artifacts.git, the data directory's store
    where = ["--data-dir", str(tmp_path)] + (["--postgres", url] if pg else [])
    c1 = store.write("alice", "doc", b"first version", quota=BIG).commit
    c2 = store.write("alice", "doc", b"second", price=3, quota=BIG).commit
    store.write("bob", "later", b"after both", quota=BIG)
    store.close()  # the Git store has one writer; PostgreSQL does not mind, but the same steps suit both
    res = _admin(*where, "history", "doc")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == [c2, c1]
    assert all(line.split()[3:] == ["alice", "write", line.split()[5], "B"] for line in lines)
    assert [int(line.split()[5]) for line in lines] == [6, 13]
    res = _admin(*where, "show", f"doc@{c1}")
    assert res.returncode == 0 and res.stdout == b"first version", res.stderr
    assert f"doc at {c1}: data, owner alice, 13 B".encode() in res.stderr
    # PostgreSQL: the URL may come from the environment instead.
    env = {"POSTGRES_URL": url} if pg else None
    res = _admin("--data-dir", str(tmp_path), "rollback", "--to", c1, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().startswith(f"rolled back to {c1}: new HEAD ")
    assert "'alice': 13" in res.stdout.decode()
    store = store_backend.open("artifacts")
    last = store.last_commit()
    assert (last.action, last.author) == ("reset", "operator")
    assert store.read("bob", "doc").content == b"first version" and store.usage() == {"alice": 13}
    assert [h.action for h in store.history("later")] == ["reset", "write"]
    store.close()
    # Mistakes are said, and change nothing.
    unknown = "999999" if pg else "ffffff"
    for args, code, words in [
        (("show", "doc"), 2, "expected ID@COMMIT"),
        # What the operator named does not exist or is malformed: bad input, exit 2 as every command.
        (("history", "../x"), 2, "invalid_id"),
        (("show", f"doc@{unknown}"), 2, "not_found: no commit"),
        (("rollback", "--to", "nonsense!"), 2, "invalid: 'nonsense!' is not a commit id"),
    ]:
        res = _admin(*where, *args)
        assert res.returncode == code and words in res.stderr.decode(), (args, res.stderr)
    store = store_backend.open("artifacts")
    assert store.head() == last.commit
    store.close()
    # No store at all: refused, none created.
    empty = ["--data-dir", str(tmp_path / "nothing")] + (["--postgres", empty_url] if pg else [])
    res = _admin(*empty, "history", "doc")
    assert res.returncode == 2 and "no artifact store" in res.stderr.decode(), res.stderr
    assert not (tmp_path / "nothing").exists()


def test_admin_names_an_unusable_database_without_its_password(tmp_path: Path) -> None:
    host = ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql://ops:hunter2@{host}/no_such_database_here"
    res = _admin("--data-dir", str(tmp_path), "--postgres", url, "history", "x")
    err = res.stderr.decode()
    assert res.returncode == 2 and "rejected by the server" in err, err
    assert "hunter2" not in err and "ops:***@" in err, err

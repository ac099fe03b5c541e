"""The rules of a node's caches of the shared state (holdings, HEAD's metadata), with a hand-driven clock."""

from __future__ import annotations

from runtime.economy.ledger.cache import KEEP_CREDITS, HoldingsCache
from runtime.world.store import ArtifactInfo
from runtime.world.store.cache import HeadCache


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def info(aid: str, owner: str = "alice", readable: str = "public", size: int = 1) -> ArtifactInfo:
    return ArtifactInfo(aid, "data", owner, owner, 0, readable, 1.0, 1.0, size)


# ------------------------------------------------------------------------------------------ holdings


def test_holdings_are_used_until_their_maximum_age() -> None:
    clock = Clock()
    cache = HoldingsCache(1.0, clock=clock)
    assert cache.get("alice") is None
    assert cache.put("alice", 5, {"scrip": 10}, cache.token())
    assert cache.get("alice") == {"scrip": 10}
    clock.now += 1.0
    assert cache.get("alice") == {"scrip": 10}
    clock.now += 0.01
    assert cache.get("alice") is None
    assert (cache.hits, cache.misses) == (2, 2)


def test_holdings_of_an_older_seq_never_replace_newer_ones() -> None:
    cache = HoldingsCache(clock=Clock())
    assert cache.put("alice", 7, {"scrip": 3}, cache.token())
    assert not cache.put("alice", 6, {"scrip": 99}, cache.token())
    assert cache.get("alice") == {"scrip": 3}
    assert cache.put("alice", 7, {"scrip": 3}, cache.token())  # the same seq: the same state


def test_what_was_read_before_a_forget_is_not_put_after_it() -> None:
    cache = HoldingsCache(clock=Clock())
    cache.put("bob", 1, {"scrip": 100}, cache.token())
    token = cache.token()  # a read starts
    cache.forget("bob")  # another node credits bob meanwhile
    assert cache.get("bob") is None
    assert not cache.put("bob", 2, {"scrip": 100}, token)  # the read may predate the credit
    assert cache.get("bob") is None
    assert cache.put("bob", 3, {"scrip": 105}, cache.token())  # a read that started after it is kept
    assert cache.get("bob") == {"scrip": 105}
    assert cache.put("carol", 3, {}, token)  # a forget concerns its account only


def test_a_credit_from_another_node_is_added_once() -> None:
    cache = HoldingsCache(clock=Clock())
    cache.put("bob", 10, {"scrip": 100}, cache.token())
    cache.credit("bob", "scrip", 5, 12)  # after the entry's seq: not in it yet
    cache.credit("bob", "cpu_rate", 7, 13)
    assert cache.get("bob") == {"scrip": 105, "cpu_rate": 7}
    cache.put("bob", 14, {"scrip": 104, "cpu_rate": 7}, cache.token())  # this node's own batch, after both
    cache.credit("bob", "scrip", 5, 12)  # an entry at seq 14 already holds a credit at 12
    assert cache.get("bob") == {"scrip": 104, "cpu_rate": 7}
    cache.credit("carol", "scrip", 1, 20)  # no entry: nothing to add to, and nothing cached
    assert cache.get("carol") is None


def test_balances_read_during_a_credit_get_it_added_unless_they_hold_it() -> None:
    cache = HoldingsCache(clock=Clock())
    cache.put("bob", 10, {"scrip": 100}, cache.token())
    token = cache.token()  # a read (or this node's batch) starts
    cache.credit("bob", "scrip", 5, 12)
    assert cache.put("bob", 11, {"scrip": 90}, token)  # read at seq 11: the credit at 12 is not in it
    assert cache.get("bob") == {"scrip": 95}
    token = cache.token()
    cache.credit("bob", "scrip", 7, 13)
    assert cache.put("bob", 13, {"scrip": 102}, token)  # read at seq 13: it holds the credit already
    assert cache.get("bob") == {"scrip": 102}


def test_a_read_older_than_the_credits_kept_is_not_trusted() -> None:
    cache = HoldingsCache(clock=Clock())
    token = cache.token()
    for seq in range(20, 20 + KEEP_CREDITS + 1):  # one credit more than are kept per account
        cache.credit("bob", "scrip", 1, seq)
    assert not cache.put("bob", 11, {"scrip": 90}, token)  # it missed a credit the cache no longer has
    assert cache.get("bob") is None
    assert cache.put("bob", 11, {"scrip": 90}, cache.token())  # a later read is kept


def test_a_copy_is_returned() -> None:
    cache = HoldingsCache(clock=Clock())
    cache.put("alice", 1, {"scrip": 1}, cache.token())
    got = cache.get("alice")
    assert got is not None
    got["scrip"] = 1000
    assert cache.get("alice") == {"scrip": 1}


# ------------------------------------------------------------------------------------- HEAD metadata


def test_an_empty_or_old_copy_of_head_is_read_whole() -> None:
    clock = Clock()
    cache = HeadCache(5.0, clock=clock)
    assert cache.needs() == (True, set())
    cache.merge([(3, info("b")), (2, info("a"))], None, cache.token())
    assert cache.needs() == (False, set())
    assert [i.id for i in cache.visible("carol", None)] == ["a", "b"]
    clock.now += 5.01
    assert cache.needs() == (True, set())


def test_listings_show_public_artifacts_and_the_agents_own_by_id_up_to_the_limit() -> None:
    cache = HeadCache(clock=Clock())
    rows = [(1, info("c", "bob")), (2, info("a", "alice", "owner")), (3, info("b", "bob", "owner")), (4, info("d"))]
    cache.merge(rows, None, cache.token())
    assert [i.id for i in cache.visible("alice", None)] == ["a", "c", "d"]
    assert [i.id for i in cache.visible("bob", None)] == ["b", "c", "d"]
    assert [i.id for i in cache.visible("carol", 1)] == ["c"]
    assert cache.visible("carol", 0) == []


def test_own_writes_and_deletes_are_seen_at_once() -> None:
    cache = HeadCache(clock=Clock())
    cache.merge([], None, cache.token())
    cache.wrote(5, info("x", size=3))
    assert cache.visible("carol", None) == [info("x", size=3)]
    cache.wrote(4, info("x", size=99))  # an older commit of it never replaces a newer one
    assert cache.visible("carol", None) == [info("x", size=3)]
    cache.deleted(6, "x")
    assert cache.visible("carol", None) == []
    assert cache.needs() == (False, set())  # nothing to read for it


def test_dirty_ids_are_read_again_and_what_a_read_did_not_find_is_gone() -> None:
    cache = HeadCache(clock=Clock())
    cache.merge([(1, info("a")), (2, info("b"))], None, cache.token())
    cache.dirty(["a", "new"])
    full, ids = cache.needs()
    token = cache.token()  # the read of the dirty ids starts
    assert (full, ids) == (False, {"a", "new"})
    assert cache.needs() == (False, set())  # taken: one read for them
    cache.merge([(7, info("new", "bob"))], ids, token)  # "a" was deleted elsewhere
    assert [i.id for i in cache.visible("carol", None)] == ["b", "new"]


def test_a_read_never_undoes_a_write_made_while_it_was_in_flight() -> None:
    cache = HeadCache(clock=Clock())
    cache.merge([(1, info("a", size=1))], None, cache.token())
    token = cache.token()  # a full read starts; its snapshot predates the writes below
    cache.wrote(9, info("a", size=2))
    cache.wrote(10, info("fresh"))
    cache.deleted(11, "gone-later")
    cache.merge([(1, info("a", size=1)), (8, info("gone-later"))], None, token)
    assert cache.visible("carol", None) == [info("a", size=2), info("fresh")]


def test_a_rollback_drops_the_copy() -> None:
    cache = HeadCache(clock=Clock())
    cache.merge([(1, info("a"))], None, cache.token())
    cache.dirty(["a"])
    cache.drop()
    assert cache.needs() == (True, set())

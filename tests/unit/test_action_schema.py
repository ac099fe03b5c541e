"""The grammar an LLM brain generates against covers the economy's actions, and what it allows decodes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.actions import AcceptOffer
from runtime.agents import schema
from runtime.agents.schema import ACTION_SCHEMA, parse_action

#: One instance of each variant the schema lists (in its order), as a model constrained by it could write.
EXAMPLES: list[dict[str, Any]] = [
    {"kind": "write_artifact", "id": "note", "content": "hello, world"},
    {
        "kind": "write_artifact",
        "id": "tool",
        "content": "def double(x): return 2 * x[0] if x else world.result(1)",
        "artifact_kind": "code",
        "readable": "price:5",
        "price": 2,
    },
    {"kind": "read_artifact", "id": "tool"},
    {"kind": "delete_artifact", "id": "tool"},
    {"kind": "invoke_artifact", "id": "tool"},
    {"kind": "invoke_artifact", "id": "tool", "charge_to": "owner"},
    {"kind": "sponsor", "id": "tool", "cpu_seconds": 5},
    {"kind": "transfer", "to": "bob", "amount": 5},
    {"kind": "transfer", "to": "bob", "amount": 100, "asset": "cpu_rate"},
    {"kind": "offer", "asset": "disk_quota", "amount": 100000, "price": 10},
    {"kind": "accept_offer", "offer": "alice.3f2a9c1d0b7e.12"},
    {"kind": "cancel_offer", "offer": "alice.n1-50.3f2a9c1d0b7e.4"},
    {"kind": "submit", "task": "double", "id": "tool"},
    {"kind": "subscribe", "id": "tool", "on": "transfer"},
    {"kind": "unsubscribe", "trigger": "trig-alice-n1.3f2a9c1d0b7e-4"},
    {"kind": "remember", "text": "x"},
    {"kind": "recall", "query": "x"},
    {"kind": "sleep", "seconds": 5},
    {"kind": "noop"},
]


def test_every_variant_of_the_schema_decodes_to_its_action() -> None:
    variants = ACTION_SCHEMA["anyOf"]
    assert len(variants) == len(EXAMPLES)
    for variant, example in zip(variants, EXAMPLES, strict=True):
        assert variant["properties"]["kind"]["const"] == example["kind"]
        assert set(variant["required"]) == set(example)
        for field, value in example.items():
            rule = variant["properties"][field]
            if "pattern" in rule:
                assert re.match(rule["pattern"], value), (field, value)
            if "enum" in rule:
                assert value in rule["enum"], (field, value)
            if "const" in rule:
                assert value == rule["const"], (field, value)
        action = parse_action(json.dumps(example))
        assert action.__struct_config__.tag == example["kind"]


def test_the_schema_compiles_to_a_grammar() -> None:
    gbnf = pytest.importorskip("llama_cpp.llama_grammar")
    grammar = gbnf.json_schema_to_gbnf(json.dumps(ACTION_SCHEMA))
    for kind in ("accept_offer", "submit", "subscribe", "unsubscribe", "offer", "sponsor"):
        assert kind in grammar


def test_the_longest_offer_id_the_grammar_admits_is_one_the_action_accepts() -> None:
    pattern = re.compile(schema._OFFER["pattern"])
    longest = "a" * 24 + "." + "b" * 39
    assert pattern.fullmatch(longest) and not pattern.fullmatch(longest + "b")
    action = parse_action(json.dumps({"kind": "accept_offer", "offer": longest}))
    assert isinstance(action, AcceptOffer) and action.offer == longest


def _instances(variant: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Every object the variant admits, as the grammar compiled from it lets a model write."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field, rule in variant["properties"].items():
        if "const" in rule:
            fields[field] = st.just(rule["const"])
        elif "enum" in rule:
            fields[field] = st.sampled_from(rule["enum"])
        else:
            fields[field] = st.from_regex(rule["pattern"].removeprefix("^").removesuffix("$"), fullmatch=True)
    return st.fixed_dictionaries(fields)


@pytest.mark.parametrize("index", range(len(ACTION_SCHEMA["anyOf"])))
def test_whatever_a_variant_admits_the_action_type_accepts(index: int) -> None:
    # The schema's patterns are written by hand next to the action types' own; one looser than its type
    # lets a model write an action that then fails to decode (a subscription's `on` once admitted `_x`).
    variant = ACTION_SCHEMA["anyOf"][index]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_instances(variant))
    def decodes(instance: dict[str, Any]) -> None:
        action = parse_action(json.dumps(instance))
        assert action.__struct_config__.tag == variant["properties"]["kind"]["const"]

    decodes()

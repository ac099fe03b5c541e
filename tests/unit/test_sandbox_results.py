"""What a confined invocation may return: strict JSON (``workers.sandbox.result_error``)."""

from __future__ import annotations

import pytest

from workers.sandbox import result_error


@pytest.mark.parametrize(
    "value",
    [
        b"null",
        b"1",
        b"-9223372036854775808",
        b"18446744073709551615",
        b"1.5e300",
        b'"\\u00e9"',
        '"é"'.encode(),
        b'{"a":[1,2,{"b":null}]}',
        b"true",
    ],
)
def test_valid_results(value: bytes) -> None:
    assert result_error(value) == ""


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'"\xff"', "not valid JSON: UnicodeDecodeError"),
        (b"1e999", "not valid JSON"),
        (b"NaN", "not valid JSON"),
        (b"Infinity", "not valid JSON"),
        (b"18446744073709551616", "integer outside 64 bits"),
        (b"-9223372036854775809", "integer outside 64 bits"),
        (b'{"deep":[[1,[2,' + str(1 << 70).encode() + b"]]]}", "integer outside 64 bits"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1,", "not valid JSON"),
    ],
)
def test_invalid_results_say_why(value: bytes, reason: str) -> None:
    assert reason in result_error(value)

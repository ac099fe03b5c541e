"""A task's deadline is a positive finite number of seconds, or None for the pool's default."""

from __future__ import annotations

import math

import pytest

from runtime.errors import AecoError
from runtime.pool.task import InvalidTimeout, check_timeout


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, True, False, "5", [5]], ids=repr)
def test_a_deadline_that_is_not_a_positive_finite_number_is_refused_by_name(bad: object) -> None:
    with pytest.raises(InvalidTimeout) as err:
        check_timeout(bad)
    assert isinstance(err.value, ValueError) and isinstance(err.value, AecoError)
    assert err.value.code == "invalid"
    assert "timeout_s" in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.parametrize("good", [1e-3, 0.5, 1, 600, 3600.0])
def test_a_positive_finite_deadline_is_kept_in_seconds(good: float) -> None:
    assert check_timeout(good) == float(good)


def test_no_deadline_means_the_pools_default() -> None:
    assert check_timeout(None) is None

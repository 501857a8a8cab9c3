"""``meter_snapshot`` (the check's fast constructor) builds exactly ``MeterSnapshot(...)``."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.rules.evaluate import MeterSnapshot, meter_snapshot

times = st.none() | st.floats(allow_nan=False)


@given(st.text(), st.text(), times, times, st.booleans(), times,
       st.floats(min_value=1e-3, max_value=1e6), times)
def test_equal_to_the_dataclass(mid: str, group: str, rated: float | None,
                                last: float | None, online: bool, power: float | None,
                                interval: float, first: float | None) -> None:
    args = (mid, group, rated, last, online, power, interval, first)
    made, plain = meter_snapshot(*args), MeterSnapshot(*args)
    assert type(made) is MeterSnapshot
    assert made == plain and hash(made) == hash(plain) and repr(made) == repr(plain)
    assert dataclasses.astuple(made) == args
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.power_w = 1.0  # type: ignore[misc]

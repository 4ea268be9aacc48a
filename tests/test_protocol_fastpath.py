"""Telemetry has a fast validation path for the usual message (the server decodes 10k/s); it
must accept only what the field-by-field path accepts, and build the same message."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdk.protocol import histogram, messages
from sdk.protocol.errors import ProtocolError


def usual() -> dict[str, Any]:
    hist = histogram.empty()
    hist[30], hist[31] = 3, 4
    return json.loads(messages.Telemetry(seq=7, interval_s=5.0, count=8, errors=1, latency_hist=hist,
                                         latency_sum_ms=12.5, cpu_percent=3.0, rss_bytes=1 << 20,
                                         artifact="ab" * 32, model_version="1.0.0").encode())


ODD = [None, True, False, -1, 0, 1, 2**40, 2**62 + 1, 10**30, 0.5, -0.5, math.nan, math.inf, "1", "ab" * 32,
       "x" * 300, [], {}, [1] * 72, {"a": 1}]
FIELDS = ["seq", "interval_s", "count", "errors", "latency_sum_ms", "cpu_percent", "rss_bytes", "artifact",
          "model_version", "latency_hist", "health", "drift", "predictions", "stage", "nope"]


def checked(data: Any) -> messages.Telemetry | ProtocolError:
    try:
        return messages.Telemetry._checked(data)
    except ProtocolError as exc:
        return exc


def agree(data: Any) -> None:
    try:
        fast: Any = messages.Telemetry._usual(data)
    except ProtocolError as exc:  # from a structured field (health, drift, ...): the same checks
        fast = exc
    slow = checked(data)
    if isinstance(fast, ProtocolError):
        assert str(fast) == str(slow)
    elif fast is not None:
        assert fast == slow, data
    # and the public entry point behaves exactly like the checked path
    if isinstance(slow, ProtocolError):
        with pytest.raises(ProtocolError) as info:
            messages.Telemetry.from_dict(data)
        assert str(info.value) == str(slow)
    else:
        assert messages.Telemetry.from_dict(data) == slow


@pytest.mark.parametrize("name", FIELDS)
def test_one_odd_field_at_a_time(name: str) -> None:
    for value in [*ODD, -3, -2, 2, 3, 5.0, 1e300]:
        data = usual()
        data[name] = value
        agree(data)
    data = usual()
    data.pop(name, None)
    agree(data)


@pytest.mark.parametrize("value", [-1, 1, True, 1.0, 2**40, 2**40 - 1, None, "1"])
def test_one_odd_bucket(value: Any) -> None:
    data = usual()
    data["latency_hist"][30] = value
    agree(data)
    data["count"] = data["errors"] + sum(v for v in data["latency_hist"] if type(v) is int)
    agree(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(ODD) | st.integers(-3, 3)), max_size=3),
       st.lists(st.tuples(st.integers(0, 71), st.sampled_from([-1, 0, 1, True, 1.0, 2**40])), max_size=2))
def test_fast_path_agrees_with_the_checked_path(changes: list[tuple[str, Any]], buckets: list[tuple[int, Any]]) -> None:
    data = usual()
    for name, value in changes:
        data[name] = value
    if isinstance(data.get("latency_hist"), list) and len(data["latency_hist"]) == 72:
        for i, v in buckets:
            data["latency_hist"][i] = v
    agree(data)


def test_the_usual_message_takes_the_fast_path() -> None:
    data = usual()
    assert messages.Telemetry._usual(data) == messages.Telemetry._checked(data)
    data["health"] = {"temp_c": 41.5, "runtime": "litert"}
    assert messages.Telemetry._usual(data) == messages.Telemetry._checked(data)


@pytest.mark.parametrize(("name", "value", "why"), [
    ("rss_bytes", -1, "must be in [0, 1125899906842624], got -1"),
    ("rss_bytes", messages.MAX_RSS_BYTES + 1, "must be in [0, 1125899906842624]"),
    ("rss_bytes", 2**63, "must be in [0, 1125899906842624]"),  # would overflow the BIGINT column
    ("cpu_percent", 100_000.5, "must be <= 100000, got 100000"),
    ("cpu_percent", 10**6, "must be <= 100000"),
    ("interval_s", 1e300, "must be <= 9.0072e+15"),
    ("latency_sum_ms", 2**53 + 2, "must be <= 9.0072e+15"),
    ("latency_sum_ms", 10**400, "must be finite"),  # float() of it would raise OverflowError
])
def test_numbers_out_of_range_are_refused_by_both_paths(name: str, value: Any, why: str) -> None:
    data = usual()
    data[name] = value
    assert messages.Telemetry._usual(data) is None, "the fast path never accepts it"
    with pytest.raises(ProtocolError, match=rf"field '{name}' {re.escape(why)}"):
        messages.decode("telemetry", json.dumps(data).encode())
    agree(data)
    data[name] = {"rss_bytes": messages.MAX_RSS_BYTES, "cpu_percent": messages.MAX_CPU_PERCENT}.get(name, messages.MAX_FLOAT)
    assert messages.Telemetry._usual(data) == messages.Telemetry._checked(data), "the bound itself is fine"

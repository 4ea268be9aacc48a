"""The server's store on SQLite and a real PostgreSQL: dedupe, availability, percentiles,
selectors, supersede. Time is explicit (``now``), so the math is deterministic."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdk.protocol import histogram, messages
from sdk.protocol.errors import DeployError
from server.store import NotFound, Store, covered_seconds, parse_selector

T = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
SHA = "ab" * 32


def at(seconds: float) -> datetime:
    """T + seconds (negative = before T)."""
    return T + timedelta(seconds=seconds)


def status(connection: str = "", **labels: str) -> messages.Status:
    return messages.Status(state="online", agent_version="0.1.0", runtime="ai_edge_litert",
                           profile="rpi4", labels=labels, connection=connection)


def telemetry(seq: int, latencies_ms: list[float], errors: int = 0) -> messages.Telemetry:
    hist = histogram.empty()
    for ms in latencies_ms:
        hist[histogram.bucket_of(ms)] += 1
    return messages.Telemetry(seq=seq, interval_s=10.0, count=len(latencies_ms) + errors, errors=errors,
                              latency_hist=hist, latency_sum_ms=sum(latencies_ms), cpu_percent=12.5,
                              rss_bytes=50_000_000, artifact=SHA, model_version="1")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url, clock=lambda: T)
    try:
        yield s
    finally:
        s.close()


def health_of(store: Store, device_id: str, window: float = 60, now: datetime = T) -> dict:
    return next(d for d in store.fleet_health(window, now)["devices"] if d["id"] == device_id)


def test_telemetry_is_deduplicated_on_device_and_seq(store: Store) -> None:
    store.status_online("pi-1", status(), at(-50))
    store.status_online("pi-2", status(), at(-50))
    assert store.add_telemetry("pi-1", telemetry(1, [5.0, 6.0]), at(-40)) is True
    assert store.add_telemetry("pi-1", telemetry(1, [5.0, 6.0]), at(-39)) is False  # redelivery
    assert store.add_telemetry("pi-2", telemetry(1, [5.0]), at(-39)) is True  # same seq, other device
    assert store.add_telemetry("pi-1", telemetry(2, [7.0], errors=1), at(-30)) is True
    h1, h2 = health_of(store, "pi-1"), health_of(store, "pi-2")
    assert (h1["inferences"], h1["errors"]) == (4, 1)
    assert h1["error_rate"] == pytest.approx(0.25)
    assert (h2["inferences"], h2["errors"]) == (1, 0)


def test_telemetry_for_unknown_device_is_refused(store: Store) -> None:
    with pytest.raises(NotFound):
        store.add_telemetry("ghost", telemetry(1, [1.0]), T)


def test_availability_from_sessions(store: Store) -> None:
    # online at -90, offline at -45, online again at -15: 30 s of the last 60 s.
    store.status_online("pi-1", status(), at(-90))
    store.status_offline("pi-1", at(-45))
    store.status_online("pi-1", status(), at(-15))
    h = health_of(store, "pi-1", window=60)
    assert h["availability"] == pytest.approx(0.5)
    assert h["outages"] == 1
    assert h["online"] is True
    # Over 120 s the span starts at first_seen (-90): 45 + 15 of 90 s.
    assert health_of(store, "pi-1", window=120)["availability"] == pytest.approx(60 / 90)
    # A device seen for the first time 20 s ago and online since: fully available.
    store.status_online("pi-2", status(), at(-20))
    assert health_of(store, "pi-2")["availability"] == pytest.approx(1.0)
    # Seen just now: the span is zero, availability is unknown.
    store.status_online("pi-3", status(), T)
    assert health_of(store, "pi-3")["availability"] is None


def test_reconnect_and_timeout_sessions(store: Store) -> None:
    store.status_online("pi-1", status(), at(-60))
    store.status_online("pi-1", status(), at(-50))  # reconnect closes the open session first
    store.touch("pi-1", at(-40))
    assert store.sweep(15, now=at(-30)) == []  # 10 s of silence: still online
    assert store.sweep(15, now=at(-20)) == ["pi-1"]
    assert store.device("pi-1")["online"] is False
    h = health_of(store, "pi-1", window=60, now=at(-20))
    assert h["availability"] == pytest.approx(1.0)  # sessions -60..-50..-20 are contiguous
    assert h["outages"] == 2  # one "reconnect", one "timeout"
    store.touch("pi-1", at(-10))  # a heartbeat after the timeout reopens a session
    assert store.device("pi-1")["online"] is True
    assert health_of(store, "pi-1", window=60)["availability"] == pytest.approx(50 / 60)
    assert store.device("pi-1")["last_seen"] == at(-10).isoformat()


def test_a_status_update_on_the_same_connection_is_not_an_outage(store: Store) -> None:
    store.status_online("pi-1", status(connection="c1"), at(-60))
    store.status_online("pi-1", status(connection="c1"), at(-30))  # e.g. re-announced a new model
    assert health_of(store, "pi-1", window=60)["outages"] == 0
    store.status_online("pi-1", status(connection="c2"), at(-10))  # a new connection: reconnect
    h = health_of(store, "pi-1", window=60)
    assert h["outages"] == 1 and h["availability"] == pytest.approx(1.0)


def test_percentiles_merge_histograms_of_the_window(store: Store) -> None:
    store.status_online("pi-1", status(), at(-300))
    fast, slow = [2.0] * 90, [50.0] * 10
    store.add_telemetry("pi-1", telemetry(1, [1000.0] * 50), at(-200))  # outside a 60 s window
    store.add_telemetry("pi-1", telemetry(2, fast), at(-50))
    store.add_telemetry("pi-1", telemetry(3, slow), at(-10))
    h = health_of(store, "pi-1", window=60)
    merged = histogram.merge([telemetry(2, fast).latency_hist, telemetry(3, slow).latency_hist])
    assert h["inferences"] == 100
    assert h["p50_ms"] == pytest.approx(histogram.quantile(merged, 0.5))
    assert h["p95_ms"] == pytest.approx(histogram.quantile(merged, 0.95))
    assert 1.5 < h["p50_ms"] < 2.6 and 40 < h["p95_ms"] < 60
    store.status_online("pi-2", status(), at(-300))
    h2 = health_of(store, "pi-2", window=60)
    assert (h2["inferences"], h2["error_rate"], h2["p50_ms"], h2["p95_ms"]) == (0, None, None, None)


def test_selector_resolution(store: Store) -> None:
    store.status_online("a", status(group="lab", site="x"), T)
    store.status_online("b", status(group="lab", site="y"), T)
    store.status_online("c", status(group="field", site="y"), T)
    assert store.resolve("all") == ["a", "b", "c"]
    assert store.resolve("device:c,a") == ["a", "c"]
    assert store.resolve("group:lab") == ["a", "b"]
    assert store.resolve("label:site=y") == ["b", "c"]
    with pytest.raises(NotFound, match="zz"):
        store.resolve("device:a,zz")
    with pytest.raises(DeployError, match="matches no known device"):
        store.resolve("group:nowhere")
    for bad in ("", "every", "device:", "label:site", "color:red", "device:a/b"):
        with pytest.raises(DeployError, match="all \\| device:ID"):
            store.resolve(bad)


def test_deployment_supersedes_older_ones(store: Store) -> None:
    store.status_online("a", status(group="lab"), at(-100))
    store.status_online("b", status(group="lab"), at(-100))
    store.add_artifact(SHA, 5000, "m", "1", "dynamic", at(-90))
    other = "cd" * 32
    store.add_artifact(other, 6000, "m", "2", "int8", at(-90))
    with pytest.raises(NotFound):
        store.create_deployment("ef" * 32, "all", 1024, at(-80))
    d1 = store.create_deployment(SHA, "group:lab", 1024, at(-80))
    assert d1["targets"] == ["a", "b"] and d1["id"].startswith("d-") and len(d1["id"]) == 12
    assert {d["state"] for d in d1["devices"]} == {"pending"}
    assert store.report("a", messages.Reported(d1["id"], SHA, "active", "ok"), at(-70))
    assert store.device("a")["model"] == {"artifact": SHA, "name": "m", "version": "1"}

    d2 = store.create_deployment(other, "device:a,b", 1024, at(-60))
    assert d2["id"] != d1["id"]
    old = {d["device_id"]: d["state"] for d in store.deployment(d1["id"])["devices"]}
    assert old == {"a": "active", "b": "superseded"}  # final states are history, others superseded
    assert store.device("b")["deployment"] == {"id": d2["id"], "state": "pending", "detail": ""}
    art = store.artifact(other)
    assert store.desired("a") == messages.Desired(d2["id"], other, art["size"], 1024, art["name"], art["version"])
    assert store.desired("nobody") is None

    # Roles: each target can run its own file of the bundle and serve a stage of a shared service.
    d3 = store.create_deployment(other, "device:a,b", 1024, at(-55), roles=lambda ids: {
        d: {"file": f"stage-{i + 1:02d}.tflite", "service": "svc", "stage": i + 1, "stages": 2}
        for i, d in enumerate(ids)})
    assert store.desired("b") == messages.Desired(d3["id"], other, art["size"], 1024, art["name"], art["version"],
                                                  file="stage-02.tflite", service="svc", stage=2, stages=2)
    assert dict(store.all_desired())["a"].file == "stage-01.tflite"
    assert d3["devices"][0]["service"] == "svc" and d3["devices"][1]["stage"] == 2
    assert [d["id"] for d in store.deployments()] == [d1["id"], d2["id"], d3["id"]]
    assert store.report("b", messages.Reported("d-unknown", other, "failed", "x"), at(-50)) is False


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=8),
       st.integers(0, 100), st.integers(0, 100))
def test_covered_seconds_matches_a_brute_force_count(pairs: list[tuple[int, int]], lo: int, hi: int) -> None:
    start, end = sorted((lo, hi))
    intervals = [(at(min(a, b)), at(max(a, b))) for a, b in pairs]
    brute = sum(1 for s in range(start, end) if any(at(s) >= a and at(s + 1) <= b for a, b in intervals))
    assert covered_seconds(intervals, at(start), at(end)) == pytest.approx(brute)


def test_parse_selector_keeps_values_verbatim() -> None:
    assert parse_selector("label:zone=a=b").value == "a=b"
    assert parse_selector("device:a,a,b").ids == ("a", "b")

"""Fleet health from the SQL store, on SQLite and a real PostgreSQL: every figure is checked
against a value computed here, independently, from the raw rows the test wrote."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from sdk.protocol import drift, histogram, messages
from server.store import Store, floor_hour

T = datetime(2030, 1, 2, 12, 30, 0, tzinfo=UTC)
A1, A2 = "a1" * 32, "b2" * 32


def at(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


def status(group: str, connection: str = "c") -> messages.Status:
    return messages.Status(state="online", labels={"group": group}, connection=connection)


def tele(seq: int, rng: random.Random, artifact: str | None, version: str | None, **kw: object) -> messages.Telemetry:
    hist = histogram.empty()
    ok = rng.randint(0, 40)
    for _ in range(ok):
        hist[histogram.bucket_of(rng.lognormvariate(1.0, 0.8))] += 1
    errors = rng.randint(0, 3)
    return messages.Telemetry(seq=seq, interval_s=60.0, count=ok + errors, errors=errors, latency_hist=hist,
                              latency_sum_ms=float(ok), artifact=artifact, model_version=version, **kw)  # type: ignore[arg-type]


def quantiles(rows: list[messages.Telemetry]) -> dict[str, float | None]:
    total = [0] * histogram.N_BUCKETS
    for r in rows:  # merged by hand, not by the code under test
        total = [a + b for a, b in zip(total, r.latency_hist, strict=True)]
    return {k: histogram.quantile(total, q) for k, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99))}


def check(row: dict, raw: list[messages.Telemetry]) -> None:
    count, errors = sum(r.count for r in raw), sum(r.errors for r in raw)
    assert (row["inferences"], row["errors"]) == (count, errors)
    assert row["error_rate"] == (pytest.approx(errors / count) if count else None)
    for k, v in quantiles(raw).items():
        assert row[k] == (pytest.approx(v) if v is not None else None), k


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url, clock=lambda: T, baseline_intervals=3)
    try:
        yield s
    finally:
        s.close()


DEVICES = {"d1": ("lab", A1, "1"), "d2": ("lab", A2, "2"), "d3": ("field", A1, "1")}


@pytest.fixture
def fleet(store: Store) -> list[tuple[str, messages.Telemetry, datetime]]:
    """Three devices, 2 groups, 2 models, one row per minute for 5 hours, ingested in batches
    with redeliveries mixed in."""
    rng = random.Random(7)
    store.add_artifact(A1, 100, "digits", "1", "dynamic", at(-86400))
    store.add_artifact(A2, 100, "digits", "2", "int8", at(-86400))
    for d, (g, _, _) in DEVICES.items():
        store.status_online(d, status(g), at(-5 * 3600 - 60))
    rows = []
    for minute in range(300):
        for d, (_, art, ver) in DEVICES.items():
            if d == "d2" and minute < 100:  # d2 ran model 1 first, then model 2
                art, ver = A1, "1"
            rows.append((d, tele(minute, rng, art, ver), at(-5 * 3600 + minute * 60 + rng.random())))
    batch: list = []
    for i, r in enumerate(rows):
        batch.append(r)
        if i % 7 == 0:
            batch.append((r[0], r[1], r[2] + timedelta(seconds=1)))  # redelivered
        if len(batch) >= 97:
            results = store.ingest(batch)
            assert results.count("duplicate") == sum(1 for j in range(len(batch)) if j and batch[j][1] is batch[j - 1][1])
            batch = []
    store.ingest(batch)
    return rows


def test_raw_window_per_device_group_and_model(store: Store, fleet: list) -> None:
    window = 2 * 3600
    since = T - timedelta(seconds=window)
    inside = [(d, m) for d, m, t in fleet if since <= t <= T]
    h = store.fleet_health(window, T, by="group")
    assert h["source"] == "raw"
    for row in h["devices"]:
        check(row, [m for d, m in inside if d == row["id"]])
    groups = {r["group"]: r for r in h["rows"]}
    for g in ("lab", "field"):
        check(groups[g], [m for d, m in inside if DEVICES[d][0] == g])
        assert groups[g]["devices"] == sum(1 for v in DEVICES.values() if v[0] == g)
    check(h["fleet"], [m for _, m in inside])
    by_model = {(r["model"], r["version"]): r for r in store.fleet_health(window, T, by="model")["rows"]}
    for ver, art in (("1", A1), ("2", A2)):
        check(by_model[("digits", ver)], [m for _, m in inside if m.artifact == art])
        assert by_model[("digits", ver)]["devices"] == len({d for d, m in inside if m.artifact == art})
    only = store.fleet_health(window, T, group="lab", model="digits:2")
    assert [r["id"] for r in only["devices"]] == ["d2"]
    check(only["devices"][0], [m for d, m in inside if d == "d2" and m.artifact == A2])
    # d2 ran model 1 only before this window
    assert [r["id"] for r in store.fleet_health(window, T, model=A1[:8])["devices"]] == ["d1", "d3"]


def test_long_window_comes_from_hourly_rollups(store: Store, fleet: list) -> None:
    h = store.fleet_health(4 * 3600 + 600, T)
    since = floor_hour(T - timedelta(seconds=4 * 3600 + 600))
    assert h["source"] == "hourly" and h["since"] == since.isoformat()
    for row in h["devices"]:
        check(row, [m for d, m, t in fleet if d == row["id"] and t >= since])
    with store.engine.connect() as conn:  # the documented views agree with the raw rows
        views = conn.execute(sa.text("SELECT model_version, SUM(inferences), SUM(errors) FROM model_latency "
                                     "GROUP BY model_version ORDER BY model_version")).all()
        assert [(v, int(n), int(e)) for v, n, e in views] == [
            (ver, sum(m.count for _, m, _ in fleet if m.model_version == ver),
             sum(m.errors for _, m, _ in fleet if m.model_version == ver)) for ver in ("1", "2")]
        assert conn.execute(sa.text("SELECT COUNT(*) FROM latency_buckets")).scalar() == histogram.N_BUCKETS


def test_retention_keeps_rollups_answering(store: Store, fleet: list) -> None:
    deleted = store.apply_retention(raw_s=3600, rollup_s=30 * 86400, now=T)
    assert deleted["telemetry"] == sum(1 for _, _, t in fleet if t < T - timedelta(hours=1))
    assert deleted["telemetry_hourly"] == 0
    row = next(r for r in store.fleet_health(6 * 3600, T)["devices"] if r["id"] == "d1")
    check(row, [m for d, m, _ in fleet if d == "d1"])
    assert store.apply_retention(raw_s=3600, rollup_s=600, now=T + timedelta(hours=3))["telemetry_hourly"] > 0


def test_availability_on_a_scripted_sequence_of_drops(store: Store) -> None:
    # pi-1: online -3600, last will at -3000, back at -2400 (new connection), timeout at -1200
    # after silence since -1300, heartbeat at -600 reopens. pi-2 (other group): always online.
    store.status_online("pi-1", status("lab", "c1"), at(-3600))
    store.status_offline("pi-1", at(-3000))
    store.status_online("pi-1", status("lab", "c2"), at(-2400))
    store.heartbeat("pi-1", messages.Heartbeat(uptime_s=1100.0), at(-1300))
    assert store.sweep(60, now=at(-1200)) == ["pi-1"]
    store.heartbeat("pi-1", messages.Heartbeat(uptime_s=5.0), at(-600))  # uptime went back: restart
    store.status_online("pi-2", status("field", "x"), at(-7200))
    h = store.fleet_health(3600, T, by="group")
    p1 = next(r for r in h["devices"] if r["id"] == "pi-1")
    up = 600 + 1200 + 600  # -3600..-3000, -2400..-1200, -600..0
    assert p1["availability"] == pytest.approx(up / 3600)
    assert p1["outages"] == 2 and p1["online"] is True and p1["restarts"] == 1
    assert p1["mtbf_s"] == pytest.approx(up / 2) and p1["mttr_s"] == pytest.approx((3600 - up) / 2)
    lab, field = (next(r for r in h["rows"] if r["group"] == g) for g in ("lab", "field"))
    assert lab["availability"] == pytest.approx(up / 3600) and field["availability"] == pytest.approx(1.0)
    assert h["fleet"]["availability"] == pytest.approx((up + 3600) / 7200)
    assert h["fleet"]["mtbf_s"] == pytest.approx((up + 3600) / 2)
    # a window inside the last outage only: 0 % available, no outage ended in it
    p1 = next(r for r in store.fleet_health(400, at(-700))["devices"] if r["id"] == "pi-1")
    assert p1["availability"] == pytest.approx(0.0) and p1["outages"] == 0 and p1["mttr_s"] is None
    detail = store.device_detail("pi-1", 3600, T)
    assert [e["kind"] for e in detail["events"]] == ["restart"]
    assert [s["end_reason"] for s in detail["sessions"]] == [None, "timeout", "offline"]


def test_accuracy_and_recall_join_feedback_to_predictions(store: Store) -> None:
    rng = random.Random(3)
    store.status_online("pi-1", status("lab"), at(-600))
    truth, preds = {}, []
    for seq in range(4):
        pairs = []
        for i in range(50):
            rid = f"{seq:02d}{i:030x}"
            label = rng.randrange(4)
            predicted = label if rng.random() < 0.8 else rng.randrange(4)
            pairs.append([rid, predicted])
            if rng.random() < 0.7:
                truth[rid] = label
            preds.append((rid, predicted))
        store.ingest([("pi-1", tele(seq, rng, A1, "1", predictions=pairs), at(-500 + seq * 60))])
    res = store.add_feedback([(*x, ) for x in truth.items()] + [("nobody-asked", 1)], at(-10))
    assert res == {"stored": len(truth) + 1, "matched": len(truth)}
    labelled = [(p, truth[r]) for r, p in preds if r in truth]
    acc = sum(p == t for p, t in labelled) / len(labelled)
    classes = sorted({t for _, t in labelled})
    recall = sum(sum(p == t == c for p, t in labelled) / sum(t == c for _, t in labelled) for c in classes) / len(classes)
    row = store.fleet_health(3600, T)["devices"][0]
    assert row["labelled"] == len(labelled)
    assert row["accuracy"] == pytest.approx(acc) and row["recall"] == pytest.approx(recall)


def _psi(e: list[int], a: list[int]) -> float:
    ep = [max(x / sum(e), 1e-4) for x in e]
    ap = [max(x / sum(a), 1e-4) for x in a]
    return sum((y - x) * math.log(y / x) for x, y in zip(ep, ap, strict=True))


def test_drift_against_the_fleet_baseline(store: Store) -> None:
    rng = np.random.default_rng(0)
    store.status_online("pi-1", status("lab"), at(-7200))
    store.status_online("pi-2", status("lab"), at(-7200))

    def summary(shift: float) -> dict[str, list[int]]:
        x = rng.normal(shift, 1.0, (200, 8))
        y = np.eye(4)[rng.integers(0, 4 if shift == 0 else 2, 200)]
        parts = [drift.summarize(x[i:i + 1], y[i:i + 1]) for i in range(200)]
        return drift.merge({f: p[f].tolist() for f in drift.FIELDS} for p in parts)

    base = [summary(0.0) for _ in range(3)]
    for i, sm in enumerate(base):  # the first 3 intervals (baseline_intervals=3) make the baseline
        store.ingest([("pi-1", tele(i, random.Random(i), A1, "1", drift=sm), at(-7000 + i))])
    same, shifted = summary(0.0), summary(2.0)
    store.ingest([("pi-1", tele(10, random.Random(1), A1, "1", drift=same), at(-100)),
                  ("pi-2", tele(10, random.Random(2), A1, "1", drift=shifted), at(-100))])
    assert store.baseline(A1)["complete"] is True
    expected_base = drift.merge(base)
    assert store.baseline(A1)["summary"] == expected_base
    rows = {r["id"]: r for r in store.fleet_health(600, T)["devices"]}
    for dev, sm in (("pi-1", same), ("pi-2", shifted)):
        want = max(_psi(expected_base[f], sm[f]) for f in drift.FIELDS)
        assert rows[dev]["drift_psi"] == pytest.approx(want, abs=1e-3)
    assert rows["pi-1"]["drift"] is False and rows["pi-2"]["drift"] is True

"""``fleet health`` over 1,000 devices x 1 day of 60-second aggregates (1.44 M raw rows).

    .venv/bin/python benchmarks/health_query.py [--db sqlite|postgresql|both|URL] [--devices 1000] [--minutes 1440]

Loads the rows through ``Store.ingest`` (the server's batched ingest path, which also maintains
the hourly rollups), then times ``fleet_health`` for a 24 h window (served from the hourly
rollups), per device, per group and per model, plus a 1 h window (served exactly from raw
rows). Reports the best of 3 runs after one warm-up, and checks the totals against the count
of what was loaded.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import sqlalchemy as sa
from _databases import fresh_database, targets

from sdk.protocol import histogram, messages
from server.store import Store

NOW = datetime(2030, 6, 1, 23, 59, 30, tzinfo=UTC)
ARTS = ("aa" * 32, "bb" * 32)


def load(store: Store, devices: int, minutes: int) -> int:
    rng = np.random.default_rng(1)
    start = NOW - timedelta(minutes=minutes)
    store.add_artifact(ARTS[0], 1, "digits", "1", "dynamic", start)
    store.add_artifact(ARTS[1], 1, "digits", "2", "int8", start)
    for d in range(devices):
        store.status_online(f"dev-{d:04d}", messages.Status(state="online", labels={"group": f"g{d % 10}"},
                                                            connection="c"), start)
    total, batch, t0 = 0, [], time.time()
    for minute in range(minutes):
        at = start + timedelta(minutes=minute, seconds=random.random())
        buckets = rng.integers(25, 45, size=(devices, 30))
        for d in range(devices):
            hist = np.bincount(buckets[d], minlength=histogram.N_BUCKETS).tolist()
            art = ARTS[d % 2]
            batch.append((f"dev-{d:04d}", messages.Telemetry(
                seq=minute, interval_s=60.0, count=31, errors=1, latency_hist=hist, latency_sum_ms=30.0,
                artifact=art, model_version="1" if art == ARTS[0] else "2"), at))
        if len(batch) >= 5000:
            store.ingest(batch)
            total += len(batch)
            batch = []
    if batch:
        store.ingest(batch)
        total += len(batch)
    print(f"  loaded {total:,} rows through Store.ingest in {time.time() - t0:.0f} s", flush=True)
    return total


def best(fn, runs: int = 3) -> tuple[float, dict]:  # type: ignore[no-untyped-def,type-arg]
    fn()
    times, out = [], {}
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run(url: str, devices: int, minutes: int) -> None:
    store = Store(url, clock=lambda: NOW)
    try:
        total = load(store, devices, minutes)
        with store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT COUNT(*) FROM telemetry")).scalar()
            rollups = conn.execute(sa.text("SELECT COUNT(*) FROM telemetry_hourly")).scalar()
        name = store.engine.dialect.name
        print(f"{name}: {rows:,} raw rows, {rollups:,} hourly rollup rows", flush=True)
        for label, kw in (("24h by device", {}), ("24h by group", {"by": "group"}),
                          ("24h by model", {"by": "model"}), ("24h --group g3", {"group": "g3"})):
            secs, out = best(lambda kw=kw: store.fleet_health(86400, NOW, **kw))
            assert out["source"] == "hourly"
            if not kw:
                assert out["fleet"]["inferences"] == 31 * total, (out["fleet"]["inferences"], 31 * total)
            print(f"  fleet health {label:15s}: {secs * 1000:7.1f} ms ({len(out['devices'])} devices)", flush=True)
        secs, out = best(lambda: store.fleet_health(3600, NOW))
        assert out["source"] == "raw"
        print(f"  fleet health 1h (raw rows)  : {secs * 1000:7.1f} ms ({out['fleet']['inferences']:,} inferences)",
              flush=True)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="both")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--minutes", type=int, default=1440)
    args = ap.parse_args()
    for target in targets(args.db):
        with fresh_database(target) as url:
            run(url, args.devices, args.minutes)


if __name__ == "__main__":
    main()

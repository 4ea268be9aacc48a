"""Telemetry ingestion from a real Mosquitto into the store: messages/s sustained, no loss.

    .venv/bin/python benchmarks/ingest.py [--db sqlite|postgresql|URL] [--messages 100000] [--devices 1000]

A publisher process (paho, QoS 1) sends ``--messages`` telemetry aggregates (72-bucket
histograms, as agents send them) from ``--devices`` devices as fast as the broker takes them;
the server's MQTT side (paho callback → bounded queue → batched ingest worker) stores them. The
rate is stored rows / time from the first publish to the last row committed; "no loss" means
rows in the table == messages sent. Prints one line per database.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa
from _databases import fresh_database, targets

from sdk.protocol import histogram, messages, topics
from server.broker import find_mosquitto, free_port, port_accepts, render_config


def payloads(n: int, devices: int) -> list[tuple[str, bytes]]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        dev, seq = f"bench-{i % devices:04d}", i // devices
        hist = histogram.empty()
        for _ in range(rng.randint(5, 60)):
            hist[rng.randrange(25, 45)] += 1
        ok = sum(hist)
        msg = messages.Telemetry(seq=seq, interval_s=60.0, count=ok + 1, errors=1, latency_hist=hist,
                                 latency_sum_ms=float(ok), cpu_percent=12.5, rss_bytes=50_000_000,
                                 artifact="ab" * 32, model_version="1.0.0")
        out.append((topics.telemetry(dev), msg.encode()))
    return out


def publisher(port: int, items: list[tuple[str, bytes]], start: mp.Event, done: mp.Queue) -> None:  # type: ignore[type-arg]
    import paho.mqtt.client as mqtt

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    start.wait()
    t0 = time.time()
    window: deque = deque()  # paho's message ids wrap at 65535: keep fewer than that unacknowledged
    for t, p in items:
        if len(window) >= 20000:
            window.popleft().wait_for_publish(120)
        window.append(c.publish(t, p, qos=1))
    for info in window:
        info.wait_for_publish(120)
    done.put((t0, time.time()))
    c.loop_stop()
    c.disconnect()


def run(db_url: str, n: int, devices: int, broker_port: int) -> None:
    from server.config import Config
    from server.mqtt import MqttSide
    from server.service import Service
    from server.store import Store

    store = Store(db_url)
    service = Service(Config(data_dir=Path(tempfile.mkdtemp()), db_url=db_url), store)
    side = MqttSide(service, f"mqtt://127.0.0.1:{broker_port}")
    side.start()
    try:
        now = service.clock()
        for d in range(devices):
            store.status_online(f"bench-{d:04d}", messages.Status(state="online", connection="b"), now)
        items = payloads(n, devices)
        start, done = mp.Event(), mp.Queue()
        proc = mp.get_context("fork").Process(target=publisher, args=(broker_port, items, start, done))
        proc.start()
        time.sleep(1.0)
        start.set()
        deadline = time.time() + 600
        while service.info()["ingest"].get("telemetry_stored", 0) + sum(service.rejected().values()) < n:
            if time.time() > deadline or (not proc.is_alive() and proc.exitcode):
                raise SystemExit(f"stopped: publisher exit code {proc.exitcode}, "
                                 f"stored {service.info()['ingest'].get('telemetry_stored', 0)} of {n}")
            time.sleep(0.01)
        t_end = time.time()
        t0, t_pub = done.get(timeout=60)
        proc.join(10)
        with store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT COUNT(*) FROM telemetry")).scalar()
            rolled = conn.execute(sa.text("SELECT SUM(intervals) FROM telemetry_hourly")).scalar()
        dialect = store.engine.dialect.name
        print(f"{dialect:10s}: {n:,} telemetry messages from {devices} devices in {t_end - t0:.2f} s = "
              f"{n / (t_end - t0):,.0f} msg/s stored (publisher done after {t_pub - t0:.2f} s); "
              f"rows {rows:,} == sent {n:,}: {rows == n}; rollup intervals {rolled:,}; "
              f"rejected {service.rejected() or 'none'}; batches {service.info()['ingest'].get('batches')}",
              flush=True)
    finally:
        side.stop()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="both", help="sqlite | postgresql | both | a SQLAlchemy URL")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--devices", type=int, default=1000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgectl-ingest-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(render_config(port, work, persistence=False))
    broker = subprocess.Popen([find_mosquitto(), "-c", str(work / "mosquitto.conf")])
    try:
        for _ in range(100):
            if port_accepts(port):
                break
            time.sleep(0.05)
        for target in targets(args.db):
            with fresh_database(target) as url:
                run(url, args.messages, args.devices, port)
    finally:
        broker.terminate()
        broker.wait(10)


if __name__ == "__main__":
    main()

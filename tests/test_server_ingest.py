"""Telemetry ingestion at scale: the receive-only MQTT client, ingest workers sharing one
subscription (in threads, then as processes), several writers on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa

from sdk.protocol import histogram, messages, topics
from server.config import Config
from server.ingest import (
    WORKER_KINDS,
    IngestWorkers,
    TelemetryConsumer,
    retire_sessions,
    worker_client_id,
    worker_group,
)
from server.mqtt import MqttSide
from server.mqttlite import Subscriber
from server.service import INGESTED, Service
from server.store import Store, utcnow

T = TypeVar("T")


def wait_for(fn: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout}s (last value {value!r})")
        time.sleep(0.02)


def publisher(broker: Any) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    wait_for(c.is_connected, 5, "publisher connected")
    return c


def publish_all(c: mqtt.Client, items: list[tuple[str, bytes]], qos: int = 1) -> None:
    infos = [c.publish(t, p, qos=qos) for t, p in items]
    for info in infos:
        info.wait_for_publish(10)


def telemetry(seq: int, ms: list[float], errors: int = 0, health: dict[str, Any] | None = None) -> messages.Telemetry:
    hist = histogram.empty()
    for v in ms:
        hist[histogram.bucket_of(v)] += 1
    return messages.Telemetry(seq=seq, interval_s=5.0, count=len(ms) + errors, errors=errors, latency_hist=hist,
                              latency_sum_ms=float(sum(ms)), health=health)


def device_row(store: Store, device_id: str) -> tuple[Any, ...]:
    """(health, last_seen) as stored."""
    with store.engine.connect() as conn:
        h, seen = conn.execute(sa.text("SELECT health, last_seen FROM devices WHERE id = :d"), {"d": device_id}).one()
    return (json.loads(h) if isinstance(h, str) else h), seen


def rollups_match_raw(store: Store) -> tuple[int, bool]:
    with store.engine.connect() as conn:
        rows, count, errors = conn.execute(sa.text("SELECT COUNT(*), SUM(count), SUM(errors) FROM telemetry")).one()
        hist = [0] * histogram.N_BUCKETS
        for (h,) in conn.execute(sa.text("SELECT latency_hist FROM telemetry")):
            for i, v in enumerate(json.loads(h) if isinstance(h, str) else h):
                hist[i] += v
        buckets = ", ".join(f"SUM(b{i:02d})" for i in range(histogram.N_BUCKETS))
        r = conn.execute(sa.text(f"SELECT SUM(intervals), SUM(count), SUM(errors), {buckets} FROM telemetry_hourly")).one()
    return rows, (r[0], r[1], r[2], list(r[3:])) == (rows, count, errors, hist)


def test_subscriber_acknowledges_and_resumes_its_session(mosquitto: Any) -> None:
    root = f"t-{uuid.uuid4().hex[:8]}"
    sub = Subscriber(mosquitto.host, mosquitto.port, f"lite-{root}", [f"{root}/#"], clean_session=False)
    sub.connect()
    assert not sub.session_present
    pub = publisher(mosquitto)
    try:
        sent = [(f"{root}/a/{i}", f"m{i}".encode() * (i * 40 + 1)) for i in range(30)]  # up to ~4 KiB
        publish_all(pub, sent)
        pub.publish(f"{root}/q0", b"qos zero", qos=0).wait_for_publish(5)
        got: list[tuple[str, bytes]] = []
        wait_for(lambda: got.extend(sub.poll(0.1)) or len(got) >= 31, 10, "31 messages")
        # QoS 1 in order; the QoS 0 one may overtake them (the broker sends QoS 1 a window at a time)
        assert [g for g in got if "/a/" in g[0]] == sent and (f"{root}/q0", b"qos zero") in got
        sub.close()
        # While it is away the broker keeps QoS 1 messages for its session ...
        later = [(f"{root}/b/{i}", b"later %d" % i) for i in range(5)]
        publish_all(pub, later)
        sub.connect()
        assert sub.session_present
        got = []
        wait_for(lambda: got.extend(sub.poll(0.1)) or len(got) >= 5, 10, "queued messages")
        assert got == later
        # ... and what was acknowledged is not delivered again (given the broker the moment to
        # read the acknowledgements: Mosquitto drops unread bytes of a connection a new one with
        # the same client id takes over).
        sub.close()
        time.sleep(0.3)
        sub.connect()
        assert sub.poll(0.3) == []
    finally:
        sub.close()
        pub.disconnect()
        pub.loop_stop()
        Subscriber(mosquitto.host, mosquitto.port, f"lite-{root}", [], clean_session=True).connect()


def test_two_workers_share_telemetry_and_store_each_message_once(db_url: str, mosquitto: Any, tmp_path: Path) -> None:
    """Two consumers of one group (each with its own store connection, as two processes have):
    every message stored once, duplicates refused, rollups == raw, a device whose status comes
    after its first telemetry is held and then stored, an unknown one rejected."""
    group = worker_group(f"test-{uuid.uuid4().hex[:8]}")
    tag = uuid.uuid4().hex[:6]
    devices = [f"w{tag}-{i}" for i in range(3)]
    late, ghost = f"late{tag}", f"ghost{tag}"
    setup = Store(db_url)
    for d in devices:
        setup.status_online(d, messages.Status(state="online"), utcnow())
    services, consumers = [], []
    for i in range(2):
        svc = Service(Config(data_dir=tmp_path / f"w{i}", db_url=db_url), Store(db_url, upgrade=False))
        c = TelemetryConsumer(svc, mosquitto.url, f"{group}-{i}", group, hold_s=1.5)
        c.start()
        services.append(svc)
        consumers.append(c)
    pub = publisher(mosquitto)
    try:
        items = [(topics.telemetry(d), telemetry(s, [1.0 + s % 7, 30.0], errors=s % 2,
                                                 health={"seq": s}).encode())
                 for s in range(99) for d in devices]
        items += [(topics.telemetry(d), telemetry(s, [1.0 + s % 7, 30.0], errors=s % 2).encode())
                  for s in range(10) for d in devices]  # redelivered copies
        items += [(topics.telemetry(late), telemetry(s, [5.0]).encode()) for s in range(10)]
        items += [(topics.telemetry(ghost), telemetry(s, [5.0]).encode()) for s in range(5)]
        publish_all(pub, items)
        time.sleep(0.3)
        setup.status_online(late, messages.Status(state="online"), utcnow())  # its status arrives late

        def totals() -> tuple[int, int, int]:
            stored = sum(s.info()["ingest"].get("telemetry_stored", 0) for s in services)
            rej = [s.rejected() for s in services]
            return stored, sum(r.get("duplicate", 0) for r in rej), sum(r.get("unknown_device", 0) for r in rej)

        wait_for(lambda: totals() == (307, 30, 5), 15, "307 stored, 30 duplicates, 5 unknown")
        publish_all(pub, [(topics.telemetry(d), telemetry(99, [1.0], health={"seq": "last"}).encode())
                          for d in devices])
        wait_for(lambda: totals()[0] == 310, 10, "310 stored")
        assert all(s.info()["ingest"].get("telemetry_stored", 0) > 0 for s in services)  # both took a share
        rows, same = rollups_match_raw(setup)
        assert rows == 310 and same
        for d in devices:
            assert device_row(setup, d)[0] == {"seq": "last"}
    finally:
        for c in consumers:
            c.stop()
        pub.disconnect()
        pub.loop_stop()
        for i in range(2):
            Subscriber(mosquitto.host, mosquitto.port, f"{group}-{i}", [], clean_session=True).connect()
        for s in services:
            s.store.close()
        setup.close()


def test_batches_committed_out_of_order_never_move_a_device_back(db_url: str) -> None:
    store = Store(db_url)
    try:
        t0 = utcnow().replace(microsecond=0)
        store.status_online("pi-1", messages.Status(state="online"), t0)
        store.ingest([("pi-1", telemetry(2, [1.0], health={"v": 2}), t0 + timedelta(seconds=20))])
        store.ingest([("pi-1", telemetry(1, [1.0], health={"v": 1}), t0 + timedelta(seconds=10))])  # older, later
        health, seen = device_row(store, "pi-1")
        assert health == {"v": 2}
        assert str(seen).startswith(str(t0.replace(tzinfo=None) + timedelta(seconds=20)))
    finally:
        store.close()


def test_one_message_the_database_refuses_costs_only_itself(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'b.db'}")
    svc = Service(Config(data_dir=tmp_path, db_url=""), store)
    store.status_online("pi-1", messages.Status(state="online"), utcnow())
    real = store.ingest

    def refuse_seq_13(tele: Any, beats: Any = ()) -> Any:
        if any(m.seq == 13 for _, m, _ in tele):
            raise sa.exc.DataError("INSERT", {}, ValueError("value out of range"))
        return real(tele, beats)

    store.ingest = refuse_seq_13  # type: ignore[method-assign]
    now = utcnow()
    svc.handle_batch([(topics.telemetry("pi-1"), telemetry(s, [1.0]).encode(), now) for s in range(40)])
    assert svc.info()["ingest"]["telemetry_stored"] == 39
    assert svc.rejected() == {"internal_error": 1}
    # a database that is down fails the batch once, without trying every half of it
    calls = []

    def down(tele: Any, beats: Any = ()) -> Any:
        calls.append(len(tele))
        raise sa.exc.OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))

    store.ingest = down  # type: ignore[method-assign]
    svc.handle_batch([(topics.telemetry("pi-1"), telemetry(s, [1.0]).encode(), now) for s in range(40, 80)])
    assert calls == [40] and svc.rejected() == {"internal_error": 41}
    store.close()


@pytest.mark.integration
def test_ingest_worker_processes_restart_and_lose_nothing(mosquitto: Any, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'edgectl.db'}"
    store = Store(db_url)
    service = Service(Config(data_dir=tmp_path / "data", db_url=db_url), store)
    (tmp_path / "data").mkdir()
    side = MqttSide(service, mosquitto.url, client_id=f"srv-{uuid.uuid4().hex[:8]}", session_expiry_s=0,
                    kinds=[k for k in INGESTED if k not in WORKER_KINDS])
    side.start()
    workers = IngestWorkers(service, mosquitto.url, 2, base_client_id=side.client_id)
    dev = f"proc-{uuid.uuid4().hex[:8]}"
    pub = publisher(mosquitto)
    try:
        workers.start()
        service.queue_depth = lambda: side.queue.qsize() + workers.depth()
        pub.publish(topics.status(dev), messages.Status(state="online").encode(), qos=1).wait_for_publish(5)
        wait_for(lambda: service.known_device(dev), 10, "status stored by the server process")
        publish_all(pub, [(topics.telemetry(dev), telemetry(s, [2.0]).encode()) for s in range(200)])
        wait_for(lambda: service.info()["ingest"].get("telemetry_stored") == 200, 15, "200 stored")

        pid = workers._procs[0][0].pid
        os.kill(pid, signal.SIGKILL)  # its share of what follows waits in its broker session
        publish_all(pub, [(topics.telemetry(dev), telemetry(s, [2.0]).encode()) for s in range(200, 400)])
        wait_for(lambda: service.info()["ingest"].get("telemetry_stored") == 400, 20, "400 stored after a restart")
        assert workers.restarts == 1 and workers._procs[0][0].pid != pid
        assert service.rejected() == {}  # the server process itself took no telemetry: no duplicates
        rows, same = rollups_match_raw(store)
        assert rows == 400 and same
    finally:
        workers.stop()
        assert sorted(retire_sessions(service.config, mosquitto.url, side.client_id, keep=0)) == \
            [worker_client_id(side.client_id, i) for i in range(2)]
        assert not (tmp_path / "data" / "ingest-workers").exists()
        pub.disconnect()
        pub.loop_stop()
        side.stop()
        store.close()


@pytest.mark.integration
def test_server_cli_with_ingest_workers(mosquitto: Any, tmp_path: Path) -> None:
    """``edgectl-server --ingest-workers 2``: telemetry goes to the workers, /v1/info counts it,
    SIGTERM stops everything cleanly; a restart without workers retires their sessions."""
    import httpx

    from tests.test_server_process import ServerProcess

    dev = f"cli-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(tmp_path, "--broker", mosquitto.url, "--http", "127.0.0.1:0", "--ingest-workers", "2",
                           "--public-read")
    pub = publisher(mosquitto)
    try:
        ready = server.wait_ready(30)
        assert (server.data / "ingest-workers").read_text().strip() == "2"
        pub.publish(topics.status(dev), messages.Status(state="online").encode(), qos=1).wait_for_publish(5)
        with httpx.Client(base_url=ready["http"], timeout=10) as http:
            wait_for(lambda: http.get(f"/v1/devices/{dev}").status_code == 200, 10, "device known")
            publish_all(pub, [(topics.telemetry(dev), telemetry(s, [3.0]).encode()) for s in range(50)])
            info = wait_for(lambda: (i := http.get("/v1/info").json())["ingest"].get("telemetry_stored") == 50 and i,
                            10, "50 stored")
            assert info["rejected"] == {} and info["queue_depth"] == 0
            assert "edgectl_telemetry_stored_total 50" in http.get("/metrics").text
        assert server.terminate(timeout=30) == 0
        assert "Traceback" not in server.stderr()
    finally:
        server.close()
    (tmp_path / "again").mkdir()
    again = ServerProcess(tmp_path / "again", "--data", str(server.data), "--broker", mosquitto.url,
                          "--http", "127.0.0.1:0")
    try:
        again.wait_ready(30)
        assert not (server.data / "ingest-workers").exists()
        assert again.stderr().count("retired the MQTT session of ingest worker") == 2
        assert again.terminate(timeout=30) == 0
    finally:
        again.close()
        pub.disconnect()
        pub.loop_stop()

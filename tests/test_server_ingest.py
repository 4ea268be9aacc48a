"""Telemetry ingestion at scale: the receive-only MQTT client, ingest workers sharing one
subscription (in threads, then as processes), several writers on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import struct
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

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
from tests.conftest import wait_for


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


def test_subscriber_acknowledges_only_what_it_is_told_to(mosquitto: Any) -> None:
    """``receive`` hands messages over unacknowledged; ``ack`` sends the PUBACKs of some; the
    broker delivers the rest again on the next connection, and old tokens are never sent."""
    root = f"t-{uuid.uuid4().hex[:8]}"
    sub = Subscriber(mosquitto.host, mosquitto.port, f"lite-{root}", [f"{root}/#"], clean_session=False)
    sub.connect()
    pub = publisher(mosquitto)
    try:
        sent = [(f"{root}/{i}", b"m%d" % i) for i in range(10)]
        publish_all(pub, sent)
        got: list[tuple[str, bytes, int]] = []
        wait_for(lambda: got.extend(sub.receive(0.1)) or len(got) >= 10, 10, "10 messages")
        assert [(t, p) for t, p, _ in got] == sent and all(token for *_, token in got)
        assert sub.ack(token for *_, token in got[:4]) == 4  # only the first four were stored
        time.sleep(0.3)  # let the broker read them before this connection is replaced
        sub.close()
        sub.connect()
        assert sub.session_present
        again: list[tuple[str, bytes, int]] = []
        wait_for(lambda: again.extend(sub.receive(0.1)) or len(again) >= 6, 10, "6 messages again")
        assert [(t, p) for t, p, _ in again] == sent[4:]
        assert sub.ack(token for *_, token in got) == 0, "a packet id of an earlier connection is never acknowledged"
        assert sub.ack(token for *_, token in again) == 6
        time.sleep(0.3)
        sub.close()
        sub.connect()
        assert sub.receive(0.3) == []
    finally:
        sub.close()
        pub.disconnect()
        pub.loop_stop()
        Subscriber(mosquitto.host, mosquitto.port, f"lite-{root}", [], clean_session=True).connect()


def _refusing(store: Store, times: int = 0, until: threading.Event | None = None) -> list[int]:
    """Make ``store.ingest`` fail as a database that is away does, ``times`` times or until
    ``until`` is set; returns the sizes of the batches it was given."""
    real, calls = store.ingest, []

    def ingest(tele: Any, beats: Any = ()) -> Any:
        calls.append(len(tele))
        if len(calls) <= times or (until is not None and not until.is_set()):
            raise sa.exc.OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))
        return real(tele, beats)

    store.ingest = ingest  # type: ignore[method-assign]
    return calls


def test_a_batch_the_database_cannot_take_is_handed_back_in_order(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    svc = Service(Config(data_dir=tmp_path, db_url=""), store)
    store.status_online("pi-1", messages.Status(state="online"), utcnow())
    calls = _refusing(store, 1)
    now = utcnow()
    items = [(topics.telemetry("pi-1"), telemetry(s, [1.0]).encode(), now) for s in range(5)]
    items.append((topics.telemetry("pi-1"), b"{not json", now))
    items.append((topics.status("pi-2"), messages.Status(state="online").encode(), now))
    items += [(topics.telemetry("pi-2"), telemetry(s, [1.0]).encode(), now) for s in range(3)]
    left = svc.handle_batch(items, defer_unavailable=True)
    # the failed run and everything after it (the status first): nothing is counted as lost
    assert left == [0, 1, 2, 3, 4, 6, 7, 8, 9] and calls == [5]
    assert svc.rejected() == {"bad_message": 1} and not store.device_exists("pi-2")
    assert svc.handle_batch([items[i] for i in left], defer_unavailable=True) == []
    assert svc.info()["ingest"]["telemetry_stored"] == 8 and svc.rejected() == {"bad_message": 1}
    store.close()


@pytest.mark.integration
def test_mqtt_side_acknowledges_only_after_the_database_took_the_batch(mosquitto: Any, tmp_path: Path) -> None:
    """While the database refuses the batch it is offered again (backoff) and not acknowledged, so
    a server stopped meanwhile gets it all again at its next start; stored, it is acknowledged."""
    db_url = f"sqlite:///{tmp_path / 'a.db'}"
    (tmp_path / "data").mkdir()
    store = Store(db_url)
    cid, dev = f"srv-{uuid.uuid4().hex[:8]}", f"ack-{uuid.uuid4().hex[:8]}"

    def side(expiry: int = 60) -> tuple[Service, MqttSide]:
        svc = Service(Config(data_dir=tmp_path / "data", db_url=db_url), store)
        s = MqttSide(svc, mosquitto.url, client_id=cid, session_expiry_s=expiry)
        s.start()
        return svc, s

    service, mqtt_side = side()
    pub = publisher(mosquitto)
    try:
        pub.publish(topics.status(dev), messages.Status(state="online").encode(), qos=1).wait_for_publish(5)
        wait_for(lambda: service.known_device(dev), 10, "status stored")
        healed = threading.Event()
        calls = _refusing(store, until=healed)
        publish_all(pub, [(topics.telemetry(dev), telemetry(s, [2.0]).encode()) for s in range(50)])
        wait_for(lambda: len(calls) >= 2, 10, "two attempts")  # offered again after a backoff
        mqtt_side.stop()
        assert service.info()["ingest"] == {} and service.rejected() == {}
        healed.set()
        service, mqtt_side = side()
        wait_for(lambda: service.info()["ingest"].get("telemetry_stored") == 50, 10, "50 stored after a restart")
        assert service.rejected() == {}
        mqtt_side.stop()
        service, mqtt_side = side(expiry=0)
        time.sleep(0.5)
        assert service.info()["ingest"] == {} and service.rejected() == {}, "nothing was left unacknowledged"
        assert rollups_match_raw(store) == (50, True)
    finally:
        mqtt_side.stop()
        pub.disconnect()
        pub.loop_stop()
        store.close()


@pytest.mark.integration
def test_ingest_worker_acknowledges_only_after_the_database_took_the_batch(mosquitto: Any, tmp_path: Path) -> None:
    """An ingest worker (MQTT 3.1.1, ``TelemetryConsumer``) stopped while the database is away
    has acknowledged nothing: the next one gets every message again, stores it, acknowledges it."""
    db_url = f"sqlite:///{tmp_path / 'w.db'}"
    store = Store(db_url)
    dev, cid = f"wack-{uuid.uuid4().hex[:8]}", f"wk-{uuid.uuid4().hex[:8]}"
    store.status_online(dev, messages.Status(state="online"), utcnow())
    healed = threading.Event()
    calls = _refusing(store, until=healed)

    def consumer() -> tuple[Service, TelemetryConsumer]:
        svc = Service(Config(data_dir=tmp_path, db_url=db_url), store)
        c = TelemetryConsumer(svc, mosquitto.url, cid, worker_group(cid))
        c.start()
        return svc, c

    svc, c = consumer()
    pub = publisher(mosquitto)
    try:
        publish_all(pub, [(topics.telemetry(dev), telemetry(s, [2.0]).encode()) for s in range(50)])
        wait_for(lambda: len(calls) >= 2, 10, "two attempts")  # offered again after a backoff
        c.stop()  # its last attempt fails too
        assert svc.info()["ingest"] == {} and svc.rejected() == {}
        healed.set()
        svc, c = consumer()
        wait_for(lambda: svc.info()["ingest"].get("telemetry_stored") == 50, 10, "50 stored after a restart")
        assert svc.rejected() == {}
        c.stop()
        svc, c = consumer()
        time.sleep(0.5)
        assert svc.info()["ingest"] == {} and svc.rejected() == {}, "nothing was left unacknowledged"
        assert rollups_match_raw(store) == (50, True)
    finally:
        c.stop()
        pub.disconnect()
        pub.loop_stop()
        Subscriber(mosquitto.host, mosquitto.port, cid, [], clean_session=True).connect()
        store.close()


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


# -- acknowledge after commit: kill -9 under load loses nothing ------------------------------------


def _mqtt_packet(kind: int, body: bytes) -> bytes:
    n, head = len(body), bytearray([kind])
    while True:
        n, b = divmod(n, 128)
        head.append(b | (0x80 if n else 0))
        if not n:
            return bytes(head) + body


def _mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def burst(broker: Any, items: list[tuple[str, bytes]], window: int = 2000) -> None:
    """Publish QoS 1 as fast as the broker acknowledges (raw MQTT 3.1.1: a paho publisher costs
    ~150 µs a message, too slow to pile up a backlog in the server)."""
    with socket.create_connection((broker.host, broker.port), timeout=30) as sock:
        sock.sendall(_mqtt_packet(0x10, b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 60)
                                  + _mqtt_str(f"burst-{uuid.uuid4().hex[:8]}")))
        assert sock.recv(4) == b"\x20\x02\x00\x00", "CONNACK"
        acked, rest = 0, b""

        def read_acks() -> None:
            nonlocal acked, rest
            data = rest + sock.recv(65536)
            whole = len(data) - len(data) % 4
            assert data[0:whole:4].count(0x40) == whole // 4, "only PUBACKs come back"
            acked, rest = acked + whole // 4, data[whole:]

        for start in range(0, len(items), 500):
            part = items[start:start + 500]
            sock.sendall(b"".join(_mqtt_packet(0x32, _mqtt_str(t) + struct.pack(">H", (start + k) % 65535 + 1) + p)
                                  for k, (t, p) in enumerate(part)))
            while start + len(part) - acked > window:
                read_acks()
        while acked < len(items):
            read_acks()
        sock.sendall(b"\xe0\x00")


def _rows(db: Path, prefix: str) -> tuple[int, int]:
    """(telemetry rows, distinct (device, seq)) of the devices named ``prefix...``."""
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute("SELECT COUNT(*), COUNT(DISTINCT device_id || '/' || seq) FROM telemetry "
                            "WHERE device_id LIKE ?", (prefix + "%",)).fetchone()


def _kill_under_load(mosquitto: Any, tmp_path: Path, workers: int) -> None:
    """A real server (``--ingest-workers N``) takes a burst of telemetry; once part of it is
    stored, ``kill -9`` the server (N = 0) or one worker; every message ends up stored once.

    Just before the kill the test holds SQLite's write lock for a second: the victim has taken
    messages it cannot commit, and the broker has had the time to read any PUBACK it was sent
    for them (acknowledged on receipt, they would be lost: the test fails then). Without the
    pause a kill under full load often hides that loss: the broker reads one packet per socket
    per loop, and PUBACKs it has not read when the killed process's connection is reset are
    dropped, so it delivers those messages again."""
    import httpx

    from tests.test_server_process import ServerProcess

    tag = f"k{uuid.uuid4().hex[:6]}-"
    devices, per_device = [f"{tag}{i:02d}" for i in range(40)], 400
    sent = len(devices) * per_device
    args = ["--broker", mosquitto.url, "--http", "127.0.0.1:0", "--public-read", "--heartbeat-timeout", "60",
            *(["--ingest-workers", str(workers)] if workers else [])]
    (tmp_path / "one").mkdir()
    server = ServerProcess(tmp_path / "one", *args)
    again: ServerProcess | None = None
    db = server.data / "edgectl.db"
    try:
        ready = server.wait_ready(30)
        burst(mosquitto, [(topics.status(d), messages.Status(state="online").encode()) for d in devices])
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            wait_for(lambda: conn.execute("SELECT COUNT(*) FROM devices WHERE id LIKE ?", (tag + "%",)).fetchone()[0]
                     == len(devices), 10, "statuses stored")
        tele = [(topics.telemetry(d), telemetry(s, [1.0 + s % 9]).encode()) for s in range(per_device) for d in devices]
        pusher = threading.Thread(target=burst, args=(mosquitto, tele), daemon=True)
        pusher.start()
        with httpx.Client(base_url=ready["http"], timeout=5) as http:
            wait_for(lambda: _rows(db, tag)[0] >= sent // 5, 20, "a fifth stored")
            if workers:
                victim = next(p for p in _children(server.proc.pid) if "spawn_main" in _cmdline(p))
            else:
                victim = server.proc.pid
            with contextlib.closing(sqlite3.connect(db, timeout=10, isolation_level=None)) as lock:
                lock.execute("BEGIN IMMEDIATE")  # commits wait (busy timeout 10 s); reads go on
                time.sleep(1.0)
                backlog = http.get("/v1/info").json()["queue_depth"]
                at_kill = _rows(db, tag)[0]
                os.kill(victim, signal.SIGKILL)
                lock.execute("ROLLBACK")
        pusher.join(30)
        assert not pusher.is_alive(), "the broker acknowledged every message"
        assert at_kill < sent - 2000, f"killed mid-load ({at_kill} of {sent} stored)"
        if not workers:
            server.proc.wait(10)
            (tmp_path / "two").mkdir()
            again = ServerProcess(tmp_path / "two", "--data", str(server.data), *args)
            again.wait_ready(30)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: _rows(db, tag)[0] >= sent, 15, f"all {sent} stored")
        time.sleep(0.5)  # nothing more arrives (a redelivered copy is refused as a duplicate)
        rows, distinct = _rows(db, tag)
        print(f"kill -9 of {'an ingest worker' if workers else 'the server'} with {at_kill} of {sent} stored "
              f"(queue depth {backlog} just before): {rows} rows after the restart")
        assert rows == distinct == sent, f"{sent - distinct} of {sent} messages lost, {rows - distinct} duplicated"
        if workers:  # the server process noticed and restarted the worker
            assert "ingest worker 0 exited" in server.stderr() or "ingest worker 1 exited" in server.stderr()
        last = again or server
        assert last.terminate(timeout=30) == 0
    finally:
        for p in (server, again):
            if p is not None:
                p.close()
        base = (server.data / "mqtt-client-id").read_text().strip()
        for cid in [base, *(worker_client_id(base, i) for i in range(workers))]:  # end the sessions
            Subscriber(mosquitto.host, mosquitto.port, cid, [], clean_session=True).connect()


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.integration
def test_server_killed_under_load_loses_no_telemetry(mosquitto: Any, tmp_path: Path) -> None:
    """Acknowledge after commit: what the server had received but not stored when it was
    killed was never acknowledged, so the broker delivers it again after the restart."""
    _kill_under_load(mosquitto, tmp_path, workers=0)


@pytest.mark.integration
def test_ingest_worker_killed_under_load_loses_no_telemetry(mosquitto: Any, tmp_path: Path) -> None:
    _kill_under_load(mosquitto, tmp_path, workers=2)

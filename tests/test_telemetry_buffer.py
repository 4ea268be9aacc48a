"""Telemetry that survives outages: the on-disk spool (agent.outbox) in memory with real files,
then against a real Mosquitto and a real edgectl-server whose broker, or the server itself,
goes away for a while under inference load.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from agent.core import Agent
from agent.outbox import Outbox, Spooler
from agent.slots import DataDir
from sdk.deploy import push_bundle
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, stop_process, wait_for
from sdk.protocol import messages, topics
from server.broker import render_config
from tests.conftest import free_port, mosquitto_binary, wait_port

TOPIC = topics.telemetry("pi-spool")


# -- the spool on its own ------------------------------------------------------------------
class Info:
    def __init__(self, mid: int):
        self.mid, self.rc, self._published = mid, 0, False

    def is_published(self) -> bool:
        return self._published


class Transport:
    """Hands out paho-like MQTTMessageInfo objects; the test plays the broker's PUBACKs."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.sent: list[tuple[bytes, Info]] = []
        self._listeners: list[Any] = []

    def add_publish_listener(self, fn: Any) -> None:
        self._listeners.append(fn)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None) -> Info:
        assert topic == TOPIC and qos == 1
        info = Info(len(self.sent) + 1)
        self.sent.append((payload, info))
        return info

    def puback(self, payload: bytes, code: int = 0) -> None:
        info = next(i for p, i in reversed(self.sent) if p == payload)
        info._published = True
        for fn in self._listeners:
            fn(info.mid, code)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_outbox_persists_in_order_and_drops_the_oldest_beyond_its_bound(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", max_messages=5)
    for seq in range(8):
        box.append(seq, f"m{seq}".encode())
    assert box.pending() == [3, 4, 5, 6, 7]
    assert box.dropped == 3
    box.remove(3)
    again = Outbox(tmp_path / "outbox", max_messages=5)  # a restart
    assert again.pending() == [4, 5, 6, 7] and again.read(4) == b"m4"
    assert again.dropped == 3, "the drop count survives a restart"
    small = Outbox(tmp_path / "bytes", max_bytes=10)
    for seq in range(4):
        small.append(seq, b"12345")
    assert small.pending() == [2, 3] and small.dropped == 2 and small.size_bytes == 10


def test_spooler_sends_only_while_connected_and_forgets_only_on_puback(tmp_path: Path) -> None:
    t, clock = Transport(), Clock()
    box = Outbox(tmp_path / "outbox")
    sp = Spooler(box, t, TOPIC, window=3, resend_s=30.0, clock=clock)
    for seq in range(5):
        sp.put(seq, f"m{seq}".encode())
    assert t.sent == [] and box.pending() == [0, 1, 2, 3, 4]
    t.connected.set()
    sp.pump()
    assert [p for p, _ in t.sent] == [b"m0", b"m1", b"m2"], "oldest first, at most `window` in flight"
    t.puback(b"m1")
    sp.pump()
    assert box.pending() == [0, 2, 3, 4] and [p for p, _ in t.sent][-1] == b"m3"
    # Connection lost: nothing new goes out, nothing unacknowledged is forgotten.
    t.connected.clear()
    sp.put(5, b"m5")
    sp.pump()
    assert len(t.sent) == 4 and box.pending() == [0, 2, 3, 4, 5]
    # Paho resends its in-flight messages itself after a reconnect; their PUBACKs empty the spool.
    t.connected.set()
    for p in (b"m0", b"m2", b"m3"):
        t.puback(p)
    sp.pump()
    assert box.pending() == [4, 5] and [p for p, _ in t.sent][-2:] == [b"m4", b"m5"]
    # Unacknowledged for longer than resend_s while connected: sent again (the server dedups).
    clock.now += 31
    sp.pump()
    assert [p for p, _ in t.sent][-2:] == [b"m4", b"m5"] and len(t.sent) == 8
    t.puback(b"m4")
    t.puback(b"m5")
    sp.pump()
    assert box.pending() == [] and box.dropped == 0
    assert not list((tmp_path / "outbox").glob("*.msg"))


def test_no_subscriber_puback_is_retried_and_a_refusal_is_counted(tmp_path: Path) -> None:
    t, clock = Transport(), Clock()
    t.connected.set()
    box = Outbox(tmp_path / "outbox")
    sp = Spooler(box, t, TOPIC, window=8, clock=clock)
    sp.put(0, b"m0")
    t.puback(b"m0", 0x10)  # the broker took it, but nobody subscribes (the server is not back yet)
    sp.put(1, b"m1")
    assert box.pending() == [0, 1] and len(t.sent) == 1, "backing off after 'no matching subscribers'"
    clock.now += 1
    sp.pump()
    assert [p for p, _ in t.sent][-2:] == [b"m0", b"m1"]
    t.puback(b"m0")
    t.puback(b"m1", 0x87)  # not authorized: permanent, so dropped and counted
    sp.pump()
    assert box.pending() == [] and box.dropped == 1


def test_agent_reports_the_drop_count_in_its_health(tmp_path: Path) -> None:
    t = Transport()
    agent = Agent("pi-spool", t, DataDir(tmp_path), model_factory=lambda b: None)  # type: ignore[arg-type,return-value]
    agent.outbox.max_messages = 2
    for _ in range(4):
        agent.publish_telemetry()  # disconnected: everything stays in the spool
    assert t.sent == [] and agent.outbox.pending() == [2, 3]
    agent.publish_telemetry()
    last = messages.decode("telemetry", agent.outbox.read(agent.outbox.pending()[-1]) or b"")
    assert last.seq == 4 and last.health is not None
    assert last.health["telemetry_dropped"] == 2 and last.health["telemetry_spooled"] == 2


# -- against a real broker and server -----------------------------------------------------
class Broker:
    """A Mosquitto this test can kill and start again on the same port."""

    def __init__(self, workdir: Path):
        self.dir, self.port = workdir, free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(render_config(self.port, self.dir, persistence=False))
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


DEVICES = ("spool-1", "spool-2")


@pytest.fixture
def fleet(tmp_path: Path, digits: Any) -> Iterator[tuple[LocalFleet, Broker]]:
    broker = Broker(tmp_path)
    broker.start()
    f = LocalFleet(tmp_path / "fleet")
    try:
        f.start_server(broker=broker.url, extra=["--heartbeat-timeout", "30"])
        for dev in DEVICES:
            f.start_agent(dev, labels={"group": "spool"}, heartbeat=0.5, telemetry_interval=0.5)
        f.wait_online(DEVICES)
        with f.client() as client:
            out = push_bundle(client, digits.bundle, "group:spool", wait_s=30, poll_s=0.2)
        assert [d["state"] for d in out["deployment"]["devices"]] == ["active"] * len(DEVICES), out
        yield f, broker
    finally:
        f.close()
        broker.kill()


class Load:
    """Inference requests to every device from a thread, for as long as the test runs."""

    def __init__(self, broker_url: str):
        self.answered = 0
        self._stop = threading.Event()
        self._client = InferenceClient(broker_url)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        x = np.zeros((1, 8, 8, 1), np.float32)
        while not self._stop.is_set():
            futs = [self._client.submit(dev, x) for dev in DEVICES]
            for fut in futs:
                with contextlib.suppress(Exception):
                    if fut.result(0.5).ok:
                        self.answered += 1
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        self._client.close()
        return self.answered


def _spooled(fleet: LocalFleet, dev: str) -> list[int]:
    return sorted(int(p.name.removesuffix(".msg")) for p in (fleet.workdir / "agents" / dev / "outbox").glob("*.msg"))


def _stored(fleet: LocalFleet) -> dict[str, tuple[list[int], int, list[Any]]]:
    engine = sa.create_engine(f"sqlite:///{fleet.workdir / 'server' / 'edgectl.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT device_id, seq, count, health FROM telemetry ORDER BY seq")).all()
    finally:
        engine.dispose()
    out: dict[str, tuple[list[int], int, list[Any]]] = {}
    for dev in DEVICES:
        mine = [r for r in rows if r[0] == dev]
        health = [json.loads(r[3]) if isinstance(r[3], str) else r[3] for r in mine]
        out[dev] = ([r[1] for r in mine], sum(r[2] for r in mine), health)
    return out


def _check_nothing_lost(fleet: LocalFleet, answered: int) -> dict[str, int]:
    """Stop the agents; every seq they ever used is stored exactly once (or still spooled)."""
    for dev in DEVICES:
        assert stop_process(fleet.agents[dev]) == 0
    used = {d: set(range(_next_seq(fleet, d))) for d in DEVICES}

    def complete() -> bool:
        st = _stored(fleet)
        return all(set(st[d][0]) | set(_spooled(fleet, d)) >= used[d] for d in DEVICES)

    with contextlib.suppress(Exception):
        wait_for("the server to store everything the agents sent", complete, timeout=10)
    stored = _stored(fleet)
    sent = {}
    for dev in DEVICES:
        seqs, _, health = stored[dev]
        n = _next_seq(fleet, dev)
        assert len(seqs) == len(set(seqs)), f"{dev}: duplicate rows"
        assert sorted(set(seqs) | set(_spooled(fleet, dev))) == list(range(n)), f"{dev}: telemetry lost"
        assert len(_spooled(fleet, dev)) <= 2, "only the last interval(s) may wait for the next start"
        assert all(h is None or h.get("telemetry_dropped", 0) == 0 for h in health)
        sent[dev] = n
    assert sum(stored[d][1] for d in DEVICES) >= answered, "every answered request is counted"
    return sent


def _next_seq(fleet: LocalFleet, dev: str) -> int:
    return json.loads((fleet.workdir / "agents" / dev / "state.json").read_text())["next_seq"]


@pytest.mark.integration
def test_broker_outage_under_load_loses_no_telemetry(fleet: tuple[LocalFleet, Broker]) -> None:
    f, broker = fleet
    load = Load(f.broker)
    time.sleep(1.5)
    broker.kill()  # SIGKILL, no persistence: the broker forgets every session and retained message
    t0 = time.monotonic()
    wait_for("telemetry to pile up in both agents' spools",
             lambda: all(len(_spooled(f, d)) >= 4 for d in DEVICES), timeout=10)
    spooled_peak = {d: len(_spooled(f, d)) for d in DEVICES}
    broker.start()  # same port
    t1 = time.monotonic()
    outage = t1 - t0
    wait_for("both spools to drain", lambda: not any(_spooled(f, d) for d in DEVICES), timeout=20)
    drained = time.monotonic() - t1
    time.sleep(1.0)
    answered = load.stop()
    sent = _check_nothing_lost(f, answered)
    print(f"broker outage {outage:.1f} s: spooled {spooled_peak}, drained {drained:.1f} s after the restart, "
          f"sent {sent}, answered {answered}")


@pytest.mark.integration
def test_server_restart_loses_no_telemetry(fleet: tuple[LocalFleet, Broker]) -> None:
    f, _ = fleet
    load = Load(f.broker)
    time.sleep(1.0)
    assert f.stop_server() == 0
    before = {d: _next_seq(f, d) for d in DEVICES}
    time.sleep(3.0)  # the agents keep publishing; the broker queues it for the server's session
    during = {d: _next_seq(f, d) - before[d] for d in DEVICES}
    assert all(n >= 4 for n in during.values()), during
    assert all(len(_spooled(f, d)) <= 2 for d in DEVICES), "the broker, not the agents, holds it"
    f.start_server(broker=f.broker, extra=["--heartbeat-timeout", "30"])
    logs = sorted(f.workdir.glob("server*.log"), key=lambda p: p.stat().st_mtime)
    assert "session resumed" in logs[-1].read_text() and "session resumed" not in logs[0].read_text()
    time.sleep(1.0)
    answered = load.stop()
    sent = _check_nothing_lost(f, answered)
    print(f"server down 3 s: published meanwhile {during}, sent {sent}, answered {answered}")

"""Fan-out delivery: several agents downloading one bundle at once cost the server about one copy
of it (broadcast on the artifact topic), not one per device. Real Mosquitto, server and agents."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from sdk.deploy import push_bundle
from sdk.localfleet import LocalFleet
from sdk.protocol import frames, messages, topics
from sdk.protocol.bundle import read_bundle, write_bundle
from sdk.protocol.topics import DeviceTopic
from server.config import Config
from server.security import SERVER_USER
from server.service import Service
from server.store import Store
from tests import test_broker_security as secure
from tests.test_server_service import Recorder, make_bundle, online

DEVICES = ("fan-1", "fan-2", "fan-3", "fan-4")
secure_broker = secure.secure_broker  # the fixture: passwords + ACL + TLS on a real Mosquitto
CHUNK = 4096


class ChunkMeter:
    """Counts every chunk message the server publishes, per-device and broadcast."""

    def __init__(self, host: str, port: int):
        self.unicast = self.broadcast = self.bytes = 0
        self._lock = threading.Lock()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect(host, port)
        self.c.loop_start()
        self.c.subscribe([(topics.device_wildcard(DeviceTopic.CHUNKS), 0), (topics.ARTIFACT_CHUNKS_WILDCARD, 0)])
        assert ready.wait(10)

    def _on_message(self, client: Any, userdata: Any, m: Any) -> None:
        with self._lock:
            self.bytes += len(m.payload)
            if m.topic.startswith(f"{topics.PREFIX}/artifacts/"):
                self.broadcast += 1
            else:
                self.unicast += 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def padded(digits: Any, tmp_path: Path) -> Path:
    base = read_bundle(digits.bundle)
    manifest = {k: v for k, v in base.manifest.items() if k != "files"}
    manifest["version"] = "1.1.0"
    path = tmp_path / "padded.bundle"
    write_bundle(path, manifest, {**base.files, "padding.bin": np.random.default_rng(3).bytes(160 * 1024)})
    return path


@pytest.fixture
def fleet(mosquitto: Any, tmp_path: Path) -> Iterator[LocalFleet]:
    f = LocalFleet(tmp_path / "fleet")
    try:
        f.start_server(broker=mosquitto.url, extra=["--chunk-size", str(CHUNK)])
        for dev in DEVICES:
            f.start_agent(dev, labels={"group": "fan"}, heartbeat=1, telemetry_interval=1)
        f.wait_online(DEVICES)
        yield f
    finally:
        f.close()


@pytest.mark.integration
def test_many_devices_downloading_one_bundle_cost_about_one_copy(fleet: LocalFleet, mosquitto: Any,
                                                                 padded: Path) -> None:
    size = padded.stat().st_size
    chunks = -(-size // CHUNK)
    meter = ChunkMeter(mosquitto.host, mosquitto.port)
    try:
        with fleet.client() as client:
            out = push_bundle(client, padded, "group:fan", wait_s=60, poll_s=0.2)
            info = client.info()
    finally:
        meter.close()
    assert [d["state"] for d in out["deployment"]["devices"]] == ["active"] * len(DEVICES), out
    sent = meter.broadcast + meter.unicast
    copies = meter.bytes / size
    print(f"\n{len(DEVICES)} devices, {chunks} chunks: {meter.broadcast} broadcast + {meter.unicast} unicast "
          f"chunk messages = {copies:.2f} copies of the bundle (without fan-out: {len(DEVICES)})")
    assert meter.broadcast >= chunks // 2, "most chunks went out once, to the artifact topic"
    assert sent <= 1.6 * chunks, f"{sent} chunk messages for {chunks} chunks"
    stats = info["ingest"]
    assert stats["chunks_broadcast"] == meter.broadcast and stats.get("chunks_unicast", 0) == meter.unicast


# -- the server's decisions, in memory ----------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t

    def at(self, seconds: float) -> datetime:
        self.t = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
        return self.t


@pytest.mark.parametrize("window", [5.0, 0.0])
def test_broadcast_once_skip_what_is_on_its_way_repair_per_device(tmp_path: Path, window: float) -> None:
    clock = Clock()
    config = Config(data_dir=tmp_path / "data", db_url=f"sqlite:///{tmp_path / 'f.db'}", chunk_size=1024,
                    fanout_window_s=window)
    store = Store(config.db_url)
    pub = Recorder()
    svc = Service(config, store, pub, clock=clock)
    try:
        for dev in ("pi-1", "pi-2", "pi-3"):
            online(svc, dev, group="lab")
        sha = svc.add_artifact(make_bundle(tmp_path, model=np.random.default_rng(0).bytes(9000)))[0]["sha256"]
        svc.create_deployment(sha, "group:lab")
        art = topics.artifact_chunks(sha)

        def fetch(dev: str, t: float, indexes: list[int]) -> list[tuple[str, int]]:
            pub.sent.clear()
            svc.handle(topics.fetch(dev), messages.Fetch(sha, indexes).encode(), received_at=clock.at(t))
            return [("all" if topic == art else topic.split("/")[3], frames.Chunk.decode(p).index)
                    for topic, p, _, _ in pub.sent]

        if window == 0:  # fan-out off: every device gets its own copy
            assert fetch("pi-1", 0.0, [0, 1]) == [("pi-1", 0), ("pi-1", 1)]
            assert fetch("pi-2", 0.1, [0, 1]) == [("pi-2", 0), ("pi-2", 1)]
            return
        assert fetch("pi-1", 0.0, [0, 1]) == [("pi-1", 0), ("pi-1", 1)], "alone: its own copy"
        assert fetch("pi-2", 0.1, [0, 1]) == [("all", 0), ("all", 1)], "two downloading: broadcast"
        assert fetch("pi-1", 0.2, [0, 1, 2]) == [("all", 2)], "0 and 1 are on their way to pi-1"
        assert fetch("pi-2", 0.3, [2, 3]) == [("all", 3)]
        assert fetch("pi-3", 1.0, [0, 1, 4]) == [("pi-3", 0), ("pi-3", 1), ("all", 4)], \
            "broadcast before pi-3 joined: sent to it alone; new chunks still broadcast"
        assert fetch("pi-2", 9.0, [2]) == [("pi-2", 2)], "asked again long after: per-device repair"
        assert fetch("pi-3", 9.5, [2, 3]) == [("all", 2), ("all", 3)], \
            "old broadcasts from before pi-3 joined: a new wave, broadcast again"
        info = svc.info()["ingest"]
        assert info["chunks_broadcast"] == 7 and info["chunks_unicast"] == 5 and info["chunks_not_resent"] == 3
    finally:
        store.close()


def test_devices_may_read_but_not_write_chunk_broadcasts(secure_broker: tuple[int, Path]) -> None:
    """The ACL on a real Mosquitto (passwords + TLS, as in test_broker_security)."""
    port, ca = secure_broker
    art = topics.artifact_chunks("ab" * 32)
    server = secure.Peer(port, ca, SERVER_USER, secure.USERS[SERVER_USER])
    dev = secure.Peer(port, ca, "dev-a", secure.USERS["dev-a"])
    try:
        dev.sub(art)
        server.sub(art)
        server.c.publish(art, b"from the server", qos=1).wait_for_publish(5)
        dev.c.publish(art, b"forged by a device", qos=1).wait_for_publish(5)
        time.sleep(0.3)
        assert (art, b"from the server") in dev.got
        assert all(p != b"forged by a device" for _, p in server.got + dev.got)
    finally:
        server.close()
        dev.close()

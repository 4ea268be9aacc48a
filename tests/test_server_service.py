"""The service glue without HTTP or MQTT: ingest, rejections, deployments, chunk serving.
Publishing goes to an in-memory list (the Publisher seam); the store is a real SQLite file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sdk.protocol import frames, histogram, messages, topics
from sdk.protocol.bundle import read_bundle, tensor_spec, write_bundle
from sdk.protocol.errors import BundleError
from server.config import Config
from server.service import Service
from server.store import Store


def make_bundle(tmp: Path, version: str = "1", model: bytes = b"not really a tflite model") -> bytes:
    manifest = {
        "name": "m", "version": version, "quantization": "dynamic",
        "model": {"file": "model.tflite", "inputs": [tensor_spec("x", [1, 4], "float32")],
                  "outputs": [tensor_spec("y", [1, 2], "float32")]},
        "sample": {"input": "sample_input.npy", "output": "sample_output.npy", "atol": 1e-4, "rtol": 1e-4},
    }
    files = {"model.tflite": model,
             "sample_input.npy": frames.tensor_to_npy(np.zeros((1, 4), np.float32)),
             "sample_output.npy": frames.tensor_to_npy(np.zeros((1, 2), np.float32))}
    path = tmp / f"m-{version}.bundle"
    write_bundle(path, manifest, files)
    return path.read_bytes()


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload, qos, retain))


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    config = Config(data_dir=tmp_path / "data", db_url=f"sqlite:///{tmp_path / 'e.db'}", chunk_size=1024)
    store = Store(config.db_url)
    try:
        yield Service(config, store, Recorder())
    finally:
        store.close()


def online(svc: Service, device_id: str, **labels: str) -> None:
    svc.handle(topics.status(device_id), messages.Status(state="online", labels=labels).encode())


def test_bad_messages_are_counted_and_never_raise(svc: Service) -> None:
    svc.handle("some/other/topic", b"{}")
    svc.handle("edgectl/v1/devices/pi 1/status", b"{}")
    svc.handle(topics.status("pi-1"), b"\xff not json")
    svc.handle(topics.status("pi-1"), json.dumps({"state": 3}).encode())
    svc.handle(topics.heartbeat("ghost"), messages.Heartbeat(uptime_s=1.0).encode())
    svc.handle(topics.desired("pi-1"), b"{}")
    svc.handle(topics.telemetry("pi-1"), b"x" * (messages.MAX_JSON_BYTES + 1))
    assert svc.rejected() == {"bad_topic": 3, "bad_message": 3, "unknown_device": 1}
    assert svc.devices() == []


def test_duplicate_telemetry_is_counted(svc: Service) -> None:
    online(svc, "pi-1")
    t = messages.Telemetry(seq=7, interval_s=10, count=0, errors=0, latency_hist=histogram.empty(),
                           latency_sum_ms=0.0)
    svc.handle(topics.telemetry("pi-1"), t.encode())
    svc.handle(topics.telemetry("pi-1"), t.encode())
    assert svc.rejected() == {"duplicate": 1}


def test_artifact_upload_validates_and_is_idempotent(svc: Service, tmp_path: Path) -> None:
    data = make_bundle(tmp_path)
    art, created = svc.add_artifact(data)
    assert created and art["sha256"] == read_bundle(data).sha256 and art["size"] == len(data)
    assert (art["name"], art["version"], art["quantization"]) == ("m", "1", "dynamic")
    path = svc.config.artifact_path(art["sha256"])
    assert path.read_bytes() == data and path.parent.name == art["sha256"][:2]
    assert svc.add_artifact(data) == (art, False)
    assert svc.artifacts() == [art]
    with pytest.raises(BundleError, match="not a zip"):
        svc.add_artifact(b"hello")


def test_deployment_publishes_desired_and_serves_chunks(svc: Service, tmp_path: Path) -> None:
    pub: Recorder = svc.publisher  # type: ignore[assignment]
    online(svc, "pi-1", group="lab")
    online(svc, "pi-2", group="lab")
    online(svc, "pi-3", group="field")
    data = make_bundle(tmp_path, model=np.random.default_rng(0).bytes(3000))
    sha = svc.add_artifact(data)[0]["sha256"]
    dep = svc.create_deployment(sha, "group:lab")
    assert dep["targets"] == ["pi-1", "pi-2"]
    desired = {t: messages.decode("desired", p) for t, p, qos, retain in pub.sent if retain and qos == 1}
    assert set(desired) == {topics.desired("pi-1"), topics.desired("pi-2")}
    d = desired[topics.desired("pi-1")]
    assert (d.deployment_id, d.artifact, d.size, d.chunk_size) == (dep["id"], sha, len(data), 1024)

    pub.sent.clear()
    count = d.chunk_count
    svc.handle(topics.fetch("pi-1"), messages.Fetch(sha, list(range(count))).encode())
    chunks = [frames.Chunk.decode(p) for t, p, _, _ in pub.sent if t == topics.chunks("pi-1")]
    assert [c.index for c in chunks] == list(range(count)) and {c.count for c in chunks} == {count}
    assert b"".join(c.data for c in chunks) == data

    pub.sent.clear()
    svc.handle(topics.fetch("pi-3"), messages.Fetch(sha, [0]).encode())  # not its desired artifact
    svc.handle(topics.fetch("pi-1"), messages.Fetch(sha, [0, count]).encode())  # out of range
    assert pub.sent == []
    assert svc.rejected() == {"not_desired": 1, "bad_index": 1}

    svc.handle(topics.reported("pi-1"), messages.Reported(dep["id"], sha, "active", "smoke ok").encode())
    dev = svc.device("pi-1")
    assert dev["model"] == {"artifact": sha, "name": "m", "version": "1"}
    assert dev["deployment"] == {"id": dep["id"], "state": "active", "detail": "smoke ok"}
    assert svc.deployment(dep["id"])["devices"][1]["state"] == "pending"

    pub.sent.clear()
    assert svc.republish_desired() == 2
    assert {t for t, *_ in pub.sent} == {topics.desired("pi-1"), topics.desired("pi-2")}

"""Batched ingestion from a real Mosquitto (no loss, redeliveries counted, a tiny queue forcing
backpressure), then the same figures through the HTTP API, ``/metrics`` and the CLI."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
import uvicorn
from typer.testing import CliRunner

from agent.drift import DriftRecorder
from sdk.cli import app
from sdk.localfleet import wait_for
from sdk.protocol import drift, histogram, messages, topics
from server import mqtt as server_mqtt
from server.api import create_app
from server.config import Config
from server.service import Service
from server.store import Store
from tests.conftest import free_port

runner = CliRunner()
DEVICES = [f"dev-{i}" for i in range(20)]
ART = "c3" * 32


def telemetry(seq: int, rng: random.Random, predictions: list | None = None) -> messages.Telemetry:
    hist = histogram.empty()
    for _ in range(rng.randint(1, 20)):
        hist[rng.randrange(20, 40)] += 1
    n = sum(hist)
    return messages.Telemetry(seq=seq, interval_s=1.0, count=n + 1, errors=1, latency_hist=hist,
                              latency_sum_ms=float(n), artifact=ART, model_version="7", predictions=predictions)


@pytest.fixture(scope="module")
def server(mosquitto: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str, list]]:
    work = tmp_path_factory.mktemp("health-api")
    config = Config(data_dir=work, db_url=f"sqlite:///{work / 'e.db'}")
    store = Store(config.db_url)
    service = Service(config, store)
    old = server_mqtt.QUEUE_SIZE
    server_mqtt.QUEUE_SIZE = 64  # far below the burst: the paho thread must wait, nothing is lost
    side = server_mqtt.MqttSide(service, mosquitto.url)
    server_mqtt.QUEUE_SIZE = old
    side.start()
    port = free_port()
    userver = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                            log_level="warning", lifespan="off"))
    thread = threading.Thread(target=userver.run, daemon=True)
    thread.start()
    wait_for("HTTP API", lambda: userver.started, timeout=10)
    sent: list[tuple[str, messages.Telemetry]] = []
    try:
        yield service, f"http://127.0.0.1:{port}", sent
    finally:
        userver.should_exit = True
        thread.join(10)
        side.stop()
        store.close()


def test_burst_from_mosquitto_is_stored_without_loss(server: tuple[Service, str, list], mosquitto: Any) -> None:
    service, _, sent = server
    rng = random.Random(5)
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(200)
    pub.max_queued_messages_set(0)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    try:
        for i, d in enumerate(DEVICES):
            pub.publish(topics.status(d), messages.Status(state="online", labels={"group": f"g{i % 2}"},
                                                          connection="c").encode(), qos=1).wait_for_publish(5)
        wait_for("devices known", lambda: len(service.devices()) == len(DEVICES), timeout=10)
        infos = []
        for seq in range(150):
            for d in DEVICES:
                preds = [[f"{d}-{seq}", seq % 3]] if seq < 10 else None
                msg = telemetry(seq, rng, preds)
                sent.append((d, msg))
                infos.append(pub.publish(topics.telemetry(d), msg.encode(), qos=1))
                if seq % 10 == 0:  # a redelivery of the same aggregate
                    infos.append(pub.publish(topics.telemetry(d), msg.encode(), qos=1))
            infos.append(pub.publish(topics.heartbeat(DEVICES[0]), messages.Heartbeat(uptime_s=seq).encode(), qos=1))
        for info in infos:
            info.wait_for_publish(20)
    finally:
        pub.loop_stop()
        pub.disconnect()
    dups = 15 * len(DEVICES)
    wait_for("all telemetry stored", lambda: service.info()["ingest"].get("telemetry_stored", 0) == len(sent)
             and service.rejected().get("duplicate", 0) == dups, timeout=30)
    with service.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM telemetry")).scalar() == len(sent)
        assert conn.execute(sa.text("SELECT SUM(intervals) FROM telemetry_hourly")).scalar() == len(sent)
    assert service.rejected() == {"duplicate": dups}
    assert service.info()["ingest"]["batches"] < len(sent) / 2  # really batched


def test_http_metrics_and_cli_agree_with_what_was_sent(server: tuple[Service, str, list], tmp_path: Path) -> None:
    _, url, sent = server
    by_group: dict[str, list[messages.Telemetry]] = {}
    for d, m in sent:
        by_group.setdefault(f"g{DEVICES.index(d) % 2}", []).append(m)
    res = runner.invoke(app, ["fleet", "health", "--window", "1h", "--by", "group", "--server", url, "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["group"]: r for r in json.loads(res.stdout)["rows"]}
    for g, msgs in by_group.items():
        assert rows[g]["inferences"] == sum(m.count for m in msgs)
        merged = [sum(col) for col in zip(*(m.latency_hist for m in msgs), strict=True)]
        assert rows[g]["p95_ms"] == pytest.approx(histogram.quantile(merged, 0.95))
    table = runner.invoke(app, ["fleet", "health", "--by", "model", "--server", url])
    assert table.exit_code == 0 and "by model" in table.stdout and "20/20 online" in table.stdout

    labels = [(f"dev-0-{s}", s % 3 if s < 8 else 0) for s in range(10)]  # 8 right (+ 1 for class 0), 1 wrong
    file = tmp_path / "labels.csv"
    file.write_text("request_id,label\n" + "".join(f"{r},{lab}\n" for r, lab in labels))
    res = runner.invoke(app, ["feedback", "--file", str(file), "--server", url, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == {"stored": 10, "matched": 10}
    res = runner.invoke(app, ["devices", "show", "dev-0", "--window", "1h", "--server", url, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    correct = sum(1 for s, (_, lab) in enumerate(labels) if s % 3 == lab)
    assert d["window"]["labelled"] == 10 and d["window"]["accuracy"] == pytest.approx(correct / 10)
    assert d["window"]["inferences"] == sum(m.count for dev, m in sent if dev == "dev-0")
    assert d["sessions"][0]["ended_at"] is None and d["history"][-1]["inferences"] > 0
    shown = runner.invoke(app, ["devices", "show", "dev-0", "--server", url])
    assert shown.exit_code == 0 and "hourly history" in shown.stdout and "connection sessions" in shown.stdout
    bad = runner.invoke(app, ["devices", "show", "nope", "--server", url])
    assert bad.exit_code == 1 and "unknown" in bad.output and len(bad.output.strip().splitlines()) == 1
    bad = runner.invoke(app, ["feedback", "x"])
    assert bad.exit_code == 1 and "REQUEST_ID LABEL" in bad.output

    text = httpx.get(f"{url}/metrics").text
    assert f"edgectl_telemetry_stored_total {len(sent)}" in text
    assert 'edgectl_devices{state="online"} 20' in text
    count0 = sum(m.count for dev, m in sent if dev == "dev-0")
    assert f'edgectl_device_inferences_1h{{device="dev-0",group="g0"}} {count0}' in text
    assert httpx.post(f"{url}/v1/feedback", json={"labels": []}).status_code == 422


def test_drift_recorder_summarises_requests_and_samples_predictions() -> None:
    rec = DriftRecorder(max_predictions=2)
    assert rec.snapshot() == {"drift": None, "predictions": None}
    y = np.array([[0.1, 0.9, 0.0]], np.float32)
    for i in range(3):
        rec.record(np.full((1, 4), float(i), np.float32), y, request_id=f"r{i}")
    rec.record(np.zeros((1, 2)), np.zeros((1, 2, 2)), None)  # odd shapes never raise
    snap = rec.snapshot()
    assert snap["predictions"] == [["r0", 1], ["r1", 1]]
    assert snap["drift"]["outputs"][1] == 3 and sum(snap["drift"]["input_mean"]) == 4
    assert sum(snap["drift"]["input_std"]) == 4
    msg = messages.Telemetry(seq=1, interval_s=1, count=0, errors=0, latency_hist=histogram.empty(),
                             latency_sum_ms=0, **snap)
    assert messages.decode("telemetry", msg.encode()) == msg
    for bad, field in (({"input_mean": [0]}, "drift"), ([[1, 2]], "predictions"), ([["r", -1]], "predictions")):
        payload = json.loads(msg.encode())
        payload[field] = bad
        with pytest.raises(Exception, match=field):
            messages.decode("telemetry", json.dumps(payload).encode())
    assert drift.psi([1, 0], [0, 0]) is None

"""The walking skeleton end to end: real Mosquitto, real server and agent processes, real TFLite.

Keras model → bundle → edgectl-server (SQLite) → push → 2 agents → inference over MQTT →
telemetry in the store → fleet health → kill -9 → offline by last will.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from sdk.cli import app
from sdk.client import ServerClient
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, wait_for
from sdk.protocol import topics
from sdk.protocol.bundle import read_bundle
from sdk.protocol.runtime import TFLiteModel

runner = CliRunner()
DEVICES = ("e2e-pi-1", "e2e-pi-2")


@pytest.fixture(scope="module")
def fleet(mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    f = LocalFleet(tmp_path_factory.mktemp("e2e"))
    try:
        f.start_server(broker=mosquitto.url, extra=["--heartbeat-timeout", "6"])
        for dev in DEVICES:
            f.start_agent(dev, labels={"group": "e2e"}, heartbeat=1, telemetry_interval=1)
        f.wait_online(DEVICES)
        yield f
    finally:
        code = f.close()
        assert code == 0, f"edgectl-server exited with {code}"


def test_push_reaches_both_agents_and_they_activate_it(fleet: LocalFleet, digits) -> None:
    res = runner.invoke(app, ["push", str(digits.bundle), "--to", "group:e2e", "--server", fleet.url,
                              "--wait", "60", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert sorted(out["deployment"]["targets"]) == sorted(DEVICES)
    assert {d["device_id"]: d["state"] for d in out["deployment"]["devices"]} == dict.fromkeys(DEVICES, "active")
    with ServerClient(fleet.url) as c:
        devices = {d["id"]: d for d in c.devices()}
    sha = read_bundle(digits.bundle).sha256
    for dev in DEVICES:
        assert devices[dev]["model"]["artifact"] == sha
        assert devices[dev]["model"]["version"] == "1.0.0"


def test_inference_answers_equal_the_host_interpreter(fleet: LocalFleet, digits) -> None:
    host = TFLiteModel(read_bundle(digits.bundle).model_bytes)
    with np.load(digits.eval) as ev:
        x = ev["x"][:20]
    with InferenceClient(fleet.broker) as ic:
        for dev in DEVICES:
            for row in x:
                resp = ic.infer(dev, row[None, ...], timeout=10)
                assert resp.ok, resp.error
                assert resp.model_version == "1.0.0"
                np.testing.assert_allclose(resp.output, host.run(row[None, ...]), rtol=1e-5, atol=1e-6)


def test_wrong_shape_or_dtype_gets_a_clear_error_answer(fleet: LocalFleet) -> None:
    with InferenceClient(fleet.broker) as ic:
        r = ic.infer(DEVICES[0], np.zeros((1, 3), np.float32))
        assert not r.ok and "shape" in r.error and "[?, 8, 8, 1]" in r.error
        r = ic.infer(DEVICES[0], np.zeros((1, 8, 8, 1), np.float64))
        assert not r.ok and "dtype" in r.error and "float32" in r.error
        r = ic.infer(DEVICES[0], np.zeros((1, 8, 8, 1), np.float32))
        assert r.ok


def test_malformed_mqtt_messages_are_survived(fleet: LocalFleet) -> None:
    host, port = fleet.broker.removeprefix("mqtt://").split(":")
    junk = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-junk",
                       protocol=mqtt.MQTTv5)
    junk.connect(host, int(port))
    junk.loop_start()
    try:
        dev = DEVICES[0]
        payloads = [b"", b"\x00\xff garbage", b"{not json", b"[]", json.dumps({"seq": "x"}).encode(), b"{}" * 50_000]
        for p in payloads:
            for t in (topics.telemetry(dev), topics.status("ghost-device"), topics.reported(dev),
                      topics.fetch(dev), topics.heartbeat("ghost-device"), topics.infer(dev),
                      topics.chunks(dev), "edgectl/v1/devices/x/unknown-kind", "edgectl/v9/whatever"):
                junk.publish(t, p, qos=1).wait_for_publish(5)
        # A valid-looking desired state that points nowhere must fail cleanly, not wedge the agent.
    finally:
        junk.disconnect()
        junk.loop_stop()
    with ServerClient(fleet.url) as c:
        info = wait_for("the server to count the rejected messages", lambda: c.info()
                        if sum(c.info().get("rejected", {}).values()) >= 10 else None, timeout=15)
        assert info["rejected"]
        assert {d["id"] for d in c.devices() if d["online"]} >= set(DEVICES)
    with InferenceClient(fleet.broker) as ic:
        assert ic.infer(DEVICES[0], np.zeros((1, 8, 8, 1), np.float32)).ok
    assert fleet.server is not None and fleet.server.poll() is None and all(p.poll() is None for p in fleet.agents.values())


def test_telemetry_lands_in_the_store_and_fleet_health_reports_it(fleet: LocalFleet) -> None:
    with InferenceClient(fleet.broker) as ic:
        futs = [ic.submit(dev, np.zeros((1, 8, 8, 1), np.float32)) for dev in DEVICES for _ in range(25)]
        assert all(f.result(15).ok for f in futs)

    def healthy() -> dict[str, Any] | None:
        res = runner.invoke(app, ["fleet", "health", "--window", "10m", "--server", fleet.url, "--json"])
        assert res.exit_code == 0, res.output
        rows = {r["id"]: r for r in json.loads(res.stdout)["devices"]}
        ok = all(dev in rows and rows[dev]["online"] and rows[dev]["inferences"] >= 25 for dev in DEVICES)
        return rows if ok else None

    rows = wait_for("telemetry of both devices in fleet health", healthy, timeout=20)
    for dev in DEVICES:
        r = rows[dev]
        assert r["p50_ms"] is not None and 0 < r["p50_ms"] <= r["p95_ms"] < 1000
        assert r["error_rate"] is not None and r["error_rate"] < 0.2
        assert r["availability"] is not None and r["availability"] > 0.9
        assert r["outages"] == 0  # re-announcing a new model on the same connection is no outage
        assert r["model_version"] == "1.0.0" and r["deployment_state"] == "active"
    engine = sa.create_engine(f"sqlite:///{fleet.workdir / 'server' / 'edgectl.db'}")
    try:
        with engine.connect() as conn:
            n = conn.execute(sa.text("SELECT COUNT(*), COUNT(DISTINCT device_id) FROM telemetry")).one()
    finally:
        engine.dispose()
    assert n[0] >= 2 and n[1] >= 2
    table = runner.invoke(app, ["fleet", "health", "--server", fleet.url])
    assert table.exit_code == 0 and "2/2 online" in table.stdout


def test_a_killed_agent_is_reported_offline_by_its_last_will(fleet: LocalFleet) -> None:
    victim = DEVICES[1]
    fleet.kill_agent(victim)
    t0 = time.monotonic()
    with ServerClient(fleet.url) as c:
        wait_for(f"{victim} offline", lambda: not {d["id"]: d for d in c.devices()}[victim]["online"], timeout=10)
    assert time.monotonic() - t0 < 10
    res = runner.invoke(app, ["devices", "list", "--server", fleet.url, "--json"])
    states = {d["id"]: d["online"] for d in json.loads(res.stdout)}
    assert states[victim] is False and states[DEVICES[0]] is True
    res = runner.invoke(app, ["fleet", "health", "--server", fleet.url])
    assert "1/2 online" in res.stdout


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["devices", "list", "--server", "http://127.0.0.1:9"])
    assert res.exit_code == 1 and "cannot reach edgectl-server" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["fleet", "health", "--window", "soon"])
    assert res.exit_code == 1 and "window" in res.output


def test_push_to_nobody_or_a_bad_bundle_is_refused(fleet: LocalFleet, digits, tmp_path: Path) -> None:
    res = runner.invoke(app, ["push", str(digits.bundle), "--to", "group:nobody", "--server", fleet.url])
    assert res.exit_code == 1 and "matches no" in res.output
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(os.urandom(1000))
    res = runner.invoke(app, ["push", str(junk), "--to", "all", "--server", fleet.url])
    assert res.exit_code == 1 and "not a zip archive" in res.output

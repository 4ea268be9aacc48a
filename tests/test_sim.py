"""``edgectl-sim``: N real agents (own MQTT connection and data dir each) against a real broker."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.sim import InjectedFaults
from sdk.protocol import messages, topics

REPO = Path(__file__).resolve().parents[1]


class _Echo:
    backend, delegate = "stub", "xnnpack"

    def run(self, x: Any) -> Any:
        return x


def test_injected_faults_add_latency_and_fail_the_asked_fraction() -> None:
    m = InjectedFaults(_Echo(), latency_ms=5.0, jitter_ms=0.0, error_rate=0.3, rng=random.Random(1))
    assert m.run(1) == 1  # the smoke test runs unharmed
    t0, failed = time.perf_counter(), 0
    for _ in range(200):
        try:
            m.run(1)
        except RuntimeError as exc:
            assert "injected error" in str(exc)
            failed += 1
    assert time.perf_counter() - t0 >= 200 * 0.005
    assert 40 <= failed <= 80  # ~30 % of 200


@pytest.mark.integration
def test_a_simulated_fleet_connects_and_reports(mosquitto: Any, tmp_path: Path) -> None:
    n = 25
    seen: dict[str, set[str]] = {"online": set(), "telemetry": set()}
    health: dict[str, Any] = {}
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        route = topics.parse(msg.topic)
        if not msg.payload:
            return
        with lock:
            if route.kind == topics.DeviceTopic.STATUS and messages.decode("status", msg.payload).state == "online":
                seen["online"].add(route.device_id)
            elif route.kind == topics.DeviceTopic.TELEMETRY:
                t = messages.decode("telemetry", msg.payload)
                seen["telemetry"].add(route.device_id)
                health[route.device_id] = t.health

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.connect(mosquitto.host, mosquitto.port)
    c.subscribe([(topics.device_wildcard("status"), 1), (topics.device_wildcard("telemetry"), 1)])
    c.loop_start()
    proc = subprocess.Popen([sys.executable, "-m", "agent.sim", "--devices", str(n), "--broker", mosquitto.url,
                             "--data", str(tmp_path / "sim"), "--prefix", "simt", "--interpreter", "shared",
                             "--profile", "raspberry-pi-4", "--heartbeat", "1", "--telemetry-interval", "1",
                             "--report-every", "1", "--duration", "30"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            with lock:
                if len(seen["online"]) == n and len(seen["telemetry"]) == n:
                    break
            time.sleep(0.2)
        with lock:
            assert len(seen["online"]) == n and len(seen["telemetry"]) == n, {k: len(v) for k, v in seen.items()}
            assert all(d.startswith("simt-") for d in seen["online"])
            h = next(iter(health.values()))
        assert h["runtime"] == "ai_edge_litert (shared by edgectl-sim)" and h["threads"] == 4
        assert len({p.name for p in (tmp_path / "sim").iterdir()}) == n  # a data dir each
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        c.loop_stop()
        c.disconnect()
    assert proc.returncode == 0, err[-2000:]
    assert f"connected {n}/{n}" in out, out

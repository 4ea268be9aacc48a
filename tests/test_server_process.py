"""edgectl-server as a real process: a real Mosquitto, real HTTP, real signals.

Every wait is bounded. Device ids are unique per test because the session broker is shared
and keeps retained messages; retained messages a test leaves behind are cleared at its end.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from sdk.protocol import frames, messages, topics
from sdk.protocol.bundle import tensor_spec, write_bundle
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def make_bundle(tmp: Path) -> bytes:
    manifest = {
        "name": "m", "version": "1", "quantization": "dynamic",
        "model": {"file": "model.tflite", "inputs": [tensor_spec("x", [1, 4], "float32")],
                  "outputs": [tensor_spec("y", [1, 2], "float32")]},
        "sample": {"input": "sample_input.npy", "output": "sample_output.npy", "atol": 1e-4, "rtol": 1e-4},
    }
    files = {"model.tflite": np.random.default_rng(1).bytes(5000),
             "sample_input.npy": frames.tensor_to_npy(np.zeros((1, 4), np.float32)),
             "sample_output.npy": frames.tensor_to_npy(np.zeros((1, 2), np.float32))}
    path = tmp / "m.bundle"
    write_bundle(path, manifest, files)
    return path.read_bytes()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """``python -m server.main`` with stdout read line by line on a thread."""

    def __init__(self, tmp: Path, *args: str):
        self.data = tmp / "data"
        self.stderr_path = tmp / "server.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.main", "--data", str(self.data), *args],
                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("edgectl-server ready "):
                return dict(part.split("=", 1) for part in line.split()[2:])
        raise AssertionError(f"server not ready (exit {self.proc.poll()}): {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str, sub: str = "s") -> ServerProcess:
        (tmp_path / sub).mkdir()
        p = ServerProcess(tmp_path / sub, *args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


class Mqtt:
    """A small paho client for the tests: publish and wait, collect what arrives."""

    def __init__(self, broker_url: str):
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  protocol=mqtt.MQTTv5, client_id=f"test-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, m: self.received.put((m.topic, bytes(m.payload)))
        self.client.connect(host, int(port))
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, "test client connected")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=5)

    def subscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert done.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def auth(server: ServerProcess) -> dict[str, str]:
    """The bearer token the server created in its data dir at first start."""
    return {"authorization": f"Bearer {(server.data / 'api-token').read_text().strip()}"}


def device_of(http: httpx.Client, device_id: str) -> dict[str, Any] | None:
    r = http.get(f"/v1/devices/{device_id}")
    return r.json() if r.status_code == 200 else None


def status(state: str, **labels: str) -> bytes:
    return messages.Status(state=state, agent_version="0.1.0", labels=labels).encode()


def test_server_process_end_to_end(mosquitto: Any, start_server: Callable[..., ServerProcess],
                                   tmp_path: Path) -> None:
    t0 = time.monotonic()
    server = start_server("--broker", mosquitto.url, "--http", "127.0.0.1:0", "--chunk-size", "2048")
    ready = server.wait_ready()
    assert ready["broker"] == mosquitto.url and ready["data"] == str(server.data)
    assert (server.data / "server.json").exists()
    dev = f"pi-{uuid.uuid4().hex[:8]}"
    client = Mqtt(mosquitto.url)
    with httpx.Client(base_url=ready["http"], timeout=10, headers=auth(server)) as http:
        try:
            info = http.get("/v1/info").json()
            assert (info["version"], info["http_url"], info["broker_url"]) == ("0.1.0", ready["http"], mosquitto.url)

            r = http.post("/v1/artifacts", content=b"this is not a zip",
                          headers={"content-type": "application/octet-stream"})
            assert r.status_code == 400 and "not a zip" in r.json()["detail"]
            bundle = make_bundle(tmp_path)
            r = http.post("/v1/artifacts", content=bundle)
            assert r.status_code == 201, r.text
            sha = r.json()["sha256"]
            assert http.post("/v1/artifacts", content=bundle).json()["sha256"] == sha
            assert [a["sha256"] for a in http.get("/v1/artifacts").json()] == [sha]

            # Garbage on device topics: the server counts it and keeps answering.
            before = http.get("/v1/info").json()["rejected"]
            client.publish(topics.status(dev), b"not json {")
            client.publish(topics.telemetry(dev), b'{"seq": "one", "count": true}')
            client.publish(topics.heartbeat(f"ghost-{dev}"), messages.Heartbeat(uptime_s=3.0).encode())
            client.publish("edgectl/v1/devices/bad id!/status", status("online"))
            client.publish(topics.telemetry(dev), os.urandom(70_000))

            def grew() -> bool:
                now = http.get("/v1/info").json()["rejected"]
                return all(now.get(k, 0) - before.get(k, 0) >= n
                           for k, n in {"bad_message": 3, "unknown_device": 1, "bad_topic": 1}.items())

            wait_for(grew, 10, "rejections counted")
            assert http.get("/v1/info").status_code == 200
            assert device_of(http, dev) is None

            # A device comes online (retained, like the agent), then its last will arrives.
            client.publish(topics.status(dev), status("online", group="lab"), retain=True)
            d = wait_for(lambda: device_of(http, dev), 10, "device known")
            assert d["online"] is True and d["labels"] == {"group": "lab"}

            # Deploy to it: the desired state is retained for the device; fetch is answered.
            client.subscribe(topics.desired(dev), topics.chunks(dev))
            r = http.post("/v1/deployments", json={"artifact": sha, "selector": f"device:{dev}"})
            assert r.status_code == 201, r.text
            dep = r.json()
            assert dep["targets"] == [dev] and (dep["name"], dep["version"]) == ("m", "1")
            topic, payload = client.received.get(timeout=10)
            desired = messages.decode("desired", payload)
            assert topic == topics.desired(dev) and desired.deployment_id == dep["id"]
            assert desired.chunk_size == 2048 and desired.size == len(bundle)
            client.publish(topics.fetch(dev), messages.Fetch(sha, list(range(desired.chunk_count))).encode())
            chunks = [frames.Chunk.decode(client.received.get(timeout=10)[1])
                      for _ in range(desired.chunk_count)]
            assert b"".join(c.data for c in sorted(chunks, key=lambda c: c.index)) == bundle
            client.publish(topics.reported(dev), messages.Reported(dep["id"], sha, "active").encode())
            wait_for(lambda: http.get(f"/v1/deployments/{dep['id']}").json()["devices"][0]["state"] == "active",
                     10, "deployment active")

            client.publish(topics.status(dev), status("offline"), retain=True)
            wait_for(lambda: device_of(http, dev)["online"] is False, 10, "device offline")  # type: ignore[index]
            health = {h["id"]: h for h in http.get("/v1/fleet/health", params={"window": 600}).json()["devices"]}
            assert health[dev]["outages"] == 1 and health[dev]["deployment_state"] == "active"
            assert health[dev]["model_version"] == "1"

            # Clear HTTP errors.
            assert http.get("/v1/devices/nobody").status_code == 404
            r = http.post("/v1/deployments", json={"artifact": sha, "selector": "group:nowhere-x"})
            assert r.status_code == 400 and "matches no known device" in r.json()["detail"]
            r = http.post("/v1/deployments", json={"artifact": sha, "selector": "nonsense"})
            assert r.status_code == 400 and "device:ID" in r.json()["detail"]
            r = http.post("/v1/deployments", json={"artifact": "0" * 64, "selector": "all"})
            assert r.status_code == 404
            r = http.post("/v1/deployments", json={"artifact": sha, "selector": "device:nobody-x"})
            assert r.status_code == 404 and "nobody-x" in r.json()["detail"]
            assert http.get("/v1/deployments/d-nope").status_code == 404
            assert isinstance(http.get("/v1/fleet/health?window=0").json()["detail"], str)
        finally:
            for t in (topics.status(dev), topics.desired(dev)):
                client.publish(t, b"", retain=True)  # clear retained messages of this test
            client.close()

    t1 = time.monotonic()
    assert server.terminate(timeout=10) == 0
    assert time.monotonic() - t1 < 10
    assert not (server.data / "server.json").exists()
    assert "Traceback" not in server.stderr()
    assert time.monotonic() - t0 < 30


def test_start_errors_exit_2_with_one_line(mosquitto: Any, start_server: Callable[..., ServerProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s1 = start_server("--broker", mosquitto.url, "--http", f"127.0.0.1:{port}", sub="a")
        s2 = start_server("--broker", mosquitto.url, "--db", "nosuchdb://x/y", sub="b")
        for s, needle in ((s1, f"127.0.0.1:{port}"), (s2, "cannot open database")):
            assert s.proc.wait(timeout=20) == 2
            err = s.stderr().strip().splitlines()
            assert "Traceback" not in s.stderr()
            assert len(err) == 1 and err[0].startswith("edgectl-server: error:") and needle in err[0]


def test_local_broker_is_started_supervised_and_stopped(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--broker", "local", "--http", "127.0.0.1:0")
    ready = server.wait_ready()
    broker_port = int(ready["broker"].rsplit(":", 1)[1])
    assert broker_port != 1883
    conf = (server.data / "broker" / "mosquitto.conf").read_text()
    assert f"listener {broker_port} 127.0.0.1" in conf and "persistence true" in conf
    pid_file = server.data / "broker" / "mosquitto.pid"
    pid = int(pid_file.read_text())
    dev = f"pi-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=ready["http"], timeout=10, headers=auth(server)) as http:
        client = Mqtt(ready["broker"])
        try:
            client.publish(topics.status(dev), status("online"), retain=True)
            assert wait_for(lambda: device_of(http, dev), 10, "device known")["online"] is True
        finally:
            client.close()

        # The supervisor restarts a broker that dies; the server reconnects and keeps ingesting.
        os.kill(pid, signal.SIGKILL)
        new_pid = wait_for(lambda: pid_file.exists() and int(pid_file.read_text() or 0) != pid
                           and port_accepts(broker_port) and int(pid_file.read_text()), 15, "broker restarted")
        dev2 = f"pi-{uuid.uuid4().hex[:8]}"
        client = Mqtt(ready["broker"])
        try:
            # Republish until the server's own reconnect (paho backs off ~1 s) has happened.
            def seen() -> Any:
                client.publish(topics.status(dev2), status("online"), retain=True)
                return device_of(http, dev2)

            wait_for(seen, 15, "device seen after broker restart")
        finally:
            client.close()
    assert "died" in server.stderr()
    assert server.terminate(timeout=10) == 0
    assert not pid_alive(new_pid)
    assert not port_accepts(broker_port)
    assert "Traceback" not in server.stderr()

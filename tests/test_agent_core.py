"""The agent end to end: a real Mosquitto, a real TFLite interpreter, the agent in a subprocess,
and this test playing the server (desired states, chunk answers) and an inference client.

The tests of this module share one agent process and run in file order; each waits on what
it needs with a bounded timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sdk.protocol import frames, messages, topics
from sdk.protocol.bundle import sha256_bytes, tensor_spec, write_bundle
from sdk.protocol.runtime import TFLiteModel

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
WAIT = 20.0
CHUNK = 1024


# -- the model and its bundles ---------------------------------------------------------------
@dataclass(frozen=True)
class BuiltBundle:
    data: bytes
    sha: str
    name: str
    version: str


@dataclass(frozen=True)
class Models:
    tflite: bytes
    good: BuiltBundle
    good2: BuiltBundle
    bad_sample: BuiltBundle
    x: np.ndarray


def _bundle(tmp: Path, tflite: bytes, version: str, x: np.ndarray, expected: np.ndarray) -> BuiltBundle:
    manifest = {
        "name": "tiny", "version": version, "quantization": "none",
        "model": {"file": "model.tflite", "inputs": [tensor_spec("x", [-1, 4], "float32")],
                  "outputs": [tensor_spec("y", [-1, 3], "float32")]},
        "sample": {"input": "sample_input.npy", "output": "sample_output.npy", "atol": 1e-5, "rtol": 1e-5},
    }
    # Incompressible padding makes the bundle ~40 chunks, so the fetch window is exercised.
    padding = np.random.default_rng(int(version.replace(".", ""))).bytes(40 * 1024)
    files = {"model.tflite": tflite, "sample_input.npy": frames.tensor_to_npy(x),
             "sample_output.npy": frames.tensor_to_npy(expected), "padding.bin": padding}
    path = tmp / f"tiny-{version}.zip"
    sha = write_bundle(path, manifest, files)
    data = path.read_bytes()
    assert sha256_bytes(data) == sha
    return BuiltBundle(data, sha, "tiny", version)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    import tensorflow as tf
    tf.keras.utils.set_random_seed(7)
    m = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(3)])
    tflite = tf.lite.TFLiteConverter.from_keras_model(m).convert()
    x = np.random.default_rng(1).random((2, 4), dtype=np.float32)
    expected = TFLiteModel(tflite).run(x)
    tmp = tmp_path_factory.mktemp("bundles")
    return Models(
        tflite=tflite,
        good=_bundle(tmp, tflite, "1.0", x, expected),
        good2=_bundle(tmp, tflite, "2.0", x, expected),
        bad_sample=_bundle(tmp, tflite, "3.0", x, expected + 1.0),
        x=x,
    )


# -- the server's side, in the test ----------------------------------------------------------
@dataclass
class Msg:
    topic: str
    payload: bytes
    props: Any
    at: float


class FakeServer:
    """Publishes desired states, answers Fetch with chunks, records everything the agent says."""

    def __init__(self, broker_host: str, port: int, device_id: str):
        self.device_id = device_id
        self.client_id = f"test-{uuid.uuid4().hex[:8]}"
        self.artifacts: dict[str, bytes] = {}
        self.hold = False  # when True, Fetch requests are recorded but not answered
        self.sent = 0  # inference requests sent
        self.msgs: list[Msg] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=self.client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(broker_host, port)
        self.client.loop_start()
        assert connected.wait(WAIT), "test client could not connect"
        dev = device_id
        subs = [topics.status(dev), topics.reported(dev), topics.telemetry(dev), topics.heartbeat(dev),
                topics.fetch(dev), topics.client_responses(self.client_id)]
        info = self.client.subscribe([(t, 1) for t in subs])
        assert info[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)  # let the SUBACK arrive before anything is published

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        msg = Msg(message.topic, bytes(message.payload), message.properties, time.monotonic())
        with self.cond:
            self.msgs.append(msg)
            self.cond.notify_all()
        if message.topic == topics.fetch(self.device_id) and not self.hold:
            self.answer(messages.decode("fetch", msg.payload))

    def answer(self, fetch: messages.Fetch) -> None:
        data = self.artifacts.get(fetch.artifact)
        if data is None:
            return
        count = -(-len(data) // CHUNK)
        for i in fetch.indexes:
            chunk = frames.Chunk(fetch.artifact, i, count, data[i * CHUNK:(i + 1) * CHUNK])
            self.client.publish(topics.chunks(self.device_id), chunk.encode(), qos=1)

    def desired(self, b: BuiltBundle, deployment_id: str) -> messages.Desired:
        self.artifacts[b.sha] = b.data
        d = messages.Desired(deployment_id=deployment_id, artifact=b.sha, size=len(b.data),
                             chunk_size=CHUNK, name=b.name, version=b.version)
        self.client.publish(topics.desired(self.device_id), d.encode(), qos=1, retain=True).wait_for_publish(WAIT)
        return d

    def publish(self, topic: str, payload: bytes, props: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(WAIT)

    def mark(self) -> int:
        with self.cond:
            return len(self.msgs)

    def wait(self, pred: Callable[[Msg], bool], since: int = 0, timeout: float = WAIT) -> Msg:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.msgs[since:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching message within {timeout}s; got "
                                         f"{[(m.topic.rsplit('/', 1)[-1], m.payload[:120]) for m in self.msgs[since:]]}")
                self.cond.wait(left)

    def of(self, kind: str, since: int = 0) -> list[Msg]:
        topic = topics.device(self.device_id, kind)
        with self.cond:
            return [m for m in self.msgs[since:] if m.topic == topic]

    def wait_reported(self, deployment_id: str, state: str, since: int = 0) -> messages.Reported:
        topic = topics.reported(self.device_id)

        def match(m: Msg) -> bool:
            if m.topic != topic:
                return False
            r = messages.decode("reported", m.payload)
            return r.deployment_id == deployment_id and r.state == state

        return messages.decode("reported", self.wait(match, since).payload)

    def infer(self, payload: bytes | np.ndarray, *, response: bool = True) -> frames.InferResponse | None:
        if isinstance(payload, np.ndarray):
            payload = frames.tensor_to_npy(payload)
        props = Properties(PacketTypes.PUBLISH)
        corr = uuid.uuid4().bytes
        props.CorrelationData = corr
        if response:
            props.ResponseTopic = topics.client_responses(self.client_id)
        start = self.mark()
        self.sent += 1
        self.publish(topics.infer(self.device_id), payload, props)
        if not response:
            return None
        m = self.wait(lambda m: getattr(m.props, "CorrelationData", None) == corr, start)
        assert m.topic == topics.client_responses(self.client_id)
        return frames.InferResponse.decode(m.payload)

    def close(self) -> None:
        # Clear the retained desired state so the broker forgets this device.
        self.client.publish(topics.desired(self.device_id), b"", qos=1, retain=True).wait_for_publish(WAIT)
        self.client.disconnect()
        self.client.loop_stop()


# -- the agent process -----------------------------------------------------------------------
class AgentProc:
    def __init__(self, broker_url: str, device_id: str, data: Path, log: Path):
        self.args = [sys.executable, "-m", "agent.main", "--device-id", device_id, "--broker", broker_url,
                     "--data", str(data), "--heartbeat", "1", "--telemetry-interval", "1",
                     "--label", "group=lab", "--profile", "raspberry-pi-4", "--log-level", "DEBUG"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})

    def kill(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=WAIT)
        finally:
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGKILL)


@dataclass
class Env:
    server: FakeServer
    agent: AgentProc
    models: Models
    data: Path


@pytest.fixture(scope="module")
def env(mosquitto: Any, models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    device_id = f"pi-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("agent")
    server = FakeServer(mosquitto.host, mosquitto.port, device_id)
    agent = AgentProc(mosquitto.url, device_id, tmp / "data", tmp / "agent.log")
    agent.start()
    try:
        yield Env(server, agent, models, tmp / "data")
    finally:
        agent.stop()
        server.close()


def _status(m: Msg) -> messages.Status:
    return messages.decode("status", m.payload)


def is_status(env: Env, state: str, artifact: str | None = None) -> Callable[[Msg], bool]:
    def pred(m: Msg) -> bool:
        if m.topic != topics.status(env.server.device_id):
            return False
        s = _status(m)
        return s.state == state and (artifact is None or (s.active is not None and s.active.artifact == artifact))
    return pred


# -- the tests -------------------------------------------------------------------------------
def test_deploy_goes_through_every_state(env: Env) -> None:
    srv, good = env.server, env.models.good
    srv.wait(is_status(env, "online"))
    start = srv.mark()
    srv.desired(good, "dep-1")
    srv.wait_reported("dep-1", "active", start)
    states = [messages.decode("reported", m.payload).state for m in srv.of("reported", start)]
    assert states == ["downloading", "verifying", "smoke_testing", "active"]
    status = _status(srv.wait(is_status(env, "online", good.sha), start))
    assert status.active is not None and status.active.version == "1.0"
    assert status.labels == {"group": "lab"} and status.profile == "raspberry-pi-4"
    assert status.runtime and status.agent_version == "0.1.0" and status.heartbeat_s == 1.0
    fetches = [messages.decode("fetch", m.payload) for m in srv.of("fetch", start)]
    assert len(fetches) > 1 and all(len(f.indexes) <= 16 for f in fetches)
    assert sorted(i for f in fetches for i in f.indexes) == list(range(-(-len(good.data) // CHUNK)))
    assert not list((env.data / "downloads").iterdir()), "the partial download must be removed"


def test_inference_matches_the_host_interpreter(env: Env) -> None:
    x = np.random.default_rng(5).random((3, 4), dtype=np.float32)
    r = env.server.infer(x)
    assert r is not None and r.ok, r
    np.testing.assert_allclose(r.output, TFLiteModel(env.models.tflite).run(x), rtol=1e-5, atol=1e-6)
    assert r.model_version == "1.0" and r.latency_ms > 0


@pytest.mark.parametrize(("tensor", "words"), [
    (np.zeros((1, 5), np.float32), "shape"),
    (np.zeros((1, 4), np.float64), "dtype"),
])
def test_wrong_input_is_answered_with_a_clear_error(env: Env, tensor: np.ndarray, words: str) -> None:
    r = env.server.infer(tensor)
    assert r is not None and not r.ok and words in r.error and "model expects" in r.error


def test_garbage_does_not_kill_the_agent(env: Env) -> None:
    srv, dev = env.server, env.server.device_id
    for topic, payload in [(topics.desired(dev), b"{not json"), (topics.desired(dev), b'{"artifact": 5}'),
                           (topics.chunks(dev), b"EDG1garbage"), (topics.chunks(dev), b"\x00" * 10),
                           (topics.chunks(dev), frames.Chunk("ab" * 32, 0, 1, b"stray").encode())]:
        srv.publish(topic, payload)
    r = srv.infer(b"definitely not npy")
    assert r is not None and not r.ok and ".npy" in r.error
    srv.infer(frames.tensor_to_npy(env.models.x), response=False)  # no ResponseTopic: dropped
    r = srv.infer(env.models.x)
    assert r is not None and r.ok


def test_failed_smoke_test_keeps_the_previous_model(env: Env) -> None:
    srv, bad = env.server, env.models.bad_sample
    start = srv.mark()
    srv.desired(bad, "dep-bad")
    failed = srv.wait_reported("dep-bad", "failed", start)
    assert "smoke test" in failed.detail and "3.0" in failed.detail, failed.detail
    states = [messages.decode("reported", m.payload).state for m in srv.of("reported", start)]
    assert states == ["downloading", "verifying", "smoke_testing", "failed"]
    r = srv.infer(env.models.x)
    assert r is not None and r.ok and r.model_version == "1.0"
    assert not list((env.data / "downloads").iterdir())
    # The server rolls back: the desired state names the active artifact again.
    start = srv.mark()
    srv.desired(env.models.good, "dep-1")
    srv.wait_reported("dep-1", "active", start)
    assert not srv.of("fetch", start)


def test_newer_desired_supersedes_a_download(env: Env) -> None:
    srv = env.server
    start = srv.mark()
    srv.hold = True
    srv.desired(env.models.good2, "dep-2")
    srv.wait_reported("dep-2", "downloading", start)
    srv.wait(lambda m: m.topic == topics.fetch(srv.device_id), start)
    srv.hold = False
    srv.desired(env.models.good, "dep-1")  # back to the active model: cancels the download
    srv.wait_reported("dep-1", "active", start)
    assert not list((env.data / "downloads").iterdir())
    r = srv.infer(env.models.x)
    assert r is not None and r.ok and r.model_version == "1.0"


def test_telemetry_counts_every_request_with_increasing_seq(env: Env) -> None:
    srv = env.server
    for _ in range(3):
        srv.infer(env.models.x)
    srv.infer(np.zeros((2, 2), np.float32))

    def totals() -> tuple[int, int, list[messages.Telemetry]]:
        tel = [messages.decode("telemetry", m.payload) for m in srv.of("telemetry")]
        return sum(t.count for t in tel), sum(t.errors for t in tel), tel

    deadline = time.monotonic() + WAIT
    while totals()[0] < srv.sent and time.monotonic() < deadline:
        time.sleep(0.2)
    count, errors, tel = totals()
    assert count == srv.sent
    # Errors so far: wrong shape, wrong dtype, not-npy, dropped, and the (2, 2) request above.
    assert errors == 5
    seqs = [t.seq for t in tel]
    assert seqs == sorted(set(seqs)), "seq must be strictly increasing"
    assert any(t.artifact == env.models.good.sha and t.model_version == "1.0" for t in tel)
    assert all(t.rss_bytes and t.rss_bytes > 0 for t in tel)
    assert srv.of("heartbeat"), "heartbeats arrive every second"


def test_sigkill_publishes_offline_and_restart_serves_without_download(env: Env) -> None:
    srv, good = env.server, env.models.good
    last_seq = max(messages.decode("telemetry", m.payload).seq for m in srv.of("telemetry"))
    start = srv.mark()
    env.agent.kill(signal.SIGKILL)
    srv.wait(is_status(env, "offline"), start)
    start = srv.mark()
    env.agent.start()
    srv.wait(is_status(env, "online", good.sha), start)
    srv.wait_reported("dep-1", "active", start)
    r = srv.infer(env.models.x)
    assert r is not None and r.ok and r.model_version == "1.0"
    tel = srv.wait(lambda m: m.topic == topics.telemetry(srv.device_id), start)
    assert messages.decode("telemetry", tel.payload).seq > last_seq
    assert not srv.of("fetch", start), "a restart must not download the active model again"


def test_second_model_goes_to_slot_b_and_a_corrupt_slot_falls_back(env: Env) -> None:
    srv, good2 = env.server, env.models.good2
    start = srv.mark()
    srv.desired(good2, "dep-2")
    srv.wait_reported("dep-2", "active", start)
    r = srv.infer(env.models.x)
    assert r is not None and r.ok and r.model_version == "2.0"
    slot_b = env.data / "slots" / "b" / "bundle.zip"
    assert slot_b.read_bytes() == good2.data
    # Corrupt the active slot while the agent is down: it must come back on the previous model,
    # then converge to the desired one again.
    env.agent.kill(signal.SIGKILL)
    slot_b.write_bytes(slot_b.read_bytes()[:1000])
    start = srv.mark()
    env.agent.start()
    srv.wait(is_status(env, "online", env.models.good.sha), start)
    srv.wait_reported("dep-2", "active", start)
    states = [messages.decode("reported", m.payload).state for m in srv.of("reported", start)]
    assert states == ["downloading", "verifying", "smoke_testing", "active"]
    r = srv.infer(env.models.x)
    assert r is not None and r.ok and r.model_version == "2.0"


def test_sigterm_goes_offline_and_exits_0(env: Env) -> None:
    srv = env.server
    srv.wait(is_status(env, "online"))
    start = srv.mark()
    assert env.agent.kill(signal.SIGTERM) == 0
    srv.wait(is_status(env, "offline"), start)

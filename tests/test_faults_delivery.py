"""Delivery that survives faults: the real agent process against a real Mosquitto, with this test
playing the server (desired states, chunk answers), killed with SIGKILL at named crash points
(``EDGECTL_CRASH_AT``) and at random moments, and cut off from its broker mid-download.

After every kill the data dir must name a complete, verified model (the old or the new one) as
active; after every restart the download continues from the chunks recorded on disk.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import faults, resume
from sdk.protocol import frames, messages, topics
from sdk.protocol.bundle import read_bundle, write_bundle
from server.broker import MAX_PACKET
from server.config import MAX_CHUNK_SIZE
from server.mqtt import CHUNK_OVERHEAD
from tests.conftest import mosquitto_binary, wait_port
from tests.test_telemetry_buffer import Broker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1024
WAIT = 15.0


# -- bundles: the digits model, with incompressible padding so that a download is ~90 chunks ---
@dataclass(frozen=True)
class Built:
    data: bytes
    sha: str
    version: str

    @property
    def chunks(self) -> int:
        return -(-len(self.data) // CHUNK)


@pytest.fixture(scope="module")
def bundles(digits: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    base = read_bundle(digits.bundle)
    out = []
    tmp = tmp_path_factory.mktemp("fault-bundles")
    for n in range(1, 5):
        manifest = {k: v for k, v in base.manifest.items() if k != "files"}
        manifest["version"] = f"{n}.0.0"
        files = {**base.files, "padding.bin": np.random.default_rng(n).bytes(40 * 1024)}
        files.pop("manifest.json", None)
        path = tmp / f"digits-{n}.bundle"
        sha = write_bundle(path, manifest, files)
        out.append(Built(path.read_bytes(), sha, manifest["version"]))
    return out


# -- the server's side, in the test ------------------------------------------------------------
@dataclass
class Seen:
    topic: str
    payload: bytes
    at: float


@dataclass
class FakeServer:
    """Answers Fetch with chunks (optionally slowly, from its own thread), republishes the desired
    state after every reconnect (as edgectl-server does), records what the agent says."""

    host: str
    port: int
    device_id: str
    chunk_delay: float = 0.0
    msgs: list[Seen] = field(default_factory=list)
    served: list[tuple[str, int]] = field(default_factory=list)  # (artifact, index) in order

    def __post_init__(self) -> None:
        self.artifacts: dict[str, bytes] = {}
        self.current: bytes | None = None
        self.cond = threading.Condition()
        self.fetches: queue.Queue[messages.Fetch | None] = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"fake-server-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._connected = threading.Event()
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        assert self._connected.wait(WAIT)
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._sender.start()

    def _on_connect(self, client: Any, *_: Any) -> None:
        dev = self.device_id
        client.subscribe([(t, 1) for t in (topics.status(dev), topics.reported(dev), topics.fetch(dev))])
        if self.current is not None:
            client.publish(topics.desired(dev), self.current, qos=1, retain=True)
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, m: Any) -> None:
        seen = Seen(m.topic, bytes(m.payload), time.monotonic())
        with self.cond:
            self.msgs.append(seen)
            self.cond.notify_all()
        if m.topic == topics.fetch(self.device_id):
            self.fetches.put(messages.decode("fetch", seen.payload))

    def _send(self) -> None:
        while (f := self.fetches.get()) is not None:
            data = self.artifacts.get(f.artifact)
            if data is None:
                continue
            count = -(-len(data) // CHUNK)
            for i in f.indexes:
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
                with self.cond:
                    self.served.append((f.artifact, i))
                chunk = frames.Chunk(f.artifact, i, count, data[i * CHUNK:(i + 1) * CHUNK])
                self.client.publish(topics.chunks(self.device_id), chunk.encode(), qos=1)

    def desired(self, b: Built, deployment_id: str) -> None:
        self.artifacts[b.sha] = b.data
        self.current = messages.Desired(deployment_id=deployment_id, artifact=b.sha, size=len(b.data),
                                        chunk_size=CHUNK, name="digits", version=b.version).encode()
        self.client.publish(topics.desired(self.device_id), self.current, qos=1, retain=True).wait_for_publish(WAIT)

    def mark(self) -> int:
        with self.cond:
            return len(self.msgs)

    def reported(self, since: int = 0) -> list[messages.Reported]:
        with self.cond:
            return [messages.decode("reported", m.payload) for m in self.msgs[since:]
                    if m.topic == topics.reported(self.device_id)]

    def fetched(self, since: int = 0) -> list[int]:
        with self.cond:
            return [i for m in self.msgs[since:] if m.topic == topics.fetch(self.device_id)
                    for i in messages.decode("fetch", m.payload).indexes]

    def wait(self, what: str, pred: Callable[[], Any], timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (got := pred()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; reported: "
                                         f"{[(r.state, r.detail[:80]) for r in self.reported()][-8:]}")
                self.cond.wait(min(left, 0.1))
        return got

    def wait_state(self, dep: str, state: str, since: int = 0, timeout: float = WAIT) -> messages.Reported:
        return self.wait(f"{dep} {state}", lambda: next(
            (r for r in self.reported(since) if r.deployment_id == dep and r.state == state), None), timeout)

    def infer(self, x: np.ndarray) -> frames.InferResponse:
        corr = uuid.uuid4().bytes
        got: queue.Queue[frames.InferResponse] = queue.Queue()
        resp = topics.client_responses(f"faults-{uuid.uuid4().hex[:6]}")

        def on_message(c: Any, u: Any, m: Any) -> None:
            if getattr(m.properties, "CorrelationData", None) == corr:
                got.put(frames.InferResponse.decode(bytes(m.payload)))

        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_message = on_message
        c.connect(self.host, self.port)
        c.loop_start()
        try:
            c.subscribe(resp, qos=1)
            time.sleep(0.1)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = resp, corr
            c.publish(topics.infer(self.device_id), frames.tensor_to_npy(x), qos=1, properties=props)
            return got.get(timeout=WAIT)
        finally:
            c.disconnect()
            c.loop_stop()

    def close(self) -> None:
        self.fetches.put(None)
        self.client.publish(topics.desired(self.device_id), b"", qos=1, retain=True).wait_for_publish(WAIT)
        self.client.disconnect()
        self.client.loop_stop()


# -- the agent process -------------------------------------------------------------------------
class AgentProc:
    def __init__(self, broker_url: str, device_id: str, data: Path, log: Path):
        self.args = [sys.executable, "-m", "agent.main", "--device-id", device_id, "--broker", broker_url,
                     "--data", str(data), "--heartbeat", "1", "--telemetry-interval", "1"]
        self.data, self.log = data, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self, crash_at: str | None = None) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.pop(faults.ENV, None)
        if crash_at:
            env[faults.ENV] = crash_at
        with open(self.log, "ab") as err:
            err.write(f"==== start {crash_at or ''}\n".encode())
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def wait_crash(self, timeout: float = WAIT) -> None:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.proc = None
        assert code == -signal.SIGKILL, f"agent exited with {code}, not by SIGKILL ({self.log_tail()})"
        self.kills += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(WAIT) == -signal.SIGKILL
        self.proc = None
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def run_log(self) -> str:
        """The log of the last run (since its start marker)."""
        return self.log.read_text(errors="replace").rsplit("==== start", 1)[-1]

    def log_tail(self, n: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def recorded(self, sha: str) -> resume.Progress | None:
        return resume.load(self.data / "downloads" / f"{sha}.part")


@dataclass
class Env:
    server: FakeServer
    agent: AgentProc
    broker: Broker


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    broker = Broker(tmp_path)
    broker.start()
    dev = f"pi-{uuid.uuid4().hex[:6]}"
    server = FakeServer("127.0.0.1", broker.port, dev)
    agent = AgentProc(broker.url, dev, tmp_path / "data", tmp_path / "agent.log")
    try:
        yield Env(server, agent, broker)
    finally:
        agent.stop()
        server.close()
        broker.kill()


def installed(data: Path) -> str | None:
    """The artifact ``state.json`` names as active, after checking that its slot holds exactly that
    bundle, complete and valid (what a restarted agent would serve)."""
    state_path = data / "state.json"
    if not state_path.exists():
        return None
    st = json.loads(state_path.read_text())
    if st["active_slot"] is None:
        return None
    bundle = read_bundle(data / "slots" / st["active_slot"] / "bundle.zip")
    assert bundle.sha256 == st["active"]["artifact"], "state.json names a slot holding another bundle"
    return bundle.sha256


X = np.zeros((1, 8, 8, 1), np.float32)


# -- the tests ---------------------------------------------------------------------------------
def test_crash_point_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="verify.start"):
        faults.arm("verify.begin:1")
    with pytest.raises(ValueError, match="N >= 1"):
        faults.arm("verify.start:0")
    faults.arm(None)


def test_chunks_stay_well_under_the_brokers_packet_limit() -> None:
    assert MAX_CHUNK_SIZE + CHUNK_OVERHEAD <= MAX_PACKET // 2
    frame = frames.Chunk("ab" * 32, 10**6, 10**6 + 1, b"x" * 1024).encode()
    assert len(frame) - 1024 + len(topics.chunks("d" * 64)) < CHUNK_OVERHEAD


def test_kill_mid_download_resumes_from_the_chunks_on_disk(env: Env, bundles: list[Built]) -> None:
    srv, agent, b = env.server, env.agent, bundles[0]
    srv.desired(b, "dep-r")
    agent.start(crash_at="download.checkpoint:3")  # killed right after recording 48 chunks
    agent.wait_crash()
    rec = agent.recorded(b.sha)
    assert rec is not None and len(rec.received) == 48 and rec.stage == "downloading"
    assert installed(agent.data) is None
    mark = srv.mark()
    agent.start()
    srv.wait_state("dep-r", "active", mark)
    first = srv.reported(mark)[0]
    assert first.state == "downloading" and f"resuming: 48/{b.chunks} chunks already on disk" in first.detail
    refetched = srv.fetched(mark)
    assert sorted(refetched) == sorted(set(range(b.chunks)) - rec.received), "only the missing chunks"
    assert installed(agent.data) == b.sha
    assert "an interrupted deployment was found" in agent.log_tail(20000)
    assert not list((agent.data / "downloads").iterdir())
    r = srv.infer(X)
    assert r.ok and r.model_version == b.version


def test_corrupt_chunk_on_disk_restarts_the_download_from_zero_once(env: Env, bundles: list[Built]) -> None:
    srv, agent, b = env.server, env.agent, bundles[1]
    srv.desired(b, "dep-c")
    agent.start(crash_at="download.checkpoint:2")
    agent.wait_crash()
    rec = agent.recorded(b.sha)
    assert rec is not None and 5 in rec.received
    part = agent.data / "downloads" / f"{b.sha}.part"
    with open(part, "r+b") as f:  # a recorded chunk rots on the disk while the agent is down
        f.seek(5 * CHUNK + 10)
        f.write(b"\xff" * 16)
    mark = srv.mark()
    agent.start()
    srv.wait_state("dep-c", "active", mark)
    states = [(r.state, r.detail) for r in srv.reported(mark)]
    assert [s for s, _ in states] == ["downloading", "verifying", "downloading", "verifying",
                                      "smoke_testing", "active"], states
    assert "is corrupt" in states[2][1] and "restarting the download from zero" in states[2][1]
    assert sorted(srv.fetched(mark)).count(0) == 1 and len(srv.fetched(mark)) >= b.chunks
    assert installed(agent.data) == b.sha


def test_broker_outage_mid_download_continues_where_it_was(env: Env, bundles: list[Built]) -> None:
    srv, agent, b = env.server, env.agent, bundles[2]
    srv.chunk_delay = 0.01  # ~1 s for the whole download: time to pull the plug half-way
    srv.desired(b, "dep-o")
    mark = srv.mark()
    agent.start()
    srv.wait("half of the chunks", lambda: len(srv.served) >= b.chunks // 2)
    env.broker.kill()
    with srv.cond:
        before = {i for a, i in srv.served if a == b.sha}
    time.sleep(1.5)  # longer than the agent's reconnect delay
    env.broker.start()  # same port; it forgot the retained desired state: the server republishes it
    srv.wait_state("dep-o", "active", mark, timeout=30)
    assert installed(agent.data) == b.sha
    after = [i for a, i in srv.served[len(before):] if a == b.sha]
    # Chunks in flight when the broker died are asked for again; nothing before them is.
    assert len(before) + len(after) <= b.chunks + 2 * 16, (len(before), len(after))
    assert 0 not in after, "the download did not start over"
    assert "re-requesting the rest" in agent.log_tail(50000)
    assert [r.state for r in srv.reported(mark)].count("downloading") == 1


def test_kill_at_every_step_always_leaves_a_valid_model(env: Env, bundles: list[Built]) -> None:
    """23 SIGKILLs: 19 at named crash points across three deployments, 4 at random moments."""
    srv, agent = env.server, env.agent
    t0 = time.monotonic()
    rounds: list[tuple[Built, list[str]]] = [
        (bundles[0], []),  # first install, no crash
        (bundles[1], ["download.chunk:1", "download.chunk:9", "download.checkpoint:1", "download.checkpoint:2",
                      "download.chunk:20", "verify.start", "verify.done", "smoke.done", "swap.slot_written",
                      "swap.activated"]),
        (bundles[2], ["download.chunk:2", "download.checkpoint:1", "verify.start", "smoke.done",
                      "swap.slot_invalidated", "swap.slot_written", "swap.serving"]),
        (bundles[3], ["random", "random", "random", "random", "verify.done", "swap.activated"]),
    ]
    rng = random.Random(7)
    old: str | None = None
    log: list[str] = []
    for n, (new, points) in enumerate(rounds):
        dep = f"dep-k{n}"
        srv.desired(new, dep)
        for point in points:
            before = agent.recorded(new.sha)
            mark = srv.mark()
            if point == "random":  # a real kill -9 at a random moment of the rest of the download
                srv.chunk_delay = 0.004
                agent.start()
                srv.wait("a fetch", lambda m=mark: srv.fetched(m))
                left = new.chunks - (len(before.received) if before else 0)
                time.sleep(rng.uniform(0.0, 0.8 * left * srv.chunk_delay))
                agent.kill()
                srv.chunk_delay = 0.0
            else:
                agent.start(crash_at=point)
                agent.wait_crash()
            now = installed(agent.data)
            assert now in {old, new.sha}, f"after a kill at {point}: active {now}, expected old or new"
            rec = agent.recorded(new.sha)
            log.append(f"{point}: active={'new' if now == new.sha else 'old'}, on disk "
                       f"{len(rec.received) if rec else 0}/{new.chunks} ({rec.stage if rec else '-'})")
            if before is not None:  # what the restarted agent said about where it was
                said = agent.run_log()
                assert "an interrupted deployment was found" in said and f"stopped while {before.stage}" in said
                where = f"resuming: {len(before.received)}/{new.chunks} chunks already on disk"
                if before.stage != "downloading":
                    where += f"; stopped while {before.stage.replace('_', ' ')}"
                assert where in said, said[-1500:]
        mark = srv.mark()
        agent.start()
        srv.wait_state(dep, "active", mark)
        assert installed(agent.data) == new.sha
        r = srv.infer(X)
        assert r.ok and r.model_version == new.version
        agent.stop()
        old = new.sha
    assert agent.kills == 23
    assert not list((agent.data / "downloads").iterdir())
    assert not list(agent.data.rglob("*.tmp")), "temp files of interrupted writes are cleaned up"
    print(f"\n{agent.kills} kills in {time.monotonic() - t0:.1f} s\n" + "\n".join(log))


def test_server_refuses_chunks_the_broker_would_drop(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    conf = (tmp_path / "mosquitto.conf").read_text()
    broker.kill()
    (tmp_path / "mosquitto.conf").write_text(conf.replace(f"max_packet_size {MAX_PACKET}", "max_packet_size 4096"))
    broker.proc = subprocess.Popen([mosquitto_binary(), "-c", str(tmp_path / "mosquitto.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(broker.port)
        res = subprocess.run([sys.executable, "-m", "server.main", "--data", str(tmp_path / "srv"), "--broker",
                              broker.url, "--http", "127.0.0.1:0", "--chunk-size", "8192"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        broker.kill()
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("edgectl-server: error:") and "at most 4096 bytes" in last, res.stderr
    assert "lower --chunk-size" in last and "Traceback" not in res.stderr

"""Thousands of generated payloads through a real Mosquitto into a real ``edgectl-server`` and a
real agent serving the digits model; afterwards both still answer: the server counted every kind
of refusal (``/v1/info``) and still stores a new device's status and telemetry, the agent still
answers inference with its model, neither process logged a traceback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk.deploy import push_bundle
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, wait_for
from sdk.protocol import histogram, messages, topics
from sdk.protocol.net import parse_broker_url
from tests.fuzzing import KNOWN, agent_message, server_message

pytestmark = pytest.mark.integration

AGENT = "fz-agent"
#: Generated payloads: server topics, then the agent's (batches of 20-30 per Hypothesis example).
SERVER_EXAMPLES, AGENT_EXAMPLES = 80, 40


def _mqtt_text(t: str) -> bool:
    """Mosquitto's rule for UTF-8 strings: no control characters, surrogates or non-characters."""
    return all(not (o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or (o & 0xFFFE) == 0xFFFE
                    or 0xFDD0 <= o <= 0xFDEF) for o in map(ord, t))


def _publishable(topic: str, p: Any = None) -> bool:
    """What a broker accepts from a well-behaved client: anything else is a protocol error that
    gets the *sender* disconnected, and never reaches the server or the agent."""
    def ok(t: str) -> bool:
        return (bool(t) and not any(c in t for c in "+#") and not t.startswith("$") and len(t.encode()) < 60000
                and _mqtt_text(t))

    rt = getattr(p, "ResponseTopic", None) if p is not None else None
    return ok(topic) and (rt is None or ok(rt))


def generate(examples: int, strategy: st.SearchStrategy[Any]) -> list[Any]:
    out: list[Any] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(strategy, min_size=20, max_size=30))
    def collect(batch: list[Any]) -> None:
        out.extend(batch)

    collect()
    return out


class Publisher:
    def __init__(self, broker: str):
        host, port = parse_broker_url(broker)
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                             client_id="fuzzer")
        self.c.max_inflight_messages_set(200)
        self.c.max_queued_messages_set(0)
        self.disconnects = 0
        self.c.on_disconnect = lambda *a: setattr(self, "disconnects", self.disconnects + 1)
        ready = threading.Event()
        self.c.on_connect = lambda *a: ready.set()
        self.c.connect(host, port)
        self.c.loop_start()
        assert ready.wait(10)

    def send(self, items: list[tuple[str, bytes, Any]], timeout: float = 60.0) -> None:
        """Publish everything (QoS 1) and wait for every PUBACK; fail at once if the broker drops us."""
        infos = [self.c.publish(t, payload, qos=1, properties=p) for t, payload, p in items]
        wait_for("every PUBACK", lambda: self.disconnects or all(i.is_published() for i in infos), timeout,
                 every=0.05)
        assert self.disconnects == 0, "the broker dropped the fuzzer: a payload broke the MQTT protocol"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def fleet(mosquitto: Any, digits: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path_factory.mktemp("fuzz-fleet")) as f:
        f.start_server(broker=mosquitto.url)
        f.start_agent(AGENT, heartbeat=1.0, telemetry_interval=1.0)
        f.wait_online([AGENT])
        with f.client() as client:
            result = push_bundle(client, digits.bundle, f"device:{AGENT}", wait_s=30)
        assert result["deployment"]["devices"][0]["state"] == "active", result
        yield f


def _telemetry(seq: int) -> bytes:
    hist = histogram.empty()
    hist[30] = 2
    return messages.Telemetry(seq=seq, interval_s=1.0, count=2, errors=0, latency_hist=hist,
                              latency_sum_ms=2.0).encode()


def test_server_and_agent_keep_answering_after_fuzz(fleet: LocalFleet, digits: Any) -> None:
    server_items = [(t, p, None) for t, p in generate(SERVER_EXAMPLES, server_message()) if _publishable(t)]
    agent_topics = {"desired": topics.desired(AGENT), "chunks": topics.chunks(AGENT), "infer": topics.infer(AGENT)}
    agent_items = [m for m in generate(AGENT_EXAMPLES, agent_message(agent_topics)) if _publishable(m[0], m[2])]
    assert len(server_items) + len(agent_items) >= 2000, (len(server_items), len(agent_items))

    with fleet.client() as client:
        before = client.info()["rejected"]
    pub = Publisher(fleet.broker)
    try:
        online = messages.Status(state="online").encode()
        # Known devices, and one telemetry message replayed: a duplicate the server must count.
        pub.send([(topics.status(d), online, None) for d in KNOWN]
                 + [(topics.telemetry(KNOWN[0]), _telemetry(10_000), None)] * 2)
        pub.send(server_items)
        pub.send(agent_items)

        with fleet.client() as client:
            def counted() -> dict[str, int] | None:
                now = client.info()["rejected"]
                grew = {k: now.get(k, 0) - before.get(k, 0) for k in
                        ("bad_topic", "bad_message", "unknown_device", "duplicate")}
                return grew if all(v > 0 for v in grew.values()) else None

            grew = wait_for("the server to count every kind of refusal", counted, timeout=30)
            info = client.info()
            print(f"\n{len(server_items)} payloads to the server's topics, {len(agent_items)} to the agent's; "
                  f"rejections counted: {grew}; now {info['rejected']}, ingest {info['ingest']}")
            assert "internal_error" not in info["rejected"], info["rejected"]

            # The server still stores a new device and its telemetry.
            pub.send([(topics.status("fz-after"), messages.Status(state="online", labels={"group": "z"}).encode(),
                       None), (topics.telemetry("fz-after"), _telemetry(1), None)])
            wait_for("fz-after stored", lambda: any(d["id"] == "fz-after" and d["online"] for d in client.devices()),
                     timeout=10)
            wait_for("fz-after's telemetry", lambda: client.device("fz-after", 600)["window"]["inferences"] == 2,
                     timeout=10)
    finally:
        pub.close()

    # The agent still answers correctly with its model.
    data = np.load(digits.eval)
    x, y = data["x"][:20].astype(np.float32), data["y"][:20]
    with InferenceClient(fleet.broker) as ic:
        answers = [ic.infer(AGENT, x[i:i + 1], timeout=10) for i in range(len(x))]
    assert all(a.ok and a.model_version == "1.0.0" for a in answers), answers[:2]
    assert np.mean([int(np.argmax(a.output)) == int(t) for a, t in zip(answers, y, strict=True)]) >= 0.8

    assert fleet.server is not None and fleet.server.poll() is None
    assert fleet.agents[AGENT].poll() is None
    agent_log = (fleet.workdir / f"{AGENT}.log").read_text(errors="replace")
    server_log = (fleet.workdir / "server.log").read_text(errors="replace")
    assert "Traceback" not in agent_log and "Traceback" not in server_log
    assert "malformed message on" in agent_log and "rejected:" in agent_log  # refusals logged with a reason
    assert "rejected message on" in server_log

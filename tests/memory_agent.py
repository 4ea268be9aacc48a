"""An agent driven in memory for tests of its deployment logic with real bundles and a real
interpreter: a transport that records what the agent publishes, and the server's side of a
chunked download played by the test."""

from __future__ import annotations

from typing import Any

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.core import Agent
from sdk.protocol import frames, messages, topics

CHUNK = 4096


class MemoryTransport:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.published: list[tuple[str, bytes, Any]] = []

    def start(self, on_connect: Any, on_message: Any) -> None:
        on_connect()

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        pass

    def unsubscribe(self, topics: list[str]) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None) -> None:
        self.published.append((topic, payload, properties))

    def stop(self, final: Any = None, timeout: float = 5.0) -> None:
        pass

    def on(self, kind: str) -> list[Any]:
        """Every message of one kind the agent published on its own topics, decoded."""
        return [messages.decode(kind, p) for t, p, _ in self.published if t == topics.device(self.device_id, kind)]


def deliver(agent: Agent, t: MemoryTransport, data: bytes, sha: str, answered: int = 0, chunk: int = CHUNK) -> None:
    """Play the server: answer every fetch from ``answered`` on with the chunks it asks for."""
    count = -(-len(data) // chunk)
    while answered < len(t.on("fetch")):
        for i in t.on("fetch")[answered].indexes:
            agent.handle_chunk(frames.Chunk(sha, i, count, data[i * chunk:(i + 1) * chunk]).encode())
        answered += 1


def infer(agent: Agent, t: MemoryTransport, x: np.ndarray) -> frames.InferResponse:
    """One inference request as it would come over MQTT; the agent's answer, decoded."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topics.client_responses("tester")
    agent.handle_infer(frames.tensor_to_npy(x), props)
    return frames.InferResponse.decode(t.published[-1][1])

"""The agent's deployment logic in memory: a fake transport, a fake clock, no broker."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import core
from agent.core import Agent
from agent.machine import State
from agent.slots import DataDir
from sdk.protocol import frames, messages, topics

DEV = "pi-mem"
SHA = "ab" * 32


class FakeTransport:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool, Any]] = []
        self.subscribed: list[str] = []

    def start(self, on_connect: Any, on_message: Any) -> None:
        on_connect()

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        self.subscribed += topics

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None) -> None:
        self.published.append((topic, payload, qos, retain, properties))

    def stop(self, final: Any = None, timeout: float = 5.0) -> None:
        if final:
            self.publish(final[0], final[1], 1, True)

    def on(self, kind: str) -> list[Any]:
        topic = topics.device(DEV, kind)
        return [messages.decode(kind, p) for t, p, *_ in self.published if t == topic]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Agent, FakeTransport, Clock]:
    t, clock = FakeTransport(), Clock()
    agent = Agent(DEV, t, DataDir(tmp_path), clock=clock, stall_s=20.0, retries=3, window=16)
    return agent, t, clock


def desired(size: int = 100 * 1024, dep: str = "dep-1", sha: str = SHA) -> bytes:
    return messages.Desired(deployment_id=dep, artifact=sha, size=size, chunk_size=1024,
                            name="m", version="1").encode()


def test_connect_subscribes_and_publishes_retained_online(setup: Any) -> None:
    agent, t, _ = setup
    t.start(agent._on_connect, agent.on_message)
    assert set(t.subscribed) == {topics.desired(DEV), topics.chunks(DEV), topics.infer(DEV)}
    topic, payload, qos, retain, _ = t.published[-1]
    assert topic == topics.status(DEV) and qos == 1 and retain
    assert messages.decode("status", payload).state == "online"


def test_fetch_window_and_stall_retries_then_failure(setup: Any) -> None:
    agent, t, clock = setup
    agent.handle_desired(desired())
    assert agent.state is State.DOWNLOADING
    (fetch,) = t.on("fetch")
    assert fetch.indexes == list(range(16))
    # Once half the window is free (8 chunks in) it is topped up; the 9th chunk asks nothing.
    for i in range(9):
        agent.handle_chunk(frames.Chunk(SHA, i, 100, bytes([i]) * 1024).encode())
    assert [f.indexes for f in t.on("fetch")][1] == list(range(16, 24))
    for retry in range(1, 4):
        clock.now += 21
        agent.tick()
        again = t.on("fetch")[-1]
        assert again.indexes == list(range(9, 25)), retry
    clock.now += 21
    agent.tick()
    failed = t.on("reported")[-1]
    assert failed.state == "failed" and "stalled" in failed.detail and "9/100" in failed.detail
    assert agent.state is State.FAILED
    assert not list(agent.data.downloads.iterdir())
    # The same deployment is not retried on redelivery; a new one is.
    agent.handle_desired(desired())
    assert t.on("reported")[-1].state == "failed"
    agent.handle_desired(desired(dep="dep-2"))
    assert t.on("reported")[-1].state == "downloading"


def test_bad_chunks_are_ignored(setup: Any) -> None:
    agent, _, _ = setup
    agent.handle_desired(desired(size=3000))
    agent.handle_chunk(frames.Chunk(SHA, 0, 5, b"x" * 1024).encode())  # wrong count
    agent.handle_chunk(frames.Chunk(SHA, 2, 3, b"x" * 1024).encode())  # last chunk must be 952 bytes
    agent.handle_chunk(frames.Chunk("cd" * 32, 0, 3, b"x" * 1024).encode())  # other artifact
    agent.handle_chunk(b"junk")
    assert agent._download is not None and not agent._download.received
    assert agent.state is State.DOWNLOADING


def test_disk_full_fails_with_a_clear_detail(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, t, _ = setup
    agent.handle_desired(desired(size=3000))

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core.os, "pwrite", full)
    agent.handle_chunk(frames.Chunk(SHA, 0, 3, b"x" * 1024).encode())
    failed = t.on("reported")[-1]
    assert failed.state == "failed"
    assert "No space left on device" in failed.detail and "chunk 0" in failed.detail
    assert not list(agent.data.downloads.iterdir())


def test_corrupt_transfer_fails_verification(setup: Any) -> None:
    agent, t, _ = setup
    agent.handle_desired(desired(size=2048))
    agent.handle_chunk(frames.Chunk(SHA, 0, 2, b"x" * 1024).encode())
    agent.handle_chunk(frames.Chunk(SHA, 1, 2, b"y" * 1024).encode())
    states = [r.state for r in t.on("reported")]
    assert states == ["downloading", "verifying", "failed"]
    assert "corrupt" in t.on("reported")[-1].detail


def test_newer_desired_supersedes(setup: Any) -> None:
    agent, t, _ = setup
    agent.handle_desired(desired())
    agent.handle_desired(desired())  # redelivery of the same: ignored
    assert len(t.on("fetch")) == 1
    agent.handle_desired(desired(dep="dep-2", sha="cd" * 32))
    assert agent._download is not None and agent._download.desired.artifact == "cd" * 32
    assert [p.name for p in agent.data.downloads.iterdir()] == [f"{'cd' * 32}.part"]


def test_infer_without_model_or_response_topic(setup: Any) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    agent, t, _ = setup
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topics.client_responses("cli")
    props.CorrelationData = b"42"
    agent.handle_infer(frames.tensor_to_npy(np.zeros((1, 4), np.float32)), props)
    topic, payload, qos, _, out = t.published[-1]
    assert topic == topics.client_responses("cli") and qos == 1 and out.CorrelationData == b"42"
    r = frames.InferResponse.decode(payload)
    assert not r.ok and "no model is active" in r.error
    n = len(t.published)
    agent.handle_infer(b"x", None)
    assert len(t.published) == n
    snap = agent.telemetry.snapshot(0)
    assert (snap.count, snap.errors) == (2, 2)
    messages.Telemetry.from_dict(snap.to_dict())  # valid on the wire

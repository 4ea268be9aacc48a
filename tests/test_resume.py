"""Resumable downloads in memory: the progress sidecar, and an agent restarted on the same data dir
(real files, a fake transport, no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import resume
from agent.core import Agent
from agent.slots import DataDir
from sdk.protocol import frames, messages, topics

DEV = "pi-resume"
SHA = "cd" * 32
COUNT = 40


class Transport:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None) -> None:
        self.published.append((topic, payload))

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        pass

    def on(self, kind: str) -> list[Any]:
        return [messages.decode(kind, p) for t, p in self.published if t == topics.device(DEV, kind)]


def desired(chunk_size: int = 1024) -> bytes:
    return messages.Desired("dep-1", SHA, COUNT * 1024, chunk_size, "m", "1").encode()


def chunk(i: int) -> bytes:
    return frames.Chunk(SHA, i, COUNT, bytes([i]) * 1024).encode()


def agent_on(root: Path) -> tuple[Agent, Transport]:
    t = Transport()
    a = Agent(DEV, t, DataDir(root), model_factory=lambda b: None)  # type: ignore[arg-type,return-value]
    a.restore()
    return a, t


def test_ranges_round_trip_and_reject_garbage() -> None:
    idx = {0, 1, 2, 5, 7, 8, 39}
    assert resume.to_ranges(idx) == [[0, 2], [5, 5], [7, 8], [39, 39]]
    assert resume.from_ranges(resume.to_ranges(idx), 40) == idx
    for bad in ([[0, 40]], [[3, 2]], [[0]], "0-3", [[0, True]]):
        with pytest.raises(ValueError):
            resume.from_ranges(bad, 40)


def test_a_restarted_agent_asks_only_for_what_is_not_recorded(tmp_path: Path) -> None:
    a, _ = agent_on(tmp_path)
    a.handle_desired(desired())
    for i in range(20):  # progress is recorded after 16 chunks; 16..19 are written, not recorded
        a.handle_chunk(chunk(i))
    side = json.loads((tmp_path / "downloads" / f"{SHA}.progress.json").read_text())
    assert side["received"] == [[0, 15]] and side["stage"] == "downloading"
    b, t = agent_on(tmp_path)  # the "restart": same data dir, nothing in memory
    b.handle_desired(desired())
    (first,) = t.on("reported")
    assert first.state == "downloading" and first.detail == f"resuming: 16/{COUNT} chunks already on disk"
    asked = [i for f in t.on("fetch") for i in f.indexes]
    assert asked == list(range(16, 32)), "the window starts at the first chunk not recorded"
    assert (tmp_path / "downloads" / f"{SHA}.part").read_bytes()[:1024] == bytes([0]) * 1024


def test_another_chunk_size_or_a_truncated_part_starts_from_zero(tmp_path: Path) -> None:
    a, _ = agent_on(tmp_path)
    a.handle_desired(desired())
    for i in range(16):
        a.handle_chunk(chunk(i))
    b, t = agent_on(tmp_path)
    b.handle_desired(desired(chunk_size=2048))  # the server's chunk size changed
    assert t.on("reported")[0].detail == "" and t.on("fetch")[0].indexes[0] == 0
    assert not (tmp_path / "downloads" / f"{SHA}.progress.json").exists()
    part = tmp_path / "downloads" / f"{SHA}.part"
    resume.save(part, resume.Progress(SHA, "dep-1", COUNT * 1024, 1024, set(range(10))))
    part.write_bytes(b"short")
    assert resume.load(part) is None


def test_start_keeps_resumable_downloads_and_removes_the_rest(tmp_path: Path) -> None:
    d = DataDir(tmp_path)
    keep = d.part_path(SHA)
    keep.write_bytes(b"\0" * 2048)
    resume.save(keep, resume.Progress(SHA, "dep-1", 2048, 1024, {0}))
    stale = d.part_path("ef" * 32)
    stale.write_bytes(b"half")
    (tmp_path / "state.json.abc.tmp").write_bytes(b"{")  # a write interrupted by a kill
    kept = d.clean_downloads()
    assert [p.artifact for p in kept] == [SHA] and kept[0].received == {0}
    assert keep.exists() and not stale.exists() and not (tmp_path / "state.json.abc.tmp").exists()
    d.discard_other_downloads("00" * 32)
    assert not list((tmp_path / "downloads").iterdir())

"""A rollback on the agent: the desired bundle is the one in its previous A/B slot, so it is
re-checked and swapped back in without a download. Real bundles and a real interpreter, the
agent driven in memory (fake transport, no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.core import Agent
from agent.machine import State
from agent.slots import DataDir
from sdk.protocol import frames, messages
from sdk.protocol.bundle import tensor_spec, write_bundle
from sdk.protocol.runtime import TFLiteModel
from tests.memory_agent import CHUNK, MemoryTransport, deliver, infer

DEV = "pi-rollback"


Version = tuple[bytes, str, bytes]  # bundle bytes, sha256, model bytes


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    import tensorflow as tf

    x = np.random.default_rng(1).random((2, 4), dtype=np.float32)
    out: dict[str, Version] = {}
    work = tmp_path_factory.mktemp("rollback")
    for seed, version in enumerate(("1", "2")):
        tf.keras.utils.set_random_seed(seed)
        m = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(3)])
        model = tf.lite.TFLiteConverter.from_keras_model(m).convert()
        files = {"model.tflite": model, "in.npy": frames.tensor_to_npy(x),
                 "out.npy": frames.tensor_to_npy(TFLiteModel(model).run(x))}
        manifest = {"name": "m", "version": version, "quantization": "none",
                    "model": {"file": "model.tflite", "inputs": [tensor_spec("x", [-1, 4], "float32")],
                              "outputs": [tensor_spec("y", [-1, 3], "float32")]},
                    "sample": {"input": "in.npy", "output": "out.npy", "atol": 1e-5, "rtol": 1e-5}}
        sha = write_bundle(work / f"v{version}.zip", manifest, files)
        out[version] = ((work / f"v{version}.zip").read_bytes(), sha, model)
    return out


def desire(agent: Agent, v: Version, dep: str) -> None:
    data, sha, _ = v
    agent.handle_desired(messages.Desired(dep, sha, len(data), CHUNK, "m", "x").encode())


def answer(agent: Agent, t: MemoryTransport) -> np.ndarray:
    resp = infer(agent, t, np.ones((1, 4), np.float32))
    assert resp.ok, resp.error
    return resp.output


def expected(v: Version) -> np.ndarray:
    return TFLiteModel(v[2]).run(np.ones((1, 4), np.float32))


@pytest.fixture
def on_v2(versions: dict[str, Version], tmp_path: Path) -> tuple[Agent, MemoryTransport]:
    """An agent that installed v1 (slot a) then v2 (slot b), both downloaded."""
    t = MemoryTransport(DEV)
    agent = Agent(DEV, t, DataDir(tmp_path))
    agent.transport.start(agent._on_connect, agent.on_message)
    for version, dep in (("1", "dep-1"), ("2", "dep-2")):
        n = len(t.on("fetch"))
        desire(agent, versions[version], dep)
        deliver(agent, t, *versions[version][:2], n)
        assert t.on("reported")[-1].state == "active"
    return agent, t


def test_a_rollback_swaps_the_previous_slot_back_in_without_download(
        on_v2: tuple[Agent, MemoryTransport], versions: dict[str, Version]) -> None:
    agent, t = on_v2
    np.testing.assert_allclose(answer(agent, t), expected(versions["2"]), rtol=1e-6)
    fetches, reports = len(t.on("fetch")), len(t.on("reported"))
    desire(agent, versions["1"], "dep-1")
    assert len(t.on("fetch")) == fetches, "a rollback must not download anything"
    new = t.on("reported")[reports:]
    assert [(r.deployment_id, r.state) for r in new] == [("dep-1", "smoke_testing"), ("dep-1", "active")]
    assert "is in slot a: re-checking it, no download" in new[0].detail
    assert new[-1].detail == "rolled back to slot a without download"
    assert agent.state is State.ACTIVE and agent.active.artifact == versions["1"][1]
    np.testing.assert_allclose(answer(agent, t), expected(versions["1"]), rtol=1e-6)
    assert t.on("status")[-1].active.artifact == versions["1"][1]
    state = json.loads(agent.data.state_path.read_text())
    assert (state["active_slot"], state["previous_slot"]) == ("a", "b")
    assert state["active"]["deployment_id"] == "dep-1"
    # rolling forward again needs no download either, and a restart keeps what was chosen
    desire(agent, versions["2"], "dep-3")
    assert len(t.on("fetch")) == fetches and t.on("reported")[-1].detail == "rolled back to slot b without download"
    again = Agent(DEV, MemoryTransport(DEV), DataDir(agent.data.root))
    again.restore()
    assert again.active is not None and (again.active.artifact, again.active.deployment_id) == (versions["2"][1], "dep-3")


def test_an_unusable_previous_slot_is_downloaded_instead(
        on_v2: tuple[Agent, MemoryTransport], versions: dict[str, Version]) -> None:
    agent, t = on_v2
    agent.data.slot_path("a").write_bytes(b"not a bundle any more")
    fetches = len(t.on("fetch"))
    desire(agent, versions["1"], "dep-1")
    assert len(t.on("fetch")) > fetches and t.on("reported")[-1].state == "downloading"
    deliver(agent, t, *versions["1"][:2], fetches)
    assert t.on("reported")[-1].state == "active" and agent.active.artifact == versions["1"][1]


def test_a_previous_model_that_fails_its_smoke_test_here_is_reported_and_the_current_one_serves(
        on_v2: tuple[Agent, MemoryTransport], versions: dict[str, Version]) -> None:
    agent, t = on_v2

    def broken(data: bytes) -> Any:
        model = TFLiteModel(data)
        if data == versions["1"][2]:
            model.run = lambda x: np.zeros((len(x), 3), np.float32)  # type: ignore[method-assign]
        return model

    agent.model_factory = broken
    desire(agent, versions["1"], "dep-1")
    last = t.on("reported")[-1]
    assert last.state == "failed" and "failed on this device" in last.detail
    np.testing.assert_allclose(answer(agent, t), expected(versions["2"]), rtol=1e-6)
    assert json.loads(agent.data.state_path.read_text())["active_slot"] == "b"

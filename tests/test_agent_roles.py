"""A device's role in a deployment (which model file of the bundle it runs) with a real
interpreter and real bundles, the agent driven in memory (fake transport, no broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.core import Agent
from agent.slots import DataDir
from sdk.protocol import frames, messages
from sdk.protocol.bundle import tensor_spec, write_bundle
from sdk.protocol.runtime import TFLiteModel
from tests.memory_agent import CHUNK, MemoryTransport, deliver, infer

DEV = "pi-roles"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str, dict[str, bytes], np.ndarray]:
    import tensorflow as tf
    x = np.random.default_rng(1).random((2, 4), dtype=np.float32)
    models, files = {}, {}
    for i, name in enumerate(("model.tflite", "model-b.tflite")):
        tf.keras.utils.set_random_seed(i)
        m = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(3)])
        models[name] = files[name] = tf.lite.TFLiteConverter.from_keras_model(m).convert()
        files[f"{name}-in.npy"] = frames.tensor_to_npy(x)
        files[f"{name}-out.npy"] = frames.tensor_to_npy(TFLiteModel(models[name]).run(x))
    io = {"inputs": [tensor_spec("x", [-1, 4], "float32")], "outputs": [tensor_spec("y", [-1, 3], "float32")]}

    def sample(name: str) -> dict[str, Any]:
        return {"input": f"{name}-in.npy", "output": f"{name}-out.npy", "atol": 1e-5, "rtol": 1e-5}

    manifest = {"name": "roles", "version": "1", "quantization": "none",
                "model": {"file": "model.tflite", **io}, "sample": sample("model.tflite"),
                "variants": [{"file": "model-b.tflite", "quantization": "none", **io, "sample": sample("model-b.tflite")}]}
    path = tmp_path_factory.mktemp("roles") / "roles.zip"
    sha = write_bundle(path, manifest, files)
    return path.read_bytes(), sha, models, x


def _desired(sha: str, size: int, dep: str, **role: Any) -> bytes:
    return messages.Desired(dep, sha, size, CHUNK, "roles", "1", **role).encode()


def test_a_device_runs_the_file_its_role_names_and_changes_role_without_download(
        bundle: tuple[bytes, str, dict[str, bytes], np.ndarray], tmp_path: Path) -> None:
    data, sha, models, x = bundle
    t = MemoryTransport(DEV)
    agent = Agent(DEV, t, DataDir(tmp_path))
    agent.transport.start(agent._on_connect, agent.on_message)

    agent.handle_desired(_desired(sha, len(data), "dep-1"))
    deliver(agent, t, data, sha)
    assert t.on("reported")[-1].state == "active"
    np.testing.assert_allclose(infer(agent, t, x).output, TFLiteModel(models["model.tflite"]).run(x), rtol=1e-6)

    fetches = len(t.on("fetch"))
    agent.handle_desired(_desired(sha, len(data), "dep-2", file="model-b.tflite", service="svc", stage=1, stages=1))
    assert len(t.on("fetch")) == fetches, "a new role for the installed bundle must not download it again"
    last = t.on("reported")[-1]
    assert (last.deployment_id, last.state) == ("dep-2", "active") and "no download" in last.detail
    np.testing.assert_allclose(infer(agent, t, x).output, TFLiteModel(models["model-b.tflite"]).run(x), rtol=1e-6)
    assert t.on("status")[-1].active.file == "model-b.tflite" and t.on("status")[-1].active.service == "svc"

    # A restarted agent comes back in the same role.
    t2 = MemoryTransport(DEV)
    again = Agent(DEV, t2, DataDir(tmp_path))
    again.restore()
    assert again.active is not None and again.active.file == "model-b.tflite"
    np.testing.assert_allclose(infer(again, t2, x).output, TFLiteModel(models["model-b.tflite"]).run(x), rtol=1e-6)

    # A file the bundle does not hold is refused by name; the current role keeps serving.
    again.handle_desired(_desired(sha, len(data), "dep-3", file="nope.tflite"))
    last = t2.on("reported")[-1]
    assert last.state == "failed" and "has no model file 'nope.tflite'" in last.detail and "model-b.tflite" in last.detail
    np.testing.assert_allclose(infer(again, t2, x).output, TFLiteModel(models["model-b.tflite"]).run(x), rtol=1e-6)

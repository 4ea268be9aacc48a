"""Simulated devices on the shared network loop and tickers take a real deployment (desired
state, chunked download, smoke test, activation) and answer inference over MQTT."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.sim import Fleet
from sdk.infer import InferenceClient
from sdk.protocol import frames
from sdk.protocol.bundle import tensor_spec, write_bundle
from sdk.protocol.runtime import TFLiteModel
from server.config import Config
from server.mqtt import MqttSide
from server.service import Service
from server.store import Store
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def test_shared_loop_devices_deploy_and_answer(mosquitto: Any, tmp_path: Path) -> None:
    import tensorflow as tf
    tf.keras.utils.set_random_seed(11)
    m = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(3)])
    tflite = tf.lite.TFLiteConverter.from_keras_model(m).convert()
    x = np.random.default_rng(2).random((1, 4), dtype=np.float32)
    y = TFLiteModel(tflite).run(x)
    manifest = {"name": "tiny", "version": "1", "quantization": "none",
                "model": {"file": "model.tflite", "inputs": [tensor_spec("x", [-1, 4], "float32")],
                          "outputs": [tensor_spec("y", [-1, 3], "float32")]},
                "sample": {"input": "sample_input.npy", "output": "sample_output.npy", "atol": 1e-5, "rtol": 1e-5}}
    files = {"model.tflite": tflite, "sample_input.npy": frames.tensor_to_npy(x),
             "sample_output.npy": frames.tensor_to_npy(y),
             "padding.bin": np.random.default_rng(3).bytes(20 * 1024)}  # ~20 chunks of 1 KiB
    write_bundle(tmp_path / "tiny.bundle", manifest, files)

    config = Config(data_dir=tmp_path / "server", db_url=f"sqlite:///{tmp_path / 'e.db'}", chunk_size=1024)
    config.data_dir.mkdir()
    store = Store(config.db_url)
    service = Service(config, store)
    side = MqttSide(service, mosquitto.url, client_id=f"srv-{uuid.uuid4().hex[:8]}", session_expiry_s=0)
    side.start()
    prefix = f"sd{uuid.uuid4().hex[:6]}"
    fleet = Fleet(6, mosquitto.url, tmp_path / "sim", prefix=prefix, interpreter="real", heartbeat_s=1.0,
                  telemetry_s=1.0, tickers=2)
    assert fleet.loop is not None and fleet.ticker is not None
    fleet.start(rate=0)
    try:
        wait_for(lambda: fleet.connected() == 6, 10, "all connected")
        wait_for(lambda: len([d for d in service.devices() if d["id"].startswith(prefix)]) == 6, 10, "all known")
        art, _ = service.add_artifact((tmp_path / "tiny.bundle").read_bytes())
        dep = service.create_deployment(art["sha256"], f"device:{','.join(a.device_id for a in fleet.agents)}")
        wait_for(lambda: all(d["state"] == "active" for d in service.deployment(dep["id"])["devices"]), 30,
                 "every device active")
        with InferenceClient(mosquitto.url) as client:
            for agent in fleet.agents:
                answer = client.infer(agent.device_id, x, timeout=10)
                np.testing.assert_allclose(answer.output, y, rtol=1e-5)
        wait_for(lambda: service.info()["ingest"].get("telemetry_stored", 0) >= 12, 10, "telemetry stored")
    finally:
        fleet.stop()
        side.stop()
        store.close()
    assert len(fleet.loop) == 0

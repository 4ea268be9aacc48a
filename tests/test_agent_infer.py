"""Agent.infer: the in-process inference API (no .npy, no MQTT), on a real TFLite model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.core import Agent, Serving
from agent.slots import DataDir
from sdk.protocol import drift
from sdk.protocol.errors import ModelInputError
from sdk.protocol.messages import ActiveModel
from sdk.protocol.runtime import TFLiteModel


class NullTransport:
    def start(self, on_connect: Any, on_message: Any) -> None: ...
    def subscribe(self, topics: list[str], qos: int = 1) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None) -> None: ...
    def stop(self, final: Any = None, timeout: float = 5.0) -> None: ...


@pytest.fixture(scope="module")
def tflite() -> bytes:
    import tensorflow as tf
    tf.keras.utils.set_random_seed(3)
    m = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(3)])
    return tf.lite.TFLiteConverter.from_keras_model(m).convert()


def test_infer_runs_the_active_model_on_the_callers_thread(tflite: bytes, tmp_path: Path) -> None:
    agent = Agent("pi-inproc", NullTransport(), DataDir(tmp_path))
    with pytest.raises(ModelInputError, match="no model is active"):
        agent.infer(np.zeros((1, 4), np.float32))
    agent._serving = Serving(TFLiteModel(tflite, num_threads=1), ActiveModel(None, "ab" * 32, "m", "1"))
    bare = TFLiteModel(tflite, num_threads=1)
    x = np.random.default_rng(5).random((2, 4), dtype=np.float32)
    kept = x.copy()
    y = agent.infer(x)
    np.testing.assert_array_equal(y, bare.run(kept))
    x[:] = 1e6  # the caller reuses its buffer: the interval's drift summary must not change
    y[:] = -1.0
    with pytest.raises(ModelInputError, match="dtype"):
        agent.infer(np.zeros((1, 4), np.float64))
    assert agent.infer(kept, drift=False).shape == (2, 3)
    t = agent.telemetry.snapshot(1)
    assert (t.count, t.errors, sum(t.latency_hist)) == (4, 2, 2)
    summary = agent.drift.snapshot()["drift"]
    assert summary == {f: [int(c) for c in v] for f, v in drift.summarize(kept, bare.run(kept)).items()}

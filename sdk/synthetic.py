"""Models and bundles made on the spot (random weights, nothing downloaded) for benchmarks and
tests that need a model of a given cost, or the same bundle under another version.
TensorFlow is imported only by :func:`conv_net`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .protocol import frames
from .protocol.bundle import read_bundle, write_bundle
from .protocol.runtime import TFLiteModel


def conv_net(convs: int) -> bytes:
    """A TFLite CNN with the input (8x8x1) and output (10 classes) of the digits CNN and random
    weights: upsampled to 32x32, then ``convs`` 3x3 convolutions of 48 filters (all but the first,
    which sees one channel, cost the same), global average pooling, a dense softmax layer."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(shape=(8, 8, 1))
    x = tf.keras.layers.UpSampling2D(4)(inp)
    for _ in range(convs):
        x = tf.keras.layers.Conv2D(48, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(10, activation="softmax")(x)
    return tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, out)).convert()


def model_bundle(path: Path, tflite: bytes, x: np.ndarray, version: str, name: str = "convnet") -> Path:
    """A bundle of one float32 model whose smoke test is its own output on ``x``."""
    model = TFLiteModel(tflite, num_threads=1)
    manifest = {"name": name, "version": version, "quantization": "none",
                "model": {"file": "model.tflite", "inputs": [model.input_spec], "outputs": [model.output_spec]},
                "sample": {"input": "sample_input.npy", "output": "sample_output.npy", "atol": 1e-4, "rtol": 1e-4}}
    write_bundle(path, manifest, {"model.tflite": tflite, "sample_input.npy": frames.tensor_to_npy(x),
                                  "sample_output.npy": frames.tensor_to_npy(model.run(x))})
    return path


def rebundle(src: Path, dst: Path, version: str, **replace: bytes) -> Path:
    """The same bundle under another version (a new artifact), some files replaced."""
    b = read_bundle(src)
    manifest = {k: v for k, v in b.manifest.items() if k != "files"} | {"version": version}
    write_bundle(dst, manifest, {**b.files, **replace})
    return dst

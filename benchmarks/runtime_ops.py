"""Measure which builtin op versions an older TFLite runtime registers (for devices/runtimes.toml).

    .venv/bin/python benchmarks/runtime_ops.py --python /path/to/tflite-venv/bin/python

Step 1 (this interpreter, TensorFlow): convert a few small Keras models that use the common ops
(conv, depthwise conv, pooling, dense, add/mul/concat, mean, softmax...) in every quantization.
Step 2 (``--python``, a venv with the runtime under test and edgectl installed): for every op of
every model, raise the version stored in the model's op table one by one and record the highest
version with which the runtime still *constructs* an interpreter ("Didn't find op ... version N"
is raised at construction). Prints a TOML table to paste into devices/runtimes.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROBE = r'''
import json, struct, sys
from pathlib import Path
from sdk.protocol.opset import _Table
from tflite_runtime.interpreter import Interpreter

def loads(buf):
    try:
        Interpreter(model_content=bytes(buf))
        return True
    except (ValueError, RuntimeError):
        return False

best = {}
for path in sys.argv[1:]:
    buf = bytearray(Path(path).read_bytes())
    root = _Table(bytes(buf), struct.unpack_from("<I", buf, 0)[0])
    base_ok = loads(buf)
    for oc in root.tables(1):
        code = max(oc.scalar(0, "b", 0), oc.scalar(3, "i", 0))
        name = str(code)
        at = oc._field(2)
        version = oc.scalar(2, "i", 1)
        if not at:   # version 1 is not stored: nothing to patch, v1 is known to exist
            best.setdefault(name, 1)
            continue
        top = 0
        for v in range(1, 25):
            struct.pack_into("<i", buf, at, v)
            if loads(buf):
                top = v
            elif v > version:
                break
        struct.pack_into("<i", buf, at, version)
        best[name] = max(best.get(name, 0), top)
print(json.dumps(best))
'''


def make_models(out: Path) -> list[Path]:
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((16, 16, 3))
    a = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    b = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu6")(a)
    c = tf.keras.layers.Add()([a, b])
    d = tf.keras.layers.Multiply()([c, a])
    e = tf.keras.layers.Concatenate()([d, a])
    f = tf.keras.layers.MaxPooling2D(2)(e)
    g = tf.keras.layers.AveragePooling2D(2)(f)
    h = tf.keras.layers.Reshape((-1,))(g)
    m = tf.keras.layers.GlobalAveragePooling2D()(f)
    i = tf.keras.layers.Concatenate()([h, m])
    j = tf.keras.layers.Dense(16, activation="tanh")(i)
    k = tf.keras.layers.Dense(10, activation="softmax")(j)
    model = tf.keras.Model(inp, k)
    rep = np.random.default_rng(0).random((16, 16, 16, 3), dtype=np.float32)
    paths = []
    for quant in ("none", "dynamic", "float16", "int8"):
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if quant != "none":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if quant == "float16":
            conv.target_spec.supported_types = [tf.float16]
        if quant == "int8":
            conv.representative_dataset = lambda: ([x[None]] for x in rep)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = conv.inference_output_type = tf.int8
        p = out / f"probe-{quant}.tflite"
        p.write_bytes(conv.convert())
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", required=True, help="python of a venv with tflite-runtime + edgectl")
    args = ap.parse_args()
    from sdk.protocol.opset import model_ops, op_name

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_models(Path(tmp))
        used: dict[str, int] = {}
        for p in paths:
            for k, v in model_ops(p.read_bytes()).items():
                used[k] = max(used.get(k, 0), v)
        out = subprocess.run([args.python, "-c", PROBE, *map(str, paths)], capture_output=True, text=True,
                             check=True).stdout
        version = subprocess.run([args.python, "-c", "import importlib.metadata as m; print(m.version('tflite-runtime'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    print(f"# measured on tflite-runtime {version} against models from this TensorFlow")
    best = {op_name(int(k)): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    print("# op = highest version the runtime constructs  # highest version this converter emitted")
    for name in sorted(best):
        print(f"{name} = {best[name]}  # converter: {used.get(name)}")


if __name__ == "__main__":
    main()

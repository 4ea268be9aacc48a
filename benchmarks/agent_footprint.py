"""Agent overhead and footprint on this machine.

    .venv/bin/python benchmarks/agent_footprint.py [--bundle B] [--runs 3000] [--big-runs 60] [--no-big]

For the digits CNN (trained and compressed first, unless ``--bundle``) and for a MobileNetV2-sized
conv net (224x224x3, random weights, float32; built with Keras here, nothing downloaded),
on the same model bytes and one interpreter thread each, the median latency of:

* a bare interpreter call: ``set_tensor``, ``invoke``, ``get_tensor``;
* ``Agent.infer(x)``: the agent's in-process API (checks, the model's lock, telemetry latency
  histogram, drift summary with copies of input and output); and with ``drift=False``;
* ``Agent.handle_infer``: a request as it comes over MQTT (.npy decode, checks, invoke, answer
  frame with MQTT v5 properties; the publish itself goes to a null transport).

The calls are interleaved (bare, agent, bare, ...) so that a noisy neighbour slows all of them
alike. Also prints the agent's import time and the RSS of an agent process with the model loaded.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class NullTransport:
    def __init__(self) -> None:
        self.sent = 0

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        self.sent += 1

    def start(self, on_connect, on_message) -> None:
        pass

    def subscribe(self, topics, qos=1) -> None:
        pass

    def stop(self, final=None, timeout=5.0) -> None:
        pass


RSS_PROBE = """
import sys, time
t0 = time.perf_counter()
import agent.main, agent.core
t_import = time.perf_counter() - t0
from sdk.protocol.bundle import read_bundle
from sdk.protocol.runtime import TFLiteModel
import numpy as np
b = read_bundle(sys.argv[1])
m = TFLiteModel(b.model_bytes, num_threads=1)
x, _ = b.sample()
m.run(x)
rss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0] / 1024
print(f"{t_import * 1000:.0f} {rss:.1f}")
"""


def mobilenet_tflite() -> bytes:
    """MobileNetV2 (alpha 1.0, 224x224x3, 1000 classes) with random weights, as float32 TFLite."""
    import contextlib
    import io
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every captured tensor
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def interleaved_medians(fns: dict[str, object], runs: int) -> dict[str, float]:
    """Median µs of each callable, calling them in turn ``runs`` times (after a warm-up)."""
    for fn in fns.values():
        for _ in range(max(3, min(200, runs // 10))):
            fn()  # type: ignore[operator]
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def compare(name: str, model: bytes, x: object, runs: int, tmp: Path) -> None:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.core import Agent, Serving
    from agent.slots import DataDir
    from sdk.protocol.frames import tensor_to_npy
    from sdk.protocol.messages import ActiveModel
    from sdk.protocol.runtime import TFLiteModel

    bare = Interpreter(model_content=model, num_threads=1)
    bare.allocate_tensors()
    d_in, d_out = bare.get_input_details()[0], bare.get_output_details()[0]
    if x is None:
        x = np.random.default_rng(0).random(d_in["shape"], dtype=np.float32)
    i_in, i_out = d_in["index"], d_out["index"]

    def bare_call() -> None:
        bare.set_tensor(i_in, x)
        bare.invoke()
        bare.get_tensor(i_out)

    agent = Agent("bench", NullTransport(), DataDir(tmp / f"agent-{len(model)}"), threads=1)
    agent._serving = Serving(TFLiteModel(model, num_threads=1), ActiveModel(None, "ab" * 32, "bench", "1"))
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "edgectl/v1/clients/bench/responses"
    props.CorrelationData = b"1234"
    payload = tensor_to_npy(x)  # type: ignore[arg-type]
    m = interleaved_medians({
        "bare": bare_call,
        "infer": lambda: agent.infer(x),  # type: ignore[arg-type]
        "infer_nodrift": lambda: agent.infer(x, drift=False),  # type: ignore[arg-type]
        "mqtt": lambda: agent.handle_infer(payload, props),
    }, runs)
    t = m["bare"]
    print(f"{name}: {runs} interleaved runs, 1 thread", flush=True)
    print(f"  bare interpreter set_tensor+invoke+get_tensor: median {t:,.1f} µs")
    for key, what in (("infer", "Agent.infer(x) (in-process API, with drift summary)"),
                      ("infer_nodrift", "Agent.infer(x, drift=False)"),
                      ("mqtt", "Agent.handle_infer (a request as from MQTT: .npy decode, answer frame)")):
        v = m[key]
        print(f"  {what}: median {v:,.1f} µs ({v - t:+,.1f} µs, {v / t - 1:+.1%})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--runs", type=int, default=3000, help="interleaved runs on the digits model")
    ap.add_argument("--big-runs", type=int, default=60, help="interleaved runs on the MobileNet-sized model")
    ap.add_argument("--no-big", action="store_true", help="skip the MobileNet-sized model")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from sdk.compress import compress
            from sdk.demo import train_digits

            paths = train_digits(Path(tmp), epochs=3)
            bundle = Path(tmp) / "digits.bundle"
            compress(paths["model"], bundle, quantize="dynamic", name="digits", version="1")

        from sdk.protocol.bundle import read_bundle

        b = read_bundle(bundle)
        x, _ = b.sample()
        compare("digits CNN", b.model_bytes, x, args.runs, Path(tmp))
        if not args.no_big:
            compare("MobileNetV2-sized conv net (224x224x3, float32)", mobilenet_tflite(), None, args.big_runs, Path(tmp))
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(bundle)], capture_output=True, text=True, check=True)
        ms, rss = probe.stdout.split()
        print(f"agent import time: {ms} ms; RSS with the model loaded after one inference: {rss} MB")


if __name__ == "__main__":
    main()

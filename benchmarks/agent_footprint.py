"""Agent overhead and footprint on this machine.

    .venv/bin/python benchmarks/agent_footprint.py [--bundle B] [--runs 3000]

Prints: median latency of a bare interpreter ``invoke()`` vs the agent's in-process inference
path (``Agent.handle_infer``: .npy decode, input checks, invoke, answer frame encode) on the same
model and thread count; import time of the agent; RSS of an agent process with the model loaded.
Without ``--bundle`` it trains and compresses the digits CNN first.
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


def median_us(fn, runs: int) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--runs", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from sdk.compress import compress
            from sdk.demo import train_digits

            paths = train_digits(Path(tmp), epochs=3)
            bundle = Path(tmp) / "digits.bundle"
            compress(paths["model"], bundle, quantize="dynamic", name="digits", version="1")

        from ai_edge_litert.interpreter import Interpreter
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from agent.core import Agent, Serving
        from agent.slots import DataDir
        from sdk.protocol.bundle import read_bundle
        from sdk.protocol.frames import tensor_to_npy
        from sdk.protocol.messages import ActiveModel
        from sdk.protocol.runtime import TFLiteModel

        b = read_bundle(bundle)
        x, _ = b.sample()
        bare = Interpreter(model_content=b.model_bytes, num_threads=1)
        bare.allocate_tensors()
        i_in, i_out = bare.get_input_details()[0]["index"], bare.get_output_details()[0]["index"]

        def bare_call() -> None:
            bare.set_tensor(i_in, x)
            bare.invoke()
            bare.get_tensor(i_out)

        transport = NullTransport()
        agent = Agent("bench", transport, DataDir(Path(tmp) / "agent"), threads=1)
        agent._serving = Serving(TFLiteModel(b.model_bytes, num_threads=1),
                                 ActiveModel(None, b.sha256, "digits", "1"))
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "edgectl/v1/clients/bench/responses"
        props.CorrelationData = b"1234"
        payload = tensor_to_npy(x)

        t_bare = median_us(bare_call, args.runs)
        t_agent = median_us(lambda: agent.handle_infer(payload, props), args.runs)
        print(f"bare interpreter invoke: median {t_bare:.1f} µs")
        print(f"agent in-process path (decode, checks, invoke, encode answer): median {t_agent:.1f} µs "
              f"(+{t_agent - t_bare:.1f} µs, {t_agent / t_bare - 1:+.0%})")
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(bundle)], capture_output=True, text=True, check=True)
        ms, rss = probe.stdout.split()
        print(f"agent import time: {ms} ms; RSS with the model loaded after one inference: {rss} MB")


if __name__ == "__main__":
    main()

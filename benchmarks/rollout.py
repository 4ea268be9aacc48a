"""A gated rollout on a local fleet, as an operator runs it: the output shown in the README.

Builds a CNN with the digits model's input (8x8x1) and output (10 classes) sized to ~3 ms per
inference on one core (random weights: the trained digits CNN answers in ~0.1 ms, under the p95
gate's 0.5 ms floor), bundles it as 1.0.0, makes 2.0.0 (the same model: a good release) and
3.0.0-slow (same input and output, three times the convolutions: ~3x slower, measured and
printed), starts edgectl-server with its own Mosquitto and five agents, sends inference traffic
(one request at a time, to each device in turn), then:

1. pushes 2.0.0 as a rollout (canary 1, then 50 %, then the rest; 10 s soak) and waits;
2. pushes 3.0.0-slow the same way: its canary fails the p95 latency gate (+20 %) and returns to
   2.0.0 from the agent's second slot (the script counts the canary's fetch messages: none);
3. shows ``edgectl rollout show`` and ``edgectl rollout list``.

    .venv/bin/python benchmarks/rollout.py [--workdir DIR] [--soak 10s]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet
from sdk.protocol import messages, topics
from sdk.protocol.bundle import read_bundle
from sdk.protocol.runtime import TFLiteModel
from sdk.synthetic import conv_net, model_bundle, rebundle

DEVICES = [f"pi-{i}" for i in range(1, 6)]


def median_ms(tflite: bytes, x: np.ndarray, runs: int = 40) -> float:
    model = TFLiteModel(tflite, num_threads=1)
    model.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.run(x)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def edgectl(*args: str) -> int:
    print(f"$ edgectl {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "sdk.cli", *args], text=True, capture_output=True,
                          env=os.environ | {"COLUMNS": "200"})  # tables unwrapped
    print((proc.stdout + proc.stderr).rstrip(), flush=True)
    return proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--soak", default="10s")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgectl-rollout-"))
    t0 = time.monotonic()
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 1)).astype(np.float32)
    base, slow = conv_net(6), conv_net(16)  # 5 and 15 costly convolutions
    base_ms, slow_ms = median_ms(base, x), median_ms(slow, x)
    v1 = model_bundle(work / "convnet-1.0.0.bundle", base, x, "1.0.0")
    v2 = rebundle(v1, work / "convnet-2.0.0.bundle", "2.0.0")
    v3 = model_bundle(work / "convnet-3.0.0-slow.bundle", slow, x, "3.0.0-slow")
    print(f"bundles ready in {time.monotonic() - t0:.0f} s; median latency on one core here: 1.0.0 {base_ms:.2f} ms, "
          f"3.0.0-slow {slow_ms:.2f} ms ({slow_ms / base_ms:.2f}x)", flush=True)
    with LocalFleet(work / "fleet") as f:
        f.start_server(extra=["--rollout-interval", "0.5"])
        for d in DEVICES:
            f.start_agent(d, labels={"group": "lab"}, heartbeat=2, telemetry_interval=1)
        f.wait_online(DEVICES)
        edgectl("push", str(v1), "--to", "group:lab", "--wait", "60", "--server", f.url)
        fetches: list[tuple[str, str]] = []
        host, port = f.broker.removeprefix("mqtt://").split(":")
        mon = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        mon.on_message = lambda c, u, m: fetches.append(
            (topics.parse(m.topic).device_id or "", messages.decode("fetch", m.payload).artifact))
        mon.connect(host, int(port))
        mon.loop_start()
        mon.subscribe(topics.device_wildcard("fetch"), qos=1)
        stop = threading.Event()

        def traffic() -> None:  # one request at a time: five boards share this machine's cores
            with InferenceClient(f.broker) as ic:
                while not stop.is_set():
                    for d in DEVICES:
                        with contextlib.suppress(Exception):
                            ic.infer(d, x, timeout=5)

        th = threading.Thread(target=traffic, daemon=True)
        th.start()
        time.sleep(5)  # the previous model's cohort: traffic before the rollout
        try:
            t = time.monotonic()
            edgectl("push", str(v2), "--to", "group:lab", "--canary", "1", "--waves", "50%", "--soak", args.soak,
                    "--wait", "300", "--server", f.url)
            print(f"[good rollout: {time.monotonic() - t:.1f} s]", flush=True)
            time.sleep(3)
            t = time.monotonic()
            mark = len(fetches)
            code = edgectl("push", str(v3), "--to", "group:lab", "--canary", "1", "--waves", "50%", "--soak",
                           args.soak, "--wait", "300", "--server", f.url)
            print(f"[slow rollout: exit {code} after {time.monotonic() - t:.1f} s]", flush=True)
            time.sleep(2)
            sha2, sha3 = read_bundle(v2).sha256, read_bundle(v3).sha256
            after = fetches[mark:]
            print(f"[fetch messages since the slow push: {sum(a == sha3 for _, a in after)} for 3.0.0-slow "
                  f"(from {sorted({d for d, a in after if a == sha3})}), {sum(a == sha2 for _, a in after)} for "
                  f"2.0.0 (the rollback came from the second slot)]", flush=True)
            with f.client() as c:
                rid = c.rollouts()[0]["id"]
            edgectl("rollout", "show", rid, "--server", f.url)
            edgectl("rollout", "list", "--server", f.url)
        finally:
            stop.set()
            th.join(10)
            mon.disconnect()
            mon.loop_stop()
    print(f"[total {time.monotonic() - t0:.0f} s; work dir {work}]", flush=True)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())

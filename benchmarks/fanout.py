"""What one push costs the server when many devices download the same bundle at once: chunk
messages and bytes it publishes, with fan-out (broadcast on the artifact topic) and without.

    .venv/bin/python benchmarks/fanout.py [--agents 8] [--padding-kib 1024] [--chunk-size 16384] [--bundle B]

Real server (private Mosquitto), real agent processes, the digits bundle padded with
incompressible bytes to the given size (trained first when ``--bundle`` is not given). A
separate MQTT client subscribed to every chunk topic counts what the server publishes. For each
setting (``--fanout-window 5`` and ``0``) it starts a fresh fleet, pushes, waits until every agent
runs the bundle, and prints the counts. Nothing is asserted; ``tests/test_fanout.py`` checks it.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from sdk.deploy import push_bundle
from sdk.localfleet import LocalFleet
from sdk.protocol import topics
from sdk.protocol.bundle import read_bundle, write_bundle
from sdk.protocol.topics import DeviceTopic


class Meter:
    def __init__(self, broker_url: str):
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.unicast = self.broadcast = self.bytes = 0
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = self._on
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect(host, int(port))
        self.c.loop_start()
        self.c.subscribe([(topics.device_wildcard(DeviceTopic.CHUNKS), 0), (topics.ARTIFACT_CHUNKS_WILDCARD, 0)])
        ready.wait(10)

    def _on(self, client: Any, userdata: Any, m: Any) -> None:
        self.bytes += len(m.payload)
        if m.topic.startswith(f"{topics.PREFIX}/artifacts/"):
            self.broadcast += 1
        else:
            self.unicast += 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def run(work: Path, bundle: Path, agents: int, chunk_size: int, window: float) -> None:
    ids = [f"fan-{i}" for i in range(agents)]
    with LocalFleet(work) as fleet:
        fleet.start_server(extra=["--chunk-size", str(chunk_size), "--fanout-window", f"{window:g}"])
        for dev in ids:
            fleet.start_agent(dev, labels={"group": "fan"}, heartbeat=2, telemetry_interval=5)
        fleet.wait_online(ids, timeout=120)
        meter = Meter(fleet.broker)
        with fleet.client() as client:
            t0 = time.perf_counter()
            res = push_bundle(client, bundle, "group:fan", wait_s=300, poll_s=0.1)
            took = time.perf_counter() - t0
        time.sleep(0.5)
        meter.close()
    size = bundle.stat().st_size
    chunks = -(-size // chunk_size)
    active = [d["state"] for d in res["deployment"]["devices"]].count("active")
    print(f"fan-out window {window:>3g} s | {agents} agents, {chunks} chunks of {chunk_size} B | "
          f"{meter.broadcast:>5} broadcast + {meter.unicast:>5} per-device chunk messages | "
          f"{meter.bytes:>11,} B = {meter.bytes / size:5.2f} copies | {active}/{agents} active in {took:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--padding-kib", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=16384)
    ap.add_argument("--bundle", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgectl-fanout-") as tmp:
        work = Path(tmp)
        source = args.bundle
        if source is None:
            from sdk.compress import compress
            from sdk.demo import train_digits

            paths = train_digits(work, epochs=3)
            source = work / "digits.bundle"
            compress(paths["model"], source, quantize="dynamic", name="digits", version="1")
        base = read_bundle(source)
        manifest = {k: v for k, v in base.manifest.items() if k != "files"}
        bundle = work / "padded.bundle"
        write_bundle(bundle, manifest, {**base.files,
                                        "padding.bin": np.random.default_rng(1).bytes(args.padding_kib * 1024)})
        print(f"bundle {bundle.stat().st_size:,} B")
        for window in (5.0, 0.0):
            run(work / f"fleet-{window:g}", bundle, args.agents, args.chunk_size, window)


if __name__ == "__main__":
    main()

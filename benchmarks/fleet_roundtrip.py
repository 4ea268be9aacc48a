"""Measure the walking skeleton on this machine: push-to-active time, MQTT inference round trip
(sequential and pipelined), time to report a killed agent offline, and agent memory.

    .venv/bin/python benchmarks/fleet_roundtrip.py [--agents 3] [--requests 1000]

Everything is real (server with its private Mosquitto, agent processes, LiteRT); it prints
figures and exits. Nothing here is asserted: the test suite checks behaviour, this measures it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sdk.client import ServerClient
from sdk.compress import compress
from sdk.demo import train_digits
from sdk.deploy import push_bundle
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, wait_for


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgectl-bench-") as tmp:
        work = Path(tmp)
        paths = train_digits(work, epochs=5)
        bundle = work / "digits.bundle"
        compress(paths["model"], bundle, quantize="dynamic", name="digits", version="1")
        x = np.load(paths["eval"])["x"].astype(np.float32)
        ids = [f"bench-{i}" for i in range(args.agents)]
        with LocalFleet(work / "fleet") as fleet:
            fleet.start_server()
            for dev in ids:
                fleet.start_agent(dev, labels={"group": "bench"}, heartbeat=1, telemetry_interval=1)
            fleet.wait_online(ids)
            with ServerClient(fleet.url) as client:
                t0 = time.perf_counter()
                res = push_bundle(client, bundle, "group:bench", wait_s=60, poll_s=0.05)
                push_s = time.perf_counter() - t0
            states = [d["state"] for d in res["deployment"]["devices"]]
            print(f"push to {args.agents} agents until all active: {push_s:.2f} s ({states.count('active')} active, "
                  f"bundle {bundle.stat().st_size:,} B)")

            with InferenceClient(fleet.broker) as ic:
                for i in range(50):  # warm-up
                    ic.infer(ids[i % len(ids)], x[i : i + 1])
                lat = []
                for i in range(args.requests):
                    t = time.perf_counter()
                    r = ic.infer(ids[i % len(ids)], x[i % len(x)][None, ...])
                    lat.append((time.perf_counter() - t) * 1000)
                    assert r.ok, r.error
                print(f"sequential round trip over MQTT ({args.requests} requests): "
                      f"p50 {statistics.median(lat):.2f} ms, p95 {pct(lat, 0.95):.2f} ms, p99 {pct(lat, 0.99):.2f} ms")
                t = time.perf_counter()
                futs = [ic.submit(ids[i % len(ids)], x[i % len(x)][None, ...]) for i in range(args.requests)]
                ok = sum(f.result(30).ok for f in futs)
                el = time.perf_counter() - t
                print(f"pipelined ({args.requests} in flight at once, {args.agents} agents): "
                      f"{args.requests / el:.0f} answers/s, {ok}/{args.requests} ok")

            print("agent RSS after serving: " + ", ".join(f"{d} {rss_mb(p.pid):.0f} MB"
                                                           for d, p in fleet.agents.items()))
            victim = ids[-1]
            with ServerClient(fleet.url) as client:
                fleet.kill_agent(victim)
                t = time.perf_counter()
                wait_for("offline", lambda: not next(d for d in client.devices() if d["id"] == victim)["online"],
                         timeout=30, every=0.01)
                print(f"kill -9 of an agent to 'offline' in the server's API: {(time.perf_counter() - t) * 1000:.0f} ms")


if __name__ == "__main__":
    main()

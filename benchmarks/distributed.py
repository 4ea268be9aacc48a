"""Distributed inference on this machine: one device vs a 2-stage pipeline vs 3 replicas.

    .venv/bin/python benchmarks/distributed.py [--requests 400] [--window 16] [--size 64]

Builds a CNN (random weights: only timing matters, nothing is trained), partitions it into two
stages with the min-bottleneck planner, and runs a real server, Mosquitto and three agent
processes. For each layout it measures the sequential round trip (one request at a time) and the
throughput with ``--window`` requests in flight, all through the service topic and the same client
(``InferenceClient.submit_service``). The pipeline's per-stage compute and transfer times come
from the answers' traces and are printed next to the planner's predictions.

All agents run on this host and share its cores: replicas and stages compete for the same CPUs,
so this shows the overheads and the mechanics, not what separate boards would gain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from sdk.compress import compress, quiet_native_output
from sdk.deploy import push_bundle
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet
from sdk.partition import partition
from sdk.protocol import frames

DEVICES = ("bench-1", "bench-2", "bench-3")


def build_model(path: Path, size: int) -> None:
    with quiet_native_output():
        import keras

        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((size, size, 3), name="image"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(128, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ])
        model.save(path)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_layout(ic: InferenceClient, service: str, x: np.ndarray, requests: int, window: int) -> dict[str, Any]:
    for i in range(20):  # warm-up: interpreters allocate, TCP windows open
        assert ic.infer_service(service, x[i % len(x)][None], timeout=10).ok
    lat, traces = [], []
    for i in range(requests // 2):
        t = time.perf_counter()
        r = ic.infer_service(service, x[i % len(x)][None], timeout=10)
        lat.append((time.perf_counter() - t) * 1000)
        assert r.ok, r.error
        traces.append(r.trace)
    slots = threading.Semaphore(window)
    futs = []
    t0 = time.perf_counter()
    for i in range(requests):
        slots.acquire()
        f = ic.submit_service(service, x[i % len(x)][None], timeout=10, retries=2)
        f.add_done_callback(lambda _f: slots.release())
        futs.append(f)
    answers: list[frames.InferResponse] = [f.result(60) for f in futs]
    elapsed = time.perf_counter() - t0
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
    stages: dict[int, dict[str, list[float]]] = {}
    for tr in traces:
        for e in tr:
            acc = stages.setdefault(e["stage"], {"compute_ms": [], "transfer_ms": [], "wait_ms": []})
            for k in acc:
                if k in e:
                    acc[k].append(e[k])
    by_device: dict[str, int] = {}
    for a in answers:
        dev = a.trace[-1]["device"] if a.trace else "?"
        by_device[dev] = by_device.get(dev, 0) + 1
    return {"p50": statistics.median(lat), "p95": pct(lat, 0.95), "throughput": requests / elapsed,
            "stages": {k: {m: statistics.mean(v) if v else float("nan") for m, v in acc.items()}
                       for k, acc in sorted(stages.items())},
            "by_device": by_device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="pipelined requests per layout (half as many sequential)")
    ap.add_argument("--window", type=int, default=16, help="requests in flight for the throughput run")
    ap.add_argument("--size", type=int, default=64, help="input image side (compute grows with its square)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="edgectl-dist-") as tmp:
        work = Path(tmp)
        model = work / "cnn.keras"
        build_model(model, args.size)
        x = np.random.default_rng(0).random((64, args.size, args.size, 3), dtype=np.float32)
        whole = work / "whole.bundle"
        compress(model, whole, quantize="none", name="cnn", version="1")
        p2 = work / "p2.bundle"
        res = partition(model, p2, stages=2, name="cnn-p2", version="1", runs=30)
        print(f"model: {args.size}x{args.size}x3 CNN, {sum(s.params for s in res.plan.stages):,} parameters; "
              f"{cores} CPU core(s) on this host, shared by the broker, the server, 3 agents and the client")
        print("\nplan (2 stages, host links 1000 Mb/s): bottleneck "
              f"{res.plan.bottleneck_ms:.3f} ms predicted")
        for st in res.plan.stages:
            print(f"  stage {st.index}: {', '.join(st.layers)}  → {'x'.join(map(str, st.out_shape[1:]))} "
                  f"({st.out_bytes:,} B); predicted compute {st.compute_ms:.3f} ms, transfer {st.transfer_ms:.3f} ms")

        results = {}
        with LocalFleet(work / "fleet") as fleet:
            fleet.start_server()
            for dev in DEVICES:
                fleet.start_agent(dev, labels={"group": "bench"}, heartbeat=2, telemetry_interval=2)
            fleet.wait_online(DEVICES)
            layouts = [("1 device", whole, "device:bench-1", {"service": "one", "replicas": 1}, "one"),
                       ("2-stage pipeline", p2, "device:bench-1,bench-2", {"service": "pipe"}, "pipe"),
                       ("3 replicas", whole, "group:bench", {"service": "pool", "replicas": 3}, "pool")]
            with fleet.client() as client, InferenceClient(fleet.broker) as ic:
                for label, bundle, selector, kw, service in layouts:
                    t = time.perf_counter()
                    r = push_bundle(client, bundle, selector, wait_s=120, poll_s=0.1, **kw)
                    states = [d["state"] for d in r["deployment"]["devices"]]
                    assert all(s == "active" for s in states), r["deployment"]["devices"]
                    push_s = time.perf_counter() - t
                    results[label] = run_layout(ic, service, x, args.requests, args.window) | {"push_s": push_s}
                resent = ic.resent

        pipe = results["2-stage pipeline"]["stages"]
        print("\npipeline, predicted vs measured per stage (measured: mean of the sequential run's traces)")
        print(f"  {'stage':<6} {'compute pred.':>14} {'compute meas.':>14} {'transfer pred.':>15} "
              f"{'transfer in meas.':>18} {'queued':>8}")
        for st in res.plan.stages:
            m = pipe.get(st.index, {})
            prev = res.plan.stages[st.index - 2].transfer_ms if st.index > 1 else 0.0
            print(f"  {st.index:<6} {st.compute_ms:>11.3f} ms {m.get('compute_ms', float('nan')):>11.3f} ms "
                  f"{prev:>12.3f} ms {m.get('transfer_ms', float('nan')):>15.3f} ms "
                  f"{m.get('wait_ms', float('nan')):>5.2f} ms")
        print("  (transfer in: from the previous hop's publish to this stage's receipt, through Mosquitto; "
              "stage 1's is the client's request)")
        print(f"\nlayouts ({args.requests // 2} sequential requests, then {args.requests} with {args.window} in flight)")
        print(f"  {'layout':<18} {'push':>7} {'p50':>9} {'p95':>9} {'throughput':>13}  answers per device")
        for label, r in results.items():
            print(f"  {label:<18} {r['push_s']:>5.1f} s {r['p50']:>6.2f} ms {r['p95']:>6.2f} ms "
                  f"{r['throughput']:>7.0f} req/s  {', '.join(f'{d} {n}' for d, n in sorted(r['by_device'].items()))}")
        print(f"\n{resent} request(s) sent again by the client (timeouts/busy). All agents share this host's "
              f"{cores} core(s): a pipeline or replicas cannot add compute here, only overhead; on separate "
              "boards each stage/replica brings its own CPU.")


if __name__ == "__main__":
    main()

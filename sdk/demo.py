"""The end-to-end demo behind ``make demo``: one real path from a Keras model to a healthy fleet.

It trains a small classifier on scikit-learn's digits (shipped with the package, no download),
compresses it, starts ``edgectl-server`` (which starts its own Mosquitto) and N agents, pushes,
sends inference traffic, and prints ``edgectl fleet health``. Every process it starts is stopped
in a ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .localfleet import LocalFleet, wait_for
from .protocol import EdgeError


def train_digits(workdir: Path, *, epochs: int = 15, seed: int = 0) -> dict[str, Path]:
    """Train a small CNN on the 8x8 digits; write model, eval and calibration sets."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from .compress import quiet_native_output

    workdir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    with quiet_native_output():
        import keras

        keras.utils.set_random_seed(seed)
        model = keras.Sequential([
            keras.Input((8, 8, 1), name="pixels"),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x_tr, y_tr, epochs=epochs, batch_size=32, verbose=0)
        keras_acc = float(model.evaluate(x_te, y_te, verbose=0)[1])
        paths = {"model": workdir / "digits.keras", "eval": workdir / "digits-eval.npz",
                 "calibration": workdir / "digits-calibration.npz"}
        model.save(paths["model"])
    np.savez(paths["eval"], x=x_te, y=y_te)
    np.savez(paths["calibration"], x=x_tr[:200])
    (workdir / "digits-keras-accuracy.txt").write_text(f"{keras_acc:.4f}\n")
    return paths


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(args: list[str], *, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run one ``edgectl`` command as a user would, showing it and its output."""
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    if not quiet:
        print(f"$ {shown}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "sdk.cli", *args[1:]], text=True, capture_output=True)
    if proc.stdout and not quiet:
        print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        raise EdgeError(f"`{shown}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc


def run_demo(workdir: Path, *, n_agents: int = 3, n_requests: int = 300) -> None:
    from .client import ServerClient
    from .infer import InferenceClient

    t0 = time.monotonic()
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    with LocalFleet(workdir, echo=True) as fleet:
        _say("1. train a digits classifier (scikit-learn's digits, shipped with the package)")
        paths = train_digits(workdir)
        print(f"Keras model {paths['model']} — test accuracy {(workdir / 'digits-keras-accuracy.txt').read_text().strip()}")

        _say("2. compress it to a TFLite bundle (dynamic-range quantization), measured before and after")
        bundle = workdir / "digits.bundle"
        _run(["edgectl", "compress", str(paths["model"]), "-o", str(bundle), "--quantize", "dynamic",
              "--eval", str(paths["eval"]), "--name", "digits", "--version", "1.0.0"])
        _run(["edgectl", "inspect", str(bundle)])

        _say("3. start edgectl-server (SQLite store, artifact store, HTTP API, private Mosquitto)")
        url = fleet.start_server(broker="local")
        broker = fleet.broker

        _say(f"4. start {n_agents} agents (each its own process, MQTT connection and data dir)")
        ids = [f"pi-{i + 1}" for i in range(n_agents)]
        for dev in ids:
            fleet.start_agent(dev, labels={"group": "lab"})
        fleet.wait_online(ids)
        print(f"{n_agents} agents online")

        _say("5. push the bundle to group:lab and wait until every device runs it")
        _run(["edgectl", "push", str(bundle), "--to", "group:lab", "--server", url, "--wait", "60"])

        _say(f"6. send {n_requests} inference requests over MQTT, spread over the fleet")
        with np.load(paths["eval"]) as ev:
            x_eval, y_eval = ev["x"], ev["y"]
        correct = 0
        t_req = time.monotonic()
        with InferenceClient(broker) as ic:
            futures = []
            for i in range(n_requests):
                futures.append((i, ic.submit(ids[i % n_agents], x_eval[i % len(x_eval)][None, ...])))
                if len(futures) >= 32:  # bounded in-flight window
                    i0, f0 = futures.pop(0)
                    correct += _score(f0.result(15), y_eval[i0 % len(y_eval)])
            for i, fut in futures:
                correct += _score(fut.result(15), y_eval[i % len(y_eval)])
            bad = ic.infer(ids[0], np.zeros((1, 3), np.float32))
        elapsed = time.monotonic() - t_req
        print(f"{n_requests} answers in {elapsed:.2f} s ({n_requests / elapsed:.0f} req/s); "
              f"fleet accuracy {correct / n_requests:.2%}")
        print(f"a wrong-shaped request is refused: {bad.error}")

        _say("7. wait for one telemetry interval, then ask the fleet's health")
        time.sleep(3)
        _run(["edgectl", "devices", "list", "--server", url])
        _run(["edgectl", "fleet", "health", "--window", "10m", "--server", url])

        victim = ids[-1]
        _say(f"8. kill -9 agent {victim}: the broker publishes its last will, the server marks it offline")
        fleet.kill_agent(victim)
        t_kill = time.monotonic()
        with ServerClient(url) as client:
            wait_for(f"{victim} offline", lambda: not next(d for d in client.devices() if d["id"] == victim)["online"],
                     timeout=20)
        print(f"{victim} reported offline {time.monotonic() - t_kill:.2f} s after kill -9")
        h = _run(["edgectl", "fleet", "health", "--window", "10m", "--server", url])
        h = _run(["edgectl", "fleet", "health", "--window", "10m", "--server", url, "--json"], quiet=True)
        (workdir / "fleet-health.json").write_text(h.stdout)
        summary = json.loads(h.stdout)
    print(f"\ndemo finished in {time.monotonic() - t0:.0f} s: "
          f"{sum(d['online'] for d in summary['devices'])}/{len(summary['devices'])} online at the end; "
          f"every process stopped; files in {workdir}")


def _score(resp: Any, label: int) -> int:
    if not resp.ok:
        raise EdgeError(f"inference failed: {resp.error}")
    return int(int(np.argmax(resp.output)) == int(label))

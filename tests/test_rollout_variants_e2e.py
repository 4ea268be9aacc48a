"""Variants per device with agent processes: a real Mosquitto, the server process and four agents
started with board profiles (two jetson-orin-nano, which prefer float16; two raspberry-pi-4,
which prefer int8), one bundle from ``compress --variants float16,int8``.

Pushed once, each agent runs the variant its profile prefers: its retained status names the
file, and its answer to an inference request is that variant's output on the host, not the
other's. Pushed again as a rollout with a latency SLO below what the float16 variant achieves
and ``--downgrade``, the jetson-orin-nano class (the canary, and its sibling in the next wave)
moves to the next smaller variant (int8) without a download, and ``edgectl rollout show``
records why; raspberry-pi-4 is already on the smallest variant and stays. The agents run one
inference thread each (the boards' own thread counts would only queue on the two shared cores).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.compress import compress
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, wait_for
from sdk.protocol import messages, topics
from sdk.protocol.bundle import read_bundle, write_bundle
from sdk.protocol.runtime import TFLiteModel

runner = CliRunner()
#: Sorted, a jetson comes first: it is the canary of the rollout below.
PROFILES = {"orin-1": "jetson-orin-nano", "orin-2": "jetson-orin-nano",
            "pi4-1": "raspberry-pi-4", "pi4-2": "raspberry-pi-4"}
DEVICES = tuple(PROFILES)
INT8 = "model-int8.tflite"
#: A p95 no variant of the digits CNN achieves here (the histogram's first bucket ends at 0.01 ms).
SLO = "0.005ms"


@dataclass(frozen=True)
class Variants:
    v5: Path
    v6: Path
    #: A digits sample and each variant's output on it, computed on the host: file -> output.
    x: np.ndarray
    host: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def variants(digits, tmp_path_factory: pytest.TempPathFactory) -> Variants:
    work = tmp_path_factory.mktemp("variants-e2e")
    v5 = work / "digits-5.0.0.bundle"
    compress(digits.model, v5, variant_modes=["float16", "int8"], calibration=digits.calibration, name="digits",
             version="5.0.0", float_io=True)
    b = read_bundle(v5)
    v6 = work / "digits-6.0.0.bundle"
    write_bundle(v6, {k: v for k, v in b.manifest.items() if k != "files"} | {"version": "6.0.0"}, b.files)
    x = np.load(digits.eval)["x"][:1].astype(np.float32)
    host = {"": TFLiteModel(b.files["model.tflite"], num_threads=1).run(x),
            INT8: TFLiteModel(b.files[INT8], num_threads=1).run(x)}
    assert not np.allclose(host[""], host[INT8], atol=1e-4)  # the answers tell the variants apart
    return Variants(v5, v6, x, host)


class Statuses:
    """The retained status of every device (what each agent says it runs), kept up to date."""

    def __init__(self, broker_url: str):
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.latest: dict[str, messages.Status] = {}
        self._lock = threading.Lock()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                             client_id="variants-status-monitor")
        self.c.on_message = self._on_message
        self.c.connect(host, int(port))
        self.c.loop_start()
        self.c.subscribe(topics.device_wildcard("status"), 1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.payload:
            with self._lock:
                self.latest[str(topics.parse(msg.topic).device_id)] = messages.decode("status", msg.payload)

    def active(self, device: str) -> messages.ActiveModel | None:
        with self._lock:
            st = self.latest.get(device)
        return st.active if st is not None else None

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@dataclass
class Rig:
    fleet: LocalFleet
    statuses: Statuses
    ic: InferenceClient
    variants: Variants


@pytest.fixture(scope="module")
def rig(mosquitto, variants: Variants, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    f = LocalFleet(tmp_path_factory.mktemp("variants-fleet"))
    statuses = ic = None
    try:
        f.start_server(broker=mosquitto.url, extra=["--rollout-interval", "0.25"])
        statuses = Statuses(mosquitto.url)
        for dev, profile in PROFILES.items():
            f.start_agent(dev, labels={"group": "va"}, heartbeat=1, telemetry_interval=0.5,
                          extra=["--profile", profile, "--threads", "1"])
        f.wait_online(DEVICES)
        ic = InferenceClient(mosquitto.url)
        yield Rig(f, statuses, ic, variants)
    finally:
        if ic is not None:
            ic.close()
        if statuses is not None:
            statuses.close()
        code = f.close()
        assert code == 0, f"edgectl-server exited with {code}"


def push(f: LocalFleet, bundle: Path, *args: str) -> Any:
    return runner.invoke(app, ["push", str(bundle), "--to", "group:va", "--server", f.url, *args])


def answers_like(rig: Rig, device: str, file: str) -> None:
    """The device's answer is the host output of variant ``file``, not of the other variant."""
    out = rig.ic.infer(device, rig.variants.x, timeout=10).output
    assert out is not None
    other = INT8 if file == "" else ""
    assert np.allclose(out, rig.variants.host[file], atol=1e-6), (device, file, out)
    assert not np.allclose(out, rig.variants.host[other], atol=1e-4), (device, file, out)


@contextlib.contextmanager
def traffic(rig: Rig) -> Iterator[None]:
    """One request at a time to each device in turn, so that soak windows have data."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            for d in DEVICES:
                with contextlib.suppress(Exception):
                    rig.ic.infer(d, rig.variants.x, timeout=5)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(10)


def test_each_agent_runs_the_variant_its_profile_prefers(rig: Rig) -> None:
    f = rig.fleet
    res = push(f, rig.variants.v5, "--wait", "60")
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert "[variant float16: jetson-orin-nano prefers float16]" in text
    assert "[variant int8: raspberry-pi-4 prefers int8]" in text
    want = {"orin-1": "", "orin-2": "", "pi4-1": INT8, "pi4-2": INT8}  # "" = the default model (float16)
    wait_for("every agent reporting 5.0.0 in its status", lambda: all(
        (a := rig.statuses.active(d)) is not None and a.version == "5.0.0" for d in DEVICES), timeout=15)
    assert {d: rig.statuses.active(d).file for d in DEVICES} == want  # type: ignore[union-attr]
    assert read_bundle(rig.variants.v5).manifest["quantization"] == "float16"  # the default model is float16
    for dev, file in want.items():
        answers_like(rig, dev, file)
    with f.client() as c:
        assert {d["id"]: d["profile"] for d in c.devices()} == PROFILES


def test_a_class_missing_its_latency_slo_moves_to_the_smaller_variant(rig: Rig) -> None:
    f = rig.fleet
    t0 = time.monotonic()
    with traffic(rig):
        res = push(f, rig.variants.v6, "--canary", "1", "--waves", "3", "--soak", "2s", "--gate", "min_inferences=10",
                   "--latency-slo", SLO, "--downgrade", "--wait", "60", "--json")
    assert res.exit_code == 0, res.output
    ro = json.loads(res.stdout)["rollout"]
    assert ro["phase"] == "completed", ro["summary"]
    assert [w["devices"] for w in ro["waves"]] == [["orin-1"], ["orin-2", "pi4-1", "pi4-2"]]
    (move,) = ro["variants"]["moves"]  # one class moved, once: pi4 has nothing smaller than int8
    assert (move["profile"], move["devices"], move["from"], move["to"]) == (
        "jetson-orin-nano", ["orin-1", "orin-2"], "float16 (model.tflite)", f"int8 ({INT8})")
    assert move["p95_ms"] > move["slo_ms"] == pytest.approx(0.005)
    # every device runs int8 now; orin-1 switched files in the bundle it had, without a download
    wait_for("every agent reporting 6.0.0 in its status", lambda: all(
        (a := rig.statuses.active(d)) is not None and a.version == "6.0.0" for d in DEVICES), timeout=15)
    assert {d: rig.statuses.active(d).file for d in DEVICES} == dict.fromkeys(DEVICES, INT8)  # type: ignore[union-attr]
    for dev in DEVICES:
        answers_like(rig, dev, INT8)
    canary = next(d for d in ro["devices"] if d["device_id"] == "orin-1")
    assert canary["detail"].startswith("installed bundle re-used (no download)"), canary
    why = {d["device_id"]: d["variant"]["why"] for d in ro["devices"]}
    moved = (f"jetson-orin-nano (orin-1) missed the 0.005 ms p95 SLO on float16 (model.tflite): "
             f"p95 {move['p95_ms']:.3g} ms; moved to int8 ({INT8})")
    assert why == {"orin-1": moved, "orin-2": moved, "pi4-1": "raspberry-pi-4 prefers int8",
                   "pi4-2": "raspberry-pi-4 prefers int8"}
    # the operator's view says why
    show = runner.invoke(app, ["rollout", "show", ro["id"], "--server", f.url])
    assert show.exit_code == 0, show.output
    text = " ".join(show.stdout.split())
    assert (f"Moved jetson-orin-nano (orin-1, orin-2) from float16 (model.tflite) to int8 ({INT8}): "
            f"p95 {move['p95_ms']:.3g} ms over the 0.005 ms SLO.") in text
    assert "p95 SLO 0.005 ms (a class missing it moves to a smaller variant)" in text
    assert f"int8 on orin-1, orin-2 ({moved})" in text and "int8 on pi4-1, pi4-2 (raspberry-pi-4 prefers int8)" in text
    history = " ".join(ro["history"])
    assert "missed the 0.005 ms p95 SLO" in history and "reinstalling the wave" in history
    print(f"\nvariant rollout with a downgrade: {time.monotonic() - t0:.1f} s\n{show.stdout}")

"""Distributed deployment on a real fleet: real Mosquitto, server and agent processes, real TFLite.

Pipelines (model parallel: one stage per device, each forwarding its output tensor to the next
stage's shared topic; the last stage answers the caller) must answer exactly what the host-side
reference (``run_pipeline``) and the whole model answer; replicas (data parallel: one shared
subscription) must spread the work and lose no request when one of them is killed mid-run; so
must the hybrid (replicas of every stage). A smaller re-push of a pool makes the dropped replica
leave the shared topic, and a pool rolls out wave by wave.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner

from sdk.cli import app
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, stop_process, wait_for
from sdk.partition import partition, run_pipeline
from sdk.protocol import EdgeError, frames, topics
from sdk.protocol.bundle import read_bundle
from sdk.protocol.runtime import TFLiteModel

runner = CliRunner()
DEVICES = ("dist-1", "dist-2", "dist-3")


@pytest.fixture(scope="module")
def bundles(digits, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("pipelines")
    cal = np.load(digits.calibration)["x"]
    ev = np.load(digits.eval)["x"]
    out = {"p2": work / "p2.bundle", "p3int8": work / "p3int8.bundle"}
    partition(digits.model, out["p2"], stages=2, name="digits-p2", version="2.0", runs=3)
    partition(digits.model, out["p3int8"], stages=3, quantize="int8", calibration=cal, eval_x=ev,
              name="digits-p3", version="3.0", runs=3)
    return out


@pytest.fixture(scope="module")
def whole(digits) -> TFLiteModel:
    """The whole float32 model, converted on this host (the reference of every pipeline)."""
    from sdk.compress import Source, convert, load_source, quiet_native_output

    src = load_source(digits.model)
    with quiet_native_output():
        return TFLiteModel(convert(Source(Path(digits.model), "keras", 0, keras_model=src.keras_model), "none"))


@pytest.fixture(scope="module")
def fleet(mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    f = LocalFleet(tmp_path_factory.mktemp("dist"))
    try:
        f.start_server(broker=mosquitto.url, extra=["--heartbeat-timeout", "6"])
        for dev in DEVICES:
            f.start_agent(dev, labels={"group": "dist"}, heartbeat=1, telemetry_interval=1)
        f.wait_online(DEVICES)
        yield f
    finally:
        code = f.close()
        assert code == 0, f"edgectl-server exited with {code}"


def push(fleet: LocalFleet, bundle: Path, *args: str) -> dict[str, Any]:
    res = runner.invoke(app, ["push", str(bundle), *args, "--server", fleet.url, "--wait", "60", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    states = {d["device_id"]: (d["state"], d.get("detail")) for d in out["deployment"]["devices"]}
    assert all(s == "active" for s, _ in states.values()), states
    return out


def ask_all(ic: InferenceClient, service: str, xs: np.ndarray, *, window: int = 12, timeout: float = 3.0,
            retries: int = 3, during: Any = None) -> list[frames.InferResponse]:
    """Send every row, at most ``window`` in flight; ``during(i)`` runs after the i-th answer."""
    slots = threading.Semaphore(window)
    futs = []
    for i in range(len(xs)):
        slots.acquire()
        fut = ic.submit_service(service, xs[i : i + 1], timeout=timeout, retries=retries)
        fut.add_done_callback(lambda _f: slots.release())
        futs.append(fut)
        if during is not None:
            during(i)
    return [f.result(timeout * (retries + 2)) for f in futs]


def test_the_client_asks_again_when_a_replica_drops_or_is_busy_and_then_gives_up(fleet: LocalFleet) -> None:
    """A stand-in replica on the real broker: it swallows the first copy of each request
    ("drop") or answers it busy ("busy"), and answers the second copy."""
    seen: Counter[bytes] = Counter()
    host, port = fleet.broker.removeprefix("mqtt://").split(":")
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="dist-fake", protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        corr = bytes(m.properties.CorrelationData)
        seen[corr] += 1
        busy = m.topic == topics.service_infer("fake-busy", 1)
        if seen[corr] == 1 and not busy:
            return
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = corr
        answer = (frames.InferResponse(ok=False, error="busy: stage 1/1 of service fake-busy has a full queue")
                  if seen[corr] == 1 else frames.InferResponse(ok=True, output=np.full((1, 1), seen[corr], np.float32)))
        c.publish(m.properties.ResponseTopic, answer.encode(), qos=1, properties=props)

    c.on_message = on_message
    c.connect(host, int(port))
    c.loop_start()
    try:
        c.subscribe([(topics.service_group("fake-drop", 1), 1), (topics.service_group("fake-busy", 1), 1)])
        time.sleep(0.3)
        x = np.zeros((1, 2), np.float32)
        with InferenceClient(fleet.broker) as ic:
            r = ic.infer_service("fake-drop", x, timeout=0.5, retries=2)
            assert r.ok and r.output[0, 0] == 2 and ic.resent == 1
            t0 = time.monotonic()
            r = ic.infer_service("fake-busy", x, timeout=5, retries=2)
            assert r.ok and r.output[0, 0] == 2 and ic.resent == 2
            assert time.monotonic() - t0 < 2, "a busy answer is retried at once, not after the timeout"
            with pytest.raises(EdgeError, match=r"service nobody did not answer within 0.3s in 2 attempt\(s\)"):
                ic.infer_service("nobody", x, timeout=0.3, retries=1)
            busy = ic.infer_service("fake-busy", x, timeout=5, retries=0)
            assert not busy.ok and busy.error.startswith("busy:")  # out of retries: the caller sees why
    finally:
        c.disconnect()
        c.loop_stop()


def test_a_pipeline_on_too_few_devices_is_refused_before_anything_is_sent(fleet: LocalFleet, bundles) -> None:
    res = runner.invoke(app, ["push", str(bundles["p3int8"]), "--to", "device:dist-1,dist-2", "--server", fleet.url])
    assert res.exit_code == 1 and "a 3-stage pipeline with 1 replica(s) per stage needs 3 devices; the selector " \
        "picks 2 (selector 'device:dist-1,dist-2')" in res.output
    res = runner.invoke(app, ["push", str(bundles["p2"]), "--to", "group:dist", "--stage-map", "dist-1=3",
                              "--server", fleet.url])
    assert res.exit_code == 1 and "the bundle has stage(s) 1..2" in res.output
    with fleet.client() as c:
        assert all(d["deployment"] is None for d in c.devices())


def test_a_two_stage_pipeline_answers_like_the_whole_model(fleet: LocalFleet, bundles, whole, digits) -> None:
    out = push(fleet, bundles["p2"], "--to", "device:dist-1,dist-2", "--stage-map", "dist-1=2,dist-2=1")
    roles = {d["device_id"]: (d["stage"], d["stages"], d["file"], d["service"]) for d in out["deployment"]["devices"]}
    assert roles == {"dist-1": (2, 2, "stage-02.tflite", "digits-p2"), "dist-2": (1, 2, "stage-01.tflite", "digits-p2")}
    assert out["service"]["why"]["dist-1"] == "pinned by --stage-map"
    x = np.load(digits.eval)["x"][:40].astype(np.float32)
    b = read_bundle(bundles["p2"])
    with InferenceClient(fleet.broker) as ic:
        answers = ask_all(ic, "digits-p2", x)
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
    got = np.concatenate([a.output for a in answers])
    np.testing.assert_allclose(got, run_pipeline(b, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, whole.run(x), rtol=1e-5, atol=1e-5)
    trace = answers[0].trace
    assert [(t["stage"], t["device"]) for t in trace] == [(1, "dist-2"), (2, "dist-1")]
    assert all(t["compute_ms"] > 0 and t["transfer_ms"] >= 0 for t in trace)


def test_a_three_stage_int8_pipeline_matches_the_host_and_the_float_model(
        fleet: LocalFleet, bundles, whole, digits) -> None:
    out = push(fleet, bundles["p3int8"], "--to", "group:dist")
    assert sorted((d["stage"], d["stages"]) for d in out["deployment"]["devices"]) == [(1, 3), (2, 3), (3, 3)]
    assert out["service"] == {**out["service"], "name": "digits-p3", "stages": 3, "replicas": 1}
    b = read_bundle(bundles["p3int8"])
    assert [s["inputs"][0]["dtype"] for s in b.manifest["pipeline"]["stages"]] == ["int8"] * 3
    x = np.load(digits.eval)["x"][:120].astype(np.float32)
    with InferenceClient(fleet.broker) as ic:
        answers = ask_all(ic, "digits-p3", x)
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
    got = np.concatenate([a.output for a in answers])
    assert got.dtype == np.float32  # int8 between stages, float32 to and from the caller
    np.testing.assert_allclose(got, run_pipeline(b, x), rtol=0, atol=1e-6)
    agree = float(np.mean(np.argmax(got, -1) == np.argmax(whole.run(x), -1)))
    assert agree >= 0.99, f"int8 pipeline gives the float model's top-1 on only {agree:.2%}"

    np.save(fleet.workdir / "row.npy", x[:1])
    res = runner.invoke(app, ["infer", str(fleet.workdir / "row.npy"), "--service", "digits-p3",
                              "--broker", fleet.broker, "--json"])
    assert res.exit_code == 0, res.output
    one = json.loads(res.stdout)
    assert one["argmax"] == int(np.argmax(got[0])) and [s["stage"] for s in one["stages"]] == [1, 2, 3]


def test_an_error_at_any_stage_answers_the_caller_naming_the_stage(fleet: LocalFleet) -> None:
    with InferenceClient(fleet.broker) as ic:
        r = ic.infer_service("digits-p3", np.zeros((1, 5), np.float32), timeout=5, retries=0)
    assert not r.ok and "stage 1/3 of service digits-p3 on device dist-" in r.error and "shape" in r.error
    # A malformed tensor injected between stages 1 and 2: stage 2 answers the caller itself.
    host, port = fleet.broker.removeprefix("mqtt://").split(":")
    got: list[frames.InferResponse] = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="dist-probe", protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.append(frames.InferResponse.decode(m.payload))
    c.connect(host, int(port))
    c.loop_start()
    try:
        c.subscribe(topics.client_responses("dist-probe"), qos=1)
        time.sleep(0.3)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = topics.client_responses("dist-probe"), b"probe-1"
        c.publish(topics.service_infer("digits-p3", 2), frames.tensor_to_npy(np.zeros((1, 3), np.float32)),
                  qos=1, properties=props)
        wait_for("stage 2's error answer", lambda: got, timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()
    assert not got[0].ok and "stage 2/3 of service digits-p3 on device dist-" in got[0].error


def test_stage_timings_reach_fleet_health_and_name_the_bottleneck(fleet: LocalFleet, digits) -> None:
    x = np.load(digits.eval)["x"][:60].astype(np.float32)
    with InferenceClient(fleet.broker) as ic:
        assert all(a.ok for a in ask_all(ic, "digits-p3", x))

    def services() -> Any:
        res = runner.invoke(app, ["fleet", "health", "--window", "10m", "--server", fleet.url, "--json"])
        assert res.exit_code == 0, res.output
        health = json.loads(res.stdout)
        svc = {s["service"]: s for s in health["services"]}.get("digits-p3")
        # ... and the previous test made stage 1 and stage 2 fail once each (telemetry is asynchronous)
        ok = (svc and len(svc["stages"]) == 3 and all(s["requests"] >= 60 for s in svc["stages"])
              and [s["errors"] >= 1 for s in svc["stages"]] == [True, True, False])
        return (svc, health) if ok else None

    svc, health = wait_for("stage telemetry of digits-p3 in fleet health", services, timeout=20)
    assert svc["bottleneck"] in (1, 2, 3)
    assert sum(s["bottleneck"] for s in svc["stages"]) == 1
    for s in svc["stages"]:
        assert s["compute_ms"] > 0 and s["wait_ms"] >= 0 and s["forward_ms"] >= 0 and s["transfer_ms"] >= 0
        assert s["replicas"] == 1
    rows = {r["id"]: r for r in health["devices"]}
    assert sorted(rows[d]["stage"]["stage"] for d in DEVICES if rows[d]["stage"]["service"] == "digits-p3") == [1, 2, 3]
    table = runner.invoke(app, ["fleet", "health", "--window", "10m", "--server", fleet.url])
    assert table.exit_code == 0 and "service digits-p3" in table.stdout and "bottleneck" in table.stdout
    show = runner.invoke(app, ["devices", "show", "dist-1", "--window", "10m", "--server", fleet.url])
    assert show.exit_code == 0 and "of service digits-p3" in show.stdout and "compute" in show.stdout


def test_a_restarted_stage_serves_its_stage_again(fleet: LocalFleet, digits) -> None:
    stop_process(fleet.agents["dist-3"])
    fleet.start_agent("dist-3", labels={"group": "dist"}, heartbeat=1, telemetry_interval=1)
    fleet.wait_online(["dist-3"])
    x = np.load(digits.eval)["x"][:10].astype(np.float32)
    with InferenceClient(fleet.broker) as ic:
        answers = ask_all(ic, "digits-p3", x, timeout=5)
    assert all(a.ok for a in answers) and all(len(a.trace) == 3 for a in answers)


def test_replicas_spread_the_work_and_lose_nothing_when_one_is_killed(fleet: LocalFleet, digits) -> None:
    out = push(fleet, digits.bundle, "--to", "group:dist", "--replicas", "3", "--service", "digits-pool")
    assert {(d["stage"], d["stages"], d["service"]) for d in out["deployment"]["devices"]} == {(1, 1, "digits-pool")}
    host = TFLiteModel(read_bundle(digits.bundle).model_bytes)
    x = np.load(digits.eval)["x"].astype(np.float32)
    xs = np.concatenate([x, x])[:300]
    with InferenceClient(fleet.broker) as ic:
        answers = ask_all(ic, "digits-pool", xs)
        assert all(a.ok for a in answers)
        np.testing.assert_allclose(np.concatenate([a.output for a in answers]), host.run(xs), rtol=1e-5, atol=1e-6)
        by = Counter(a.trace[0]["device"] for a in answers)
        assert set(by) == set(DEVICES) and max(by.values()) <= 150, by  # nobody gets more than 50 %

        victim = "dist-2"
        killed_at: list[float] = []

        def kill(i: int) -> None:
            if i == 100:
                fleet.kill_agent(victim)
                killed_at.append(time.monotonic())

        t0 = time.monotonic()
        answers = ask_all(ic, "digits-pool", xs, during=kill, timeout=2.0, retries=4)
        elapsed = time.monotonic() - t0
        assert killed_at, "the replica was never killed"
        assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
        np.testing.assert_allclose(np.concatenate([a.output for a in answers]), host.run(xs), rtol=1e-5, atol=1e-6)
        by = Counter(a.trace[0]["device"] for a in answers)
        assert by[victim] < 150 and set(by) - {victim} == {"dist-1", "dist-3"}, by
        late = Counter(a.trace[0]["device"] for a in answers[200:])
        assert victim not in late, f"a killed replica still got work: {late}"
    assert elapsed < 30


def per_stage(answers: list[frames.InferResponse]) -> dict[int, Counter[str]]:
    """Requests per device at each stage, from the per-hop timing every answer carries."""
    out: dict[int, Counter[str]] = {}
    for a in answers:
        for hop in a.trace:
            out.setdefault(hop["stage"], Counter())[hop["device"]] += 1
    return out


def test_two_replicas_of_a_two_stage_pipeline_share_the_work_and_survive_a_killed_stage(
        fleet: LocalFleet, bundles, whole, digits) -> None:
    """Hybrid: 2 replicas x 2 stages on 4 agents. The previous test killed dist-2: it comes back
    with its last model, and a fourth agent joins."""
    back = [d for d in (*DEVICES, "dist-4") if d not in fleet.agents or fleet.agents[d].poll() is not None]
    for d in back:
        fleet.start_agent(d, labels={"group": "dist"}, heartbeat=1, telemetry_interval=1)
    fleet.wait_online(back)
    out = push(fleet, bundles["p2"], "--to", "group:dist", "--replicas", "2", "--service", "digits-h")
    stage_of = {d["device_id"]: d["stage"] for d in out["deployment"]["devices"]}
    assert sorted(stage_of) == ["dist-1", "dist-2", "dist-3", "dist-4"] and sorted(stage_of.values()) == [1, 1, 2, 2]
    assert out["service"] == {**out["service"], "name": "digits-h", "stages": 2, "replicas": 2, "left": {}}
    b = read_bundle(bundles["p2"])
    x = np.load(digits.eval)["x"][:160].astype(np.float32)
    ref = run_pipeline(b, x)
    with InferenceClient(fleet.broker) as ic:
        answers = ask_all(ic, "digits-h", x)
        assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
        got = np.concatenate([a.output for a in answers])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, whole.run(x), rtol=1e-5, atol=1e-5)
        by = per_stage(answers)
        for stage in (1, 2):
            replicas = {d for d, s in stage_of.items() if s == stage}
            assert set(by[stage]) == replicas and min(by[stage].values()) >= 160 // 4, (stage, by[stage])

        victim = min(d for d, s in stage_of.items() if s == 2)
        killed: list[float] = []

        def kill(i: int) -> None:
            if i == 50:
                fleet.kill_agent(victim)
                killed.append(time.monotonic())

        xs = np.concatenate([x, x[:40]])
        answers = ask_all(ic, "digits-h", xs, during=kill, timeout=2.0, retries=4)
    assert killed, "the stage-2 replica was never killed"
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
    np.testing.assert_allclose(np.concatenate([a.output for a in answers]), np.concatenate([ref, ref[:40]]),
                               rtol=1e-5, atol=1e-6)
    late = per_stage(answers[120:])
    assert victim not in late[2] and sum(late[2].values()) == 80, f"a killed stage replica still got work: {late}"
    assert len(late[1]) == 2, late  # stage 1 keeps both replicas


def version_of(bundle: Path, version: str, out: Path) -> Path:
    """The same model as another version (a new bundle: another artifact)."""
    b = read_bundle(bundle)
    from sdk.protocol.bundle import write_bundle

    write_bundle(out, {k: v for k, v in b.manifest.items() if k != "files"} | {"version": version}, b.files)
    return out


def test_a_smaller_pool_leaves_no_stale_replica_behind(fleet: LocalFleet, digits) -> None:
    """3 replicas of 1.0.0, then 2 replicas of 2.0.0: the dropped one leaves the shared topic."""
    alive = sorted(d for d, p in fleet.agents.items() if p.poll() is None)
    assert len(alive) == 3, alive
    push(fleet, digits.bundle, "--to", "device:" + ",".join(alive), "--replicas", "3", "--service", "digits-s")
    v2 = version_of(digits.bundle, "2.0.0", fleet.workdir / "digits-2.bundle")
    res = runner.invoke(app, ["push", str(v2), "--to", "device:" + ",".join(alive), "--replicas", "2",
                              "--service", "digits-s", "--server", fleet.url, "--wait", "60"])
    assert res.exit_code == 0, res.output
    kept, dropped = alive[:2], alive[2]
    assert f"{dropped}: leaves service digits-s: keeps running digits 1.0.0 (deployment " in res.stdout, res.stdout
    with fleet.client() as c:

        def left() -> Any:
            dev = {d["id"]: d for d in c.devices()}[dropped]
            return dev if dev["deployment"]["state"] == "active" and "service" not in dev["model"] else None

        dev = wait_for(f"{dropped} reporting no service", left, timeout=15)
        assert dev["model"]["version"] == "1.0.0" and dev["deployment"]["detail"].startswith("installed bundle re-used")
        devs = {d["id"]: d for d in c.devices()}
        assert [(devs[k]["model"]["version"], devs[k]["model"].get("service")) for k in kept] == [("2.0.0", "digits-s")] * 2
    x = np.load(digits.eval)["x"][:100].astype(np.float32)
    with InferenceClient(fleet.broker) as ic:
        answers = ask_all(ic, "digits-s", x, timeout=3.0, retries=0)
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
    assert {a.model_version for a in answers} == {"2.0.0"}
    by = Counter(a.trace[0]["device"] for a in answers)
    assert set(by) == set(kept), by  # both remaining replicas, never the dropped one


def test_a_pool_rolls_out_wave_by_wave_and_every_answer_names_its_version(fleet: LocalFleet, digits) -> None:
    """A gated rollout of a replica pool: while the canary soaks it serves 3.0.0 in the pool and
    the replica of the later wave still serves 2.0.0 (answers carry model_version); then both."""
    alive = sorted(d for d, p in fleet.agents.items() if p.poll() is None)
    v3 = version_of(digits.bundle, "3.0.0", fleet.workdir / "digits-3.bundle")
    res = runner.invoke(app, ["push", str(v3), "--to", "device:" + ",".join(alive), "--replicas", "2", "--service",
                              "digits-s", "--canary", "1", "--soak", "2s", "--gate", "p95=off", "--gate", "min_inferences=0",
                              "--server", fleet.url, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rid, waves = out["rollout"]["id"], [w["devices"] for w in out["rollout"]["waves"]]
    assert sorted(d for w in waves for d in w) == alive[:2] and [len(w) for w in waves] == [1, 1], waves
    assert out["service"]["left"] == {}  # the replica dropped by the previous test is no member any more
    x = np.load(digits.eval)["x"][:40].astype(np.float32)
    with fleet.client() as c, InferenceClient(fleet.broker) as ic:
        wait_for("the canary soaking", lambda: c.rollout(rid)["phase"] == "soaking", timeout=20, every=0.05)
        assert c.rollout_action(rid, "pause")["wave"] == 0  # held at the canary, however slow this host is
        answers = ask_all(ic, "digits-s", x, timeout=3.0, retries=0)
        c.rollout_action(rid, "resume")
        assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
        assert {(a.trace[0]["device"], a.model_version) for a in answers} == {(waves[0][0], "3.0.0"),
                                                                              (waves[1][0], "2.0.0")}
        ro = wait_for("the rollout to complete", lambda: (r := c.rollout(rid))["phase"] in ("completed", "rolled_back")
                      and r, timeout=30)
        assert ro["phase"] == "completed", ro["summary"]
        answers = ask_all(ic, "digits-s", x, timeout=3.0, retries=0)
    assert all(a.ok for a in answers) and {a.model_version for a in answers} == {"3.0.0"}
    assert {a.trace[0]["device"] for a in answers} == set(alive[:2])

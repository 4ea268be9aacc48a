"""The pure parts of distributed deployment: who serves which stage, tensors between stages,
stage telemetry on the wire and in fleet health, and an agent's stage driven in memory; and,
against the store (SQLite and PostgreSQL, no broker), who leaves a service after a re-push and
a replica pool's gated rollout."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.stage import StageServer, StageStats
from sdk.deploy import parse_stage_map
from sdk.protocol import ProtocolError, frames, histogram, messages, pipeline, topics
from sdk.protocol.errors import DeployError, ModelInputError
from sdk.protocol.messages import ActiveModel
from server.health import stage_health
from server.placement import Candidate, is_service, place

SPEED = {"raspberry-pi-4": 4.0, "raspberry-pi-5": 2.0, "jetson-orin-nano": 0.5}


def manifest(weights: list[float], planned: list[str] | None = None, name: str = "net") -> dict[str, Any]:
    stages = [{"file": f"stage-{i + 1:02d}.tflite", "predicted_compute_ms": w,
               "device": planned[i] if planned else "host"} for i, w in enumerate(weights)]
    return {"name": name, "pipeline": {"stages": stages}}


def test_the_heaviest_stage_goes_to_the_fastest_device() -> None:
    devs = [Candidate("a", profile="raspberry-pi-4"), Candidate("b", profile="jetson-orin-nano"),
            Candidate("c", profile="raspberry-pi-5")]
    p = place(manifest([1.0, 9.0, 3.0]), devs, speed_of=SPEED.get)
    assert {d: r["stage"] for d, r in p.roles.items()} == {"b": 2, "c": 3, "a": 1}
    assert p.roles["b"] == {"file": "stage-02.tflite", "service": "net", "stage": 2, "stages": 3}
    assert "speed factor 0.5" in p.why["b"] and (p.stages, p.replicas) == (3, 1)


def test_the_planned_profile_wins_then_pins_win_over_both() -> None:
    devs = [Candidate("a", profile="raspberry-pi-4"), Candidate("b", profile="jetson-orin-nano")]
    # planned: the heavy stage 1 on a Pi 4 (the planner gave it little work for it)
    p = place(manifest([5.0, 1.0], ["raspberry-pi-4", "jetson-orin-nano"]), devs, speed_of=SPEED.get)
    assert {d: r["stage"] for d, r in p.roles.items()} == {"a": 1, "b": 2} and "planned" in p.why["a"]
    p = place(manifest([5.0, 1.0], ["raspberry-pi-4", "jetson-orin-nano"]), devs, speed_of=SPEED.get,
              stage_map={"a": 2})
    assert {d: r["stage"] for d, r in p.roles.items()} == {"a": 2, "b": 1} and p.why["a"] == "pinned by --stage-map"


def test_replicas_of_a_pipeline_and_the_choice_of_devices() -> None:
    devs = [Candidate(f"d{i}", online=i != 0, profile="raspberry-pi-5") for i in range(7)]
    p = place(manifest([2.0, 1.0]), devs, replicas=3, speed_of=SPEED.get)
    assert len(p.roles) == 6 and "d0" not in p.roles  # the offline device is left out
    assert sorted(r["stage"] for r in p.roles.values()) == [1, 1, 1, 2, 2, 2]
    pool = place({"name": "digits"}, devs, service="pool", speed_of=SPEED.get)
    assert len(pool.roles) == 7 and {(r["file"], r["stage"], r["stages"]) for r in pool.roles.values()} == {("", 1, 1)}
    two = place({"name": "digits"}, devs, replicas=2)
    assert sorted(two.roles) == ["d1", "d2"] and two.service == "digits"


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"replicas": 2}, "a 3-stage pipeline with 2 replica(s) per stage needs 6 devices; the selector picks 3"),
    ({"stage_map": {"zz": 1}}, "--stage-map names zz, which the selector does not pick"),
    ({"stage_map": {"a": 4}}, "--stage-map puts a on stage 4; the bundle has stage(s) 1..3"),
    ({"stage_map": {"a": 1, "b": 1}}, "--stage-map puts 2 devices on stage 1; with 1 replica(s) at most 1"),
    ({"service": "bad name"}, "service name 'bad name' is not an id"),
])
def test_impossible_placements_are_clear_errors(kwargs: dict[str, Any], error: str) -> None:
    devs = [Candidate("a"), Candidate("b"), Candidate("c")]
    with pytest.raises(DeployError) as exc:
        place(manifest([1.0, 1.0, 1.0]), devs, selector="group:g", **kwargs)
    assert error in str(exc.value)


def test_what_makes_a_service_and_the_stage_map_syntax() -> None:
    assert not is_service({"name": "m"}, None, None, None)
    assert is_service({"name": "m"}, None, 2, None) and is_service(manifest([1.0]), None, None, None)
    assert parse_stage_map("pi-a=1, pi-b=2") == {"pi-a": 1, "pi-b": 2} and parse_stage_map("") is None
    for bad in ("pi-a", "pi-a=x", "a b=1", "pi-a=1,pi-a=2"):
        with pytest.raises(DeployError, match="--stage-map"):
            parse_stage_map(bad)


def spec(dtype: str, scale: float = 0.0, zero: int = 0) -> dict[str, Any]:
    return {"name": "t", "shape": [-1, 4], "dtype": dtype, "quantization": [scale, zero]}


def test_adapt_quantizes_requantizes_and_dequantizes() -> None:
    x = np.array([[-1.0, 0.0, 0.5, 2.0]], np.float32)
    q = pipeline.adapt(x, spec("float32"), spec("int8", 0.02, -10))
    assert q.dtype == np.int8 and q.tolist() == [[-60, -10, 15, 90]]
    r = pipeline.adapt(q, spec("int8", 0.02, -10), spec("int8", 0.03, 5))  # the next stage's scale
    assert r.tolist() == [[-28, 5, 22, 72]]  # via float: (15 + 10) * 0.02 / 0.03 + 5 = 21.7 -> 22
    back = pipeline.adapt(r, spec("int8", 0.03, 5), spec("float32"))
    np.testing.assert_allclose(back, [[-0.99, 0.0, 0.51, 2.01]], atol=1e-6)
    assert pipeline.adapt(x, spec("float32"), spec("float32")) is x
    wrong = np.zeros((1, 4), np.float64)
    assert pipeline.adapt(wrong, spec("float32"), spec("int8", 0.1, 0)) is wrong  # the model's check reports it
    np.testing.assert_array_equal(pipeline.adapt(np.full((1, 4), 300.0, np.float32), spec("float32"),
                                                 spec("int8", 1.0, 0)), [[127] * 4])  # saturates
    with pytest.raises(ModelInputError, match="no quantization parameters"):
        pipeline.adapt(x, spec("float32"), spec("int8"))


def telemetry(**stage: Any) -> dict[str, Any]:
    base = {"service": "svc", "stage": 2, "stages": 3, "count": 10, "errors": 1, "timed": 9,
            "transfer_ms": 4.5, "wait_ms": 1.0, "compute_ms": 20.0, "forward_ms": 0.5}
    return {"seq": 1, "interval_s": 5.0, "count": 0, "errors": 0, "latency_hist": histogram.empty(),
            "latency_sum_ms": 0.0, "stage": {**base, **stage}}


def test_stage_telemetry_is_validated_field_by_field() -> None:
    msg = messages.decode("telemetry", json.dumps(telemetry()).encode())
    assert msg.stage["compute_ms"] == 20.0 and messages.decode("telemetry", msg.encode()) == msg
    for bad, why in [({"stage": 4}, "1 <= stage <= stages"), ({"service": "a/b"}, "must be an id"),
                     ({"errors": 11}, "must not exceed count"), ({"timed": 10}, "must not exceed count"),
                     ({"compute_ms": -1.0}, "must be >= 0"), ({"extra": 1}, "exactly the keys"),
                     ({"count": True}, "must be int")]:
        with pytest.raises(ProtocolError, match="stage") as exc:
            messages.decode("telemetry", json.dumps(telemetry(**bad)).encode())
        assert why in str(exc.value), (bad, str(exc.value))


def test_stage_health_names_the_stage_that_limits_throughput() -> None:
    sums = {"transfer_ms": 10.0, "wait_ms": 0.0, "compute_ms": 0.0, "forward_ms": 0.0}
    rows = [("a", "svc", 1, 2, 10, 0, 10, {**sums, "compute_ms": 50.0}),   # 5 ms per request
            ("b", "svc", 2, 2, 10, 0, 10, {**sums, "compute_ms": 80.0}),   # 8 ms, but two replicas
            ("c", "svc", 2, 2, 10, 0, 10, {**sums, "compute_ms": 80.0, "wait_ms": 30.0}),
            ("c", "old", 1, 1, 2, 2, 0, sums)]                             # a role it had before
    devices, services = stage_health(rows)
    assert devices["c"]["service"] == "svc" and devices["c"]["wait_ms"] == 3.0
    svc = {s["service"]: s for s in services}["svc"]
    assert svc["bottleneck"] == 1  # 5 ms on one replica beats 8 ms shared by two
    assert [(s["stage"], s["replicas"], s["requests"], s["compute_ms"], s["bottleneck"]) for s in svc["stages"]] == [
        (1, 1, 10, 5.0, True), (2, 2, 20, 8.0, False)]
    old = {s["service"]: s for s in services}["old"]["stages"][0]
    assert old["errors"] == 2 and old["compute_ms"] is None and old["transfer_ms"] is None


class Transport:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, Any]] = []
        self.subs: list[tuple[str, str]] = []

    def subscribe(self, topics_: list[str], qos: int = 1) -> None:
        self.subs += [("sub", t) for t in topics_]

    def unsubscribe(self, topics_: list[str]) -> None:
        self.subs += [("unsub", t) for t in topics_]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None) -> None:
        self.published.append((topic, payload, properties))


class Serving:
    def __init__(self, model: Any, info: ActiveModel):
        self.model, self.info = model, info


class Double:
    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != 4:
            raise ModelInputError(f"input shape {list(x.shape)} does not match [?, 4]")
        return x * 2


def role(stage: int, stages: int = 3, service: str = "svc") -> ActiveModel:
    return ActiveModel("dep", "ab" * 32, "net", "7", f"stage-{stage:02d}.tflite", service, stage, stages)


def request(corr: bytes = b"c-1", trace: list[tuple[str, str]] | None = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topics.client_responses("caller")
    props.CorrelationData = corr
    props.UserProperty = [*(trace or []), (pipeline.SENT, repr(1000.0))]
    return props


def test_a_stage_forwards_with_the_callers_response_topic_and_the_last_one_answers() -> None:
    t = Transport()
    ok, err = [], []
    s = StageServer("dev-2", t, record_ok=ok.append, record_error=lambda: err.append(1), load_io=lambda r: {})
    s.sync(role(2))
    assert t.subs == [("sub", topics.service_group("svc", 2))] and s.accepts(topics.service_infer("svc", 2))
    s.handle(frames.tensor_to_npy(np.ones((1, 4), np.float32)), request(), 1000.004, Serving(Double(), role(2)))
    topic, payload, props = t.published[-1]
    assert topic == topics.service_infer("svc", 3)
    assert props.ResponseTopic == topics.client_responses("caller") and props.CorrelationData == b"c-1"
    np.testing.assert_array_equal(frames.npy_to_tensor(payload), np.full((1, 4), 2.0, np.float32))
    pairs = pipeline.user_properties(props)
    entry = pipeline.trace_of(pairs)[0]
    assert entry["stage"] == 2 and entry["device"] == "dev-2" and abs(entry["transfer_ms"] - 4.0) < 1e-3
    assert pipeline.sent_at(pairs) > 1000.0 and len(ok) == 1

    s.sync(role(3), reconnected=False)  # moved to the last stage
    assert t.subs[-2:] == [("unsub", topics.service_group("svc", 2)), ("sub", topics.service_group("svc", 3))]
    s.handle(payload, props, 1e12, Serving(Double(), role(3)))
    topic, payload, answer_props = t.published[-1]
    assert topic == topics.client_responses("caller") and answer_props.CorrelationData == b"c-1"
    answer = frames.InferResponse.decode(payload)
    assert answer.ok and answer.model_version == "7" and answer.output.tolist() == [[4.0] * 4]
    assert [e["stage"] for e in pipeline.trace_of(pipeline.user_properties(answer_props))] == [2, 3]
    snap = s.stats.snapshot(role(3))
    assert snap["count"] == 2 and snap["timed"] == 2 and snap["errors"] == 0 and snap["compute_ms"] > 0
    assert s.stats.snapshot(role(3))["count"] == 0  # reset per interval
    assert StageStats().snapshot(ActiveModel(None, "ab" * 32, "n", "1")) is None  # no service, no stage field


def test_errors_name_the_stage_and_roles_follow_the_active_model() -> None:
    t = Transport()
    errors: list[int] = []
    s = StageServer("dev-1", t, record_ok=lambda ms: None, record_error=lambda: errors.append(1),
                    load_io=lambda r: {})
    s.sync(role(1))
    s.handle(frames.tensor_to_npy(np.ones((1, 5), np.float32)), request(), 1000.0, Serving(Double(), role(1)))
    answer = frames.InferResponse.decode(t.published[-1][1])
    assert t.published[-1][0] == topics.client_responses("caller")
    assert not answer.ok and answer.error.startswith("stage 1/3 of service svc on device dev-1: input shape [1, 5]")
    s.handle(b"not npy", request(), 1000.0, Serving(Double(), role(1)))
    assert "stage 1/3 of service svc on device dev-1" in frames.InferResponse.decode(t.published[-1][1]).error
    s.handle(b"", request(), 1000.0, Serving(Double(), ActiveModel("d", "ab" * 32, "net", "7")))
    assert "serves no service stage now" in frames.InferResponse.decode(t.published[-1][1]).error
    s.busy(request(), role(1))
    assert frames.InferResponse.decode(t.published[-1][1]).error.startswith("busy: stage 1/3 of service svc")
    assert len(errors) == 4 and s.stats.snapshot(role(1))["errors"] == 4

    s.sync(ActiveModel("dep", "ab" * 32, "net", "8"))  # a plain model now: leave the service
    assert t.subs[-1] == ("unsub", topics.service_group("svc", 1)) and not s.accepts(topics.service_infer("svc", 1))
    s.sync(role(1))
    s.sync(role(1), reconnected=True)  # a new MQTT session has no subscriptions: subscribe again
    assert t.subs[-2:] == [("sub", topics.service_group("svc", 1))] * 2


def stage_bundle(path: Any) -> tuple[bytes, str]:
    """A 2-stage pipeline bundle whose "models" are run by a stub factory (x * 2 per stage)."""
    from sdk.protocol.bundle import tensor_spec, write_bundle

    x = np.ones((1, 4), np.float32)
    io = {"inputs": [tensor_spec("x", [-1, 4], "float32")], "outputs": [tensor_spec("y", [-1, 4], "float32")]}
    files, stages = {}, []
    for k in (1, 2):
        files[f"stage-0{k}.tflite"] = f"stub {k}".encode()
        files[f"s{k}-in.npy"], files[f"s{k}-out.npy"] = frames.tensor_to_npy(x * 2 ** (k - 1)), frames.tensor_to_npy(x * 2 ** k)
        stages.append({"index": k, "file": f"stage-0{k}.tflite", **io,
                       "sample": {"input": f"s{k}-in.npy", "output": f"s{k}-out.npy", "atol": 0, "rtol": 0}})
    manifest = {"name": "pipe", "version": "1", "quantization": "none", "kind": "pipeline",
                "model": {"file": "stage-01.tflite", **io}, "sample": stages[0]["sample"],
                "pipeline": {"stages": stages, "input": io["inputs"][0], "output": io["outputs"][0]}}
    sha = write_bundle(path, manifest, files)
    return path.read_bytes(), sha


def test_an_agent_serves_its_stage_topic_only_while_its_role_names_it(tmp_path: Any) -> None:
    from agent.core import Agent
    from agent.slots import DataDir

    data, sha = stage_bundle(tmp_path / "pipe.zip")
    t = Transport()
    t.start = lambda on_connect, on_message: on_connect()  # type: ignore[attr-defined]
    agent = Agent("pi-s", t, DataDir(tmp_path / "agent"), model_factory=lambda b: Double())
    agent._on_connect()
    group = topics.service_group("pipe", 2)

    def desired(dep: str, **role: Any) -> bytes:
        return messages.Desired(dep, sha, len(data), 4096, "pipe", "1", **role).encode()

    agent.handle_desired(desired("dep-1", file="stage-02.tflite", service="pipe", stage=2, stages=2))
    fetched = 0
    while fetched < len([p for tp, p, _ in t.published if tp == topics.fetch("pi-s")]):
        fetch = messages.decode("fetch", [p for tp, p, _ in t.published if tp == topics.fetch("pi-s")][fetched])
        for i in fetch.indexes:
            agent.handle_chunk(frames.Chunk(sha, i, -(-len(data) // 4096), data[i * 4096:(i + 1) * 4096]).encode())
        fetched += 1
    assert agent.active is not None and agent.active.stage == 2 and ("sub", group) in t.subs

    # a request on the stage topic reaches the inference queue; the last stage answers the caller
    agent.on_message(topics.service_infer("pipe", 2), frames.tensor_to_npy(np.ones((1, 4), np.float32)), request())
    agent.handle_infer(*agent._infer_q.get_nowait())
    topic, payload, _ = t.published[-1]
    assert topic == topics.client_responses("caller") and frames.InferResponse.decode(payload).output.tolist() == [[2.0] * 4]
    assert agent.stages.stats.snapshot(agent.active)["count"] == 1

    agent._on_connect()  # reconnect: device topics and the stage topic again
    assert t.subs[-1] == ("sub", group)

    agent.handle_desired(desired("dep-2"))  # same bundle, plain role: leave the stage topic
    assert t.subs[-1] == ("unsub", group) and agent.active.service == ""
    agent.on_message(topics.service_infer("pipe", 2), b"late", request())
    assert agent._infer_q.empty()  # no longer routed


# -- who serves a service after a re-push (the store, SQLite and PostgreSQL; no broker) ---------


def serving(f: Any, device: str, artifact: str, version: str, service: str = "pool") -> None:
    """The device's status says it runs ``artifact`` as a replica of ``service``."""
    dep = f.store.desired(device).deployment_id
    active = messages.ActiveModel(dep, artifact, "m", version, "", service, 1 if service else 0, 1 if service else 0)
    f.svc.handle(topics.status(device), messages.Status(state="online", connection=f"c-{device}",
                                                        active=active).encode(), f.clock())


def test_a_smaller_pool_makes_every_dropped_replica_leave_the_service(tmp_path: Any, db_url: str) -> None:
    from tests.test_server_rollouts import Fleet

    f = Fleet(tmp_path, db_url)
    try:
        devs = ["p-a", "p-b", "p-c", "p-d", "p-e"]
        f.online(*devs)
        v1, v2, v3 = f.upload("1"), f.upload("2"), f.upload("3")
        first = f.svc.create_deployment(v1, "all", service="pool", replicas=5)
        assert first["service"]["left"] == {} and first["targets"] == devs
        for d in devs:
            f.report(d, "active")
            serving(f, d, v1, "1")
        assert f.store.device("p-c")["model"] == {"artifact": v1, "name": "m", "version": "1", "service": "pool",
                                                  "stage": 1, "stages": 1}
        # p-d: a plain deployment of v3 failed, so it still serves the pool (its status says so);
        # p-e: a plain deployment of v3 is on its way: that will take it out of the pool anyway
        f.svc.create_deployment(v3, "device:p-d,p-e")
        f.report("p-d", "failed", "smoke test failed")
        f.pub.sent.clear()

        dep = f.svc.create_deployment(v2, "all", service="pool", replicas=2)
        assert dep["targets"] == ["p-a", "p-b"]
        left = dep["service"]["left"]
        assert sorted(left) == ["p-c", "p-d"], left
        assert left["p-c"]["keeps"] == "m 1" and "gives it stage 1/1 of service pool" in left["p-c"]["why"]
        assert "reports serving stage 1/1 of service pool" in left["p-d"]["why"]
        assert left["p-c"]["deployment"] == left["p-d"]["deployment"] != dep["id"]  # one per model kept
        for d in ("p-c", "p-d"):
            told = f.desired_sent(d)[-1]  # retained: an agent that is offline gets it on connect
            assert (told.artifact, told.file, told.service, told.stage, told.stages) == (v1, "", "", 0, 0)
            assert told.deployment_id == left[d]["deployment"]
        assert f.desired_sent("p-e") == [] and f.store.desired("p-e").artifact == v3  # left alone
        assert sorted(f.store.service_members("pool")) == ["p-a", "p-b"]  # told: p-c, p-d no longer count

        # the agents carry it out (same bundle, role cleared) and say so
        for d in ("p-c", "p-d"):
            f.report(d, "active")
            serving(f, d, v1, "1", service="")
        assert "service" not in f.store.device("p-c")["model"]
        again = f.svc.create_deployment(v2, "all", service="pool", replicas=2)
        assert again["service"]["left"] == {}
        # a device that only reports a model (no desired state of its own) keeps it, role cleared
        f.svc.handle(topics.status("p-x"), messages.Status(state="online", connection="c-p-x", active=messages.ActiveModel(
            None, v1, "m", "1", "", "other", 1, 1)).encode(), f.clock())
        other = f.svc.create_deployment(v2, "device:p-a", service="other")
        assert list(other["service"]["left"]) == ["p-x"] and f.store.desired("p-x").service == ""
    finally:
        f.store.close()


def test_a_pool_rolls_out_in_waves_and_a_pipeline_is_refused(tmp_path: Any, db_url: str) -> None:
    from server.rollout import Gates, Strategy
    from tests.test_server_rollouts import Fleet

    f = Fleet(tmp_path, db_url)
    try:
        devs = ["w-1", "w-2", "w-3", "w-4"]
        f.online(*devs)
        v1, v2 = f.upload("1"), f.upload("2")
        f.svc.create_deployment(v1, "all", service="pool", replicas=4)
        for d in devs:
            f.report(d, "active")
            serving(f, d, v1, "1")
        dep = f.svc.create_deployment(v2, "all", Strategy(canary=1, waves=(), soak_s=10), Gates(min_inferences=0),
                                      service="pool", replicas=3)
        assert dep["service"]["replicas"] == 3 and sorted(dep["service"]["left"]) == ["w-4"]
        assert [w["devices"] for w in dep["rollout"]["waves"]] == [["w-1"], ["w-2", "w-3"]]
        # the canary serves v2 in the pool; the later wave keeps serving v1 in the same pool
        canary, later = f.store.desired("w-1"), f.store.desired("w-2")
        assert (canary.artifact, canary.service, canary.stage, canary.stages) == (v2, "pool", 1, 1)
        assert (later.artifact, later.service) == (v1, "pool")
        assert (f.store.desired("w-4").artifact, f.store.desired("w-4").service) == (v1, "")
        f.clock.tick(1)
        f.report("w-1", "active")
        f.svc.rollouts.tick()
        f.clock.tick(11)
        f.svc.rollouts.tick()  # the canary passes; the next wave is told, with its role
        assert all((f.store.desired(d).artifact, f.store.desired(d).service) == (v2, "pool") for d in ("w-2", "w-3"))

        pipe, _ = stage_bundle(tmp_path / "pipe.zip")
        art, _ = f.svc.add_artifact(pipe)
        with pytest.raises(DeployError, match="a 2-stage pipeline is deployed at once, never in waves: during a "
                                              "gated rollout its stages would run different versions"):
            f.svc.create_deployment(art["sha256"], "all", Strategy(canary=1), Gates())
    finally:
        f.store.close()

"""Rollouts wired to the store (SQLite and PostgreSQL): staged desired states, observations built
from reports and telemetry, rollback to each device's previous deployment, operator commands,
supersession and a restart that resumes from the database. In process: an injected clock, the
Publisher seam records what would go to the broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sdk.protocol import histogram, messages, topics
from sdk.protocol.errors import DeployError
from server.config import Config
from server.rollout import Gates, RolloutError, Strategy
from server.service import Service
from server.store import Store
from tests.test_server_service import Recorder, make_bundle

DEVS = ["pi-1", "pi-2", "pi-3", "pi-4"]
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def tick(self, s: float) -> datetime:
        self.now += timedelta(seconds=s)
        return self.now


class Fleet:
    """A service plus what the devices would send, by hand."""

    def __init__(self, tmp: Path, db_url: str):
        self.tmp, self.clock, self.pub = tmp, Clock(), Recorder()
        self.config = Config(data_dir=tmp / "data", db_url=db_url, chunk_size=1024)
        self.store = Store(db_url, clock=self.clock)
        self.svc = Service(self.config, self.store, self.pub, clock=self.clock)
        self.seq: dict[str, int] = {}

    def restart(self) -> None:
        self.store.close()
        self.store = Store(self.config.db_url, clock=self.clock)
        self.svc = Service(self.config, self.store, self.pub, clock=self.clock)

    def online(self, *devices: str) -> None:
        for d in devices:
            self.svc.handle(topics.status(d), messages.Status(state="online", connection=f"c-{d}").encode(),
                            self.clock())

    def upload(self, version: str) -> str:
        art, _ = self.svc.add_artifact(make_bundle(self.tmp, version, model=f"model {version}".encode()))
        return art["sha256"]

    def report(self, device: str, state: str, detail: str = "") -> None:
        desired = self.store.desired(device)
        assert desired is not None
        self.svc.handle(topics.reported(device), messages.Reported(desired.deployment_id, desired.artifact,
                                                                   state, detail).encode(), self.clock())

    def telemetry(self, device: str, artifact: str, n: int, ms: float, errors: int = 0) -> None:
        hist = histogram.empty()
        hist[histogram.bucket_of(ms)] = n - errors
        seq = self.seq[device] = self.seq.get(device, -1) + 1
        msg = messages.Telemetry(seq=seq, interval_s=1.0, count=n, errors=errors, latency_hist=hist,
                                 latency_sum_ms=ms * (n - errors), artifact=artifact, model_version="x")
        self.svc.handle(topics.telemetry(device), msg.encode(), self.clock())

    def desired_sent(self, device: str) -> list[messages.Desired]:
        return [messages.decode("desired", p) for t, p, _, _ in self.pub.sent if t == topics.desired(device) and p]

    def all_active(self, devices: list[str]) -> None:
        for d in devices:
            self.report(d, "active")


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Iterator[Fleet]:
    f = Fleet(tmp_path, db_url)
    try:
        yield f
    finally:
        f.store.close()


def on_old(f: Fleet) -> str:
    """Every device runs v1 from a plain deployment; returns v1's artifact."""
    f.online(*DEVS)
    old = f.upload("1")
    f.svc.create_deployment(old, "all")
    f.all_active(DEVS)
    return old


def test_a_good_rollout_assigns_wave_by_wave_and_completes(fleet: Fleet) -> None:
    f = fleet
    old = on_old(f)
    new = f.upload("2")
    dep = f.svc.create_deployment(new, "all", Strategy(canary=1, waves=(0.5,), soak_s=10), Gates(min_inferences=10))
    ro = dep["rollout"]
    assert [w["devices"] for w in ro["waves"]] == [["pi-1"], ["pi-2", "pi-3"], ["pi-4"]]
    assert ro["phase"] == "installing" and ro["waves"][0]["label"] == "canary"
    # only the canary is told; the others keep v1 as their desired state
    assert f.desired_sent("pi-1")[-1].artifact == new
    assert all(f.store.desired(d).artifact == old for d in DEVS[1:])
    assert all(d.artifact == old for dev in DEVS[1:] for d in f.desired_sent(dev))
    f.clock.tick(1)
    f.report("pi-1", "downloading")
    assert f.svc.rollouts.tick() == 1 and f.svc.rollouts.show(ro["id"])["phase"] == "installing"
    f.report("pi-1", "active")
    f.svc.rollouts.tick()
    assert f.svc.rollouts.show(ro["id"])["phase"] == "soaking"
    f.clock.tick(5)
    f.telemetry("pi-1", new, 50, 2.0)
    f.svc.rollouts.tick()
    assert f.svc.rollouts.show(ro["id"])["phase"] == "soaking"  # soak not over
    f.clock.tick(5)
    f.svc.rollouts.tick()
    view = f.svc.rollouts.show(dep["id"])  # by deployment id too
    assert view["phase"] == "installing" and view["wave"] == 1
    assert {g["gate"]: g["passed"] for g in view["gate_results"]}["error_rate"] is True
    assert [f.store.desired(d).artifact for d in DEVS] == [new, new, new, old]
    assert view["history"][-2].endswith("canary passed its gates after 10 s (50 inferences)")  # no baseline: no p95 gate
    for wave in (["pi-2", "pi-3"], ["pi-4"]):
        f.clock.tick(1)
        f.all_active(wave)
        f.svc.rollouts.tick()
        f.clock.tick(10)
        f.svc.rollouts.tick()
        assert f.svc.rollouts.show(ro["id"])["phase"] == "soaking"  # no traffic: it soaks on ...
        f.clock.tick(20)
        f.svc.rollouts.tick()  # ... for at most 3 soaks, then passes as "not judged"
    view = f.svc.rollouts.show(ro["id"])
    assert view["phase"] == "completed" and [w["status"] for w in view["waves"]] == ["passed"] * 3
    assert {g["gate"]: g["detail"] for g in view["gate_results"]}["error_rate"].startswith("not judged: 0 inferences")
    assert all(f.store.desired(d).artifact == new for d in DEVS)
    assert "Completed: every wave passed its gates; 4 device(s) run m 2." in view["summary"]
    assert f.store.deployment(dep["id"])["devices"][0]["state"] == "active"


def test_a_slow_canary_is_rolled_back_to_its_previous_deployment(fleet: Fleet) -> None:
    f = fleet
    old = on_old(f)
    old_dep = f.store.desired("pi-1").deployment_id
    for d in DEVS:
        f.telemetry(d, old, 100, 1.0)  # the previous model's cohort, before the wave
    f.clock.tick(30)
    new = f.upload("3")
    dep = f.svc.create_deployment(new, "all", Strategy(canary=1, waves=(0.5,), soak_s=10), Gates(min_inferences=10))
    rid = dep["rollout"]["id"]
    f.clock.tick(1)
    f.report("pi-1", "active")
    f.svc.rollouts.tick()
    f.clock.tick(5)
    f.telemetry("pi-1", new, 100, 3.2)
    f.clock.tick(5)
    f.svc.rollouts.tick()
    view = f.svc.rollouts.show(rid)
    assert view["phase"] == "rolled_back"
    failed = [g for g in view["gate_results"] if not g["passed"]]
    assert [g["gate"] for g in failed] == ["p95_latency"] and failed[0]["value"] > 1.5
    # pi-1's desired state is its previous deployment again, published; nobody else was told
    back = f.desired_sent("pi-1")[-1]
    assert (back.deployment_id, back.artifact) == (old_dep, old)
    assert f.store.desired("pi-1").artifact == old
    assert all(d.artifact == old for dev in DEVS[1:] for d in f.desired_sent(dev))
    states = {d["device_id"]: d for d in f.store.deployment(dep["id"])["devices"]}
    assert states["pi-1"]["state"] == "rolled_back" and "p95 latency" in states["pi-1"]["detail"]
    assert {states[d]["state"] for d in DEVS[1:]} == {"skipped"}
    # the agent answers from its second slot; the late report of the bad install changes nothing
    f.report("pi-1", "active", "rolled back to slot a without download")
    f.svc.handle(topics.reported("pi-1"), messages.Reported(dep["id"], new, "active").encode(), f.clock())
    assert {d["device_id"]: d["state"] for d in f.store.deployment(dep["id"])["devices"]}["pi-1"] == "rolled_back"
    f.svc.handle(topics.status("pi-1"), messages.Status(
        state="online", connection="c-pi-1", active=messages.ActiveModel(old_dep, old, "m", "1")).encode(), f.clock())
    text = " ".join(f.svc.rollouts.show(rid)["summary"])
    assert ("Rolled back because m 3 answered more slowly than the previous model on the canary (pi-1): p95 latency "
            "3.94 ms vs 0.989 ms with m 1 on the same device before (+298%; max +20%).") in text
    assert "If that is acceptable, push it again with a looser limit (--gate p95=...) or without the gate " \
           "(--gate p95=off)." in text
    assert view["reason"].startswith("the canary (pi-1) failed the p95 latency gate: p95 latency 3.94 ms vs 0.989 ms")
    assert "Returned to their previous model: pi-1 (back on m 1)" in text
    assert "Never received m 3: pi-2, pi-3, pi-4." in text
    f.clock.tick(60)
    assert f.svc.rollouts.tick() == 0  # final: nothing to advance


def test_the_baseline_is_the_previous_model_not_a_slow_one_rolled_back_meanwhile(fleet: Fleet) -> None:
    f = fleet
    old = on_old(f)
    for d in DEVS:
        f.telemetry(d, old, 100, 1.0)
    f.clock.tick(30)

    def canary(version: str, ms: float) -> dict:
        new = f.upload(version)
        rid = f.svc.create_deployment(new, "all", Strategy(canary=1, waves=(0.5,), soak_s=10),
                                      Gates(min_inferences=10))["rollout"]["id"]
        f.clock.tick(1)
        f.report("pi-1", "active")
        f.svc.rollouts.tick()
        f.clock.tick(5)
        f.telemetry("pi-1", new, 100, ms)
        f.clock.tick(5)
        f.svc.rollouts.tick()
        return f.svc.rollouts.show(rid)

    assert canary("3", 3.2)["phase"] == "rolled_back"  # pi-1 ran the slow model for a while
    f.report("pi-1", "active", "rolled back to slot a without download")
    f.clock.tick(10)
    # 2.5 ms is +150 % over the previous model (1 ms), though faster than the slow one (3.2 ms)
    view = canary("4", 2.5)
    assert view["phase"] == "rolled_back", view["summary"]
    (p95,) = [g for g in view["gate_results"] if g["gate"] == "p95_latency"]
    assert not p95["passed"] and "p95 latency 2.48 ms vs 0.989 ms with m 1 on the same device before (+151%" \
        in p95["detail"], p95


def test_a_failed_smoke_test_stops_at_the_canary(fleet: Fleet) -> None:
    f = fleet
    old = on_old(f)
    new = f.upload("4")
    dep = f.svc.create_deployment(new, "all", Strategy(canary=2, waves=(), soak_s=10))
    f.clock.tick(1)
    f.report("pi-1", "active")
    f.report("pi-2", "failed", "bundle m 4 failed on this device: sample output differs")
    f.svc.rollouts.tick()
    view = f.svc.rollouts.show(dep["rollout"]["id"])
    assert view["phase"] == "rolled_back"
    # the agent's own words say why, in the reason and in the operator's summary
    assert view["reason"] == ("the canary (pi-1, pi-2) failed the install and smoke test gate: 1 of 2 device(s) failed "
                              "to install or smoke-test: pi-2 (bundle m 4 failed on this device: sample output differs)")
    assert ("Rolled back because m 4 did not install on the canary (pi-1, pi-2): 1 of 2 device(s) failed to install or "
            "smoke-test: pi-2 (bundle m 4 failed on this device: sample output differs).") in view["summary"]
    assert [f.store.desired(d).artifact for d in DEVS] == [old] * 4


def test_an_offline_canary_times_out_and_a_newer_deployment_always_wins(fleet: Fleet) -> None:
    f = fleet
    old = on_old(f)
    new = f.upload("5")
    dep = f.svc.create_deployment(new, "all", Strategy(canary=1, waves=(0.5,), soak_s=10, install_timeout_s=30))
    f.clock.tick(31)
    f.svc.rollouts.tick()
    view = f.svc.rollouts.show(dep["rollout"]["id"])
    assert view["phase"] == "rolled_back" and "no device of the wave answered within 30 s" in view["reason"]
    assert "Did not answer within 30 s (offline?): pi-1." in view["summary"]
    # a paused rollout never wedges its devices: a plain deployment supersedes it
    dep2 = f.svc.create_deployment(new, "all", Strategy(canary=1, waves=(), soak_s=10))
    f.svc.rollouts.advance(dep2["rollout"]["id"], cmd="pause")
    f.svc.create_deployment(old, "device:pi-4")
    view = f.svc.rollouts.show(dep2["rollout"]["id"])
    assert view["phase"] == "superseded" and "superseded by d-" in view["reason"]
    states = {d["device_id"]: d["state"] for d in f.store.deployment(dep2["id"])["devices"]}
    assert (states["pi-2"], states["pi-4"]) == ("skipped", "superseded")
    assert f.svc.rollouts.tick() == 0


def test_operator_commands_and_a_restart_resume_from_the_database(fleet: Fleet) -> None:
    f = fleet
    on_old(f)
    new = f.upload("6")
    rid = f.svc.create_deployment(new, "all", Strategy(canary=1, waves=(), soak_s=10))["rollout"]["id"]
    f.clock.tick(1)
    f.report("pi-1", "active")
    f.svc.rollouts.tick()
    assert f.svc.rollouts.advance(rid, cmd="pause")["phase"] == "paused"
    with pytest.raises(RolloutError, match="only a running rollout can be paused"):
        f.svc.rollouts.advance(rid, cmd="pause")
    f.clock.tick(60)
    assert f.svc.rollouts.tick() == 0  # paused: not advanced
    f.restart()  # the server restarts: the rollout comes back from the database
    f.pub.sent.clear()
    assert f.svc.rollouts.resume() == 1 and f.desired_sent("pi-1")[-1].artifact == new
    assert f.svc.rollouts.advance(rid, cmd="resume")["phase"] == "soaking"
    f.clock.tick(5)
    f.telemetry("pi-1", new, 30, 1.0)
    f.clock.tick(5)
    f.svc.rollouts.tick()
    assert f.svc.rollouts.show(rid)["wave"] == 1
    f.all_active(DEVS[1:])
    f.svc.rollouts.tick()
    f.clock.tick(30)
    f.svc.rollouts.tick()
    assert f.svc.rollouts.show(rid)["phase"] == "completed"
    back = f.svc.rollouts.advance(rid, cmd="rollback")
    assert back["phase"] == "rolled_back"
    assert ("Rolled back by an operator (edgectl rollout rollback): every device it changed returns to its "
            "previous model.") in f.svc.rollouts.show(rid)["summary"]
    assert {d.artifact for d in (f.store.desired(x) for x in DEVS)} != {new}
    assert f.svc.rollouts.list()[0]["id"] == rid


def test_bad_strategies_are_refused_in_words(fleet: Fleet) -> None:
    f = fleet
    on_old(f)
    new = f.upload("7")
    with pytest.raises(DeployError, match="matches no known device"):
        f.svc.create_deployment(new, "group:nobody", Strategy())
    with pytest.raises(RolloutError, match="wave size"):
        Strategy(waves=(1.5,))


def test_the_http_api_creates_shows_and_controls_rollouts(fleet: Fleet) -> None:
    from fastapi.testclient import TestClient

    from server.api import create_app

    f = fleet
    on_old(f)
    new = f.upload("8")
    token = "t" * 24
    with TestClient(create_app(f.svc, tokens=[token]), headers={"authorization": f"Bearer {token}"}) as http:
        bad = http.post("/v1/deployments", json={"artifact": new, "selector": "all", "strategy": {"canary": 1.5}})
        assert bad.status_code == 400 and "wave size 1.5" in bad.json()["detail"]
        bad = http.post("/v1/deployments", json={"artifact": new, "selector": "all", "gates": {"max_error_rate": 2}})
        assert bad.status_code == 422 and "gates.max_error_rate" in bad.json()["detail"]
        res = http.post("/v1/deployments", json={
            "artifact": new, "selector": "all", "strategy": {"canary": 0.25, "waves": [0.5], "soak_s": 5},
            "gates": {"max_p95_regression": 0.5, "max_error_rate": None, "min_inferences": 5}})
        assert res.status_code == 201, res.text
        ro = res.json()["rollout"]
        assert ro["gates"]["max_p95_regression"] == 0.5 and ro["gates"]["max_error_rate"] is None
        assert ro["gates"]["min_availability"] == 0.9  # not given: the default
        assert http.get("/v1/rollouts").json()[0]["id"] == ro["id"]
        view = http.get(f"/v1/rollouts/{res.json()['id']}").json()  # by deployment id
        assert view["id"] == ro["id"] and view["devices"][0]["wave_label"] == "canary"
        assert http.post(f"/v1/rollouts/{ro['id']}/pause").json()["phase"] == "paused"
        again = http.post(f"/v1/rollouts/{ro['id']}/pause")
        assert again.status_code == 409 and "only a running rollout can be paused" in again.json()["detail"]
        assert http.post(f"/v1/rollouts/{ro['id']}/explode").status_code == 422
        assert http.get("/v1/rollouts/r-nope").status_code == 404
        done = http.post(f"/v1/rollouts/{ro['id']}/abort").json()
        assert done["phase"] == "aborted" and "Aborted by an operator" in " ".join(done["summary"])
        assert http.post(f"/v1/rollouts/{ro['id']}/rollback").json()["phase"] == "rolled_back"


def variant_bundle(tmp: Path, version: str) -> bytes:
    """float16 (the default, 4 KB) and int8 (1 KB) variants of one model."""
    import numpy as np

    from sdk.protocol import frames
    from sdk.protocol.bundle import tensor_spec, write_bundle

    io = {"inputs": [tensor_spec("x", [1, 4], "float32")], "outputs": [tensor_spec("y", [1, 2], "float32")]}
    z_in, z_out = frames.tensor_to_npy(np.zeros((1, 4), np.float32)), frames.tensor_to_npy(np.zeros((1, 2), np.float32))

    def sample(q: str) -> dict[str, object]:
        return {"input": f"in-{q}.npy", "output": f"out-{q}.npy", "atol": 1e-3, "rtol": 1e-3}

    manifest = {"name": "v", "version": version, "quantization": "float16", "model": {"file": "model.tflite", **io},
                "sample": sample("float16"),
                "variants": [{"file": "model.tflite", "quantization": "float16", **io, "sample": sample("float16")},
                             {"file": "model-int8.tflite", "quantization": "int8", **io, "sample": sample("int8")}]}
    files = {"model.tflite": b"f" * 4096 + version.encode(), "model-int8.tflite": b"i" * 1024 + version.encode(),
             "in-float16.npy": z_in, "out-float16.npy": z_out, "in-int8.npy": z_in, "out-int8.npy": z_out}
    path = tmp / f"variants-{version}.bundle"
    write_bundle(path, manifest, files)
    return path.read_bytes()


def test_each_device_gets_the_variant_its_profile_prefers(fleet: Fleet) -> None:
    f = fleet
    for dev, profile in (("pi-1", "jetson-nano"), ("pi-2", "raspberry-pi-4"), ("pi-3", "coral-dev-board"), ("pi-4", "")):
        f.svc.handle(topics.status(dev), messages.Status(state="online", profile=profile, connection=f"c-{dev}").encode(),
                     f.clock())
    art, _ = f.svc.add_artifact(variant_bundle(f.tmp, "1"))
    dep = f.svc.create_deployment(art["sha256"], "all")
    v = dep["variants"]
    assert (v["pi-1"]["file"], v["pi-1"]["why"]) == ("", "jetson-nano prefers float16")
    assert (v["pi-2"]["file"], v["pi-2"]["why"]) == ("model-int8.tflite", "raspberry-pi-4 prefers int8")
    assert v["pi-3"]["quantization"] == "int8"
    assert v["pi-4"]["why"] == "no profile: the default model (float16)"
    assert [f.desired_sent(d)[-1].file for d in DEVS] == ["", "model-int8.tflite", "model-int8.tflite", ""]


def test_a_device_class_missing_its_latency_slo_moves_to_the_smaller_variant(fleet: Fleet) -> None:
    f = fleet
    for dev, profile in (("pi-1", "jetson-nano"), ("pi-2", "raspberry-pi-4"), ("pi-3", "jetson-nano"), ("pi-4", "")):
        f.svc.handle(topics.status(dev), messages.Status(state="online", profile=profile, connection=f"c-{dev}").encode(),
                     f.clock())
    old = f.upload("1")
    f.svc.create_deployment(old, "all")
    f.all_active(DEVS)
    with pytest.raises(DeployError, match="downgrade needs a bundle with variants"):
        f.svc.create_deployment(old, "all", Strategy(latency_slo_ms=5, downgrade=True))
    art, _ = f.svc.add_artifact(variant_bundle(f.tmp, "2"))
    new = art["sha256"]
    dep = f.svc.create_deployment(new, "all", Strategy(canary=1, waves=(0.5,), soak_s=10, latency_slo_ms=5,
                                                       downgrade=True), Gates(min_inferences=10))
    rid = dep["rollout"]["id"]
    assert f.desired_sent("pi-1")[-1].file == ""  # jetson-nano: float16, the default file
    f.clock.tick(1)
    f.report("pi-1", "active")
    f.svc.rollouts.tick()
    f.clock.tick(5)
    f.telemetry("pi-1", new, 100, 8.0)  # over the 5 ms SLO on float16
    f.clock.tick(5)
    f.svc.rollouts.tick()
    view = f.svc.rollouts.show(rid)
    assert view["phase"] == "installing" and view["wave"] == 0  # the wave installs again, smaller
    assert f.desired_sent("pi-1")[-1].file == "model-int8.tflite"
    assert f.store.deployment(dep["id"])["devices"][0]["state"] == "pending"
    moved = " ".join(view["summary"])
    assert ("Moved jetson-nano (pi-1, pi-3) from float16 (model.tflite) to int8 (model-int8.tflite): "
            "p95 9.89 ms over the 5 ms SLO.") in moved  # 8 ms samples: the histogram bucket's estimate
    assert "missed the 5 ms p95 SLO on float16 (model.tflite)" in view["history"][-1]
    f.clock.tick(1)
    f.report("pi-1", "active")
    f.svc.rollouts.tick()
    f.clock.tick(5)
    f.telemetry("pi-1", new, 100, 3.0)
    f.clock.tick(5)
    f.svc.rollouts.tick()
    view = f.svc.rollouts.show(rid)
    assert view["phase"] == "installing" and view["wave"] == 1
    sent = {d: f.desired_sent(d)[-1] for d in ("pi-2", "pi-3")}
    assert {d: (m.artifact, m.file) for d, m in sent.items()} == {"pi-2": (new, "model-int8.tflite"),
                                                                  "pi-3": (new, "model-int8.tflite")}
    assert view["variants"]["devices"]["pi-3"]["why"].startswith("jetson-nano (pi-1) missed the 5 ms p95 SLO")
    assert view["variants"]["devices"]["pi-4"]["file"] == ""  # no profile: untouched

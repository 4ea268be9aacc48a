"""The rollout engine as a pure state machine: every transition, gates at their boundaries,
restart from stored data. No broker, no database."""

from __future__ import annotations

import json

import pytest

from sdk.protocol import histogram
from server.rollout import (
    Assign,
    Gates,
    Health,
    Observation,
    Phase,
    Revert,
    RolloutError,
    Strategy,
    command,
    evaluate_gates,
    new_rollout,
    p95_bounds,
    plan_waves,
    step,
)

DEVICES = [f"d{i}" for i in range(10)]
PREV = dict.fromkeys(DEVICES, "old")
GOOD = Health(inferences=500, errors=2, p95_ms=5.0, availability=1.0)
BASE = Health(inferences=500, errors=2, p95_ms=5.0, availability=1.0)


def states(devices, value: str) -> dict[str, str]:
    return dict.fromkeys(devices, value)


@pytest.mark.parametrize(("canary", "waves", "expected"), [
    (1, (0.5,), [1, 5, 4]),
    (2, (3, 3), [2, 3, 3, 2]),
    (0.1, (), [1, 9]),
    (0, (), [10]),
    (1, (0.5, 0.99), [1, 5, 4]),  # the last wave only takes what is left
    (20, (), [10]),
])
def test_plan_waves(canary: float, waves: tuple[float, ...], expected: list[int]) -> None:
    plan = plan_waves(DEVICES, Strategy(canary=canary, waves=waves))
    assert [len(w) for w in plan] == expected
    assert [d for w in plan for d in w] == DEVICES


def test_invalid_strategies_are_refused() -> None:
    with pytest.raises(RolloutError):
        Strategy(canary=1.5)
    with pytest.raises(RolloutError):
        Strategy(soak_s=-1)
    with pytest.raises(RolloutError):
        plan_waves([], Strategy())


def run_good_rollout() -> list:
    r = new_rollout("r1", "new", DEVICES, PREV, Strategy(canary=1, waves=(0.5,), soak_s=60))
    r, acts = step(r, Observation(now=0))
    assert r.phase == Phase.INSTALLING and acts == [Assign(("d0",), "new")]
    seen = [r.phase]
    t = 0.0
    for wave in r.waves:
        t += 5
        r, acts = step(r, Observation(now=t, device_states=states(wave, "downloading")))
        assert r.phase == Phase.INSTALLING and acts == []
        t += 5
        r, acts = step(r, Observation(now=t, device_states=states(wave, "active")))
        assert r.phase == Phase.SOAKING and acts == []
        r, acts = step(r, Observation(now=t + 59, wave_health=GOOD, baseline=BASE))
        assert r.phase == Phase.SOAKING and acts == []  # soak not over
        t += 60
        r, acts = step(r, Observation(now=t, wave_health=GOOD, baseline=BASE))
        seen.append(r.phase)
        if r.phase == Phase.INSTALLING:
            assert acts == [Assign(r.waves[r.wave], "new")]
    assert r.phase == Phase.COMPLETED and set(r.assigned) == set(DEVICES)
    return [r, seen]


def test_a_good_model_goes_canary_then_waves_then_completes() -> None:
    r, seen = run_good_rollout()
    assert seen == [Phase.INSTALLING, Phase.INSTALLING, Phase.INSTALLING, Phase.COMPLETED]
    assert "completed on 10 device(s)" in r.history[-1]


def test_a_smoke_test_failure_stops_at_the_canary_and_reverts_it() -> None:
    r = new_rollout("r1", "new", DEVICES, PREV, Strategy(canary=2, waves=(0.5,)))
    r, _ = step(r, Observation(now=0))
    r, acts = step(r, Observation(now=3, device_states={"d0": "active", "d1": "failed"},
                                  device_details={"d1": "smoke test failed: output differs by 1.0"}))
    assert r.phase == Phase.ROLLED_BACK
    assert acts == [Revert((("d0", "old"), ("d1", "old")))]
    assert r.reason == ("the canary (d0, d1) failed the install and smoke test gate: 1 of 2 device(s) failed to "
                        "install or smoke-test: d1 (smoke test failed: output differs by 1.0)")
    assert not set(r.assigned) - {"d0", "d1"}  # nobody outside the canary got the model
    assert step(r, Observation(now=100)) == (r, [])  # final


def test_the_install_failure_gate_at_its_boundary() -> None:
    gates = Gates(max_install_failure_ratio=0.5)
    r = new_rollout("r1", "new", DEVICES[:4], PREV, Strategy(canary=0, waves=()), gates)
    r, _ = step(r, Observation(now=0))
    r2, _ = step(r, Observation(now=1, device_states={"d0": "failed", "d1": "failed", "d2": "active", "d3": "active"}))
    assert r2.phase == Phase.SOAKING  # 2/4 = 0.5 is allowed
    r3, _ = step(r, Observation(now=1, device_states={"d0": "failed", "d1": "failed", "d2": "failed", "d3": "active"}))
    assert r3.phase == Phase.ROLLED_BACK


def test_offline_devices_time_out_into_a_clear_state_and_never_wedge() -> None:
    r = new_rollout("r1", "new", DEVICES[:3], PREV, Strategy(canary=0, waves=(), install_timeout_s=30, soak_s=0))
    r, _ = step(r, Observation(now=0))
    r, _ = step(r, Observation(now=29, device_states={"d0": "active", "d1": "active"}))
    assert r.phase == Phase.INSTALLING
    r, _ = step(r, Observation(now=30, device_states={"d0": "active", "d1": "active"}))
    assert r.phase == Phase.SOAKING and r.device_states["d2"] == "timeout"
    assert "timed out (offline?): d2" in r.history[-1]
    # a wave where nobody answers rolls back instead of soaking forever
    r = new_rollout("r2", "new", DEVICES[:2], PREV, Strategy(canary=0, waves=(), install_timeout_s=30))
    r, _ = step(r, Observation(now=0))
    r, acts = step(r, Observation(now=31))
    assert r.phase == Phase.ROLLED_BACK and "no device of the wave answered" in r.reason
    assert acts == [Revert((("d0", "old"), ("d1", "old")))]


def slow_wave(p95: float) -> tuple:
    r = new_rollout("r1", "new", DEVICES, PREV, Strategy(canary=1, waves=(0.5,), soak_s=10))
    r, _ = step(r, Observation(now=0))
    r, _ = step(r, Observation(now=1, device_states={"d0": "active"}))
    return step(r, Observation(now=11, wave_health=Health(inferences=100, errors=0, p95_ms=p95, availability=1.0),
                               baseline=BASE))


def test_the_latency_gate_at_its_boundary_and_a_3x_slower_model() -> None:
    r, acts = slow_wave(6.0)  # +20 % exactly: allowed
    assert r.phase == Phase.INSTALLING and r.wave == 1
    r, acts = slow_wave(15.0)  # 3x slower
    assert r.phase == Phase.ROLLED_BACK and acts == [Revert((("d0", "old"),))]
    assert r.reason == "the canary (d0) failed the p95 latency gate: p95 latency 15 ms vs 5 ms before (+200%; max +20%)"
    failed = [g for g in r.gate_results if not g.passed]
    assert [g.gate for g in failed] == ["p95_latency"] and failed[0].value == pytest.approx(2.0)


@pytest.mark.parametrize(("health", "base_errors", "gate"), [
    (Health(inferences=100, errors=6, p95_ms=5, availability=1), 5, "error_rate"),
    (Health(inferences=100, errors=5, p95_ms=5, availability=1), 2, "error_rate_increase"),
    (Health(inferences=100, errors=0, p95_ms=5, availability=0.89), 2, "availability"),
    (Health(inferences=100, errors=0, p95_ms=5, availability=1, accuracy=0.80, labelled=50), 2, "accuracy_drop"),
])
def test_each_gate_trips(health: Health, base_errors: int, gate: str) -> None:
    base = Health(inferences=100, errors=base_errors, p95_ms=5, availability=1, accuracy=0.95, labelled=50)
    results = {g.gate: g for g in evaluate_gates(Gates(), health, base)}
    assert not results[gate].passed
    assert all(g.passed for name, g in results.items() if name != gate)


def test_too_little_traffic_is_not_judged_and_says_so() -> None:
    results = evaluate_gates(Gates(min_inferences=20), Health(inferences=5, errors=5, p95_ms=100), BASE)
    assert all(g.passed for g in results)
    assert any("not judged: 5 inferences" in g.detail for g in results)


def test_operator_commands() -> None:
    r = new_rollout("r1", "new", DEVICES, PREV, Strategy(soak_s=10))
    r, _ = step(r, Observation(now=0))
    p, _ = command(r, "pause", now=1)
    assert p.phase == Phase.PAUSED and step(p, Observation(now=100, device_states=states(DEVICES, "active")))[1] == []
    with pytest.raises(RolloutError, match="not paused"):
        command(r, "resume", now=2)
    q, _ = command(p, "resume", now=50)
    assert q.phase == Phase.INSTALLING and q.phase_since == 50
    rb, acts = command(q, "rollback", now=51)
    assert rb.phase == Phase.ROLLED_BACK and acts == [Revert((("d0", "old"),))]
    a, acts = command(q, "abort", now=52)
    assert a.phase == Phase.ABORTED and acts == []
    with pytest.raises(RolloutError, match="already aborted"):
        command(a, "abort", now=53)
    s, _ = command(q, "supersede", now=54)
    assert s.phase == Phase.SUPERSEDED
    with pytest.raises(RolloutError, match="unknown rollout command"):
        command(q, "explode", now=55)


def test_a_stored_rollout_resumes_exactly_after_a_restart() -> None:
    r = new_rollout("r1", "new", DEVICES, PREV, Strategy(canary=1, waves=(0.5,), soak_s=10))
    r, _ = step(r, Observation(now=0))
    r, _ = step(r, Observation(now=1, device_states={"d0": "active"}))
    stored = json.dumps(r.to_dict())  # what the server writes to its database
    back = type(r).from_dict(json.loads(stored))
    assert back == r
    a = step(r, Observation(now=11, wave_health=GOOD, baseline=BASE))
    b = step(back, Observation(now=11, wave_health=GOOD, baseline=BASE))
    assert a == b and a[0].wave == 1


def test_rollback_scope_wave_reverts_only_the_failing_wave() -> None:
    r = new_rollout("r1", "new", DEVICES[:4], PREV, Strategy(canary=1, waves=(), soak_s=0, rollback_scope="wave"))
    r, _ = step(r, Observation(now=0))
    r, _ = step(r, Observation(now=1, device_states={"d0": "active"}))
    r, _ = step(r, Observation(now=1, wave_health=GOOD, baseline=BASE))
    assert r.wave == 1
    r, acts = step(r, Observation(now=2, device_states={"d1": "failed", "d2": "active", "d3": "active"}))
    assert r.phase == Phase.ROLLED_BACK and acts == [Revert((("d1", "old"), ("d2", "old"), ("d3", "old")))]


def test_a_sub_millisecond_p95_change_is_noise_not_a_regression() -> None:
    base = Health(inferences=500, errors=0, p95_ms=0.10, availability=1.0)
    tiny = {g.gate: g for g in evaluate_gates(Gates(), Health(inferences=500, p95_ms=0.25, availability=1), base)}
    assert tiny["p95_latency"].passed and "passed: only +0.15 ms (< 0.5 ms)" in tiny["p95_latency"].detail
    strict = {g.gate: g for g in evaluate_gates(Gates(min_p95_increase_ms=0), Health(inferences=500, p95_ms=0.25,
                                                                                      availability=1), base)}
    assert not strict["p95_latency"].passed


def test_a_quiet_wave_soaks_longer_but_never_wedges() -> None:
    r = new_rollout("r1", "new", DEVICES[:2], PREV, Strategy(canary=0, waves=(), soak_s=10, max_soak_factor=3))
    r, _ = step(r, Observation(now=0))
    r, _ = step(r, Observation(now=1, device_states=states(DEVICES[:2], "active")))
    quiet = Health(inferences=5, errors=0, p95_ms=50.0, availability=1.0)
    r2, acts = step(r, Observation(now=11, wave_health=quiet, baseline=BASE))
    assert r2.phase == Phase.SOAKING and acts == []  # 5 < 20 inferences: not judged yet
    r3, _ = step(r, Observation(now=20, wave_health=Health(inferences=40, p95_ms=50.0, availability=1.0), baseline=BASE))
    assert r3.phase == Phase.ROLLED_BACK  # enough traffic arrived: judged (and 10x slower)
    r4, _ = step(r, Observation(now=31, wave_health=quiet, baseline=BASE))
    assert r4.phase == Phase.COMPLETED and "not judged: 5 inferences" in r4.gate_results[0].detail
    with pytest.raises(RolloutError):
        Strategy(max_soak_factor=0.5)


def measured(**latencies: int) -> Health:
    """Health with a real latency histogram: ``measured(_3=280, _6=20)`` is 280 inferences at
    3 ms and 20 at 6 ms."""
    counts = histogram.empty()
    for ms, n in latencies.items():
        counts[histogram.bucket_of(float(ms.lstrip("_").replace("_", ".")))] += n
    return Health(inferences=sum(counts), p95_ms=histogram.quantile(counts, 0.95), availability=1.0,
                  latency_hist=tuple(counts))


def test_a_p95_regression_within_the_sampling_noise_of_few_inferences_is_not_one() -> None:
    before = measured(_3=280, _6=20)  # a shared CPU: 1 inference in 15 is preempted
    # 30 inferences of the same model, 3 of them preempted: the p95 (2nd largest) says +33 %
    noisy = {g.gate: g for g in evaluate_gates(Gates(), measured(_3=27, _7=3), before)}["p95_latency"]
    assert noisy.passed and noisy.value == pytest.approx(0.33, abs=0.01)
    assert "passed: within the sampling noise of 30 vs 300 inferences (at 95% confidence the new p95 may be as " \
           "low as 3.15 ms and the old as high as 5.7 ms)" in noisy.detail
    raw = {g.gate: g for g in evaluate_gates(Gates(p95_confidence=None), measured(_3=27, _7=3), before)}
    assert not raw["p95_latency"].passed  # the point estimates alone would roll it back
    # the same shape over 3000 inferences is no accident: it counts
    many = {g.gate: g for g in evaluate_gates(Gates(), measured(_3=2600, _7=400), measured(_3=2800, _6=200))}
    assert not many["p95_latency"].passed
    # a model 3x slower is caught from 30 inferences (at the low end of its interval, +71 %)
    slow = {g.gate: g for g in evaluate_gates(Gates(), measured(_9=30), before)}["p95_latency"]
    assert not slow.passed and p95_bounds(measured(_9=30), before, 0.95)[:2] == pytest.approx((9.74, 5.70), abs=0.01)
    assert "sampling noise" not in slow.detail
    with pytest.raises(RolloutError, match="p95_confidence 1.0 must be in"):
        Gates(p95_confidence=1.0)

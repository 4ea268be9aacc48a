"""The rollout engine: a pure state machine (data + ``step``), driven by the server's clock and store.

A rollout moves one artifact onto its target devices in waves — canary first, then waves, each
installed, then soaked and judged by health gates against the previous model's cohort — and
rolls back by itself when a gate fails. Nothing here does I/O: the server persists a
:class:`Rollout` (it is plain data), feeds :func:`step` an :class:`Observation` gathered from the
store, and carries out the returned actions (publish desired states). So the engine is tested
without a broker, and a restarted server resumes from the stored rollout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from statistics import NormalDist
from typing import Any

from sdk.protocol import EdgeError, histogram


class RolloutError(EdgeError):
    """A rollout command is impossible in the rollout's current phase, or a strategy is invalid."""


class Phase(StrEnum):
    PENDING = "pending"
    INSTALLING = "installing"
    SOAKING = "soaking"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"


FINAL = frozenset({Phase.COMPLETED, Phase.ROLLED_BACK, Phase.ABORTED, Phase.SUPERSEDED})
#: Device states reported by agents that end an install (see sdk.protocol.messages.AGENT_STATES).
SETTLED = frozenset({"active", "failed"})


@dataclass(frozen=True)
class Strategy:
    """Canary then waves. Sizes ≥ 1 are device counts, sizes in (0, 1) fractions of all targets.

    ``canary=0`` and no waves means all at once. The last wave always takes every remaining device.
    """

    canary: float = 1
    waves: tuple[float, ...] = (0.5,)
    soak_s: float = 60.0
    install_timeout_s: float = 300.0
    #: "all": a failed gate reverts every device this rollout changed; "wave": only the failing wave.
    rollback_scope: str = "all"
    #: Opt-in, for bundles with variants: a device class (profile) whose p95 over a soak exceeds
    #: this SLO is moved to the next smaller variant and the wave soaks again (server.rollouts).
    latency_slo_ms: float | None = None
    downgrade: bool = False
    #: A wave with fewer than ``Gates.min_inferences`` at the end of its soak soaks on, up to
    #: ``soak_s * max_soak_factor``; then its traffic gates pass as "not judged".
    max_soak_factor: float = 3.0

    def __post_init__(self) -> None:
        for size in (self.canary, *self.waves):
            if not (size == 0 or 0 < size < 1 or (size >= 1 and float(size).is_integer())):
                raise RolloutError(f"wave size {size!r} must be 0, a fraction in (0, 1) or a whole count")
        if self.soak_s < 0 or self.install_timeout_s <= 0 or self.max_soak_factor < 1:
            raise RolloutError("soak_s must be >= 0, install_timeout_s > 0 and max_soak_factor >= 1")
        if self.rollback_scope not in ("all", "wave"):
            raise RolloutError("rollback_scope must be 'all' or 'wave'")
        if self.latency_slo_ms is not None and not self.latency_slo_ms > 0:
            raise RolloutError("latency_slo_ms must be > 0")
        if self.downgrade and self.latency_slo_ms is None:
            raise RolloutError("downgrade needs latency_slo_ms: the SLO a device class must meet")


@dataclass(frozen=True)
class Gates:
    """Health gates checked at the end of each wave's soak window. ``None`` disables a gate."""

    max_install_failure_ratio: float = 0.0
    max_error_rate: float | None = 0.05
    max_error_rate_increase: float | None = 0.02
    max_p95_regression: float | None = 0.20
    #: A p95 regression also has to add at least this much (ms) to fail: on sub-millisecond
    #: models +20 % is scheduler noise and histogram resolution (buckets are 26 % wide).
    min_p95_increase_ms: float = 0.5
    #: ... and hold at this confidence given how many inferences each side measured: the new
    #: p95 is taken at the low end of its confidence interval and the previous one at the high
    #: end (order statistics on the merged histograms). A p95 from 30 inferences is the 2nd
    #: largest of them and moves by +-30 % between windows of the same model on a shared CPU;
    #: a model 3x slower is still caught. ``None`` compares the two p95s as measured.
    p95_confidence: float | None = 0.95
    min_availability: float | None = 0.90
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = 0.02
    #: Below this many inferences in the soak window, traffic gates are not judged (and say so).
    min_inferences: int = 20

    def __post_init__(self) -> None:
        if self.p95_confidence is not None and not 0.5 <= self.p95_confidence < 1:
            raise RolloutError(f"p95_confidence {self.p95_confidence!r} must be in [0.5, 1) (e.g. 0.95), or None")


@dataclass(frozen=True)
class Health:
    """Measured over a soak window for a set of devices (merged histograms, sessions, feedback)."""

    inferences: int = 0
    errors: int = 0
    p95_ms: float | None = None
    availability: float | None = None
    accuracy: float | None = None
    labelled: int = 0
    #: Merged latency histogram (``sdk.protocol.histogram`` buckets) behind ``p95_ms``, if known.
    latency_hist: tuple[int, ...] | list[int] | None = None
    #: How gate details name a baseline: "vs 3.9 ms {label}" (which model, which devices, when).
    label: str = "before"

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None


@dataclass(frozen=True)
class Observation:
    """What the server knows at ``now``: agents' reported states and the current wave's health."""

    now: float
    device_states: dict[str, str] = field(default_factory=dict)
    wave_health: Health | None = None
    baseline: Health | None = None
    #: What devices of the wave said with their state (why an install or smoke test failed).
    device_details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass(frozen=True)
class Assign:
    """Publish the rollout's artifact as desired state for these devices."""

    devices: tuple[str, ...]
    artifact: str


@dataclass(frozen=True)
class Revert:
    """Publish each device's previous artifact (kept in the agent's second slot) as desired state."""

    devices: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class Rollout:
    id: str
    artifact: str
    waves: tuple[tuple[str, ...], ...]
    previous: dict[str, str | None]
    strategy: Strategy = field(default_factory=Strategy)
    gates: Gates = field(default_factory=Gates)
    phase: Phase = Phase.PENDING
    wave: int = 0
    phase_since: float = 0.0
    paused_from: Phase | None = None
    device_states: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    gate_results: tuple[GateResult, ...] = ()
    history: tuple[str, ...] = ()

    @property
    def assigned(self) -> tuple[str, ...]:
        """Devices this rollout has told to install its artifact so far."""
        if self.phase == Phase.PENDING:
            return ()
        return tuple(d for w in self.waves[: self.wave + 1] for d in w)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "artifact": self.artifact, "phase": self.phase.value, "wave": self.wave,
            "waves": [list(w) for w in self.waves], "previous": dict(self.previous),
            "strategy": vars(self.strategy) | {"waves": list(self.strategy.waves)},
            "gates": vars(self.gates).copy(), "phase_since": self.phase_since,
            "paused_from": self.paused_from.value if self.paused_from else None,
            "device_states": dict(self.device_states), "reason": self.reason,
            "gate_results": [vars(g).copy() for g in self.gate_results], "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollout:
        return cls(
            id=d["id"], artifact=d["artifact"], waves=tuple(tuple(w) for w in d["waves"]),
            previous=dict(d["previous"]),
            strategy=Strategy(**(d["strategy"] | {"waves": tuple(d["strategy"]["waves"])})),
            gates=Gates(**d["gates"]), phase=Phase(d["phase"]), wave=d["wave"], phase_since=d["phase_since"],
            paused_from=Phase(d["paused_from"]) if d.get("paused_from") else None,
            device_states=dict(d["device_states"]), reason=d["reason"],
            gate_results=tuple(GateResult(**g) for g in d["gate_results"]), history=tuple(d["history"]),
        )


def plan_waves(targets: list[str], strategy: Strategy) -> tuple[tuple[str, ...], ...]:
    """Split targets (in the given order) into canary + waves; never an empty wave."""
    n = len(targets)
    if n == 0:
        raise RolloutError("a rollout needs at least one target device")

    def size(s: float) -> int:
        return min(n, int(s) if s >= 1 else max(1, math.ceil(s * n))) if s else 0

    waves: list[tuple[str, ...]] = []
    i = 0
    for s in (strategy.canary, *strategy.waves):
        k = size(s)
        if k and i < n:
            waves.append(tuple(targets[i : i + k]))
            i += k
    if i < n:
        waves.append(tuple(targets[i:]))
    return tuple(waves)


def new_rollout(rollout_id: str, artifact: str, targets: list[str], previous: dict[str, str | None],
                strategy: Strategy | None = None, gates: Gates | None = None) -> Rollout:
    strategy = strategy or Strategy()
    return Rollout(id=rollout_id, artifact=artifact, waves=plan_waves(targets, strategy),
                   previous={d: previous.get(d) for d in targets}, strategy=strategy, gates=gates or Gates())


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.3g}"


def p95_bounds(new: Health, before: Health, confidence: float) -> tuple[float, float, int, int] | None:
    """The new p95 at the low end and the previous one at the high end of their one-sided
    ``confidence`` intervals, and the inferences behind each; None without both histograms.

    The p95 of n samples is their order statistic at rank 0.95 n, which is uncertain by about
    z * sqrt(0.95 * 0.05 * n) ranks (normal approximation of the binomial)."""
    if not new.latency_hist or not before.latency_hist:
        return None
    n, m = sum(new.latency_hist), sum(before.latency_hist)
    if not n or not m:
        return None
    z = NormalDist().inv_cdf(confidence)
    lo = histogram.quantile(new.latency_hist, max(0.0, 0.95 - z * math.sqrt(0.95 * 0.05 / n)))
    hi = histogram.quantile(before.latency_hist, min(1.0, 0.95 + z * math.sqrt(0.95 * 0.05 / m)))
    assert lo is not None and hi is not None
    return lo, hi, n, m


def evaluate_gates(gates: Gates, health: Health | None, baseline: Health | None) -> list[GateResult]:
    """Judge one wave's soak window. Gates without enough data pass, saying why."""
    h = health or Health()
    out: list[GateResult] = []
    enough = h.inferences >= max(1, gates.min_inferences)
    few = f"not judged: {h.inferences} inferences in the soak window (< {gates.min_inferences})"
    if gates.max_error_rate is not None:
        rate = h.error_rate
        ok = not enough or (rate is not None and rate <= gates.max_error_rate)
        out.append(GateResult("error_rate", ok, rate, gates.max_error_rate,
                              few if not enough else f"error rate {_fmt(rate, True)} (max {_fmt(gates.max_error_rate, True)})"))
    if gates.max_error_rate_increase is not None and baseline is not None and baseline.error_rate is not None:
        rate, base = h.error_rate, baseline.error_rate
        inc = None if rate is None else rate - base
        ok = not enough or (inc is not None and inc <= gates.max_error_rate_increase)
        out.append(GateResult("error_rate_increase", ok, inc, gates.max_error_rate_increase,
                              few if not enough else f"error rate {_fmt(rate, True)} vs {_fmt(base, True)} {baseline.label} "
                              f"(max increase {_fmt(gates.max_error_rate_increase, True)})"))
    if gates.max_p95_regression is not None and baseline is not None and baseline.p95_ms:
        reg = None if h.p95_ms is None else h.p95_ms / baseline.p95_ms - 1
        small = h.p95_ms is not None and h.p95_ms - baseline.p95_ms < gates.min_p95_increase_ms
        # a regression as measured, but within what that many inferences can tell apart
        noise = None
        if reg is not None and reg > gates.max_p95_regression and not small and gates.p95_confidence:
            noise = p95_bounds(h, baseline, gates.p95_confidence)
            if noise is not None and (noise[0] / noise[1] - 1 > gates.max_p95_regression
                                      and noise[0] - noise[1] >= gates.min_p95_increase_ms):
                noise = None  # a regression even at the ends of the intervals: it counts
        ok = not enough or (reg is not None and (reg <= gates.max_p95_regression or small or noise is not None))
        detail = few
        if enough and reg is not None:
            detail = (f"p95 latency {_fmt(h.p95_ms)} ms vs {_fmt(baseline.p95_ms)} ms "
                      f"{baseline.label} ({reg:+.0%}; max {gates.max_p95_regression:+.0%})")
            if small and reg > gates.max_p95_regression:
                detail += f", passed: only {h.p95_ms - baseline.p95_ms:+.2g} ms (< {gates.min_p95_increase_ms:g} ms)"  # type: ignore[operator]
            elif noise is not None:
                lo, hi, n, m = noise
                detail += (f", passed: within the sampling noise of {n} vs {m} inferences (at {gates.p95_confidence:.0%} "
                           f"confidence the new p95 may be as low as {_fmt(lo)} ms and the old as high as {_fmt(hi)} ms)")
        out.append(GateResult("p95_latency", ok, reg, gates.max_p95_regression, detail))
    if gates.min_availability is not None:
        av = h.availability
        ok = av is None or av >= gates.min_availability
        out.append(GateResult("availability", ok, av, gates.min_availability,
                              f"availability {_fmt(av, True)} (min {_fmt(gates.min_availability, True)})"))
    if h.accuracy is not None and h.labelled >= gates.min_inferences:
        if gates.min_accuracy is not None:
            out.append(GateResult("accuracy", h.accuracy >= gates.min_accuracy, h.accuracy, gates.min_accuracy,
                                  f"accuracy {_fmt(h.accuracy, True)} on {h.labelled} labelled requests "
                                  f"(min {_fmt(gates.min_accuracy, True)})"))
        if gates.max_accuracy_drop is not None and baseline is not None and baseline.accuracy is not None:
            drop = baseline.accuracy - h.accuracy
            out.append(GateResult("accuracy_drop", drop <= gates.max_accuracy_drop, drop, gates.max_accuracy_drop,
                                  f"accuracy {_fmt(h.accuracy, True)} vs {_fmt(baseline.accuracy, True)} {baseline.label} "
                                  f"(max drop {_fmt(gates.max_accuracy_drop, True)})"))
    return out


#: Gate names in an operator's words ("failed the p95 latency gate").
GATE_WORDS = {"install": "install and smoke test", "error_rate": "error rate",
              "error_rate_increase": "error-rate increase", "p95_latency": "p95 latency",
              "availability": "availability", "accuracy": "accuracy", "accuracy_drop": "accuracy drop"}


def wave_label(r: Rollout, i: int) -> str:
    """"canary" for the first of several waves (when the strategy has a canary), else "wave N"."""
    return "canary" if i == 0 and len(r.waves) > 1 and r.strategy.canary else f"wave {i}"


def _who(r: Rollout, i: int) -> str:
    """"the canary (pi-1)", "wave 2 (pi-4, pi-5)"."""
    label = wave_label(r, i)
    return f"{'the ' if label == 'canary' else ''}{label} ({', '.join(r.waves[i])})"


def _log(r: Rollout, now: float, text: str) -> tuple[str, ...]:
    return (*r.history, f"{datetime.fromtimestamp(now, UTC):%Y-%m-%d %H:%M:%S} {text}")


def _rollback(r: Rollout, obs: Observation, reason: str, results: tuple[GateResult, ...] = ()
              ) -> tuple[Rollout, list[Assign | Revert]]:
    devices = r.waves[r.wave] if r.strategy.rollback_scope == "wave" else r.assigned
    # failed / timed-out devices keep saying so: they never ran the new model
    states = dict(r.device_states) | {d: "reverting" for d in devices
                                      if r.device_states.get(d) not in ("failed", "timeout")}
    nr = replace(r, phase=Phase.ROLLED_BACK, phase_since=obs.now, reason=reason, gate_results=results,
                 device_states=states, history=_log(r, obs.now, f"rolled back {len(devices)} device(s): {reason}"))
    return nr, [Revert(tuple((d, r.previous.get(d)) for d in devices))]


def _start_wave(r: Rollout, i: int, now: float) -> tuple[Rollout, list[Assign | Revert]]:
    devices = r.waves[i]
    states = dict(r.device_states) | dict.fromkeys(devices, "installing")
    nr = replace(r, phase=Phase.INSTALLING, wave=i, phase_since=now, device_states=states,
                 history=_log(r, now, f"{wave_label(r, i)}: installing on {', '.join(devices)}"))
    return nr, [Assign(devices, r.artifact)]


def step(r: Rollout, obs: Observation) -> tuple[Rollout, list[Assign | Revert]]:
    """Advance the rollout as far as ``obs`` allows; return the new rollout and actions to carry out."""
    if r.phase in FINAL or r.phase == Phase.PAUSED:
        return r, []
    if r.phase == Phase.PENDING:
        return _start_wave(r, 0, obs.now)
    wave = r.waves[r.wave]
    states = dict(r.device_states)
    for d in wave:  # obs.device_states holds reports for this rollout's deployment only
        if obs.device_states.get(d):
            states[d] = obs.device_states[d]
    r = replace(r, device_states=states)
    if r.phase == Phase.INSTALLING:
        settled = [d for d in wave if states.get(d) in SETTLED]
        timed_out = obs.now - r.phase_since >= r.strategy.install_timeout_s
        if len(settled) < len(wave) and not timed_out:
            return r, []
        if timed_out:
            late = [d for d in wave if states.get(d) not in SETTLED]
            states |= dict.fromkeys(late, "timeout")
            r = replace(r, device_states=states)
        failed = [d for d in wave if states[d] == "failed"]
        timeouts = [d for d in wave if states[d] == "timeout"]
        ratio = len(failed) / len(wave)
        if ratio > r.gates.max_install_failure_ratio:
            why = ", ".join(f"{d} ({obs.device_details[d][:300]})" if obs.device_details.get(d) else d for d in failed)
            res = GateResult("install", False, ratio, r.gates.max_install_failure_ratio,
                             f"{len(failed)} of {len(wave)} device(s) failed to install or smoke-test: {why}")
            return _rollback(r, obs, f"{_who(r, r.wave)} failed the install and smoke test gate: {res.detail}", (res,))
        if len(timeouts) == len(wave):
            res = GateResult("install", False, 1.0, r.gates.max_install_failure_ratio,
                             f"no device of the wave answered within {r.strategy.install_timeout_s:g} s (offline?): "
                             f"{', '.join(timeouts)}")
            return _rollback(r, obs, f"{_who(r, r.wave)} failed the install and smoke test gate: {res.detail}", (res,))
        note = f"; timed out (offline?): {', '.join(timeouts)}" if timeouts else ""
        return replace(r, phase=Phase.SOAKING, phase_since=obs.now, history=_log(
            r, obs.now, f"{wave_label(r, r.wave)} installed{note}; soaking {r.strategy.soak_s:g} s")), []
    # SOAKING
    soaked = obs.now - r.phase_since
    if soaked < r.strategy.soak_s:
        return r, []
    n = obs.wave_health.inferences if obs.wave_health is not None else 0
    if n < r.gates.min_inferences and soaked < r.strategy.soak_s * r.strategy.max_soak_factor:
        return r, []  # too little traffic to judge yet: soak longer (bounded), never wedge
    results = tuple(evaluate_gates(r.gates, obs.wave_health, obs.baseline))
    failed_gates = [g for g in results if not g.passed]
    if failed_gates:
        reason = f"{_who(r, r.wave)} failed " + "; ".join(
            f"the {GATE_WORDS.get(g.gate, g.gate)} gate: {g.detail}" for g in failed_gates)
        return _rollback(r, obs, reason, results)
    p95 = next((g.detail for g in results if g.gate == "p95_latency"), None)
    r = replace(r, gate_results=results, history=_log(
        r, obs.now, f"{wave_label(r, r.wave)} passed its gates after {soaked:.0f} s ({n} inferences"
                    + (f"; {p95}" if p95 else "") + ")"))
    if r.wave + 1 < len(r.waves):
        return _start_wave(r, r.wave + 1, obs.now)
    return replace(r, phase=Phase.COMPLETED, phase_since=obs.now,
                   history=_log(r, obs.now, f"completed on {len(r.assigned)} device(s)")), []


def reinstall(r: Rollout, now: float, note: str) -> tuple[Rollout, list[Assign | Revert]]:
    """Install the current wave again (its devices were given another variant of the artifact):
    back to INSTALLING, then a fresh soak. ``note`` (why) goes into the history."""
    if r.phase not in (Phase.INSTALLING, Phase.SOAKING):
        raise RolloutError(f"rollout {r.id} is {r.phase.value}; only a wave in progress can be reinstalled")
    devices = r.waves[r.wave]
    states = dict(r.device_states) | dict.fromkeys(devices, "installing")
    return replace(r, phase=Phase.INSTALLING, phase_since=now, device_states=states,
                   history=_log(r, now, note)), [Assign(devices, r.artifact)]


def command(r: Rollout, cmd: str, now: float) -> tuple[Rollout, list[Assign | Revert]]:
    """Operator commands: pause, resume, abort, rollback, supersede."""
    if cmd == "pause":
        if r.phase in FINAL or r.phase == Phase.PAUSED:
            raise RolloutError(f"rollout {r.id} is {r.phase.value}; only a running rollout can be paused")
        return replace(r, phase=Phase.PAUSED, paused_from=r.phase, history=_log(r, now, "paused by operator")), []
    if cmd == "resume":
        if r.phase != Phase.PAUSED:
            raise RolloutError(f"rollout {r.id} is {r.phase.value}, not paused")
        # the soak clock restarts: health seen while paused is not a full window
        return replace(r, phase=r.paused_from or Phase.INSTALLING, paused_from=None, phase_since=now,
                       history=_log(r, now, "resumed by operator")), []
    if cmd == "abort":
        if r.phase in FINAL:
            raise RolloutError(f"rollout {r.id} is already {r.phase.value}")
        return replace(r, phase=Phase.ABORTED, phase_since=now, reason="aborted by operator; devices keep what they run",
                       history=_log(r, now, "aborted by operator")), []
    if cmd == "rollback":
        if r.phase in (Phase.ROLLED_BACK, Phase.SUPERSEDED, Phase.PENDING):
            raise RolloutError(f"rollout {r.id} is {r.phase.value}; nothing to roll back")
        return _rollback(replace(r, strategy=replace(r.strategy, rollback_scope="all")),
                         Observation(now=now), "rolled back by operator")
    if cmd == "supersede":
        if r.phase in FINAL:
            return r, []
        return replace(r, phase=Phase.SUPERSEDED, phase_since=now, reason="superseded by a newer rollout",
                       history=_log(r, now, "superseded by a newer rollout")), []
    raise RolloutError(f"unknown rollout command {cmd!r}: use pause, resume, abort or rollback")

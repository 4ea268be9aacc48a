"""Rollouts wired to the store and the broker: the I/O around the pure engine (``server.rollout``).

A gated deployment is created *staged*: every target keeps its current desired state until the
engine assigns its wave. :meth:`Rollouts.advance` is the only place a rollout changes: load it
from the store, build an :class:`~server.rollout.Observation` from reported states and telemetry
(health of the new artifact on the wave's devices over the soak window, against the previous
model on the same devices before the wave, else the devices still waiting for their wave), call
``step`` (or an operator ``command``), store the result together with its effect on desired
states in one transaction, then publish those desired states. The server's periodic loop calls
:meth:`Rollouts.tick`; tests call it with an injected clock. Nothing lives outside the database,
so a restarted server carries on where it stopped.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sdk.protocol.errors import DeployError, EdgeError

from . import variants
from .rollout import (
    FINAL,
    GATE_WORDS,
    Assign,
    Gates,
    Health,
    Observation,
    Phase,
    Revert,
    Rollout,
    RolloutError,
    Strategy,
    command,
    new_rollout,
    reinstall,
    step,
    wave_label,
)

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("edgectl.server.rollouts")

#: Phases in which the periodic tick advances a rollout.
RUNNING = (Phase.PENDING.value, Phase.INSTALLING.value, Phase.SOAKING.value)
#: The baseline on the wave's own devices looks back at least this long before their soak.
BASELINE_LOOKBACK_S = 300.0
#: Target states that are no news for the engine (not told yet, or told but silent so far).
_SILENT = ("", "pending", "waiting")


def new_rollout_id() -> str:
    return "r-" + secrets.token_hex(5)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _size(s: float) -> str:
    return f"{s:.0%}" if 0 < s < 1 else f"{s:g}"


def variant_roles(store: Any, manifest: dict[str, Any] | None) -> tuple[Any, dict[str, variants.Choice]]:
    """For a bundle with variants: ``roles`` for ``Store.create_deployment`` giving each target
    the variant its profile prefers, and the choices it made (filled when the store calls it)."""
    choices: dict[str, variants.Choice] = {}
    if not variants.has_variants(manifest):
        return None, choices
    from sdk.protocol.profiles import ProfileError, load_profiles

    try:
        profiles = load_profiles()
    except ProfileError as exc:
        raise DeployError(f"cannot choose variants: {exc}") from None
    profile_of = {d["id"]: d.get("profile") or "" for d in store.devices()}

    def roles(targets: list[str]) -> dict[str, dict[str, Any]]:
        choices.update(variants.choose(manifest, {t: profile_of.get(t, "") for t in targets}, profiles))  # type: ignore[arg-type]
        return {d: {"file": c.file} for d, c in choices.items()}

    return roles, choices


def describe_strategy(s: Strategy) -> str:
    if not s.canary and not s.waves:
        plan = "all at once"
    else:
        plan = " then ".join([f"canary {_size(s.canary)}"] * bool(s.canary) + [_size(w) for w in s.waves]
                             + ["the rest"])
    slo = f"; p95 SLO {s.latency_slo_ms:g} ms{' (a class missing it moves to a smaller variant)' if s.downgrade else ''}" \
        if s.latency_slo_ms else ""
    return f"{plan}; soak {s.soak_s:g} s per wave; install timeout {s.install_timeout_s:g} s{slo}"


class Rollouts:
    """Creates, advances and explains rollouts for a :class:`~server.service.Service`."""

    def __init__(self, service: Service):
        self.service = service
        self.store = service.store
        self._lock = threading.RLock()

    def _now(self) -> datetime:
        return self.service.clock()

    # -- creation ------------------------------------------------------------------------------

    def create(self, artifact: str, selector: str, strategy: Strategy, gates: Gates,
               roles: Any = None, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """A staged deployment plus its rollout; the first wave is assigned right away. A bundle
        with variants gives each device the variant its profile prefers (unless ``roles``)."""
        choices: dict[str, variants.Choice] = {}
        if roles is None:
            roles, choices = variant_roles(self.store, manifest)
        if strategy.downgrade and not variants.has_variants(manifest):
            raise DeployError("downgrade needs a bundle with variants (edgectl compress --variants float16,int8)")
        with self._lock:
            now = self._now()
            kw = {"roles": roles} if roles is not None else {}
            dep = self.store.create_deployment(artifact, selector, self.service.config.chunk_size, now,
                                               staged=True, **kw)
            previous, previous_art = dep.pop("previous"), dep.pop("previous_artifacts")
            online = {d["id"] for d in self.store.devices() if d["online"]}
            # Online devices first: a canary that is switched off would only time out.
            targets = sorted(dep["targets"], key=lambda d: (d not in online, d))
            try:
                r = new_rollout(new_rollout_id(), artifact, targets, previous_art, strategy, gates)
            except RolloutError as exc:
                raise DeployError(str(exc)) from None
            record = {"devices": {d: c.to_dict() for d, c in choices.items()}, "moves": []} if choices else {}
            self.store.add_rollout(r.id, dep["id"], artifact, r.phase.value, r.to_dict(), previous, now, record)
            self.supersede(dep["targets"], by=r.id, except_id=r.id)
            log.info("rollout %s of deployment %s: %d wave(s) over %d device(s) (%s)", r.id, dep["id"],
                     len(r.waves), len(targets), describe_strategy(strategy))
            self.advance(r.id)
        dep["rollout"] = self.show(r.id)
        return dep

    def supersede(self, device_ids: list[str], by: str, except_id: str | None = None) -> list[str]:
        """End every unfinished rollout that targets any of these devices (a newer deployment
        wins); their devices still waiting keep their current model. Returns their ids."""
        ids = set(device_ids)
        done = []
        for row in self.store.rollouts(phases=(*RUNNING, Phase.PAUSED.value)):
            if row["id"] == except_id:
                continue
            r = Rollout.from_dict(row["state"])
            if ids & {d for w in r.waves for d in w}:
                self.advance(row["id"], cmd="supersede", by=by)
                done.append(row["id"])
        return done

    # -- the one place a rollout changes -------------------------------------------------------

    def advance(self, key: str, cmd: str | None = None, by: str = "") -> dict[str, Any]:
        """Step a rollout (or apply an operator command), store it, publish what changed."""
        with self._lock:
            row = self.store.rollout(key)
            r = Rollout.from_dict(row["state"])
            now = self._now()
            files: dict[str, str] = {}
            record: dict[str, Any] | None = None
            if cmd is not None:
                nr, actions = command(r, cmd, now.timestamp())
                if cmd == "supersede" and by:
                    nr = _replace_reason(nr, f"superseded by {by}")
            else:
                moved = self.downgrade(r, row, now)
                if moved is not None:
                    nr, actions, files, record = moved
                else:
                    nr, actions = step(r, self.observe(r, row["deployment_id"], now))
            if nr == r and not actions:
                return row
            assign = [d for a in actions if isinstance(a, Assign) for d in a.devices]
            revert = {d: row["previous"].get(d) for a in actions if isinstance(a, Revert) for d, _ in a.devices}
            skip = None
            if nr.phase in FINAL and r.phase not in FINAL:
                skip = f"rollout {r.id} ended ({nr.phase.value}) before this device's wave; it keeps its model"
            ok = self.store.save_rollout(r.id, row["revision"], nr.to_dict(), nr.phase.value, now, assign=assign,
                                         revert=revert, revert_detail=f"rolled back: {nr.reason}",
                                         skip_detail=skip, files=files, variants=record)
            if not ok:
                log.info("rollout %s changed elsewhere meanwhile; it is advanced on the next tick", r.id)
                return self.store.rollout(key)
            for line in nr.history[len(r.history):]:
                log.info("rollout %s: %s", r.id, line)
            self.service.publish_desired(assign + [d for d, prev in revert.items() if prev is not None])
            return self.store.rollout(key)

    def tick(self) -> int:
        """Advance every running rollout once (the server's periodic loop); never raises."""
        n = 0
        for row in self.store.rollouts(phases=RUNNING):
            try:
                self.advance(row["id"])
                n += 1
            except Exception:
                log.exception("advancing rollout %s failed", row["id"])
        return n

    def resume(self) -> int:
        """At server start: publish again the desired states of running rollouts' devices (a
        crash may have come between storing a wave and publishing it). Returns device count."""
        devices: list[str] = []
        for row in self.store.rollouts(phases=(*RUNNING, Phase.PAUSED.value)):
            r = Rollout.from_dict(row["state"])
            devices += r.assigned
            log.info("resuming rollout %s (%s, wave %d of %d)", r.id, r.phase.value, r.wave + 1, len(r.waves))
        self.service.publish_desired(devices)
        return len(devices)

    # -- latency SLO: a device class that misses it moves to a smaller variant -----------------

    def downgrade(self, r: Rollout, row: dict[str, Any], now: datetime
                  ) -> tuple[Rollout, list[Assign | Revert], dict[str, str], dict[str, Any]] | None:
        """At the end of a soak, with ``strategy.downgrade``: every device class (profile and
        variant) of the wave whose p95 exceeds ``latency_slo_ms`` moves, in this wave and the
        later ones, to the next smaller variant its profile can run; the wave installs and soaks
        again. None when nothing moves (then the gates judge the wave as usual)."""
        s = r.strategy
        t = now.timestamp()
        if not (s.downgrade and s.latency_slo_ms and r.phase == Phase.SOAKING and t - r.phase_since >= s.soak_s):
            return None
        record = {"devices": {}, "moves": [], **row["variants"]}
        manifest = self.service._manifest(r.artifact)
        if manifest is None or not record["devices"]:
            return None
        from sdk.protocol.profiles import load_profiles

        profiles = load_profiles()
        profile_of = {d["id"]: d.get("profile") or "" for d in self.store.devices()}
        devs = {d: dict(c) for d, c in record["devices"].items()}
        classes: dict[tuple[str, str], list[str]] = {}
        for d in r.waves[r.wave]:
            classes.setdefault((profile_of.get(d, ""), devs.get(d, {}).get("file", "")), []).append(d)
        files: dict[str, str] = {}
        notes, moves = [], []
        for (prof, file), members in sorted(classes.items()):
            h = self.store.cohort_health(members, _dt(r.phase_since), now, artifact=r.artifact)
            p95 = h["p95_ms"]
            if h["inferences"] < r.gates.min_inferences or p95 is None or p95 <= s.latency_slo_ms:
                continue
            who = f"{prof or 'devices without a profile'} ({', '.join(members)})"
            nxt = variants.smaller(manifest, file, profiles.get(prof))
            if nxt is None:
                continue  # nothing smaller: the gates decide
            why = (f"{who} missed the {s.latency_slo_ms:g} ms p95 SLO on {variants.label(manifest, file)}: "
                   f"p95 {p95:.3g} ms; moved to {variants.label(manifest, nxt['file'])}")
            cls = [d for w in r.waves[r.wave:] for d in w
                   if profile_of.get(d, "") == prof and devs.get(d, {}).get("file", "") == file]
            for d in cls:
                files[d] = nxt["file"]
                devs[d] = {"file": nxt["file"], "quantization": nxt["quantization"], "why": why}
            notes.append(why)
            moves.append({"at": now.isoformat(), "profile": prof, "devices": cls, "from": variants.label(manifest, file),
                          "to": variants.label(manifest, nxt["file"]), "p95_ms": p95, "slo_ms": s.latency_slo_ms})
        if not files:
            return None
        nr, actions = reinstall(r, t, "; ".join(notes) + "; reinstalling the wave")
        return nr, actions, files, {**record, "devices": devs, "moves": [*record["moves"], *moves]}

    # -- what the engine sees ------------------------------------------------------------------

    def observe(self, r: Rollout, deployment_id: str, now: datetime) -> Observation:
        t = now.timestamp()
        states: dict[str, str] = {}
        details: dict[str, str] = {}
        if r.phase == Phase.INSTALLING:
            targets = self.store.target_states(deployment_id)
            for d in r.waves[r.wave]:
                st, detail = targets.get(d, ("", ""))
                if st not in _SILENT:
                    states[d] = st
                if st == "failed" and detail:
                    details[d] = detail  # the agent's own words: why the install or smoke test failed
        if r.phase != Phase.SOAKING or t - r.phase_since < r.strategy.soak_s:
            return Observation(now=t, device_states=states, device_details=details)
        wave = list(r.waves[r.wave])
        since = _dt(r.phase_since)
        health = Health(**self.store.cohort_health(wave, since, now, artifact=r.artifact))
        return Observation(now=t, device_states=states, wave_health=health, baseline=self.baseline(r, since, now))

    def baseline(self, r: Rollout, soak_start: datetime, now: datetime) -> Health | None:
        """The previous model on the wave's own devices before their soak began; else the
        targets still waiting for their wave, over the same soak window; else none.

        "Previous" is the model each device ran before this rollout: another model it ran in
        the lookback (say a slow one rolled back a minute ago) is no measure of it. Only when the
        wave's devices came from different models does any model but the new one count."""
        wave = list(r.waves[r.wave])
        lookback = timedelta(seconds=max(r.strategy.soak_s, BASELINE_LOOKBACK_S))
        before = {r.previous.get(d) for d in wave}
        prev = before.pop() if len(before) == 1 else None
        which = {"artifact": prev} if prev is not None else {"other_than": r.artifact}
        own = Health(**self.store.cohort_health(wave, soak_start - lookback, soak_start, **which))
        if own.inferences >= r.gates.min_inferences:
            model = f"with {self._model_name(prev)} " if prev is not None else ""
            return replace(own, label=f"{model}on the same device{'s' * (len(wave) > 1)} before")
        waiting = [d for w in r.waves[r.wave + 1:] for d in w]
        fleet = Health(**self.store.cohort_health(waiting, soak_start, now, other_than=r.artifact))
        if fleet.inferences >= r.gates.min_inferences:
            return replace(fleet, label=f"on the {len(waiting)} device(s) still waiting, over the same time")
        return None

    def _model_name(self, sha: str) -> str:
        try:
            a = self.store.artifact(sha)
        except EdgeError:  # not stored (any more): its hash says which
            return sha[:12]
        return f"{a['name']} {a['version']}"

    # -- what operators see --------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        out = []
        arts = {a["sha256"]: a for a in self.store.artifacts()}
        for row in reversed(self.store.rollouts()):
            r = Rollout.from_dict(row["state"])
            a = arts.get(r.artifact, {})
            done = sum(1 for i in range(len(r.waves)) if _wave_status(r, i) == "passed")
            out.append({"id": r.id, "deployment_id": row["deployment_id"], "phase": r.phase.value,
                        "model": a.get("name"), "version": a.get("version"), "artifact": r.artifact,
                        "devices": sum(len(w) for w in r.waves), "waves": len(r.waves), "waves_passed": done,
                        "wave": r.wave, "reason": r.reason, "created_at": row["created_at"],
                        "updated_at": row["updated_at"]})
        return out

    def show(self, key: str) -> dict[str, Any]:
        """Everything about one rollout: per wave and per device, gates, history, and in words."""
        row = self.store.rollout(key)
        r = Rollout.from_dict(row["state"])
        arts = {a["sha256"]: a for a in self.store.artifacts()}
        targets = self.store.target_states(row["deployment_id"])
        devs = {d["id"]: d for d in self.store.devices()}
        now = self._now().timestamp()

        def model(sha: str | None) -> str | None:
            if sha is None:
                return None
            a = arts.get(sha)
            return f"{a['name']} {a['version']}" if a else sha[:12]

        waves = []
        for i, w in enumerate(r.waves):
            waves.append({"index": i, "label": wave_label(r, i), "devices": list(w), "status": _wave_status(r, i)})
        devices = []
        for i, w in enumerate(r.waves):
            for d in w:
                dev = devs.get(d, {})
                running = (dev.get("model") or {}).get("artifact")
                st, detail = targets.get(d, ("", ""))
                prev = r.previous.get(d)
                on_previous = running is not None and running == prev
                state = r.device_states.get(d, "waiting")
                if state == "reverting" and on_previous:
                    state = "rolled_back"  # the device reported its previous model active again
                elif state == "waiting" and r.phase in FINAL:
                    state = "never_told"
                devices.append({
                    "device_id": d, "wave": i, "wave_label": wave_label(r, i), "state": state,
                    "target_state": st, "detail": detail, "online": dev.get("online"),
                    "running": running, "running_model": model(running), "previous": prev,
                    "previous_model": model(prev), "on_new": running == r.artifact, "on_previous": on_previous,
                })
        a = arts.get(r.artifact, {})
        out = {
            "id": r.id, "deployment_id": row["deployment_id"], "artifact": r.artifact, "model": a.get("name"),
            "version": a.get("version"), "phase": r.phase.value, "wave": r.wave,
            "paused_from": r.paused_from.value if r.paused_from else None,
            "phase_age_s": round(max(0.0, now - r.phase_since), 1), "reason": r.reason,
            "strategy": r.to_dict()["strategy"], "strategy_text": describe_strategy(r.strategy),
            "gates": r.to_dict()["gates"], "gate_results": r.to_dict()["gate_results"],
            "waves": waves, "devices": devices, "history": list(r.history),
            "created_at": row["created_at"], "updated_at": row["updated_at"], "variants": row["variants"],
        }
        for d in devices:
            choice = row["variants"].get("devices", {}).get(d["device_id"])
            if choice:
                d["variant"] = choice
        out["summary"] = explain(out, r)
        return out


def _replace_reason(r: Rollout, reason: str) -> Rollout:
    from dataclasses import replace

    return replace(r, reason=reason)


def _wave_status(r: Rollout, i: int) -> str:
    if r.phase == Phase.PENDING or i > r.wave:
        return "skipped" if r.phase in FINAL else "waiting"
    if i < r.wave:
        return "rolled_back" if r.phase == Phase.ROLLED_BACK and r.strategy.rollback_scope == "all" else "passed"
    if r.phase == Phase.COMPLETED:
        return "passed"
    if r.phase == Phase.ROLLED_BACK:
        return "failed" if r.gate_results and not all(g.passed for g in r.gate_results) else "rolled_back"
    if r.phase == Phase.PAUSED:
        return f"paused ({r.paused_from.value if r.paused_from else '?'})"
    return r.phase.value


#: Why a gate failed, in an operator's words, about the new model ``{m}``.
GATE_SENTENCES = {
    "install": "{m} did not install",
    "error_rate": "{m} failed too many inferences",
    "error_rate_increase": "{m} failed more inferences than the previous model",
    "p95_latency": "{m} answered more slowly than the previous model",
    "availability": "the devices running {m} were offline too often",
    "accuracy": "{m} was not accurate enough on labelled requests",
    "accuracy_drop": "{m} was less accurate than the previous model",
}
#: The ``edgectl push --gate NAME=...`` that sets each traffic gate (see sdk.rollouts.GATES).
GATE_FLAGS = {"error_rate": "errors", "error_rate_increase": "error_increase", "p95_latency": "p95",
              "availability": "availability", "accuracy": "accuracy", "accuracy_drop": "accuracy_drop"}


def explain(view: dict[str, Any], r: Rollout) -> list[str]:
    """The rollout in sentences an operator reads without knowing the engine."""
    name = f"{view['model'] or 'artifact'} {view['version'] or r.artifact[:12]}"
    n = sum(len(w) for w in r.waves)
    lines = [f"{name} to {n} device(s) in {len(r.waves)} wave(s): {view['strategy_text']}."]
    passed = [w for w in view["waves"] if w["status"] == "passed"]
    if r.phase == Phase.COMPLETED:
        lines.append(f"Completed: every wave passed its gates; {n} device(s) run {name}.")
    elif r.phase in (Phase.INSTALLING, Phase.SOAKING, Phase.PENDING):
        w = view["waves"][r.wave]
        doing = "installing on" if r.phase == Phase.INSTALLING else \
            f"soaking ({view['phase_age_s']:g} of {r.strategy.soak_s:g} s) on"
        lines.append(f"Running: {len(passed)} wave(s) passed; {w['label']} is {doing} {', '.join(w['devices'])}.")
    elif r.phase == Phase.PAUSED:
        lines.append(f"Paused by an operator during {view['waves'][r.wave]['label']} "
                     f"({r.paused_from.value if r.paused_from else '?'}); `edgectl rollout resume {r.id}` continues.")
    elif r.phase == Phase.ROLLED_BACK:
        failed = [g for g in r.gate_results if not g.passed]
        label = view["waves"][r.wave]["label"]
        who = f"{'the ' if label == 'canary' else ''}{label} ({', '.join(r.waves[r.wave])})"
        for g in failed:
            what = GATE_SENTENCES.get(g.gate, f"{{m}} failed the {GATE_WORDS.get(g.gate, g.gate)} gate").format(m=name)
            lines.append(f"Rolled back because {what} on {who}: {g.detail}.")
        flags = [GATE_FLAGS[g.gate] for g in failed if g.gate in GATE_FLAGS]
        if flags:
            lines.append(f"If that is acceptable, push it again with a looser limit "
                         f"({', '.join(f'--gate {f}=...' for f in flags)}) or without the gate "
                         f"({', '.join(f'--gate {f}=off' for f in flags)}).")
        if not failed:
            lines.append("Rolled back by an operator (edgectl rollout rollback): every device it changed returns "
                         "to its previous model." if r.reason == "rolled back by operator" else f"Rolled back: {r.reason}.")
    elif r.phase == Phase.ABORTED:
        lines.append("Aborted by an operator: devices keep whatever they run now; later waves were never started.")
    elif r.phase == Phase.SUPERSEDED:
        lines.append(f"Superseded ({r.reason}): a newer deployment took over its devices.")
    chosen: dict[tuple[str, str], list[str]] = {}
    for d, c in view.get("variants", {}).get("devices", {}).items():
        chosen.setdefault((c["quantization"], c["why"]), []).append(d)
    if chosen:
        lines.append("Variants: " + "; ".join(f"{q} on {', '.join(sorted(ds))} ({why})"
                                              for (q, why), ds in sorted(chosen.items())) + ".")
    for m in view.get("variants", {}).get("moves", []):
        lines.append(f"Moved {m['profile'] or 'devices without a profile'} ({', '.join(m['devices'])}) from "
                     f"{m['from']} to {m['to']}: p95 {m['p95_ms']:.3g} ms over the {m['slo_ms']:g} ms SLO.")
    reverted = [d for d in view["devices"] if d["target_state"] == "rolled_back"]
    if reverted:
        back = [f"{d['device_id']} ({'back on ' + (d['previous_model'] or '?') if d['on_previous'] else 'returning to ' + (d['previous_model'] or 'nothing: it had no previous model')})"
                for d in reverted]
        lines.append("Returned to their previous model: " + ", ".join(back) + ".")
    never = [d["device_id"] for d in view["devices"] if d["target_state"] in ("waiting", "skipped")]
    if never and r.phase in FINAL:
        lines.append(f"Never received {name}: {', '.join(never)}.")
    elif never:
        lines.append(f"Waiting for their wave: {', '.join(never)}.")
    timeouts = [d["device_id"] for d in view["devices"] if d["state"] == "timeout"]
    if timeouts:
        lines.append(f"Did not answer within {r.strategy.install_timeout_s:g} s (offline?): {', '.join(timeouts)}.")
    return lines

"""The server's business logic: ingest device messages, store artifacts, create deployments,
answer health queries. No HTTP and no MQTT code here: publishing goes through a ``Publisher``
seam (``server.mqtt.MqttSide`` in production, a list in tests).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sdk.protocol import drift, frames, messages, topics
from sdk.protocol.bundle import read_bundle
from sdk.protocol.errors import BundleError, DeployError, ProtocolError
from sdk.protocol.fsutil import write_atomic
from sdk.protocol.topics import DeviceTopic

from . import __version__, placement
from .config import Config
from .rollout import Gates, Strategy
from .rollouts import Rollouts
from .rollouts import variant_roles as variant_roles_for
from .security import BrokerAccounts
from .store import NotFound, Store, chunk_count, unavailable, utcnow

log = logging.getLogger("edgectl.server")

#: Device topic kinds the server subscribes to and ingests.
INGESTED = (DeviceTopic.STATUS, DeviceTopic.REPORTED, DeviceTopic.TELEMETRY,
            DeviceTopic.HEARTBEAT, DeviceTopic.FETCH)


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...


class NullPublisher:
    """Drops everything (a server without an MQTT side, e.g. in store-only tests)."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        log.debug("no MQTT side: dropped %d bytes for %s", len(payload), topic)


#: A device that sent no Fetch for this long no longer counts as downloading (fan-out).
FANOUT_IDLE_S = 10.0


@dataclass
class _Wave:
    """The devices downloading one artifact, and when each of its chunks was last broadcast."""

    #: device -> arrival times (epoch seconds) of its first and its latest Fetch
    fetchers: dict[str, tuple[float, float]] = field(default_factory=dict)
    sent: dict[int, float] = field(default_factory=dict)  # chunk index -> when broadcast (epoch seconds)


class Rejected(Exception):
    """Internal: a device message is refused; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class Service:
    def __init__(self, config: Config, store: Store, publisher: Publisher | None = None,
                 clock: Callable[[], datetime] = utcnow):
        self.config = config
        self.store = store
        self.publisher: Publisher = publisher or NullPublisher()
        self.clock = clock
        self.http_url = ""
        self.broker_url = ""
        #: Set by the MQTT side so /v1/info can show its ingest backlog.
        self.queue_depth: Callable[[], int] = lambda: 0
        self._rejected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._known_devices: set[str] = set()
        #: The broker's password file and ACL (``edgectl devices enroll``); set by server.main.
        self.accounts: BrokerAccounts = BrokerAccounts(config.broker_dir)
        #: Ingest counters for /v1/info and /metrics.
        self.stats: Counter[str] = Counter()
        #: Fan-out state per artifact being downloaded (see ``_serve_fetch``); ingest worker only.
        self._waves: dict[str, _Wave] = {}
        #: Gated deployments (canary -> waves), advanced by the server's periodic loop.
        self.rollouts = Rollouts(self)

    # -- info ----------------------------------------------------------------------------------

    def rejected(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rejected)

    def info(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self.stats)
        return {"version": __version__, "broker_url": self.broker_url, "http_url": self.http_url,
                "rejected": self.rejected(), "queue_depth": self.queue_depth(), "ingest": stats}

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        with self._lock:
            self._rejected[reason] += 1
        log.warning("rejected message on %r: %s: %s", topic[:200], reason, detail)

    # -- MQTT ingest ---------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, received_at: datetime | None = None) -> None:
        """Ingest one device message; never raises (bad input is logged and counted)."""
        self.handle_batch([(topic, payload, received_at or self.clock())])

    def handle_batch(self, items: list[tuple[str, bytes, datetime]], *, defer_unavailable: bool = False) -> list[int]:
        """Ingest messages in arrival order; never raises.

        Telemetry and heartbeats are collected and written in one transaction per run of them
        (``Store.ingest``); any other message first flushes what was collected, so a device's
        status is always stored before the telemetry that follows it.

        Returns the indexes of the messages that are neither stored nor rejected for good
        (empty unless ``defer_unavailable``). With ``defer_unavailable`` (the MQTT sides, which
        acknowledge a message only once this returns) a database that is down or locked does
        not count its messages as ``internal_error``: the first such failure stops the batch,
        and the messages it did not take (the failed run and everything after it, so order
        holds) are returned for the caller to offer again later. Telemetry stored by an earlier
        half of a failed run is then refused as ``duplicate`` on the retry (harmless).
        """
        tele: list[tuple[str, str, messages.Telemetry, datetime]] = []
        beats: list[tuple[str, str, messages.Heartbeat, datetime]] = []
        run: list[int] = []  # indexes of what tele and beats hold
        for i, (topic, payload, now) in enumerate(items):
            try:
                route, msg = self._decode(topic, payload)
                if route.kind in (DeviceTopic.TELEMETRY, DeviceTopic.HEARTBEAT):
                    if not self._known(route.device_id):  # type: ignore[arg-type]
                        raise Rejected("unknown_device", f"device {route.device_id!r} never sent a status message")
                    target = tele if route.kind is DeviceTopic.TELEMETRY else beats
                    target.append((topic, route.device_id, msg, now))  # type: ignore[arg-type]
                    run.append(i)
                    continue
                if not self._flush(tele, beats, defer_unavailable):
                    return run + list(range(i, len(items)))
                run.clear()
                self._apply(route, msg, now)
            except Rejected as exc:
                self._reject(topic, exc.reason, str(exc))
            except Exception as exc:
                if defer_unavailable and unavailable(exc):
                    log.warning("the database is unavailable (%s); %d message(s) wait for it",
                                _first_line(exc), len(run) + len(items) - i)
                    return run + list(range(i, len(items)))
                log.exception("failed to ingest a message on %r", topic[:200])
                self._count("internal_error")
        if not self._flush(tele, beats, defer_unavailable):
            return run
        return []

    def _flush(self, tele: list[tuple[str, str, messages.Telemetry, datetime]],
               beats: list[tuple[str, str, messages.Heartbeat, datetime]], defer_unavailable: bool = False) -> bool:
        """Store what was collected; False if the database was unavailable (with ``defer_unavailable``)."""
        if not tele and not beats:
            return True
        done = self._store(tele, beats, defer_unavailable)
        tele.clear()
        beats.clear()
        return done

    def _store(self, tele: list[tuple[str, str, messages.Telemetry, datetime]],
               beats: list[tuple[str, str, messages.Heartbeat, datetime]], defer_unavailable: bool = False) -> bool:
        """One transaction; if the database refuses it for its content, each half again, so one
        message it refuses (a value out of its range, say) costs only itself, not the 2,000 stored
        with it. A database that is down or locked fails the batch as a whole (no retry storm):
        counted as ``internal_error``, or, with ``defer_unavailable``, returns False (not counted)."""
        try:
            results = self.store.ingest([(d, m, t) for _, d, m, t in tele], [(d, m, t) for _, d, m, t in beats])
        except Exception as exc:
            if (len(tele) > 1 or len(beats) > 1) and not unavailable(exc):
                cut, bcut = (len(tele) // 2, 0) if len(tele) > 1 else (len(tele), len(beats) // 2)
                log.warning("storing a batch of %d telemetry and %d heartbeat messages failed; trying its halves",
                            len(tele), len(beats))
                return (self._store(tele[:cut], beats[:bcut], defer_unavailable)
                        and self._store(tele[cut:], beats[bcut:], defer_unavailable))
            if defer_unavailable and unavailable(exc):
                log.warning("the database is unavailable (%s); %d telemetry and %d heartbeat message(s) wait for it",
                            _first_line(exc), len(tele), len(beats))
                return False
            log.exception("failed to store a message on %r", (tele or beats)[0][0][:200])
            self._count("internal_error", len(tele) + len(beats))
        else:
            stored = 0
            for (topic, d, m, _), result in zip(tele, results, strict=True):
                if result == "stored":
                    stored += 1
                elif result == "duplicate":
                    self._reject(topic, "duplicate", f"telemetry seq {m.seq} of {d} is already stored")
                else:
                    self._reject(topic, "unknown_device", f"device {d!r} is unknown")
            with self._lock:
                self.stats["telemetry_stored"] += stored
                self.stats["heartbeats"] += len(beats)
                self.stats["batches"] += 1
        return True

    def merge_counts(self, stats: dict[str, int], rejected: dict[str, int]) -> None:
        """Add counters from an ingest worker process (``server.ingest``) to this server's."""
        with self._lock:
            self.stats.update(stats)
            self._rejected.update(rejected)

    def known_device(self, device_id: str) -> bool:
        """True once the device has sent a status (remembered; the store is asked on a miss)."""
        return self._known(device_id)

    def remember_devices(self) -> int:
        """Learn every stored device at once (an ingest worker's start: one query, not one per device)."""
        ids = self.store.device_ids()
        self._known_devices.update(ids)
        return len(ids)

    def _count(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._rejected[reason] += n

    def _known(self, device_id: str) -> bool:
        if device_id in self._known_devices:
            return True
        if self.store.device_exists(device_id):
            self._known_devices.add(device_id)
            return True
        return False

    def _decode(self, topic: str, payload: bytes) -> tuple[topics.Route, Any]:
        try:
            route = topics.parse(topic)
        except ProtocolError as exc:
            raise Rejected("bad_topic", str(exc)) from None
        if route.kind not in INGESTED or route.device_id is None:
            raise Rejected("bad_topic", f"the server does not ingest {route.kind} topics")
        try:
            return route, messages.decode(route.kind, payload)
        except ProtocolError as exc:
            raise Rejected("bad_message", str(exc)) from None

    def ingest(self, topic: str, payload: bytes, now: datetime) -> None:
        """Decode and store one message; raises :class:`Rejected` for bad input."""
        route, msg = self._decode(topic, payload)
        device_id = route.device_id
        assert device_id is not None
        if route.kind in (DeviceTopic.TELEMETRY, DeviceTopic.HEARTBEAT):
            if not self._known(device_id):
                raise Rejected("unknown_device", f"device {device_id!r} never sent a status message")
            if route.kind is DeviceTopic.HEARTBEAT:
                self.store.ingest([], [(device_id, msg, now)])
            elif self.store.ingest([(device_id, msg, now)])[0] == "duplicate":
                raise Rejected("duplicate", f"telemetry seq {msg.seq} of {device_id} is already stored")
            return
        self._apply(route, msg, now)

    def _apply(self, route: topics.Route, msg: Any, now: datetime) -> None:
        """Store a status, reported or fetch message (the rare kinds, one at a time)."""
        device_id = route.device_id
        assert device_id is not None
        if route.kind is DeviceTopic.STATUS:
            if msg.state == "online":
                self.store.status_online(device_id, msg, now)
                log.info("device %s online (agent %s)", device_id, msg.agent_version or "?")
            else:
                self.store.status_offline(device_id, now)
                log.info("device %s offline", device_id)
            self._known_devices.add(device_id)
            return
        if not self._known(device_id):
            raise Rejected("unknown_device", f"device {device_id!r} never sent a status message")
        try:
            if route.kind is DeviceTopic.REPORTED:
                if not self.store.report(device_id, msg, now):
                    raise Rejected("unknown_deployment",
                                   f"deployment {msg.deployment_id!r} does not target {device_id}")
                log.info("device %s: deployment %s is %s %s", device_id, msg.deployment_id,
                         msg.state, msg.detail)
            elif route.kind is DeviceTopic.FETCH:
                self.store.touch(device_id, now)
                self._serve_fetch(device_id, msg, now)
        except NotFound as exc:  # deleted between the check and the write
            raise Rejected("unknown_device", str(exc)) from None

    def _serve_fetch(self, device_id: str, msg: messages.Fetch, received: datetime | None = None) -> None:
        desired = self.store.desired(device_id)
        if desired is None or desired.artifact != msg.artifact:
            raise Rejected("not_desired", f"{device_id} asked for artifact {msg.artifact[:12]}…, "
                                          "which is not its desired artifact")
        chunk_size = desired.chunk_size
        count = chunk_count(desired.size, chunk_size)
        bad = sorted(i for i in set(msg.indexes) if i >= count)
        if bad:
            raise Rejected("bad_index", f"{device_id} asked for chunks {bad[:5]} of "
                                        f"{msg.artifact[:12]}…, which has {count}")
        # Fan-out: while several devices download this artifact, each chunk goes once to the
        # artifact topic (every downloading agent subscribes to it before its first Fetch)
        # instead of once per device. For a chunk already broadcast:
        # * after this device's first Fetch *arrived* (so it was subscribed by then): less than
        #   fanout_window_s ago it is on its way and is not sent again; later, the device lost it
        #   (a stall re-request) and it goes to that device alone: repair;
        # * before this device joined: less than fanout_window_s ago it goes to that device alone
        #   (devices trickling in), else it is broadcast again (a new wave of devices).
        now = self.clock().timestamp()
        arrived = received.timestamp() if received is not None else now
        window = self.config.fanout_window_s
        wave = self._wave(msg.artifact, device_id, arrived, now) if window > 0 else None
        if wave is not None and len(wave.fetchers) < 2:
            wave = None  # one device downloading: plain per-device chunks
        broadcast = unicast = skipped = nbytes = 0
        with open(self.config.artifact_path(msg.artifact), "rb") as f:
            for index in msg.indexes:
                last = wave.sent.get(index) if wave is not None else None
                if wave is not None and last is not None:
                    fresh, subscribed = now - last < window, last >= wave.fetchers[device_id][0]
                    if fresh and subscribed:
                        skipped += 1
                        continue
                    if not fresh and not subscribed:
                        last = None  # broadcast it again
                f.seek(index * chunk_size)
                payload = frames.Chunk(msg.artifact, index, count, f.read(chunk_size)).encode()
                if wave is not None and last is None:
                    self.publisher.publish(topics.artifact_chunks(msg.artifact), payload, qos=1)
                    wave.sent[index] = now
                    broadcast += 1
                else:
                    self.publisher.publish(topics.chunks(device_id), payload, qos=1)
                    unicast += 1
                nbytes += len(payload)
        with self._lock:
            self.stats["chunks_broadcast"] += broadcast
            self.stats["chunks_unicast"] += unicast
            self.stats["chunk_bytes_sent"] += nbytes
            self.stats["chunks_not_resent"] += skipped
        log.debug("chunks of %s for %s: %d broadcast, %d to it alone, %d already broadcast",
                  msg.artifact[:12], device_id, broadcast, unicast, skipped)

    def _wave(self, artifact: str, device_id: str, arrived: float, now: float) -> _Wave:
        """Record a Fetch of ``device_id`` for ``artifact``; forget devices that stopped fetching."""
        for a in list(self._waves):
            w = self._waves[a]
            w.fetchers = {d: t for d, t in w.fetchers.items() if now - t[1] < FANOUT_IDLE_S}
            if not w.fetchers:
                del self._waves[a]
        wave = self._waves.setdefault(artifact, _Wave())
        first = wave.fetchers.get(device_id, (arrived, arrived))[0]
        wave.fetchers[device_id] = (first, arrived)
        return wave

    def sweep(self, now: datetime | None = None) -> list[str]:
        """Mark devices silent for longer than the heartbeat timeout offline."""
        stale = self.store.sweep(self.config.heartbeat_timeout, now or self.clock())
        for device_id in stale:
            log.info("device %s offline: no message for %gs", device_id, self.config.heartbeat_timeout)
        return stale

    # -- artifacts -----------------------------------------------------------------------------

    def add_artifact(self, data: bytes) -> tuple[dict[str, Any], bool]:
        """Validate and store a bundle by sha256; returns (artifact dict, True when new)."""
        bundle = read_bundle(data)
        m = bundle.manifest
        try:  # what we will announce must itself follow the wire contract
            messages.Desired.from_dict({"deployment_id": "probe", "artifact": bundle.sha256,
                                        "size": bundle.size, "chunk_size": self.config.chunk_size,
                                        "name": m["name"], "version": m["version"]})
        except ProtocolError as exc:
            raise BundleError(f"bundle cannot be deployed: {exc}") from None
        path = self.config.artifact_path(bundle.sha256)
        if not (path.exists() and path.stat().st_size == bundle.size):
            write_atomic(path, bytes(data))
        art, created = self.store.add_artifact(bundle.sha256, bundle.size, m["name"], m["version"],
                                               m["quantization"], self.clock())
        if created:
            log.info("stored artifact %s (%s %s, %d bytes)", bundle.sha256[:12], m["name"],
                     m["version"], bundle.size)
            if m.get("drift_baseline") is not None:
                try:
                    self.store.set_baseline(bundle.sha256, drift.check_summary(m["drift_baseline"]), self.clock())
                except ProtocolError as exc:
                    log.warning("artifact %s: ignoring its drift baseline: %s", bundle.sha256[:12], exc)
        return art, created

    def artifacts(self) -> list[dict[str, Any]]:
        return self.store.artifacts()

    # -- deployments ---------------------------------------------------------------------------

    def create_deployment(self, artifact: str, selector: str, strategy: Strategy | None = None,
                          gates: Gates | None = None, *, service: str | None = None,
                          replicas: int | None = None, stage_map: dict[str, int] | None = None) -> dict[str, Any]:
        """Deploy to the selected devices: at once, or with a ``strategy`` as a gated rollout
        (``server.rollouts``). Either way it supersedes unfinished rollouts on those devices.

        A pipeline bundle, or ``service`` / ``replicas`` / ``stage_map``, makes it a service on
        shared topics: ``server.placement`` chooses the devices and each one's stage, and the
        deployment targets exactly those devices (``device:a,b,...``). Every other device that
        serves that service (or is told to) leaves it (:meth:`_leave_service`). A replica pool
        (one stage) may be a gated rollout; a pipeline may not (its stages would run mixed versions).
        """
        manifest = self._manifest(artifact)
        roles: placement.Placement | None = None
        if manifest is not None and placement.is_service(manifest, service, replicas, stage_map):
            k = len((manifest.get("pipeline") or {}).get("stages") or [None])
            if strategy is not None and k > 1:
                raise DeployError(f"a {k}-stage pipeline is deployed at once, never in waves: during a gated "
                                  "rollout its stages would run different versions, and a stage cannot take the "
                                  "tensor of another version's previous stage; drop --canary/--waves/--soak/--gate "
                                  "(a replica pool of one model can roll out in waves)")
            roles = self._place(manifest, selector, service, replicas, stage_map)
            selector = "device:" + ",".join(roles.roles)
        fixed = roles.roles if roles is not None else None
        if strategy is not None:
            dep = self.rollouts.create(artifact, selector, strategy, gates or Gates(), manifest=manifest,
                                       roles=(lambda _targets: fixed) if fixed is not None else None)
        else:
            # a bundle with variants: each device gets the one its profile prefers (server.variants)
            variant_roles, choices = variant_roles_for(self.store, manifest) if roles is None else (None, {})
            dep = self.store.create_deployment(artifact, selector, self.config.chunk_size, self.clock(),
                                               roles=(lambda _targets: fixed) if fixed is not None else variant_roles)
            if choices:
                dep["variants"] = {d: c.to_dict() for d, c in choices.items()}
            self.rollouts.supersede(dep["targets"], by=dep["id"])
            self.publish_desired(dep["targets"])
            log.info("deployment %s: %s %s to %s", dep["id"], dep["name"], dep["version"],
                     ", ".join(dep["targets"]))
        if roles is not None:
            dep["service"] = {"name": roles.service, "stages": roles.stages, "replicas": roles.replicas,
                              "why": roles.why, "left": self._leave_service(roles.service, dep["targets"], dep["id"])}
        return dep

    def _leave_service(self, service: str, targets: list[str], by: str) -> dict[str, dict[str, Any]]:
        """Every device that serves ``service`` (``Store.service_members``) but is not one of the
        ``targets`` of deployment ``by`` leaves it: a deployment of the model it runs (it re-uses
        the installed bundle, no download) with no role in the service, so the agent unsubscribes
        from the shared topic and the pool or pipeline keeps only the devices just chosen. One
        such deployment per model kept; returns device -> {deployment, keeps, why}."""
        members = {d: m for d, m in self.store.service_members(service).items() if d not in set(targets)}
        groups: dict[str, list[str]] = {}
        for d, m in members.items():
            groups.setdefault(m["artifact"], []).append(d)
        left: dict[str, dict[str, Any]] = {}
        for art, devs in sorted(groups.items()):
            keep = {d: {k: members[d][k] for k in ("file", "service", "stage", "stages")} for d in devs}
            try:
                dep = self.store.create_deployment(art, "device:" + ",".join(devs), self.config.chunk_size,
                                                   self.clock(), roles=lambda _targets, keep=keep: keep)
            except (DeployError, NotFound) as exc:  # e.g. a device deleted meanwhile: tell, go on
                log.error("devices %s could not leave service %s: %s", ", ".join(devs), service, exc)
                left.update({d: {"deployment": None, "why": members[d]["why"], "error": str(exc)} for d in devs})
                continue
            self.rollouts.supersede(dep["targets"], by=dep["id"])
            self.publish_desired(dep["targets"])
            for d in devs:
                left[d] = {"deployment": dep["id"], "keeps": f"{dep['name']} {dep['version']}",
                           "why": f"{members[d]['why']} of service {service}; {by} does not"}
            log.info("deployment %s: %s leave(s) service %s (not chosen by %s), keeping %s %s", dep["id"],
                     ", ".join(devs), service, by, dep["name"], dep["version"])
        return left

    def _manifest(self, artifact: str) -> dict[str, Any] | None:
        """The stored artifact's manifest (verified at upload), or None if there is no such file."""
        if not re.fullmatch(r"[0-9a-f]{64}", artifact):
            return None
        path = self.config.artifact_path(artifact)
        try:
            with zipfile.ZipFile(path) as zf:
                data = json.loads(zf.read("manifest.json"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise BundleError(f"stored artifact {artifact[:12]}… is unreadable: {exc}") from None
        return data if isinstance(data, dict) else None

    def _place(self, manifest: dict[str, Any], selector: str, service: str | None, replicas: int | None,
               stage_map: dict[str, int] | None) -> placement.Placement:
        from sdk.protocol.profiles import load_profiles

        ids = set(self.store.resolve(selector))
        devices = [placement.Candidate(d["id"], bool(d["online"]), d.get("profile") or "")
                   for d in self.store.devices() if d["id"] in ids]
        try:
            profiles = load_profiles()
        except Exception as exc:  # a broken profile file must not stop deployments
            log.warning("device profiles unavailable (%s); every device counts as speed factor 1", exc)
            profiles = {}

        def speed_of(name: str) -> float | None:
            p = profiles.get(name)
            return p.speed_factor if p is not None else None

        return placement.place(manifest, devices, service=service, replicas=replicas, stage_map=stage_map,
                               speed_of=speed_of, selector=selector)

    def publish_desired(self, device_ids: list[str]) -> None:
        """Publish (retained) the stored desired state of these devices."""
        for device_id in device_ids:
            desired = self.store.desired(device_id)
            if desired is not None:
                self.publisher.publish(topics.desired(device_id), desired.encode(), qos=1, retain=True)

    def republish_desired(self) -> int:
        """Publish every device's desired state again (after a reconnect to the broker)."""
        rows = self.store.all_desired()
        for device_id, desired in rows:
            self.publisher.publish(topics.desired(device_id), desired.encode(), qos=1, retain=True)
        return len(rows)

    def deployments(self) -> list[dict[str, Any]]:
        return self.store.deployments()

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return self.store.deployment(deployment_id)

    # -- devices and health --------------------------------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        return self.store.devices()

    def device(self, device_id: str) -> dict[str, Any]:
        return self.store.device(device_id)

    def fleet_health(self, window_s: float, now: datetime | None = None, *, group: str | None = None,
                     model: str | None = None, by: str = "device") -> dict[str, Any]:
        return self.store.fleet_health(window_s, now or self.clock(), group=group, model=model, by=by)

    def device_detail(self, device_id: str, window_s: float = 86400.0) -> dict[str, Any]:
        return self.store.device_detail(device_id, window_s, self.clock())

    # -- device credentials --------------------------------------------------------------------

    def enroll(self, device_id: str) -> dict[str, Any]:
        """New broker credentials for a device; the password is in this answer and nowhere else."""
        password, applied = self.accounts.enroll(device_id)
        note = ("the broker has taken them: the device can connect now" if applied else
                f"the broker does not read them yet: copy {self.accounts.passwd_path} and "
                f"{self.accounts.acl_path} to it and reload it (or run --broker local --secure)")
        return {"device_id": device_id, "username": device_id, "password": password,
                "broker_url": self.broker_url, "applied": applied, "note": note}

    def revoke(self, device_id: str) -> dict[str, Any]:
        applied = self.accounts.revoke(device_id)
        return {"device_id": device_id, "revoked": True, "applied": applied}

    def add_feedback(self, labels: list[tuple[str, int]]) -> dict[str, int]:
        return self.store.add_feedback(labels, self.clock())

    def maintain(self, now: datetime | None = None) -> dict[str, int]:
        """Apply the retention policy (raw aggregates, then rollups)."""
        deleted = self.store.apply_retention(self.config.retention_raw_s, self.config.retention_rollup_s,
                                             now or self.clock())
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items() if n))
        return deleted

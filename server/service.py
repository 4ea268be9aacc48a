"""The server's business logic: ingest device messages, store artifacts, create deployments,
answer health queries. No HTTP and no MQTT code here: publishing goes through a ``Publisher``
seam (``server.mqtt.MqttSide`` in production, a list in tests).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from sdk.protocol import drift, frames, messages, topics
from sdk.protocol.bundle import read_bundle
from sdk.protocol.errors import BundleError, ProtocolError
from sdk.protocol.fsutil import write_atomic
from sdk.protocol.topics import DeviceTopic

from . import __version__
from .config import Config
from .store import NotFound, Store, chunk_count, utcnow

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


class Rejected(Exception):
    """Internal: a device message is refused; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


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
        #: Ingest counters for /v1/info and /metrics.
        self.stats: Counter[str] = Counter()

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

    def handle_batch(self, items: list[tuple[str, bytes, datetime]]) -> None:
        """Ingest messages in arrival order; never raises.

        Telemetry and heartbeats are collected and written in one transaction per run of them
        (``Store.ingest``); any other message first flushes what was collected, so a device's
        status is always stored before the telemetry that follows it.
        """
        tele: list[tuple[str, str, messages.Telemetry, datetime]] = []
        beats: list[tuple[str, str, messages.Heartbeat, datetime]] = []
        for topic, payload, now in items:
            try:
                route, msg = self._decode(topic, payload)
                if route.kind in (DeviceTopic.TELEMETRY, DeviceTopic.HEARTBEAT):
                    if not self._known(route.device_id):  # type: ignore[arg-type]
                        raise Rejected("unknown_device", f"device {route.device_id!r} never sent a status message")
                    target = tele if route.kind is DeviceTopic.TELEMETRY else beats
                    target.append((topic, route.device_id, msg, now))  # type: ignore[arg-type]
                    continue
                self._flush(tele, beats)
                self._apply(route, msg, now)
            except Rejected as exc:
                self._reject(topic, exc.reason, str(exc))
            except Exception:
                log.exception("failed to ingest a message on %r", topic[:200])
                self._count("internal_error")
        self._flush(tele, beats)

    def _flush(self, tele: list[tuple[str, str, messages.Telemetry, datetime]],
               beats: list[tuple[str, str, messages.Heartbeat, datetime]]) -> None:
        if not tele and not beats:
            return
        try:
            results = self.store.ingest([(d, m, t) for _, d, m, t in tele], [(d, m, t) for _, d, m, t in beats])
        except Exception:
            log.exception("failed to store a batch of %d telemetry and %d heartbeat messages", len(tele), len(beats))
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
        tele.clear()
        beats.clear()

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
                self._serve_fetch(device_id, msg)
        except NotFound as exc:  # deleted between the check and the write
            raise Rejected("unknown_device", str(exc)) from None

    def _serve_fetch(self, device_id: str, msg: messages.Fetch) -> None:
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
        with open(self.config.artifact_path(msg.artifact), "rb") as f:
            for index in msg.indexes:
                f.seek(index * chunk_size)
                data = f.read(chunk_size)
                self.publisher.publish(topics.chunks(device_id),
                                       frames.Chunk(msg.artifact, index, count, data).encode(), qos=1)
        log.debug("sent %d chunks of %s to %s", len(msg.indexes), msg.artifact[:12], device_id)

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

    def create_deployment(self, artifact: str, selector: str) -> dict[str, Any]:
        dep = self.store.create_deployment(artifact, selector, self.config.chunk_size, self.clock())
        self.publish_desired(dep["targets"])
        log.info("deployment %s: %s %s to %s", dep["id"], dep["name"], dep["version"],
                 ", ".join(dep["targets"]))
        return dep

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

    def add_feedback(self, labels: list[tuple[str, int]]) -> dict[str, int]:
        return self.store.add_feedback(labels, self.clock())

    def maintain(self, now: datetime | None = None) -> dict[str, int]:
        """Apply the retention policy (raw aggregates, then rollups)."""
        deleted = self.store.apply_retention(self.config.retention_raw_s, self.config.retention_rollup_s,
                                             now or self.clock())
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items() if n))
        return deleted

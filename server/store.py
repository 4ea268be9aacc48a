"""The SQL store: typed ORM models and a ``Store`` whose methods are the only SQL in the server.

SQLite (WAL, foreign keys on) is the embedded default; PostgreSQL (``postgresql+psycopg://``)
is tested for real. Timestamps are stored as naive UTC and returned as aware UTC, so both
backends behave the same. Every method that depends on time takes an explicit ``now`` (or uses
the injected clock), which keeps availability math deterministic in tests.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sdk.protocol import histogram, messages
from sdk.protocol.errors import DeployError, EdgeError
from sdk.protocol.topics import valid_id

UTC = UTC
PENDING = "pending"
SUPERSEDED = "superseded"
#: Deployment states after which a newer deployment does not rewrite the old one's row.
FINAL_STATES = ("active", "failed")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat() if dt is not None else None


class NotFound(EdgeError):
    """A named device, artifact or deployment does not exist."""


class _Duplicate(Exception):
    """Internal: a telemetry row lost an insert race (rolls the transaction back)."""


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database (same on SQLite and PostgreSQL)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    agent_version: Mapped[str] = mapped_column(String(256), default="")
    runtime: Mapped[str] = mapped_column(String(256), default="")
    profile: Mapped[str] = mapped_column(String(256), default="")
    model_artifact: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(256))
    model_version: Mapped[str | None] = mapped_column(String(256))
    #: The newest deployment that targets this device (its desired state).
    deployment_id: Mapped[str | None] = mapped_column(ForeignKey("deployments.id"))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)


class Artifact(Base):
    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(256))
    quantization: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    artifact: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    selector: Mapped[str] = mapped_column(Text)
    chunk_size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class DeploymentTarget(Base):
    __tablename__ = "deployment_targets"

    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    state: Mapped[str] = mapped_column(String(32), default=PENDING)
    detail: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ConnectionSession(Base):
    __tablename__ = "connection_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    end_reason: Mapped[str | None] = mapped_column(String(32))
    #: The agent's per-connection id from its status message ("" for sessions reopened by traffic).
    connection: Mapped[str] = mapped_column(String(64), default="")


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    interval_s: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    latency_hist: Mapped[list[int]] = mapped_column(JSON)
    latency_sum_ms: Mapped[float] = mapped_column(Float)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    artifact: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(256))


# ---------------------------------------------------------------------------------------------
# Pure helpers (no database): message -> row, selector grammar, interval math.


def telemetry_row(device_id: str, msg: messages.Telemetry, received_at: datetime) -> TelemetryRow:
    return TelemetryRow(
        device_id=device_id, seq=msg.seq, received_at=received_at, interval_s=msg.interval_s,
        count=msg.count, errors=msg.errors, latency_hist=list(msg.latency_hist),
        latency_sum_ms=msg.latency_sum_ms, cpu_percent=msg.cpu_percent, rss_bytes=msg.rss_bytes,
        artifact=msg.artifact, model_version=msg.model_version,
    )


SELECTOR_GRAMMAR = "all | device:ID[,ID...] | group:G | label:KEY=VALUE"


@dataclass(frozen=True)
class Selector:
    """A parsed deployment selector: ``kind`` is all, device, group or label."""

    kind: str
    ids: tuple[str, ...] = ()
    key: str = ""
    value: str = ""

    def matches(self, device_id: str, labels: dict[str, str]) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "device":
            return device_id in self.ids
        return labels.get(self.key) == self.value


def parse_selector(text: str) -> Selector:
    """Parse ``all | device:ID[,ID...] | group:G | label:KEY=VALUE``; raise DeployError otherwise."""
    def bad(why: str) -> DeployError:
        return DeployError(f"selector {text[:80]!r} is malformed ({why}); use {SELECTOR_GRAMMAR}")

    text = text.strip()
    if text == "all":
        return Selector("all")
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise bad("expected KIND:VALUE")
    if kind == "device":
        ids = tuple(i.strip() for i in rest.split(","))
        if not all(valid_id(i) for i in ids):
            raise bad("device ids are 1-64 letters, digits, '_', '.', '-'")
        return Selector("device", ids=tuple(dict.fromkeys(ids)))
    if kind == "group":
        return Selector("group", key="group", value=rest)
    if kind == "label":
        key, eq, value = rest.partition("=")
        if not eq or not key:
            raise bad("expected label:KEY=VALUE")
        return Selector("label", key=key, value=value)
    raise bad(f"unknown kind {kind!r}")


def covered_seconds(intervals: Iterable[tuple[datetime, datetime]], start: datetime, end: datetime) -> float:
    """Seconds of [start, end] covered by the union of ``intervals``."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += (cur_b - cur_a).total_seconds()  # type: ignore[operator]
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += (cur_b - cur_a).total_seconds()  # type: ignore[operator]
    return total


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, math.ceil(size / chunk_size))


def new_deployment_id() -> str:
    return "d-" + secrets.token_hex(5)


# ---------------------------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class Store:
    """All persistence of the server. Thread-safe: each method uses its own session."""

    def __init__(self, url: str, clock: Callable[[], datetime] = utcnow):
        self.engine = make_engine(url)
        self.clock = clock
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- devices and sessions ------------------------------------------------------------------

    def device_exists(self, device_id: str) -> bool:
        with self._session() as s:
            return s.get(Device, device_id) is not None

    def _open_session(self, s: Session, device_id: str) -> ConnectionSession | None:
        return s.scalars(select(ConnectionSession).where(
            ConnectionSession.device_id == device_id, ConnectionSession.ended_at.is_(None))
            .order_by(ConnectionSession.id.desc())).first()

    def _close_sessions(self, s: Session, device_id: str, now: datetime, reason: str) -> int:
        open_ = s.scalars(select(ConnectionSession).where(
            ConnectionSession.device_id == device_id, ConnectionSession.ended_at.is_(None))).all()
        for sess in open_:
            sess.ended_at, sess.end_reason = max(now, sess.started_at), reason
        return len(open_)

    def status_online(self, device_id: str, msg: messages.Status, now: datetime) -> None:
        """Upsert the device from its status and open a fresh connection session."""
        with self._session() as s, s.begin():
            dev = s.get(Device, device_id)
            if dev is None:
                dev = Device(id=device_id, first_seen=now, last_seen=now)
                s.add(dev)
            dev.labels = dict(msg.labels)
            dev.agent_version, dev.runtime, dev.profile = msg.agent_version, msg.runtime, msg.profile
            if msg.active is not None:
                dev.model_artifact = msg.active.artifact
                dev.model_name, dev.model_version = msg.active.name, msg.active.version
            dev.last_seen = max(dev.last_seen, now)
            s.flush()
            current = self._open_session(s, device_id)
            if current is not None and msg.connection and current.connection in (msg.connection, ""):
                current.connection = msg.connection  # same connection re-announcing itself
                return
            self._close_sessions(s, device_id, now, "reconnect")
            s.add(ConnectionSession(device_id=device_id, started_at=now, connection=msg.connection))

    def status_offline(self, device_id: str, now: datetime) -> None:
        """Close the open session (last will or clean disconnect); remember unknown devices."""
        with self._session() as s, s.begin():
            if s.get(Device, device_id) is None:
                s.add(Device(id=device_id, labels={}, first_seen=now, last_seen=now))
                return
            self._close_sessions(s, device_id, now, "offline")

    def _touch(self, s: Session, device_id: str, now: datetime) -> Device:
        dev = s.get(Device, device_id)
        if dev is None:
            raise NotFound(f"device {device_id!r} is unknown")
        dev.last_seen = max(dev.last_seen, now)
        if self._open_session(s, device_id) is None:
            s.add(ConnectionSession(device_id=device_id, started_at=now))
        return dev

    def touch(self, device_id: str, now: datetime) -> None:
        """Any message: bump ``last_seen`` and reopen a session closed by a timeout."""
        with self._session() as s, s.begin():
            self._touch(s, device_id, now)

    def add_telemetry(self, device_id: str, msg: messages.Telemetry, now: datetime) -> bool:
        """Store one aggregate; False when ``(device, seq)`` is already stored (redelivery)."""
        try:
            with self._session() as s, s.begin():
                self._touch(s, device_id, now)
                dup = s.scalar(select(TelemetryRow.id).where(
                    TelemetryRow.device_id == device_id, TelemetryRow.seq == msg.seq))
                if dup is not None:
                    return False
                s.add(telemetry_row(device_id, msg, now))
                try:
                    s.flush()
                except IntegrityError:  # another replica stored it first
                    raise _Duplicate from None
        except _Duplicate:
            return False
        return True

    def report(self, device_id: str, msg: messages.Reported, now: datetime) -> bool:
        """Record a device's deployment progress; False if the deployment does not target it."""
        with self._session() as s, s.begin():
            dev = self._touch(s, device_id, now)
            if msg.state == "active":
                art = s.get(Artifact, msg.artifact)
                dev.model_artifact = msg.artifact
                dev.model_name = art.name if art else None
                dev.model_version = art.version if art else None
            target = s.get(DeploymentTarget, (msg.deployment_id, device_id))
            if target is None:
                return False
            target.state, target.detail, target.updated_at = msg.state, msg.detail, now
        return True

    def sweep(self, timeout_s: float, now: datetime | None = None) -> list[str]:
        """Close the sessions of devices silent for ``timeout_s``; return their ids."""
        now = now or self.clock()
        cutoff = now - timedelta(seconds=timeout_s)
        with self._session() as s, s.begin():
            stale = s.scalars(select(Device.id).join(
                ConnectionSession, ConnectionSession.device_id == Device.id).where(
                ConnectionSession.ended_at.is_(None), Device.last_seen < cutoff).distinct()).all()
            for device_id in stale:
                self._close_sessions(s, device_id, now, "timeout")
        return list(stale)

    def _device_dict(self, s: Session, dev: Device) -> dict[str, Any]:
        deployment = None
        if dev.deployment_id is not None:
            t = s.get(DeploymentTarget, (dev.deployment_id, dev.id))
            deployment = {"id": dev.deployment_id, "state": t.state if t else PENDING,
                          "detail": t.detail if t else ""}
        model = None
        if dev.model_artifact is not None:
            model = {"artifact": dev.model_artifact, "name": dev.model_name, "version": dev.model_version}
        return {
            "id": dev.id, "online": self._open_session(s, dev.id) is not None, "labels": dev.labels or {},
            "agent_version": dev.agent_version, "runtime": dev.runtime, "profile": dev.profile,
            "model": model, "deployment": deployment,
            "first_seen": iso(dev.first_seen), "last_seen": iso(dev.last_seen),
        }

    def devices(self) -> list[dict[str, Any]]:
        with self._session() as s:
            return [self._device_dict(s, d) for d in s.scalars(select(Device).order_by(Device.id))]

    def device(self, device_id: str) -> dict[str, Any]:
        with self._session() as s:
            dev = s.get(Device, device_id)
            if dev is None:
                raise NotFound(f"device {device_id!r} is unknown")
            return self._device_dict(s, dev)

    # -- artifacts -----------------------------------------------------------------------------

    @staticmethod
    def _artifact_dict(a: Artifact) -> dict[str, Any]:
        return {"sha256": a.sha256, "size": a.size, "name": a.name, "version": a.version,
                "quantization": a.quantization}

    def add_artifact(self, sha256: str, size: int, name: str, version: str, quantization: str,
                     now: datetime | None = None) -> tuple[dict[str, Any], bool]:
        """Record an artifact; returns (its dict, True when it was new)."""
        with self._session() as s:
            existing = s.get(Artifact, sha256)
            if existing is not None:
                return self._artifact_dict(existing), False
            art = Artifact(sha256=sha256, size=size, name=name, version=version,
                           quantization=quantization, created_at=now or self.clock())
            s.add(art)
            try:
                s.commit()
            except IntegrityError:  # a concurrent upload of the same bytes
                s.rollback()
                return self._artifact_dict(s.get(Artifact, sha256)), False  # type: ignore[arg-type]
            return self._artifact_dict(art), True

    def artifacts(self) -> list[dict[str, Any]]:
        with self._session() as s:
            rows = s.scalars(select(Artifact).order_by(Artifact.created_at, Artifact.sha256))
            return [self._artifact_dict(a) for a in rows]

    def artifact(self, sha256: str) -> dict[str, Any]:
        with self._session() as s:
            a = s.get(Artifact, sha256)
            if a is None:
                raise NotFound(f"artifact {sha256[:80]!r} is unknown; upload it first")
            return self._artifact_dict(a)

    # -- deployments ---------------------------------------------------------------------------

    def resolve(self, selector: str) -> list[str]:
        """Device ids a selector picks (sorted); raises DeployError / NotFound."""
        with self._session() as s:
            return self._resolve(s, parse_selector(selector), selector)

    def _resolve(self, s: Session, sel: Selector, text: str) -> list[str]:
        if sel.kind == "device":
            known = set(s.scalars(select(Device.id).where(Device.id.in_(sel.ids))))
            missing = [i for i in sel.ids if i not in known]
            if missing:
                raise NotFound(f"device {', '.join(missing)} is unknown (selector {text!r})")
            return sorted(sel.ids)
        ids = [d.id for d in s.scalars(select(Device).order_by(Device.id))
               if sel.matches(d.id, d.labels or {})]
        if not ids:
            raise DeployError(f"selector {text!r} matches no known device")
        return ids

    def create_deployment(self, artifact: str, selector: str, chunk_size: int,
                          now: datetime | None = None) -> dict[str, Any]:
        """Record a deployment for the selected devices, superseding older ones for them."""
        now = now or self.clock()
        sel = parse_selector(selector)
        with self._session() as s, s.begin():
            if s.get(Artifact, artifact) is None:
                raise NotFound(f"artifact {artifact[:80]!r} is unknown; upload it first")
            targets = self._resolve(s, sel, selector)
            dep = Deployment(id=new_deployment_id(), artifact=artifact, selector=selector.strip(),
                             chunk_size=chunk_size, created_at=now)
            s.add(dep)
            s.flush()
            older = s.scalars(select(DeploymentTarget).where(
                DeploymentTarget.device_id.in_(targets),
                DeploymentTarget.state.not_in((*FINAL_STATES, SUPERSEDED)))).all()
            for t in older:
                t.state, t.detail, t.updated_at = SUPERSEDED, f"superseded by {dep.id}", now
            for device_id in targets:
                s.add(DeploymentTarget(deployment_id=dep.id, device_id=device_id, state=PENDING,
                                       detail="", updated_at=now))
                s.get(Device, device_id).deployment_id = dep.id  # type: ignore[union-attr]
            s.flush()
            return self._deployment_dict(s, dep)

    def _deployment_dict(self, s: Session, dep: Deployment) -> dict[str, Any]:
        art = s.get(Artifact, dep.artifact)
        rows = s.scalars(select(DeploymentTarget).where(DeploymentTarget.deployment_id == dep.id)
                         .order_by(DeploymentTarget.device_id)).all()
        return {
            "id": dep.id, "artifact": dep.artifact, "name": art.name if art else None,
            "version": art.version if art else None, "selector": dep.selector,
            "targets": [t.device_id for t in rows], "created_at": iso(dep.created_at),
            "devices": [{"device_id": t.device_id, "state": t.state, "detail": t.detail,
                         "updated_at": iso(t.updated_at)} for t in rows],
        }

    def deployments(self) -> list[dict[str, Any]]:
        with self._session() as s:
            deps = s.scalars(select(Deployment).order_by(Deployment.created_at, Deployment.id)).all()
            return [self._deployment_dict(s, d) for d in deps]

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        with self._session() as s:
            dep = s.get(Deployment, deployment_id)
            if dep is None:
                raise NotFound(f"deployment {deployment_id[:80]!r} is unknown")
            return self._deployment_dict(s, dep)

    def desired(self, device_id: str) -> tuple[str, dict[str, Any], int] | None:
        """(deployment id, artifact dict, chunk size) a device should run, or None."""
        with self._session() as s:
            dev = s.get(Device, device_id)
            if dev is None or dev.deployment_id is None:
                return None
            dep = s.get(Deployment, dev.deployment_id)
            art = s.get(Artifact, dep.artifact)  # type: ignore[union-attr]
            return dep.id, self._artifact_dict(art), dep.chunk_size  # type: ignore[union-attr,arg-type]

    def all_desired(self) -> list[tuple[str, str, dict[str, Any], int]]:
        """(device id, deployment id, artifact dict, chunk size) for every targeted device."""
        with self._session() as s:
            rows = s.execute(select(Device.id, Deployment, Artifact)
                             .join(Deployment, Device.deployment_id == Deployment.id)
                             .join(Artifact, Deployment.artifact == Artifact.sha256)).all()
            return [(d, dep.id, self._artifact_dict(a), dep.chunk_size) for d, dep, a in rows]

    # -- health --------------------------------------------------------------------------------

    def fleet_health(self, window_s: float, now: datetime | None = None) -> dict[str, Any]:
        now = now or self.clock()
        since = now - timedelta(seconds=window_s)
        with self._session() as s:
            devices = s.scalars(select(Device).order_by(Device.id)).all()
            sessions: dict[str, list[ConnectionSession]] = {}
            for sess in s.scalars(select(ConnectionSession).where(
                    (ConnectionSession.ended_at.is_(None)) | (ConnectionSession.ended_at >= since))):
                sessions.setdefault(sess.device_id, []).append(sess)
            tele: dict[str, list[TelemetryRow]] = {}
            for row in s.scalars(select(TelemetryRow).where(
                    TelemetryRow.received_at >= since, TelemetryRow.received_at <= now)):
                tele.setdefault(row.device_id, []).append(row)
            out = []
            for dev in devices:
                dsess = sessions.get(dev.id, [])
                state = None
                if dev.deployment_id is not None:
                    t = s.get(DeploymentTarget, (dev.deployment_id, dev.id))
                    state = t.state if t else PENDING
                out.append({
                    "id": dev.id,
                    "online": any(x.ended_at is None for x in dsess),
                    "model_version": dev.model_version,
                    "deployment_state": state,
                    **telemetry_summary(tele.get(dev.id, [])),
                    "availability": availability(dsess, dev.first_seen, since, now),
                    "outages": sum(1 for x in dsess if x.ended_at is not None and since <= x.ended_at <= now),
                })
        return {"window_s": window_s, "generated_at": iso(now), "devices": out}


def telemetry_summary(rows: Sequence[TelemetryRow]) -> dict[str, Any]:
    inferences = sum(r.count for r in rows)
    errors = sum(r.errors for r in rows)
    merged = histogram.merge(r.latency_hist for r in rows)
    return {"inferences": inferences, "errors": errors,
            "error_rate": errors / inferences if inferences else None,
            "p50_ms": histogram.quantile(merged, 0.5), "p95_ms": histogram.quantile(merged, 0.95)}


def availability(sessions: Sequence[ConnectionSession], first_seen: datetime, since: datetime,
                 now: datetime) -> float | None:
    """Fraction of [max(since, first_seen), now] covered by connection sessions."""
    start = max(since, first_seen)
    span = (now - start).total_seconds()
    if span <= 0:
        return None
    covered = covered_seconds(((x.started_at, x.ended_at or now) for x in sessions), start, now)
    return min(1.0, covered / span)

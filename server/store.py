"""The SQL store: typed ORM models and a ``Store`` whose methods are the only SQL in the server.

SQLite (WAL, foreign keys on) is the embedded default; PostgreSQL (``postgresql+psycopg://``)
is tested for real. Timestamps are stored as naive UTC and returned as aware UTC, so both
backends behave the same. Every method that depends on time takes an explicit ``now`` (or uses
the injected clock), which keeps availability math deterministic in tests.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sdk.protocol import drift, histogram, messages
from sdk.protocol.errors import DeployError, EdgeError
from sdk.protocol.topics import valid_id

from .health import (
    Avail,
    Tele,
    add_labels,
    availability,
    drift_psi,
    merged,
    performance,
    stage_health,
)

UTC = UTC
#: Windows up to this long are answered from raw aggregates; longer ones from hourly rollups.
RAW_QUERY_MAX_S = 3 * 3600.0
PENDING = "pending"
SUPERSEDED = "superseded"
#: Deployment states after which a newer deployment does not rewrite the old one's row.
FINAL_STATES = ("active", "failed")
#: Target states of a rollout: in a later wave, not told yet; returned to its previous
#: deployment by a rollback; never told because the rollout ended before its wave.
WAITING, ROLLED_BACK, SKIPPED = "waiting", "rolled_back", "skipped"
#: States a newer deployment leaves as they are (the target's story is over).
ENDED_STATES = (SUPERSEDED, ROLLED_BACK, SKIPPED)


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
    #: The role it reports running (status ``active``): model file, shared service and stage.
    model_file: Mapped[str] = mapped_column(String(128), default="", server_default="")
    model_service: Mapped[str] = mapped_column(String(64), default="", server_default="")
    model_stage: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    model_stages: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The newest deployment that targets this device (its desired state).
    deployment_id: Mapped[str | None] = mapped_column(ForeignKey("deployments.id"))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The latest health report (telemetry ``health``) and when it arrived.
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    health_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Agent uptime of the last heartbeat: a smaller one later means the agent restarted.
    uptime_s: Mapped[float | None] = mapped_column(Float)


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
    #: The device's role (``messages.Desired`` fields): model file, shared service and stage.
    file: Mapped[str] = mapped_column(String(128), default="", server_default="")
    service: Mapped[str] = mapped_column(String(64), default="", server_default="")
    stage: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    stages: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


#: The columns of DeploymentTarget that ``create_deployment(roles=...)`` may set per device.
ROLE_FIELDS = ("file", "service", "stage", "stages")


class RolloutRow(Base):
    """A gated deployment (canary -> waves): the rollout engine's state (``server.rollout``) as
    JSON plus the columns operators query. ``revision`` guards against lost updates."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), index=True, unique=True)
    artifact: Mapped[str] = mapped_column(String(64))
    phase: Mapped[str] = mapped_column(String(32), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: ``Rollout.to_dict()``.
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: Each target's deployment before this rollout (its desired state again after a rollback).
    previous: Mapped[dict[str, str | None]] = mapped_column(JSON)
    #: Which variant each device runs and why, the latency SLO moves (``server.variants``).
    variants: Mapped[dict[str, Any]] = mapped_column(JSON)


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
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
                      Index("ix_telemetry_device_received", "device_id", "received_at"))

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
    #: The agent's health report of the interval (flat JSON object), when it sent one.
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON)


#: Column names of the latency buckets in the hourly rollup (b00 .. b71).
BUCKETS = tuple(f"b{i:02d}" for i in range(histogram.N_BUCKETS))
#: Column names of the drift bins in the hourly drift rollup (im00.., is00.., out00..).
DRIFT_COLS = {f: tuple(f"{p}{i:02d}" for i in range(drift.N_BINS))
              for f, p in zip(drift.FIELDS, ("im", "is", "out"), strict=True)}

hourly = Table(
    "telemetry_hourly", Base.metadata,
    Column("hour", UTCDateTime, primary_key=True),
    Column("device_id", String(64), ForeignKey("devices.id"), primary_key=True),
    Column("artifact", String(64), primary_key=True),  # "" when the device ran no model
    Column("model_version", String(256), primary_key=True),
    Column("intervals", BigInteger, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("latency_sum_ms", Float, nullable=False),
    *(Column(b, BigInteger, nullable=False) for b in BUCKETS),
    Index("ix_telemetry_hourly_device_hour", "device_id", "hour"),
)

drift_hourly = Table(
    "drift_hourly", Base.metadata,
    Column("hour", UTCDateTime, primary_key=True),
    Column("device_id", String(64), ForeignKey("devices.id"), primary_key=True),
    Column("artifact", String(64), primary_key=True),
    Column("intervals", BigInteger, nullable=False),
    *(Column(c, BigInteger, nullable=False) for cols in DRIFT_COLS.values() for c in cols),
)


class DriftBaseline(Base):
    """What an artifact's inputs/outputs look like when it is fresh: from the bundle's manifest,
    or else the first ``baseline_intervals`` summaries the fleet sends after it is activated."""

    __tablename__ = "drift_baselines"

    artifact: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # "manifest" | "fleet"
    intervals: Mapped[int] = mapped_column(Integer)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    summary: Mapped[dict[str, list[int]]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    predicted: Mapped[int] = mapped_column(Integer)
    artifact: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(256))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Feedback(Base):
    """Ground truth an application sent for a request id (``edgectl feedback``)."""

    __tablename__ = "feedback"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EventRow(Base):
    """Things that happened to a device: ``restart`` (agent uptime went back), ``deploy_failed``."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_device_at", "device_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")


class StageTelemetryRow(Base):
    """``Telemetry.stage`` of an interval: where a service stage's time went (pipelines, replicas).
    Written only for devices that serve a service; read by ``fleet_health`` (raw retention)."""

    __tablename__ = "stage_telemetry"
    __table_args__ = (Index("ix_stage_telemetry_device_received", "device_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    service: Mapped[str] = mapped_column(String(64))
    stage: Mapped[int] = mapped_column(Integer)
    stages: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    timed: Mapped[int] = mapped_column(BigInteger)
    transfer_ms: Mapped[float] = mapped_column(Float)
    wait_ms: Mapped[float] = mapped_column(Float)
    compute_ms: Mapped[float] = mapped_column(Float)
    forward_ms: Mapped[float] = mapped_column(Float)


# ---------------------------------------------------------------------------------------------
# Pure helpers (no database): message -> row, selector grammar, interval math.


STORED, DUPLICATE, UNKNOWN = "stored", "duplicate", "unknown_device"


def floor_hour(dt: datetime) -> datetime:
    return dt.replace(minute=0, second=0, microsecond=0)


#: Raw rows per multi-row INSERT (13 parameters each; SQLite allows 32766 per statement).
RAW_CHUNK = 500
_RAW_COLS = ("device_id", "seq", "received_at", "interval_s", "count", "errors", "latency_hist",
             "latency_sum_ms", "cpu_percent", "rss_bytes", "artifact", "model_version", "health")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _dt_param(conn: Connection) -> Callable[[datetime], Any]:
    """How a UTC datetime is passed to the driver directly (the ingest path skips SQLAlchemy's
    per-parameter processing, which cost more than the database work): SQLite gets the text
    that ``DateTime`` writes, PostgreSQL a naive UTC datetime."""
    if conn.dialect.name == "sqlite":
        return lambda v: v.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    return lambda v: v.astimezone(UTC).replace(tzinfo=None)


def _mark(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _raw_insert_sql(conn: Connection, rows: int) -> str:
    mark = _mark(conn)
    pg = conn.dialect.name == "postgresql"
    one = "(" + ", ".join(f"{mark}::json" if pg and c in ("latency_hist", "health") else mark
                          for c in _RAW_COLS) + ")"
    cols = ", ".join(f'"{c}"' for c in _RAW_COLS)
    return (f"INSERT INTO telemetry ({cols}) VALUES {', '.join([one] * rows)} "
            "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq")


#: PostgreSQL types of ``_RAW_COLS``: a batch goes in as one JSON document (see _upsert_sql).
_RAW_PG_TYPES = ("varchar", "bigint", "timestamp", "float8", "bigint", "bigint", "json", "float8", "float8",
                 "bigint", "varchar", "varchar", "json")


def _jsonb_rows(types: Sequence[str]) -> str:
    """``SELECT`` typed columns out of a JSON array of row arrays (PostgreSQL; the parameter
    ``%s`` is the document). The driver passes one string for the whole batch and the server
    splits it in C: the cheapest way found to move thousands of wide rows from Python (per-row
    parameters or per-column arrays cost psycopg 2-4x more Python time). JSON null is SQL NULL."""
    cols = ", ".join(f"NULLIF(r->{i}, 'null'::jsonb)::json" if t == "json" else f"(r->>{i})::{t}"
                     for i, t in enumerate(types))
    return f"SELECT {cols} FROM jsonb_array_elements(%s::jsonb) AS r"


def _raw_insert_pg() -> str:
    return (f"INSERT INTO telemetry ({', '.join(chr(34) + c + chr(34) for c in _RAW_COLS)}) "
            f"{_jsonb_rows(_RAW_PG_TYPES)} ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq")


def _upsert_sql(conn: Connection, table: Table, keys: Sequence[str], sums: Sequence[str],
                pg_types: Sequence[str] | None = None) -> str:
    """INSERT .. ON CONFLICT (keys) DO UPDATE SET col = col + excluded.col (SQLite and PostgreSQL).

    With ``pg_types`` (PostgreSQL only) the statement takes all rows as one JSON document
    (:func:`_jsonb_rows`); without, one row of parameters (for ``executemany``).
    """
    cols = ", ".join(f'"{c}"' for c in (*keys, *sums))
    if pg_types is not None:
        source = _jsonb_rows(pg_types)
    else:
        source = f"VALUES ({', '.join([_mark(conn)] * (len(keys) + len(sums)))})"
    return (f"INSERT INTO {table.name} ({cols}) {source} "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
            + ", ".join(f'"{c}" = {table.name}."{c}" + excluded."{c}"' for c in sums))


def _pg_doc(rows: Iterable[Sequence[Any]]) -> str:
    """Rows for :func:`_jsonb_rows`: datetimes (naive UTC) as ISO text, the rest as JSON."""
    return json.dumps([[v.isoformat(" ") if isinstance(v, datetime) else v for v in row] for row in rows],
                      separators=(",", ":"), allow_nan=False)


def _device_update_sql(conn: Connection) -> str:
    """Per device: ``last_seen`` only moves forward, ``health`` only to a newer report, so batches
    stored out of order (several ingest workers) never move either back."""
    if conn.dialect.name == "postgresql":
        newer = "%(hat)s::timestamp IS NOT NULL AND (health_at IS NULL OR health_at < %(hat)s::timestamp)"
        return (f"UPDATE devices SET last_seen = GREATEST(last_seen, %(seen)s::timestamp), "
                f"health = CASE WHEN {newer} THEN %(h)s::json ELSE health END, "
                f"health_at = CASE WHEN {newer} THEN %(hat)s::timestamp ELSE health_at END WHERE id = %(id)s")
    newer = "?3 IS NOT NULL AND (health_at IS NULL OR health_at < ?3)"
    return (f"UPDATE devices SET last_seen = MAX(last_seen, ?1), health = CASE WHEN {newer} THEN ?2 ELSE health END, "
            f"health_at = CASE WHEN {newer} THEN ?3 ELSE health_at END WHERE id = ?4")


def _select_in(conn: Connection, head: str, column: str, values: list[str], extra: str = "") -> list[Any]:
    """``head WHERE column IN values [AND extra]``: PostgreSQL gets one array parameter (a
    thousand-item IN list cost psycopg more to parse than the database to answer)."""
    if conn.dialect.name == "postgresql":
        cond = f"{column} = ANY(%s)"
        params: tuple[Any, ...] = (values,)
    else:
        cond = f"{column} IN ({', '.join([_mark(conn)] * len(values))})"
        params = tuple(values)
    return conn.exec_driver_sql(f"{head} WHERE {cond}" + (f" AND {extra}" if extra else ""), params).all()


#: Times a batch is tried when the database reports a transient conflict (a deadlock between
#: ingest workers on PostgreSQL, a lock held past the busy timeout on SQLite).
INGEST_ATTEMPTS = 5


def unavailable(exc: BaseException) -> bool:
    """The database is down, unreachable or locked (as opposed to refusing what it was given)."""
    from sqlalchemy.exc import InterfaceError

    return isinstance(exc, (OperationalError, InterfaceError))


def _transient(exc: OperationalError) -> bool:
    code = getattr(exc.orig, "sqlstate", None)
    return code in ("40P01", "40001") or "database is locked" in str(exc.orig)


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

    def __init__(self, url: str, clock: Callable[[], datetime] = utcnow, *, upgrade: bool = True,
                 baseline_intervals: int = 30, raw_query_max_s: float = RAW_QUERY_MAX_S):
        """Open the store; ``upgrade`` runs the Alembic migrations, else the schema must be current.

        ``baseline_intervals``: summaries that make an artifact's fleet drift baseline.
        ``raw_query_max_s``: windows up to this long are answered exactly from raw aggregates,
        longer ones from the hourly rollups (their start rounded down to the hour).
        """
        from . import migrate

        self.engine = make_engine(url)
        self.clock = clock
        self.baseline_intervals = baseline_intervals
        self.raw_query_max_s = raw_query_max_s
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        try:
            if upgrade:
                migrate.upgrade(self.engine)
            else:
                migrate.check(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    # -- devices and sessions ------------------------------------------------------------------

    def device_exists(self, device_id: str) -> bool:
        with self._session() as s:
            return s.get(Device, device_id) is not None

    def device_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.scalars(select(Device.id)))

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
                dev.model_file, dev.model_service = msg.active.file, msg.active.service
                dev.model_stage, dev.model_stages = msg.active.stage, msg.active.stages
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
        result = self.ingest([(device_id, msg, now)])[0]
        if result == UNKNOWN:
            raise NotFound(f"device {device_id!r} is unknown")
        return result == STORED

    def heartbeat(self, device_id: str, msg: messages.Heartbeat, now: datetime) -> None:
        """A heartbeat: touch the device, and record a restart when its uptime went back."""
        if self.ingest([], [(device_id, msg, now)]) == [] and not self.device_exists(device_id):
            raise NotFound(f"device {device_id!r} is unknown")

    def ingest(self, telemetry: Sequence[tuple[str, messages.Telemetry, datetime]],
               heartbeats: Sequence[tuple[str, messages.Heartbeat, datetime]] = ()) -> list[str]:
        """Store a batch of telemetry aggregates and heartbeats in one transaction.

        Returns one of ``stored`` / ``duplicate`` / ``unknown_device`` per telemetry item, in
        order. Raw rows, hourly rollups (latency buckets and drift bins are added up in SQL with
        an upsert), predictions, the devices' ``last_seen``/health and their connection
        sessions are all written here; heartbeats only touch the device and detect restarts.

        Several writers may ingest at once (``--ingest-workers``, replicas): rows that lock
        (rollups, devices) are written in key order, so two batches wait for each other instead
        of deadlocking, and a transient conflict retries the whole batch (it is idempotent).
        """
        if not telemetry and not heartbeats:
            return []
        for attempt in range(INGEST_ATTEMPTS):
            try:
                return self._ingest(telemetry, heartbeats)
            except OperationalError as exc:
                if attempt == INGEST_ATTEMPTS - 1 or not _transient(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _ingest(self, telemetry: Sequence[tuple[str, messages.Telemetry, datetime]],
                heartbeats: Sequence[tuple[str, messages.Heartbeat, datetime]]) -> list[str]:
        ids = sorted({d for d, _, _ in telemetry} | {d for d, _, _ in heartbeats})
        with self.engine.begin() as conn:
            pg = conn.dialect.name == "postgresql"
            known = {r.id: r for r in _select_in(conn, "SELECT id, uptime_s FROM devices", "id", ids)}
            statuses = [STORED if d in known else UNKNOWN for d, _, _ in telemetry]
            # INSERT .. ON CONFLICT DO NOTHING RETURNING: the database says which rows are new
            # (redeliveries, duplicates inside the batch and rows another writer stored first
            # are skipped), and only those go into the rollups. SQLite: multi-row VALUES per
            # chunk; PostgreSQL: one statement over arrays (see _upsert_sql).
            candidates = [(i, d, m, at) for i, (d, m, at) in enumerate(telemetry) if d in known]
            inserted: set[tuple[str, int]] = set()
            dt = _dt_param(conn)
            if pg and candidates:
                doc = json.dumps([(d, m.seq, dt(at).isoformat(" "), m.interval_s, m.count, m.errors, m.latency_hist,
                                   m.latency_sum_ms, m.cpu_percent, m.rss_bytes, m.artifact, m.model_version, m.health)
                                  for _, d, m, at in candidates], separators=(",", ":"), allow_nan=False)
                inserted.update((r[0], r[1]) for r in conn.exec_driver_sql(_raw_insert_pg(), (doc,)))
            rows = [] if pg else [
                (d, m.seq, dt(at), m.interval_s, m.count, m.errors, _json(m.latency_hist), m.latency_sum_ms,
                 m.cpu_percent, m.rss_bytes, m.artifact, m.model_version, _json(m.health)) for _, d, m, at in candidates]
            for c in range(0, len(rows), RAW_CHUNK):
                part = rows[c:c + RAW_CHUNK]
                inserted.update((r[0], r[1]) for r in conn.exec_driver_sql(
                    _raw_insert_sql(conn, len(part)), tuple(v for row in part for v in row)))
            fresh: list[tuple[str, messages.Telemetry, datetime]] = []
            for i, d, m, at in candidates:
                if (d, m.seq) in inserted:
                    inserted.discard((d, m.seq))  # a second copy in the same batch is a duplicate
                    fresh.append((d, m, at))
                else:
                    statuses[i] = DUPLICATE
            if fresh:
                self._rollup(conn, fresh)
                staged = [{"device_id": d, "received_at": at, **m.stage} for d, m, at in fresh
                          if getattr(m, "stage", None)]
                if staged:
                    conn.execute(insert(StageTelemetryRow.__table__), staged)
            # devices (in id order): last_seen, the newest health; then uptime/restarts, sessions
            seen: dict[str, datetime] = {}
            health: dict[str, tuple[dict[str, Any], datetime]] = {}
            for d, m, at in fresh:
                if d not in seen or at > seen[d]:
                    seen[d] = at
                if m.health is not None and (d not in health or at > health[d][1]):
                    health[d] = (m.health, at)
            for d, _, at in heartbeats:
                if d in known and (d not in seen or at > seen[d]):
                    seen[d] = at
            if seen:
                updates = []
                for d in sorted(seen):
                    h, hat = health.get(d, (None, None))
                    hat_p = dt(hat) if hat is not None else None
                    updates.append({"id": d, "seen": dt(seen[d]), "h": _json(h), "hat": hat_p} if pg
                                   else (dt(seen[d]), _json(h), hat_p, d))
                conn.exec_driver_sql(_device_update_sql(conn), updates)  # type: ignore[arg-type]
            self._heartbeats(conn, [(d, m, at) for d, m, at in heartbeats if d in known], known)
            if seen:
                cs = ConnectionSession.__table__
                open_ = {r[0] for r in _select_in(conn, "SELECT device_id FROM connection_sessions", "device_id",
                                                  sorted(seen), "ended_at IS NULL")}
                first: dict[str, datetime] = {}
                for d, _, at in (*fresh, *heartbeats):
                    if d in seen and d not in open_ and (d not in first or at < first[d]):
                        first[d] = at
                if first:
                    conn.execute(insert(cs), [{"device_id": d, "started_at": at, "ended_at": None,
                                               "end_reason": None, "connection": ""}
                                              for d, at in sorted(first.items())])
        return statuses

    def _heartbeats(self, conn: Connection, beats: Sequence[tuple[str, messages.Heartbeat, datetime]],
                    known: dict[str, Any]) -> None:
        last = {d: known[d].uptime_s for d in known}
        events, uptimes = [], {}
        for d, m, at in beats:
            if last[d] is not None and m.uptime_s < last[d]:
                events.append({"device_id": d, "at": at, "kind": "restart",
                               "detail": f"agent uptime went from {last[d]:g}s to {m.uptime_s:g}s"})
            last[d] = uptimes[d] = m.uptime_s
        if events:
            conn.execute(insert(EventRow.__table__), events)
        if uptimes:
            conn.execute(update(Device.__table__).where(Device.__table__.c.id == bindparam("b_id"))
                         .values(uptime_s=bindparam("b_up")),
                         [{"b_id": d, "b_up": u} for d, u in sorted(uptimes.items())])

    def _rollup(self, conn: Connection, rows: Sequence[tuple[str, messages.Telemetry, datetime]]) -> None:
        """Add a batch's new rows to the hourly rollups, the drift rollups and the predictions."""
        lat: dict[tuple[str, datetime, str, str], list[Any]] = {}
        dr: dict[tuple[str, datetime, str], list[Any]] = {}
        preds = []
        # histograms: one (rows x buckets) array, summed per rollup key with np.add.at
        hists = np.array([m.latency_hist for _, m, _ in rows], dtype=np.int64)
        slot: dict[tuple[str, datetime, str, str], int] = {}
        index = np.empty(len(rows), dtype=np.int64)
        for i, (d, m, at) in enumerate(rows):
            hour = floor_hour(at)
            key = (d, hour, m.artifact or "", m.model_version or "")
            acc = lat.get(key)
            if acc is None:
                acc = lat[key] = [0, 0, 0, 0.0, None]
                slot[key] = len(slot)
            index[i] = slot[key]
            acc[0] += 1
            acc[1] += m.count
            acc[2] += m.errors
            acc[3] += m.latency_sum_ms
            if m.drift is not None:
                dkey = (d, hour, m.artifact or "")
                dacc = dr.get(dkey)
                if dacc is None:
                    dacc = dr[dkey] = [0, {f: np.zeros(drift.N_BINS, dtype=np.int64) for f in drift.FIELDS}]
                dacc[0] += 1
                for f in drift.FIELDS:
                    dacc[1][f] += m.drift[f]
            if m.predictions:
                preds.extend({"device_id": d, "request_id": rid, "predicted": cls, "artifact": m.artifact or "",
                              "model_version": m.model_version or "", "received_at": at}
                             for rid, cls in m.predictions)
        if lat:
            summed = np.zeros((len(slot), histogram.N_BUCKETS), dtype=np.int64)
            np.add.at(summed, index, hists)
            for key, acc in lat.items():
                acc[4] = summed[slot[key]]
        dt = _dt_param(conn)
        pg = conn.dialect.name == "postgresql"
        # In key order (hour, device, ...): concurrent batches lock rollup rows in the same order.
        if lat:
            order = sorted(lat, key=lambda k: (k[1], k[0], k[2], k[3]))
            sums = ("intervals", "count", "errors", "latency_sum_ms", *BUCKETS)
            keys = ("hour", "device_id", "artifact", "model_version")
            rows_ = [(dt(k[1]), k[0], k[2], k[3], *lat[k][:4], *lat[k][4].tolist()) for k in order]
            if pg:
                types = ("timestamp", "varchar", "varchar", "varchar", "bigint", "bigint", "bigint", "float8",
                         *(["bigint"] * len(BUCKETS)))
                conn.exec_driver_sql(_upsert_sql(conn, hourly, keys, sums, types), (_pg_doc(rows_),))
            else:
                conn.exec_driver_sql(_upsert_sql(conn, hourly, keys, sums), rows_)  # type: ignore[arg-type]
        if dr:
            cols = tuple(c for f in drift.FIELDS for c in DRIFT_COLS[f])
            rows_ = [(dt(hour), d, art, n, *(v for f in drift.FIELDS for v in counts[f].tolist()))
                     for (d, hour, art), (n, counts) in sorted(dr.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2]))]
            keys = ("hour", "device_id", "artifact")
            if pg:
                types = ("timestamp", "varchar", "varchar", "bigint", *(["bigint"] * len(cols)))
                conn.exec_driver_sql(_upsert_sql(conn, drift_hourly, keys, ("intervals", *cols), types),
                                     (_pg_doc(rows_),))
            else:
                conn.exec_driver_sql(_upsert_sql(conn, drift_hourly, keys, ("intervals", *cols)),
                                     rows_)  # type: ignore[arg-type]
            self._grow_baselines(conn, rows)
        if preds:
            conn.execute(insert(Prediction.__table__), preds)

    def _grow_baselines(self, conn: Connection, rows: Sequence[tuple[str, messages.Telemetry, datetime]]) -> None:
        """Feed the first summaries of an artifact into its fleet baseline until it is complete."""
        by_art: dict[str, list[dict[str, list[int]]]] = {}
        for _, m, _ in rows:
            if m.drift is not None and m.artifact:
                by_art.setdefault(m.artifact, []).append(m.drift)
        b = DriftBaseline.__table__
        now = max(at for _, _, at in rows)
        for art, summaries in by_art.items():
            row = conn.execute(select(b).where(b.c.artifact == art)).first()
            if row is not None and row.complete:
                continue
            have = row.intervals if row is not None else 0
            take = summaries[: max(0, self.baseline_intervals - have)]
            merged = drift.merge([row.summary, *take] if row is not None else take)
            values = {"summary": merged, "intervals": have + len(take),
                      "complete": have + len(take) >= self.baseline_intervals, "updated_at": now}
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(b), [{"artifact": art, "source": "fleet", **values}])
                except IntegrityError:  # another replica started it: it grows on the next batch
                    pass
            else:
                conn.execute(update(b).where(b.c.artifact == art).values(**values))

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
            if target.state == ROLLED_BACK:  # a late report of a rolled-back install keeps the story
                return True
            if msg.state == "failed" and target.state != "failed":
                s.add(EventRow(device_id=device_id, at=now, kind="deploy_failed",
                               detail=f"{msg.deployment_id}: {msg.detail}"[:2000]))
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
            role = {"file": dev.model_file, "service": dev.model_service, "stage": dev.model_stage,
                    "stages": dev.model_stages}
            model = {"artifact": dev.model_artifact, "name": dev.model_name, "version": dev.model_version,
                     **{k: v for k, v in role.items() if v}}  # its role, when it has one
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
                          now: datetime | None = None, *,
                          roles: Callable[[list[str]], Mapping[str, Mapping[str, Any]]] | None = None,
                          staged: bool = False) -> dict[str, Any]:
        """Record a deployment for the selected devices, superseding older ones for them.

        ``roles`` maps the resolved target ids to each device's role (``ROLE_FIELDS``: model file,
        service, stage, stages); it may raise DeployError (e.g. too few devices for a pipeline).
        ``staged`` (a rollout): every target starts ``waiting`` and keeps its current desired
        state until :meth:`save_rollout` assigns its wave; the answer then also holds
        ``previous`` and ``previous_artifacts``: each target's deployment (and its artifact)
        before this one, None if it had none.
        """
        now = now or self.clock()
        sel = parse_selector(selector)
        with self._session() as s, s.begin():
            if s.get(Artifact, artifact) is None:
                raise NotFound(f"artifact {artifact[:80]!r} is unknown; upload it first")
            targets = self._resolve(s, sel, selector)
            role = roles(targets) if roles is not None else {}
            dep = Deployment(id=new_deployment_id(), artifact=artifact, selector=selector.strip(),
                             chunk_size=chunk_size, created_at=now)
            s.add(dep)
            s.flush()
            previous = {d: dev.deployment_id for d in targets if (dev := s.get(Device, d)) is not None}
            previous_artifacts = {d: s.get(Deployment, p).artifact if p else None  # type: ignore[union-attr]
                                  for d, p in previous.items()}
            for device_id in targets:
                extra = {k: v for k, v in role.get(device_id, {}).items() if k in ROLE_FIELDS}
                s.add(DeploymentTarget(deployment_id=dep.id, device_id=device_id,
                                       state=WAITING if staged else PENDING, detail="", updated_at=now, **extra))
            s.flush()
            if not staged:
                self._assign(s, dep.id, targets, now)
            out = self._deployment_dict(s, dep)
            if staged:
                out["previous"], out["previous_artifacts"] = previous, previous_artifacts
            return out

    def _assign(self, s: Session, deployment_id: str, device_ids: Sequence[str], now: datetime) -> None:
        """Make ``deployment_id`` the desired state of these devices, superseding older ones."""
        if not device_ids:
            return
        older = s.scalars(select(DeploymentTarget).where(
            DeploymentTarget.device_id.in_(device_ids), DeploymentTarget.deployment_id != deployment_id,
            DeploymentTarget.state.not_in((*FINAL_STATES, *ENDED_STATES)))).all()
        for t in older:
            t.state, t.detail, t.updated_at = SUPERSEDED, f"superseded by {deployment_id}", now
        for device_id in device_ids:
            t = s.get(DeploymentTarget, (deployment_id, device_id))
            if t is not None and t.state != PENDING:  # told now (again, after a change of role)
                t.state, t.detail, t.updated_at = PENDING, "", now
            s.get(Device, device_id).deployment_id = deployment_id  # type: ignore[union-attr]

    def _deployment_dict(self, s: Session, dep: Deployment) -> dict[str, Any]:
        art = s.get(Artifact, dep.artifact)
        rows = s.scalars(select(DeploymentTarget).where(DeploymentTarget.deployment_id == dep.id)
                         .order_by(DeploymentTarget.device_id)).all()
        return {
            "id": dep.id, "artifact": dep.artifact, "name": art.name if art else None,
            "version": art.version if art else None, "selector": dep.selector,
            "targets": [t.device_id for t in rows], "created_at": iso(dep.created_at),
            "devices": [{"device_id": t.device_id, "state": t.state, "detail": t.detail,
                         "updated_at": iso(t.updated_at),
                         **{k: getattr(t, k) for k in ROLE_FIELDS if getattr(t, k)}} for t in rows],
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

    @staticmethod
    def _desired_msg(dep: Deployment, art: Artifact, target: DeploymentTarget | None) -> messages.Desired:
        roles = {k: getattr(target, k) for k in ROLE_FIELDS} if target is not None else {}
        return messages.Desired(dep.id, art.sha256, art.size, dep.chunk_size, art.name, art.version, **roles)

    def desired(self, device_id: str) -> messages.Desired | None:
        """The desired state a device should run (its current deployment and role), or None."""
        with self._session() as s:
            dev = s.get(Device, device_id)
            if dev is None or dev.deployment_id is None:
                return None
            dep = s.get(Deployment, dev.deployment_id)
            art = s.get(Artifact, dep.artifact)  # type: ignore[union-attr]
            target = s.get(DeploymentTarget, (dev.deployment_id, device_id))
            return self._desired_msg(dep, art, target)  # type: ignore[arg-type]

    def all_desired(self) -> list[tuple[str, messages.Desired]]:
        """(device id, desired state) for every targeted device."""
        with self._session() as s:
            rows = s.execute(select(Device.id, Deployment, Artifact, DeploymentTarget)
                             .join(Deployment, Device.deployment_id == Deployment.id)
                             .join(Artifact, Deployment.artifact == Artifact.sha256)
                             .outerjoin(DeploymentTarget, (DeploymentTarget.deployment_id == Deployment.id)
                                        & (DeploymentTarget.device_id == Device.id))).all()
            return [(d, self._desired_msg(dep, a, t)) for d, dep, a, t in rows]

    def service_members(self, service: str) -> dict[str, dict[str, Any]]:
        """The devices that serve ``service`` or are told to, each with what it runs once it leaves
        the service: ``{device: {"artifact", "file", "service", "stage", "stages", "why"}}``.

        A device counts when its desired role (the target row of its current deployment) names
        the service, or when the role it last reported (status ``active``) does and its desired
        state will not move it elsewhere (that deployment failed on it or was rolled back, or
        it has none). It keeps the model it reports running, in the role it reports unless that
        is this service; a device that reports no model keeps its desired one, without a role.
        """
        t = DeploymentTarget
        with self._session() as s:
            rows = s.execute(select(Device, Deployment.artifact, t)
                             .outerjoin(Deployment, Device.deployment_id == Deployment.id)
                             .outerjoin(t, (t.deployment_id == Device.deployment_id) & (t.device_id == Device.id))
                             .where((Device.model_service == service) | (t.service == service))
                             .order_by(Device.id)).all()
            out: dict[str, dict[str, Any]] = {}
            none = {"service": "", "stage": 0, "stages": 0}
            for dev, desired_artifact, target in rows:
                if target is not None and target.service == service:
                    why = f"its deployment {target.deployment_id} gives it stage {target.stage}/{target.stages}"
                elif target is None or target.state in ("failed", *ENDED_STATES):
                    why = f"it reports serving stage {dev.model_stage}/{dev.model_stages}"
                else:
                    continue  # its desired state (pending or active) moves it elsewhere already
                if dev.model_artifact is not None:
                    role = none if dev.model_service == service else {
                        "service": dev.model_service, "stage": dev.model_stage, "stages": dev.model_stages}
                    keep = {"artifact": dev.model_artifact, "file": dev.model_file, **role}
                elif desired_artifact is not None and target is not None:
                    keep = {"artifact": desired_artifact, "file": target.file, **none}
                else:
                    continue
                out[dev.id] = {**keep, "why": why}
            return out

    # -- rollouts ------------------------------------------------------------------------------

    def add_rollout(self, rollout_id: str, deployment_id: str, artifact: str, phase: str,
                    state: dict[str, Any], previous: Mapping[str, str | None],
                    now: datetime | None = None, variants: dict[str, Any] | None = None) -> None:
        now = now or self.clock()
        with self._session() as s, s.begin():
            s.add(RolloutRow(id=rollout_id, deployment_id=deployment_id, artifact=artifact, phase=phase,
                             revision=0, created_at=now, updated_at=now, state=state, previous=dict(previous),
                             variants=variants or {}))

    @staticmethod
    def _rollout_dict(row: RolloutRow) -> dict[str, Any]:
        return {"id": row.id, "deployment_id": row.deployment_id, "artifact": row.artifact, "phase": row.phase,
                "revision": row.revision, "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
                "state": row.state, "previous": dict(row.previous), "variants": dict(row.variants or {})}

    def rollout(self, key: str) -> dict[str, Any]:
        """A rollout by its id or by its deployment's id."""
        with self._session() as s:
            row = s.get(RolloutRow, key) or s.scalars(
                select(RolloutRow).where(RolloutRow.deployment_id == key)).first()
            if row is None:
                raise NotFound(f"rollout {key[:80]!r} is unknown (give a rollout or deployment id)")
            return self._rollout_dict(row)

    def rollouts(self, phases: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rollouts, oldest first; only those in ``phases`` when given."""
        with self._session() as s:
            q = select(RolloutRow).order_by(RolloutRow.created_at, RolloutRow.id)
            if phases is not None:
                q = q.where(RolloutRow.phase.in_(list(phases)))
            return [self._rollout_dict(r) for r in s.scalars(q)]

    def save_rollout(self, rollout_id: str, revision: int, state: dict[str, Any], phase: str,
                     now: datetime | None = None, *, assign: Sequence[str] = (),
                     revert: Mapping[str, str | None] | None = None, revert_detail: str = "",
                     skip_detail: str | None = None, files: Mapping[str, str] | None = None,
                     variants: dict[str, Any] | None = None) -> bool:
        """Store a rollout's new state and carry out its effects on desired states, atomically.

        ``assign``: devices whose desired state becomes the rollout's deployment. ``revert``:
        device -> its previous deployment, desired again (a device with none keeps the rollout's
        model); their targets become ``rolled_back`` with ``revert_detail``. ``skip_detail``:
        targets still ``waiting`` become ``skipped``. ``files``: device -> the model file its
        target runs from now on (another variant); ``variants`` replaces the variants record.
        Returns False, changing nothing, when the stored revision is no longer ``revision``
        (another thread or replica moved it first).
        """
        now = now or self.clock()
        r = RolloutRow.__table__
        values: dict[str, Any] = {"state": state, "phase": phase, "revision": revision + 1, "updated_at": now}
        if variants is not None:
            values["variants"] = variants
        with self._session() as s, s.begin():
            moved = s.execute(update(r).where(r.c.id == rollout_id, r.c.revision == revision).values(**values))
            if moved.rowcount != 1:
                return False
            dep_id = s.scalar(select(r.c.deployment_id).where(r.c.id == rollout_id))
            assert dep_id is not None
            for device_id, file in (files or {}).items():
                target = s.get(DeploymentTarget, (dep_id, device_id))
                if target is not None:
                    target.file = file
            self._assign(s, dep_id, list(assign), now)
            for device_id, prev in (revert or {}).items():
                dev = s.get(Device, device_id)
                target = s.get(DeploymentTarget, (dep_id, device_id))
                if dev is not None and prev is not None and dev.deployment_id == dep_id:
                    dev.deployment_id = prev
                if target is not None:
                    detail = revert_detail if prev is not None else \
                        f"{revert_detail}; it had no previous model and keeps this one"
                    target.state, target.detail, target.updated_at = ROLLED_BACK, detail[:2000], now
            if skip_detail is not None:
                for t in s.scalars(select(DeploymentTarget).where(
                        DeploymentTarget.deployment_id == dep_id, DeploymentTarget.state == WAITING)):
                    t.state, t.detail, t.updated_at = SKIPPED, skip_detail[:2000], now
        return True

    def target_states(self, deployment_id: str) -> dict[str, tuple[str, str]]:
        """Each target's reported state and detail for one deployment."""
        with self._session() as s:
            rows = s.execute(select(DeploymentTarget.device_id, DeploymentTarget.state, DeploymentTarget.detail)
                             .where(DeploymentTarget.deployment_id == deployment_id))
            return {d: (st, det) for d, st, det in rows}

    def cohort_health(self, device_ids: Sequence[str], since: datetime, until: datetime, *,
                      artifact: str | None = None, other_than: str | None = None) -> dict[str, Any]:
        """Health of a set of devices over [since, until] from raw telemetry: inferences, errors,
        p95 (and the merged latency histogram behind it), availability, accuracy on labelled
        requests. ``artifact`` keeps only what that model served; ``other_than`` only what any
        other model served (never intervals without one).

        Only telemetry intervals that lie wholly in the window count: the interval in which a
        device installed a model is labelled with the new model but also holds the install's
        work (download, verification, smoke test), which is no fair measure of either model.
        """
        out: dict[str, Any] = {"inferences": 0, "errors": 0, "p95_ms": None, "availability": None,
                               "accuracy": None, "labelled": 0, "latency_hist": None}
        ids = list(device_ids)
        if not ids:
            return out
        t, p, f = TelemetryRow.__table__.c, Prediction.__table__.c, Feedback.__table__.c

        def models(col: Any) -> list[Any]:
            if artifact is not None:
                return [col == artifact]
            return [col.is_not(None), col != other_than, col != ""] if other_than is not None else []

        with self._session() as s:
            conn = s.connection()
            tele = Tele()
            for at, interval_s, count, errors, sum_ms, hist in conn.execute(
                    select(t.received_at, t.interval_s, t.count, t.errors, t.latency_sum_ms, t.latency_hist)
                    .where(t.device_id.in_(ids), t.received_at >= since, t.received_at <= until, *models(t.artifact))):
                if _aware(at) - timedelta(seconds=interval_s) >= since:  # type: ignore[operator]
                    tele.add(Tele(1, count, errors, sum_ms, np.asarray(hist, dtype=np.int64)))
            summ = tele.summary()
            out.update(inferences=tele.count, errors=tele.errors, p95_ms=summ["p95_ms"],
                       latency_hist=tele.hist.tolist() if tele.count else None)
            cs = ConnectionSession.__table__.c
            sessions: dict[str, list[tuple[datetime, datetime | None]]] = {}
            for d, a, b in conn.execute(select(cs.device_id, cs.started_at, cs.ended_at).where(
                    cs.device_id.in_(ids), (cs.ended_at.is_(None)) | (cs.ended_at >= since), cs.started_at <= until)):
                sessions.setdefault(d, []).append((_aware(a), _aware(b)))  # type: ignore[arg-type]
            avail = Avail()
            for dev in s.scalars(select(Device).where(Device.id.in_(ids))):
                avail.add(availability(sessions.get(dev.id, []), dev.first_seen, since, until))
            out["availability"] = avail.summary()["availability"]
            labels: dict[int, list[int]] = {}
            correct = func.sum(case((p.predicted == f.label, 1), else_=0))
            for label, c, n in conn.execute(
                    select(f.label, correct, func.count())
                    .join_from(Prediction.__table__, Feedback.__table__, f.request_id == p.request_id)
                    .where(p.device_id.in_(ids), p.received_at >= since, p.received_at <= until, *models(p.artifact))
                    .group_by(f.label)):
                labels[label] = [int(c), int(n)]
            perf = performance(labels)
            out.update(accuracy=perf["accuracy"], labelled=perf["labelled"])
        return out

    # -- health --------------------------------------------------------------------------------

    def fleet_health(self, window_s: float, now: datetime | None = None, *, group: str | None = None,
                     model: str | None = None, by: str = "device", device: str | None = None) -> dict[str, Any]:
        """Availability, stability and performance over the last ``window_s`` seconds.

        Per device always; with ``by="group"`` or ``by="model"`` also per group / model version
        (in ``rows``); ``fleet`` sums everything selected. ``group`` keeps devices whose label
        ``group`` equals it; ``model`` keeps telemetry of a model given as name, version,
        ``name:version`` or an artifact sha256 prefix (≥ 6 characters).
        """
        if by not in ("device", "group", "model"):
            raise ValueError(f"by must be device, group or model, not {by!r}")
        now = now or self.clock()
        source = "raw" if window_s <= self.raw_query_max_s else "hourly"
        since = now - timedelta(seconds=window_s)
        if source == "hourly":
            since = floor_hour(since)
        with self._session() as s:
            conn = s.connection()
            q = select(Device).order_by(Device.id)
            if device is not None:
                q = q.where(Device.id == device)
            devices = [d for d in s.scalars(q) if group is None or (d.labels or {}).get("group") == group]
            ids = {d.id for d in devices}
            arts = {a.sha256: (a.name, a.version) for a in s.scalars(select(Artifact))}

            def wanted(art: str, mv: str) -> bool:
                return model is None or model_matches(model, art, mv, arts)

            tele = {k: v for k, v in self._telemetry(conn, source, since, now).items()
                    if k[0] in ids and wanted(k[1], k[2])}
            if model is not None:
                ids = {k[0] for k in tele} | {d.id for d in devices
                                              if d.model_artifact and wanted(d.model_artifact, d.model_version or "")}
                devices = [d for d in devices if d.id in ids]
            cs = ConnectionSession.__table__
            sessions: dict[str, list[tuple[datetime, datetime | None]]] = {}
            for d, a, b in conn.execute(select(cs.c.device_id, cs.c.started_at, cs.c.ended_at).where(
                    (cs.c.ended_at.is_(None)) | (cs.c.ended_at >= since), cs.c.started_at <= now)):
                if d in ids:
                    sessions.setdefault(d, []).append((_aware(a), _aware(b)))
            ev = EventRow.__table__
            events: dict[tuple[str, str], int] = {}
            for d, kind, n in conn.execute(select(ev.c.device_id, ev.c.kind, func.count()).where(
                    ev.c.at >= since, ev.c.at <= now).group_by(ev.c.device_id, ev.c.kind)):
                events[(d, kind)] = n
            labels = {k: v for k, v in self._labelled(conn, since, now).items()
                      if k[0] in ids and wanted(k[1], k[2])}
            drifts = {k: v for k, v in self._drift(conn, since, now).items() if k[0] in ids and wanted(k[1], "")}
            baselines = {b.artifact: b.summary for b in s.scalars(
                select(DriftBaseline).where(DriftBaseline.complete.is_(True)))}
            stage_of, services = stage_health(r for r in self._stage_stats(conn, since, now) if r[0] in ids)
            dt_ = DeploymentTarget.__table__.c
            targets = {(a, b): st for a, b, st in conn.execute(select(dt_.deployment_id, dt_.device_id, dt_.state))
                       if b in ids}

            tele_of: dict[str, list[Tele]] = {}
            for k, v in tele.items():
                tele_of.setdefault(k[0], []).append(v)
            labels_of: dict[str, list[dict[int, list[int]]]] = {}
            for k, v in labels.items():
                labels_of.setdefault(k[0], []).append(v)
            drifts_of: dict[str, list[tuple[str, dict[str, list[int]]]]] = {}
            for k, v in drifts.items():
                drifts_of.setdefault(k[0], []).append((k[1], v))
            per_device: list[dict[str, Any]] = []
            groups: dict[str, dict[str, Any]] = {}
            for dev in devices:
                t = merged(tele_of.get(dev.id, []))
                av = availability(sessions.get(dev.id, []), dev.first_seen, since, now)
                lab: dict[int, list[int]] = {}
                for v in labels_of.get(dev.id, []):
                    add_labels(lab, v)
                psis = [drift_psi(v, baselines.get(art)) for art, v in drifts_of.get(dev.id, [])]
                psis = [p for p in psis if p["drift_psi"] is not None]
                worst = max(psis, key=lambda p: p["drift_psi"]) if psis else drift_psi(None, None)
                state = None
                if dev.deployment_id is not None:
                    state = targets.get((dev.deployment_id, dev.id), PENDING)
                restarts = events.get((dev.id, "restart"), 0)
                failures = events.get((dev.id, "deploy_failed"), 0)
                g = (dev.labels or {}).get("group")
                row = {"id": dev.id, "group": g, "online": any(b is None for _, b in sessions.get(dev.id, [])),
                       "model_version": dev.model_version, "model": dev.model_name,
                       "deployment_state": state, **t.summary(), **av.summary(), "restarts": restarts,
                       "model_load_failures": failures, **performance(lab), **worst,
                       "stage": stage_of.get(dev.id)}
                per_device.append(row)
                acc = groups.setdefault(g or "-", {"tele": Tele(), "avail": Avail(), "labels": {},
                                                   "devices": 0, "online": 0, "restarts": 0, "failures": 0})
                acc["tele"].add(t)
                acc["avail"].add(av)
                add_labels(acc["labels"], lab)
                acc["devices"] += 1
                acc["online"] += int(row["online"])
                acc["restarts"] += restarts
                acc["failures"] += failures

            def group_row(key: dict[str, Any], acc: dict[str, Any]) -> dict[str, Any]:
                return {**key, "devices": acc["devices"], "online": acc["online"], **acc["tele"].summary(),
                        **acc["avail"].summary(), "restarts": acc["restarts"],
                        "model_load_failures": acc["failures"], **performance(acc["labels"])}

            fleet: dict[str, Any] = {"tele": Tele(), "avail": Avail(), "labels": {}, "devices": 0,
                                     "online": 0, "restarts": 0, "failures": 0}
            for acc in groups.values():
                fleet["tele"].add(acc["tele"])
                fleet["avail"].add(acc["avail"])
                add_labels(fleet["labels"], acc["labels"])
                for k in ("devices", "online", "restarts", "failures"):
                    fleet[k] += acc[k]
            out: dict[str, Any] = {
                "window_s": window_s, "generated_at": iso(now), "since": iso(since), "source": source,
                "by": by, "group": group, "model_filter": model, "devices": per_device,
                "fleet": group_row({}, fleet), "services": services}
            if by == "group":
                out["rows"] = [group_row({"group": g}, acc) for g, acc in sorted(groups.items())]
            elif by == "model":
                out["rows"] = self._model_rows(tele, labels, drifts, baselines, arts)
        return out

    def _model_rows(self, tele: dict[tuple[str, str, str], Tele], labels: dict[tuple[str, str, str], dict[int, list[int]]],
                    drifts: dict[tuple[str, str], dict[str, list[int]]], baselines: dict[str, Any],
                    arts: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for (d, art, mv), t in tele.items():
            name = arts.get(art, (None, None))[0]
            acc = rows.setdefault((art, mv), {"tele": Tele(), "devices": set(), "labels": {}, "name": name})
            acc["tele"].add(t)
            acc["devices"].add(d)
        for (_, art, mv), lab in labels.items():
            if (art, mv) in rows:
                add_labels(rows[(art, mv)]["labels"], lab)
        out = []
        for (art, mv), acc in sorted(rows.items(), key=lambda kv: (kv[1]["name"] or "", kv[0][1], kv[0][0])):
            summ = [v for k, v in drifts.items() if k[1] == art]
            dr = drift_psi(drift.merge(summ), baselines.get(art)) if summ else drift_psi(None, None)
            out.append({"model": acc["name"], "version": mv or None, "artifact": art or None,
                        "devices": len(acc["devices"]), **acc["tele"].summary(),
                        **performance(acc["labels"]), **dr})
        return out

    def _telemetry(self, conn: Connection, source: str, since: datetime, now: datetime
                   ) -> dict[tuple[str, str, str], Tele]:
        out: dict[tuple[str, str, str], Tele] = {}
        if source == "raw":
            t = TelemetryRow.__table__
            rows = conn.execute(select(t.c.device_id, t.c.artifact, t.c.model_version, t.c.count, t.c.errors,
                                       t.c.latency_sum_ms, t.c.latency_hist)
                                .where(t.c.received_at >= since, t.c.received_at <= now))
            for d, art, mv, count, errors, sum_ms, hist in rows:
                key = (d, art or "", mv or "")
                acc = out.get(key)
                if acc is None:
                    acc = out[key] = Tele()
                acc.intervals += 1
                acc.count += count
                acc.errors += errors
                acc.latency_sum_ms += sum_ms
                acc.hist += np.asarray(hist, dtype=np.int64)
            return out
        h = hourly.c
        cols = [func.sum(h[b]) for b in BUCKETS]
        rows = conn.execute(select(h.device_id, h.artifact, h.model_version, func.sum(h.intervals),
                                   func.sum(h.count), func.sum(h.errors), func.sum(h.latency_sum_ms), *cols)
                            .where(h.hour >= since, h.hour <= now)
                            .group_by(h.device_id, h.artifact, h.model_version))
        for r in rows:
            out[(r[0], r[1], r[2])] = Tele(int(r[3]), int(r[4]), int(r[5]), float(r[6]),
                                           np.asarray(r[7:], dtype=np.int64))
        return out

    def _stage_stats(self, conn: Connection, since: datetime, now: datetime
                     ) -> list[tuple[str, str, int, int, int, int, int, dict[str, float]]]:
        """Summed ``Telemetry.stage`` per device and role over the window (raw rows; like the
        raw aggregates they are kept for the raw retention period)."""
        t = StageTelemetryRow.__table__.c
        sums = ("transfer_ms", "wait_ms", "compute_ms", "forward_ms")
        rows = conn.execute(select(t.device_id, t.service, t.stage, t.stages, func.sum(t.count), func.sum(t.errors),
                                   func.sum(t.timed), *(func.sum(t[k]) for k in sums))
                            .where(t.received_at >= since, t.received_at <= now)
                            .group_by(t.device_id, t.service, t.stage, t.stages))
        return [(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]),
                 {k: float(v or 0.0) for k, v in zip(sums, r[7:], strict=True)}) for r in rows]

    def _labelled(self, conn: Connection, since: datetime, now: datetime
                  ) -> dict[tuple[str, str, str], dict[int, list[int]]]:
        p, f = Prediction.__table__.c, Feedback.__table__.c
        correct = func.sum(case((p.predicted == f.label, 1), else_=0))
        rows = conn.execute(select(p.device_id, p.artifact, p.model_version, f.label, correct, func.count())
                            .join_from(Prediction.__table__, Feedback.__table__, f.request_id == p.request_id)
                            .where(p.received_at >= since, p.received_at <= now)
                            .group_by(p.device_id, p.artifact, p.model_version, f.label))
        out: dict[tuple[str, str, str], dict[int, list[int]]] = {}
        for d, art, mv, label, c, n in rows:
            out.setdefault((d, art, mv), {})[label] = [int(c), int(n)]
        return out

    def _drift(self, conn: Connection, since: datetime, now: datetime) -> dict[tuple[str, str], dict[str, list[int]]]:
        h = drift_hourly.c
        cols = [func.sum(h[c]) for f in drift.FIELDS for c in DRIFT_COLS[f]]
        rows = conn.execute(select(h.device_id, h.artifact, *cols)
                            .where(h.hour >= floor_hour(since), h.hour <= now)
                            .group_by(h.device_id, h.artifact))
        out = {}
        for r in rows:
            values = [int(v) for v in r[2:]]
            out[(r[0], r[1])] = {f: values[i * drift.N_BINS:(i + 1) * drift.N_BINS]
                                 for i, f in enumerate(drift.FIELDS)}
        return out

    def device_detail(self, device_id: str, window_s: float = 86400.0, now: datetime | None = None,
                      limit: int = 20) -> dict[str, Any]:
        """One device: what ``devices`` shows, its latest health report, its health over the
        window, hourly history, recent sessions, deployments and events."""
        now = now or self.clock()
        out = self.device(device_id)
        since = now - timedelta(seconds=window_s)
        with self._session() as s:
            dev = s.get(Device, device_id)
            assert dev is not None
            out["health"] = dev.health
            out["health_at"] = iso(dev.health_at)
            sess = s.scalars(select(ConnectionSession).where(ConnectionSession.device_id == device_id)
                             .order_by(ConnectionSession.started_at.desc(), ConnectionSession.id.desc())
                             .limit(limit)).all()
            out["sessions"] = [{"started_at": iso(x.started_at), "ended_at": iso(x.ended_at),
                                "end_reason": x.end_reason} for x in sess]
            deps = s.execute(select(DeploymentTarget, Deployment, Artifact)
                             .join(Deployment, Deployment.id == DeploymentTarget.deployment_id)
                             .join(Artifact, Artifact.sha256 == Deployment.artifact)
                             .where(DeploymentTarget.device_id == device_id)
                             .order_by(Deployment.created_at.desc()).limit(limit)).all()
            out["deployments"] = [{"id": dep.id, "name": a.name, "version": a.version, "artifact": a.sha256,
                                   "state": t.state, "detail": t.detail, "created_at": iso(dep.created_at),
                                   "updated_at": iso(t.updated_at)} for t, dep, a in deps]
            evs = s.scalars(select(EventRow).where(EventRow.device_id == device_id)
                            .order_by(EventRow.at.desc(), EventRow.id.desc()).limit(limit)).all()
            out["events"] = [{"at": iso(e.at), "kind": e.kind, "detail": e.detail} for e in evs]
            h = hourly.c
            rows = s.connection().execute(
                select(h.hour, func.sum(h.count), func.sum(h.errors), *[func.sum(h[b]) for b in BUCKETS])
                .where(h.device_id == device_id, h.hour >= floor_hour(since), h.hour <= now)
                .group_by(h.hour).order_by(h.hour))
            history = []
            for r in rows:
                t = Tele(0, int(r[1]), int(r[2]), 0.0, np.asarray(r[3:], dtype=np.int64))
                summ = t.summary()
                history.append({"hour": iso(_aware(r[0])), "inferences": t.count, "errors": t.errors,
                                "error_rate": summ["error_rate"], "p50_ms": summ["p50_ms"],
                                "p95_ms": summ["p95_ms"]})
            out["history"] = history
        out["window"] = {k: v for k, v in self.fleet_health(window_s, now, device=device_id)["devices"][0].items()
                         if k not in ("id", "online", "group", "model", "model_version", "deployment_state")}
        out["window"]["window_s"] = window_s
        return out

    # -- feedback, baselines, retention --------------------------------------------------------

    def add_feedback(self, labels: Sequence[tuple[str, int]], now: datetime | None = None) -> dict[str, int]:
        """Store ground-truth labels for request ids (a later label for the same id replaces it)."""
        now = now or self.clock()
        latest = {rid: label for rid, label in labels}
        if not latest:
            return {"stored": 0, "matched": 0}
        f = Feedback.__table__
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            else:
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            stmt = dialect_insert(f)
            stmt = stmt.on_conflict_do_update(index_elements=["request_id"],
                                              set_={"label": stmt.excluded.label, "received_at": stmt.excluded.received_at})
            conn.execute(stmt, [{"request_id": r, "label": lab, "received_at": now} for r, lab in latest.items()])
            p = Prediction.__table__.c
            matched = 0
            keys = list(latest)
            for i in range(0, len(keys), 1000):
                matched += conn.scalar(select(func.count(func.distinct(p.request_id)))
                                       .where(p.request_id.in_(keys[i:i + 1000]))) or 0
        return {"stored": len(latest), "matched": int(matched)}

    def set_baseline(self, artifact: str, summary: dict[str, list[int]], now: datetime | None = None) -> None:
        """Use a baseline computed from the bundle's calibration data (manifest ``drift_baseline``)."""
        now = now or self.clock()
        with self._session() as s, s.begin():
            row = s.get(DriftBaseline, artifact)
            if row is None:
                row = DriftBaseline(artifact=artifact)
                s.add(row)
            row.source, row.intervals, row.complete = "manifest", 0, True
            row.summary, row.updated_at = drift.merge([summary]), now

    def baseline(self, artifact: str) -> dict[str, Any] | None:
        with self._session() as s:
            row = s.get(DriftBaseline, artifact)
            if row is None:
                return None
            return {"artifact": artifact, "source": row.source, "intervals": row.intervals,
                    "complete": row.complete, "summary": row.summary}

    def apply_retention(self, raw_s: float, rollup_s: float, now: datetime | None = None) -> dict[str, int]:
        """Delete raw aggregates (and predictions, feedback) older than ``raw_s`` and rollups,
        closed sessions and events older than ``rollup_s``; return rows deleted per table."""
        now = now or self.clock()
        raw_cut, roll_cut = now - timedelta(seconds=raw_s), now - timedelta(seconds=rollup_s)
        cs = ConnectionSession.__table__
        plan = [(TelemetryRow.__table__, TelemetryRow.__table__.c.received_at < raw_cut),
                (StageTelemetryRow.__table__, StageTelemetryRow.__table__.c.received_at < raw_cut),
                (Prediction.__table__, Prediction.__table__.c.received_at < raw_cut),
                (Feedback.__table__, Feedback.__table__.c.received_at < raw_cut),
                (hourly, hourly.c.hour < floor_hour(roll_cut)),
                (drift_hourly, drift_hourly.c.hour < floor_hour(roll_cut)),
                (EventRow.__table__, EventRow.__table__.c.at < roll_cut),
                (cs, cs.c.ended_at.is_not(None) & (cs.c.ended_at < roll_cut))]
        deleted = {}
        with self.engine.begin() as conn:
            for table, cond in plan:
                deleted[table.name] = conn.execute(delete(table).where(cond)).rowcount or 0
        return deleted


def _aware(dt: datetime | None) -> datetime | None:
    """Core selects on UTCDateTime columns already return aware datetimes; raw ones may not."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def model_matches(pattern: str, artifact: str, model_version: str, arts: dict[str, tuple[str, str]]) -> bool:
    name = arts.get(artifact, (None, None))[0]
    names = {model_version, name, f"{name}:{model_version}", f"{name}@{model_version}"} - {None, ""}
    return pattern in names or (len(pattern) >= 6 and bool(artifact) and artifact.startswith(pattern))

"""JSON message schemas of the wire contract, validated field by field.

Every message that crosses the broker is untrusted. ``decode(kind, payload)`` turns raw bytes
into a frozen dataclass or raises :class:`ProtocolError` saying which field is wrong and why.
Hand-written on purpose: the agent must run with numpy, paho-mqtt and a TFLite runtime only,
so the contract cannot depend on pydantic (the server still uses pydantic for its HTTP API).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from . import histogram
from .errors import ProtocolError
from .topics import DeviceTopic, valid_id

#: Largest JSON control/telemetry message accepted (bytes).
MAX_JSON_BYTES = 64 * 1024
#: Largest value of any float field (seconds, milliseconds, sums of them): 2**53, beyond which a
#: float no longer holds every integer; a sum of such values stays finite in the rollups.
MAX_FLOAT = float(2**53)
#: Largest ``Telemetry.cpu_percent``: 100 % per core, up to 1,000 cores.
MAX_CPU_PERCENT = 100_000.0
#: Largest ``Telemetry.rss_bytes`` (1 PiB; the column is a signed 64-bit integer).
MAX_RSS_BYTES = 2**50
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

AGENT_STATES = (
    "idle",
    "downloading",
    "verifying",
    "smoke_testing",
    "active",
    "failed",
)


def _check(cond: bool, kind: str, name: str, why: str) -> None:
    if not cond:
        raise ProtocolError(f"{kind} message: field {name!r} {why}")


class _Reader:
    """Reads typed fields out of an untrusted dict, naming the message and field on error."""

    def __init__(self, kind: str, data: Any):
        if not isinstance(data, dict):
            raise ProtocolError(f"{kind} message must be a JSON object, got {type(data).__name__}")
        self.kind, self.data = kind, data

    def get(self, name: str, typ: type | tuple[type, ...], *, optional: bool = False, default: Any = None) -> Any:
        if name not in self.data or self.data[name] is None:
            _check(optional, self.kind, name, "is missing")
            return default
        value = self.data[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        # bool is an int in Python; never accept it where a number is meant.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
            _check(abs(value) < 2**1024, self.kind, name, "must be finite")  # float() would overflow
            value, ok = float(value), True
        _check(ok, self.kind, name, f"must be {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")
        if isinstance(value, float):
            _check(math.isfinite(value), self.kind, name, "must be finite")
        return value

    def nonneg_int(self, name: str, *, optional: bool = False, default: int | None = 0, maximum: int = 2**62) -> int:
        value = self.get(name, int, optional=optional, default=default)
        if value is not None:  # absent, with default None
            _check(0 <= value <= maximum, self.kind, name, f"must be in [0, {maximum}], got {value}")
        return value

    def nonneg_float(self, name: str, *, optional: bool = False, default: float | None = 0.0,
                     maximum: float = MAX_FLOAT) -> float | None:
        value = self.get(name, float, optional=optional, default=default)
        if value is not None:
            _check(value >= 0, self.kind, name, f"must be >= 0, got {value}")
            _check(value <= maximum, self.kind, name, f"must be <= {maximum:g}, got {value:g}")
        return value

    def text(self, name: str, *, optional: bool = False, default: str | None = None, max_len: int = 256) -> str | None:
        value = self.get(name, str, optional=optional, default=default)
        if value is not None:
            _check(len(value) <= max_len, self.kind, name, f"is longer than {max_len} characters")
        return value

    def sha(self, name: str, *, optional: bool = False) -> str | None:
        value = self.get(name, str, optional=optional)
        if value is not None:
            _check(bool(_SHA_RE.match(value)), self.kind, name, "must be a lowercase hex sha256")
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.get(name, str)
        _check(value in choices, self.kind, name, f"must be one of {', '.join(choices)}; got {value[:40]!r}")
        return value


class Message:
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class ActiveModel:
    """What a device runs: the deployment, bundle and its role in it (see :class:`Desired`)."""

    deployment_id: str | None
    artifact: str
    name: str
    version: str
    file: str = ""
    service: str = ""
    stage: int = 0
    stages: int = 0

    @classmethod
    def from_reader(cls, r: _Reader) -> ActiveModel:
        return cls(
            deployment_id=r.text("deployment_id", optional=True),
            artifact=r.sha("artifact"),  # type: ignore[arg-type]
            name=r.text("name"),  # type: ignore[arg-type]
            version=r.text("version"),  # type: ignore[arg-type]
            file=r.text("file", optional=True, default="", max_len=128),  # type: ignore[arg-type]
            service=r.text("service", optional=True, default="", max_len=64),  # type: ignore[arg-type]
            stage=r.nonneg_int("stage", optional=True, maximum=64),
            stages=r.nonneg_int("stages", optional=True, maximum=64),
        )

    @classmethod
    def of(cls, d: Desired) -> ActiveModel:
        """The model a device runs once it has carried out desired state ``d``."""
        return cls(d.deployment_id, d.artifact, d.name, d.version, d.file, d.service, d.stage, d.stages)


@dataclass(frozen=True)
class Status(Message):
    """Retained presence of a device; the last will publishes ``state="offline"``."""

    kind: ClassVar[str] = "status"
    state: str
    agent_version: str = ""
    runtime: str = ""
    profile: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 0.0
    active: ActiveModel | None = None
    #: New random id per MQTT connection: a repeated "online" with the same id is a status
    #: update (e.g. a new model), a different id is a reconnect (the old session ended).
    connection: str = ""

    @classmethod
    def from_dict(cls, data: Any) -> Status:
        r = _Reader(cls.kind, data)
        labels = r.get("labels", dict, optional=True, default={})
        _check(len(labels) <= 32, cls.kind, "labels", "has more than 32 entries")
        for k, v in labels.items():
            _check(valid_id(k) and isinstance(v, str) and len(v) <= 64, cls.kind, "labels",
                   f"entry {str(k)[:40]!r} must map an id-like key to a string of at most 64 characters")
        active = r.get("active", dict, optional=True)
        return cls(
            state=r.choice("state", ("online", "offline")),
            agent_version=r.text("agent_version", optional=True, default=""),  # type: ignore[arg-type]
            runtime=r.text("runtime", optional=True, default=""),  # type: ignore[arg-type]
            profile=r.text("profile", optional=True, default=""),  # type: ignore[arg-type]
            labels=dict(labels),
            heartbeat_s=r.nonneg_float("heartbeat_s", optional=True, default=0.0),  # type: ignore[arg-type]
            active=ActiveModel.from_reader(_Reader("status.active", active)) if active is not None else None,
            connection=r.text("connection", optional=True, default="", max_len=64),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Desired(Message):
    """What the server wants a device to run. Retained, so a device that connects late gets it."""

    kind: ClassVar[str] = "desired"
    deployment_id: str
    artifact: str
    size: int
    chunk_size: int
    name: str
    version: str
    #: The model file inside the bundle this device runs: a variant (e.g. ``model-int8.tflite``)
    #: or a pipeline stage (``stage-02.tflite``); "" means the manifest's ``model.file``.
    file: str = ""
    #: Set when the device also serves a shared request topic (see ``topics.service_infer``):
    #: ``service`` names it, ``stage`` (1-based) of ``stages`` says which pipeline stage this
    #: device runs. A data-parallel pool is a one-stage service with several replicas.
    service: str = ""
    stage: int = 0
    stages: int = 0

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @classmethod
    def from_dict(cls, data: Any) -> Desired:
        r = _Reader(cls.kind, data)
        msg = cls(
            deployment_id=r.text("deployment_id", max_len=64),  # type: ignore[arg-type]
            artifact=r.sha("artifact"),  # type: ignore[arg-type]
            size=r.nonneg_int("size", maximum=2**34),
            chunk_size=r.nonneg_int("chunk_size", maximum=8 * 1024 * 1024),
            name=r.text("name"),  # type: ignore[arg-type]
            version=r.text("version"),  # type: ignore[arg-type]
            file=r.text("file", optional=True, default="", max_len=128),  # type: ignore[arg-type]
            service=r.text("service", optional=True, default="", max_len=64),  # type: ignore[arg-type]
            stage=r.nonneg_int("stage", optional=True, maximum=64),
            stages=r.nonneg_int("stages", optional=True, maximum=64),
        )
        _check(msg.size > 0, cls.kind, "size", "must be > 0")
        _check(msg.file == "" or ("/" not in msg.file and not msg.file.startswith(".")), cls.kind, "file",
               "must be a plain file name")
        _check(msg.service == "" or valid_id(msg.service), cls.kind, "service", "must be an id")
        _check((msg.service == "") == (msg.stages == 0) and msg.stage <= msg.stages
               and (msg.stages == 0 or msg.stage >= 1), cls.kind, "stage",
               "and stages must be 1 <= stage <= stages when a service is named, 0 otherwise")
        _check(msg.chunk_size >= 1024, cls.kind, "chunk_size", "must be >= 1024")
        return msg


@dataclass(frozen=True)
class Reported(Message):
    """A device's progress on a deployment."""

    kind: ClassVar[str] = "reported"
    deployment_id: str
    artifact: str
    state: str
    detail: str = ""

    @classmethod
    def from_dict(cls, data: Any) -> Reported:
        r = _Reader(cls.kind, data)
        return cls(
            deployment_id=r.text("deployment_id", max_len=64),  # type: ignore[arg-type]
            artifact=r.sha("artifact"),  # type: ignore[arg-type]
            state=r.choice("state", AGENT_STATES),
            detail=r.text("detail", optional=True, default="", max_len=2000),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Telemetry(Message):
    """One interval's aggregate. ``(device, seq)`` is unique: redelivery never double-counts."""

    kind: ClassVar[str] = "telemetry"
    seq: int
    interval_s: float
    count: int
    errors: int
    latency_hist: list[int]
    latency_sum_ms: float
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    artifact: str | None = None
    model_version: str | None = None
    #: Input/output summary of the interval (``sdk.protocol.drift``): field -> N_BINS counts.
    drift: dict[str, list[int]] | None = None
    #: Sampled predictions of the interval: ``[request_id, predicted_class]`` pairs (for feedback).
    predictions: list[list[Any]] | None = None
    #: The agent's health: a flat object of numbers/strings (temp_c, disk_free_bytes, uptime_s,
    #: restarts, runtime, runtime_version, delegate, threads, ...); see :func:`_health_field`.
    health: dict[str, Any] | None = None
    #: Set while the device serves a pipeline stage or replica pool: where its time went
    #: (sums over the interval), so an operator sees which stage is the bottleneck. See
    #: :func:`_stage_field` for the keys.
    stage: dict[str, Any] | None = None

    MAX_PREDICTIONS: ClassVar[int] = 256

    @classmethod
    def from_dict(cls, data: Any) -> Telemetry:
        # The server decodes 10k of these a second: most pass a few exact type tests; anything
        # else (including every invalid message) goes field by field and the error names the field.
        msg = cls._usual(data)
        return msg if msg is not None else cls._checked(data)

    @classmethod
    def _usual(cls, data: Any) -> Telemetry | None:
        """The message, if its scalar fields are plainly valid; None when unsure. Accepts a subset
        of what :meth:`_checked` accepts and builds the same object; the structured fields (drift,
        health, ...) go through the same checks in the same order, so their errors are the same."""
        if type(data) is not dict:
            return None
        g = data.get
        seq, count, errors, hist = g("seq"), g("count"), g("errors"), g("latency_hist")
        if not (type(seq) is int and type(count) is int and type(errors) is int and type(hist) is list
                and 0 <= seq <= _U62 and 0 <= errors <= count <= _U40 and len(hist) == histogram.N_BUCKETS
                and set(map(type, hist)) == _INT_ONLY and min(hist) >= 0 and max(hist) < _U40
                and sum(hist) == count - errors):
            return None
        interval, sum_ms, cpu = _plain_nonneg(g("interval_s")), _plain_nonneg(g("latency_sum_ms")), g("cpu_percent")
        if interval is None or sum_ms is None or (cpu is not None and (cpu := _plain_nonneg(cpu, MAX_CPU_PERCENT)) is None):
            return None
        rss, art, mv = g("rss_bytes"), g("artifact"), g("model_version")
        if ((rss is not None and not (type(rss) is int and 0 <= rss <= MAX_RSS_BYTES))
                or (art is not None and not (type(art) is str and _SHA_RE.match(art)))
                or (mv is not None and not (type(mv) is str and len(mv) <= 256))):
            return None
        extra: dict[str, Any] = {}
        if g("drift") is not None or g("predictions") is not None or g("health") is not None or g("stage") is not None:
            r = _Reader(cls.kind, data)  # the structured fields: same checks as _checked
            extra = {"drift": _drift_field(r), "predictions": _predictions_field(r, cls.MAX_PREDICTIONS),
                     "health": _health_field(r), "stage": _stage_field(r)}
        return cls(seq=seq, interval_s=interval, count=count, errors=errors, latency_hist=list(hist),
                   latency_sum_ms=sum_ms, cpu_percent=cpu, rss_bytes=rss, artifact=art, model_version=mv,
                   **extra)

    @classmethod
    def _checked(cls, data: Any) -> Telemetry:
        r = _Reader(cls.kind, data)
        hist = r.get("latency_hist", list)
        _check(len(hist) == histogram.N_BUCKETS, cls.kind, "latency_hist",
               f"must have {histogram.N_BUCKETS} buckets, got {len(hist)}")
        _check(_counts_ok(hist, 2**40), cls.kind, "latency_hist", "must hold non-negative integers")
        msg = cls(
            seq=r.nonneg_int("seq"),
            interval_s=r.nonneg_float("interval_s"),  # type: ignore[arg-type]
            count=r.nonneg_int("count", maximum=2**40),
            errors=r.nonneg_int("errors", maximum=2**40),
            latency_hist=list(hist),
            latency_sum_ms=r.nonneg_float("latency_sum_ms"),  # type: ignore[arg-type]
            cpu_percent=r.nonneg_float("cpu_percent", optional=True, default=None, maximum=MAX_CPU_PERCENT),
            rss_bytes=r.nonneg_int("rss_bytes", optional=True, default=None, maximum=MAX_RSS_BYTES),
            artifact=r.sha("artifact", optional=True),
            model_version=r.text("model_version", optional=True),
            drift=_drift_field(r),
            predictions=_predictions_field(r, cls.MAX_PREDICTIONS),
            health=_health_field(r),
            stage=_stage_field(r),
        )
        _check(msg.errors <= msg.count, cls.kind, "errors", "must not exceed count")
        _check(sum(hist) == msg.count - msg.errors, cls.kind, "latency_hist",
               "must count every successful inference exactly once (sum == count - errors)")
        return msg


_U40, _U62 = 2**40, 2**62
_INT_ONLY = {int}


def _plain_nonneg(value: Any, maximum: float = MAX_FLOAT) -> float | None:
    """A JSON number that is plainly a float in [0, maximum] (ints below 2**53 become floats), else None."""
    if type(value) is float:
        return value if 0.0 <= value <= maximum else None  # NaN fails both comparisons
    if type(value) is int and 0 <= value < 2**53 and value <= maximum:
        return float(value)
    return None


def _counts_ok(values: list[Any], limit: int) -> bool:
    """Every value an int (not a bool) in [0, limit); fast: the server checks 10k histograms/s."""
    return all(type(c) is int for c in values) and (not values or (min(values) >= 0 and max(values) < limit))


def _drift_field(r: _Reader) -> dict[str, list[int]] | None:
    from . import drift

    value = r.get("drift", dict, optional=True)
    if value is None:
        return None
    _check(set(value) == set(drift.FIELDS), r.kind, "drift", f"must have exactly the keys {', '.join(drift.FIELDS)}")
    for key in drift.FIELDS:
        counts = value[key]
        _check(isinstance(counts, list) and len(counts) == drift.N_BINS, r.kind, f"drift.{key}",
               f"must be a list of {drift.N_BINS} counts")
        _check(_counts_ok(counts, 2**40), r.kind, f"drift.{key}", "must hold non-negative integers")
    return {k: list(value[k]) for k in drift.FIELDS}


def _health_field(r: _Reader) -> dict[str, Any] | None:
    """Flat: at most 32 id-like keys, each a finite number or a string of at most 128 characters."""
    value = r.get("health", dict, optional=True)
    if value is None:
        return None
    _check(len(value) <= 32, r.kind, "health", "has more than 32 entries")
    for k, v in value.items():
        ok = (isinstance(v, str) and len(v) <= 128) or (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        _check(valid_id(k) and ok, r.kind, f"health.{str(k)[:40]}",
               "must map an id-like key to a finite number or a string of at most 128 characters")
    return dict(value)


#: Keys of ``Telemetry.stage``: which service stage, and per-interval counts and sums (ms).
STAGE_COUNTS = ("count", "errors", "timed")
STAGE_SUMS = ("transfer_ms", "wait_ms", "compute_ms", "forward_ms")


def _stage_field(r: _Reader) -> dict[str, Any] | None:
    """``{service, stage, stages, count, errors, timed, transfer_ms, wait_ms, compute_ms, forward_ms}``:
    requests this stage handled (``errors`` of them failed here), ``timed`` of them carried the
    previous hop's send time; the sums are over successful requests (transfer over ``timed``):
    upstream transfer, queueing, model run, and handing the output to the next stage (or answer)."""
    value = r.get("stage", dict, optional=True)
    if value is None:
        return None
    name = f"{r.kind}.stage"
    allowed = {"service", "stage", "stages", *STAGE_COUNTS, *STAGE_SUMS}
    _check(set(value) == allowed, r.kind, "stage", f"must have exactly the keys {', '.join(sorted(allowed))}")
    s = _Reader(name, value)
    service = s.text("service", max_len=64)
    _check(valid_id(service), name, "service", "must be an id")
    stage, stages = s.nonneg_int("stage", maximum=64), s.nonneg_int("stages", maximum=64)
    _check(1 <= stage <= stages, name, "stage", "must be 1 <= stage <= stages")
    out: dict[str, Any] = {"service": service, "stage": stage, "stages": stages}
    for k in STAGE_COUNTS:
        out[k] = s.nonneg_int(k, maximum=2**40)
    for k in STAGE_SUMS:
        out[k] = s.nonneg_float(k)
    _check(out["errors"] <= out["count"] and out["timed"] <= out["count"] - out["errors"], name, "errors",
           "and timed must not exceed count (timed counts successful requests only)")
    return out


def _predictions_field(r: _Reader, limit: int) -> list[list[Any]] | None:
    value = r.get("predictions", list, optional=True)
    if value is None:
        return None
    _check(len(value) <= limit, r.kind, "predictions", f"has more than {limit} entries")
    for p in value:
        _check(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and 0 < len(p[0]) <= 64
               and isinstance(p[1], int) and not isinstance(p[1], bool) and 0 <= p[1] < 2**31,
               r.kind, "predictions", "must hold [request_id (1-64 chars), class >= 0] pairs")
    return [list(p) for p in value]


@dataclass(frozen=True)
class Heartbeat(Message):
    kind: ClassVar[str] = "heartbeat"
    uptime_s: float
    seq: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> Heartbeat:
        r = _Reader(cls.kind, data)
        return cls(uptime_s=r.nonneg_float("uptime_s"), seq=r.nonneg_int("seq", optional=True))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Fetch(Message):
    """A device asks for chunks of an artifact it was told to install."""

    kind: ClassVar[str] = "fetch"
    MAX_INDEXES: ClassVar[int] = 64
    artifact: str
    indexes: list[int]

    @classmethod
    def from_dict(cls, data: Any) -> Fetch:
        r = _Reader(cls.kind, data)
        idx = r.get("indexes", list)
        _check(0 < len(idx) <= cls.MAX_INDEXES, cls.kind, "indexes", f"must hold 1..{cls.MAX_INDEXES} entries")
        _check(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in idx),
               cls.kind, "indexes", "must hold non-negative integers")
        return cls(artifact=r.sha("artifact"), indexes=list(idx))  # type: ignore[arg-type]


_BY_KIND: dict[DeviceTopic, type] = {
    DeviceTopic.STATUS: Status,
    DeviceTopic.DESIRED: Desired,
    DeviceTopic.REPORTED: Reported,
    DeviceTopic.TELEMETRY: Telemetry,
    DeviceTopic.HEARTBEAT: Heartbeat,
    DeviceTopic.FETCH: Fetch,
}


def decode(kind: DeviceTopic | str, payload: bytes) -> Any:
    """Decode and validate the JSON message that travels on topics of ``kind``."""
    cls = _BY_KIND.get(DeviceTopic(kind))
    if cls is None:
        raise ProtocolError(f"{kind} topics do not carry JSON messages")
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError(f"{cls.kind} message is {len(payload)} bytes, limit is {MAX_JSON_BYTES}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{cls.kind} message is not valid JSON: {exc}") from None
    return cls.from_dict(data)

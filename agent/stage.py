"""Serving a shared service topic: one stage of a pipeline, or one replica of a pool.

When the active model's role names a service (``ActiveModel.service``, from ``Desired``), the agent
subscribes to ``topics.service_group(service, stage)``: an MQTT v5 shared subscription, so the
broker hands each request to one of the stage's replicas. A request is ``.npy`` bytes with a
ResponseTopic and CorrelationData (the original caller's). Stage k runs its model and

* if k < K, publishes its output (converted to stage k+1's input, see
  :func:`sdk.protocol.pipeline.adapt`) on ``topics.service_infer(service, k + 1)`` with the
  caller's ResponseTopic and CorrelationData unchanged, so the last stage answers the caller
  directly;
* if k = K, answers the caller (float32, like the whole model).

Every hop adds its timing to the request's user properties (``sdk.protocol.pipeline``), and
:class:`StageStats` sums them per telemetry interval (``Telemetry.stage``). An error at any stage
answers the caller with a message naming the stage and the device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sdk.protocol import frames, pipeline, topics
from sdk.protocol.errors import BundleError, ModelInputError, ProtocolError
from sdk.protocol.messages import STAGE_COUNTS, STAGE_SUMS, ActiveModel

log = logging.getLogger("edgectl.agent.stage")


class StageStats:
    """Where a stage's time went during one telemetry interval (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._v: dict[str, Any] = {k: 0 for k in STAGE_COUNTS} | {k: 0.0 for k in STAGE_SUMS}

    def record(self, *, ok: bool, transfer_ms: float | None = None, wait_ms: float = 0.0,
               compute_ms: float = 0.0, forward_ms: float = 0.0) -> None:
        with self._lock:
            v = self._v
            v["count"] += 1
            if not ok:
                v["errors"] += 1
                return
            if transfer_ms is not None:
                v["timed"] += 1
                v["transfer_ms"] += max(0.0, transfer_ms)
            v["wait_ms"] += max(0.0, wait_ms)
            v["compute_ms"] += max(0.0, compute_ms)
            v["forward_ms"] += max(0.0, forward_ms)

    def snapshot(self, role: ActiveModel | None) -> dict[str, Any] | None:
        """The interval's ``Telemetry.stage`` (None when the device serves no service); resets."""
        with self._lock:
            v, _ = self._v, self._reset()
        if role is None or not role.service or not (1 <= role.stage <= role.stages):
            return None
        return {"service": role.service, "stage": role.stage, "stages": role.stages,
                **{k: v[k] for k in STAGE_COUNTS}, **{k: round(v[k], 3) for k in STAGE_SUMS}}


def stage_io(bundle: Any, role: ActiveModel) -> dict[str, Any]:
    """The tensor specs a stage converts between: ``in`` (what callers send -> what the model
    takes; stage 1 of a pipeline only) and ``out`` (what the model gives -> what the next stage or
    the caller gets). Empty for a bundle without a pipeline (a replica pool of one model)."""
    pipe = bundle.manifest.get("pipeline")
    if not pipe:
        return {}
    entries = pipe["stages"]
    idx = next((i for i, e in enumerate(entries) if e["file"] == role.file), None)
    if idx is None:
        raise BundleError(f"bundle {role.name} {role.version} has no pipeline stage file {role.file!r}")
    own = entries[idx]
    io = {"out": (own["outputs"][0], entries[idx + 1]["inputs"][0] if idx + 1 < len(entries) else pipe["output"])}
    if idx == 0:
        io["in"] = (pipe["input"], own["inputs"][0])
    return io


class StageServer:
    """The agent's side of shared service topics: subscription, forwarding, answering, stats."""

    def __init__(self, device_id: str, transport: Any, *, record_ok: Callable[[float], None],
                 record_error: Callable[[], None], load_io: Callable[[ActiveModel], dict[str, Any]],
                 record_sample: Callable[[Any, Any, str | None], None] | None = None):
        self.device_id = device_id
        self.transport = transport
        self.record_ok, self.record_error = record_ok, record_error
        #: Input/output summary and sampled predictions (agent.drift): replicas of a whole model
        #: only, since a pipeline stage sees intermediate tensors.
        self.record_sample = record_sample
        self._load_io = load_io
        self.stats = StageStats()
        self._lock = threading.Lock()
        self._filter: str | None = None  # the shared subscription in place
        self._topic: str | None = None  # the topic its messages arrive on
        self._io: tuple[tuple[str, str], dict[str, Any]] | None = None  # ((artifact, file), specs)

    # -- subscription ------------------------------------------------------------------------
    @staticmethod
    def filter_of(role: ActiveModel | None) -> tuple[str, str] | None:
        if role is None or not role.service or not (1 <= role.stage <= role.stages):
            return None
        return topics.service_group(role.service, role.stage), topics.service_infer(role.service, role.stage)

    def sync(self, role: ActiveModel | None, *, reconnected: bool = False) -> None:
        """Make the subscription match ``role``: subscribe, unsubscribe or move. After a
        reconnect the broker has forgotten the old subscription: subscribe again."""
        want = self.filter_of(role)
        with self._lock:
            if reconnected:
                self._filter = self._topic = None
            have = self._filter
            if want is not None and want[0] == have:
                return
            if have is not None:
                unsubscribe = getattr(self.transport, "unsubscribe", None)
                if unsubscribe is not None:
                    unsubscribe([have])
                log.info("left service topic %s", have)
                self._filter = self._topic = None
            if want is not None:
                self._filter, self._topic = want
                self.transport.subscribe([want[0]], qos=1)
                log.info("serving service topic %s", want[0])

    def accepts(self, topic: str) -> bool:
        return topic == self._topic and topic is not None

    # -- requests ----------------------------------------------------------------------------
    def _specs(self, role: ActiveModel) -> dict[str, Any]:
        key = (role.artifact, role.file)
        cached = self._io
        if cached is not None and cached[0] == key:
            return cached[1]
        specs = self._load_io(role)
        self._io = (key, specs)
        return specs

    def busy(self, props: Any, role: ActiveModel | None) -> None:
        """The inference queue is full: tell the caller which stage is overloaded (it may retry)."""
        where = _where(role, self.device_id)
        self.record_error()
        self.stats.record(ok=False)
        self._reply(props, frames.InferResponse(ok=False, error=f"busy: {where} has a full inference queue"),
                    pipeline.user_properties(props))

    def handle(self, payload: bytes, props: Any, received: float, serving: Any) -> None:
        """Run one request as this device's stage; forward or answer. ``received`` is the wall
        time at which the message arrived (paho's thread), ``serving`` the agent's current
        :class:`~agent.core.Serving` (or None)."""
        pairs = pipeline.user_properties(props)
        if not getattr(props, "ResponseTopic", None):
            log.warning("service request without a ResponseTopic dropped")
            self.record_error()
            self.stats.record(ok=False)
            return
        role: ActiveModel | None = serving.info if serving is not None else None
        where = _where(role, self.device_id)
        started = time.time()
        sent = pipeline.sent_at(pairs)
        transfer = max(0.0, (received - sent) * 1000.0) if sent is not None else None
        wait = max(0.0, (started - received) * 1000.0)
        try:
            if role is None or self.filter_of(role) is None:
                raise ModelInputError("this device serves no service stage now (it was re-deployed); retry")
            specs = self._specs(role)
            x = frames.npy_to_tensor(payload)
            if "in" in specs:
                x = pipeline.adapt(x, *specs["in"])
            t0 = time.perf_counter()
            y = serving.model.run(x)
            compute = (time.perf_counter() - t0) * 1000.0
            if self.record_sample is not None and role.stages == 1:
                corr = getattr(props, "CorrelationData", None)
                self.record_sample(x, y, bytes(corr).hex() if corr else None)
        except (ProtocolError, ModelInputError, BundleError) as exc:
            self._fail(props, pairs, f"{where}: {exc}", role)
            return
        except Exception as exc:  # the interpreter raises RuntimeError/ValueError on odd inputs
            self._fail(props, pairs, f"{where}: the model failed on this input: {str(exc).strip()[:300]}", role)
            return
        t1 = time.perf_counter()
        try:
            if "out" in specs:
                y = pipeline.adapt(y, *specs["out"])
        except ModelInputError as exc:
            self._fail(props, pairs, f"{where}: {exc}", role)
            return
        trace = [p for p in pairs if p[0] == pipeline.STAGE]
        trace.append(pipeline.stage_entry(role.stage, self.device_id, transfer, wait, compute))
        if role.stage < role.stages:
            out = Properties(PacketTypes.PUBLISH)
            out.ResponseTopic = props.ResponseTopic
            corr = getattr(props, "CorrelationData", None)
            if corr is not None:
                out.CorrelationData = corr
            out.UserProperty = [*trace, (pipeline.SENT, repr(time.time()))]
            self.transport.publish(topics.service_infer(role.service, role.stage + 1),
                                   frames.tensor_to_npy(y), qos=1, properties=out)
        else:
            self._reply(props, frames.InferResponse(ok=True, output=y, model_version=role.version,
                                                    latency_ms=round(compute, 4)), trace)
        forward = (time.perf_counter() - t1) * 1000.0
        self.record_ok(compute)
        self.stats.record(ok=True, transfer_ms=transfer, wait_ms=wait, compute_ms=compute, forward_ms=forward)

    def _fail(self, props: Any, pairs: list[tuple[str, str]], error: str, role: ActiveModel | None) -> None:
        log.warning("service request failed: %s", error)
        self.record_error()
        self.stats.record(ok=False)
        self._reply(props, frames.InferResponse(ok=False, error=error, model_version=role.version if role else ""),
                    [p for p in pairs if p[0] == pipeline.STAGE])

    def _reply(self, props: Any, response: frames.InferResponse, trace: list[tuple[str, str]]) -> None:
        topic = getattr(props, "ResponseTopic", None)
        if not topic:
            return
        out = Properties(PacketTypes.PUBLISH)
        corr = getattr(props, "CorrelationData", None)
        if corr is not None:
            out.CorrelationData = corr
        if trace:
            out.UserProperty = list(trace)
        self.transport.publish(topic, response.encode(), qos=1, properties=out)


def _where(role: ActiveModel | None, device_id: str) -> str:
    if role is None or not role.service:
        return f"device {device_id}"
    return f"stage {role.stage}/{role.stages} of service {role.service} on device {device_id}"

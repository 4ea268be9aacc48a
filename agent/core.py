"""The agent's logic, driven by messages: deployments, inference, telemetry and heartbeats.

Threads (all daemons, none of them paho's):

* the **deployment worker** owns the state machine, the partial download and the data dir's
  slots; desired states, chunks and timer ticks reach it through one queue, so deployment logic
  is single-threaded and heavy work (verify, smoke test, activation) never runs in a paho callback;
* the **inference worker** answers requests from a bounded queue (full -> answer "busy");
* the **ticker** publishes heartbeats and telemetry and feeds ticks to the deployment worker.

The public ``handle_*`` methods do the work synchronously, so tests can drive an :class:`Agent`
in memory with a fake transport and never start a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sdk.protocol import frames, messages, topics
from sdk.protocol.bundle import read_bundle
from sdk.protocol.errors import BundleError, ModelInputError, ProtocolError
from sdk.protocol.messages import ActiveModel, Desired, Reported, Status
from sdk.protocol.runtime import TFLiteModel, check_sample, select_backend

from .drift import DriftRecorder
from .health import disk_free_bytes, temperature_c
from .machine import Event, State, step
from .slots import DataDir
from .telemetry import Aggregator

log = logging.getLogger("edgectl.agent")

AGENT_VERSION = "0.1.0"


class Transport(Protocol):
    """What the agent needs from MQTT (see :class:`agent.transport.MqttTransport`)."""

    def start(self, on_connect: Callable[[], None],
              on_message: Callable[[str, bytes, Any], None]) -> None: ...
    def subscribe(self, topics: list[str], qos: int = 1) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Any = None) -> Any: ...
    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None: ...


class Model(Protocol):
    """What the agent needs from a loaded model (:class:`TFLiteModel`, or a simulator's stub)."""

    backend: str
    delegate: str

    def run(self, x: Any) -> Any: ...


#: Builds a model from a bundle's ``model.tflite`` bytes; raises BundleError when it cannot.
ModelFactory = Callable[[bytes], Model]


@dataclass(frozen=True)
class Serving:
    """The model that answers inference requests; swapped as a whole under the agent's lock."""

    model: Model
    info: ActiveModel


@dataclass
class Download:
    desired: Desired
    path: Path
    fd: int
    last_progress: float
    received: set[int] = field(default_factory=set)
    pending: deque[int] = field(default_factory=deque)  # never requested yet (or re-queued)
    outstanding: set[int] = field(default_factory=set)  # requested, not yet received
    retries: int = 0

    def chunk_len(self, index: int) -> int:
        d = self.desired
        return d.chunk_size if index < d.chunk_count - 1 else d.size - d.chunk_size * (d.chunk_count - 1)


def _short(artifact: str) -> str:
    return artifact[:12]


def _props_get(props: Any, name: str) -> Any:
    return getattr(props, name, None) if props is not None else None


class Agent:
    def __init__(self, device_id: str, transport: Transport, data: DataDir, *,
                 labels: dict[str, str] | None = None, profile: str = "", heartbeat_s: float = 5.0,
                 telemetry_s: float = 5.0, threads: int = 1, stall_s: float = 20.0,
                 retries: int = 3, window: int = 16, infer_queue: int = 32,
                 clock: Callable[[], float] = time.monotonic, runtime: str | None = None,
                 delegate: str = "xnnpack", restarts: int = 0, model_factory: ModelFactory | None = None):
        self.device_id = topics.check_id(device_id)
        self.transport, self.data = transport, data
        self.labels, self.profile = dict(labels or {}), profile
        self.heartbeat_s, self.telemetry_s, self.threads = heartbeat_s, telemetry_s, threads
        self.stall_s, self.max_retries = stall_s, retries
        self.window = max(1, min(window, messages.Fetch.MAX_INDEXES))
        self.clock = clock
        self.delegate, self.restarts = delegate, restarts
        self.runtime_version = ""
        if model_factory is None:
            try:
                plugin = select_backend(runtime)[0]
                self.runtime, self.runtime_version = plugin.module, plugin.version()
            except BundleError as exc:
                log.error("%s", exc)
                self.runtime = ""

            def model_factory(data: bytes) -> Model:
                return TFLiteModel(data, num_threads=self.threads, backend=runtime, delegate=delegate)
        else:
            self.runtime = "stub"
        self.model_factory: ModelFactory = model_factory
        self._last_tick = clock()
        self.telemetry = Aggregator(clock)
        self.drift = DriftRecorder()  # input/output summary + sampled predictions per interval
        self.state = State.IDLE
        self._lock = threading.Lock()  # guards _serving
        self._serving: Serving | None = None
        self._download: Download | None = None
        self._failed: dict[tuple[str, str], str] = {}  # (deployment_id, artifact) -> detail
        self._deploy_q: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=4096)
        self._infer_q: queue.Queue[tuple[bytes, Any]] = queue.Queue(maxsize=infer_queue)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = clock()
        self._heartbeat_seq = 0
        self._connection = ""
        self.topics = {"desired": topics.desired(device_id), "chunks": topics.chunks(device_id),
                       "infer": topics.infer(device_id)}

    # -- lifecycle ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the active model from the data dir (or its previous slot) and serve it."""
        self.data.clean_downloads()
        loaded = self.data.load()
        if loaded is None:
            log.info("no model installed yet; waiting for a desired state")
            return
        try:
            model = self.model_factory(loaded.bundle.model_bytes)
        except BundleError as exc:
            log.error("installed model %s %s (slot %s) does not load: %s", loaded.model.name,
                      loaded.model.version, loaded.slot, exc)
            return
        with self._lock:
            self._serving = Serving(model, loaded.model)
        self._transition(Event.RESTORED)
        log.info("serving %s %s (%s) from slot %s", loaded.model.name, loaded.model.version,
                 _short(loaded.model.artifact), loaded.slot)

    def start(self) -> None:
        self.restore()
        for name, target in (("deploy", self._deploy_loop), ("infer", self._infer_loop),
                             ("ticker", self._tick_loop)):
            t = threading.Thread(target=target, name=f"edgectl-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.transport.start(self._on_connect, self.on_message)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads, publish the retained offline status and disconnect."""
        self._stop.set()
        for q in (self._deploy_q, self._infer_q):
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)  # type: ignore[arg-type]
        for t in self._threads:
            t.join(timeout)
        self._cancel_download()
        self.transport.stop(final=(topics.status(self.device_id), Status(state="offline").encode()),
                            timeout=timeout)

    def alive(self, stale_s: float = 30.0) -> bool:
        """True while every worker thread runs and the ticker ticked recently (the watchdog's test)."""
        return (bool(self._threads) and all(t.is_alive() for t in self._threads)
                and self.clock() - self._last_tick < stale_s)

    def health(self) -> dict[str, Any]:
        """The board and the agent, flat, for ``Telemetry.health``."""
        with self._lock:
            serving = self._serving
        h: dict[str, Any] = {
            "uptime_s": round(self.clock() - self._started, 1), "restarts": self.restarts,
            "runtime": self.runtime or "none", "runtime_version": self.runtime_version,
            "delegate": serving.model.delegate if serving else self.delegate,
            "threads": self.threads, "profile": self.profile,
            "queue_depth": self._infer_q.qsize(), "dropped": getattr(self.transport, "dropped", 0),
        }
        temp, free = temperature_c(), disk_free_bytes(self.data.root)
        if temp is not None:
            h["temp_c"] = temp
        if free is not None:
            h["disk_free_bytes"] = free
        return h

    @property
    def active(self) -> ActiveModel | None:
        with self._lock:
            return self._serving.info if self._serving else None

    def status(self) -> Status:
        return Status(state="online", agent_version=AGENT_VERSION, runtime=self.runtime,
                      profile=self.profile, labels=self.labels, heartbeat_s=float(self.heartbeat_s),
                      active=self.active, connection=self._connection)

    # -- messages in -------------------------------------------------------------------------
    def _on_connect(self) -> None:
        self._connection = uuid.uuid4().hex[:16]
        self.transport.subscribe(list(self.topics.values()), qos=1)
        self._publish_status()

    def on_message(self, topic: str, payload: bytes, props: Any = None) -> None:
        """Route one incoming message (called on paho's thread: must not block)."""
        if topic == self.topics["infer"]:
            try:
                self._infer_q.put_nowait((payload, props))
            except queue.Full:
                log.warning("inference queue full; answering busy")
                self._answer(props, frames.InferResponse(ok=False, error="busy: the device's inference queue is full"))
            return
        kind = "desired" if topic == self.topics["desired"] else "chunks" if topic == self.topics["chunks"] else None
        if kind is None:
            log.warning("message on unexpected topic %r ignored", topic[:200])
            return
        try:
            self._deploy_q.put_nowait((kind, payload))
        except queue.Full:
            log.warning("deployment queue full; dropped a message on %s (it will be re-requested)", topic)

    # -- threads -----------------------------------------------------------------------------
    def _deploy_loop(self) -> None:
        while not self._stop.is_set():
            item = self._deploy_q.get()
            if item is None:
                return
            kind, payload = item
            try:
                if kind == "desired":
                    self.handle_desired(payload)
                elif kind == "chunks":
                    self.handle_chunk(payload)
                else:
                    self.tick()
            except Exception:  # a bug must not kill the worker: log it and keep going
                log.exception("deployment worker failed on a %s message", kind)

    def _infer_loop(self) -> None:
        while not self._stop.is_set():
            item = self._infer_q.get()
            if item is None:
                return
            try:
                self.handle_infer(*item)
            except Exception:
                log.exception("inference worker failed on a request")

    def _tick_loop(self) -> None:
        next_hb = self.clock() + self.heartbeat_s
        next_tel = self.clock() + self.telemetry_s
        while not self._stop.wait(0.5):
            now = self._last_tick = self.clock()
            try:
                if now >= next_hb:
                    next_hb = now + self.heartbeat_s
                    self.publish_heartbeat()
                if now >= next_tel:
                    next_tel = now + self.telemetry_s
                    self.publish_telemetry()
            except Exception:
                log.exception("ticker failed")
            with contextlib.suppress(queue.Full):
                self._deploy_q.put_nowait(("tick", b""))

    # -- publishing --------------------------------------------------------------------------
    def _publish_status(self) -> None:
        self.transport.publish(topics.status(self.device_id), self.status().encode(), qos=1, retain=True)

    def _report(self, desired: Desired, state: State, detail: str = "") -> None:
        msg = Reported(deployment_id=desired.deployment_id, artifact=desired.artifact,
                       state=state.value, detail=detail[:2000])
        self.transport.publish(topics.reported(self.device_id), msg.encode(), qos=1)

    def publish_heartbeat(self) -> None:
        msg = messages.Heartbeat(uptime_s=round(self.clock() - self._started, 3), seq=self._heartbeat_seq)
        self._heartbeat_seq += 1
        self.transport.publish(topics.heartbeat(self.device_id), msg.encode(), qos=1)

    def publish_telemetry(self) -> None:
        try:
            seq = self.data.take_seq()
        except OSError as exc:
            log.error("cannot persist the telemetry sequence number in %s (%s); interval skipped",
                      self.data.state_path, exc.strerror or exc)
            return
        active = self.active
        msg = self.telemetry.snapshot(seq, artifact=active.artifact if active else None,
                                      model_version=active.version if active else None)
        msg = replace(msg, health=self.health())
        msg = replace(msg, **self.drift.snapshot())
        self.transport.publish(topics.telemetry(self.device_id), msg.encode(), qos=1)

    def _transition(self, event: Event) -> None:
        before, self.state = self.state, step(self.state, event)
        log.info("deployment state %s -> %s (%s)", before.value, self.state.value, event.value)

    # -- inference ---------------------------------------------------------------------------
    def _answer(self, props: Any, response: frames.InferResponse) -> None:
        topic = _props_get(props, "ResponseTopic")
        if not topic:
            log.warning("inference request on %s has no ResponseTopic; dropped", self.topics["infer"])
            self.telemetry.record_error()
            return
        out = Properties(PacketTypes.PUBLISH)
        corr = _props_get(props, "CorrelationData")
        if corr is not None:
            out.CorrelationData = corr
        if response.ok:
            self.telemetry.record_ok(response.latency_ms)
        else:
            self.telemetry.record_error()
        self.transport.publish(topic, response.encode(), qos=1, properties=out)

    def handle_infer(self, payload: bytes, props: Any) -> None:
        if not _props_get(props, "ResponseTopic"):
            self._answer(props, frames.InferResponse(ok=False))  # logs, counts and drops
            return
        with self._lock:
            serving = self._serving
        try:
            x = frames.npy_to_tensor(payload)
            if serving is None:
                raise ModelInputError("no model is active on this device yet")
            t0 = time.perf_counter()
            y = serving.model.run(x)
            ms = (time.perf_counter() - t0) * 1000.0
            corr = _props_get(props, "CorrelationData")
            self.drift.record(x, y, bytes(corr).hex() if corr else None)
        except (ProtocolError, ModelInputError) as exc:
            log.warning("inference request on %s rejected: %s", self.topics["infer"], exc)
            self._answer(props, frames.InferResponse(
                ok=False, error=str(exc), model_version=serving.info.version if serving else ""))
            return
        except Exception as exc:  # the interpreter raises RuntimeError/ValueError on odd inputs
            log.warning("inference failed in the runtime: %s", exc)
            self._answer(props, frames.InferResponse(
                ok=False, error=f"the model failed on this input: {str(exc).strip()[:300]}",
                model_version=serving.info.version))
            return
        self._answer(props, frames.InferResponse(ok=True, output=y, model_version=serving.info.version,
                                                 latency_ms=round(ms, 4)))

    # -- deployment (deployment worker only) -------------------------------------------------
    def handle_desired(self, payload: bytes) -> None:
        topic = self.topics["desired"]
        if not payload:
            log.info("desired state on %s cleared; keeping the current model", topic)
            return
        try:
            desired: Desired = messages.decode(topics.DeviceTopic.DESIRED, payload)
        except ProtocolError as exc:
            log.warning("malformed message on %s: %s", topic, exc)
            return
        log.info("desired: %s %s (%s) deployment %s", desired.name, desired.version,
                 _short(desired.artifact), desired.deployment_id)
        active = self.active
        if active is not None and active.artifact == desired.artifact:
            self._cancel_download()
            self._transition(Event.ALREADY_ACTIVE)
            self._report(desired, State.ACTIVE)
            return
        dl = self._download
        if dl is not None and dl.desired.artifact == desired.artifact:
            log.info("already downloading %s; ignoring the repeated desired state", _short(desired.artifact))
            return
        failed = self._failed.get((desired.deployment_id, desired.artifact))
        if failed is not None:
            log.info("deployment %s already failed here; not retrying it", desired.deployment_id)
            self._report(desired, State.FAILED, failed)
            return
        if dl is not None:
            log.info("desired %s supersedes the download of %s", _short(desired.artifact),
                     _short(dl.desired.artifact))
            self._cancel_download()
        self._transition(Event.DESIRED)
        self._report(desired, State.DOWNLOADING)
        path = self.data.part_path(desired.artifact)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self._fail(desired, f"cannot create the download file {path}: {exc.strerror or exc}")
            return
        dl = Download(desired=desired, path=path, fd=fd, last_progress=self.clock(),
                      pending=deque(range(desired.chunk_count)))
        self._download = dl
        try:
            try:
                os.posix_fallocate(fd, 0, desired.size)
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (None, 95):  # 95: EOPNOTSUPP
                    raise
                os.ftruncate(fd, desired.size)
        except OSError as exc:
            self._fail(desired, f"cannot reserve {desired.size} bytes for the download in {path.parent}: "
                                f"{exc.strerror or exc}")
            return
        self._request_more(dl)

    def _request_more(self, dl: Download) -> None:
        indexes: list[int] = []
        while dl.pending and len(dl.outstanding) < self.window:
            i = dl.pending.popleft()
            if i not in dl.received and i not in dl.outstanding:
                dl.outstanding.add(i)
                indexes.append(i)
        if indexes:
            msg = messages.Fetch(artifact=dl.desired.artifact, indexes=indexes)
            self.transport.publish(topics.fetch(self.device_id), msg.encode(), qos=1)

    def handle_chunk(self, payload: bytes) -> None:
        topic = self.topics["chunks"]
        try:
            chunk = frames.Chunk.decode(payload)
        except ProtocolError as exc:
            log.warning("malformed message on %s: %s", topic, exc)
            return
        dl = self._download
        if dl is None or chunk.artifact != dl.desired.artifact:
            log.warning("chunk %d of %s on %s ignored: not being downloaded", chunk.index,
                        str(chunk.artifact)[:12], topic)
            return
        d = dl.desired
        if chunk.count != d.chunk_count:
            log.warning("chunk %d of %s on %s ignored: count %d, desired state implies %d", chunk.index,
                        _short(d.artifact), topic, chunk.count, d.chunk_count)
            return
        if len(chunk.data) != dl.chunk_len(chunk.index):
            log.warning("chunk %d of %s on %s ignored: %d bytes, expected %d", chunk.index,
                        _short(d.artifact), topic, len(chunk.data), dl.chunk_len(chunk.index))
            return
        if chunk.index in dl.received:
            return
        try:
            os.pwrite(dl.fd, chunk.data, chunk.index * d.chunk_size)
        except OSError as exc:
            self._fail(d, f"cannot write chunk {chunk.index} to {dl.path}: {exc.strerror or exc}")
            return
        dl.received.add(chunk.index)
        dl.outstanding.discard(chunk.index)
        dl.last_progress, dl.retries = self.clock(), 0
        if len(dl.received) == d.chunk_count:
            self._finish(dl)
        elif len(dl.outstanding) <= self.window // 2:
            self._request_more(dl)

    def tick(self) -> None:
        """Re-request missing chunks of a stalled download; give up after ``max_retries``."""
        dl = self._download
        if dl is None or self.clock() - dl.last_progress < self.stall_s:
            return
        d = dl.desired
        missing = sorted(set(range(d.chunk_count)) - dl.received)
        if dl.retries >= self.max_retries:
            self._fail(d, f"download of {d.name} {d.version} ({_short(d.artifact)}) stalled: no chunk "
                          f"arrived for {self.stall_s:g} s after {dl.retries} re-requests "
                          f"({len(dl.received)}/{d.chunk_count} chunks received)")
            return
        dl.retries += 1
        dl.last_progress = self.clock()
        log.warning("download of %s stalled; re-requesting %d missing chunks (retry %d/%d)",
                    _short(d.artifact), len(missing), dl.retries, self.max_retries)
        dl.pending, dl.outstanding = deque(missing), set()
        self._request_more(dl)

    def _cancel_download(self) -> None:
        dl, self._download = self._download, None
        if dl is None:
            return
        with contextlib.suppress(OSError):
            os.close(dl.fd)
        with contextlib.suppress(OSError):
            dl.path.unlink()

    def _fail(self, desired: Desired, detail: str) -> None:
        self._cancel_download()
        self._transition(Event.FAILED)
        self._failed[(desired.deployment_id, desired.artifact)] = detail
        log.error("deployment %s failed: %s", desired.deployment_id, detail)
        self._report(desired, State.FAILED, detail)

    def _finish(self, dl: Download) -> None:
        """Verify, smoke-test, install and swap in a complete download."""
        d = dl.desired
        what = f"{d.name} {d.version} ({_short(d.artifact)})"
        try:
            os.fsync(dl.fd)
            with open(dl.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self._fail(d, f"cannot read back the download {dl.path}: {exc.strerror or exc}")
            return
        self._transition(Event.DOWNLOADED)
        self._report(d, State.VERIFYING)
        digest = hashlib.sha256(data).hexdigest()
        if digest != d.artifact:
            self._fail(d, f"download of {what} is corrupt: it hashes to {digest[:12]}, not to the artifact id")
            return
        try:
            bundle = read_bundle(data)
        except BundleError as exc:
            self._fail(d, f"bundle {what} failed verification: {exc}")
            return
        self._transition(Event.VERIFIED)
        self._report(d, State.SMOKE_TESTING)
        try:
            model = self.model_factory(bundle.model_bytes)
            x, expected = bundle.sample()
            sample = bundle.manifest["sample"]
            diff = check_sample(model, x, expected, float(sample["atol"]), float(sample["rtol"]))
        except (BundleError, ProtocolError) as exc:
            self._fail(d, f"bundle {what} failed on this device: {exc}")
            return
        log.info("smoke test of %s passed (max deviation %.3g)", what, diff)
        info = ActiveModel(deployment_id=d.deployment_id, artifact=d.artifact, name=d.name, version=d.version)
        try:
            slot = self.data.activate(data, info)
        except OSError as exc:
            where = getattr(exc, "filename", None) or self.data.slots_dir
            self._fail(d, f"cannot install {what} in {where}: {exc.strerror or exc}")
            return
        with self._lock:
            self._serving = Serving(model, info)
        self._cancel_download()
        self._transition(Event.SMOKE_PASSED)
        log.info("now serving %s from slot %s", what, slot)
        self._report(d, State.ACTIVE)
        self._publish_status()


"""The agent's logic, driven by messages: deployments, inference, telemetry and heartbeats.

Threads (all daemons, none of them paho's):

* the **deployment worker** owns the state machine, the partial download and the data dir's
  slots; desired states, chunks and timer ticks reach it through one queue, so deployment logic
  is single-threaded and heavy work (verify, smoke test, activation) never runs in a paho callback;
* the **inference worker** answers requests from a bounded queue (full -> answer "busy");
* the **ticker** publishes heartbeats and telemetry and feeds ticks to the deployment worker;
* the **outbox** thread sends the on-disk telemetry spool (agent.outbox) and empties it on PUBACK.

A download survives restarts: its chunks are recorded on disk every few chunks (agent.resume)
and a restart continues from them. ``EDGECTL_CRASH_AT`` (agent.faults) kills the process at a
named step, for the crash-safety tests.

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

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sdk.protocol import frames, messages, topics
from sdk.protocol.bundle import read_bundle
from sdk.protocol.errors import BundleError, ModelInputError, ProtocolError
from sdk.protocol.messages import ActiveModel, Desired, Reported, Status
from sdk.protocol.runtime import TFLiteModel, check_sample, select_backend
from sdk.protocol.signing import verify as verify_signature

from . import resume
from .drift import DriftRecorder
from .faults import crash_point
from .health import disk_free_bytes, temperature_c
from .machine import Event, State, step
from .outbox import Outbox, Spooler
from .slots import DataDir
from .stage import StageServer, stage_io
from .telemetry import Aggregator

log = logging.getLogger("edgectl.agent")

AGENT_VERSION = "0.1.0"


class Transport(Protocol):
    """What the agent needs from MQTT (see :class:`agent.transport.MqttTransport`)."""

    def start(self, on_connect: Callable[[], None],
              on_message: Callable[[str, bytes, Any], None]) -> None: ...
    def subscribe(self, topics: list[str], qos: int = 1) -> None: ...
    def unsubscribe(self, topics: list[str]) -> None: ...
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
    connection: str = ""  # the MQTT connection the chunks were last requested on
    resumed: int = 0  # chunks reused from disk when this download started
    restarted: bool = False  # already restarted from zero once after a corrupt resume
    recorded: int = 0  # len(received) at the last progress checkpoint
    last_checkpoint: float = 0.0

    def chunk_len(self, index: int) -> int:
        d = self.desired
        return d.chunk_size if index < d.chunk_count - 1 else d.size - d.chunk_size * (d.chunk_count - 1)


_ARTIFACTS = topics.ARTIFACT_CHUNKS_WILDCARD.split("+", 1)[0]


def _short(artifact: str) -> str:
    return artifact[:12]


def _next_due(due: float, period: float, now: float) -> float:
    """The next due time after ``due``; after a long stall (more than a period late) a fresh start."""
    nxt = due + period
    return nxt if nxt > now else now + period


def _props_get(props: Any, name: str) -> Any:
    return getattr(props, name, None) if props is not None else None


class Agent:
    def __init__(self, device_id: str, transport: Transport, data: DataDir, *,
                 labels: dict[str, str] | None = None, profile: str = "", heartbeat_s: float = 5.0,
                 telemetry_s: float = 5.0, threads: int = 1, stall_s: float = 20.0,
                 retries: int = 3, window: int = 16, infer_queue: int = 32,
                 clock: Callable[[], float] = time.monotonic, runtime: str | None = None,
                 delegate: str = "xnnpack", restarts: int = 0, model_factory: ModelFactory | None = None,
                 trusted_keys: dict[str, Any] | None = None):
        self.device_id = topics.check_id(device_id)
        #: Ed25519 public keys by key id (``sdk.protocol.signing.trusted_keys``); when set, only
        #: bundles signed by one of them are installed.
        self.trusted_keys = trusted_keys
        self.transport, self.data = transport, data
        self.labels, self.profile = dict(labels or {}), profile
        self.heartbeat_s, self.telemetry_s, self.threads = heartbeat_s, telemetry_s, threads
        self.stall_s, self.max_retries = stall_s, retries
        #: Download progress is recorded (fsync + sidecar) every this many chunks or seconds.
        self.checkpoint_chunks, self.checkpoint_s = 16, 1.0
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
        self._next_hb, self._next_tel = clock() + heartbeat_s, clock() + telemetry_s  # see start()
        self.telemetry = Aggregator(clock)
        self.drift = DriftRecorder()  # input/output summary + sampled predictions per interval
        # Telemetry goes through an on-disk spool and leaves it only on PUBACK (agent.outbox).
        self.outbox = Outbox(data.root / "outbox")
        self.spool = Spooler(self.outbox, transport, topics.telemetry(device_id))
        self.state = State.IDLE
        self._lock = threading.Lock()  # guards _serving
        self._serving: Serving | None = None
        self._download: Download | None = None
        self._failed: dict[tuple[str, str], str] = {}  # (deployment_id, artifact) -> detail
        self._deploy_q: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=4096)
        # (payload, props) for the device's own infer topic; (payload, props, received) for a
        # service stage (see agent.stage)
        self._infer_q: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=infer_queue)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = clock()
        self._heartbeat_seq = 0
        self._connection = ""
        self.topics = {"desired": topics.desired(device_id), "chunks": topics.chunks(device_id),
                       "infer": topics.infer(device_id)}
        #: The shared service topic this device serves (pipeline stage or replica), if any.
        self.stages = StageServer(self.device_id, transport, record_ok=self.telemetry.record_ok,
                                  record_error=self.telemetry.record_error, load_io=self._stage_io,
                                  record_sample=self.drift.record)

    # -- lifecycle ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the active model from the data dir (or its previous slot) and serve it."""
        interrupted = self.data.clean_downloads()
        loaded = self.data.load()
        for p in interrupted:
            if loaded is not None and loaded.model.artifact == p.artifact:
                self.data.discard_download(p.artifact)  # installed before the crash: done
                continue
            log.warning("an interrupted deployment was found: %s for deployment %s stopped while %s "
                        "with %d/%d chunks on disk; it resumes when the desired state names it",
                        _short(p.artifact), p.deployment_id, p.stage, len(p.received), p.chunk_count)
        if loaded is None:
            log.info("no model installed yet; waiting for a desired state")
            return
        try:
            model = self.model_factory(loaded.bundle.files[loaded.bundle.model_entry(loaded.model.file)["file"]])
        except BundleError as exc:
            log.error("installed model %s %s (slot %s) does not load: %s", loaded.model.name,
                      loaded.model.version, loaded.slot, exc)
            return
        with self._lock:
            self._serving = Serving(model, loaded.model)
        self._transition(Event.RESTORED)
        log.info("serving %s %s (%s) from slot %s", loaded.model.name, loaded.model.version,
                 _short(loaded.model.artifact), loaded.slot)

    def start(self, *, ticker: bool = True, spooler: bool = True) -> None:
        """Restore the installed model, start the worker threads, connect.

        ``ticker=False`` and ``spooler=False`` leave two of the threads to the caller, which
        then calls :meth:`tick_once` about every 0.5 s and ``spool.pump()`` (``edgectl-sim``
        runs hundreds of agents per process on a few shared threads).
        """
        self.restore()
        self._next_hb, self._next_tel = self.clock() + self.heartbeat_s, self.clock() + self.telemetry_s
        loops: list[tuple[str, Callable[[], None]]] = [("deploy", self._deploy_loop), ("infer", self._infer_loop)]
        if ticker:
            loops.append(("ticker", self._tick_loop))
        if spooler:
            loops.append(("outbox", lambda: self.spool.run(self._stop)))
        for name, target in loops:
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
        self.spool.wake()
        for t in self._threads:
            t.join(timeout)
        self._cancel_download(keep=True)
        try:  # the last, partial interval: spooled, and sent now if the broker is there
            self.publish_telemetry()
            self.spool.flush(min(2.0, timeout))
        except Exception:
            log.exception("final telemetry failed")
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
            "telemetry_dropped": self.outbox.dropped, "telemetry_spooled": len(self.outbox),
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
        dl = self._download
        if dl is not None:  # the chunk broadcasts of the artifact being downloaded (fan-out)
            self.transport.subscribe([topics.artifact_chunks(dl.desired.artifact)], qos=1)
        self.stages.sync(self.active, reconnected=True)  # a new session has no subscriptions
        self._publish_status()
        self.spool.wake()  # send what was spooled while disconnected

    def on_message(self, topic: str, payload: bytes, props: Any = None) -> None:
        """Route one incoming message (called on paho's thread: must not block)."""
        if topic == self.topics["infer"]:
            try:
                self._infer_q.put_nowait((payload, props))
            except queue.Full:
                log.warning("inference queue full; answering busy")
                self._answer(props, frames.InferResponse(ok=False, error="busy: the device's inference queue is full"))
            return
        if self.stages.accepts(topic):
            try:
                self._infer_q.put_nowait((payload, props, time.time()))
            except queue.Full:
                log.warning("inference queue full; answering busy on %s", topic)
                self.stages.busy(props, self.active)
            return
        kind = "desired" if topic == self.topics["desired"] else "chunks" if topic == self.topics["chunks"] else None
        if kind is None and topic.startswith(_ARTIFACTS) and topic.endswith("/chunks"):
            kind = "fanout"  # a chunk broadcast to every device downloading that artifact
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
                elif kind == "fanout":
                    self.handle_chunk(payload, broadcast=True)
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
        while not self._stop.wait(0.5):
            self.tick_once()

    def tick_once(self) -> None:
        """The ticker's work: a heartbeat and telemetry when due, a tick for the deployment worker."""
        now = self._last_tick = self.clock()
        try:  # due times advance by the period, so ticking late does not stretch the intervals
            if now >= self._next_hb:
                self._next_hb = _next_due(self._next_hb, self.heartbeat_s, now)
                self.publish_heartbeat()
            if now >= self._next_tel:
                self._next_tel = _next_due(self._next_tel, self.telemetry_s, now)
                self.publish_telemetry()
        except Exception:
            log.exception("ticker failed")
        if self._download is not None:  # tick() only watches a download: otherwise let the worker sleep
            with contextlib.suppress(queue.Full):
                self._deploy_q.put_nowait(("tick", b""))

    # -- publishing --------------------------------------------------------------------------
    def _publish_status(self) -> None:
        # The status announces what this device serves; its service subscription follows it.
        self.stages.sync(self.active)
        self.transport.publish(topics.status(self.device_id), self.status().encode(), qos=1, retain=True)

    def _report(self, desired: Desired, state: State, detail: str = "") -> None:
        msg = Reported(deployment_id=desired.deployment_id, artifact=desired.artifact,
                       state=state.value, detail=detail[:2000])
        self.transport.publish(topics.reported(self.device_id), msg.encode(), qos=1)

    def _connected(self) -> bool:
        ev = getattr(self.transport, "connected", None)
        return ev is None or ev.is_set()

    def publish_heartbeat(self) -> None:
        if not self._connected():
            return  # a heartbeat says "alive now": queueing it for later would only mislead
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
        msg = replace(msg, stage=self.stages.stats.snapshot(active))
        self.spool.put(seq, msg.encode())  # on disk first; removed from the spool on PUBACK

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

    def _stage_io(self, role: ActiveModel) -> dict[str, Any]:
        """Tensor specs of the stage ``role`` names, from the installed bundle (see agent.stage)."""
        loaded = self.data.load()
        if loaded is None or loaded.model.artifact != role.artifact:
            raise BundleError(f"the installed bundle is not {role.name} {role.version} any more")
        return stage_io(loaded.bundle, role)

    def infer(self, x: np.ndarray, *, drift: bool = True) -> np.ndarray:
        """Run the active model on ``x`` on the caller's thread: the in-process API for an
        application on the device, without .npy decoding, answer frame or MQTT.

        The same checks as a request over MQTT (dtype, shape) and the same accounting: latency
        and errors go into the interval's telemetry; with ``drift`` the input and output also go
        into its drift summary (copied: the caller may reuse its buffers). Concurrent callers are
        serialized by the model's lock. Raises :class:`ModelInputError` (no model active yet, an
        input that does not fit) or the runtime's own error; both are counted as errors.
        """
        with self._lock:
            serving = self._serving
        if serving is None:
            self.telemetry.record_error()
            raise ModelInputError("no model is active on this device yet")
        t0 = time.perf_counter()
        try:
            y = serving.model.run(x)
        except Exception:
            self.telemetry.record_error()
            raise
        self.telemetry.record_ok((time.perf_counter() - t0) * 1000.0)
        if drift:
            self.drift.record(np.array(x), y.copy())
        return y

    def handle_infer(self, payload: bytes, props: Any, received: float | None = None) -> None:
        """Answer one request; with ``received`` (wall time of arrival) it came on a service
        topic and runs as this device's stage (forwarded or answered by :mod:`agent.stage`)."""
        if received is not None:
            with self._lock:
                serving = self._serving
            self.stages.handle(payload, props, received, serving)
            return
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
            if _role(active) != _role(ActiveModel.of(desired)):
                self._change_role(desired)
                return
            self._transition(Event.ALREADY_ACTIVE)
            self._report(desired, State.ACTIVE)
            return
        dl = self._download
        if dl is not None and dl.desired.artifact == desired.artifact:
            if dl.connection != self._connection:
                # The broker redelivers the retained desired state after every reconnect; chunks
                # requested on the old connection may be lost, so ask again for what is missing.
                log.info("reconnected while downloading %s (%d/%d chunks); re-requesting the rest",
                         _short(desired.artifact), len(dl.received), desired.chunk_count)
                self._rerequest(dl)
            else:
                log.info("already downloading %s; ignoring the repeated desired state", _short(desired.artifact))
            return
        failed = self._failed.get((desired.deployment_id, desired.artifact))
        if failed is not None:
            log.info("deployment %s already failed here; not retrying it", desired.deployment_id)
            self._report(desired, State.FAILED, failed)
            return
        if self._reactivate_previous(desired):
            return
        if dl is not None:
            log.info("desired %s supersedes the download of %s", _short(desired.artifact),
                     _short(dl.desired.artifact))
            self._cancel_download()
        self._start_download(desired)

    def _start_download(self, desired: Desired) -> None:
        """Open the partial download of ``desired`` — reusing the chunks a previous run recorded
        (agent.resume) — and request what is missing."""
        self.data.discard_other_downloads(desired.artifact)
        path = self.data.part_path(desired.artifact)
        progress = resume.load(path)
        if progress is not None and (progress.artifact, progress.size, progress.chunk_size) != (
                desired.artifact, desired.size, desired.chunk_size):
            log.info("the partial download of %s has another size or chunk size; starting from zero",
                     _short(desired.artifact))
            progress = None
        self._transition(Event.DESIRED)
        if progress is None:
            self.data.discard_download(desired.artifact)  # a .part without usable progress
            self._report(desired, State.DOWNLOADING)
        else:
            where = "" if progress.stage == "downloading" else f"; stopped while {progress.stage.replace('_', ' ')}"
            detail = f"resuming: {len(progress.received)}/{desired.chunk_count} chunks already on disk{where}"
            log.info("download of %s %s", _short(desired.artifact), detail)
            self._report(desired, State.DOWNLOADING, detail)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._fail(desired, f"cannot create the download file {path}: {exc.strerror or exc}")
            return
        have = progress.received if progress is not None else set()
        dl = Download(desired=desired, path=path, fd=fd, last_progress=self.clock(), received=set(have),
                      pending=deque(i for i in range(desired.chunk_count) if i not in have),
                      resumed=len(have), restarted=progress.restarted if progress is not None else False,
                      recorded=len(have), last_checkpoint=self.clock())
        self._download = dl
        # Subscribed before the first Fetch, so every broadcast the server makes after reading
        # that Fetch reaches this device (the broker handles one client's packets in order).
        self.transport.subscribe([topics.artifact_chunks(desired.artifact)], qos=1)
        if progress is None:
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
        if len(dl.received) == desired.chunk_count:
            self._finish(dl)
        else:
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
            dl.connection = self._connection

    def _rerequest(self, dl: Download) -> None:
        """Forget what is outstanding and request every missing chunk again, in order."""
        dl.pending = deque(i for i in range(dl.desired.chunk_count) if i not in dl.received)
        dl.outstanding = set()
        self._request_more(dl)

    def _checkpoint(self, dl: Download, stage: str = "downloading") -> None:
        """fsync the ``.part`` file, then record atomically which chunks it holds (agent.resume):
        a recorded chunk is on disk, so a restart continues from here."""
        d = dl.desired
        try:
            os.fsync(dl.fd)
            resume.save(dl.path, resume.Progress(artifact=d.artifact, deployment_id=d.deployment_id,
                                                 size=d.size, chunk_size=d.chunk_size, received=set(dl.received),
                                                 stage=stage, restarted=dl.restarted))
        except OSError as exc:
            log.warning("cannot record the progress of the download of %s (%s); after a restart it "
                        "starts from zero", _short(d.artifact), exc.strerror or exc)
            return
        dl.recorded, dl.last_checkpoint = len(dl.received), self.clock()
        if stage == "downloading":
            crash_point("download.checkpoint")

    def handle_chunk(self, payload: bytes, broadcast: bool = False) -> None:
        """A chunk for this device, or (``broadcast``) one the server sent to every device
        downloading its artifact."""
        topic = "the artifact chunk topic" if broadcast else self.topics["chunks"]
        try:
            chunk = frames.Chunk.decode(payload)
        except ProtocolError as exc:
            log.warning("malformed message on %s: %s", topic, exc)
            return
        dl = self._download
        if dl is None or chunk.artifact != dl.desired.artifact:
            # A broadcast may still arrive just after this device finished (or dropped) the download.
            (log.debug if broadcast else log.warning)("chunk %d of %s on %s ignored: not being downloaded",
                                                      chunk.index, str(chunk.artifact)[:12], topic)
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
        crash_point("download.chunk")
        dl.received.add(chunk.index)
        dl.outstanding.discard(chunk.index)
        dl.last_progress, dl.retries = self.clock(), 0
        if len(dl.received) == d.chunk_count:
            self._finish(dl)
            return
        if (len(dl.received) - dl.recorded >= self.checkpoint_chunks
                or self.clock() - dl.last_checkpoint >= self.checkpoint_s):
            self._checkpoint(dl)
        if len(dl.outstanding) <= self.window // 2:
            self._request_more(dl)

    def tick(self) -> None:
        """Record download progress now and then; re-request missing chunks of a stalled download
        and give up after ``max_retries`` (time spent disconnected from the broker is no stall)."""
        dl = self._download
        if dl is None:
            return
        if len(dl.received) > dl.recorded and self.clock() - dl.last_checkpoint >= self.checkpoint_s:
            self._checkpoint(dl)
        if not self._connected():
            dl.last_progress = self.clock()
            return
        if self.clock() - dl.last_progress < self.stall_s:
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
        self._rerequest(dl)

    def _cancel_download(self, keep: bool = False) -> None:
        """Forget the download in progress; its files too unless ``keep`` (a clean stop: the
        next run resumes it)."""
        dl, self._download = self._download, None
        if dl is None:
            return
        unsubscribe = getattr(self.transport, "unsubscribe", None)
        if unsubscribe is not None:
            unsubscribe([topics.artifact_chunks(dl.desired.artifact)])
        if keep and len(dl.received) > dl.recorded:
            self._checkpoint(dl)
        with contextlib.suppress(OSError):
            os.close(dl.fd)
        if not keep:
            self.data.discard_download(dl.desired.artifact)

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
            self._checkpoint(dl, "verifying")  # fsyncs: every chunk is on disk from here on
            with open(dl.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self._fail(d, f"cannot read back the download {dl.path}: {exc.strerror or exc}")
            return
        self._transition(Event.DOWNLOADED)
        self._report(d, State.VERIFYING)
        crash_point("verify.start")
        digest = hashlib.sha256(data).hexdigest()
        if digest != d.artifact:
            why = f"download of {what} is corrupt: it hashes to {digest[:12]}, not to the artifact id"
            if dl.resumed and not dl.restarted:
                self._restart_from_zero(dl, why)
            else:
                self._fail(d, why)
            return
        try:
            bundle = read_bundle(data)
            signer = verify_signature(bundle, self.trusted_keys) if self.trusted_keys is not None else None
        except BundleError as exc:
            self._fail(d, f"bundle {what} failed verification: {exc}")
            return
        if signer is not None:
            log.info("signature of %s verified: key %s", what, signer)
        crash_point("verify.done")
        self._transition(Event.VERIFIED)
        self._report(d, State.SMOKE_TESTING)
        self._checkpoint(dl, "smoke_testing")
        model = self._smoke_test(bundle, d, what)
        if model is None:
            return
        crash_point("smoke.done")
        info = ActiveModel.of(d)
        try:
            slot = self.data.activate(data, info)
        except OSError as exc:
            where = getattr(exc, "filename", None) or self.data.slots_dir
            self._fail(d, f"cannot install {what} in {where}: {exc.strerror or exc}")
            return
        crash_point("swap.activated")
        with self._lock:
            self._serving = Serving(model, info)
        crash_point("swap.serving")
        self._cancel_download()
        self._transition(Event.SMOKE_PASSED)
        log.info("now serving %s from slot %s", what, slot)
        self._report(d, State.ACTIVE)
        self._publish_status()

    def _restart_from_zero(self, dl: Download, why: str) -> None:
        """A resumed download failed its sha256 check: a reused chunk was bad on disk. Throw
        every chunk away and fetch the whole artifact again, once (recorded in the progress)."""
        d = dl.desired
        log.warning("%s; %d chunks were reused from disk, so the download restarts from zero (once)",
                    why, dl.resumed)
        self._transition(Event.DESIRED)
        self._report(d, State.DOWNLOADING, f"{why}; {dl.resumed} chunks had been reused from disk: "
                                           "restarting the download from zero")
        dl.received, dl.restarted, dl.resumed = set(), True, 0
        dl.retries, dl.last_progress = 0, self.clock()
        self._checkpoint(dl)
        self._rerequest(dl)

    def _smoke_test(self, bundle: Any, d: Desired, what: str) -> Model | None:
        """Load the model file ``d`` names and check it on its sample; None (reported) on failure."""
        try:
            entry = bundle.model_entry(d.file)
            model = self.model_factory(bundle.files[entry["file"]])
            x, expected = bundle.sample(d.file)
            sample = entry["sample"]
            diff = check_sample(model, x, expected, float(sample["atol"]), float(sample["rtol"]))
        except (BundleError, ProtocolError) as exc:
            self._fail(d, f"bundle {what} failed on this device: {exc}")
            return None
        log.info("smoke test of %s%s passed (max deviation %.3g)", what, f" [{d.file}]" if d.file else "", diff)
        return model

    def _reactivate_previous(self, d: Desired) -> bool:
        """A rollback: the desired bundle is the one in the previous slot. Verify it there, smoke-test
        it and swap the slots back, without downloading anything. False when it is not there (or
        unusable): then it is downloaded like any other."""
        if self.state is State.IDLE:
            return False
        loaded = self.data.previous(d.artifact)
        if loaded is None:
            return False
        what = f"{d.name} {d.version} ({_short(d.artifact)})"
        self._cancel_download()
        self._transition(Event.INSTALLED)
        self._report(d, State.SMOKE_TESTING, f"{what} is in slot {loaded.slot}: re-checking it, no download")
        model = self._smoke_test(loaded.bundle, d, what)
        if model is None:
            return True
        info = ActiveModel.of(d)
        try:
            slot = self.data.reactivate_previous(info)
        except OSError as exc:
            self._fail(d, f"cannot switch back to {what} in {self.data.state_path}: {exc.strerror or exc}")
            return True
        with self._lock:
            self._serving = Serving(model, info)
        self._transition(Event.SMOKE_PASSED)
        log.info("rolled back to %s in slot %s without download", what, slot)
        self._report(d, State.ACTIVE, f"rolled back to slot {slot} without download")
        self._publish_status()
        return True

    def _change_role(self, d: Desired) -> None:
        """Same bundle, another role (model file, service stage): re-load from the active slot."""
        what = f"{d.name} {d.version} ({_short(d.artifact)})"
        loaded = self.data.load()
        if loaded is None or loaded.model.artifact != d.artifact:
            self._fail(d, f"the installed copy of {what} is missing from the data dir")
            return
        self._transition(Event.INSTALLED)
        self._report(d, State.SMOKE_TESTING)
        model = self._smoke_test(loaded.bundle, d, what)
        if model is None:
            return
        info = ActiveModel.of(d)
        try:
            self.data.retag(info)
        except OSError as exc:
            self._fail(d, f"cannot record the new role of {what} in {self.data.state_path}: {exc.strerror or exc}")
            return
        with self._lock:
            self._serving = Serving(model, info)
        self._transition(Event.SMOKE_PASSED)
        log.info("now serving %s as %s", what, _describe_role(info))
        self._report(d, State.ACTIVE, f"installed bundle re-used (no download); now {_describe_role(info)}")
        self._publish_status()


def _role(m: ActiveModel) -> tuple[str, str, int, int]:
    return m.file, m.service, m.stage, m.stages


def _describe_role(m: ActiveModel) -> str:
    parts = [f"file {m.file}" if m.file else "the default model file"]
    if m.service:
        parts.append(f"stage {m.stage}/{m.stages} of service {m.service}")
    return ", ".join(parts)

"""Telemetry ingestion in worker processes: ``edgectl-server --ingest-workers N``.

In the server process a telemetry message costs ~40-60 µs in paho (reading the packet,
writing the PUBACK), ~16 µs decoding and validating the JSON and ~40 µs storing it with its
hourly rollup (SQLite; more on PostgreSQL), all under one GIL shared with paho's thread, the
HTTP API and the rest: a few thousand messages/s. A worker process runs a loop of its own, in
one thread: a receive-only MQTT client (:mod:`server.mqttlite`, ~12 µs per message) takes a
share of device telemetry from one shared subscription
(``$share/ID-ingest/edgectl/v1/devices/+/telemetry``, ID = the server's MQTT client id), gathers a batch, stores it
(``Service.handle_batch``), and polls again. The server process keeps every other device
topic: statuses need retained messages, which shared subscriptions do not deliver, and
statuses, heartbeats, reports and fetches must stay in order per device.

What still holds with several writers (see ``Store.ingest``):

* a ``(device, seq)`` is stored once: the unique constraint decides, whichever worker is first;
* rollups are sums, so the order batches commit in does not matter; rows are locked in key order
  (batches wait for each other instead of deadlocking) and a transient conflict retries the batch;
* ``last_seen`` and a device's health only move forward;
* status before telemetry: a worker holds telemetry of a device it does not know yet for up to
  ``HOLD_S`` (its status may still be on its way through the server process); after that it is
  rejected as ``unknown_device``, as the server process would have;
* backpressure: while a worker stores a batch it reads nothing, and the broker keeps the QoS 1
  messages that follow (it sends each client at most ``max_inflight_messages`` unacknowledged);
* acknowledge after commit: a message's PUBACK goes out once the batch holding it is committed
  (or it is rejected for good), so a worker killed with ``kill -9`` loses nothing: what it held
  unacknowledged is delivered again, to its restarted self (its session) or, once its session
  is gone, as the broker decides. The broker sends a worker only ``max_inflight_messages``
  unacknowledged messages (Mosquitto's default is 20; ``server.broker.render_config`` sets
  ``MAX_INFLIGHT``), so a batch is stored as soon as nothing more comes for
  ``FLUSH_IDLE_S``, never waiting for messages the broker will not send before the PUBACKs;
  held messages count against that window too (at most ``HOLD_MAX``). While the database is
  unavailable a batch is offered again with a backoff, unacknowledged;
* a worker's MQTT session is persistent and named after the server's (``ID-ingest-I``): what the
  broker holds for a worker that is down (restarting, or the whole server) waits for it; the
  server process restarts a worker that dies. Mosquitto keeps queueing a share for a persistent
  session nobody uses, so the sessions of workers an earlier run had beyond today's N are ended
  at start (:func:`retire_sessions`);
* ``/v1/info`` and ``/metrics`` show the sums of the workers' counters (sent every ``REPORT_S``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import ssl
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection, wait
from typing import Any

from sdk.protocol import topics
from sdk.protocol.errors import EdgeError, ProtocolError
from sdk.protocol.fsutil import write_atomic
from sdk.protocol.net import parse_broker_url, uses_tls
from sdk.protocol.topics import DeviceTopic

from .config import Config
from .mqttlite import MqttError, Subscriber

log = logging.getLogger("edgectl.server.ingest")

#: Device topics the workers take (everything else stays with the server process).
WORKER_KINDS = (DeviceTopic.TELEMETRY,)
#: Most messages written in one transaction.
BATCH_MAX = 2000
#: Longest a message waits for its batch to fill (s).
BATCH_WAIT_S = 0.2
#: A batch is stored once nothing more arrived for this long (s): the broker may be waiting for
#: the PUBACKs of what it sent (its in-flight window) before it sends more.
FLUSH_IDLE_S = 0.025
#: How long telemetry of a device without a status is held before it is rejected (s).
HOLD_S = 5.0
#: Most messages held at once (beyond, they are handed on and rejected at once). Held messages are
#: not acknowledged yet, so they take part of the broker's in-flight window: keep it well below.
HOLD_MAX = 1000
#: Wait before a batch the database could not take is offered again (doubling up to the max).
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
#: How often held messages (and an unknown device) are looked at again (s).
HOLD_CHECK_S = 0.5
#: How often a worker sends its counters to the server process (s).
REPORT_S = 0.1
#: File in the data dir recording how many workers ran last (their sessions are retired when fewer run).
COUNT_FILE = "ingest-workers"


class IngestError(EdgeError):
    """The ingest workers could not start."""


def worker_client_id(base: str, index: int) -> str:
    return f"{base}-ingest-{index}"


def worker_group(base: str) -> str:
    """The shared-subscription group of one server's workers, named after the server's client id:
    another server on the same broker (its own data dir) gets its own copy of every message, as
    its plain subscriptions would, instead of taking half of this one's."""
    return f"{base}-ingest"


#: A taken message: topic, payload, receive time, acknowledgement token (``Subscriber.receive``).
_Msg = tuple[str, bytes, datetime, int]


class TelemetryConsumer:
    """One worker's MQTT side and batch loop, in one thread: poll the broker (a shared
    subscription to device telemetry, :class:`server.mqttlite.Subscriber`), gather a batch,
    store it (``Service.handle_batch``), repeat. While a batch is stored nothing is read, so the
    broker holds what comes next: backpressure with no queue to bound."""

    def __init__(self, service: Any, broker_url: str, client_id: str, group: str, *, username: str | None = None,
                 password: str | None = None, hold_s: float = HOLD_S):
        self.service, self.hold_s = service, hold_s
        host, port = parse_broker_url(broker_url)
        self.sub = Subscriber(host, port, client_id,
                              [topics.shared(topics.device_wildcard(kind), group) for kind in WORKER_KINDS],
                              username=username, password=password, clean_session=False, tls=_tls(broker_url))
        self.client_id = client_id
        self._held: deque[tuple[float, _Msg, str]] = deque()
        self._absent: dict[str, float] = {}  # device -> when to ask the store about it again
        self._next_check = 0.0
        self._batch: list[_Msg] = []
        self._retry_at = 0.0  # the database was unavailable: store nothing before then
        self._storing = 0  # messages in the batch being stored now
        self._retry_delay = RETRY_MIN_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe (raises IngestError), then run the loop in a thread."""
        self.connect(timeout)
        self._thread = threading.Thread(target=self.run, name="ingest-loop", daemon=True)
        self._thread.start()

    def connect(self, timeout: float = 10.0) -> None:
        try:
            self.sub.connect(timeout)
        except (MqttError, OSError) as exc:
            why = exc.strerror or exc if isinstance(exc, OSError) else exc
            raise IngestError(f"ingest worker {self.client_id} cannot subscribe at {self.sub.host}:{self.sub.port}: "
                              f"{why}") from None
        log.info("ingest worker connected as %s (%s)", self.client_id,
                 "session resumed" if self.sub.session_present else "new session")

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Stop the loop; it stores what it has taken (and hands on what it holds) first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def depth(self) -> int:
        """Messages taken and not stored yet (none of them acknowledged)."""
        return len(self._batch) + len(self._held) + self._storing

    def run(self) -> None:
        """Until stopped: take messages, store them in batches; reconnect when the connection fails."""
        backoff = 1.0
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                if self.sub.sock is None:
                    self.connect()
                    backoff = 1.0
                wait = time.monotonic() < self._retry_at
                if wait and len(self._batch) >= BATCH_MAX:  # the database is away: take no more for now
                    self._stop.wait(min(1.0, self._retry_at - time.monotonic()))
                    got = []
                else:
                    got = self.sub.receive(FLUSH_IDLE_S if self._batch else BATCH_WAIT_S if self._held else REPORT_S)
            except IngestError as exc:
                log.warning("%s; retrying in %gs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(10.0, backoff * 2)
                continue
            except MqttError as exc:
                log.warning("ingest worker %s lost its connection: %s; reconnecting", self.client_id, exc)
                self.sub.close()
                # what was taken is stored (not acknowledged: the broker sends it again, a duplicate)
                if time.monotonic() >= self._retry_at:
                    self._store()
                continue
            if got:
                if not self._batch:
                    started = time.monotonic()
                now = self.service.clock()
                self._batch.extend((t, p, now, token) for t, p, token in got)
            t = time.monotonic()
            full = len(self._batch) >= BATCH_MAX or t - started >= BATCH_WAIT_S
            if t >= self._retry_at and ((self._batch and (full or not got)) or (self._held and t >= self._next_check)):
                self._store()
        self._store(final=True)  # and acknowledged, before the connection closes
        self.sub.close()

    def _store(self, final: bool = False) -> None:
        """Store what was taken (and is not held), then acknowledge it; what the database could
        not take (unavailable) stays, unacknowledged, to be offered again after a backoff."""
        batch, self._batch = self._batch, []
        ready = self._sort_out(batch, final=final)
        if not ready:
            return
        self._storing = len(ready)
        try:
            left = self.service.handle_batch([m[:3] for m in ready], defer_unavailable=True)  # never raises
        finally:
            self._storing = 0
        skip = set(left)
        if self.sub.sock is not None:
            try:
                self.sub.ack(m[3] for i, m in enumerate(ready) if i not in skip)
            except MqttError as exc:  # the run loop reconnects; the broker sends these again
                log.warning("ingest worker %s could not acknowledge a batch: %s", self.client_id, exc)
                self.sub.close()
        if left and not final:
            self._batch[:0] = [ready[i] for i in left]
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
        elif not left:
            self._retry_delay = RETRY_MIN_S

    def _sort_out(self, batch: list[_Msg], final: bool = False) -> list[_Msg]:
        """What to store now; telemetry of devices without a status (yet) waits in ``_held``."""
        now = time.monotonic()
        ready: list[_Msg] = []
        if self._held and (final or now >= self._next_check):
            self._next_check = now + HOLD_CHECK_S
            keep: deque[tuple[float, _Msg, str]] = deque()
            for deadline, item, device in self._held:
                if final or now >= deadline or self._known(device, now):
                    ready.append(item)  # stored now, or rejected as unknown_device
                else:
                    keep.append((deadline, item, device))
            self._held = keep
        for item in batch:
            device = _device_of(item[0])
            if device is None or final or len(self._held) >= HOLD_MAX or self._known(device, now):
                ready.append(item)
            else:
                self._held.append((now + self.hold_s, item, device))
        return ready

    def _known(self, device: str, now: float) -> bool:
        if now < self._absent.get(device, 0.0):
            return False
        try:
            known = self.service.known_device(device)
        except Exception:  # the database is unreachable: storing will fail and count it
            log.exception("cannot look up device %s", device)
            return True
        if known:
            self._absent.pop(device, None)
            return True
        if len(self._absent) > HOLD_MAX:
            self._absent.clear()
        self._absent[device] = now + HOLD_CHECK_S
        return False


def _tls(broker_url: str) -> ssl.SSLContext | None:
    return ssl.create_default_context() if uses_tls(broker_url) else None


def _device_of(topic: str) -> str | None:
    try:
        return topics.parse(topic).device_id
    except ProtocolError:
        return None


# -- the worker process ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    config: Config
    broker_url: str
    client_id: str
    group: str
    username: str | None = None
    password: str | None = None
    hold_s: float = HOLD_S


def _worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process: store telemetry until the server process says stop (or is gone)."""
    from .service import Service
    from .store import Store

    # The server process stops us (after we stored what we took) when it is told to stop; a
    # signal sent to the whole process group (Ctrl-C, systemd) must not kill us before that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.config.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[ingest-{spec.index}]: %(message)s")
    try:
        store = Store(spec.config.db_url, upgrade=False)
    except Exception as exc:
        conn.send(("error", f"ingest worker {spec.index} cannot open the database: "
                            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"))
        return
    service = Service(spec.config, store)
    service.remember_devices()
    consumer = TelemetryConsumer(service, spec.broker_url, spec.client_id, spec.group, username=spec.username,
                                 password=spec.password, hold_s=spec.hold_s)
    try:
        consumer.connect()
    except IngestError as exc:
        conn.send(("error", str(exc)))
        store.close()
        return
    conn.send(("ready", os.getpid()))
    sent_stats: Counter[str] = Counter()
    sent_rejected: Counter[str] = Counter()

    def report() -> None:
        stats, rejected = Counter(service.info()["ingest"]), Counter(service.rejected())
        conn.send(("counts", dict(stats - sent_stats), dict(rejected - sent_rejected), consumer.depth()))
        sent_stats.update(stats - sent_stats)
        sent_rejected.update(rejected - sent_rejected)

    def reporter() -> None:
        try:
            while not (conn.poll(REPORT_S) and conn.recv() == "stop"):
                report()
        except (EOFError, OSError):
            log.warning("the server process is gone; ingest worker %d stops", spec.index)
        consumer.request_stop()

    threading.Thread(target=reporter, name="ingest-report", daemon=True).start()
    try:
        consumer.run()  # returns once stopped, after storing what it took
    finally:
        with contextlib.suppress(OSError):
            report()
        store.close()


# -- the server process's side ---------------------------------------------------------------------


class IngestWorkers:
    """Starts, supervises and stops N worker processes; adds their counters to the service's."""

    def __init__(self, service: Any, broker_url: str, count: int, *, base_client_id: str,
                 username: str | None = None, password: str | None = None, hold_s: float = HOLD_S):
        if count < 1:
            raise ValueError("count must be >= 1")
        self.service, self.broker_url, self.count = service, broker_url, count
        self.group, self.hold_s = worker_group(base_client_id), hold_s
        self.base_client_id, self.username, self.password = base_client_id, username, password
        self._ctx = mp.get_context("spawn")  # never fork a process that runs threads
        self._procs: dict[int, tuple[Any, Connection]] = {}
        self._depth: dict[int, int] = {}
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._supervise, name="ingest-supervisor", daemon=True)
        self.restarts = 0

    def _spec(self, index: int) -> WorkerSpec:
        return WorkerSpec(index, self.service.config, self.broker_url, worker_client_id(self.base_client_id, index),
                          self.group, self.username, self.password, self.hold_s)

    def _spawn(self, index: int) -> None:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(self._spec(index), theirs),
                                 name=f"edgectl-ingest-{index}", daemon=True)
        proc.start()
        theirs.close()
        self._procs[index] = (proc, ours)

    def _await_ready(self, index: int, timeout: float) -> None:
        proc, conn = self._procs[index]
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not self._stopping.is_set():
                if conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    kind, detail = conn.recv()
                    if kind == "ready":
                        return
                    raise IngestError(detail)
        except EOFError:
            pass
        raise IngestError(f"ingest worker {index} did not start within {timeout:g}s "
                          f"(exit code {proc.exitcode}; see its log above)")

    def start(self, timeout: float = 60.0) -> None:
        """Start the workers and wait until each is subscribed; raises IngestError."""
        retire_sessions(self.service.config, self.broker_url, self.base_client_id, keep=self.count,
                        username=self.username, password=self.password)
        for i in range(self.count):
            self._spawn(i)
        try:
            for i in range(self.count):
                self._await_ready(i, timeout)
        except IngestError:
            self.stop()
            raise
        _record_count(self.service.config, self.count)
        self._monitor.start()
        log.info("%d ingest worker(s) take device telemetry (shared subscription group %s)", self.count, self.group)

    def depth(self) -> int:
        """Messages queued or held in the workers (as last reported)."""
        return sum(self._depth.values())

    def _take(self, index: int, message: tuple[Any, ...]) -> None:
        if message[0] == "counts":
            _, stats, rejected, depth = message
            self.service.merge_counts(stats, rejected)
            self._depth[index] = depth

    def _supervise(self) -> None:
        backoff = dict.fromkeys(self._procs, 1.0)
        while not self._stopping.is_set():
            by_conn = {conn: i for i, (_, conn) in self._procs.items()}
            by_sentinel = {proc.sentinel: i for i, (proc, _) in self._procs.items()}
            for obj in wait([*by_conn, *by_sentinel], timeout=1.0):
                if obj in by_conn:
                    i = by_conn[obj]
                    try:
                        while obj.poll():  # type: ignore[union-attr]
                            self._take(i, obj.recv())  # type: ignore[union-attr]
                    except (EOFError, OSError):
                        pass  # its exit shows up on the sentinel
                elif obj in by_sentinel and not self._stopping.is_set():
                    i = by_sentinel[obj]
                    proc, conn = self._procs[i]
                    proc.join(1)
                    conn.close()
                    log.error("ingest worker %d exited (code %s); restarting it in %gs", i, proc.exitcode, backoff[i])
                    if self._stopping.wait(backoff[i]):
                        return
                    backoff[i] = min(30.0, backoff[i] * 2)
                    self._depth.pop(i, None)
                    self.restarts += 1
                    try:
                        self._spawn(i)
                        self._await_ready(i, 60.0)
                        backoff[i] = 1.0
                    except IngestError as exc:
                        log.error("%s", exc)

    def stop(self, timeout: float = 30.0) -> None:
        """Tell every worker to stop, take its last counters, wait for it (then kill it)."""
        self._stopping.set()
        if self._monitor.is_alive():
            self._monitor.join(5)
        for _, conn in self._procs.values():
            with contextlib.suppress(OSError):
                conn.send("stop")
        deadline = time.monotonic() + timeout
        for i, (proc, conn) in self._procs.items():
            try:
                while conn.poll(max(0.0, deadline - time.monotonic())):
                    self._take(i, conn.recv())
            except (EOFError, OSError):
                pass
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("ingest worker %d did not stop in time; killing it", i)
                proc.kill()
                proc.join(5)
            conn.close()
        self._procs.clear()
        self._depth.clear()


def _record_count(config: Config, count: int) -> None:
    try:
        write_atomic(config.data_dir / COUNT_FILE, f"{count}\n".encode())
    except OSError as exc:
        log.warning("cannot record the number of ingest workers in %s: %s", config.data_dir, exc.strerror or exc)


def retire_sessions(config: Config, broker_url: str, base_client_id: str, *, keep: int,
                    username: str | None = None, password: str | None = None) -> list[str]:
    """End the broker sessions of workers an earlier run had beyond ``keep`` (0: none now).

    A persistent session keeps its share of the shared subscription while nobody uses it: the
    broker would go on queueing telemetry there. Connecting with a clean session ends it (what
    it held is dropped, with a warning). Returns the client ids retired.
    """
    path = config.data_dir / COUNT_FILE
    try:
        before = int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); not retiring old ingest sessions", path, exc)
        return []
    host, port = parse_broker_url(broker_url)
    retired = []
    for i in range(keep, before):
        cid = worker_client_id(base_client_id, i)
        sub = Subscriber(host, port, cid, [], username=username, password=password, clean_session=True,
                         tls=_tls(broker_url))
        try:
            sub.connect(timeout=5.0)
        except (MqttError, OSError) as exc:
            log.warning("cannot retire the session of old ingest worker %s: %s", cid, exc)
            continue
        sub.close()
        retired.append(cid)
        log.warning("retired the MQTT session of ingest worker %s (this run has %d); telemetry the broker "
                    "had queued for it is dropped", cid, keep)
    if keep == 0:
        path.unlink(missing_ok=True)
    return retired

"""The MQTT side: subscribe to device topics, queue what arrives, ingest it on one worker thread.

The paho callback thread never touches the database: it only puts (topic, payload, receive
time, packet id) on a bounded queue. One worker thread drains the queue in batches of up to
``BATCH_MAX`` messages (whatever has arrived: it never waits for a batch to fill) and hands each
batch to ``Service.handle_batch`` (one transaction for the telemetry and heartbeats in it).

Acknowledge after commit: the client runs with paho's ``manual_ack``, and the worker sends a
message's PUBACK (``Client.ack``, which only queues the packet for paho's network thread, as
``publish`` does, so it is safe from the worker thread) once the batch holding it is committed or
the message is rejected for good (malformed, unknown device, duplicate). A ``kill -9`` of the
server therefore loses nothing: what it had received but not stored is still unacknowledged in
its broker session, and the broker delivers it again. While the database is unavailable the
batch is offered again with a backoff and nothing of it is acknowledged. The CONNECT property
Receive Maximum (``RECEIVE_MAXIMUM``) lets the broker keep that many QoS 1 messages in flight to
us; more wait in the broker's queue for the session (which must be large enough: see
``server.broker.render_config``). It is below ``QUEUE_SIZE``, so the callback's ``put`` would not
block on QoS 1 traffic; but Mosquitto 2.0.11 overshoots it once PUBACKs flow while publishers
keep publishing (12,000 and more unacknowledged were seen; with no PUBACK at all it stops at
4,096), so the queue does fill, and then ``put`` blocks and paho stops reading (backpressure). That cannot deadlock: the worker drains the queue without waiting for paho's
thread (``Client.ack`` only queues the packet), and never waits for a batch to fill. A PUBACK
goes out only on the connection the message came on: after a reconnect the broker sends again
what was not acknowledged (the store keeps one row per ``(device_id, seq)``).

The server's MQTT session is persistent: one client id per data directory (``DATA/mqtt-client-id``),
``clean_start=False`` and a session expiry of ``SESSION_EXPIRY_S``, so while the server is down
or restarting the broker keeps its subscriptions and queues the devices' QoS 1 messages for it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sdk.protocol import topics
from sdk.protocol.errors import EdgeError
from sdk.protocol.fsutil import write_atomic
from sdk.protocol.net import parse_broker_url, set_nodelay
from sdk.protocol.topics import DeviceTopic

from .service import INGESTED, Service

log = logging.getLogger("edgectl.server.mqtt")

QUEUE_SIZE = 20000
#: Most unacknowledged QoS 1 messages the broker may have in flight to the server (CONNECT's
#: Receive Maximum): two batches, so one fills while the other is stored.
RECEIVE_MAXIMUM = 4096
#: Wait before a batch the database could not take is offered again (doubling up to the max).
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
#: How long the broker keeps the server's session (its subscriptions and the QoS 1 messages
#: that arrive for it) while the server is down: a restart within it loses no telemetry.
SESSION_EXPIRY_S = 86400
#: Upper bound of a chunk message's bytes beyond the chunk itself (frame header, topic, properties).
CHUNK_OVERHEAD = 1024
#: File in the data dir holding the server's MQTT client id (the session's name).
CLIENT_ID_FILE = "mqtt-client-id"
#: Most messages written in one transaction by the ingest worker.
BATCH_MAX = 2000
assert 2 * BATCH_MAX <= RECEIVE_MAXIMUM < QUEUE_SIZE
_STOP = object()
_REPUBLISH = object()
#: A received message: topic, payload, receive time, packet id, QoS, connection generation.
_Item = tuple[str, bytes, datetime, int, int, int]


class BrokerUnreachable(EdgeError):
    """The MQTT broker refused or did not answer the connection."""


class MqttSide:
    """Connects to the broker, subscribes, and feeds the ingest worker; also the Publisher."""

    def __init__(self, service: Service, broker_url: str, *, client_id: str | None = None,
                 session_expiry_s: int = SESSION_EXPIRY_S, kinds: Sequence[DeviceTopic] = INGESTED):
        self.service = service
        #: Device topics this client subscribes to (without telemetry when ingest workers take it).
        self.kinds = tuple(kinds)
        self.host, self.port = parse_broker_url(broker_url)
        # One id per data directory, kept across restarts: the broker holds this session's
        # subscriptions and queues QoS 1 messages for it while the server is down. Servers with
        # their own data dirs (replicas sharing PostgreSQL) never kick each other off.
        self.client_id = client_id or _stable_client_id(service.config.data_dir / CLIENT_ID_FILE)
        self.session_expiry_s = session_expiry_s
        self.max_packet: int | None = None  # the broker's Maximum Packet Size, when it says one
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self._connected = threading.Event()
        self._first_connect: tuple[bool, str] | None = None
        self._first_event = threading.Event()
        self._worker = threading.Thread(target=self._work, name="mqtt-ingest", daemon=True)
        self._stopping = threading.Event()
        #: Counts connections (and losses): a message is acknowledged only on the connection it came on.
        self._generation = 0
        self._ack_lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  protocol=mqtt.MQTTv5, client_id=self.client_id, manual_ack=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        service.publisher = self
        service.queue_depth = self.queue.qsize

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; raises BrokerUnreachable when the broker does not accept us."""
        self._worker.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            self.client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        except OSError as exc:
            raise BrokerUnreachable(f"cannot connect to the MQTT broker at {self.host}:{self.port}: "
                                    f"{exc.strerror or exc}") from None
        self.client.loop_start()
        if not self._first_event.wait(timeout):
            raise BrokerUnreachable(f"the MQTT broker at {self.host}:{self.port} did not answer "
                                    f"within {timeout:g}s")
        ok, why = self._first_connect or (False, "unknown")
        if not ok:
            raise BrokerUnreachable(f"the MQTT broker at {self.host}:{self.port} refused the "
                                    f"connection: {why}")
        chunk = self.service.config.chunk_size
        if self.max_packet is not None and chunk + CHUNK_OVERHEAD > self.max_packet:
            raise BrokerUnreachable(f"the MQTT broker at {self.host}:{self.port} accepts packets of at most "
                                    f"{self.max_packet} bytes: chunks of {chunk} bytes (+ {CHUNK_OVERHEAD} for "
                                    f"the frame header and topic) would be refused; lower --chunk-size")

    def stop(self) -> None:
        """Store (and acknowledge) what has arrived, then disconnect. What arrives meanwhile is
        not acknowledged: the broker delivers it again to the next run."""
        self._stopping.set()
        try:
            if self._worker.is_alive():
                with contextlib.suppress(queue.Full):
                    self.queue.put(_STOP, timeout=10)
                self._worker.join(timeout=30)
        finally:
            try:
                self.client.disconnect()
            finally:
                with contextlib.suppress(queue.Empty):  # paho's thread may wait on a full queue
                    while True:
                        self.queue.get_nowait()
                self.client.loop_stop()

    # -- Publisher -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            # Not connected: paho keeps QoS>0 messages queued and sends them on reconnect.
            log.warning("publish on %s queued or failed: %s", topic, mqtt.error_string(info.rc))

    # -- paho callbacks (paho's thread: no database here) --------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the connection: %s", reason_code)
            if self._first_connect is None:
                self._first_connect = (False, str(reason_code))
                self._first_event.set()
            return
        # Plain subscriptions, not topics.shared(...) for now: a shared subscription does not
        # receive retained messages, and the server needs every device's retained status.
        set_nodelay(client)
        with self._ack_lock:
            self._generation += 1
        client.subscribe([(topics.device_wildcard(kind), 1) for kind in self.kinds])
        dropped = [topics.device_wildcard(kind) for kind in INGESTED if kind not in self.kinds]
        if dropped:  # a resumed session keeps what an earlier run subscribed to
            client.unsubscribe(dropped)
        self.max_packet = getattr(properties, "MaximumPacketSize", None)
        self._connected.set()
        log.info("connected to MQTT broker %s:%d as %s (%s)", self.host, self.port, self.client_id,
                 "session resumed: what arrived while the server was away follows"
                 if getattr(flags, "session_present", False) else "new session")
        if self._first_connect is None:
            self._first_connect = (True, "")
            self._first_event.set()
        else:  # the broker may have lost retained state (e.g. a restarted private broker)
            self.queue.put(_REPUBLISH)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._connected.clear()
        with self._ack_lock:  # PUBACKs of what came on the lost connection are never sent
            self._generation += 1
        if reason_code != 0:
            log.warning("disconnected from MQTT broker: %s (paho reconnects)", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received: datetime = self.service.clock()
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers should refuse these; never let one kill paho's thread
            topic = repr(msg._topic)
        item = (topic, bytes(msg.payload), received, msg.mid, msg.qos, self._generation)
        if self._stopping.is_set():  # the worker may be gone: never block; not acknowledged either way
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(item)
            return
        self.queue.put(item)  # blocks when full: backpressure

    # -- ingest worker -------------------------------------------------------------------------

    def _work(self) -> None:
        """Take what has arrived (up to BATCH_MAX messages), ingest it as one batch, acknowledge it."""
        retry: list[_Item] = []
        delay = RETRY_MIN_S
        while True:
            if retry and self._stopping.wait(delay):
                return  # not acknowledged: the broker delivers it again to the next run
            batch, control = self._gather(retry)
            retry = self._ingest(batch)
            delay = min(RETRY_MAX_S, delay * 2) if retry else RETRY_MIN_S
            if control is _STOP:
                return
            if control is _REPUBLISH:
                try:
                    n = self.service.republish_desired()
                    log.info("republished desired state of %d devices", n)
                except Exception:
                    log.exception("republishing desired states failed")

    def _gather(self, batch: list[_Item]) -> tuple[list[_Item], object]:
        """``batch`` plus what has arrived, up to BATCH_MAX (waits only for a first message)."""
        batch = list(batch)
        while len(batch) < BATCH_MAX:
            try:
                item = self.queue.get_nowait() if batch else self.queue.get()
            except queue.Empty:
                break
            if item is _STOP or item is _REPUBLISH:
                return batch, item
            batch.append(item)
        return batch, None

    def _ingest(self, batch: list[_Item]) -> list[_Item]:
        """Store ``batch``, acknowledge what is done; returns what the database could not take."""
        if not batch:
            return []
        try:
            left = self.service.handle_batch([item[:3] for item in batch], defer_unavailable=True)
        except Exception:  # never expected; keep the worker (and the messages) alive
            log.exception("ingesting a batch of %d messages failed; offering it again", len(batch))
            return batch
        skip = set(left)
        with self._ack_lock:
            generation = self._generation
            for i, (_, _, _, mid, qos, gen) in enumerate(batch):
                if qos and gen == generation and i not in skip:
                    self.client.ack(mid, qos)
        return [batch[i] for i in left]


def _stable_client_id(path: Path) -> str:
    """The client id recorded in ``path``, created (atomically) at first start."""
    try:
        text = path.read_text().strip()
        if text and topics.valid_id(text):
            return text
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read %s (%s); using a new MQTT client id", path, exc.strerror or exc)
    cid = f"edgectl-server-{socket.gethostname()[:20]}-{uuid.uuid4().hex[:8]}"
    cid = "".join(c if c.isalnum() or c in "-_" else "-" for c in cid)
    try:
        write_atomic(path, (cid + "\n").encode())
    except OSError as exc:
        log.warning("cannot record the MQTT client id in %s (%s): messages that arrive while this "
                    "server is down will not wait for it", path, exc.strerror or exc)
    return cid

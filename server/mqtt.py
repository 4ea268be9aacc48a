"""The MQTT side: subscribe to device topics, queue what arrives, ingest it on one worker thread.

The paho callback thread never touches the database: it only puts (topic, payload, receive
time) on a bounded queue, and ``put`` blocks when the queue is full, which pushes back on the
broker instead of growing memory (paho stops reading the socket, so unacknowledged QoS 1
messages wait in the broker, whose per-client queue must be large enough: see
``server.broker.render_config``). One worker thread drains the queue in batches of up to
``BATCH_MAX`` messages and hands each batch to ``Service.handle_batch`` (one transaction for
the telemetry and heartbeats in it), which never raises.

The server's MQTT session is persistent: one client id per data directory (``DATA/mqtt-client-id``),
``clean_start=False`` and a session expiry of ``SESSION_EXPIRY_S``, so while the server is down
or restarting the broker keeps its subscriptions and queues the devices' QoS 1 messages for it.
"""

from __future__ import annotations

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
#: How long the broker keeps the server's session (its subscriptions and the QoS 1 messages
#: that arrive for it) while the server is down: a restart within it loses no telemetry.
SESSION_EXPIRY_S = 86400
#: Upper bound of a chunk message's bytes beyond the chunk itself (frame header, topic, properties).
CHUNK_OVERHEAD = 1024
#: File in the data dir holding the server's MQTT client id (the session's name).
CLIENT_ID_FILE = "mqtt-client-id"
#: Most messages written in one transaction by the ingest worker.
BATCH_MAX = 2000
_STOP = object()
_REPUBLISH = object()


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
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  protocol=mqtt.MQTTv5, client_id=self.client_id)
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
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            if self._worker.is_alive():
                self.queue.put(_STOP)
                self._worker.join(timeout=10)

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
        if reason_code != 0:
            log.warning("disconnected from MQTT broker: %s (paho reconnects)", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received: datetime = self.service.clock()
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers should refuse these; never let one kill paho's thread
            topic = repr(msg._topic)
        self.queue.put((topic, bytes(msg.payload), received))  # blocks when full: backpressure

    # -- ingest worker -------------------------------------------------------------------------

    def _work(self) -> None:
        """Take what has arrived (up to BATCH_MAX messages) and ingest it as one batch."""
        while True:
            batch: list[tuple[str, bytes, datetime]] = []
            item = self.queue.get()
            while True:
                if item is _STOP:
                    self._ingest(batch)
                    return
                if item is _REPUBLISH:
                    self._ingest(batch)
                    batch = []
                    try:
                        n = self.service.republish_desired()
                        log.info("republished desired state of %d devices", n)
                    except Exception:
                        log.exception("republishing desired states failed")
                else:
                    batch.append(item)
                if len(batch) >= BATCH_MAX:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            self._ingest(batch)

    def _ingest(self, batch: list[tuple[str, bytes, datetime]]) -> None:
        if batch:
            self.service.handle_batch(batch)


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

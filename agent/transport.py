"""The one seam between the agent's logic and paho-mqtt.

:class:`MqttTransport` takes and delivers plain values — ``(topic, payload, properties)`` — so
:mod:`agent.core` can be driven in memory by any object with the same ``start`` / ``subscribe`` /
``publish`` / ``stop`` methods. Exceptions raised by handlers are logged here and never reach
paho (whose network thread would otherwise die with them). Each transport runs paho's network
loop on a thread of its own, or, for hundreds of clients in one process (``edgectl-sim``), on
one shared :class:`NetLoop`.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from sdk.protocol.net import parse_broker_url, set_nodelay, tls_options

log = logging.getLogger("edgectl.agent.transport")

MessageHandler = Callable[[str, bytes, "Properties | None"], None]
ConnectHandler = Callable[[], None]
#: Called on paho's thread with (mid, PUBACK reason code) for every acknowledged publish; must
#: not block or take locks held around ``publish`` (paho calls it under its own locks).
PublishListener = Callable[[int, int], None]

#: Outgoing QoS>0 messages kept while disconnected; beyond it publishes are dropped and counted.
MAX_QUEUED = 1000


class MqttTransport:
    """A paho MQTT v5 client with a last will, automatic reconnect and a bounded send queue."""

    def __init__(self, url: str, client_id: str, *, will: tuple[str, bytes] | None = None,
                 keepalive: int = 30, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, loop: NetLoop | None = None):
        """``loop``: run the network side on a shared :class:`NetLoop` instead of a paho thread."""
        self.host, self.port = parse_broker_url(url)
        self.loop = loop
        self.keepalive = keepalive
        self._stopping = False
        self.dropped = 0  # publishes refused because the send queue was full
        self.connected = threading.Event()
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self._client.username_pw_set(username, password)
        tls_options(self._client, url, ca_file)  # mqtts:// only
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(MAX_QUEUED)
        self._on_connect_handler: ConnectHandler | None = None
        self._on_message_handler: MessageHandler | None = None
        self._publish_listeners: list[PublishListener] = []
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread) -----------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        log.info("connected to broker %s:%d", self.host, self.port)
        set_nodelay(client)
        self.connected.set()
        if self._on_connect_handler is not None:
            try:
                self._on_connect_handler()
            except Exception:
                log.exception("connect handler failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self._stopping:
            log.info("disconnected from broker %s:%d", self.host, self.port)
            return
        log.warning("disconnected from broker %s:%d (%s); reconnecting", self.host, self.port, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        code = int(getattr(reason_code, "value", reason_code) or 0)
        for listener in self._publish_listeners:
            try:
                listener(mid, code)
            except Exception:
                log.exception("publish listener failed")

    def _on_message(self, client, userdata, message) -> None:
        if self._on_message_handler is None:
            return
        try:
            self._on_message_handler(message.topic, bytes(message.payload), message.properties)
        except Exception:
            log.exception("handler failed on a message on %s", message.topic)

    # -- the seam ----------------------------------------------------------------------------
    def start(self, on_connect: ConnectHandler, on_message: MessageHandler) -> None:
        """Connect in the background (retrying until the broker answers) and start delivering."""
        self._on_connect_handler, self._on_message_handler = on_connect, on_message
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
        if self.loop is not None:
            self.loop.add(self)
        else:
            self._client.loop_start()

    def add_publish_listener(self, listener: PublishListener) -> None:
        """Be told about every PUBACK (see :data:`PublishListener`)."""
        self._publish_listeners.append(listener)

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        rc, _ = self._client.subscribe([(t, qos) for t in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("subscribe to %s failed: %s", topics, mqtt.error_string(rc))

    def unsubscribe(self, topics: list[str]) -> None:
        rc, _ = self._client.unsubscribe(topics)
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # no connection: nothing to leave
            log.warning("unsubscribe from %s failed: %s", topics, mqtt.error_string(rc))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> mqtt.MQTTMessageInfo | None:
        """Publish; while disconnected QoS 1 messages wait in a bounded queue (then are dropped)."""
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:  # e.g. a wildcard in a client-supplied response topic
            log.warning("cannot publish on %r: %s", topic[:200], exc)
            return None
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.dropped += 1
            log.warning("send queue full: dropped a message on %s (%d dropped so far)", topic, self.dropped)
        return info

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (retained, QoS 1) if connected, then disconnect cleanly."""
        if final is not None and self.connected.is_set():
            info = self.publish(final[0], final[1], qos=1, retain=True)
            if info is not None:
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError) as exc:
                    log.warning("final message on %s not confirmed: %s", final[0], exc)
        self._stopping = True
        self._client.disconnect()
        if self.loop is not None:
            self.loop.remove(self)
        else:
            self._client.loop_stop()


class NetLoop:
    """One thread that runs the network side of many :class:`MqttTransport` s (``edgectl-sim``:
    hundreds of simulated devices per process) instead of one paho thread per client.

    It uses paho's external-loop API: one selector waits on every client's socket; a client with
    data gets ``loop_read``; a client with something to send asks for ``loop_write`` through
    ``on_socket_register_write`` (publishing threads never touch a socket, so all socket I/O of
    a client happens on this thread, as with paho's own loop); every client gets ``loop_misc``
    once a second (keepalive); a client without a connection gets ``reconnect`` after 1 s,
    doubling up to 30 s (paho's own loop does the same). ``reconnect`` blocks this thread for
    the TCP connect: fine for a broker on the LAN, not for thousands of clients of an
    unreachable one.
    """

    #: How often sockets opened or closed by paho are (un)registered and reconnects are tried (s).
    RECONCILE_S = 0.1

    def __init__(self, name: str = "edgectl-netloop"):
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._clients: dict[MqttTransport, list[Any]] = {}  # -> [registered socket, next attempt, backoff]
        self._writes: set[MqttTransport] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, transport: MqttTransport) -> None:
        transport._client.on_socket_register_write = lambda *_: self._want_write(transport)
        with self._lock:
            self._clients[transport] = [None, 0.0, 1.0]
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()
        self._wake()

    def remove(self, transport: MqttTransport, timeout: float = 2.0) -> None:
        """Stop serving a transport, after its ``disconnect``: first wait (up to ``timeout``)
        until this loop has written the DISCONNECT and paho closed the socket."""
        deadline = time.monotonic() + timeout
        while (transport._client.socket() is not None and time.monotonic() < deadline
               and self._thread.is_alive() and threading.current_thread() is not self._thread):
            time.sleep(0.01)
        with self._lock:
            state = self._clients.pop(transport, None)
            self._writes.discard(transport)
        if state is not None and state[0] is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(state[0])

    def __len__(self) -> int:
        return len(self._clients)

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(5)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is already pending
            self._wake_w.send(b"x")

    def _want_write(self, transport: MqttTransport) -> None:
        with self._lock:
            self._writes.add(transport)
        self._wake()

    def _reconcile(self, now: float) -> None:
        """(Un)register sockets paho opened or closed; reconnect clients due for it."""
        with self._lock:
            clients = list(self._clients.items())
        for t, state in clients:
            c = t._client
            if c.socket() is None and not t._stopping and now >= state[1]:
                try:
                    c.reconnect()
                    state[2] = 1.0
                except (OSError, ValueError) as exc:
                    log.debug("connect to %s:%d failed: %s", t.host, t.port, exc)
                    state[1], state[2] = now + state[2], min(30.0, state[2] * 2)
            sock = c.socket()
            if sock is not state[0]:
                if state[0] is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.unregister(state[0])
                state[0] = sock
                if sock is not None:
                    self._sel.register(sock, selectors.EVENT_READ, t)
                    self._write(t)  # CONNECT

    def _run(self) -> None:
        next_reconcile = next_misc = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_reconcile:
                next_reconcile = now + self.RECONCILE_S
                self._reconcile(now)
            with self._lock:
                writes, self._writes = self._writes, set()
            for t in writes:
                self._write(t)
            if now >= next_misc:
                next_misc = now + 1.0
                with self._lock:
                    clients = list(self._clients)
                for t in clients:
                    if t._client.socket() is not None:
                        t._client.loop_misc()  # keepalive: PINGREQ, or give up on a silent broker
            for key, _ in self._sel.select(timeout=self.RECONCILE_S):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                self._read(key.data)

    def _read(self, t: MqttTransport) -> None:
        c = t._client
        try:
            c.loop_read()
            sock = c.socket()
            while sock is not None and getattr(sock, "pending", None) and sock.pending():  # TLS: decrypted, unread
                c.loop_read()
                sock = c.socket()
        except Exception:
            log.exception("network loop: reading from %s:%d failed", t.host, t.port)
        self._write(t)  # answers (PUBACK, and what on_connect/on_message published) go out at once

    def _write(self, t: MqttTransport) -> None:
        c = t._client
        if c.socket() is None or not c.want_write():
            return
        try:
            c.loop_write()
        except Exception:
            log.exception("network loop: writing to %s:%d failed", t.host, t.port)
        if c.socket() is not None and c.want_write():  # a partial write: again on the next pass
            with self._lock:
                self._writes.add(t)

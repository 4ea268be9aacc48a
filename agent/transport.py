"""The one seam between the agent's logic and paho-mqtt.

:class:`MqttTransport` takes and delivers plain values — ``(topic, payload, properties)`` — so
:mod:`agent.core` can be driven in memory by any object with the same ``start`` / ``subscribe`` /
``publish`` / ``stop`` methods. Exceptions raised by handlers are logged here and never reach
paho (whose network thread would otherwise die with them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from sdk.protocol.net import parse_broker_url, set_nodelay

log = logging.getLogger("edgectl.agent.transport")

MessageHandler = Callable[[str, bytes, "Properties | None"], None]
ConnectHandler = Callable[[], None]

#: Outgoing QoS>0 messages kept while disconnected; beyond it publishes are dropped and counted.
MAX_QUEUED = 1000


class MqttTransport:
    """A paho MQTT v5 client with a last will, automatic reconnect and a bounded send queue."""

    def __init__(self, url: str, client_id: str, *, will: tuple[str, bytes] | None = None,
                 keepalive: int = 30, username: str | None = None, password: str | None = None):
        self.host, self.port = parse_broker_url(url)
        self.keepalive = keepalive
        self._stopping = False
        self.dropped = 0  # publishes refused because the send queue was full
        self.connected = threading.Event()
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self._client.username_pw_set(username, password)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(MAX_QUEUED)
        self._on_connect_handler: ConnectHandler | None = None
        self._on_message_handler: MessageHandler | None = None
        self._client.on_connect = self._on_connect
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
        self._client.loop_start()

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        rc, _ = self._client.subscribe([(t, qos) for t in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("subscribe to %s failed: %s", topics, mqtt.error_string(rc))

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
        self._client.loop_stop()

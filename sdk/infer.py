"""Send inference requests to devices over MQTT v5 request/response.

A request is ``.npy`` bytes on the device's infer topic, with a ResponseTopic and
CorrelationData; the agent answers an :class:`~sdk.protocol.frames.InferResponse` frame.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .protocol import EdgeError, topics
from .protocol.frames import InferResponse, tensor_to_npy
from .protocol.net import parse_broker_url, set_nodelay


class InferenceClient:
    """A small MQTT v5 client that can have many requests in flight."""

    def __init__(self, broker_url: str, client_id: str | None = None, connect_timeout: float = 10.0):
        host, port = parse_broker_url(broker_url)
        self.client_id = client_id or f"edgectl-cli-{uuid.uuid4().hex[:10]}"
        self._pending: dict[bytes, Future[InferResponse]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._mqtt = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                 client_id=self.client_id, protocol=mqtt.MQTTv5)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message
        self._response_topic = topics.client_responses(self.client_id)
        try:
            self._mqtt.connect(host, port, keepalive=30)
        except OSError as exc:
            raise EdgeError(f"cannot connect to broker {broker_url}: {exc}") from None
        self._mqtt.loop_start()
        if not self._ready.wait(connect_timeout):
            self.close()
            raise EdgeError(f"broker {broker_url} did not accept the connection within {connect_timeout}s")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        set_nodelay(client)
        client.subscribe(self._response_topic, qos=1)
        self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            fut = self._pending.pop(bytes(corr), None) if corr else None
        if fut is None:
            return
        try:
            fut.set_result(InferResponse.decode(msg.payload))
        except EdgeError as exc:
            fut.set_result(InferResponse(ok=False, error=f"unreadable answer: {exc}"))

    def submit(self, device_id: str, x: np.ndarray) -> Future[InferResponse]:
        corr = uuid.uuid4().bytes
        fut: Future[InferResponse] = Future()
        with self._lock:
            self._pending[corr] = fut
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self._response_topic
        props.CorrelationData = corr
        self._mqtt.publish(topics.infer(device_id), tensor_to_npy(x), qos=1, properties=props)
        return fut

    def infer(self, device_id: str, x: np.ndarray, timeout: float = 10.0) -> InferResponse:
        fut = self.submit(device_id, x)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise EdgeError(f"device {device_id} did not answer within {timeout}s") from None

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

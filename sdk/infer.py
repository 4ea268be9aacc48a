"""Send inference requests to devices over MQTT v5 request/response.

A request is ``.npy`` bytes on the device's infer topic, with a ResponseTopic and
CorrelationData; the agent answers an :class:`~sdk.protocol.frames.InferResponse` frame.

A **service** (``edgectl push --replicas`` or a pipeline bundle) is asked on its stage-1 topic
(``topics.service_infer``); the broker hands the request to one replica and the last stage
answers. A replica can vanish with a request in flight (kill -9, power cut): inference is
idempotent, so :meth:`InferenceClient.submit_service` sends the same request again (same
CorrelationData) when no answer came within ``timeout`` or a replica answered "busy", up to
``retries`` times, then fails with a clear timeout. The first answer wins; later copies are ignored.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .protocol import EdgeError, pipeline, topics
from .protocol.frames import InferResponse, tensor_to_npy
from .protocol.net import parse_broker_url, set_nodelay, tls_options


@dataclass
class _Retrying:
    """A service request the client may send again."""

    future: Future[InferResponse]
    service: str
    payload: bytes
    timeout: float
    retries_left: int
    deadline: float
    attempts: int = 1


def _retryable(resp: InferResponse) -> bool:
    """Answers that say "ask again" (another replica may take it): a full queue, a re-deployed stage."""
    return not resp.ok and (resp.error.startswith("busy:") or "re-deployed" in resp.error)


class InferenceClient:
    """A small MQTT v5 client that can have many requests in flight."""

    def __init__(self, broker_url: str, client_id: str | None = None, connect_timeout: float = 10.0, *,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None):
        host, port = parse_broker_url(broker_url)
        self.client_id = client_id or f"edgectl-cli-{uuid.uuid4().hex[:10]}"
        self._pending: dict[bytes, Future[InferResponse]] = {}
        self._retrying: dict[bytes, _Retrying] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._retrier: threading.Thread | None = None
        #: Service requests sent again (timeouts and busy answers), for benchmarks and tests.
        self.resent = 0
        self._ready = threading.Event()
        self._mqtt = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                 client_id=self.client_id, protocol=mqtt.MQTTv5)
        if username:  # e.g. the server's operator account (DATA/broker/operator.password)
            self._mqtt.username_pw_set(username, password)
        try:
            tls_options(self._mqtt, broker_url, ca_file)  # mqtts:// only
        except (OSError, ValueError) as exc:
            raise EdgeError(f"cannot set up TLS for {broker_url} (CA file {ca_file}): {exc}") from None
        self._refused: str | None = None
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message
        self._response_topic = topics.client_responses(self.client_id)
        try:
            self._mqtt.connect(host, port, keepalive=30)
        except OSError as exc:
            raise EdgeError(f"cannot connect to broker {broker_url}: {exc}") from None
        self._mqtt.loop_start()
        if not self._ready.wait(connect_timeout) or self._refused:
            self.close()
            if self._refused:
                raise EdgeError(f"broker {broker_url} refused the connection: {self._refused}")
            raise EdgeError(f"broker {broker_url} did not accept the connection within {connect_timeout}s")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if getattr(rc, "is_failure", False):
            self._refused = str(rc)
            self._ready.set()
            return
        set_nodelay(client)
        client.subscribe(self._response_topic, qos=1)
        self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        if not corr:
            return
        key = bytes(corr)
        try:
            resp = InferResponse.decode(msg.payload)
        except EdgeError as exc:
            resp = InferResponse(ok=False, error=f"unreadable answer: {exc}")
        trace = pipeline.trace_of(pipeline.user_properties(msg.properties))
        if trace:
            resp = replace(resp, trace=tuple(trace))
        with self._lock:
            fut = self._pending.pop(key, None)
            entry = None
            if fut is None:
                entry = self._retrying.get(key)
                if entry is not None and _retryable(resp) and entry.retries_left > 0:
                    entry.deadline = 0.0  # the retry thread sends it again now
                    return
                self._retrying.pop(key, None)
        if fut is None and entry is not None:
            fut = entry.future
        if fut is not None and not fut.done():
            fut.set_result(resp)

    def _publish(self, topic: str, payload: bytes, corr: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self._response_topic
        props.CorrelationData = corr
        props.UserProperty = [(pipeline.SENT, repr(time.time()))]  # stage 1 measures the transfer
        self._mqtt.publish(topic, payload, qos=1, properties=props)

    def submit_service(self, service: str, x: np.ndarray, *, timeout: float = 10.0, retries: int = 2) -> Future[InferResponse]:
        """Ask a service (stage 1 of a pipeline / any replica); re-send after ``timeout`` seconds
        without an answer (or after a "busy" answer), at most ``retries`` times. The future fails
        with :class:`EdgeError` when every attempt timed out."""
        topic = topics.service_infer(service, 1)
        corr = uuid.uuid4().bytes
        payload = tensor_to_npy(x)
        fut: Future[InferResponse] = Future()
        with self._lock:
            self._retrying[corr] = _Retrying(fut, service, payload, timeout, max(0, retries),
                                             time.monotonic() + timeout)
            if self._retrier is None:
                self._retrier = threading.Thread(target=self._retry_loop, name="edgectl-infer-retry", daemon=True)
                self._retrier.start()
        self._publish(topic, payload, corr)
        return fut

    def infer_service(self, service: str, x: np.ndarray, *, timeout: float = 10.0, retries: int = 2) -> InferResponse:
        """:meth:`submit_service` and wait: the answer (ok or an error naming the stage), or EdgeError."""
        fut = self.submit_service(service, x, timeout=timeout, retries=retries)
        try:
            return fut.result(timeout * (retries + 1) + 5.0)
        except FutureTimeout:
            raise EdgeError(f"service {service} did not answer within {timeout * (retries + 1):g}s") from None

    def _retry_loop(self) -> None:
        while not self._closed.wait(0.02):
            now = time.monotonic()
            resend, failed = [], []
            with self._lock:
                for corr, e in list(self._retrying.items()):
                    if e.future.done():
                        del self._retrying[corr]
                    elif e.deadline <= now:
                        if e.retries_left > 0:
                            e.retries_left -= 1
                            e.attempts += 1
                            e.deadline = now + e.timeout
                            resend.append((corr, e))
                        else:
                            del self._retrying[corr]
                            failed.append(e)
            for corr, e in resend:
                self.resent += 1
                self._publish(topics.service_infer(e.service, 1), e.payload, corr)
            for e in failed:
                if not e.future.done():
                    e.future.set_exception(EdgeError(
                        f"service {e.service} did not answer within {e.timeout:g}s in {e.attempts} attempt(s): "
                        "is every stage served by an online device? (edgectl devices list / fleet health)"))

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
        self._closed.set()
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

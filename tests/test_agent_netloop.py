"""Many MqttTransports on one shared NetLoop (what edgectl-sim runs), against a real Mosquitto:
connect, subscribe from on_connect, receive, publish from other threads, reconnect after the
connection breaks, and stop cleanly (final message sent, no last will)."""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from agent.transport import MqttTransport, NetLoop
from tests.conftest import wait_for


def test_one_loop_serves_many_transports(mosquitto: Any) -> None:
    root = f"nl-{uuid.uuid4().hex[:8]}"
    n = 30
    loop = NetLoop()
    got: queue.Queue[tuple[int, str, bytes]] = queue.Queue()
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    watcher = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"{root}-watch")
    watcher.on_message = lambda c, u, m: seen.put((m.topic, bytes(m.payload)))
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe(f"{root}/out/#", 1)
    watcher.loop_start()
    transports = [MqttTransport(mosquitto.url, f"{root}-{i}", will=(f"{root}/out/{i}/status", b"will"),
                                keepalive=5, loop=loop) for i in range(n)]
    connects = [0] * n
    try:
        for i, t in enumerate(transports):
            def on_connect(i: int = i, t: MqttTransport = t) -> None:
                connects[i] += 1
                t.subscribe([f"{root}/in/{i}"])
                t.publish(f"{root}/out/{i}/status", b"online", retain=False)

            t.start(on_connect, lambda topic, payload, props, i=i: got.put((i, topic, payload)))
        wait_for(lambda: all(t.connected.is_set() for t in transports), 10, "all connected")
        assert threading.active_count() < 10  # one loop thread, not one per client
        wait_for(lambda: seen.qsize() >= n, 10, "online messages")
        online = {seen.get_nowait() for _ in range(n)}
        assert online == {(f"{root}/out/{i}/status", b"online") for i in range(n)}

        # messages in, to every client
        time.sleep(0.2)  # the SUBSCRIBEs from on_connect are through by now
        for i in range(n):
            watcher.publish(f"{root}/in/{i}", b"hello %d" % i, qos=1)
        received = {got.get(timeout=10) for _ in range(n)}
        assert received == {(i, f"{root}/in/{i}", b"hello %d" % i) for i in range(n)}

        # publishes from other threads, QoS 1, confirmed
        def burst(i: int) -> None:
            for k in range(20):
                transports[i].publish(f"{root}/out/{i}/data", b"%d" % k).wait_for_publish(10)

        threads = [threading.Thread(target=burst, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        data = [seen.get(timeout=10) for _ in range(20 * n)]
        assert sorted(data) == sorted((f"{root}/out/{i}/data", b"%d" % k) for i in range(n) for k in range(20))

        # a broken connection: the loop reconnects it (on_connect runs again)
        sock = transports[0]._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        wait_for(lambda: connects[0] == 2 and transports[0].connected.is_set(), 10, "reconnected")
        assert seen.get(timeout=5) == (f"{root}/out/0/status", b"will")  # the broker saw it die
        assert seen.get(timeout=5) == (f"{root}/out/0/status", b"online")
    finally:
        for t in transports:
            t.stop(final=(f"{root}/out/{transports.index(t)}/status", b"bye"), timeout=5)
        finals = [seen.get(timeout=10) for _ in range(n)]
        loop.stop()
        time.sleep(0.3)
        leftovers = [seen.get_nowait() for _ in range(seen.qsize())]
        for i in range(n):  # the finals are retained: clear them
            watcher.publish(f"{root}/out/{i}/status", b"", qos=1, retain=True).wait_for_publish(5)
        watcher.loop_stop()
        watcher.disconnect()
    assert sorted(finals) == sorted((f"{root}/out/{i}/status", b"bye") for i in range(n))
    assert leftovers == []  # clean disconnects: no last will
    assert len(loop) == 0

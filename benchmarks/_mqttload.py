"""A telemetry load generator that is not itself the bottleneck: raw MQTT 3.1.1 over a socket.

A paho publisher spends ~150 µs of Python per QoS 1 message (packet building, its own
bookkeeping, the PUBACK callbacks), so on two cores it cannot offer 10,000 msg/s and leave CPU
for the broker and the server. This one writes pre-encoded ``PUBLISH`` packets (QoS 1, unique
packet ids) in large ``sendall`` writes and counts the broker's ``PUBACK`` s, keeping at most
``window`` messages unacknowledged. The bytes on the wire are exactly what any MQTT client
sends; the broker treats them as usual (and it is Mosquitto that forwards them to the server).

Payloads are real ``messages.Telemetry`` JSON (72-bucket histograms with varied counts, health
omitted) made from a pool of templates with the sequence number spliced in, so generating them
costs ~2 µs each. Message ``i`` is sequence ``i // devices`` of device ``i % devices``: every
``(device, seq)`` is unique, so rows stored must equal messages sent.
"""

from __future__ import annotations

import random
import socket
import struct
import time

from sdk.protocol import histogram, messages, topics

SEQ_MARK = 987654321987  # a placeholder seq in the template JSON


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def templates(pool: int = 256, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """Telemetry JSON split around the seq: (before, after). Validated with ``messages.decode``."""
    rng = random.Random(seed)
    out = []
    for _ in range(pool):
        hist = histogram.empty()
        for _ in range(rng.randint(5, 60)):
            hist[rng.randrange(25, 45)] += 1
        ok = sum(hist)
        msg = messages.Telemetry(seq=SEQ_MARK, interval_s=60.0, count=ok + 1, errors=1, latency_hist=hist,
                                 latency_sum_ms=float(ok), cpu_percent=12.5, rss_bytes=50_000_000,
                                 artifact="ab" * 32, model_version="1.0.0")
        raw = msg.encode()
        messages.decode("telemetry", raw)
        before, after = raw.split(str(SEQ_MARK).encode())
        out.append((before, after))
    return out


class Load:
    """Builds PUBLISH packets for messages ``start .. start+n`` of the benchmark's sequence."""

    def __init__(self, devices: int, prefix: str = "bench", pool: int = 256):
        self.devices = devices
        self.topics = [topics.telemetry(f"{prefix}-{d:04d}").encode() for d in range(devices)]
        self.tpl = templates(pool)

    def packet(self, i: int, pid: int) -> bytes:
        dev, seq = i % self.devices, i // self.devices
        before, after = self.tpl[(i * 7919) % len(self.tpl)]
        payload = b"%s%d%s" % (before, seq, after)
        t = self.topics[dev]
        body = b"%s%s%s%s" % (struct.pack(">H", len(t)), t, struct.pack(">H", pid), payload)
        return b"\x32" + _varint(len(body)) + body

    def payload(self, i: int) -> tuple[str, bytes]:
        """(topic, payload) of message ``i`` (for tests and for checking what was sent)."""
        dev, seq = i % self.devices, i // self.devices
        before, after = self.tpl[(i * 7919) % len(self.tpl)]
        return self.topics[dev].decode(), b"%s%d%s" % (before, seq, after)


class RawPublisher:
    """One MQTT 3.1.1 connection that publishes QoS 1 packets and counts PUBACKs."""

    def __init__(self, host: str, port: int, client_id: str, *, window: int = 2000):
        if not 0 < window < 65535:
            raise ValueError("window must be in 1..65534 (MQTT packet ids are 16-bit)")
        self.window = window
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        var = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 60) + struct.pack(">H", len(cid)) + cid
        self.sock.sendall(b"\x10" + _varint(len(var)) + var)
        ack = self._read_exact(4)
        if ack[0] != 0x20 or ack[3] != 0:
            raise ConnectionError(f"broker refused the connection: CONNACK {ack.hex()}")
        self.sent = self.acked = 0
        self._pid = 0
        self._buf = b""

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise ConnectionError("broker closed the connection")
            data += more
        return data

    def next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def _read_acks(self, block: bool) -> None:
        self.sock.setblocking(block)
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        finally:
            self.sock.setblocking(True)
        if not data:
            raise ConnectionError("broker closed the connection")
        data = self._buf + data
        whole = len(data) - len(data) % 4  # PUBACK (3.1.1) = 40 02 pid pid; nothing else arrives
        if data[0:whole:4].count(0x40) != whole // 4:
            raise ConnectionError(f"unexpected packet from the broker: {data[:8].hex()}")
        self.acked += whole // 4
        self._buf = data[whole:]

    def send(self, packets: bytes, count: int) -> None:
        """Write ``count`` packets at once; first wait until the window has room for them."""
        while self.sent + count - self.acked > self.window:
            self._read_acks(block=True)
        self.sock.sendall(packets)
        self.sent += count
        self._read_acks(block=False)

    def drain(self, timeout: float = 120.0) -> None:
        """Wait for every PUBACK."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(1.0)
        while self.acked < self.sent:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.sent - self.acked} messages unacknowledged after {timeout:g} s")
            try:
                self._read_acks(block=True)
            except TimeoutError:
                continue

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self.sock.close()


def publish(host: str, port: int, n: int, devices: int, *, rate: float = 0.0, batch: int = 200,
            window: int = 2000, client_id: str = "edgectl-load", offset: int = 0) -> tuple[float, float]:
    """Publish messages ``offset .. offset+n`` (QoS 1), at most ``rate`` msg/s (0: as fast as the
    broker acknowledges them); returns (time of the first write, time every PUBACK was in)."""
    load = Load(devices)
    pub = RawPublisher(host, port, client_id, window=window)
    try:
        t0 = time.time()
        i = offset
        end = offset + n
        while i < end:
            k = min(batch, end - i)
            pub.send(b"".join(load.packet(j, pub.next_pid()) for j in range(i, i + k)), k)
            i += k
            if rate > 0:
                ahead = t0 + (i - offset) / rate - time.time()
                if ahead > 0:
                    time.sleep(ahead)
        pub.drain()
        return t0, time.time()
    finally:
        pub.close()

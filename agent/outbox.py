"""Telemetry that is never lost to a broker outage: a bounded on-disk spool, emptied by PUBACKs.

:class:`Outbox` keeps each encoded telemetry message as one file, ``DIR/outbox/<seq>.msg``,
written atomically (temp file, fsync, rename) *before* it is handed to MQTT; it is deleted only
when the broker's PUBACK for it arrives. A restart, a lost connection or a broker restart
therefore loses nothing: what is in the spool is sent again, oldest first, and the server stores
each ``(device_id, seq)`` once, so a resend is harmless.

The spool is bounded (messages and bytes). When the bound is hit the **oldest** message is
dropped and counted; the count is persisted (``DIR/outbox/dropped``) and reported as
``telemetry_dropped`` in the telemetry's ``health``.

:class:`Spooler` moves messages from the spool to the transport: at most ``window`` in flight,
only while connected. A PUBACK whose MQTT v5 reason code says nobody took the message (0x10
"no matching subscribers": e.g. the broker restarted without the server's session yet) or the
broker's quota is exhausted (0x97) keeps the message and retries it with a backoff; any other
refusal (e.g. 0x87 not authorized) is permanent: the message is dropped, counted and logged.
A message in flight for longer than ``resend_s`` while connected is sent again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdk.protocol.fsutil import write_atomic

log = logging.getLogger("edgectl.agent.outbox")

SUFFIX = ".msg"
#: PUBACK reason codes that mean "not taken now, try again later".
RETRY_CODES = {0x10: "no matching subscribers", 0x97: "quota exceeded"}


class Outbox:
    """A bounded spool of encoded messages keyed by an increasing integer (the telemetry seq)."""

    def __init__(self, directory: str | Path, *, max_messages: int = 20000, max_bytes: int = 64 * 1024 * 1024):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_messages, self.max_bytes = max(1, max_messages), max(1, max_bytes)
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        self._memory: dict[int, bytes] = {}  # only when the disk refused a write
        self._bytes = 0
        for tmp in self.dir.glob("*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        for p in self.dir.glob(f"*{SUFFIX}"):
            stem = p.name.removesuffix(SUFFIX)
            if stem.isdigit():
                with contextlib.suppress(OSError):
                    self._sizes[int(stem)] = p.stat().st_size
        self._bytes = sum(self._sizes.values())
        self.dropped = self._read_dropped()
        if self._sizes:
            log.info("telemetry spool %s holds %d unsent message(s) (%d bytes); they are sent first",
                     self.dir, len(self._sizes), self._bytes)

    def _path(self, key: int) -> Path:
        return self.dir / f"{key:020d}{SUFFIX}"

    def _read_dropped(self) -> int:
        try:
            value = json.loads((self.dir / "dropped").read_bytes())
        except (OSError, ValueError):
            return 0
        return value if type(value) is int and value >= 0 else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def pending(self) -> list[int]:
        """Spooled keys, oldest first."""
        with self._lock:
            return sorted(self._sizes)

    def append(self, key: int, payload: bytes) -> None:
        """Persist one message (fsynced before this returns), dropping the oldest beyond the bound."""
        try:
            write_atomic(self._path(key), payload)
        except OSError as exc:
            log.error("cannot spool telemetry seq %d in %s (%s); keeping it in memory only",
                      key, self.dir, exc.strerror or exc)
            with self._lock:
                self._memory[key] = payload
        with self._lock:
            self._sizes[key] = len(payload)
            self._bytes += len(payload)
            victims: list[int] = []
            while len(self._sizes) > 1 and (len(self._sizes) > self.max_messages or self._bytes > self.max_bytes):
                oldest = min(self._sizes)
                victims.append(oldest)
                self._forget(oldest)
        if victims:
            self._count_dropped(len(victims), f"the spool is full ({self.max_messages} messages / "
                                              f"{self.max_bytes} bytes): dropped the oldest")

    def _forget(self, key: int) -> None:  # holds _lock
        self._bytes -= self._sizes.pop(key, 0)
        if self._memory.pop(key, None) is None:
            with contextlib.suppress(OSError):
                self._path(key).unlink()

    def _count_dropped(self, n: int, why: str) -> None:
        with self._lock:
            self.dropped += n
            total = self.dropped
        log.warning("telemetry: %s; %d message(s) dropped, %d so far", why, n, total)
        try:
            write_atomic(self.dir / "dropped", str(total).encode())
        except OSError as exc:
            log.error("cannot persist the telemetry drop count in %s: %s", self.dir, exc.strerror or exc)

    def read(self, key: int) -> bytes | None:
        with self._lock:
            if key in self._memory:
                return self._memory[key]
            if key not in self._sizes:
                return None
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            log.error("spooled telemetry seq %d is unreadable (%s); dropping it", key, exc.strerror or exc)
            self.remove(key)
            self._count_dropped(1, f"seq {key} could not be read back")
            return None

    def remove(self, key: int) -> None:
        """Forget one message (its PUBACK arrived)."""
        with self._lock:
            self._forget(key)

    def drop(self, key: int, why: str) -> None:
        """Forget one message the broker refused for good, and count it."""
        self.remove(key)
        self._count_dropped(1, why)


def _acked(info: Any) -> bool:
    """True once paho received the PUBACK (``is_published`` raises for a publish that was first
    refused for want of a connection, even after paho resent it and got its PUBACK)."""
    try:
        return bool(info.is_published())
    except (ValueError, RuntimeError):
        return bool(getattr(info, "_published", False))


class Spooler:
    """Sends an :class:`Outbox` through a transport, oldest first, and empties it on PUBACK.

    ``pump`` does one round (collect acknowledgements, then send what the window allows); it is
    called after every append and by :meth:`run` on its own thread whenever the transport
    connects or a PUBACK arrives. A transport whose ``publish`` returns None (an in-memory
    double) counts as delivered at once.
    """

    def __init__(self, outbox: Outbox, transport: Any, topic: str, *, window: int = 32,
                 resend_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.outbox, self.transport, self.topic = outbox, transport, topic
        self.window, self.resend_s, self.clock = max(1, window), resend_s, clock
        self.sent = 0  # publishes handed to the transport (resends included)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[Any, float]] = {}  # key -> (MQTTMessageInfo, sent at)
        self._reasons: dict[int, int] = {}  # mid -> PUBACK reason code (from paho's thread)
        self._reasons_lock = threading.Lock()
        self._backoff, self._blocked_until = 0.0, 0.0
        listen = getattr(transport, "add_publish_listener", None)
        if listen is not None:
            listen(self._on_published)

    def _on_published(self, mid: int, reason: int) -> None:
        """Paho's thread, inside paho's locks: record and wake, nothing else."""
        if reason:
            with self._reasons_lock:
                self._reasons[mid] = reason
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def put(self, key: int, payload: bytes) -> None:
        self.outbox.append(key, payload)
        self.pump()

    def _connected(self) -> bool:
        ev = getattr(self.transport, "connected", None)
        return ev is None or ev.is_set()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def pump(self) -> None:
        with self._lock:
            self._collect()
            now = self.clock()
            if not self._connected() or now < self._blocked_until:
                return
            for key, (_, at) in list(self._inflight.items()):
                if now - at >= self.resend_s:
                    log.warning("telemetry seq %d unacknowledged for %.0f s; sending it again", key, now - at)
                    del self._inflight[key]
            for key in self.outbox.pending():
                if len(self._inflight) >= self.window:
                    break
                if key in self._inflight:
                    continue
                payload = self.outbox.read(key)
                if payload is None:
                    continue
                info = self.transport.publish(self.topic, payload, qos=1)
                self.sent += 1
                if info is None:
                    self.outbox.remove(key)
                    continue
                if getattr(info, "rc", 0) == 15:  # MQTT_ERR_QUEUE_SIZE: paho did not take it
                    break
                self._inflight[key] = (info, now)

    def _collect(self) -> None:
        """Remove acknowledged messages from the spool (holds _lock)."""
        with self._reasons_lock:
            reasons, self._reasons = self._reasons, {}
        for key, (info, _) in list(self._inflight.items()):
            if not _acked(info):
                continue
            del self._inflight[key]
            code = reasons.get(getattr(info, "mid", -1), 0)
            if code in RETRY_CODES:
                self._backoff = min(5.0, max(0.5, self._backoff * 2))
                self._blocked_until = self.clock() + self._backoff
                log.warning("broker did not take telemetry seq %d (%s); retrying in %.1f s",
                            key, RETRY_CODES[code], self._backoff)
            elif code >= 0x80:
                self.outbox.drop(key, f"the broker refused seq {key} with reason code 0x{code:02x}")
            else:
                self._backoff = 0.0
                self.outbox.remove(key)

    def flush(self, timeout: float) -> bool:
        """Pump until the spool is empty or ``timeout`` passes (at shutdown); True when empty.
        What is left stays on disk for the next start."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if not len(self.outbox):
                return True
            if not self._connected() or time.monotonic() >= deadline or self.clock() < self._blocked_until:
                return False  # no broker, no time, or nobody subscribed: it waits on disk
            self._wake.wait(0.05)
            self._wake.clear()

    def run(self, stop: threading.Event) -> None:
        """The spool thread: pump whenever woken (connect, PUBACK, append) or every few seconds."""
        while not stop.is_set():
            busy = self.in_flight or (len(self.outbox) and self._connected())
            self._wake.wait(0.5 if busy else 5.0)
            self._wake.clear()
            if stop.is_set():
                return
            try:
                self.pump()
            except Exception:
                log.exception("telemetry spool failed")

"""What the agent reports about the board it runs on, and how it tells systemd it is alive.

Stdlib only. Temperature comes from ``/sys/class/thermal`` (the zone whose type names the CPU/SoC,
else zone 0) where the board exposes it; disk free from ``statvfs`` of the data directory. The
systemd side speaks the ``sd_notify`` datagram protocol over ``$NOTIFY_SOCKET`` (``READY=1``,
``WATCHDOG=1``, ``STOPPING=1``) with a plain socket, no libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("edgectl.agent.health")

THERMAL = Path("/sys/class/thermal")


def temperature_c(root: Path = THERMAL) -> float | None:
    """SoC/CPU temperature in °C, or None where the board exposes none."""
    try:
        zones = sorted(root.glob("thermal_zone*"), key=lambda p: int(p.name[12:] or 0))
    except (OSError, ValueError):
        return None
    readings: list[tuple[bool, float]] = []
    for zone in zones:
        try:
            kind = (zone / "type").read_text().strip().lower()
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        preferred = any(w in kind for w in ("cpu", "soc", "x86_pkg"))
        readings.append((preferred, milli / 1000.0))
    if not readings:
        return None
    for preferred, value in readings:
        if preferred:
            return round(value, 1)
    return round(readings[0][1], 1)


def disk_free_bytes(path: str | Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SystemdNotifier:
    """``sd_notify`` over ``$NOTIFY_SOCKET``; a no-op when the agent does not run under systemd."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ if env is None else env)
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):  # abstract namespace
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        #: Seconds between watchdog pings (half of WatchdogSec), or None without a watchdog.
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 2e6
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto(state.encode(), self.address)
            return True
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

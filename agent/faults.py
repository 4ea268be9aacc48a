"""Deliberate crash points, for the crash-safety tests only (off unless the variable is set).

``EDGECTL_CRASH_AT=<point>:<n>`` makes the agent SIGKILL itself (no cleanup, no last words
beyond one log line) the ``n``-th time it reaches ``<point>`` (``n`` defaults to 1). The points
are named after the step of a deployment they interrupt:

=========================  ===================================================================
``download.chunk``         a chunk is written to the ``.part`` file but not yet recorded
``download.checkpoint``    progress (fsync + sidecar) has just been recorded
``verify.start``           every chunk is on disk; nothing verified yet
``verify.done``            whole-file sha256 and bundle checks passed
``smoke.done``             the smoke test passed; nothing installed yet
``swap.slot_invalidated``  the slot about to be overwritten is no longer the fallback
``swap.slot_written``      the new bundle is in the inactive slot; ``state.json`` not flipped
``swap.activated``         ``state.json`` names the new slot; the old model still answers
``swap.serving``           the new model answers; "active" not reported yet
=========================  ===================================================================
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("edgectl.agent.faults")

ENV = "EDGECTL_CRASH_AT"
POINTS = ("download.chunk", "download.checkpoint", "verify.start", "verify.done", "smoke.done",
          "swap.slot_invalidated", "swap.slot_written", "swap.activated", "swap.serving")

_armed: tuple[str, int] | None = None
_hits = 0
_read = False


def arm(spec: str | None) -> None:
    """Arm (``"point:n"``) or disarm (``None``/``""``) the crash point; raises ValueError if bad."""
    global _armed, _hits, _read
    _read, _hits, _armed = True, 0, None
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point not in POINTS or not (n == "" or (n.isdigit() and int(n) >= 1)):
        raise ValueError(f"{ENV}={spec!r}: expected POINT[:N] with POINT one of {', '.join(POINTS)} and N >= 1")
    _armed = (point, int(n or 1))


def crash_point(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed point and this is its n-th hit."""
    global _hits
    if not _read:
        try:
            arm(os.environ.get(ENV))
        except ValueError as exc:
            log.error("%s; no crash point armed", exc)
    if _armed is None or _armed[0] != name:
        return
    _hits += 1
    if _hits == _armed[1]:
        log.warning("crash point %s reached (hit %d): killing this process with SIGKILL", name, _hits)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)

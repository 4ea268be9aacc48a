"""The agent's deployment state machine, as pure data plus one ``step`` function (h11 style).

States are the wire contract's :data:`sdk.protocol.messages.AGENT_STATES`. A transition is a dict
lookup; an impossible one raises :class:`ProtocolError` naming the state and the event, so a bug in
the agent's logic shows up as one clear line instead of a silently wrong report.
"""

from __future__ import annotations

from enum import StrEnum

from sdk.protocol.errors import ProtocolError
from sdk.protocol.messages import AGENT_STATES


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    SMOKE_TESTING = "smoke_testing"
    ACTIVE = "active"
    FAILED = "failed"


assert tuple(s.value for s in State) == AGENT_STATES, "agent states drifted from the wire contract"


class Event(StrEnum):
    RESTORED = "restored"  # a model was loaded from the data dir at start
    DESIRED = "desired"  # a desired state names an artifact that is not active: download it
    ALREADY_ACTIVE = "already_active"  # a desired state names the active artifact
    #: a desired state names a bundle already on disk in another role or in the previous slot:
    #: smoke-test it from there, no download
    INSTALLED = "installed"
    DOWNLOADED = "downloaded"  # every chunk arrived
    VERIFIED = "verified"  # sha256 and bundle checks passed
    SMOKE_PASSED = "smoke_passed"  # the sample reproduced; the model is now active
    FAILED = "failed"  # anything went wrong; the old model keeps serving


IDLE, DOWNLOADING, VERIFYING, SMOKE_TESTING, ACTIVE, FAILED = State

# A newer desired state supersedes whatever is in progress; a desired state naming the active
# artifact (e.g. a rollback) cancels it. Failure is possible from every working state.
TRANSITIONS: dict[State, dict[Event, State]] = {
    IDLE: {Event.RESTORED: ACTIVE, Event.DESIRED: DOWNLOADING},
    DOWNLOADING: {Event.DESIRED: DOWNLOADING, Event.ALREADY_ACTIVE: ACTIVE, Event.INSTALLED: SMOKE_TESTING,
                  Event.DOWNLOADED: VERIFYING, Event.FAILED: FAILED},
    VERIFYING: {Event.DESIRED: DOWNLOADING, Event.ALREADY_ACTIVE: ACTIVE, Event.INSTALLED: SMOKE_TESTING,
                Event.VERIFIED: SMOKE_TESTING, Event.FAILED: FAILED},
    SMOKE_TESTING: {Event.DESIRED: DOWNLOADING, Event.ALREADY_ACTIVE: ACTIVE, Event.INSTALLED: SMOKE_TESTING,
                    Event.SMOKE_PASSED: ACTIVE, Event.FAILED: FAILED},
    ACTIVE: {Event.DESIRED: DOWNLOADING, Event.ALREADY_ACTIVE: ACTIVE, Event.INSTALLED: SMOKE_TESTING},
    FAILED: {Event.DESIRED: DOWNLOADING, Event.ALREADY_ACTIVE: ACTIVE, Event.INSTALLED: SMOKE_TESTING},
}


def step(state: State | str, event: Event | str) -> State:
    """The state after ``event`` in ``state``; an impossible transition raises ProtocolError."""
    try:
        state, event = State(state), Event(event)
    except ValueError as exc:
        raise ProtocolError(f"deployment state machine: {exc}") from None
    nxt = TRANSITIONS[state].get(event)
    if nxt is None:
        raise ProtocolError(f"deployment state machine: event {event.value!r} is impossible "
                            f"in state {state.value!r}")
    return nxt

"""The deployment state machine: every allowed transition, and every impossible one raises."""

from __future__ import annotations

import pytest

from agent.machine import TRANSITIONS, Event, State, step
from sdk.protocol.errors import ProtocolError
from sdk.protocol.messages import AGENT_STATES

EXPECTED = {
    (State.IDLE, Event.RESTORED): State.ACTIVE,
    (State.IDLE, Event.DESIRED): State.DOWNLOADING,
    (State.DOWNLOADING, Event.DESIRED): State.DOWNLOADING,
    (State.DOWNLOADING, Event.ALREADY_ACTIVE): State.ACTIVE,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.DOWNLOADING, Event.FAILED): State.FAILED,
    (State.VERIFYING, Event.DESIRED): State.DOWNLOADING,
    (State.VERIFYING, Event.ALREADY_ACTIVE): State.ACTIVE,
    (State.VERIFYING, Event.VERIFIED): State.SMOKE_TESTING,
    (State.VERIFYING, Event.FAILED): State.FAILED,
    (State.SMOKE_TESTING, Event.DESIRED): State.DOWNLOADING,
    (State.SMOKE_TESTING, Event.ALREADY_ACTIVE): State.ACTIVE,
    (State.SMOKE_TESTING, Event.SMOKE_PASSED): State.ACTIVE,
    (State.SMOKE_TESTING, Event.FAILED): State.FAILED,
    (State.ACTIVE, Event.DESIRED): State.DOWNLOADING,
    (State.ACTIVE, Event.ALREADY_ACTIVE): State.ACTIVE,
    (State.FAILED, Event.DESIRED): State.DOWNLOADING,
    (State.FAILED, Event.ALREADY_ACTIVE): State.ACTIVE,
    # A bundle already on disk (new role, previous slot) is smoke-tested again, never re-downloaded.
    **{(s, Event.INSTALLED): State.SMOKE_TESTING
       for s in (State.DOWNLOADING, State.VERIFYING, State.SMOKE_TESTING, State.ACTIVE, State.FAILED)},
}


def test_states_are_the_wire_contracts() -> None:
    assert tuple(s.value for s in State) == AGENT_STATES
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(("state", "event"), list(EXPECTED))
def test_allowed_transition(state: State, event: Event) -> None:
    assert step(state, event) is EXPECTED[(state, event)]
    assert step(state.value, event.value) is EXPECTED[(state, event)]  # plain strings work too


IMPOSSIBLE = [(s, e) for s in State for e in Event if (s, e) not in EXPECTED]


def test_table_is_exactly_the_expected_one() -> None:
    table = {(s, e): nxt for s, row in TRANSITIONS.items() for e, nxt in row.items()}
    assert table == EXPECTED


@pytest.mark.parametrize(("state", "event"), IMPOSSIBLE)
def test_impossible_transition_names_state_and_event(state: State, event: Event) -> None:
    with pytest.raises(ProtocolError) as err:
        step(state, event)
    assert repr(state.value) in str(err.value) and repr(event.value) in str(err.value)


def test_happy_path_and_failure() -> None:
    s = State.IDLE
    for event in (Event.DESIRED, Event.DOWNLOADED, Event.VERIFIED, Event.SMOKE_PASSED):
        s = step(s, event)
    assert s is State.ACTIVE
    assert step(step(s, Event.DESIRED), Event.FAILED) is State.FAILED


def test_unknown_names_raise() -> None:
    with pytest.raises(ProtocolError, match="rolled_back"):
        step("rolled_back", Event.DESIRED)
    with pytest.raises(ProtocolError, match="explode"):
        step(State.IDLE, "explode")

"""Every MQTT topic of the scheme is built and parsed here, never by f-strings elsewhere.

Scheme (``v1`` is the protocol version)::

    edgectl/v1/devices/{device_id}/status      agent -> all     retained; last will "offline"
    edgectl/v1/devices/{device_id}/desired     server -> agent  retained desired state
    edgectl/v1/devices/{device_id}/reported    agent -> server  deployment progress
    edgectl/v1/devices/{device_id}/telemetry   agent -> server  seq-numbered aggregates
    edgectl/v1/devices/{device_id}/heartbeat   agent -> server  liveness between aggregates
    edgectl/v1/devices/{device_id}/fetch       agent -> server  "send me these chunks"
    edgectl/v1/devices/{device_id}/chunks      server -> agent  binary chunk frames
    edgectl/v1/devices/{device_id}/infer       client -> agent  .npy request (MQTT v5 response topic)
    edgectl/v1/clients/{client_id}/responses   agent -> client  inference answers
    edgectl/v1/artifacts/{sha256}/chunks       server -> every agent downloading that artifact
                                               (fan-out: one copy per chunk for many devices)
    edgectl/v1/services/{service}/stages/{k}/infer   client or stage k-1 -> stage k replicas
                                                     (shared subscription: the broker spreads requests)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from .errors import ProtocolError

ROOT = "edgectl"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DeviceTopic(StrEnum):
    """The per-device topic kinds, in the order of the module docstring."""

    STATUS = "status"
    DESIRED = "desired"
    REPORTED = "reported"
    TELEMETRY = "telemetry"
    HEARTBEAT = "heartbeat"
    FETCH = "fetch"
    CHUNKS = "chunks"
    INFER = "infer"


CLIENT_RESPONSES = "responses"
ARTIFACT_CHUNKS = "artifact_chunks"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def valid_id(value: object) -> bool:
    """True when ``value`` can be a device or client id (no MQTT wildcards or separators)."""
    return isinstance(value, str) and bool(_ID_RE.match(value))


def check_id(value: object, what: str = "device id") -> str:
    if not valid_id(value):
        raise ProtocolError(
            f"invalid {what} {value!r}: use 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return value  # type: ignore[return-value]


def device(device_id: str, kind: DeviceTopic | str) -> str:
    kind = DeviceTopic(kind)
    return f"{PREFIX}/devices/{check_id(device_id)}/{kind.value}"


def device_wildcard(kind: DeviceTopic | str) -> str:
    """Subscription filter for one kind of topic from every device."""
    return f"{PREFIX}/devices/+/{DeviceTopic(kind).value}"


def shared(filter_: str, group: str = "edgectl") -> str:
    """MQTT v5 shared subscription, so several server replicas split the load."""
    return f"$share/{group}/{filter_}"


def service_infer(service: str, stage: int = 1) -> str:
    """Request topic of stage ``stage`` (1-based) of a service: a replica pool and/or a pipeline."""
    if not (isinstance(stage, int) and 1 <= stage <= 64):
        raise ProtocolError(f"invalid stage {stage!r}: must be 1..64")
    return f"{PREFIX}/services/{check_id(service, 'service name')}/stages/{stage}/infer"


def service_group(service: str, stage: int = 1) -> str:
    """Shared-subscription filter for the replicas of one stage (each request goes to one of them)."""
    return shared(service_infer(service, stage), group=f"{check_id(service, 'service name')}-s{stage}")


def client_responses(client_id: str) -> str:
    return f"{PREFIX}/clients/{check_id(client_id, 'client id')}/{CLIENT_RESPONSES}"


def artifact_chunks(artifact: str) -> str:
    """Where the server broadcasts the chunks of an artifact several devices download at once."""
    if not (isinstance(artifact, str) and _SHA_RE.match(artifact)):
        raise ProtocolError(f"invalid artifact id {str(artifact)[:80]!r}: must be 64 lowercase hex digits")
    return f"{PREFIX}/artifacts/{artifact}/chunks"


#: Subscription filter (and ACL pattern) for the chunk broadcasts of every artifact.
ARTIFACT_CHUNKS_WILDCARD = f"{PREFIX}/artifacts/+/chunks"


# Short helpers read better at call sites: topics.status("pi-1").
def status(device_id: str) -> str:
    return device(device_id, DeviceTopic.STATUS)


def desired(device_id: str) -> str:
    return device(device_id, DeviceTopic.DESIRED)


def reported(device_id: str) -> str:
    return device(device_id, DeviceTopic.REPORTED)


def telemetry(device_id: str) -> str:
    return device(device_id, DeviceTopic.TELEMETRY)


def heartbeat(device_id: str) -> str:
    return device(device_id, DeviceTopic.HEARTBEAT)


def fetch(device_id: str) -> str:
    return device(device_id, DeviceTopic.FETCH)


def chunks(device_id: str) -> str:
    return device(device_id, DeviceTopic.CHUNKS)


def infer(device_id: str) -> str:
    return device(device_id, DeviceTopic.INFER)


@dataclass(frozen=True)
class Route:
    """A parsed topic: which kind, and for which device or client."""

    kind: DeviceTopic | str
    device_id: str | None = None
    client_id: str | None = None
    artifact: str | None = None


def parse(topic: str) -> Route:
    """Parse a topic of the scheme; anything else raises :class:`ProtocolError` naming it."""
    if not isinstance(topic, str):
        raise ProtocolError(f"topic must be a string, got {type(topic).__name__}")
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != ROOT:
        raise ProtocolError(f"topic {topic[:200]!r} is not in the edgectl scheme")
    if parts[1] != VERSION:
        raise ProtocolError(f"topic {topic[:200]!r} has protocol version {parts[1]!r}, expected {VERSION!r}")
    _, _, space, ident, kind = parts
    if space == "devices":
        try:
            dkind = DeviceTopic(kind)
        except ValueError:
            raise ProtocolError(f"topic {topic[:200]!r}: unknown device topic kind {kind!r}") from None
        return Route(kind=dkind, device_id=check_id(ident))
    if space == "clients" and kind == CLIENT_RESPONSES:
        return Route(kind=CLIENT_RESPONSES, client_id=check_id(ident, "client id"))
    if space == "artifacts" and kind == "chunks":
        artifact_chunks(ident)  # validates the id
        return Route(kind=ARTIFACT_CHUNKS, artifact=ident)
    raise ProtocolError(f"topic {topic[:200]!r} is not in the edgectl scheme")

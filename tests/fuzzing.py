"""Hypothesis strategies for fuzzing every topic the server and the agent subscribe to.

Payload families: valid messages (with small seq ranges, so replays and out-of-order telemetry
are frequent), valid messages with one field broken (wrong type, removed, out of range, extra),
arbitrary JSON, arbitrary bytes, invalid UTF-8, huge payloads, binary frames with odd headers,
``.npy`` tensors of odd dtypes and shapes. Topics: every kind for known, unknown and invalid
device ids, foreign versions and arbitrary text.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
from hypothesis import strategies as st

from sdk.protocol import frames, histogram, topics
from sdk.protocol.messages import MAX_JSON_BYTES
from sdk.protocol.topics import DeviceTopic

SHA = "ab" * 32
KNOWN = ("fz-1", "fz-2", "fz-3")
GHOSTS = ("ghost-1", "ghost-2")
#: Device ids that MQTT carries but the scheme refuses.
INVALID_IDS = ("bad id!", "x" * 65, "ünï", "-lead", "a+b", ".hidden", "")
#: A few huge payloads, built once (the broker test sends them too).
HUGE = (b"{" + b" " * MAX_JSON_BYTES + b"}", b'{"seq": 1, "pad": "' + b"x" * 300_000 + b'"}',
        b"\x93NUMPY" + b"\x00" * 2_000_000)

_ints = st.integers(-(10**6), 10**6) | st.sampled_from([2**31, 2**35, 2**63, -(2**63), 10**30])
_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e308, -1.5])
_text = st.text(max_size=40) | st.sampled_from(["", "online", "offline", "active", SHA, "x" * 300])
json_leaf = st.none() | st.booleans() | _ints | _floats | _text
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(_text, inner, max_size=5), max_leaves=20)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


_BUCKET = st.integers(0, histogram.N_BUCKETS - 1)
_SMALL = st.integers(0, 5)
_COUNT = st.integers(1, 50)
_SEQ = st.integers(0, 40)  # a small range: replays and out-of-order sequence numbers are frequent
_BOOL = st.booleans()


@st.composite
def telemetry_dict(draw: st.DrawFn) -> dict[str, Any]:
    hist = [0] * histogram.N_BUCKETS
    for _ in range(draw(_SMALL)):
        hist[draw(_BUCKET)] += draw(_COUNT)
    errors = draw(_SMALL)
    d: dict[str, Any] = {"seq": draw(_SEQ), "interval_s": 5.0, "count": sum(hist) + errors,
                         "errors": errors, "latency_hist": hist, "latency_sum_ms": float(sum(hist))}
    if draw(_BOOL):
        d["artifact"], d["model_version"] = SHA, "1"
    return d


_STATE = st.sampled_from(["online", "offline"])
_GROUP = st.sampled_from(["a", "b"])
_CONNECTION = st.sampled_from(["c1", "c2"])
_UPTIME = st.floats(0, 1e6)
_DEPLOYMENT = st.sampled_from(["d-1", "d-nope"])
_REPORTED_STATE = st.sampled_from(["downloading", "active", "failed"])
_INDEXES = st.lists(st.integers(0, 100), min_size=1, max_size=5)
_DESIRED_ID = st.sampled_from(["d-1", "d-2", "d-3"])
_ARTIFACT = st.sampled_from([SHA, "cd" * 32])
_DESIRED_SIZE = st.integers(1, 64 * 1024)


@st.composite
def valid_dict(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    if kind == DeviceTopic.TELEMETRY:
        return draw(telemetry_dict())
    if kind == DeviceTopic.STATUS:
        d: dict[str, Any] = {"state": draw(_STATE)}
        if draw(_BOOL):
            d.update(agent_version="0.1.0", labels={"group": draw(_GROUP)}, heartbeat_s=2.0,
                     connection=draw(_CONNECTION))
        if draw(_BOOL):
            d["active"] = {"deployment_id": "d-1", "artifact": SHA, "name": "m", "version": "1"}
        return d
    if kind == DeviceTopic.HEARTBEAT:
        return {"uptime_s": draw(_UPTIME), "seq": draw(_SEQ)}
    if kind == DeviceTopic.REPORTED:
        return {"deployment_id": draw(_DEPLOYMENT), "artifact": SHA, "state": draw(_REPORTED_STATE), "detail": "x"}
    if kind == DeviceTopic.FETCH:
        return {"artifact": SHA, "indexes": draw(_INDEXES)}
    if kind == DeviceTopic.DESIRED:  # sizes stay small: a valid desired makes the agent reserve that much disk
        return {"deployment_id": draw(_DESIRED_ID), "artifact": draw(_ARTIFACT), "size": draw(_DESIRED_SIZE),
                "chunk_size": 1024, "name": "m", "version": "1"}
    return {}


_HOW = st.sampled_from(["replace", "remove", "add"])


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> bytes:
    """A valid message with one field replaced by any JSON value, removed, or one added."""
    d = draw(valid_dict(kind))
    how = draw(_HOW)
    if how != "add" and d:
        key = sorted(d)[draw(st.integers(0, len(d) - 1))]
        if how == "replace":
            d[key] = draw(json_values)
        else:
            d.pop(key)
    else:
        d[draw(_text)] = draw(json_values)
    if kind == DeviceTopic.DESIRED and not (isinstance(d.get("size"), int) and d["size"] <= 64 * 1024):
        d["size"] = 2**35  # never a valid multi-gigabyte reservation (the agent would fallocate it)
    return _dumps(d)


_ODD_JSON = st.sampled_from([b"", b"null", b"{", b"\xff\xfe{}", b'{"seq": NaN}', b"[]" * 10000])
_HUGE = st.sampled_from(HUGE)
_SMALL_BINARY = st.binary(max_size=200)


def _json_payload(kind: str) -> st.SearchStrategy[bytes]:
    # Valid and nearly valid messages twice as often as the rest: they reach the deeper code.
    valid, broken = valid_dict(kind).map(_dumps), mutated(kind)
    return st.one_of(valid, broken, valid, broken, json_values.map(_dumps), _SMALL_BINARY, _ODD_JSON, _HUGE)


#: Built once: constructing strategies per draw costs more than drawing from them.
_JSON_PAYLOADS = {kind: _json_payload(kind) for kind in DeviceTopic}


def json_payload(kind: str) -> st.SearchStrategy[bytes]:
    return _JSON_PAYLOADS[DeviceTopic(kind)]


_BODY = st.binary(max_size=64)
_FRAME_KIND = st.integers(0, 3)
_LENGTH = st.integers(0, 2**32 - 1)


@st.composite
def frame_payload(draw: st.DrawFn) -> bytes:
    """Binary frames (chunks, inference answers): valid framing around odd headers, or garbage."""
    body = draw(_BODY)
    choice = draw(_FRAME_KIND)
    if choice == 2:
        return draw(_SMALL_BINARY)
    if choice == 3:
        return draw(_HUGE)
    if draw(_BOOL):
        header: Any = {"artifact": draw(_ARTIFACT), "index": draw(_ints), "count": draw(_ints),
                       "sha256": hashlib.sha256(body).hexdigest() if draw(_BOOL) else SHA}
    else:
        header = draw(json_values)
    head = _dumps(header)
    length = len(head) if choice == 0 else draw(_LENGTH)  # 1: a length that lies
    return frames.MAGIC + struct.pack(">I", length) + head + body


_DTYPES = st.sampled_from(["<f4", "<f8", "<i8", "|u1", "<f2", ">f4", "|b1", "<c8", "<U3", "|S2"])
_SHAPE = st.lists(st.integers(0, 9), max_size=4)
_NPY_KIND = st.integers(0, 5)
_ROWS = st.integers(1, 8)
_LIE_DESCR = st.sampled_from(["<f4", "|O", "<f4'x", "V8"])
_LIE_SHAPE = st.sampled_from(["(1, 4)", "(100000000, 100000000)", "(-1,)", "()"])
_ORDER = st.sampled_from(["False", "True"])
_TAIL = st.binary(max_size=32)


@st.composite
def npy_payload(draw: st.DrawFn) -> bytes:
    """Tensors the model takes, tensors of any small shape and dtype, truncated or lying
    headers, object dtypes (pickles), garbage."""
    choice = draw(_NPY_KIND)
    if choice == 0:
        return frames.tensor_to_npy(np.ones((draw(_ROWS), 4), np.float32))
    if choice <= 2:
        data = frames.tensor_to_npy(np.zeros(tuple(draw(_SHAPE)), dtype=draw(_DTYPES)))
        return data if choice == 1 else data[: draw(st.integers(0, len(data)))]
    if choice == 3:  # a header claiming a shape the body does not have, or an object dtype
        head = (f"{{'descr': '{draw(_LIE_DESCR)}', 'fortran_order': {draw(_ORDER)}, "
                f"'shape': {draw(_LIE_SHAPE)}, }}")
        head += " " * (63 - (len(head) + 10) % 64) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head.encode() + draw(_TAIL)
    if choice == 4:
        return draw(_SMALL_BINARY)
    return draw(_HUGE)


_BINARY_PAYLOADS = st.one_of(frame_payload(), npy_payload())


#: Known devices most often (their messages reach the store), then unknown and invalid ids.
device_ids = st.sampled_from(KNOWN * 6 + GHOSTS + INVALID_IDS)
#: The kinds the server ingests most often; the others (and strays) it must refuse.
_SERVER_KINDS = st.sampled_from([DeviceTopic.STATUS, DeviceTopic.REPORTED, DeviceTopic.FETCH]
                                + [DeviceTopic.TELEMETRY, DeviceTopic.HEARTBEAT] * 3 + list(DeviceTopic))
_STRAY_TOPICS = st.sampled_from([f"edgectl/v2/devices/{KNOWN[0]}/status", "edgectl/v1/devices/fz-1/bogus",
                                 "edgectl/v1/clients/c1/responses", "a/b/c/d/e/f", "", "/", "edgectl",
                                 "edgectl/v1/devices/fz-1/status/extra"])
_ROLL = st.integers(0, 19)
_TOPIC_TEXT = st.text(max_size=80)


@st.composite
def server_message(draw: st.DrawFn) -> tuple[str, bytes]:
    """(topic, payload) as the server's subscriptions can receive them, and some that no
    subscription would deliver (the ingest path must refuse them too)."""
    kind = draw(_SERVER_KINDS)
    topic = f"{topics.PREFIX}/devices/{draw(device_ids)}/{kind.value}"
    roll = draw(_ROLL)
    if roll == 0:
        topic = draw(_STRAY_TOPICS)
    elif roll == 1:
        topic = draw(_TOPIC_TEXT)
    payload = draw(json_payload(kind) if kind not in (DeviceTopic.CHUNKS, DeviceTopic.INFER) else _BINARY_PAYLOADS)
    return topic, payload


def props(response_topic: str | None, correlation: bytes | None) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    p = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        p.ResponseTopic = response_topic
    if correlation is not None:
        p.CorrelationData = correlation
    return p


response_topics = st.one_of(
    st.none(), st.sampled_from([topics.client_responses("fz-client")] * 3
                               + ["", "a/#", "+", "$SYS/x", "edgectl/v1/devices/fz-2/desired", "x" * 70000]),
    st.text(max_size=50))
_CORRELATION = st.none() | st.binary(max_size=20)
_AGENT_STRAYS = st.sampled_from(["edgectl/v1/devices/other/desired", "x", ""])


@st.composite
def agent_message(draw: st.DrawFn, agent_topics: dict[str, str]) -> tuple[str, bytes, Any]:
    """(topic, payload, MQTT v5 properties) for the agent's subscriptions, plus strays."""
    names = [*sorted(agent_topics), "stray"]
    name = names[draw(st.integers(0, len(names) - 1))]
    topic = agent_topics.get(name) or draw(_AGENT_STRAYS)
    if name == "desired":
        payload = draw(json_payload(DeviceTopic.DESIRED))
    elif name == "chunks":
        payload = draw(_BINARY_PAYLOADS)
    elif name == "stray":
        payload = draw(_SMALL_BINARY)
    else:  # infer, and the shared service topics another helper may add
        payload = draw(_BINARY_PAYLOADS)
    return topic, payload, props(draw(response_topics), draw(_CORRELATION))

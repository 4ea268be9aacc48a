"""Unit tests of the wire contract: topics, messages, frames, histograms."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdk.protocol import ProtocolError, histogram, messages, topics
from sdk.protocol.frames import Chunk, InferResponse, npy_to_tensor, pack, tensor_to_npy, unpack
from sdk.protocol.topics import DeviceTopic

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@given(device_id=ids, kind=st.sampled_from(list(DeviceTopic)))
def test_device_topics_round_trip(device_id: str, kind: DeviceTopic) -> None:
    route = topics.parse(topics.device(device_id, kind))
    assert route.kind == kind
    assert route.device_id == device_id


@given(client_id=ids)
def test_client_topics_round_trip(client_id: str) -> None:
    route = topics.parse(topics.client_responses(client_id))
    assert route.client_id == client_id and route.kind == topics.CLIENT_RESPONSES


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev ice", "-lead", "x" * 65, "naïve", None, 7])
def test_invalid_ids_are_refused(bad: object) -> None:
    with pytest.raises(ProtocolError, match="invalid device id"):
        topics.status(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("topic", [
    "edgectl/v1/devices/pi-1",
    "edgectl/v2/devices/pi-1/status",
    "other/v1/devices/pi-1/status",
    "edgectl/v1/devices/pi-1/unknown",
    "edgectl/v1/devices/+/status",
    "edgectl/v1/clients/c1/requests",
    "edgectl/v1/devices/pi-1/status/extra",
])
def test_topics_outside_the_scheme_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError):
        topics.parse(topic)


def test_wildcards_and_shared_subscriptions() -> None:
    assert topics.device_wildcard("telemetry") == "edgectl/v1/devices/+/telemetry"
    assert topics.shared(topics.device_wildcard("status")) == "$share/edgectl/edgectl/v1/devices/+/status"


def _telemetry(**over: object) -> dict:
    hist = histogram.empty()
    hist[histogram.bucket_of(2.0)] = 9
    data = {"seq": 3, "interval_s": 5.0, "count": 10, "errors": 1, "latency_hist": hist,
            "latency_sum_ms": 18.0, "cpu_percent": 12.5, "rss_bytes": 40_000_000}
    data.update(over)
    return data


def test_valid_messages_decode_and_round_trip() -> None:
    t = messages.decode("telemetry", json.dumps(_telemetry()).encode())
    assert isinstance(t, messages.Telemetry) and t.seq == 3 and t.count == 10
    assert messages.decode("telemetry", t.encode()) == t
    s = messages.Status(state="online", labels={"group": "lab"},
                        active=messages.ActiveModel("d-1", "a" * 64, "digits", "1.0"))
    assert messages.decode("status", s.encode()) == s
    d = messages.Desired("d-1", "b" * 64, size=100_000, chunk_size=65536, name="m", version="2")
    assert messages.decode("desired", d.encode()).chunk_count == 2
    staged = messages.Desired("d-1", "b" * 64, 100, 1024, "m", "2", file="stage-02.tflite", service="svc",
                              stage=2, stages=3)
    assert messages.decode("desired", staged.encode()) == staged
    assert topics.service_infer("svc", 2) == "edgectl/v1/services/svc/stages/2/infer"
    assert topics.service_group("svc", 2) == "$share/svc-s2/edgectl/v1/services/svc/stages/2/infer"


@pytest.mark.parametrize(("over", "message"), [
    ({"file": "../model.tflite"}, "'file' must be a plain file name"),
    ({"service": "a/#"}, "'service' must be an id"),
    ({"service": "svc", "stage": 0, "stages": 2}, "'stage'"),
    ({"service": "svc", "stage": 3, "stages": 2}, "'stage'"),
    ({"stage": 1, "stages": 1}, "'stage'"),
])
def test_desired_roles_are_validated(over: dict[str, object], message: str) -> None:
    data = {"deployment_id": "d", "artifact": "a" * 64, "size": 10, "chunk_size": 1024, "name": "m",
            "version": "1", **over}
    with pytest.raises(ProtocolError, match=message):
        messages.decode("desired", json.dumps(data).encode())


@pytest.mark.parametrize(("payload", "message"), [
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps(_telemetry(seq=-1)).encode(), "'seq' must be in"),
    (json.dumps(_telemetry(seq="3")).encode(), "'seq' must be int"),
    (json.dumps(_telemetry(count=True)).encode(), "'count' must be int"),
    (json.dumps(_telemetry(latency_hist=[1, 2])).encode(), "buckets"),
    (json.dumps(_telemetry(errors=11)).encode(), "must not exceed count"),
    (json.dumps(_telemetry(count=20)).encode(), "sum == count - errors"),
    (json.dumps(_telemetry(interval_s=float("nan"))).encode(), "must be finite"),
    (b" " * (messages.MAX_JSON_BYTES + 1), "limit"),
])
def test_malformed_telemetry_is_refused_with_the_field_named(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        messages.decode("telemetry", payload)


def test_other_message_validation() -> None:
    with pytest.raises(ProtocolError, match="'state' must be one of"):
        messages.decode("status", b'{"state": "sleeping"}')
    with pytest.raises(ProtocolError, match="'artifact' must be a lowercase hex sha256"):
        messages.decode("fetch", b'{"artifact": "../../etc/passwd", "indexes": [0]}')
    with pytest.raises(ProtocolError, match="'indexes' must hold 1..64"):
        messages.decode("fetch", json.dumps({"artifact": "a" * 64, "indexes": list(range(65))}).encode())
    with pytest.raises(ProtocolError, match="chunk_size"):
        messages.decode("desired", json.dumps({"deployment_id": "d", "artifact": "a" * 64, "size": 10,
                                               "chunk_size": 1, "name": "m", "version": "1"}).encode())
    with pytest.raises(ProtocolError, match="do not carry JSON"):
        messages.decode("chunks", b"{}")


def test_frames_round_trip_and_reject_tampering() -> None:
    assert unpack(pack({"a": 1}, b"body")) == ({"a": 1}, b"body")
    chunk = Chunk("c" * 64, 2, 5, b"x" * 1000)
    assert Chunk.decode(chunk.encode()) == chunk
    tampered = bytearray(chunk.encode())
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError, match="does not match its sha256"):
        Chunk.decode(bytes(tampered))
    for junk in (b"", b"EDG1", b"XXXX\x00\x00\x00\x01{", b"EDG1\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            unpack(junk)


def test_tensors_travel_as_npy_and_pickles_are_refused() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(npy_to_tensor(tensor_to_npy(x)), x)
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ProtocolError):
        npy_to_tensor(buf.getvalue())
    with pytest.raises(ProtocolError, match="not a .npy tensor"):
        npy_to_tensor(b"hello")
    r = InferResponse(ok=True, output=x, model_version="1", latency_ms=0.5)
    back = InferResponse.decode(r.encode())
    assert back.ok and back.model_version == "1"
    np.testing.assert_array_equal(back.output, x)


def test_histogram_quantiles_are_within_bucket_error() -> None:
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=1.0, sigma=0.6, size=20_000)
    parts = [histogram.empty() for _ in range(4)]
    for i, s in enumerate(samples):
        parts[i % 4][histogram.bucket_of(float(s))] += 1
    merged = histogram.merge(parts)
    assert sum(merged) == len(samples)
    for q in (0.5, 0.95, 0.99):
        est, true = histogram.quantile(merged, q), float(np.quantile(samples, q))
        assert est is not None and abs(est - true) / true < 0.13, (q, est, true)
    assert histogram.quantile(histogram.empty(), 0.5) is None
    assert histogram.bucket_of(float("nan")) == 0
    assert histogram.bucket_of(1e9) == histogram.N_BUCKETS - 1


numeric_dtypes = st.sampled_from(["<f4", "<f8", "<f2", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", ">i4", ">f4", "|b1", "<c8"])


@given(dtype=numeric_dtypes, shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), seed=st.integers(0, 2**16))
def test_npy_bytes_match_numpy_and_round_trip(dtype: str, shape: list[int], seed: int) -> None:
    import io

    a = (np.random.default_rng(seed).normal(size=shape) * 100).astype(np.dtype(dtype))
    buf = io.BytesIO()
    np.save(buf, a)
    assert tensor_to_npy(a) == buf.getvalue()  # our fast writer is byte-identical to np.save
    back = npy_to_tensor(buf.getvalue())
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_truncated_npy_is_refused() -> None:
    data = tensor_to_npy(np.zeros((4, 4), np.float32))
    with pytest.raises(ProtocolError, match="data bytes for shape"):
        npy_to_tensor(data[:-3])

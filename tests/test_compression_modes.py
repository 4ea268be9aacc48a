"""Every quantization mode, pruning, bring-your-own .tflite, targets and --auto, end to end.

Each variant is converted by the real TFLite converter, run by the real LiteRT interpreter, and
its reported accuracy is checked against an evaluation written here, independently of sdk/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.compress import compress
from sdk.protocol.bundle import read_bundle
from sdk.protocol.runtime import TFLiteModel, check_sample

runner = CliRunner()


def independent_accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Batch evaluation straight on ai_edge_litert, quantizing the input by hand."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], [len(x), *x.shape[1:]])
    it.allocate_tensors()
    scale, zero = inp["quantization"]
    if np.issubdtype(inp["dtype"], np.integer):
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.round(x / scale + zero), info.min, info.max)
    it.set_tensor(inp["index"], x.astype(inp["dtype"]))
    it.invoke()
    probs = it.get_tensor(out["index"])
    return float(np.mean(np.argmax(probs, axis=1) == y))


@pytest.fixture(scope="module")
def data(digits) -> dict[str, np.ndarray]:
    with np.load(digits.eval) as ev:
        return {"x": ev["x"].astype(np.float32), "y": ev["y"]}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    x_tr, _, y_tr, _ = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    path = tmp_path_factory.mktemp("train") / "train.npz"
    np.savez(path, x=x_tr, y=y_tr)
    return path


@pytest.mark.parametrize(("mode", "float_io", "in_dtype"), [
    ("none", False, "float32"), ("dynamic", False, "float32"), ("float16", False, "float32"),
    ("int8", False, "int8"), ("int8", True, "float32"), ("int16x8", False, "float32"),
])
def test_each_mode_converts_runs_and_reports_the_accuracy_an_independent_eval_finds(
        digits, data, tmp_path: Path, mode: str, float_io: bool, in_dtype: str) -> None:
    out = tmp_path / f"{mode}.bundle"
    r = compress(digits.model, out, quantize=mode, calibration=digits.calibration, eval_data=digits.eval,
                 float_io=float_io)
    b = read_bundle(out)
    m = b.manifest
    assert m["quantization"] == mode and m["model"]["inputs"][0]["dtype"] == in_dtype
    x, expected = b.sample()
    check_sample(TFLiteModel(b.model_bytes), x, expected, m["sample"]["atol"], m["sample"]["rtol"])
    acc = independent_accuracy(b.model_bytes, data["x"], data["y"])
    assert m["report"]["variant"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert acc > 0.85
    assert r.report["reference"]["accuracy"] == pytest.approx(
        independent_accuracy(_float_ref(digits), data["x"], data["y"]), abs=1e-9)
    req = m["requires"]
    assert any(o["op"] == "SOFTMAX" for o in req["tflite_ops"]) and req["min_runtime_version"]
    # the trap from STACK-NOTES: only dynamic-range output is beyond tflite-runtime 2.14
    assert req["runtimes"]["tflite-runtime"] is (mode != "dynamic"), req
    assert req["runtimes"]["ai-edge-litert"] is True
    if mode in ("int8", "int16x8", "dynamic"):
        assert m["report"]["variant"]["size_bytes"] < 0.35 * m["report"]["reference"]["size_bytes"]


_REF: dict[str, bytes] = {}


def _float_ref(digits) -> bytes:
    """The float32 conversion, made here with TensorFlow directly (not through sdk.compress)."""
    if "ref" not in _REF:
        import keras
        import tensorflow as tf

        model = keras.models.load_model(digits.model, compile=False)
        _REF["ref"] = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    return _REF["ref"]


def test_pruning_reaches_its_sparsity_and_shrinks_the_gzip_size(digits, data, train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.bundle"
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), "--quantize", "int8", "--prune", "0.8",
                              "--train", str(train_file), "--prune-epochs", "3", "--calibration",
                              str(digits.calibration), "--eval", str(digits.eval), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    v = rep["variant"]
    assert v["pruning"]["achieved_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert all(abs(s - 0.8) < 0.02 for s in v["pruning"]["per_layer"].values())
    assert v["pruning"]["fine_tune"]["epochs"] == 3
    assert v["gzip_bytes"] < 0.2 * rep["reference"]["gzip_bytes"]
    model_bytes = read_bundle(out).model_bytes
    assert v["accuracy"] == pytest.approx(independent_accuracy(model_bytes, data["x"], data["y"]), abs=1e-9)
    assert v["accuracy"] > 0.8


def test_a_ready_tflite_is_bundled_as_is_inspected_and_evaluated(digits, data, tmp_path: Path) -> None:
    i8 = tmp_path / "given.tflite"
    compress(digits.model, tmp_path / "i8.bundle", quantize="int8", calibration=digits.calibration)
    i8.write_bytes(read_bundle(tmp_path / "i8.bundle").model_bytes)
    out = tmp_path / "byo.bundle"
    res = runner.invoke(app, ["compress", str(i8), "-o", str(out), "--eval", str(digits.eval), "--json"])
    assert res.exit_code == 0, res.output
    b = read_bundle(out)
    assert b.model_bytes == i8.read_bytes() and b.manifest["quantization"] == "int8"
    assert b.manifest["report"]["source"]["format"] == "tflite"
    assert b.manifest["requires"]["min_runtime_version"] == "1.14.0"
    assert b.manifest["report"]["variant"]["accuracy"] == pytest.approx(
        independent_accuracy(i8.read_bytes(), data["x"], data["y"]), abs=1e-9)
    res = runner.invoke(app, ["compress", str(i8), "-o", str(tmp_path / "x.bundle"), "--quantize", "float16"])
    assert res.exit_code == 1 and "cannot be re-quantized" in res.output


def test_target_profile_refuses_a_variant_its_runtime_cannot_load(digits, tmp_path: Path) -> None:
    out = tmp_path / "coral.bundle"
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), "--quantize", "dynamic",
                              "--target", "coral-dev-board"])
    assert res.exit_code == 1 and not out.exists()
    assert "tflite-runtime cannot load it" in res.output and "2.17.0" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), "--auto", "--target", "coral-dev-board",
                              "--eval", str(digits.eval), "--calibration", str(digits.calibration), "--json"])
    assert res.exit_code == 0, res.output
    assert read_bundle(out).manifest["quantization"] == "int8" and read_bundle(out).manifest["target"] == "coral-dev-board"


def test_auto_ships_the_smallest_variant_within_the_budget_and_records_every_candidate(digits, tmp_path: Path) -> None:
    out = tmp_path / "auto.bundle"
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), "--auto", "--max-accuracy-drop", "1.0",
                              "--eval", str(digits.eval), "--calibration", str(digits.calibration)])
    assert res.exit_code == 0, res.output
    assert "chose " in res.stdout
    m = read_bundle(out).manifest
    cands = m["report"]["candidates"]
    assert {c["quantization"] for c in cands} == {"none", "dynamic", "float16", "int8", "int16x8"}
    ok = [c for c in cands if c["eligible"]]
    chosen = [c for c in cands if c.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["gzip_bytes"] == min(c["gzip_bytes"] for c in ok)
    assert all(c["accuracy_drop_points"] <= 1.0 for c in ok)
    assert all("latency_ms" in c and "runtime" in c for c in cands)
    assert m["quantization"] == chosen[0]["quantization"]


def test_int8_collapse_is_detected_and_explained(digits, data, tmp_path: Path) -> None:
    cal = tmp_path / "narrow.npz"
    np.savez(cal, x=data["x"][:12] * 0.02)  # 12 rows of near-black images: tiny, unrepresentative
    out = tmp_path / "c.bundle"
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), "--quantize", "int8",
                              "--calibration", str(cal), "--eval", str(digits.eval), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["variant"]["accuracy"] < 0.6
    msg = rep["variant"]["collapse"]
    assert "int8 collapsed" in msg and "calibration set is small (12 rows" in msg and "unrepresentative" in msg
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(tmp_path / "a.bundle"), "--auto",
                              "--target", "coral-dev-board", "--calibration", str(cal), "--eval", str(digits.eval)])
    assert res.exit_code == 1 and "no variant meets" in res.output and "collapsed" in res.output
    assert not (tmp_path / "a.bundle").exists()

"""`edgectl compress` / `inspect` with a real TensorFlow converter and a real interpreter."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.protocol import BundleError
from sdk.protocol.bundle import read_bundle
from sdk.protocol.runtime import TFLiteModel, check_sample

runner = CliRunner()


def test_compress_writes_a_verified_bundle_that_passes_its_smoke_test(digits) -> None:
    b = read_bundle(digits.bundle)
    m = b.manifest
    assert m["quantization"] == "dynamic" and m["name"] == "digits" and m["version"] == "1.0.0"
    assert set(m["files"]) == {"model.tflite", "sample_input.npy", "sample_output.npy"}
    assert m["model"]["inputs"][0]["shape"] == [-1, 8, 8, 1]
    assert m["model"]["outputs"][0]["shape"] == [-1, 10]
    model = TFLiteModel(b.model_bytes)
    x, y = b.sample()
    assert check_sample(model, x, y, m["sample"]["atol"], m["sample"]["rtol"]) <= 1e-3
    rep = m["report"]
    # dynamic-range quantization shrinks the float32 model and keeps its accuracy
    assert rep["variant"]["size_bytes"] < 0.5 * rep["reference"]["size_bytes"]
    assert rep["variant"]["accuracy"] > 0.85
    assert abs(rep["variant"]["accuracy"] - rep["reference"]["accuracy"]) < 0.03
    assert set(rep["variant"]["recall"]) == {str(c) for c in range(10)}
    assert rep["variant"]["latency_ms"]["median"] > 0


def test_cli_compress_json_and_inspect(digits, tmp_path: Path) -> None:
    out = tmp_path / "f16.bundle"
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), "--quantize", "float16", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["variant"]["quantization"] == "float16"
    assert report["bundle"]["sha256"] == read_bundle(out).sha256
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0
    assert "quantization: float16" in res.stdout and "every file matches its sha256" in res.stdout
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert json.loads(res.stdout)["manifest"]["quantization"] == "float16"


def test_int8_needs_calibration_and_works_with_it(digits, tmp_path: Path) -> None:
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(tmp_path / "a"), "--quantize", "int8"])
    assert res.exit_code == 1 and "needs a calibration set" in res.output
    bad = tmp_path / "bad-cal.npz"
    np.savez(bad, x=np.zeros((20, 5), np.float32))
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(tmp_path / "a"), "--quantize", "int8",
                              "--calibration", str(bad)])
    assert res.exit_code == 1 and "does not fit the model input" in res.output
    out = tmp_path / "i8.bundle"
    res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), "--quantize", "int8",
                              "--calibration", str(digits.calibration), "--eval", str(digits.eval), "--json"])
    assert res.exit_code == 0, res.output
    m = read_bundle(out).manifest
    assert m["model"]["inputs"][0]["dtype"] == "int8" and m["sample"]["atol"] == 1.0
    assert json.loads(res.stdout)["variant"]["accuracy"] > 0.8


def test_saved_model_directory_is_accepted(digits, tmp_path: Path) -> None:
    import keras

    saved = tmp_path / "sm"
    keras.models.load_model(digits.model).export(str(saved), verbose=False)
    out = tmp_path / "sm.bundle"
    res = runner.invoke(app, ["compress", str(saved), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert read_bundle(out).manifest["report"]["source"]["format"] == "saved_model"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("junk.keras", b"this is not a model", "not a Keras model"),
    ("junk.h5", b"nor is this", "not a Keras model"),
    ("notes.txt", b"hello", "is not a model"),
])
def test_a_file_that_is_not_a_model_gives_one_clear_line(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    res = runner.invoke(app, ["compress", str(p), "-o", str(tmp_path / "x.bundle")])
    assert res.exit_code == 1
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    assert not (tmp_path / "x.bundle").exists()


def _rewrite(src: Path, dst: Path, change: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change.get(info.filename, zin.read(info.filename)))


def test_a_bundle_whose_bytes_do_not_match_its_manifest_is_refused(digits, tmp_path: Path) -> None:
    model = bytearray(read_bundle(digits.bundle).model_bytes)
    model[len(model) // 2] ^= 0xFF
    bad = tmp_path / "tampered.bundle"
    _rewrite(digits.bundle, bad, {"model.tflite": bytes(model)})
    with pytest.raises(BundleError, match="model.tflite has sha256"):
        read_bundle(bad)
    res = runner.invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 1 and "model.tflite has sha256" in res.output
    extra = tmp_path / "extra.bundle"
    with zipfile.ZipFile(extra, "w") as z, zipfile.ZipFile(digits.bundle) as zin:
        for n in zin.namelist():
            z.writestr(n, zin.read(n))
        z.writestr("payload.sh", b"rm -rf /")
    with pytest.raises(BundleError, match="unlisted"):
        read_bundle(extra)
    (tmp_path / "zero.bundle").write_bytes(b"")
    res = runner.invoke(app, ["inspect", str(tmp_path / "zero.bundle")])
    assert res.exit_code == 1 and "not a zip archive" in res.output


def test_wrong_shape_or_dtype_input_is_refused_by_the_model(digits) -> None:
    from sdk.protocol import ModelInputError

    model = TFLiteModel(read_bundle(digits.bundle).model_bytes)
    with pytest.raises(ModelInputError, match=r"input shape is \[1, 3\], model expects \[\?, 8, 8, 1\]"):
        model.run(np.zeros((1, 3), np.float32))
    with pytest.raises(ModelInputError, match="input dtype is float64, model expects float32"):
        model.run(np.zeros((1, 8, 8, 1)))
    assert model.run(np.zeros((4, 8, 8, 1), np.float32)).shape == (4, 10)

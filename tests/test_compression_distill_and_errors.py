"""`edgectl distill`, and bad input to `compress`: one line, non-zero exit, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdk.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    path = tmp_path_factory.mktemp("student") / "student.keras"
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
                      keras.layers.Dense(10, activation="softmax")]).save(path)
    return path


def test_distill_reports_teacher_scratch_and_distilled_side_by_side(digits, student: Path, tmp_path: Path) -> None:
    import keras

    with np.load(digits.eval) as ev:  # a small train set keeps the test fast; eval on the held-out rows
        x, y = ev["x"], ev["y"]
    train = tmp_path / "train.npz"
    np.savez(train, x=x[:240], y=y[:240])
    held = tmp_path / "held.npz"
    np.savez(held, x=x[240:], y=y[240:])
    out = tmp_path / "distilled.keras"
    res = runner.invoke(app, ["distill", "--teacher", str(digits.model), "--student", str(student), "--train",
                              str(train), "--eval", str(held), "--epochs", "4", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["param_ratio"] < 0.25 and rep["teacher"]["params"] > 4 * rep["student_distilled"]["params"]
    m = keras.models.load_model(out, compile=False)
    acc = float(np.mean(np.argmax(m.predict(x[240:], verbose=0), 1) == y[240:]))
    assert rep["student_distilled"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert rep["teacher"]["accuracy"] > 0.85 and 0.0 <= rep["student_scratch"]["accuracy"] <= 1.0
    res = runner.invoke(app, ["distill", "--teacher", str(digits.model), "--student", str(student), "--train",
                              str(train), "--epochs", "4", "-o", str(tmp_path / "d.keras")])
    assert res.exit_code == 0 and "teacher" in res.stdout and "student distilled" in res.stdout


def test_distill_refuses_a_student_with_another_output_size(digits, tmp_path: Path) -> None:
    import keras

    bad = tmp_path / "bad.keras"
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]).save(bad)
    res = runner.invoke(app, ["distill", "--teacher", str(digits.model), "--student", str(bad), "--train",
                              str(digits.eval), "-o", str(tmp_path / "o.keras")])
    assert res.exit_code == 1 and "teacher has 10 outputs but student has 3" in res.output
    assert not (tmp_path / "o.keras").exists()


def _unconvertible(tmp_path: Path) -> Path:
    import tensorflow as tf

    class Svd(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            return tf.linalg.svd(tf.reshape(x, [-1, 2, 2]), compute_uv=False)

    path = tmp_path / "svd"
    tf.saved_model.save(Svd(), str(path))
    return path


def test_bad_input_gives_one_line_and_no_bundle(digits, tmp_path: Path) -> None:
    wrong_labels = tmp_path / "labels.npz"
    with np.load(digits.eval) as ev:
        np.savez(wrong_labels, x=ev["x"], y=ev["y"] + 5)
    strings = tmp_path / "strings.npz"
    np.savez(strings, x=np.array([["a"] * 64] * 20))
    corrupt = tmp_path / "broken.tflite"
    corrupt.write_bytes(b"\x00\x00\x00\x00TFL3" + b"\xff" * 40)
    notflite = tmp_path / "plain.tflite"
    notflite.write_bytes(b"hello, not a flatbuffer")
    cases = [
        (["--eval", str(wrong_labels)], "labels run 5..14 but the model has 10 outputs"),
        (["--quantize", "int8", "--calibration", str(strings)], "x has dtype <U1, expected numbers"),
        (["--prune", "1.2"], "outside (0, 1)"),
        (["--prune", "0"], "outside (0, 1)"),
        (["--quantize", "int4"], "unknown quantization 'int4'"),
        (["--auto"], "--auto needs --eval"),
        (["--target", "toaster"], "unknown device profile 'toaster'"),
    ]
    out = tmp_path / "x.bundle"
    for args, message in cases:
        res = runner.invoke(app, ["compress", str(digits.model), "-o", str(out), *args])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output and len(res.output.strip().splitlines()) == 1, (args, res.output)
        assert "Traceback" not in res.output and not out.exists()
    for model, message in [(_unconvertible(tmp_path), "TFLite conversion (none) failed"),
                           (corrupt, "TFLite"), (notflite, "not a TFLite model")]:
        res = runner.invoke(app, ["compress", str(model), "-o", str(out)])
        assert res.exit_code == 1 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    assert not list(tmp_path.glob("*.tmp"))

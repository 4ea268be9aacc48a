"""Pipeline partitioning: the planner is exactly optimal, residual blocks are never cut, and the
stages (real TFLite, real interpreter) reproduce the whole model."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sdk.cli import app
from sdk.partition import analyse, brute_force_cuts, plan_cuts, run_pipeline, stage_cost
from sdk.protocol import CompressionError
from sdk.protocol.bundle import read_bundle
from sdk.protocol.frames import npy_to_tensor
from sdk.protocol.runtime import TFLiteModel, check_sample

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@settings(max_examples=200, deadline=None)
@given(
    unit_ms=st.lists(st.floats(0.01, 50), min_size=1, max_size=8),
    out_kb=st.lists(st.integers(1, 4000), min_size=8, max_size=8),
    devices=st.lists(st.tuples(st.floats(0.5, 20), st.floats(1, 1000)), min_size=1, max_size=4),
)
def test_the_planner_finds_the_brute_force_optimum(unit_ms, out_kb, devices) -> None:
    if len(devices) > len(unit_ms):
        with pytest.raises(CompressionError, match="allowed cut point"):
            plan_cuts(unit_ms, out_kb, [d[0] for d in devices], [d[1] for d in devices])
        return
    speed, link = [d[0] for d in devices], [d[1] for d in devices]
    out_bytes = [k * 1024 for k in out_kb[: len(unit_ms)]]
    bounds = plan_cuts(unit_ms, out_bytes, speed, link)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(unit_ms) - 1
    assert all(b[0] <= b[1] for b in bounds) and all(a[1] + 1 == b[0] for a, b in itertools.pairwise(bounds))
    got = max(sum(stage_cost(unit_ms, out_bytes, speed, link, s, i, j)) for s, (i, j) in enumerate(bounds))
    assert got == pytest.approx(brute_force_cuts(unit_ms, out_bytes, speed, link))


def test_a_slow_device_gets_less_work() -> None:
    # four equal units; stage 1 on a device 3x slower than stage 2
    bounds = plan_cuts([1.0] * 4, [0] * 4, [3.0, 1.0], [1e9, 1e9])
    assert bounds == [(0, 0), (1, 3)]


@pytest.fixture(scope="module")
def residual_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    z = keras.layers.Add(name="add")([x, y])
    z = keras.layers.MaxPooling2D(name="pool")(z)
    f = keras.layers.Flatten(name="flat")(z)
    h = keras.layers.Dense(32, activation="relu", name="d1")(f)
    o = keras.layers.Dense(10, activation="softmax", name="out")(h)
    path = tmp_path_factory.mktemp("partition") / "residual.keras"
    keras.Model(inp, o).save(path)
    return path


def test_cuts_inside_a_residual_block_are_refused(residual_model: Path) -> None:
    import keras

    g = analyse(keras.models.load_model(residual_model))
    assert [g.layers[c].name for c in g.cuts] == ["c1", "add", "pool", "flat", "d1"]
    assert len(g.refused) == 1 and "after c2: 2 tensors are live" in g.refused[0]


@pytest.mark.parametrize(("stages", "devices"), [(2, None), (3, "raspberry-pi-4,raspberry-pi-5,jetson-orin-nano")])
def test_stages_reproduce_the_whole_model(residual_model: Path, tmp_path: Path, stages: int, devices: str | None) -> None:
    out = tmp_path / "p.bundle"
    args = ["partition", str(residual_model), "-o", str(out), "--stages", str(stages), "--json"]
    res = CliRunner().invoke(app, [*args, "--devices", devices] if devices else args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert len(report["stages"]) == stages and report["max_abs_diff"] <= 1e-5
    b = read_bundle(out)
    pipe = b.manifest["pipeline"]["stages"]
    assert [s["file"] for s in pipe] == [f"stage-{i:02d}.tflite" for i in range(1, stages + 1)]
    layers = [name for s in pipe for name in s["layers"]]
    assert layers == ["c1", "c2", "add", "pool", "flat", "d1", "out"]  # every layer once, in order
    for s in pipe:  # every stage carries its own smoke test, and passes it
        m = TFLiteModel(b.files[s["file"]])
        check_sample(m, *(npy_to_tensor(b.files[s["sample"][k]]) for k in ("input", "output")),
                     s["sample"]["atol"], s["sample"]["rtol"])
    import keras

    model = keras.models.load_model(residual_model)
    x = np.random.default_rng(3).normal(size=(16, 8, 8, 1)).astype(np.float32)
    whole = TFLiteModel(b.files["stage-01.tflite"])  # sanity: a stage is not the whole model
    assert whole.output_spec["shape"] != [-1, 10]
    got = np.concatenate([run_pipeline(b, x[i : i + 1]) for i in range(len(x))])
    assert np.max(np.abs(got - model(x).numpy())) <= 1e-5


def test_impossible_requests_are_clear_errors(residual_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["partition", str(residual_model), "-o", str(tmp_path / "x"), "--stages", "9"])
    assert res.exit_code == 1 and "only 5 allowed cut point(s)" in res.output and "refused: after c2" in res.output
    res = runner.invoke(app, ["partition", str(residual_model), "-o", str(tmp_path / "x"), "--stages", "2",
                              "--devices", "raspberry-pi-4,pi-9000"])
    assert res.exit_code == 1 and "unknown device profile 'pi-9000'" in res.output
    res = runner.invoke(app, ["partition", str(residual_model), "-o", str(tmp_path / "x"), "--stages", "2",
                              "--devices", "raspberry-pi-4"])
    assert res.exit_code == 1 and "names 1 profile(s) for 2 stage(s)" in res.output
    assert not (tmp_path / "x").exists()


def test_int8_pipelines_need_a_calibration_set(residual_model: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["partition", str(residual_model), "-o", str(tmp_path / "x"), "--stages", "2",
                                   "--quantize", "int8"])
    assert res.exit_code == 1 and "need a calibration set" in res.output and not (tmp_path / "x").exists()


def test_int8_stages_are_calibrated_per_stage_and_keep_the_float_top1(digits, tmp_path: Path) -> None:
    """The digits CNN is a Sequential model (its layers carry extra Keras call records): it
    partitions too. Each int8 stage has its own quantization parameters; between stages the
    tensors are int8, to and from the caller float32, and the top-1 class is the float model's."""
    out = tmp_path / "int8.bundle"
    res = CliRunner().invoke(app, ["partition", str(digits.model), "-o", str(out), "--stages", "3", "--quantize", "int8",
                                   "--calibration", str(digits.calibration), "--eval", str(digits.eval),
                                   "--runs", "3", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["quantization"] == "int8" and report["eval_rows"] == 360 and report["top1_agreement"] >= 0.99
    b = read_bundle(out)
    pipe = b.manifest["pipeline"]
    assert b.manifest["quantization"] == "int8" and pipe["top1_agreement"] == report["top1_agreement"]
    for s in pipe["stages"]:
        for spec in (*s["inputs"], *s["outputs"]):
            assert spec["dtype"] == "int8" and spec["quantization"][0] > 0, spec
        m = TFLiteModel(b.files[s["file"]])
        check_sample(m, *(npy_to_tensor(b.files[s["sample"][k]]) for k in ("input", "output")),
                     s["sample"]["atol"], s["sample"]["rtol"])
    scales = [(s["outputs"][0]["quantization"], n["inputs"][0]["quantization"])
              for s, n in itertools.pairwise(pipe["stages"])]
    assert any(a != b_ for a, b_ in scales), "stages calibrated on their own inputs rarely agree on scales exactly"
    assert pipe["input"]["dtype"] == "float32" and pipe["output"]["dtype"] == "float32"
    x = np.load(digits.eval)["x"].astype(np.float32)
    got = run_pipeline(b, x)
    assert got.dtype == np.float32 and got.shape == (360, 10)
    import keras

    ref = keras.models.load_model(digits.model)(x).numpy()
    assert np.mean(np.argmax(got, -1) == np.argmax(ref, -1)) >= 0.99
    out_bytes = [s["out_bytes"] for s in pipe["plan"]["stages"]]
    assert out_bytes[0] == int(np.prod(pipe["stages"][0]["outputs"][0]["shape"][1:]))  # one byte per int8 value


def test_a_quantized_pipeline_below_the_agreement_floor_is_refused(digits, tmp_path: Path) -> None:
    from sdk.partition import partition

    cal = np.load(digits.calibration)["x"]
    with pytest.raises(CompressionError, match=r"top-1 class on only .* of 200 rows \(need 101%\)"):
        partition(digits.model, tmp_path / "x.bundle", stages=2, quantize="int8", calibration=cal, runs=2,
                  min_top1_agreement=1.01)
    assert not (tmp_path / "x.bundle").exists()

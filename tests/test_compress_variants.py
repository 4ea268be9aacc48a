"""One bundle holding several quantizations (`edgectl compress --variants float16,int8`): every
variant with its own file and smoke-test sample, checked by the manifest validator."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.compress import compress
from sdk.protocol import BundleError
from sdk.protocol.bundle import read_bundle, validate_manifest
from sdk.protocol.runtime import TFLiteModel, check_sample


@pytest.fixture(scope="module")
def variants_bundle(digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("variants") / "digits-variants.bundle"
    compress(digits.model, out, variant_modes=["float16", "int8"], calibration=digits.calibration,
             eval_data=digits.eval, name="digits", version="5.0.0", float_io=True)
    return out


def test_every_variant_has_its_file_and_reproduces_its_own_sample(variants_bundle: Path) -> None:
    b = read_bundle(variants_bundle)
    m = b.manifest
    assert m["quantization"] == "float16" and m["model"]["file"] == "model.tflite"  # the first is the default
    assert [(v["file"], v["quantization"]) for v in m["variants"]] == [("model.tflite", "float16"),
                                                                       ("model-int8.tflite", "int8")]
    sizes = {v["quantization"]: v["size_bytes"] for v in m["variants"]}
    assert sizes["int8"] < sizes["float16"]
    for v in m["variants"]:
        entry = b.model_entry(v["file"])
        x, y = b.sample(v["file"])
        model = TFLiteModel(b.files[entry["file"]])
        assert model.input_spec["shape"] == [-1, 8, 8, 1]
        assert check_sample(model, x, y, entry["sample"]["atol"], entry["sample"]["rtol"]) <= entry["sample"]["atol"] + 1e-6
        assert v["accuracy"] > 0.85 and v["latency_ms"]["median"] > 0


def test_the_validator_names_what_is_wrong_with_a_variant(variants_bundle: Path) -> None:
    m = read_bundle(variants_bundle).manifest
    for change, message in (
        (lambda v: v[1].update(quantization="int4"), "quantization 'int4' is not one of"),
        (lambda v: v[1].update(file="model.tflite"), "file appears twice"),
        (lambda v: v[1].pop("inputs"), "model-int8.tflite): inputs must be a non-empty list"),
        (lambda v: v[1].update(file="nope.tflite"), "file is not listed in files"),
    ):
        bad = copy.deepcopy(m)
        change(bad["variants"])
        with pytest.raises(BundleError, match=re.escape(message)):
            validate_manifest(bad)


def test_cli_refuses_bad_variant_lists_in_one_line(digits, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["compress", str(digits.model), "-o", str(tmp_path / "x.bundle"),
                                   "--variants", "float16,int4"])
    assert res.exit_code == 1 and "must list distinct quantizations" in res.output
    assert len(res.output.strip().splitlines()) == 1

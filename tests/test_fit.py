"""`edgectl devices fit`: which boards can run a variant, with predicted latency."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from sdk.cli import app
from sdk.fit import fit, load_variant
from sdk.protocol.profiles import get_profile, parse_profile


def test_fit_per_board_and_recommendation(digits) -> None:
    res = CliRunner().invoke(app, ["devices", "fit", str(digits.bundle), "--latency-ms", "1000", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = {r["profile"]: r for r in out["fits"]}
    host = out["variants"][0]["host_median_ms"]
    # a dynamic-range model from TF 2.21 cannot load on the Coral's tflite-runtime 2.14
    assert not rows["coral-dev-board"]["fits"]
    assert any("FULLY_CONNECTED version 12" in r for r in rows["coral-dev-board"]["reasons"])
    assert rows["raspberry-pi-4"]["fits"] and rows["raspberry-pi-4"]["predicted"] is True
    assert rows["raspberry-pi-4"]["predicted_ms"] == get_profile("raspberry-pi-4").speed_factor * host
    # with a generous target the least capable fitting board is recommended
    assert out["recommendation"]["profile"] == max(
        (r for r in rows.values() if r["fits"]), key=lambda r: r["predicted_ms"])["profile"]
    res = CliRunner().invoke(app, ["devices", "fit", str(digits.bundle), "--latency-ms", "0.000001"])
    assert res.exit_code == 0 and "no board meets" in res.stdout


def test_memory_and_size_limits(digits) -> None:
    v = load_variant(digits.bundle)
    data = get_profile("raspberry-pi-4").to_dict() | {"name": "tiny", "ram_mb": 64, "max_model_mb": 1}
    data.pop("source")
    data["quantizations"] = ["int8"]
    data["preferred_quantization"] = "int8"
    f = fit(v, parse_profile(data, "test"))
    assert not f.fits
    assert any("more than half of the board's 64 MB" in r for r in f.reasons)
    assert any("dynamic is not among the profile's quantizations" in r for r in f.reasons)


def test_a_non_model_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "x.bundle"
    p.write_bytes(b"junk")
    res = CliRunner().invoke(app, ["devices", "fit", str(p)])
    assert res.exit_code == 1 and "not a zip archive" in res.output

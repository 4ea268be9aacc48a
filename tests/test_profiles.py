"""Device profiles: the shipped ones load, and a bad one fails naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.protocol.profiles import ProfileError, get_profile, load_profiles

SHIPPED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "coral-dev-board"}


def test_shipped_profiles_load_and_make_sense() -> None:
    profiles = load_profiles()
    assert set(profiles) >= SHIPPED
    assert get_profile("coral-dev-board").quantizations == ("int8",)
    assert get_profile("jetson-orin-nano").preferred_quantization == "float16"
    pi4 = get_profile("raspberry-pi-4")
    assert pi4.predict_ms(2.0) == pytest.approx(12.0)
    assert pi4.transfer_ms(1_250_000) == pytest.approx(100.0)  # 10 Mbit over 100 Mb/s


def test_cli_lists_profiles() -> None:
    res = CliRunner().invoke(app, ["devices", "profiles", "--json"])
    assert res.exit_code == 0
    assert {p["name"] for p in json.loads(res.stdout)} >= SHIPPED


@pytest.mark.parametrize(("text", "message"), [
    ("name = 'x'", "field 'title' is missing"),
    (Path("devices/profiles/raspberry-pi-4.toml").read_text().replace('name = "raspberry-pi-4"', 'name = "x"')
     .replace("cores = 4", "cores = 'four'"), "field 'cores' has the wrong type"),
    (Path("devices/profiles/raspberry-pi-4.toml").read_text().replace('name = "raspberry-pi-4"', 'name = "x"')
     .replace('delegate = "xnnpack"', 'delegate = "magic"'), "field 'delegate' is 'magic'"),
    (Path("devices/profiles/raspberry-pi-4.toml").read_text().replace('name = "raspberry-pi-4"', 'name = "y"'),
     "must match the file name"),
    ("not [valid toml", "unreadable"),
])
def test_a_bad_profile_names_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "x.toml").write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profiles(tmp_path)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'pi-9'.*raspberry-pi-4"):
        get_profile("pi-9")

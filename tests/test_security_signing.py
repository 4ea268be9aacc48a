"""Agents enforce bundle signatures (``--trusted-key``): a real agent process, the real server,
a real Mosquitto. A signed bundle is installed; unsigned, wrong-key and tampered ones (model bytes
changed, manifest re-hashed, signature left stale) are refused with the reason, and the signed
model keeps answering."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.config import ConfigError, load_config
from agent.main import build_parser, resolve
from sdk.cli import app
from sdk.deploy import push_bundle
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet
from sdk.protocol.bundle import read_bundle, resign, sha256_bytes
from sdk.protocol.signing import (
    SigningKeyError,
    generate_keys,
    load_public_keys,
    signer,
    trusted_keys,
    verify,
)

pytestmark = pytest.mark.integration

DEVICE = "signed-pi"


def tamper(src: Path, dst: Path) -> None:
    """Change the model's bytes and re-hash them in the manifest; keep the old signature."""
    with zipfile.ZipFile(src) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(entries["manifest.json"])
    model = manifest["model"]["file"]
    data = bytearray(entries[model])
    data[len(data) // 2] ^= 0xFF
    entries[model] = bytes(data)
    manifest["files"][model] = {"sha256": sha256_bytes(entries[model]), "size": len(data)}
    entries["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for name, content in entries.items():
            z.writestr(name, content)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("keys")
    return {"good": generate_keys(d / "good"), "other": generate_keys(d / "other")}


@pytest.fixture(scope="module")
def fleet(mosquitto: Any, keys: dict[str, tuple[Path, Path]],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path_factory.mktemp("signed-fleet")) as f:
        f.start_server(broker=mosquitto.url)
        # A directory of trusted keys, as on a board (/etc/edgectl/keys).
        f.start_agent(DEVICE, labels={"group": "signed"}, extra=["--trusted-key", str(keys["good"][1].parent)])
        f.wait_online([DEVICE])
        yield f


def _push(fleet: LocalFleet, bundle: Path) -> dict[str, Any]:
    with fleet.client() as client:
        result = push_bundle(client, bundle, f"device:{DEVICE}", wait_s=30)
    assert not result.get("incomplete"), result
    (state,) = result["deployment"]["devices"]
    return state


def test_signed_accepted_then_unsigned_wrong_key_and_tampered_refused(
        fleet: LocalFleet, keys: dict[str, tuple[Path, Path]], digits: Any, tmp_path: Path) -> None:
    signed, wrong, tampered = tmp_path / "signed.bundle", tmp_path / "wrong.bundle", tmp_path / "tampered.bundle"
    for dst, key in ((signed, "good"), (wrong, "other")):
        shutil.copyfile(digits.bundle, dst)
        resign(dst, signer(keys[key][0]))
    tamper(signed, tampered)
    good_kid = next(iter(load_public_keys([keys["good"][1]])))
    # The tampered bundle is internally consistent: only the signature gives it away.
    assert read_bundle(tampered).signature == read_bundle(signed).signature

    first = _push(fleet, signed)
    assert first["state"] == "active", first
    x = np.load(digits.eval)["x"][:1].astype(np.float32)
    signed_sha = read_bundle(signed).sha256

    cases = ((digits.bundle, "is not signed"),
             (wrong, f"which this device does not trust (trusted key ids: {good_kid})"),
             (tampered, "signature does not match its manifest"))
    with InferenceClient(fleet.broker) as ic:
        for bundle, reason in cases:
            state = _push(fleet, bundle)
            assert state["state"] == "failed", (bundle, state)
            assert reason in state["detail"] and "failed verification" in state["detail"], state
            answer = ic.infer(DEVICE, x, timeout=10)
            assert answer.ok and answer.model_version == "1.0.0", answer
    with fleet.client() as client:
        device = next(d for d in client.devices() if d["id"] == DEVICE)
    assert device["model"]["artifact"] == signed_sha, "the signed model must keep serving"
    log = (fleet.workdir / f"{DEVICE}.log").read_text()
    assert f"signature of digits 1.0.0 ({signed_sha[:12]}) verified: key {good_kid}" in log


def test_push_and_compress_sign(fleet: LocalFleet, keys: dict[str, tuple[Path, Path]], digits: Any,
                                tmp_path: Path) -> None:
    """``edgectl push --sign KEY`` uploads a signed copy (the file is left unsigned) that the agent accepts."""
    copy = tmp_path / "digits.bundle"
    shutil.copyfile(digits.bundle, copy)
    before = copy.read_bytes()
    res = CliRunner().invoke(app, ["push", str(copy), "--to", f"device:{DEVICE}", "--server", fleet.url,
                                   "--sign", str(keys["good"][0]), "--wait", "30", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [d["state"] for d in out["deployment"]["devices"]] == ["active"], out
    assert copy.read_bytes() == before and read_bundle(copy).signature is None
    assert out["artifact"]["sha256"] != read_bundle(copy).sha256
    bad = CliRunner().invoke(app, ["push", str(copy), "--to", f"device:{DEVICE}", "--server", fleet.url,
                                   "--sign", str(tmp_path / "nokey")])
    assert bad.exit_code == 1 and "cannot read signing key" in bad.output


def test_compress_sign(digits: Any, keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    out = tmp_path / "c.bundle"
    res = CliRunner().invoke(app, ["compress", str(digits.model), "-o", str(out), "--quantize", "none",
                                   "--sign", str(keys["good"][0]), "--name", "digits", "--version", "2"])
    assert res.exit_code == 0, res.output
    assert "signed" in res.stdout
    assert verify(read_bundle(out), load_public_keys([keys["good"][1]])) == next(
        iter(load_public_keys([keys["good"][1]])))
    bad = CliRunner().invoke(app, ["compress", str(digits.model), "-o", str(tmp_path / "x.bundle"),
                                   "--sign", str(tmp_path / "nokey")])
    assert bad.exit_code == 1 and "cannot read signing key" in bad.output
    assert not (tmp_path / "x.bundle").exists()


def test_trusted_keys_in_the_config_file_and_bad_keys_stop_the_agent(
        keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "d"\ndata = "{tmp_path}"\ntrusted_keys = ["{keys["good"][1]}"]\n')
    s = resolve(build_parser().parse_args(["--config", str(conf)]))
    assert s["trusted_keys"] == [str(keys["good"][1])]
    s = resolve(build_parser().parse_args(["--config", str(conf), "--trusted-key", str(keys["other"][1])]))
    assert s["trusted_keys"] == [str(keys["other"][1])]  # the flag replaces the file's list
    conf.write_text('trusted_keys = [1]\n')
    with pytest.raises(ConfigError, match="trusted_keys"):
        load_config(conf)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SigningKeyError, match="no Ed25519 public keys"):
        trusted_keys([empty])
    with pytest.raises(SigningKeyError, match="does not exist"):
        trusted_keys([tmp_path / "missing.pub"])


def test_agent_exits_2_on_an_unusable_trusted_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    proc = subprocess.run([sys.executable, "-m", "agent.main", "--device-id", "d", "--data", str(tmp_path / "data"),
                           "--trusted-key", str(junk)], capture_output=True, text=True, timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"edgectl-agent: error: cannot read public key {junk}"), lines

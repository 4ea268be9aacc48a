"""Ed25519 bundle signatures: sign, verify, and refuse unsigned, mis-signed or tampered bundles."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.protocol import BundleError
from sdk.protocol.bundle import read_bundle, resign, tensor_spec, write_bundle
from sdk.protocol.frames import tensor_to_npy
from sdk.protocol.signing import SigningKeyError, generate_keys, load_public_keys, signer, verify


def make_bundle(path: Path, version: str = "1") -> None:
    spec = tensor_spec("x", [-1, 4], "float32")
    manifest = {"name": "m", "version": version, "quantization": "none",
                "model": {"file": "model.tflite", "inputs": [spec], "outputs": [spec]},
                "sample": {"input": "in.npy", "output": "out.npy", "atol": 0.0, "rtol": 0.0}}
    z = tensor_to_npy(np.zeros((1, 4), np.float32))
    write_bundle(path, manifest, {"model.tflite": b"not really a model", "in.npy": z, "out.npy": z})


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "keys")


def test_sign_and_verify(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    b = tmp_path / "b.bundle"
    make_bundle(b)
    unsigned_sha = read_bundle(b).sha256
    new_sha = resign(b, signer(keys[0]))
    bundle = read_bundle(b)
    assert bundle.sha256 == new_sha != unsigned_sha and bundle.signature is not None
    trusted = load_public_keys([keys[1]])
    assert verify(bundle, trusted) == next(iter(trusted))
    assert load_public_keys([keys[1].parent]).keys() == trusted.keys()  # a directory of .pub files


def test_refusals(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    b = tmp_path / "b.bundle"
    make_bundle(b)
    trusted = load_public_keys([keys[1]])
    with pytest.raises(BundleError, match="not signed"):
        verify(read_bundle(b), trusted)
    other = generate_keys(tmp_path / "other")
    resign(b, signer(other[0]))
    with pytest.raises(BundleError, match="does not trust"):
        verify(read_bundle(b), trusted)
    resign(b, signer(keys[0]))
    # tamper with the manifest (a new version string) but keep the old signature
    with zipfile.ZipFile(b) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    m = json.loads(entries["manifest.json"])
    m["version"] = "2-evil"
    entries["manifest.json"] = json.dumps(m, indent=2, sort_keys=True).encode()
    tampered = tmp_path / "t.bundle"
    with zipfile.ZipFile(tampered, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(BundleError, match="does not match its manifest"):
        verify(read_bundle(tampered), trusted)
    entries["signature.json"] = b'{"alg": "rsa", "key_id": "x", "signature": "AAAA"}'
    with zipfile.ZipFile(tampered, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(BundleError, match="only ed25519"):
        verify(read_bundle(tampered), trusted)


def test_keys_are_never_overwritten_and_bad_keys_are_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    assert keys[0].stat().st_mode & 0o777 == 0o600
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_keys(keys[0].parent)
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(SigningKeyError, match="cannot read public key"):
        load_public_keys([junk])


def test_cli_keys_generate_and_sign(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path / "k")])
    assert res.exit_code == 0, res.output
    assert "key id" in res.stdout
    b = tmp_path / "b.bundle"
    make_bundle(b)
    res = runner.invoke(app, ["keys", "sign", str(b), "--key", str(tmp_path / "k" / "edgectl-signing.key")])
    assert res.exit_code == 0, res.output
    assert verify(read_bundle(b), load_public_keys([tmp_path / "k"]))
    res = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path / "k")])
    assert res.exit_code == 1 and "refusing to overwrite" in res.output

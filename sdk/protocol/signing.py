"""Ed25519 signatures over bundles (``cryptography``, imported only when signing is used).

A signature covers the exact bytes of ``manifest.json``, which holds the sha256 and size of every
other file: so it covers the whole bundle. It travels inside the bundle as ``signature.json``::

    {"alg": "ed25519", "key_id": "<16 hex of sha256(public key)>", "signature": "<base64>"}

Agents hold one or more trusted public keys and refuse unsigned, mis-signed or tampered bundles.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .bundle import Bundle
from .errors import BundleError, EdgeError

ALG = "ed25519"
PRIVATE_NAME, PUBLIC_NAME = "edgectl-signing.key", "edgectl-signing.pub"


class SigningKeyError(EdgeError):
    """A signing key is missing, unreadable or of the wrong kind."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningKeyError("bundle signing needs the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519


def key_id(public_key: Any) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(directory: str | Path) -> tuple[Path, Path]:
    """Write a new key pair (private key mode 0600); refuse to overwrite an existing one."""
    serialization, ed25519 = _crypto()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / PRIVATE_NAME, d / PUBLIC_NAME
    if priv_path.exists() or pub_path.exists():
        raise SigningKeyError(f"{priv_path} or {pub_path} already exists; refusing to overwrite a signing key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key")
    return key


def load_public_keys(paths: Iterable[str | Path]) -> dict[str, Any]:
    """Trusted keys by key id, from PEM files (a directory means every *.pub in it)."""
    serialization, ed25519 = _crypto()
    keys: dict[str, Any] = {}
    for p in paths:
        p = Path(p)
        for f in sorted(p.glob("*.pub")) if p.is_dir() else [p]:
            try:
                key = serialization.load_pem_public_key(f.read_bytes())
            except (OSError, ValueError) as exc:
                raise SigningKeyError(f"cannot read public key {f}: {exc}") from None
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise SigningKeyError(f"{f} is not an Ed25519 public key")
            keys[key_id(key)] = key
    return keys


def signer(private_key_path: str | Path) -> Callable[[bytes], bytes]:
    """A function turning manifest bytes into ``signature.json`` bytes (for write_bundle/resign)."""
    key = load_private_key(private_key_path)
    kid = key_id(key.public_key())

    def sign(manifest: bytes) -> bytes:
        sig = base64.b64encode(key.sign(manifest)).decode()
        return json.dumps({"alg": ALG, "key_id": kid, "signature": sig}, sort_keys=True).encode()

    return sign


def verify(bundle: Bundle, trusted: dict[str, Any]) -> str:
    """Check the bundle's signature against trusted keys; return the signer's key id."""
    from cryptography.exceptions import InvalidSignature

    if bundle.signature is None:
        raise BundleError("bundle is not signed, and this device only accepts signed bundles")
    try:
        sig = json.loads(bundle.signature)
        alg, kid, raw = sig["alg"], sig["key_id"], base64.b64decode(sig["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BundleError("bundle signature is malformed") from None
    if alg != ALG:
        raise BundleError(f"bundle signature uses {str(alg)[:20]!r}; only {ALG} is accepted")
    key = trusted.get(kid)
    if key is None:
        raise BundleError(f"bundle is signed by key {str(kid)[:16]!r}, which this device does not trust "
                          f"(trusted key ids: {', '.join(sorted(trusted)) or 'none'})")
    try:
        key.verify(raw, bundle.manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"bundle signature does not match its manifest (key {kid}): tampered or corrupt") from None
    return kid


def trusted_keys(paths: Iterable[str | Path]) -> dict[str, Any]:
    """Like :func:`load_public_keys`, but an empty result is an error naming the paths.

    A device configured with trusted keys and none found would refuse every bundle: say so at
    start-up instead.
    """
    paths = list(paths)
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise SigningKeyError(f"trusted key {missing[0]} does not exist")
    keys = load_public_keys(paths)
    if not keys:
        raise SigningKeyError(f"no Ed25519 public keys (*.pub) found in {', '.join(map(str, paths))}")
    return keys

"""Push: upload a bundle, create a deployment, optionally wait for the devices to settle."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .client import ServerClient
from .protocol.bundle import read_bundle
from .protocol.errors import DeployError

FINAL_STATES = ("active", "failed")


def parse_stage_map(text: str | None) -> dict[str, int] | None:
    """``"pi-a=1,pi-b=2"`` -> ``{"pi-a": 1, "pi-b": 2}`` (``--stage-map``); a bad entry is an error naming it."""
    if not text:
        return None
    from .protocol.topics import valid_id

    out: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        dev, sep, num = (x.strip() for x in part.partition("="))
        if not sep or not valid_id(dev) or not num.isdigit():
            raise DeployError(f"--stage-map entry {part!r} must be DEVICE=STAGE (e.g. pi-a=1)")
        if dev in out:
            raise DeployError(f"--stage-map names device {dev} twice")
        out[dev] = int(num)
    return out or None


def push_bundle(client: ServerClient, bundle: str | Path, selector: str, *, wait_s: float = 0.0,
                poll_s: float = 0.5, sign: str | Path | None = None, service: str | None = None,
                replicas: int | None = None, stage_map: dict[str, int] | None = None,
                strategy: dict[str, Any] | None = None, gates: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify locally first (a bad bundle never leaves the workstation), upload, deploy.

    ``sign`` (an Ed25519 private key) uploads a signed copy; the file itself is left as it is.
    ``strategy`` / ``gates`` (see :mod:`sdk.rollouts`) make it a gated rollout; ``wait_s`` then
    waits for the rollout to end (completed or rolled back) instead of for every device.
    """
    read_bundle(bundle)
    if sign is not None:
        from .protocol.bundle import resign
        from .protocol.signing import signer

        sign_with = signer(sign)
        with tempfile.TemporaryDirectory(prefix="edgectl-sign-") as tmp:
            signed = Path(tmp) / Path(bundle).name
            shutil.copyfile(bundle, signed)
            resign(signed, sign_with)
            artifact = client.upload(signed)
    else:
        artifact = client.upload(bundle)
    deployment = client.deploy(artifact["sha256"], selector, service=service, replicas=replicas, stage_map=stage_map,
                               strategy=strategy, gates=gates)
    result: dict[str, Any] = {"artifact": artifact, "deployment": deployment}
    if deployment.get("service"):
        result["service"] = deployment["service"]  # name, stages, replicas, why each device got its stage
    if deployment.get("rollout"):
        result["rollout"] = deployment.pop("rollout")
        if wait_s > 0:
            from .rollouts import wait_rollout

            result["rollout"], ended = wait_rollout(client, result["rollout"]["id"], wait_s, poll_s=poll_s)
            result["deployment"] = client.deployment(deployment["id"])
            if not ended:
                result["incomplete"] = True
        return result
    if wait_s > 0:
        chosen = deployment.get("variants")  # the server says why each device got its variant only now
        deadline = time.monotonic() + wait_s
        while True:
            deployment = client.deployment(deployment["id"])
            if chosen is not None:
                deployment["variants"] = chosen
            states = [d["state"] for d in deployment.get("devices", [])]
            if states and all(s in FINAL_STATES for s in states):
                break
            if time.monotonic() > deadline:
                result["incomplete"] = True
                break
            time.sleep(poll_s)
        result["deployment"] = deployment
    return result

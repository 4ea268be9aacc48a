"""Push: upload a bundle, create a deployment, optionally wait for the devices to settle."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .client import ServerClient
from .protocol.bundle import read_bundle

FINAL_STATES = ("active", "failed")


def push_bundle(client: ServerClient, bundle: str | Path, selector: str, *, wait_s: float = 0.0,
                poll_s: float = 0.5) -> dict[str, Any]:
    """Verify locally first (a bad bundle never leaves the workstation), upload, deploy."""
    read_bundle(bundle)
    artifact = client.upload(bundle)
    deployment = client.deploy(artifact["sha256"], selector)
    result: dict[str, Any] = {"artifact": artifact, "deployment": deployment}
    if wait_s > 0:
        deadline = time.monotonic() + wait_s
        while True:
            deployment = client.deployment(deployment["id"])
            states = [d["state"] for d in deployment.get("devices", [])]
            if states and all(s in FINAL_STATES for s in states):
                break
            if time.monotonic() > deadline:
                result["incomplete"] = True
                break
            time.sleep(poll_s)
        result["deployment"] = deployment
    return result

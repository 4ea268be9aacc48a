"""The wire contract shared by the workstation, the server and the agent.

Pure Python + numpy: topic names (:mod:`.topics`), message schemas (:mod:`.messages`),
binary frames for chunks and tensors (:mod:`.frames`), the bundle format and its checks
(:mod:`.bundle`), latency histograms (:mod:`.histogram`) and the error family (:mod:`.errors`).
It imports neither ``server`` nor ``agent``; both import it.
"""

from .errors import (
    BundleError,
    CompressionError,
    DeployError,
    EdgeError,
    ModelInputError,
    ProtocolError,
)

PROTOCOL_VERSION = "v1"

__all__ = [
    "PROTOCOL_VERSION",
    "BundleError",
    "CompressionError",
    "DeployError",
    "EdgeError",
    "ModelInputError",
    "ProtocolError",
]

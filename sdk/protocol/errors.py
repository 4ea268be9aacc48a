"""One error family for every edgectl program (modelled on httpx's ``_exceptions``).

Lower-layer errors (paho return codes, TensorFlow converter errors, zipfile errors, SQL errors)
are mapped to these where they enter our code, so callers catch one family and users read one
clear line.
"""


class EdgeError(Exception):
    """Base class of every error edgectl raises on purpose."""


class ProtocolError(EdgeError):
    """A message, topic or frame does not follow the wire contract."""


class BundleError(EdgeError):
    """A bundle is unreadable, inconsistent with its manifest, or fails its checks."""


class CompressionError(EdgeError):
    """A model could not be loaded, converted or evaluated."""


class DeployError(EdgeError):
    """A deployment could not be created, delivered or activated."""


class ModelInputError(EdgeError):
    """An inference input does not match the model's input (shape or dtype)."""

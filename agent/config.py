"""The agent's configuration file (TOML, e.g. ``/etc/edgectl/agent.toml``).

Every key is optional and maps to the command-line flag of the same name (``-`` → ``_``);
flags given on the command line override the file. Unknown keys and wrong types are errors that
name the file and the key: a typo in a file nobody watches must not be silently ignored::

    device_id = "pi-kitchen-1"
    broker = "mqtt://fleet-host.local:1883"
    data = "/var/lib/edgectl"
    profile = "raspberry-pi-4"
    # username = "pi-kitchen-1"                # MQTT credentials, when the broker asks for them
    # password_file = "/etc/edgectl/password"  # one line; keep it mode 0600
    # trusted_keys = ["/etc/edgectl/keys"]     # .pub files or directories of them: accept only
    #                                          # bundles signed by one of these keys
    # ca_file = "/etc/edgectl/ca.pem"          # with broker = "mqtts://...": the fleet's own CA
    [labels]
    group = "lab"
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

#: key -> accepted types
KEYS: dict[str, tuple[type, ...]] = {
    "device_id": (str,), "broker": (str,), "data": (str,), "profile": (str,),
    "labels": (dict,), "heartbeat": (int, float), "telemetry_interval": (int, float),
    "threads": (int,), "log_level": (str,), "username": (str,), "password_file": (str,),
    "trusted_keys": (list, str), "ca_file": (str,),
}


class ConfigError(ValueError):
    """The configuration file is unreadable or holds an unknown key or a wrong type."""


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if key not in KEYS:
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(KEYS))})")
        if not isinstance(value, KEYS[key]) or isinstance(value, bool):
            want = " or ".join(t.__name__ for t in KEYS[key])
            raise ConfigError(f"config file {path}: key {key!r} must be {want}, got {type(value).__name__}")
    keys = data.get("trusted_keys", [])
    if not all(isinstance(k, str) and k for k in (keys if isinstance(keys, list) else [keys])):
        raise ConfigError(f"config file {path}: key 'trusted_keys' must be a path or a list of paths")
    for k, v in data.get("labels", {}).items():
        if not isinstance(v, str):
            raise ConfigError(f"config file {path}: label {k!r} must be a string, got {type(v).__name__}")
    return data

"""``edgectl-agent``: the command line of the device agent.

    edgectl-agent --device-id pi-1 --data /var/lib/edgectl --broker mqtt://fleet:1883 --label group=lab
    edgectl-agent --config /etc/edgectl/agent.toml          # the same keys in a file; flags override

Exit codes: 0 after SIGTERM/SIGINT (retained ``offline`` published), 2 for bad arguments or a bad
config file, 1 when the data directory cannot be used.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sdk.protocol import topics
from sdk.protocol.errors import EdgeError, ProtocolError
from sdk.protocol.messages import Status
from sdk.protocol.net import uses_tls
from sdk.protocol.profiles import Profile, get_profile

from .config import ConfigError, load_config
from .core import AGENT_VERSION, Agent
from .health import SystemdNotifier
from .slots import DataDir
from .transport import MqttTransport, parse_broker_url

log = logging.getLogger("edgectl.agent")
PROG = "edgectl-agent"

DEFAULTS: dict[str, Any] = {"broker": "mqtt://127.0.0.1:1883", "labels": {}, "profile": "",
                            "heartbeat": 5.0, "telemetry_interval": 5.0, "threads": None,
                            "log_level": "INFO", "username": None, "password_file": None,
                            "trusted_keys": [], "ca_file": None}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one clear line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _device_id(value: str) -> str:
    try:
        return topics.check_id(value)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not topics.valid_id(key) or len(val) > 64:
        raise argparse.ArgumentTypeError(
            f"label {value!r} must be KEY=VALUE with an id-like KEY and a VALUE of at most 64 characters")
    return key, val


def _broker(value: str) -> str:
    try:
        parse_broker_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive(kind: type) -> Callable[[Any], float | int]:
    def parse(value: Any) -> float | int:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{value!r} is not a {kind.__name__}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
        return number

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run TFLite models delivered by edgectl-server over MQTT.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with any of the settings below (e.g. /etc/edgectl/agent.toml); flags override it")
    p.add_argument("--device-id", type=_device_id, help="this device's id (e.g. pi-1)")
    p.add_argument("--broker", type=_broker,
                   help=f"MQTT broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS) (default: {DEFAULTS['broker']})")
    p.add_argument("--data", help="data directory (state, model slots, downloads)")
    p.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE",
                   help="a label reported in the status, e.g. group=lab (repeatable; replaces the file's labels)")
    p.add_argument("--profile", help="device profile (raspberry-pi-4, jetson-nano, ...: `edgectl devices profiles`); "
                                     "picks the runtime, delegate and thread count")
    p.add_argument("--heartbeat", type=_positive(float), metavar="S",
                   help=f"seconds between heartbeats (default: {DEFAULTS['heartbeat']:g})")
    p.add_argument("--telemetry-interval", type=_positive(float), metavar="S",
                   help=f"seconds between telemetry aggregates (default: {DEFAULTS['telemetry_interval']:g})")
    p.add_argument("--threads", type=_positive(int), metavar="N",
                   help="TFLite interpreter threads (default: the profile's, else 1)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="with an mqtts:// broker: the CA certificate to check it against (default: the system's CAs)")
    p.add_argument("--trusted-key", action="append", metavar="PATH", dest="trusted_keys",
                   help="accept only bundles signed by this Ed25519 public key (a .pub file, or a "
                        "directory of them; repeatable; replaces the file's trusted_keys)")
    p.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help=f"(default: {DEFAULTS['log_level']})")
    p.add_argument("--version", action="version", version=f"{PROG} {AGENT_VERSION}")
    return p


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Flags over the config file over defaults, every value checked as if it were a flag."""
    try:
        conf = load_config(args.config) if args.config else {}
    except ConfigError as exc:
        _fail(str(exc))
    where = f"config file {args.config}: " if args.config else ""
    s: dict[str, Any] = {**DEFAULTS, **conf}
    checks: dict[str, Callable[[Any], Any]] = {
        "device_id": _device_id, "broker": _broker, "heartbeat": _positive(float),
        "telemetry_interval": _positive(float), "threads": _positive(int)}
    for key, check in checks.items():
        if key in conf:
            try:
                s[key] = check(conf[key])
            except argparse.ArgumentTypeError as exc:
                _fail(f"{where}{key}: {exc}")
    if "labels" in conf:
        try:
            s["labels"] = dict(_label(f"{k}={v}") for k, v in conf["labels"].items())
        except argparse.ArgumentTypeError as exc:
            _fail(f"{where}labels: {exc}")
    if "log_level" in conf and str(conf["log_level"]).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        _fail(f"{where}log_level must be DEBUG, INFO, WARNING or ERROR")
    s["log_level"] = str(s["log_level"]).upper()
    for key in ("device_id", "broker", "data", "profile", "heartbeat", "telemetry_interval", "threads", "log_level",
                "ca_file"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.label is not None:
        s["labels"] = dict(args.label)
    if isinstance(s["trusted_keys"], str):
        s["trusted_keys"] = [s["trusted_keys"]]
    if args.trusted_keys is not None:
        s["trusted_keys"] = list(args.trusted_keys)
    for key, flag in (("device_id", "--device-id"), ("data", "--data")):
        if not s.get(key):
            _fail(f"{flag} is required (or `{key}` in the --config file)")
    if len(s["labels"]) > 32:
        _fail("at most 32 labels are allowed")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = resolve(args)
    profile: Profile | None = None
    if s["profile"]:
        try:
            profile = get_profile(s["profile"])
        except EdgeError as exc:
            _fail(str(exc))
    password = None
    if s["password_file"]:
        try:
            password = Path(s["password_file"]).read_text().strip()
        except OSError as exc:
            _fail(f"cannot read password_file {s['password_file']}: {exc.strerror or exc}", 1)
    if s["ca_file"]:
        if not uses_tls(s["broker"]):
            _fail(f"ca_file {s['ca_file']} is given but the broker {s['broker']} is not mqtts:// (TLS)")
        if not os.access(s["ca_file"], os.R_OK):
            _fail(f"cannot read ca_file {s['ca_file']}")
    trusted: dict[str, Any] | None = None
    if s["trusted_keys"]:
        from sdk.protocol.signing import trusted_keys

        try:
            trusted = trusted_keys(s["trusted_keys"])
        except EdgeError as exc:
            _fail(str(exc))
    threads = s["threads"] or (profile.threads if profile else 1)
    logging.basicConfig(level=s["log_level"], stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = DataDir(s["data"])
        restarts = data.record_start()
    except OSError as exc:
        print(f"{PROG}: error: cannot use data directory {s['data']}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    device_id = s["device_id"]
    transport = MqttTransport(s["broker"], device_id,
                              will=(topics.status(device_id), Status(state="offline").encode()),
                              keepalive=max(5, min(60, int(s["heartbeat"] * 3))),
                              username=s["username"], password=password, ca_file=s["ca_file"])
    agent = Agent(device_id, transport, data, labels=s["labels"], profile=profile.name if profile else "",
                  heartbeat_s=s["heartbeat"], telemetry_s=s["telemetry_interval"], threads=threads,
                  runtime=profile.runtime if profile else None,
                  delegate=profile.delegate if profile else "xnnpack", restarts=restarts,
                  trusted_keys=trusted)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; going offline", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("%s %s starting: device %s, broker %s, data %s, profile %s, runtime %s, %d thread(s), "
             "start #%d", PROG, AGENT_VERSION, device_id, s["broker"], s["data"], s["profile"] or "-",
             agent.runtime or "none", threads, restarts + 1)
    if trusted is not None:
        log.info("accepting only bundles signed by key id(s) %s", ", ".join(sorted(trusted)))
    else:
        log.warning("no --trusted-key configured: unsigned bundles are accepted")
    notifier = SystemdNotifier()
    agent.start()
    notifier.notify("READY=1")
    every = min(1.0, notifier.watchdog_s or 1.0)
    while not stop.wait(every):
        if notifier.watchdog_s is not None:
            if agent.alive():
                notifier.notify("WATCHDOG=1")
            else:  # a stuck worker: stop pinging and let systemd restart us
                log.error("an agent thread is stuck or dead; withholding the watchdog ping")
    notifier.notify("STOPPING=1")
    agent.stop()
    notifier.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

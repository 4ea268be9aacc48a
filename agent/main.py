"""``edgectl-agent``: the command line of the device agent.

    edgectl-agent --device-id pi-1 --data /var/lib/edgectl --broker mqtt://fleet:1883 --label group=lab

Exit codes: 0 after SIGTERM/SIGINT (retained ``offline`` published), 2 for bad arguments,
1 when the data directory cannot be used.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from sdk.protocol import topics
from sdk.protocol.errors import ProtocolError
from sdk.protocol.messages import Status

from .core import AGENT_VERSION, Agent
from .slots import DataDir
from .transport import MqttTransport, parse_broker_url

log = logging.getLogger("edgectl.agent")
PROG = "edgectl-agent"


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


def _positive(kind: type) -> object:
    def parse(value: str) -> float | int:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {kind.__name__}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
        return number

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run TFLite models delivered by edgectl-server over MQTT.")
    p.add_argument("--device-id", required=True, type=_device_id, help="this device's id (e.g. pi-1)")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", type=_broker,
                   help="MQTT broker URL, mqtt://HOST[:PORT] (default: %(default)s)")
    p.add_argument("--data", required=True, help="data directory (state, model slots, downloads)")
    p.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE",
                   help="a label reported in the status, e.g. group=lab (repeatable)")
    p.add_argument("--profile", default="", help="device profile name (default: none)")
    p.add_argument("--heartbeat", default=5.0, type=_positive(float), metavar="S",
                   help="seconds between heartbeats (default: %(default)s)")
    p.add_argument("--telemetry-interval", default=5.0, type=_positive(float), metavar="S",
                   help="seconds between telemetry aggregates (default: %(default)s)")
    p.add_argument("--threads", default=1, type=_positive(int), metavar="N",
                   help="TFLite interpreter threads (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: %(default)s)")
    p.add_argument("--version", action="version", version=f"{PROG} {AGENT_VERSION}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.label) > 32:
        print(f"{PROG}: error: at most 32 labels are allowed", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = DataDir(args.data)
    except OSError as exc:
        print(f"{PROG}: error: cannot use data directory {args.data}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    transport = MqttTransport(args.broker, args.device_id,
                              will=(topics.status(args.device_id), Status(state="offline").encode()),
                              keepalive=max(5, min(60, int(args.heartbeat * 3))))
    agent = Agent(args.device_id, transport, data, labels=dict(args.label), profile=args.profile,
                  heartbeat_s=args.heartbeat, telemetry_s=args.telemetry_interval, threads=args.threads)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; going offline", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("%s %s starting: device %s, broker %s, data %s", PROG, AGENT_VERSION, args.device_id,
             args.broker, args.data)
    agent.start()
    while not stop.wait(1.0):
        pass
    agent.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

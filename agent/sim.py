"""``edgectl-sim``: a fleet of N real agents in one process, for rollouts and ingestion at scale.

    edgectl-sim --devices 1000 --broker mqtt://127.0.0.1:1883 --data /tmp/sim --interpreter shared

Each simulated device is the agent's own code (:class:`agent.core.Agent`) with its own paho MQTT
connection (:class:`agent.transport.MqttTransport`) and its own data directory: it announces
itself, takes desired states, downloads and smoke-tests bundles, answers inference and publishes
heartbeats and telemetry (with health, through its on-disk spool) exactly like ``edgectl-agent``.

What is shared, so that 1,000 devices fit on two cores: devices are split over worker processes
(``--per-process``, 250 each), and in each process one network loop
(:class:`agent.transport.NetLoop`, paho's external-loop API over one selector) serves every
device's connection and ``--tickers`` threads (default 4) do every device's ticking (heartbeat
and telemetry when due, the telemetry spool). A device keeps its own deployment and inference
workers (threads that sleep until a message comes). ``--own-threads`` gives every device all of
its threads, as ``edgectl-agent`` has (about 5 per device: fine for tens of devices; at 1,000
the scheduler, not the agents, uses the CPU). Every device fsyncs its telemetry sequence number
and spool each interval, like a board: at scale put ``--data`` on a RAM disk (``/dev/shm``) unless
the disk is to be simulated too.

``--interpreter``:

* ``real`` (default) — every device loads its own TFLite interpreter, as on a board;
* ``shared`` — **the stub option for very large N**: devices that run the same model share one
  interpreter (real inference, serialized by its lock), so 1,000 devices do not hold 1,000
  copies. Status and health say ``runtime = "<backend> (shared by edgectl-sim)"``.

Fault injection, per device: ``--latency-ms``/``--jitter-ms`` add time to every inference,
``--error-rate`` makes that fraction of inferences fail in the "runtime".
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdk.protocol import topics
from sdk.protocol.errors import EdgeError
from sdk.protocol.messages import Status
from sdk.protocol.profiles import Profile, get_profile
from sdk.protocol.runtime import TFLiteModel, select_backend

from .core import Agent, Model
from .main import _broker, _label, _Parser, _positive
from .slots import DataDir
from .telemetry import _cpu_seconds, rss_bytes
from .transport import MqttTransport, NetLoop

log = logging.getLogger("edgectl.sim")
PROG = "edgectl-sim"


class InjectedFaults:
    """Wraps a model: adds latency (``latency_ms`` ± ``jitter_ms``) and fails ``error_rate`` of runs."""

    def __init__(self, model: Model, latency_ms: float, jitter_ms: float, error_rate: float,
                 rng: random.Random):
        self.model, self.latency_ms, self.jitter_ms, self.error_rate = model, latency_ms, jitter_ms, error_rate
        self.backend, self.delegate, self.rng = model.backend, model.delegate, rng
        self.armed = False  # the smoke test runs unharmed; faults start once the model serves

    def run(self, x: Any) -> Any:
        if not self.armed:
            self.armed = True
            return self.model.run(x)
        delay = self.latency_ms + (self.rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0)
        if delay > 0:
            time.sleep(delay / 1000.0)
        if self.error_rate and self.rng.random() < self.error_rate:
            raise RuntimeError("injected error (edgectl-sim --error-rate)")
        return self.model.run(x)


class SharedModels:
    """One interpreter per distinct model for the whole simulated fleet (``--interpreter shared``)."""

    def __init__(self, threads: int, runtime: str | None, delegate: str):
        self.threads, self.runtime, self.delegate = threads, runtime, delegate
        self._models: dict[str, TFLiteModel] = {}
        self._lock = threading.Lock()

    def get(self, data: bytes) -> TFLiteModel:
        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            if key not in self._models:
                self._models[key] = TFLiteModel(data, num_threads=self.threads, backend=self.runtime,
                                                delegate=self.delegate)
            return self._models[key]


class Fleet:
    def __init__(self, n: int, broker: str, data: Path, *, prefix: str = "sim", labels: dict[str, str] | None = None,
                 profile: Profile | None = None, interpreter: str = "real", latency_ms: float = 0.0,
                 jitter_ms: float = 0.0, error_rate: float = 0.0, heartbeat_s: float = 5.0,
                 telemetry_s: float = 5.0, seed: int = 0, start_index: int = 0, total: int | None = None,
                 own_threads: bool = False, tickers: int = 4):
        self.agents: list[Agent] = []
        self.transports: list[MqttTransport] = []
        #: Shared (default): one network loop and ``tickers`` ticker threads for all devices of
        #: this process; own_threads: every device has paho's thread, a ticker and a spooler.
        self.own_threads = own_threads
        self.loop = None if own_threads else NetLoop()
        self.ticker = None if own_threads else Ticker(tickers)
        threads = profile.threads if profile else 1
        runtime = profile.runtime if profile else None
        delegate = profile.delegate if profile else "xnnpack"
        shared = SharedModels(threads, runtime, delegate) if interpreter == "shared" else None
        width = max(4, len(str((total or n) - 1)))
        for i in range(start_index, start_index + n):
            device_id = f"{prefix}-{i:0{width}d}"
            rng = random.Random(seed * 1_000_003 + i)

            def factory(model_bytes: bytes, rng: random.Random = rng) -> Model:
                model: Model = shared.get(model_bytes) if shared else TFLiteModel(
                    model_bytes, num_threads=threads, backend=runtime, delegate=delegate)
                if latency_ms or jitter_ms or error_rate:
                    model = InjectedFaults(model, latency_ms, jitter_ms, error_rate, rng)
                return model

            transport = MqttTransport(broker, device_id,
                                      will=(topics.status(device_id), Status(state="offline").encode()),
                                      keepalive=max(5, min(60, int(heartbeat_s * 3))), loop=self.loop)
            dd = DataDir(data / device_id)
            agent = Agent(device_id, transport, dd, labels={**(labels or {}), "sim": "true"},
                          profile=profile.name if profile else "", heartbeat_s=heartbeat_s,
                          telemetry_s=telemetry_s, threads=threads, runtime=runtime, delegate=delegate,
                          restarts=dd.record_start(), model_factory=factory)
            plugin = select_backend(runtime)[0]
            agent.runtime, agent.runtime_version = plugin.module, plugin.version()
            if shared is not None:
                agent.runtime += " (shared by edgectl-sim)"
            self.agents.append(agent)
            self.transports.append(transport)

    def start(self, rate: float = 200.0) -> None:
        """Connect every device, at most ``rate`` new connections per second (which also spreads
        their heartbeats and telemetry over the interval instead of sending them all at once)."""
        if self.ticker is not None:
            self.ticker.start()
        for i, agent in enumerate(self.agents):
            agent.start(ticker=self.own_threads, spooler=self.own_threads)
            if self.ticker is not None:
                self.ticker.add(agent)
            if rate > 0 and i % max(1, int(rate / 10)) == 0:
                time.sleep(0.1)

    def connected(self) -> int:
        return sum(1 for t in self.transports if t.connected.is_set())

    def stop(self) -> None:
        """Stop every device at once (each publishes its retained offline status)."""
        if self.ticker is not None:
            self.ticker.stop()
        threads = [threading.Thread(target=a.stop, kwargs={"timeout": 5.0}, daemon=True) for a in self.agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        if self.loop is not None:
            self.loop.stop()


class Ticker:
    """A few threads that tick many agents (``Agent.tick_once`` and the telemetry spool's
    ``pump``) every ``period`` s, instead of a ticker and a spooler thread per agent. Several,
    not one: a tick may wait for the disk (the agent fsyncs its sequence number and spools the
    telemetry before sending it), and one slow disk must not hold back every device."""

    def __init__(self, threads: int = 4, period: float = 0.5):
        self.period = period
        self._agents: list[Agent] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, max(1, threads)), daemon=True,
                                          name=f"edgectl-sim-ticker-{i}") for i in range(max(1, threads))]
        self.late = 0  # rounds that took longer than the period

    def add(self, agent: Agent) -> None:
        self._agents.append(agent)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(10)

    def _run(self, index: int, of: int) -> None:
        due = time.monotonic() + self.period * index / of  # the threads' rounds are spread out too
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            for agent in self._agents[index::of]:
                agent.tick_once()
                try:
                    agent.spool.pump()
                except Exception:
                    log.exception("telemetry spool of %s failed", agent.device_id)
            due += self.period
            now = time.monotonic()
            if due < now:  # behind: skip the missed rounds rather than run them back to back
                self.late += 1
                due = now + self.period


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run N simulated devices (real agent code, one MQTT connection each).")
    p.add_argument("--devices", required=True, type=_positive(int), metavar="N")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", type=_broker)
    p.add_argument("--data", default="edgectl-sim-data", help="parent of the devices' data dirs (default: %(default)s)")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ...")
    p.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE")
    p.add_argument("--profile", default="", help="device profile of every simulated device")
    p.add_argument("--interpreter", choices=("real", "shared"), default="real",
                   help="real: one interpreter per device; shared: one per model for the whole fleet "
                        "(the stub option for very large N)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added to every inference")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="± uniform jitter on the added latency")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of inferences that fail [0, 1]")
    p.add_argument("--heartbeat", type=_positive(float), default=5.0, metavar="S")
    p.add_argument("--telemetry-interval", type=_positive(float), default=5.0, metavar="S")
    p.add_argument("--connect-rate", type=float, default=200.0, help="new connections per second")
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (default: run until SIGTERM)")
    p.add_argument("--report-every", type=float, default=5.0, metavar="S")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--own-threads", action="store_true",
                   help="every device runs its own network, ticker and spool threads (as edgectl-agent) "
                        "instead of sharing a network loop and --tickers per process")
    p.add_argument("--tickers", type=_positive(int), default=4, metavar="N",
                   help="ticker threads per worker process (default: %(default)s)")
    p.add_argument("--per-process", type=_positive(int), default=PER_PROCESS, metavar="N",
                   help="devices per worker process (default: %(default)s; paho's select() loop caps one "
                        "process at ~340 connections)")
    p.add_argument("--start-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="WARNING", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


#: paho-mqtt's network loop uses select(): file descriptors >= 1024 fail ("Unspecified error"),
#: and every client holds three (its socket and a socket pair). 250 devices per process stay clear.
PER_PROCESS = 250


def _spawn_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """Split the fleet over worker processes of this program; forward signals; relay their output."""
    procs: list[subprocess.Popen[str]] = []
    per = args.per_process
    for start in range(0, args.devices, per):
        n = min(per, args.devices - start)
        procs.append(subprocess.Popen([sys.executable, "-m", "agent.sim", *argv, "--devices", str(n),
                                       "--start-index", str(start), "--total", str(args.devices)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"{PROG}: {args.devices} device(s) in {len(procs)} worker process(es) "
          f"({', '.join(str(p.pid) for p in procs)})", flush=True)

    def relay(i: int, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            print(f"[worker {i}] {line}", end="", flush=True)

    relays = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    codes = [p.wait() for p in procs]
    for t in relays:
        t.join(5)
    return max(codes)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.error_rate <= 1 or args.latency_ms < 0 or args.jitter_ms < 0:
        print(f"{PROG}: error: --error-rate must be in [0, 1] and latencies >= 0", file=sys.stderr)
        return 2
    profile = None
    if args.profile:
        try:
            profile = get_profile(args.profile)
        except EdgeError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.devices > args.per_process and not args.total:
        raw = list(sys.argv[1:] if argv is None else argv)
        drop = {"--devices"}
        keep: list[str] = []
        skip = False
        for a in raw:
            if skip:
                skip = False
                continue
            if a in drop:
                skip = True
                continue
            if a.split("=", 1)[0] in drop:
                continue
            keep.append(a)
        return _spawn_workers(args, keep)
    raise_fd_limit(args.devices * 4 + 256)
    t0 = time.monotonic()
    try:
        fleet = Fleet(args.devices, args.broker, Path(args.data), prefix=args.prefix, labels=dict(args.label),
                      profile=profile, interpreter=args.interpreter, latency_ms=args.latency_ms,
                      jitter_ms=args.jitter_ms, error_rate=args.error_rate, heartbeat_s=args.heartbeat,
                      telemetry_s=args.telemetry_interval, seed=args.seed, start_index=args.start_index,
                      total=args.total or args.devices, own_threads=args.own_threads, tickers=args.tickers)
    except OSError as exc:
        print(f"{PROG}: error: cannot create the devices' data dirs under {args.data}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    stop = threading.Event()
    if args.total:  # a worker: stop when the parent goes away (its end of our stdin closes)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"{PROG}: starting {args.devices} device(s) ({args.interpreter} interpreter) against {args.broker}",
          flush=True)
    fleet.start(args.connect_rate)
    cpu0, w0 = _cpu_seconds() or 0.0, time.monotonic()
    deadline = t0 + args.duration if args.duration else None
    while not stop.wait(args.report_every if deadline is None else max(0.05, min(args.report_every, deadline - time.monotonic()))):
        cpu1, w1 = _cpu_seconds() or 0.0, time.monotonic()
        print(f"{PROG}: t={w1 - t0:.0f}s connected {fleet.connected()}/{args.devices}, "
              f"cpu {(cpu1 - cpu0) / max(w1 - w0, 1e-9) * 100:.0f}%, rss {(rss_bytes() or 0) / 2**20:.0f} MB, "
              f"threads {threading.active_count()}", flush=True)
        cpu0, w0 = cpu1, w1
        if deadline is not None and time.monotonic() >= deadline:
            break
    fleet.stop()
    print(f"{PROG}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

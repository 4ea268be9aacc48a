"""1,000 simulated devices on this machine: connected, reporting, stored, and what it costs.

    .venv/bin/python benchmarks/simulator.py [--devices 1000] [--seconds 30] [--telemetry-interval 5]
                                             [--interpreter shared|real] [--own-threads] [--data DIR]

Starts a private Mosquitto, the server's MQTT side and store (SQLite, in this process, as
``edgectl-server`` runs them) and ``edgectl-sim`` (real agent code: one paho connection, one
data dir and one on-disk telemetry spool per device; ``--per-process`` 250 devices per worker
process sharing one network loop and four ticker threads, unless ``--own-threads``). Once every
device has announced itself online it measures, over ``--seconds``:

* devices connected (retained ``online`` status) and devices that reported telemetry in the window;
* telemetry messages seen on the broker and rows the server stored in the window;
* CPU (% of one core) and RSS of the simulator's processes, of Mosquitto, and of this process
  (server side + the counting subscriber), from /proc.

The devices' data dirs go to ``--data`` (default: a directory on /dev/shm when it exists: each
device fsyncs its sequence number and spool every interval, and 1,000 devices would otherwise
measure this machine's disk, not the agents).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sqlalchemy as sa

from sdk.protocol import messages, topics
from server.broker import render_config
from tests.conftest import free_port, mosquitto_binary, wait_port


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(cpu seconds, rss bytes, threads) of a process and its child processes (the sim's workers)."""
    cpu, rss, threads = _one(pid)
    for child in _children(pid):
        c, r, t = _one(child)
        cpu, rss, threads = cpu + c, rss + r, threads + t
    return cpu, rss, threads


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _one(pid: int) -> tuple[float, int, int]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        f = raw[raw.rindex(")") + 2:].split()
        cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return cpu, rss, int(f[17])
    except OSError:
        return 0.0, 0, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--interpreter", default="shared", choices=("shared", "real"))
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window after all are online")
    ap.add_argument("--telemetry-interval", type=float, default=5.0)
    ap.add_argument("--heartbeat", type=float, default=5.0)
    ap.add_argument("--own-threads", action="store_true", help="pass --own-threads to edgectl-sim")
    ap.add_argument("--data", help="parent of the devices' data dirs (default: on /dev/shm)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.devices * 2 + 512)), hard))
    from server.config import Config
    from server.mqtt import MqttSide
    from server.service import Service
    from server.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = Path(tempfile.mkdtemp(prefix="edgectl-sim-", dir=args.data or ("/dev/shm" if Path("/dev/shm").is_dir() else tmp)))
        port = free_port()
        (work / "m.conf").write_text(render_config(port, work, persistence=False))
        broker = subprocess.Popen([mosquitto_binary(), "-c", str(work / "m.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        db_url = f"sqlite:///{work / 'edgectl.db'}"
        store = Store(db_url)
        service = Service(Config(data_dir=work / "server", db_url=db_url, log_level="WARNING"), store)
        side = MqttSide(service, f"mqtt://127.0.0.1:{port}", client_id="bench-server", session_expiry_s=0)
        side.start()
        online: set[str] = set()
        telemetry: dict[str, int] = {}
        beats: dict[str, int] = {}
        lock = threading.Lock()

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            route = topics.parse(msg.topic)
            if not msg.payload:
                return
            with lock:
                if route.kind == topics.DeviceTopic.STATUS:
                    if messages.decode("status", msg.payload).state == "online":
                        online.add(route.device_id)  # type: ignore[arg-type]
                else:
                    counts = telemetry if route.kind == topics.DeviceTopic.TELEMETRY else beats
                    counts[route.device_id] = counts.get(route.device_id, 0) + 1  # type: ignore[index]

        sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub.on_message = on_message
        sub.connect("127.0.0.1", port)
        sub.subscribe([(topics.device_wildcard(k), 1) for k in ("status", "telemetry", "heartbeat")])
        sub.loop_start()

        def rows() -> int:
            with store.engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT COUNT(*) FROM telemetry")).scalar() or 0)

        load = os.getloadavg()[0]
        t0 = time.monotonic()
        sim = subprocess.Popen([sys.executable, "-m", "agent.sim", "--devices", str(args.devices),
                                "--broker", f"mqtt://127.0.0.1:{port}", "--data", str(data),
                                "--interpreter", args.interpreter, "--profile", "raspberry-pi-4",
                                "--telemetry-interval", f"{args.telemetry_interval:g}",
                                "--heartbeat", f"{args.heartbeat:g}", "--report-every", "10",
                                *(["--own-threads"] if args.own_threads else [])],
                               stdout=subprocess.DEVNULL, stderr=open(work / "sim.log", "w"),  # noqa: SIM115
                               start_new_session=True)
        kids: list[int] = []
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                with lock:
                    if len(online) >= args.devices:
                        break
                time.sleep(0.2)
            t_conn = time.monotonic() - t0
            kids = _children(sim.pid)
            with lock:
                n_online = len(online)
                before, beats0 = dict(telemetry), dict(beats)
            rows0 = rows()
            cpu0, _, _ = proc_stats(sim.pid)
            bcpu0, _, _ = proc_stats(broker.pid)
            scpu0, _, _ = proc_stats(os.getpid())
            w0 = time.monotonic()
            time.sleep(args.seconds)
            w = time.monotonic() - w0
            cpu1, rss, threads = proc_stats(sim.pid)
            bcpu1, brss, _ = proc_stats(broker.pid)
            scpu1, _, _ = proc_stats(os.getpid())
            with lock:
                reporting = sum(1 for d, v in telemetry.items() if v > before.get(d, 0))
                tel = sum(telemetry.values()) - sum(before.values())
                beating = sum(1 for d, v in beats.items() if v > beats0.get(d, 0))
                hb = sum(beats.values()) - sum(beats0.values())
            stored = rows() - rows0
        finally:
            sim.terminate()
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(sim.pid, signal.SIGKILL)
                sim.wait(10)
            for _ in range(100):  # the workers are gone before their data dirs are
                if not any(Path(f"/proc/{k}").exists() for k in kids):
                    break
                time.sleep(0.1)
            sub.loop_stop()
            side.stop()
            store.close()
            log = (work / "sim.log").read_text(errors="replace").splitlines()
            errors = [line for line in log if " ERROR " in line or "Traceback" in line]
            broker.terminate()
            broker.wait(10)
            shutil.rmtree(data, ignore_errors=True)
    mode = "own threads per device" if args.own_threads else "shared network loop + 4 tickers per process"
    print(f"load before: {load:.2f} (1 min) on {os.cpu_count()} cores; sim log: {len(log)} lines, "
          f"{len(errors)} errors{': ' + errors[0][:200] if errors else ''}")
    print(f"devices: {args.devices} ({args.interpreter} interpreter, {mode}), online after {t_conn:.1f} s: "
          f"{n_online}/{args.devices} connected")
    print(f"reporting telemetry in the {w:.0f} s window: {reporting}/{args.devices} devices; "
          f"{tel / w:.0f} telemetry msg/s on the broker (interval {args.telemetry_interval:g} s: "
          f"{args.devices / args.telemetry_interval:.0f} expected); server stored {stored:,} rows "
          f"({stored / w:.0f}/s)")
    print(f"heartbeats in the window: {beating}/{args.devices} devices; {hb / w:.0f} msg/s "
          f"(interval {args.heartbeat:g} s: {args.devices / args.heartbeat:.0f} expected)")
    print(f"edgectl-sim: CPU {(cpu1 - cpu0) / w * 100:.0f}% of one core, RSS {rss / 2**20:.0f} MB "
          f"({rss / args.devices / 1024:.0f} KB/device), {threads} threads in {1 + len(kids)} processes")
    print(f"mosquitto:   CPU {(bcpu1 - bcpu0) / w * 100:.0f}% of one core, RSS {brss / 2**20:.0f} MB")
    print(f"server side + subscriber (this process): CPU {(scpu1 - scpu0) / w * 100:.0f}% of one core")


if __name__ == "__main__":
    main()

"""1,000 simulated devices on this machine: connected, reporting, and what it costs.

    .venv/bin/python benchmarks/simulator.py [--devices 1000] [--interpreter shared|real] [--seconds 40]

Starts a private Mosquitto, runs ``edgectl-sim`` (real agent code, one paho connection and one
data dir per device) and a subscriber that counts retained ``online`` statuses and telemetry per
device; prints the simulator's CPU and RSS (from /proc) and the broker's.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdk.protocol import messages, topics
from server.broker import render_config
from tests.conftest import free_port, mosquitto_binary, wait_port


def proc_stats(pid: int) -> tuple[float, int]:
    """(cpu seconds, rss bytes) of a process and its child processes (the sim's workers), from /proc."""

    cpu, rss = _one(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        c, r = _one(int(child))
        cpu, rss = cpu + c, rss + r
    return cpu, rss


def _one(pid: int) -> tuple[float, int]:
    import os

    raw = Path(f"/proc/{pid}/stat").read_text()
    f = raw[raw.rindex(")") + 2:].split()
    cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--interpreter", default="shared", choices=("shared", "real"))
    ap.add_argument("--seconds", type=float, default=40.0, help="measurement window after all connected")
    ap.add_argument("--telemetry-interval", type=float, default=5.0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.devices * 2 + 512)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        (work / "m.conf").write_text(render_config(port, work, persistence=False))
        broker = subprocess.Popen([mosquitto_binary(), "-c", str(work / "m.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        online: set[str] = set()
        telemetry: dict[str, int] = {}
        lock = threading.Lock()

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            route = topics.parse(msg.topic)
            if not msg.payload:
                return
            with lock:
                if route.kind == topics.DeviceTopic.STATUS:
                    if messages.decode("status", msg.payload).state == "online":
                        online.add(route.device_id)
                else:
                    telemetry[route.device_id] = telemetry.get(route.device_id, 0) + 1

        sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub.on_message = on_message
        sub.connect("127.0.0.1", port)
        sub.subscribe([(topics.device_wildcard("status"), 1), (topics.device_wildcard("telemetry"), 1)])
        sub.loop_start()
        t0 = time.monotonic()
        sim = subprocess.Popen([sys.executable, "-m", "agent.sim", "--devices", str(args.devices),
                                "--broker", f"mqtt://127.0.0.1:{port}", "--data", str(work / "sim"),
                                "--interpreter", args.interpreter, "--profile", "raspberry-pi-4",
                                "--telemetry-interval", f"{args.telemetry_interval:g}", "--heartbeat", "5",
                                "--report-every", "10"], stdout=subprocess.DEVNULL,
                               stderr=open(work / "sim.log", "w"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                with lock:
                    if len(online) >= args.devices:
                        break
                time.sleep(0.2)
            t_conn = time.monotonic() - t0
            with lock:
                n_online, tel0 = len(online), sum(telemetry.values())
            cpu0, _ = proc_stats(sim.pid)
            bcpu0, _ = proc_stats(broker.pid)
            w0 = time.monotonic()
            time.sleep(args.seconds)
            w = time.monotonic() - w0
            cpu1, rss = proc_stats(sim.pid)
            bcpu1, brss = proc_stats(broker.pid)
            with lock:
                reporting = sum(1 for v in telemetry.values() if v > 0)
                tel = sum(telemetry.values()) - tel0
            kids = [int(c) for c in Path(f"/proc/{sim.pid}/task/{sim.pid}/children").read_text().split()]
            threads = sum(len(list(Path(f"/proc/{p}/task").iterdir())) for p in [sim.pid, *kids])
        finally:
            sim.terminate()
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
            sub.loop_stop()
            log = (work / "sim.log").read_text(errors="replace").splitlines()
            blog = (work / "mosquitto.log").read_text(errors="replace").splitlines()
            print("broker log:", [line for line in blog if "rror" in line or "limit" in line.lower()][:5])
            print(f"sim log: {len(log)} lines; last: {log[-3:]}")
            broker.terminate()
            broker.wait(10)
    print(f"devices: {args.devices} ({args.interpreter} interpreter), all online after {t_conn:.1f} s: "
          f"{n_online}/{args.devices}")
    print(f"reporting telemetry: {reporting}/{args.devices}; {tel / w:.0f} telemetry msg/s over {w:.0f} s "
          f"(interval {args.telemetry_interval:g} s)")
    print(f"edgectl-sim: CPU {(cpu1 - cpu0) / w * 100:.0f}% of one core, RSS {rss / 2**20:.0f} MB "
          f"({rss / args.devices / 1024:.0f} KB/device), {threads} threads in {1 + len(kids)} processes")
    print(f"mosquitto:   CPU {(bcpu1 - bcpu0) / w * 100:.0f}% of one core, RSS {brss / 2**20:.0f} MB")


if __name__ == "__main__":
    main()

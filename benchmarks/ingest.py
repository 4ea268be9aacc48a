"""Telemetry ingestion from a real Mosquitto into the store: messages/s sustained, no loss.

    .venv/bin/python benchmarks/ingest.py [--db sqlite|postgresql|both|URL] [--workers 0,2]
                                          [--messages 200000] [--devices 1000] [--rate 0]

A load generator process (``_mqttload``: raw MQTT 3.1.1 over a socket, QoS 1, real
``Telemetry`` JSON with 72-bucket histograms, ~40k msg/s on its own, so it is not the
bottleneck a paho publisher was) sends ``--messages`` aggregates from ``--devices`` devices
to a private Mosquitto, as fast as the broker acknowledges them (or at ``--rate`` msg/s). The
server's own MQTT side stores them: in the server process (``--workers 0``: paho callback ->
bounded queue -> batch thread) or in N ingest worker processes sharing the subscription
(``server.ingest``, what ``edgectl-server --ingest-workers N`` runs).

Printed per database and worker count:

* **sustained**: msg/s stored between 10 % and 90 % of the run (slope of the stored count);
* **overall**: messages / (last row stored - first message published);
* **no loss**: messages sent == rows in ``telemetry``; the hourly rollups add up to the raw rows
  (intervals, counts, errors and every latency bucket);
* the most messages waiting in the server's queues, and CPU seconds per 1,000 messages of the
  server processes, the broker and the load generator (from /proc).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _mqttload
import sqlalchemy as sa
from _databases import fresh_database, targets

from sdk.protocol import messages
from server.broker import find_mosquitto, free_port, port_accepts, render_config


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    f = raw[raw.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _publish(port: int, n: int, devices: int, rate: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    t0, t1 = _mqttload.publish("127.0.0.1", port, n, devices, rate=rate)
    out.put((t0, t1, cpu_seconds(os.getpid())))


def postgres_backends(store) -> list[int]:
    """PIDs of this database's PostgreSQL backends (the server's and the workers' connections)."""
    if store.engine.dialect.name != "postgresql":
        return []
    with store.engine.connect() as conn:
        pids = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")).scalars()
        return [p for p in pids if Path(f"/proc/{p}").exists()]


def check(store, n: int) -> tuple[int, bool, str]:
    """(rows stored, rollups == raw sums, detail)."""
    with store.engine.connect() as conn:
        rows, count, errors = conn.execute(sa.text("SELECT COUNT(*), SUM(count), SUM(errors) FROM telemetry")).one()
        hist = [0] * 72
        for (h,) in conn.execute(sa.text("SELECT latency_hist FROM telemetry")):
            for i, v in enumerate(json.loads(h) if isinstance(h, str) else h):
                hist[i] += v
        buckets = ", ".join(f"SUM(b{i:02d})" for i in range(72))
        r = conn.execute(sa.text(f"SELECT SUM(intervals), SUM(count), SUM(errors), {buckets} FROM telemetry_hourly")).one()
    ok = (r[0], r[1], r[2], list(r[3:])) == (rows, count, errors, hist)
    return rows, ok, f"rollups: intervals {r[0]:,}, count {r[1]:,}, errors {r[2]:,}, buckets {sum(r[3:]):,}"


def run(db_url: str, n: int, devices: int, workers: int, port: int, broker_pid: int, rate: float) -> None:
    from server.config import Config
    from server.ingest import WORKER_KINDS, IngestWorkers, retire_sessions
    from server.mqtt import MqttSide
    from server.service import INGESTED, Service
    from server.store import Store

    data = Path(tempfile.mkdtemp(prefix="edgectl-ingest-server-"))
    store = Store(db_url)
    service = Service(Config(data_dir=data, db_url=db_url, log_level="WARNING"), store)
    kinds = [k for k in INGESTED if k not in WORKER_KINDS] if workers else INGESTED
    side = MqttSide(service, f"mqtt://127.0.0.1:{port}", kinds=kinds, session_expiry_s=0)
    side.start()
    pool = None
    if workers:
        pool = IngestWorkers(service, f"mqtt://127.0.0.1:{port}", workers, base_client_id=side.client_id)
        pool.start()
        service.queue_depth = lambda: side.queue.qsize() + pool.depth()
    try:
        now = service.clock()
        for d in range(devices):
            store.status_online(f"bench-{d:04d}", messages.Status(state="online", connection="b"), now)
        server_pids = [os.getpid(), *(p.pid for p, _ in (pool._procs.values() if pool else []))]
        cpu0 = sum(cpu_seconds(p) for p in server_pids)
        pg_pids = postgres_backends(store)
        pcpu0 = sum(cpu_seconds(p) for p in pg_pids)
        bcpu0 = cpu_seconds(broker_pid)
        out: mp.Queue = mp.get_context("spawn").Queue()  # type: ignore[type-arg]
        proc = mp.get_context("spawn").Process(target=_publish, args=(port, n, devices, rate, out))
        proc.start()
        samples: list[tuple[float, int]] = []
        depth = 0
        deadline = time.time() + 900
        while True:
            info = service.info()
            done = info["ingest"].get("telemetry_stored", 0)
            samples.append((time.time(), done))
            depth = max(depth, info["queue_depth"])
            if done + sum(info["rejected"].values()) >= n:
                break
            if time.time() > deadline or (not proc.is_alive() and proc.exitcode):
                raise SystemExit(f"stopped: load generator exit code {proc.exitcode}, stored {done:,} of {n:,}")
            time.sleep(0.1)
        t0, t_pub, gen_cpu = out.get(timeout=120)
        proc.join(10)
        cpu = sum(cpu_seconds(p) for p in server_pids) - cpu0
        pcpu = sum(cpu_seconds(p) for p in pg_pids) - pcpu0
        bcpu = cpu_seconds(broker_pid) - bcpu0
        t_end = samples[-1][0]
        lo = next(s for s in samples if s[1] >= 0.1 * n)
        hi = next(s for s in samples if s[1] >= 0.9 * n)
        sustained = (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9)
        if os.environ.get("INGEST_TIMELINE"):
            print([(round(t - t0, 2), d) for t, d in samples[::3]])
        rows, rollups_ok, detail = check(store, n)
        dialect = store.engine.dialect.name
        where = f"{workers} ingest worker(s)" if workers else "in the server process"
        print(f"{dialect:10s} {where}: {sustained:,.0f} msg/s sustained, {n / (t_end - t0):,.0f} overall "
              f"({n:,} messages from {devices} devices in {t_end - t0:.1f} s; load generator done after "
              f"{t_pub - t0:.1f} s{f' at --rate {rate:g}' if rate else ''})", flush=True)
        print(f"{'':10s} sent {n:,}, rows stored {rows:,}: no loss {rows == n}; rollups == raw sums {rollups_ok} "
              f"({detail}); rejected {service.rejected() or 'none'}; most queued {depth:,}", flush=True)
        pg = f", PostgreSQL backends {pcpu / n * 1000:.3f}" if pg_pids else ""
        print(f"{'':10s} CPU s per 1,000 msgs: server {cpu / n * 1000:.3f}{pg}, mosquitto {bcpu / n * 1000:.3f}, "
              f"load generator {gen_cpu / n * 1000:.3f}; last row stored {t_end - t_pub:.2f} s after the "
              f"last message was acknowledged", flush=True)
    finally:
        if pool is not None:
            pool.stop()
            # end the workers' persistent sessions, or the next run's telemetry would be shared with them
            retire_sessions(service.config, f"mqtt://127.0.0.1:{port}", side.client_id, keep=0)
        side.stop()
        store.close()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default="both", help="sqlite | postgresql | both | a SQLAlchemy URL")
    ap.add_argument("--workers", default="2", help="comma-separated ingest worker counts (0 = in the server process)")
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.0, help="offered msg/s (default 0: as fast as acknowledged)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgectl-ingest-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(render_config(port, work, persistence=False))
    broker = subprocess.Popen([find_mosquitto(), "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores", flush=True)
    try:
        for _ in range(100):
            if port_accepts(port):
                break
            time.sleep(0.05)
        for target in targets(args.db):
            for workers in (int(w) for w in args.workers.split(",")):
                with fresh_database(target) as url:
                    run(url, args.messages, args.devices, workers, port, broker.pid, args.rate)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

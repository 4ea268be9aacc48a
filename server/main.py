"""``edgectl-server``: parse the command line, start store, broker, MQTT side and HTTP API,
print one ready line, and shut everything down cleanly on SIGTERM/SIGINT.

Start-up errors (port in use, bad database URL, no broker) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdk.protocol.errors import EdgeError

from .config import DEFAULT_CHUNK_SIZE, DEFAULT_HTTP, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Config
from .security import SERVER_USER

log = logging.getLogger("edgectl.server")
#: How often the retention policy runs (also once at start).
RETENTION_EVERY_S = 3600.0


class StartupError(EdgeError):
    """The server cannot start; the message is the one line the user reads."""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8765, port 0 = any)")
    return host, int(port)


def _broker(text: str) -> str:
    from sdk.protocol.net import parse_broker_url

    if text == "local":
        return text
    try:
        parse_broker_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or 'local'") from None
    if text.startswith("mqtts:"):
        raise argparse.ArgumentTypeError(
            "the server connects to its broker without TLS (use a loopback or trusted listener, "
            "mqtt://HOST:PORT); mqtts:// is for devices and clients")
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _nonneg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value


def _chunk_size(text: str) -> int:
    if not text.isdigit() or not MIN_CHUNK_SIZE <= int(text) <= MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    return int(text)


def _duration(text: str) -> float:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a duration such as 36h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgectl-server", description="The edgectl fleet host.")
    p.add_argument("--data", help="data directory (default: $EDGECTL_DATA or ./edgectl-data)")
    p.add_argument("--db", help="SQLAlchemy URL (default: sqlite:///DATA/edgectl.db)")
    p.add_argument("--http", type=_host_port, default=DEFAULT_HTTP, metavar="HOST:PORT",
                   help=f"HTTP API address (default {DEFAULT_HTTP}; port 0 picks a free one)")
    p.add_argument("--broker", type=_broker, default="local", metavar="local|mqtt://HOST:PORT",
                   help="start a private Mosquitto (default) or use an existing broker")
    p.add_argument("--broker-port", type=int, default=0, metavar="N",
                   help="port of the private broker (default 0: a free port)")
    p.add_argument("--heartbeat-timeout", type=_positive, default=15.0, metavar="S",
                   help="mark a device offline after S seconds without any message (default 15)")
    p.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"artifact chunk size (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--fanout-window", type=_nonneg, default=5.0, metavar="S",
                   help="devices downloading the same artifact at once share one broadcast copy of each "
                        "chunk; a chunk broadcast within S seconds is not sent again (default 5; 0: off)")
    p.add_argument("--retention-raw", type=_duration, default=7 * 86400.0, metavar="DURATION",
                   help="keep raw per-interval telemetry this long (default 7d)")
    p.add_argument("--retention-rollup", type=_duration, default=400 * 86400.0, metavar="DURATION",
                   help="keep hourly rollups, events and closed sessions this long (default 400d)")
    p.add_argument("--rollout-interval", type=_positive, default=1.0, metavar="S",
                   help="advance rollouts (install progress, soak, gates) every S seconds (default 1)")
    sec = p.add_argument_group("security")
    sec.add_argument("--token-file", metavar="FILE",
                     help="the HTTP API's bearer token (default DATA/api-token, created with a random "
                          "token at first start, mode 0600)")
    sec.add_argument("--public-read", action="store_true",
                     help="allow GET requests (health, lists, metrics) without a token; changes still need one")
    sec.add_argument("--secure", action="store_true",
                     help="with --broker local: per-device passwords and ACL (edgectl devices enroll), "
                          "anonymous clients refused")
    sec.add_argument("--broker-bind", default="127.0.0.1", metavar="HOST",
                     help="address the private broker listens on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    sec.add_argument("--broker-tls-port", type=int, metavar="N",
                     help="with --broker local: also listen for devices over TLS on --broker-bind:N "
                          "(needs --broker-certfile and --broker-keyfile; the plain port stays on loopback)")
    sec.add_argument("--broker-certfile", metavar="FILE", help="the private broker's TLS certificate (PEM)")
    sec.add_argument("--broker-keyfile", metavar="FILE", help="its private key (PEM)")
    sec.add_argument("--broker-user", metavar="USER",
                     help="the server's username on an external broker (--broker mqtt://...)")
    sec.add_argument("--broker-password-file", metavar="FILE",
                     help="file holding the server's password on an external broker")
    p.add_argument("--ingest-workers", type=_workers, default=0, metavar="N",
                   help="store device telemetry in N worker processes that share its subscription "
                        "(default 0: in the server process; about 2 per core for the highest rates)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO)")
    return p


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) > 64:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from 0 to 64")
    return int(text)


def parse_config(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    data = Path(args.data or os.environ.get("EDGECTL_DATA") or "./edgectl-data").expanduser().resolve()
    if not 0 <= args.broker_port <= 65535:
        build_parser().error(f"--broker-port {args.broker_port} is not a port number")
    host, port = args.http
    if args.secure and args.broker != "local":
        build_parser().error("--secure configures the private broker (--broker local); on your own broker "
                             "use DATA/broker/passwd and DATA/broker/acl, and --broker-user")
    if bool(args.broker_user) != bool(args.broker_password_file):
        build_parser().error("--broker-user and --broker-password-file go together")
    tls = (args.broker_tls_port, args.broker_certfile, args.broker_keyfile)
    if any(v is not None for v in tls) and (not all(v is not None for v in tls) or args.broker != "local"):
        build_parser().error("--broker-tls-port, --broker-certfile and --broker-keyfile go together, "
                             "with --broker local")
    if args.broker_tls_port is not None and not 0 < args.broker_tls_port <= 65535:
        build_parser().error(f"--broker-tls-port {args.broker_tls_port} is not a port number")
    for path in tls[1:]:
        if path is not None and not os.access(path, os.R_OK):
            build_parser().error(f"cannot read {path}")
    return Config(data_dir=data, db_url=args.db or f"sqlite:///{data / 'edgectl.db'}",
                  http_host=host, http_port=port, broker=args.broker, broker_port=args.broker_port,
                  heartbeat_timeout=args.heartbeat_timeout, chunk_size=args.chunk_size,
                  fanout_window_s=args.fanout_window,
                  log_level=args.log_level, retention_raw_s=args.retention_raw,
                  retention_rollup_s=args.retention_rollup, rollout_interval_s=args.rollout_interval,
                  token_file=Path(args.token_file).expanduser().resolve() if args.token_file else None,
                  public_read=args.public_read, secure_broker=args.secure, broker_bind=args.broker_bind,
                  broker_username=args.broker_user,
                  broker_tls=(args.broker_tls_port, Path(args.broker_certfile).resolve(),
                              Path(args.broker_keyfile).resolve()) if args.broker_tls_port else None,
                  broker_password_file=Path(args.broker_password_file) if args.broker_password_file else None,
                  ingest_workers=args.ingest_workers)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the given URL"


def _open_store(config: Config) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from .migrate import SchemaError
    from .store import Store

    try:
        # The embedded SQLite default upgrades itself; a shared database is upgraded on purpose
        # (`edgectl-server db upgrade --db URL`), never behind the back of the other replicas.
        return Store(config.db_url, upgrade=config.db_url.startswith("sqlite"))
    except SchemaError as exc:
        raise StartupError(str(exc)) from None
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StartupError(f"cannot open database {_redacted(config.db_url)}: {first}") from None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=512)
    except OSError as exc:
        raise StartupError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from None


def api_token(config: Config) -> str:
    """The API token: read from the token file, or created there at first start (mode 0600)."""
    import secrets

    from .security import read_secret_file, write_secret_file

    path = config.api_token_path
    try:
        token = read_secret_file(path)
    except OSError as exc:
        raise StartupError(f"cannot read the API token file {path}: {exc.strerror or exc}") from None
    if token is not None:
        if len(token) < 16 or any(c.isspace() for c in token):
            raise StartupError(f"the API token in {path} must be at least 16 characters, without spaces")
        return token
    if config.token_file is not None:
        raise StartupError(f"the API token file {path} does not exist or is empty")
    token = secrets.token_urlsafe(32)
    try:
        write_secret_file(path, token + "\n")
    except OSError as exc:
        raise StartupError(f"cannot write the API token file {path}: {exc.strerror or exc}") from None
    log.info("created the API token in %s (give it to edgectl: --token, EDGECTL_TOKEN or token_file)", path)
    return token


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from sdk.protocol.fsutil import write_atomic

    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def run(config: Config) -> int:
    import uvicorn

    from .api import create_app
    from .broker import BrokerError, LocalBroker
    from .ingest import WORKER_KINDS, IngestError, IngestWorkers, retire_sessions
    from .mqtt import BrokerUnreachable, MqttSide
    from .security import BrokerAccounts
    from .service import INGESTED, Service

    cleanups: list[tuple[str, Callable[[], Any]]] = []
    stop = threading.Event()
    userver: uvicorn.Server | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop.is_set():
            log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()
        if userver is not None:
            userver.should_exit = True

    # Our handlers stay installed around uvicorn's, which re-raises the captured signal after
    # its own shutdown: the re-raised signal then lands here instead of killing the process.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    json_path = config.data_dir / "server.json"
    try:
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            config.artifacts_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create data directory {config.data_dir}: {exc.strerror or exc}") from None
        store = _open_store(config)
        cleanups.append(("store", store.close))
        sock = _listen(config.http_host, config.http_port)
        cleanups.append(("http socket", sock.close))
        http_port = sock.getsockname()[1]
        token = api_token(config)
        broker_user, broker_password = None, None
        accounts = BrokerAccounts(config.broker_dir)
        if config.broker == "local":
            try:
                broker = LocalBroker(config.broker_dir, config.broker_port, secure=config.secure_broker,
                                     bind=config.broker_bind, tls=config.broker_tls)
                if config.secure_broker:
                    accounts.reload = broker.reload
                    broker_user, broker_password = SERVER_USER, accounts.ensure()
                broker_url = broker.start()
            except BrokerError as exc:
                raise StartupError(str(exc)) from None
            except OSError as exc:
                raise StartupError(f"cannot write the broker's accounts in {config.broker_dir}: "
                                   f"{exc.strerror or exc}") from None
            cleanups.append(("private broker", broker.stop))
        else:
            broker_url = config.broker
            if config.broker_username and config.broker_password_file:
                broker_user = config.broker_username
                try:
                    broker_password = config.broker_password_file.read_text().strip()
                except OSError as exc:
                    raise StartupError(f"cannot read --broker-password-file {config.broker_password_file}: "
                                       f"{exc.strerror or exc}") from None
        service = Service(config, store)
        service.http_url = f"http://{config.http_host}:{http_port}"
        service.broker_url = broker_url
        service.accounts = accounts
        # With ingest workers, device telemetry goes to them (server.ingest); the rest stays here.
        kinds = [k for k in INGESTED if k not in WORKER_KINDS] if config.ingest_workers else INGESTED
        mqtt_side = MqttSide(service, broker_url, kinds=kinds)
        if broker_user:
            mqtt_side.client.username_pw_set(broker_user, broker_password)
        cleanups.append(("MQTT", mqtt_side.stop))
        if config.ingest_workers:  # subscribed before the server process is: no telemetry falls between
            workers = IngestWorkers(service, broker_url, config.ingest_workers, base_client_id=mqtt_side.client_id,
                                    username=broker_user, password=broker_password)
            cleanups.append(("ingest workers", workers.stop))
            try:
                workers.start()
            except IngestError as exc:
                raise StartupError(str(exc)) from None
            service.queue_depth = lambda: mqtt_side.queue.qsize() + workers.depth()
        try:
            if not config.ingest_workers:  # sessions of workers an earlier run had would keep a share
                retire_sessions(config, broker_url, mqtt_side.client_id, keep=0, username=broker_user,
                                password=broker_password)
            mqtt_side.start()
        except BrokerUnreachable as exc:
            raise StartupError(str(exc)) from None

        sweep_interval = min(1.0, config.heartbeat_timeout / 4)

        def sweeper() -> None:
            next_retention = 0.0
            while not stop.wait(sweep_interval):
                try:
                    service.sweep()
                except Exception:
                    log.exception("heartbeat sweep failed")
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + RETENTION_EVERY_S
                    try:
                        service.maintain()
                    except Exception:
                        log.exception("applying the retention policy failed")

        sweep_thread = threading.Thread(target=sweeper, name="sweeper", daemon=True)
        sweep_thread.start()
        cleanups.append(("sweeper", lambda: sweep_thread.join(timeout=5)))

        def rollouts() -> None:
            """Advance gated rollouts (canary -> waves) on the server's clock; state is in the DB."""
            try:
                service.rollouts.resume()
            except Exception:
                log.exception("resuming rollouts failed")
            while not stop.wait(config.rollout_interval_s):
                service.rollouts.tick()  # never raises: logs per rollout

        rollout_thread = threading.Thread(target=rollouts, name="rollouts", daemon=True)
        rollout_thread.start()
        cleanups.append(("rollouts", lambda: rollout_thread.join(timeout=5)))

        app = create_app(service, tokens=[token], public_read=config.public_read)
        userver = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                lifespan="off", access_log=False,
                                                timeout_graceful_shutdown=5))

        def announce() -> None:
            while not stop.is_set() and not userver.started:
                if stop.wait(0.02):
                    return
            _write_json(json_path, {"http_url": service.http_url, "broker_url": broker_url,
                                    "pid": os.getpid()})
            print(f"edgectl-server ready http={service.http_url} broker={broker_url} "
                  f"data={config.data_dir}", flush=True)
            log.info("ready: http=%s broker=%s data=%s", service.http_url, broker_url, config.data_dir)

        threading.Thread(target=announce, name="announce", daemon=True).start()
        if not stop.is_set():
            userver.run(sockets=[sock])
        stop.set()
        return 0
    finally:
        stop.set()
        for what, fn in reversed(cleanups):
            try:
                fn()
            except Exception:
                log.exception("error while stopping the %s", what)
        json_path.unlink(missing_ok=True)


def db_main(argv: list[str]) -> int:
    """``edgectl-server db upgrade|current [--db URL] [--data DIR]``."""
    p = argparse.ArgumentParser(prog="edgectl-server db", description="Database schema (Alembic migrations).")
    p.add_argument("action", choices=["upgrade", "current"])
    p.add_argument("--data", help="data directory (default: $EDGECTL_DATA or ./edgectl-data)")
    p.add_argument("--db", help="SQLAlchemy URL (default: sqlite:///DATA/edgectl.db)")
    args = p.parse_args(argv)
    data = Path(args.data or os.environ.get("EDGECTL_DATA") or "./edgectl-data").expanduser().resolve()
    url = args.db or f"sqlite:///{data / 'edgectl.db'}"
    from sqlalchemy.exc import SQLAlchemyError

    from . import migrate
    from .store import make_engine

    try:
        if url.startswith("sqlite") and not args.db:
            data.mkdir(parents=True, exist_ok=True)
        engine = make_engine(url)
        try:
            if args.action == "current":
                print(f"{_redacted(url)}: revision {migrate.current(engine) or 'none'} (head {migrate.head()})")
            else:
                before, after = migrate.upgrade(engine)
                print(f"{_redacted(url)}: upgraded from {before or 'empty'} to {after}")
        finally:
            engine.dispose()
    except (SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"edgectl-server: error: cannot {args.action} database {_redacted(url)}: {first}",
              file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["db"]:
        return db_main(argv[1:])
    config = parse_config(argv)
    logging.basicConfig(stream=sys.stderr, level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(config)
    except StartupError as exc:
        print(f"edgectl-server: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

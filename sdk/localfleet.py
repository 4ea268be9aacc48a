"""Run a server and agents as local subprocesses: for the demo, the benchmarks and the tests.

Each process is the real program (``python -m server.main`` / ``python -m agent.main``), with its
own data directory and log file; ``close()`` stops every one of them (SIGTERM, then SIGKILL).

Like an operator's shell, a running fleet exports the server's API token as ``EDGECTL_TOKEN``
(restored by ``close()``), so ``ServerClient`` and ``edgectl`` commands run meanwhile use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .protocol import EdgeError


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; raise naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise EdgeError(f"timed out after {timeout:g}s waiting for {what} (last value: {last!r})")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class LocalFleet:
    """``edgectl-server`` plus N ``edgectl-agent`` processes under one work directory."""

    def __init__(self, workdir: Path, *, echo: bool = False):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.server: subprocess.Popen[str] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.url = self.broker = ""
        self.token = ""
        self._env_token: str | None = None
        self._exported = False
        self._logs: list[IO[Any]] = []

    def _log(self, name: str) -> IO[Any]:
        f = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 — closed in close()
        self._logs.append(f)
        return f

    def _show(self, program: str, args: list[str]) -> None:
        if self.echo:
            print(f"$ {program} {' '.join(args)} &", flush=True)

    def start_server(self, *, broker: str = "local", extra: list[str] | None = None,
                     timeout: float = 60.0) -> str:
        args = ["--data", str(self.workdir / "server"), "--http", "127.0.0.1:0", "--broker", broker,
                *(extra or [])]
        self._show("edgectl-server", args)
        log_name = "server" if self.server is None else f"server-{len(self._logs)}"  # a restart: a new log
        self.server = proc = subprocess.Popen([sys.executable, "-m", "server.main", *args],
                                              stdout=subprocess.PIPE, stderr=self._log(log_name), text=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("edgectl-server ready"):
                if self.echo:
                    print(line.rstrip(), flush=True)
                fields = dict(part.split("=", 1) for part in line.split()[2:])
                self.url, self.broker = fields["http"], fields["broker"]
                self._export_token(self._token_path(args))
                return self.url
            if not line and proc.poll() is not None:
                break
        stop_process(proc)
        raise EdgeError("edgectl-server did not start: "
                        + (self.workdir / f"{log_name}.log").read_text(errors="replace")[-1500:])

    def stop_server(self) -> int | None:
        """SIGTERM the server (agents keep running); ``start_server`` again restarts it on the same data."""
        code = stop_process(self.server) if self.server is not None else None
        self.url = ""
        return code

    def _token_path(self, args: list[str]) -> Path:
        if "--token-file" in args:
            return Path(args[args.index("--token-file") + 1])
        return self.workdir / "server" / "api-token"

    def _export_token(self, path: Path) -> None:
        self.token = path.read_text().strip()
        if not self._exported:
            self._env_token, self._exported = os.environ.get("EDGECTL_TOKEN"), True
        os.environ["EDGECTL_TOKEN"] = self.token

    def client(self) -> Any:
        """A ``ServerClient`` for this fleet's server, with its token."""
        from .client import ServerClient

        return ServerClient(self.url, token=self.token)

    def start_agent(self, device_id: str, *, labels: dict[str, str] | None = None,
                    heartbeat: float = 2.0, telemetry_interval: float = 2.0,
                    extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        if not self.broker:
            raise EdgeError("start the server before the agents")
        args = ["--device-id", device_id, "--broker", self.broker, "--data", str(self.workdir / "agents" / device_id),
                "--heartbeat", f"{heartbeat:g}", "--telemetry-interval", f"{telemetry_interval:g}"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        args += extra or []
        self._show("edgectl-agent", args)
        proc = subprocess.Popen([sys.executable, "-m", "agent.main", *args], stdout=subprocess.DEVNULL,
                                stderr=self._log(device_id))
        self.agents[device_id] = proc
        return proc

    def wait_online(self, device_ids: list[str] | tuple[str, ...], timeout: float = 30.0) -> None:
        from .client import ServerClient

        with ServerClient(self.url, token=self.token or None) as client:
            wait_for(f"devices {', '.join(device_ids)} online",
                     lambda: {d["id"] for d in client.devices() if d["online"]} >= set(device_ids), timeout)

    def kill_agent(self, device_id: str) -> None:
        """SIGKILL: no clean disconnect, so only the broker's last will tells the server."""
        proc = self.agents[device_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> int | None:
        """Stop agents, then the server; returns the server's exit code."""
        for proc in self.agents.values():
            with contextlib.suppress(Exception):
                stop_process(proc)
        code = stop_process(self.server) if self.server is not None else None
        for f in self._logs:
            f.close()
        if self._exported:
            if self._env_token is None:
                os.environ.pop("EDGECTL_TOKEN", None)
            else:
                os.environ["EDGECTL_TOKEN"] = self._env_token
            self._exported = False
        return code

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

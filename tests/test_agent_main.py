"""The agent's command line, its broker URL parsing and its import diet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.main import main
from agent.transport import parse_broker_url

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [
    ["--data", "d"],
    ["--device-id", "a b", "--data", "d"],
    ["--device-id", "pi-1", "--data", "d", "--broker", "http://x"],
    ["--device-id", "pi-1", "--data", "d", "--label", "nolabel"],
    ["--device-id", "pi-1", "--data", "d", "--heartbeat", "0"],
    ["--device-id", "pi-1", "--data", "d", "--threads", "two"],
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgectl-agent: error:")


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://127.0.0.1:1884", ("127.0.0.1", 1884)),
    ("mqtt://broker.local", ("broker.local", 1883)),
    ("mqtt://[::1]:2000", ("::1", 2000)),
    ("mqtts://broker.local", ("broker.local", 8883)),  # TLS
    ("mqtts://h:8884", ("h", 8884)),
])
def test_broker_url(url: str, expected: tuple[str, int]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["ws://h:8883", "h:1883", "mqtt://", "mqtt://h:99999",
                                 "mqtt://u:p@h", "mqtt://h/path"])
def test_bad_broker_url(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_broker_url(url)


def test_agent_imports_only_what_a_pi_has() -> None:
    code = ("import sys, agent.main, agent.core; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'sqlalchemy', 'fastapi', "
            "'typer', 'rich', 'pydantic', 'httpx', 'keras'}); "
            "bad += [m for m in sys.modules if m.startswith('sdk.') and not m.startswith('sdk.protocol')]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

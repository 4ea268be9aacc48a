"""Heavy imports stay where they belong: the agent and `import sdk` never pull TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("tensorflow", "keras", "sqlalchemy", "fastapi", "typer", "rich", "pydantic", "httpx", "sklearn")


def loaded_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_the_agent_imports_only_numpy_paho_and_the_protocol() -> None:
    mods = loaded_after("import agent.main, agent.core, agent.transport, agent.slots")
    assert not mods & set(HEAVY), mods & set(HEAVY)
    assert {"numpy", "paho"} <= mods


def test_import_sdk_and_the_cli_stay_light() -> None:
    assert not loaded_after("import sdk, sdk.protocol") & set(HEAVY)
    mods = loaded_after("import sdk.cli")
    assert "tensorflow" not in mods and "keras" not in mods and "sqlalchemy" not in mods


def test_the_server_never_imports_tensorflow_or_the_agent() -> None:
    mods = loaded_after("import server.main, server.service, server.store, server.api, server.mqtt")
    assert "tensorflow" not in mods and "keras" not in mods and "agent" not in mods

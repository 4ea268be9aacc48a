"""`edgectl push` rollout options and `--gate NAME=VALUE` turned into the API's strategy and gates."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.protocol import EdgeError
from sdk.rollouts import parse_gates, parse_seconds, parse_size, rollout_options


def test_sizes_durations_and_gates() -> None:
    assert parse_size("1", "--canary") == 1 and parse_size("10%", "--canary") == pytest.approx(0.1)
    assert parse_seconds("90s", "--soak") == 90 and parse_seconds("2m", "--soak") == 120 and parse_seconds("5", "x") == 5
    gates = parse_gates(["p95=+20%", "errors=off", "availability=95%", "min_inferences=50", "p95_floor=2ms",
                         "accuracy-drop=0.01"])
    assert gates == {"max_p95_regression": pytest.approx(0.2), "max_error_rate": None,
                     "min_availability": pytest.approx(0.95), "min_inferences": 50,
                     "min_p95_increase_ms": pytest.approx(2.0), "max_accuracy_drop": pytest.approx(0.01)}
    assert parse_gates(["p95_floor=0.5"]) == {"min_p95_increase_ms": pytest.approx(0.5)}
    assert parse_gates(["p95_confidence=99%"]) == {"p95_confidence": pytest.approx(0.99)}
    assert parse_gates(["p95_confidence=off"]) == {"p95_confidence": None}  # compare the p95s as measured


@pytest.mark.parametrize(("spec", "message"), [
    ("latency=1", "NAME one of p95"), ("p95", "NAME=VALUE"), ("p95=fast", "percentage"),
    ("min_inferences=off", "cannot be switched off"), ("min_inferences=2.5", "whole number"),
])
def test_bad_gates_are_named(spec: str, message: str) -> None:
    with pytest.raises(EdgeError, match=message):
        parse_gates([spec])


def test_rollout_options() -> None:
    assert rollout_options(canary=None, waves=None, soak=None, install_timeout=None, gates=None,
                           all_at_once=False) == (None, None)
    strategy, gates = rollout_options(canary="10%", waves="25%,50%", soak="30s", install_timeout="2m",
                                      gates=["p95=+50%"], all_at_once=False)
    assert strategy == {"canary": pytest.approx(0.1), "waves": [pytest.approx(0.25), pytest.approx(0.5)],
                        "soak_s": 30, "install_timeout_s": 120}
    assert gates == {"max_p95_regression": pytest.approx(0.5)}
    assert rollout_options(canary=None, waves=None, soak="5s", install_timeout=None, gates=None,
                           all_at_once=True)[0] == {"canary": 0, "waves": [], "soak_s": 5}
    with pytest.raises(EdgeError, match="--all-at-once cannot be combined"):
        rollout_options(canary="1", waves=None, soak=None, install_timeout=None, gates=None, all_at_once=True)
    with pytest.raises(EdgeError, match="between 0% and 100%"):
        parse_size("150%", "--waves")


def test_bad_options_are_one_line_before_anything_is_uploaded(tmp_path) -> None:
    res = CliRunner().invoke(app, ["push", str(tmp_path / "none.bundle"), "--to", "all", "--gate", "nope=1",
                                   "--server", "http://127.0.0.1:9"])
    assert res.exit_code == 1 and "--gate 'nope=1'" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["rollout", "show", "r-x", "--server", "http://127.0.0.1:9"])
    assert res.exit_code == 1 and "cannot reach edgectl-server" in res.output


def _view(phase: str, state: str) -> dict:
    return {"id": "r-1", "deployment_id": "d-1", "artifact": "ab" * 32, "model": "m", "version": "2", "phase": phase,
            "wave": 0, "reason": "", "summary": [f"it is {phase}"], "strategy": {"soak_s": 1},
            "waves": [{"index": 0, "label": "canary", "devices": ["pi-1"], "status": phase}],
            "devices": [{"device_id": "pi-1", "wave": 0, "wave_label": "canary", "state": state, "target_state": state,
                         "detail": "", "online": True, "running_model": "m 2", "previous_model": "m 1"}],
            "gate_results": [], "history": [f"{phase} now"]}


def test_watch_follows_the_rollout_until_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from sdk import cli
    from sdk.client import ServerClient

    views = iter([_view("installing", "downloading"), _view("soaking", "active"), _view("completed", "active")])
    monkeypatch.setattr(ServerClient, "rollout", lambda self, rid: next(views))
    buf = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buf, force_terminal=True, width=160))  # rich Live on a terminal
    res = CliRunner().invoke(app, ["rollout", "show", "r-1", "--watch", "--interval", "0.01", "--server",
                                   "http://127.0.0.1:9"])
    assert res.exit_code == 0, res.output
    assert "it is completed" in buf.getvalue() and "canary" in buf.getvalue()
    # without a terminal: one line per change, then the final view
    views = iter([_view("installing", "downloading"), _view("installing", "downloading"), _view("completed", "active")])
    monkeypatch.setattr(cli, "out", Console(file=(plain := io.StringIO()), width=160))
    res = CliRunner().invoke(app, ["rollout", "show", "r-1", "--watch", "--interval", "0.01", "--server",
                                   "http://127.0.0.1:9"])
    lines = plain.getvalue().splitlines()
    assert res.exit_code == 0 and lines[:2] == ["installing wave 1/1: pi-1=downloading", "completed wave 1/1: pi-1=active"]
    assert "it is completed" in plain.getvalue()


def test_rollout_tables_print_device_words_as_text_and_cut_them_at_a_word() -> None:
    import io

    from rich.console import Console

    from sdk.cli import rollout_renderables

    view = _view("rolled_back", "failed")
    view["devices"][0] |= {"target_state": "failed", "detail": "smoke test: got [0.9 0.1], expected [0.1 0.9]"}
    view["gate_results"] = [{"gate": "install", "passed": False, "detail": "pi-1 ([bold]1[/bold] of 1) " + "x " * 300}]
    buf = io.StringIO()
    console = Console(file=buf, width=400)
    for part in rollout_renderables(view):
        console.print(part)
    text = buf.getvalue()
    assert "smoke test: got [0.9 0.1], expected [0.1 0.9]" in text  # not taken for rich markup
    assert "pi-1 ([bold]1[/bold] of 1) x x" in text and "x …" in text and "x x x x x" + " x" * 300 not in text

"""The ``edgectl`` command line: each command parses, calls one library function, prints.

Tables by default, ``--json`` for scripts. User errors exit non-zero with one clear line.
TensorFlow is imported only by the commands that convert models.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from .protocol import EdgeError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Compress Keras models to TFLite, ship them to edge fleets, watch their health.")
devices_app = typer.Typer(no_args_is_help=True, help="Devices known to the server.")
fleet_app = typer.Typer(no_args_is_help=True, help="Fleet health questions.")
app.add_typer(devices_app, name="devices")
app.add_typer(fleet_app, name="fleet")

# Rich falls back to 80 columns when stdout is not a terminal (CI logs, pipes): too narrow for
# our tables, so give it room there.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

ServerOpt = Annotated[str | None, typer.Option("--server", help="edgectl-server URL [env EDGECTL_SERVER, default http://127.0.0.1:8765]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fmt(value: Any, fmt: str = "{}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def parse_window(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise EdgeError(f"window {text!r} must look like 90s, 15m, 24h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="Keras model (.keras/.h5) or SavedModel directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle file to write.")],
    quantize: Annotated[str, typer.Option(help="none | dynamic | float16 | int8")] = "dynamic",
    calibration: Annotated[Path | None, typer.Option(help=".npz with array x (or a dir of .npy) for int8.")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help=".npz with arrays x, y to measure accuracy/recall.")] = None,
    sample: Annotated[Path | None, typer.Option(help=".npy input used as the bundle's smoke test.")] = None,
    name: Annotated[str | None, typer.Option(help="Model name (default: file name).")] = None,
    version: Annotated[str | None, typer.Option(help="Model version (default: UTC timestamp).")] = None,
    threads: Annotated[int, typer.Option(help="Interpreter threads for latency measurement.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Convert MODEL to TFLite, measure it before and after, and write a bundle."""
    from .compress import compress as run

    try:
        result = run(model, output, quantize=quantize, calibration=calibration, eval_data=eval_data,
                     sample=sample, name=name, version=version, threads=threads)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(result.report)
        return
    print_compress_report(result.report)


def print_compress_report(report: dict[str, Any]) -> None:
    ref, var, src = report["reference"], report["variant"], report["source"]
    table = Table(title=f"compression of {src['path']} ({src['format']}, {src['size_bytes']:,} B)")
    for col in ("variant", "size", "vs float32", "latency p50", "latency p95", "accuracy", "macro recall", "max dev"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for row in (ref, var):
        table.add_row(
            "float32 (reference)" if row is ref else row["quantization"],
            f"{row['size_bytes']:,} B",
            f"{row['size_bytes'] / ref['size_bytes']:.0%}",
            f"{row['latency_ms']['median']:.3f} ms",
            f"{row['latency_ms']['p95']:.3f} ms",
            _fmt(row.get("accuracy"), "{:.2%}"),
            _fmt(row.get("macro_recall"), "{:.2%}"),
            _fmt(row.get("max_deviation"), "{:.2e}") if row is var else "",
        )
    out.print(table)
    b = report["bundle"]
    out.print(f"bundle {b['path']}  sha256 {b['sha256'][:16]}…  {b['size_bytes']:,} B  "
              f"(host runtime {report['host_runtime']}, {report['threads']} thread(s))", highlight=False)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle file.")],
    as_json: JsonOpt = False,
) -> None:
    """Verify a bundle against its manifest and describe it in words."""
    from .protocol.bundle import read_bundle

    try:
        b = read_bundle(bundle)
    except EdgeError as exc:
        fail(str(exc))
    m = b.manifest
    if as_json:
        emit_json({"sha256": b.sha256, "size_bytes": b.size, "manifest": m})
        return
    lines = [
        f"bundle {bundle}: {m['name']} version {m['version']} (format {m['format']} v{m['format_version']})",
        f"  sha256 {b.sha256}, {b.size:,} bytes, created {m.get('created_at', '?')}",
        f"  quantization: {m['quantization']}; every file matches its sha256 and size",
    ]
    for io_name in ("inputs", "outputs"):
        for s in m["model"][io_name]:
            shape = "x".join("?" if d == -1 else str(d) for d in s["shape"])
            q = f", quantized scale={s['quantization'][0]:.4g} zero={s['quantization'][1]}" if s["quantization"][0] else ""
            lines.append(f"  {io_name[:-1]} {s['name']}: {s['dtype']} [{shape}]{q}")
    for fname, entry in m["files"].items():
        lines.append(f"  file {fname}: {entry['size']:,} B sha256 {entry['sha256'][:16]}…")
    s = m["sample"]
    lines.append(f"  smoke test: {s['input']} must give {s['output']} within atol={s['atol']} rtol={s['rtol']}")
    rep = m.get("report", {}).get("variant")
    if rep:
        acc = f", accuracy {rep['accuracy']:.2%}" if "accuracy" in rep else ""
        lines.append(f"  measured on host: p50 {rep['latency_ms']['median']:.3f} ms, p95 {rep['latency_ms']['p95']:.3f} ms{acc}")
    out.print("\n".join(lines), highlight=False)


@app.command()
def push(
    bundle: Annotated[Path, typer.Argument(help="Bundle file to ship.")],
    to: Annotated[str, typer.Option("--to", help="all | device:ID[,ID] | group:NAME | label:KEY=VALUE")],
    server: ServerOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for every target to report active (0: don't wait).")] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Upload BUNDLE to the server and deploy it to the selected devices."""
    from .client import ServerClient
    from .deploy import push_bundle

    try:
        with ServerClient(server) as client:
            result = push_bundle(client, bundle, to, wait_s=wait)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(result)
        return
    art, dep = result["artifact"], result["deployment"]
    out.print(f"uploaded {art['name']} {art['version']} ({art['size']:,} B, sha256 {art['sha256'][:16]}…)", highlight=False)
    out.print(f"deployment {dep['id']} → {len(dep['targets'])} device(s): {', '.join(dep['targets'])}", highlight=False)
    if "devices" in dep:
        for d in dep["devices"]:
            out.print(f"  {d['device_id']}: {d['state']}{' — ' + d['detail'] if d.get('detail') else ''}", highlight=False)
    if result.get("incomplete"):
        fail(f"not every device reached 'active' within {wait:g}s", code=3)


@devices_app.command("list")
def devices_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """Every device: online or not, model, deployment state, last seen."""
    from .client import ServerClient

    try:
        with ServerClient(server) as client:
            devices = client.devices()
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(devices)
        return
    table = Table(title=f"{len(devices)} device(s)")
    for col in ("device", "status", "labels", "model", "deployment", "runtime", "last seen"):
        table.add_column(col)
    for d in devices:
        model = d.get("model") or {}
        dep = d.get("deployment") or {}
        table.add_row(
            d["id"], "[green]online[/green]" if d["online"] else "[red]offline[/red]",
            ",".join(f"{k}={v}" for k, v in sorted((d.get("labels") or {}).items())),
            f"{model.get('name', '-')} {model.get('version', '')}".strip(),
            f"{dep.get('id', '-')} {dep.get('state', '')}".strip(), d.get("runtime") or "-",
            (d.get("last_seen") or "-")[:19],
        )
    out.print(table)


@devices_app.command("profiles")
def devices_profiles(as_json: JsonOpt = False) -> None:
    """The device profiles edgectl knows (devices/profiles/*.toml and $EDGECTL_PROFILES)."""
    from .protocol.profiles import load_profiles

    try:
        profiles = load_profiles()
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json([p.to_dict() for p in profiles.values()])
        return
    table = Table(title=f"{len(profiles)} device profile(s) — speed factors are estimates, see each file")
    for col in ("profile", "board", "cores", "RAM", "delegate", "runtime", "quantizations", "speed ×", "link"):
        table.add_column(col)
    for p in profiles.values():
        quants = ", ".join(f"[b]{q}[/b]" if q == p.preferred_quantization else q for q in p.quantizations)
        table.add_row(p.name, p.title, str(p.cores), f"{p.ram_mb} MB", p.delegate, p.runtime, quants,
                      f"{p.speed_factor:g}", f"{p.link_mbps:g} Mb/s")
    out.print(table)


@fleet_app.command("health")
def fleet_health(
    window: Annotated[str, typer.Option(help="Look-back window: 90s, 15m, 24h, 7d.")] = "1h",
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per device: online, model, deployment, inferences, error rate, p50/p95 latency, availability."""
    from .client import ServerClient

    try:
        window_s = parse_window(window)
        with ServerClient(server) as client:
            health = client.health(window_s)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(health)
        return
    rows = health["devices"]
    online = sum(1 for r in rows if r["online"])
    table = Table(title=f"fleet health over the last {window} — {online}/{len(rows)} online")
    for col in ("device", "status", "model", "deployment", "inferences", "error rate", "p50", "p95", "availability"):
        table.add_column(col, justify="left" if col in ("device", "status", "model", "deployment") else "right")
    for r in rows:
        table.add_row(
            r["id"], "[green]online[/green]" if r["online"] else "[red]offline[/red]",
            r.get("model_version") or "-", r.get("deployment_state") or "-",
            f"{r.get('inferences', 0):,}", _fmt(r.get("error_rate"), "{:.2%}"),
            _fmt(r.get("p50_ms"), "{:.2f} ms"), _fmt(r.get("p95_ms"), "{:.2f} ms"),
            _fmt(r.get("availability"), "{:.2%}"),
        )
    out.print(table)


@app.command()
def infer(
    device: Annotated[str, typer.Argument(help="Device id.")],
    input_file: Annotated[Path, typer.Argument(help=".npy tensor to send.")],
    broker: Annotated[str | None, typer.Option(help="Broker URL (default: asked from the server).")] = None,
    server: ServerOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Send one inference request to DEVICE over MQTT and print the answer."""
    import numpy as np

    from .client import ServerClient
    from .infer import InferenceClient

    try:
        x = np.load(input_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {input_file} as .npy: {exc}")
    try:
        if broker is None:
            with ServerClient(server) as client:
                broker = client.info()["broker_url"]
        with InferenceClient(broker) as ic:
            resp = ic.infer(device, x, timeout=timeout)
    except EdgeError as exc:
        fail(str(exc))
    if not resp.ok:
        fail(f"device {device} answered with an error: {resp.error}")
    assert resp.output is not None
    if as_json:
        emit_json({"device": device, "model_version": resp.model_version, "latency_ms": resp.latency_ms,
                   "output": resp.output.tolist(), "argmax": int(np.argmax(resp.output))})
        return
    out.print(f"{device} ({resp.model_version}, {resp.latency_ms:.2f} ms): argmax {int(np.argmax(resp.output))}; "
              f"output {np.array2string(resp.output, precision=4, threshold=20)}", highlight=False)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its model, bundle and data.")] = Path("demo-run"),
    agents: Annotated[int, typer.Option(help="Number of agent processes.")] = 3,
    requests: Annotated[int, typer.Option(help="Inference requests to send.")] = 300,
) -> None:
    """Train a digits classifier, compress it, run a server and agents, push, query health."""
    from .demo import run_demo

    try:
        run_demo(workdir, n_agents=agents, n_requests=requests)
    except EdgeError as exc:
        fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

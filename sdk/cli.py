"""The ``edgectl`` command line: each command parses, calls one library function, prints.

Tables by default, ``--json`` for scripts. User errors exit non-zero with one clear line.
TensorFlow is imported only by the commands that convert models.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

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
keys_app = typer.Typer(no_args_is_help=True, help="Ed25519 keys that sign bundles.")
app.add_typer(keys_app, name="keys")

# Rich falls back to 80 columns when stdout is not a terminal (CI logs, pipes): too narrow for
# our tables, so give it room there.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

ServerOpt = Annotated[str | None, typer.Option("--server", help="edgectl-server URL [env EDGECTL_SERVER, default http://127.0.0.1:8765]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="EDGECTL_TOKEN", show_envvar=False,
                                              help="API token [env EDGECTL_TOKEN, or token_file in ~/.config/edgectl/config.toml]")]
SignOpt = Annotated[Path | None, typer.Option("--sign", metavar="KEY",
                                              help="Sign the bundle with this Ed25519 private key (edgectl keys generate).")]


T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def ask(server: str | None, token: str | None, call: Callable[[Any], T]) -> T:
    """One request to the server: the answer, or one clear line and exit 1 on an edgectl error."""
    from .client import ServerClient

    try:
        with ServerClient(server, token=token) as client:
            return call(client)
    except EdgeError as exc:
        fail(str(exc))


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
    model: Annotated[Path, typer.Argument(help="Keras model (.keras/.h5), SavedModel directory, or a ready .tflite.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle file to write.")],
    quantize: Annotated[str | None, typer.Option(help="none | dynamic | float16 | int8 | int16x8 [default: dynamic; a .tflite is bundled as-is]")] = None,
    calibration: Annotated[Path | None, typer.Option(help=".npz with array x (or a dir of .npy) for int8/int16x8.")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help=".npz with arrays x, y to measure accuracy/recall.")] = None,
    float_io: Annotated[bool, typer.Option("--float-io", help="int8: keep float32 input/output (default int8 in/out).")] = False,
    prune: Annotated[float | None, typer.Option(help="Magnitude-prune to this sparsity in (0, 1) first, e.g. 0.8.")] = None,
    train: Annotated[Path | None, typer.Option(help=".npz with x, y: fine-tune while pruning (and prune levels for --auto).")] = None,
    prune_epochs: Annotated[int, typer.Option(help="Fine-tune epochs while pruning.")] = 4,
    auto: Annotated[bool, typer.Option("--auto", help="Try every variant; ship the smallest within --max-accuracy-drop.")] = False,
    max_accuracy_drop: Annotated[float, typer.Option(help="Accuracy budget for --auto, in points (1.0 = one percentage point).")] = 1.0,
    target: Annotated[str | None, typer.Option(help="Device profile (devices/profiles) constraining the choice.")] = None,
    variants: Annotated[str | None, typer.Option(help="One bundle holding several quantizations, e.g. float16,int8 (the first is the default); the server gives each device the one its profile prefers.")] = None,
    sample: Annotated[Path | None, typer.Option(help=".npy input used as the bundle's smoke test.")] = None,
    name: Annotated[str | None, typer.Option(help="Model name (default: file name).")] = None,
    version: Annotated[str | None, typer.Option(help="Model version (default: UTC timestamp).")] = None,
    threads: Annotated[int, typer.Option(help="Interpreter threads for latency measurement.")] = 1,
    sign: SignOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert MODEL to TFLite (pruned/quantized), measure it before and after, and write a bundle."""
    from .compress import compress as run

    try:
        if variants and quantize:
            raise EdgeError("--variants names the quantizations (the first is the default): drop --quantize")
        result = run(model, output, quantize=quantize, calibration=calibration, eval_data=eval_data,
                     sample=sample, name=name, version=version, threads=threads, float_io=float_io,
                     prune=prune, train=train, prune_epochs=prune_epochs, auto=auto,
                     max_accuracy_drop=max_accuracy_drop, target=target, sign=sign,
                     variant_modes=[v.strip() for v in variants.split(",") if v.strip()] if variants else None)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(result.report)
        return
    print_compress_report(result.report)


def print_compress_report(report: dict[str, Any]) -> None:
    ref, src = report["reference"], report["source"]
    rows = [ref, *report.get("candidates", [report["variant"]])]
    table = Table(title=f"compression of {src['path']} ({src['format']}, {src['size_bytes']:,} B)")
    for col in ("variant", "size", "vs float32", "gzip", "gzip vs f32", "latency p50", "latency p95", "accuracy",
                "macro recall", "max dev", "runtime ≥", "tflite-rt 2.14"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for row in rows:
        lat = row.get("latency_ms") or {}
        rt = row.get("runtime") or {}
        mark = " ✓" if row.get("chosen") else (" ✗" if row.get("rejected") else "")
        table.add_row(
            (row.get("label") or row["quantization"]) + mark,
            f"{row['size_bytes']:,} B",
            f"{row['size_bytes'] / ref['size_bytes']:.0%}",
            f"{row.get('gzip_bytes', 0):,} B",
            f"{row.get('gzip_bytes', 0) / ref.get('gzip_bytes', 1):.0%}" if ref.get("gzip_bytes") else "-",
            _fmt(lat.get("median"), "{:.3f} ms"),
            _fmt(lat.get("p95"), "{:.3f} ms"),
            _fmt(row.get("accuracy"), "{:.2%}"),
            _fmt(row.get("macro_recall"), "{:.2%}"),
            _fmt(row.get("max_deviation"), "{:.2e}") if row is not ref else "",
            rt.get("min_runtime_version") or "?",
            "yes" if rt.get("support", {}).get("tflite-runtime", {}).get("ok") else "no",
        )
    out.print(table)
    sel = report.get("selection") or {}
    if sel.get("mode") == "auto":
        out.print(f"chose {sel['chosen']}: {sel['why']}", highlight=False)
        for row in report.get("candidates", []):
            if row.get("rejected"):
                out.print(f"  ✗ {row['label']}: {'; '.join(row['rejected'])}", highlight=False)
    for row in report.get("candidates", []):
        p = row.get("pruning")
        if p and row.get("chosen"):
            out.print(f"pruning: {p['achieved_sparsity']:.1%} of {p['pruned_weights']:,} kernel weights are zero "
                      f"(target {p['target_sparsity']:.0%})", highlight=False)
    for w in report.get("warnings", []):
        out.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    b = report["bundle"]
    out.print(f"bundle {b['path']}  sha256 {b['sha256'][:16]}…  {b['size_bytes']:,} B  "
              f"(host runtime {report['host_runtime']}, {report['threads']} thread(s))"
              f"{', signed' if b.get('signed') else ''}", highlight=False)


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Trained teacher model (.keras/.h5).")],
    student: Annotated[Path, typer.Option(help="Student architecture (.keras/.h5); its weights are re-initialised.")],
    train: Annotated[Path, typer.Option(help=".npz with arrays x, y to train on.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to save the distilled student (.keras).")],
    eval_data: Annotated[Path | None, typer.Option("--eval", help=".npz with x, y to score the three models on.")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the soft targets.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the soft (teacher) loss; 1 - alpha for hard labels.")] = 0.7,
    epochs: Annotated[int, typer.Option(help="Training epochs (same for scratch and distilled).")] = 30,
    as_json: JsonOpt = False,
) -> None:
    """Train STUDENT on TEACHER's soft targets + labels; compare with the student trained from scratch."""
    from .compress import load_arrays, quiet_native_output
    from .compression.distill import distill as run
    from .compression.distill import load_keras
    from .protocol import CompressionError

    try:
        if output.suffix != ".keras":
            raise CompressionError(f"output {output} must end in .keras")
        if not output.parent.exists():
            raise CompressionError(f"output directory {output.parent} does not exist")
        t, s = load_keras(teacher, "teacher"), load_keras(student, "student")
        x, y = load_arrays(train, need_y=True, what="train")
        ev = load_arrays(eval_data, need_y=True, what="eval") if eval_data else (None, None)
        with quiet_native_output():
            result = run(t, s, x, y, x_eval=ev[0], y_eval=ev[1], temperature=temperature, alpha=alpha, epochs=epochs)
            tmp = output.with_name(output.stem + ".tmp.keras")
            result.model.save(tmp)
            tmp.replace(output)
    except EdgeError as exc:
        fail(str(exc))
    rep = result.report
    rep["output"] = str(output)
    if as_json:
        emit_json(rep)
        return
    table = Table(title=f"distillation (T={rep['temperature']:g}, alpha={rep['alpha']:g}, {rep['epochs']} epochs, "
                        f"scored on {rep['eval_rows']} rows)")
    for col in ("model", "parameters", "accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for key, label in (("teacher", "teacher"), ("student_scratch", "student from scratch"),
                       ("student_distilled", "student distilled")):
        table.add_row(label, f"{rep[key]['params']:,}", f"{rep[key]['accuracy']:.2%}")
    out.print(table)
    out.print(f"student has {rep['param_ratio']:.1%} of the teacher's parameters, keeps {rep['retained']:.1%} of its "
              f"accuracy, {rep['gain_over_scratch'] * 100:+.2f} points vs from scratch; saved {output}", highlight=False)


@app.command()
def partition(
    model: Annotated[Path, typer.Argument(help="Keras model (.keras/.h5).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle file to write.")],
    stages: Annotated[int, typer.Option(help="Number of pipeline stages.")] = 2,
    devices: Annotated[str | None, typer.Option(help="Device profiles in stage order, comma-separated.")] = None,
    quantize: Annotated[str, typer.Option(help="none | dynamic | float16 | int8 (per stage; int8 calibrates each stage)")] = "none",
    calibration: Annotated[Path | None, typer.Option(help=".npz with array x (or a dir of .npy): int8 calibration.")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help=".npz with array x: rows on which quantized stages must give the float model's top-1 (default: the calibration set).")] = None,
    runs: Annotated[int, typer.Option(help="Timing runs per unit and stage.")] = 50,
    name: Annotated[str | None, typer.Option(help="Model name (default: file name).")] = None,
    version: Annotated[str | None, typer.Option(help="Model version (default: UTC timestamp).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Split MODEL into pipeline stages for several devices (minimum-bottleneck cuts)."""
    from .compress import load_arrays
    from .partition import partition as run

    try:
        cal = load_arrays(calibration, need_y=False, what="calibration")[0] if calibration else None
        ev = load_arrays(eval_data, need_y=False, what="eval")[0] if eval_data else None
        result = run(model, output, stages=stages, devices=devices.split(",") if devices else None,
                     quantize=quantize, calibration=cal, eval_x=ev, name=name, version=version, runs=max(1, runs))
    except EdgeError as exc:
        fail(str(exc))
    plan = result.plan
    if as_json:
        emit_json(plan.to_dict() | {"bundle": str(result.bundle_path), "sha256": result.bundle_sha256,
                                    "measured_ms": result.stage_measured_ms, "max_abs_diff": result.max_abs_diff,
                                    "quantization": quantize, "top1_agreement": result.top1_agreement,
                                    "eval_rows": result.eval_rows})
        return
    table = Table(title=f"pipeline plan for {model} — bottleneck {plan.bottleneck_ms:.3f} ms (predicted)")
    for col in ("stage", "device", "layers", "params", "compute (pred.)", "transfer (pred.)",
                "measured × speed", "tensor out"):
        table.add_column(col)
    for st, meas in zip(plan.stages, result.stage_measured_ms, strict=True):
        table.add_row(str(st.index), st.device, ", ".join(st.layers), f"{st.params:,}", f"{st.compute_ms:.3f} ms",
                      f"{st.transfer_ms:.3f} ms", f"{meas:.3f} ms",
                      "x".join("?" if d == -1 else str(d) for d in st.out_shape) + f" ({st.out_bytes:,} B)")
    out.print(table)
    if plan.refused_cuts:
        out.print("refused cuts: " + "; ".join(plan.refused_cuts), highlight=False)
    agree = (f"; top-1 equals the whole float model's on {result.top1_agreement:.2%} of {result.eval_rows} rows"
             if result.top1_agreement is not None else "")
    out.print(f"bundle {result.bundle_path} sha256 {result.bundle_sha256[:16]}…; the {quantize} stages reproduce the whole "
              f"model within {result.max_abs_diff:.2g}{agree}", highlight=False)


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
    token: TokenOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for every target to report active (0: don't wait).")] = 0.0,
    sign: SignOpt = None,
    service: Annotated[str | None, typer.Option(help="Serve it on shared topics under this name (default for a pipeline or --replicas: the bundle's name).")] = None,
    replicas: Annotated[int | None, typer.Option(help="Devices per stage behind one request topic (data parallel; R x K devices for a K-stage pipeline).")] = None,
    stage_map: Annotated[str | None, typer.Option("--stage-map", help="Pin stages: DEVICE=STAGE[,DEVICE=STAGE] (default: the server matches planned profiles, heaviest stage on the fastest device).")] = None,
    canary: Annotated[str | None, typer.Option(help="Rollout: first wave, a device count (1) or a share (10%). [default: 1]")] = None,
    waves: Annotated[str | None, typer.Option(help="Rollout: following waves, counts or shares (25%,50%); the rest comes last. [default: 50%]")] = None,
    soak: Annotated[str | None, typer.Option(help="Rollout: how long each wave runs before its gates are judged (30s, 5m). [default: 60s]")] = None,
    install_timeout: Annotated[str | None, typer.Option(help="Rollout: a device silent this long counts as timed out (offline). [default: 300s]")] = None,
    gate: Annotated[list[str] | None, typer.Option("--gate", help="Rollout gate NAME=VALUE, repeatable: p95=+20%, p95_floor=0.5ms, p95_confidence=95%, errors=5%, error_increase=+2%, availability=90%, accuracy=90%, accuracy_drop=2%, install_failures=0%, min_inferences=20; VALUE off disables.")] = None,
    all_at_once: Annotated[bool, typer.Option("--all-at-once", help="Rollout: one wave with every device, still soaked and gated.")] = False,
    latency_slo: Annotated[str | None, typer.Option(help="Rollout of a bundle with variants: the p95 each device class must meet (e.g. 20ms).")] = None,
    downgrade: Annotated[bool, typer.Option("--downgrade", help="With --latency-slo: move a device class that misses it to the next smaller variant.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Upload BUNDLE to the server and deploy it to the selected devices.

    A pipeline bundle (edgectl partition) runs one stage per device; --replicas puts the model (or
    every stage) on several devices behind one request topic (edgectl infer --service NAME).

    With any rollout option (--canary, --waves, --soak, --gate, --all-at-once) it is a gated
    rollout: wave by wave, each soaked and judged against the previous model, rolled back by
    itself when a gate fails (see edgectl rollout show ID). Without, every device gets it at once."""
    from .client import ServerClient
    from .deploy import parse_stage_map, push_bundle
    from .rollouts import rollout_options

    try:
        pins = parse_stage_map(stage_map)
        strategy, gates = rollout_options(canary=canary, waves=waves, soak=soak, install_timeout=install_timeout,
                                          gates=gate, all_at_once=all_at_once, latency_slo=latency_slo,
                                          downgrade=downgrade)
        with ServerClient(server, token=token) as client:
            result = push_bundle(client, bundle, to, wait_s=wait, sign=sign, service=service, replicas=replicas,
                                 stage_map=pins, strategy=strategy, gates=gates)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(result)
    if result.get("rollout"):
        art, ro = result["artifact"], result["rollout"]
        if not as_json:
            out.print(f"uploaded {art['name']} {art['version']} ({art['size']:,} B, sha256 {art['sha256'][:16]}…)",
                      highlight=False)
            print_service_push(result.get("service"))
            print_rollout(ro)
        if result.get("incomplete"):
            fail(f"rollout {ro['id']} had not ended after {wait:g}s (edgectl rollout show {ro['id']} --watch)", code=3)
        if wait > 0 and ro["phase"] != "completed":
            fail(f"rollout {ro['id']} {ro['phase'].replace('_', ' ')}: {ro['reason']}", code=4)
        return
    if as_json:
        return
    art, dep = result["artifact"], result["deployment"]
    svc = result.get("service")
    out.print(f"uploaded {art['name']} {art['version']} ({art['size']:,} B, sha256 {art['sha256'][:16]}…)", highlight=False)
    out.print(f"deployment {dep['id']} → {len(dep['targets'])} device(s): {', '.join(dep['targets'])}", highlight=False)
    print_service_push(svc)
    if "devices" in dep:
        for d in dep["devices"]:
            role = (f" [stage {d['stage']}/{d['stages']}{' ' + d['file'] if d.get('file') else ''}"
                    f"{': ' + svc['why'][d['device_id']] if svc and d['device_id'] in svc.get('why', {}) else ''}]"
                    if d.get("service") else "")
            variant = (dep.get("variants") or {}).get(d["device_id"])
            if variant and not role:
                role = f" [variant {variant['quantization']}: {variant['why']}]"
            out.print(f"  {d['device_id']}: {d['state']}{role}{' — ' + d['detail'] if d.get('detail') else ''}",
                      highlight=False, markup=False)  # "[variant int8: ...]" is text, not a rich style
    if result.get("incomplete"):
        fail(f"not every device reached 'active' within {wait:g}s", code=3)


def print_service_push(svc: dict[str, Any] | None) -> None:
    """The service a push made: its shape, and the devices that left it (a smaller pool)."""
    if not svc:
        return
    out.print(f"service {svc['name']}: {svc['stages']} stage(s) × {svc['replicas']} replica(s); requests go to "
              f"edgectl infer --service {svc['name']}", highlight=False)
    for d, why in sorted((svc.get("left") or {}).items()):
        how = (f"keeps running {why['keeps']} (deployment {why['deployment']})" if why.get("deployment")
               else f"could not be told: {why.get('error')}")
        out.print(f"  {d}: leaves service {svc['name']}: {how}; {why['why']}", highlight=False)


@devices_app.command("list")
def devices_list(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every device: online or not, model, deployment state, last seen."""

    devices = ask(server, token, lambda client: client.devices())
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


@devices_app.command("enroll")
def devices_enroll(
    device_id: Annotated[str, typer.Argument(help="Device id (its broker username).")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the password here (mode 0600) [default: ./ID.password].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create (or rotate) DEVICE_ID's broker credentials; the password is shown once, in a file."""
    import os


    target = out_file or Path(f"{device_id}.password")
    if target.exists() and not force:
        fail(f"{target} exists; give another --out or --force")
    creds = ask(server, token, lambda client: client.enroll(device_id))
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(creds["password"] + "\n")
        os.chmod(target, 0o600)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc} (the new password is lost: enroll again)")
    if as_json:
        emit_json(creds | {"password_file": str(target)})
        return
    out.print(f"enrolled {device_id}: password written to {target} (mode 0600); "
              f"{creds['note']}.\nCopy it to the device and add to its /etc/edgectl/agent.toml:\n"
              f'  username = "{creds["username"]}"\n  password_file = "/etc/edgectl/password"',
              highlight=False, markup=False)


@devices_app.command("revoke")
def devices_revoke(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Remove DEVICE_ID's broker credentials; the broker disconnects it."""

    res = ask(server, token, lambda client: client.revoke(device_id))
    out.print(f"revoked {device_id}'s broker credentials"
              + ("" if res["applied"] else " (copy DATA/broker/passwd to your broker and reload it)"),
              highlight=False, markup=False)


@devices_app.command("fit")
def devices_fit(
    models: Annotated[list[Path], typer.Argument(help="Bundles, .tflite or Keras models (one variant each).")],
    latency_ms: Annotated[float | None, typer.Option(help="Recommend a board meeting this latency.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which boards can run each variant, and its predicted latency there."""
    from .fit import fit_all

    try:
        result = fit_all(list(models), latency_ms)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(result)
        return
    table = Table(title="fit per board — latency is PREDICTED (host latency × profile speed factor)")
    for col in ("variant", "board", "fits", "predicted p50", "memory", "why not"):
        table.add_column(col)
    for r in result["fits"]:
        table.add_row(r["variant"], r["profile"], "[green]yes[/green]" if r["fits"] else "[red]no[/red]",
                      f"{r['predicted_ms']:.3f} ms", f"{r['memory_mb']:.0f} MB", "; ".join(r["reasons"]))
    out.print(table)
    rec = result["recommendation"]
    if latency_ms is not None:
        out.print(f"recommended for ≤ {latency_ms:g} ms: {rec['profile']} with {rec['variant']} "
                  f"(predicted {rec['predicted_ms']:.3f} ms)" if rec else
                  f"no board meets {latency_ms:g} ms (predicted) with these variants", highlight=False)


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
    group: Annotated[str | None, typer.Option(help="Only devices whose label group is G.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model: name, version, name:version or sha256 prefix.")] = None,
    by: Annotated[str, typer.Option(help="device | group | model")] = "device",
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Availability, stability and performance per device, group or model version."""
    from .client import ServerClient

    try:
        if by not in ("device", "group", "model"):
            raise EdgeError(f"--by {by!r} must be device, group or model")
        window_s = parse_window(window)
        with ServerClient(server, token=token) as client:
            health = client.health(window_s, group=group, model=model, by=by)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(health)
        return
    rows = health["devices"]
    online = sum(1 for r in rows if r["online"])
    scope = "".join(f" {k} {v}" for k, v in (("group", group), ("model", model)) if v)
    since = " (hourly rollups since " + health["since"][:16] + ")" if health.get("source") == "hourly" else ""
    title = f"fleet health over the last {window}{since}{scope} — {online}/{len(rows)} online"
    metrics = ("inferences", "error rate", "p50", "p95", "p99", "availability", "outages", "MTBF", "MTTR",
               "restarts", "accuracy", "recall", "drift")
    if by == "device":
        table = Table(title=title)
        for col in ("device", "status", "model", "deployment", *metrics):
            table.add_column(col, justify="left" if col in ("device", "status", "model", "deployment") else "right")
        for r in rows:
            table.add_row(r["id"], "[green]online[/green]" if r["online"] else "[red]offline[/red]",
                          r.get("model_version") or "-", r.get("deployment_state") or "-", *_health_cells(r))
    else:
        table = Table(title=title.replace(" — ", f" by {by} — "))
        keys = ("group", "devices", "online") if by == "group" else ("model", "version", "devices")
        for col in (*keys, *metrics):
            table.add_column(col, justify="left" if col in ("group", "model", "version") else "right")
        for r in health.get("rows", []):
            table.add_row(*(str(r.get(k) if r.get(k) is not None else "-") for k in keys), *_health_cells(r))
    out.print(table)
    for svc in health.get("services") or []:
        print_service_stages(svc)


def print_service_stages(svc: dict[str, Any]) -> None:
    """One service's stages (pipeline and/or replicas): mean ms per request and the bottleneck."""
    k = max((s["stages"] for s in svc["stages"]), default=0)
    kind = f"{k}-stage pipeline" if k > 1 else "replica pool"
    bottleneck = f" — bottleneck: stage {svc['bottleneck']}" if k > 1 and svc.get("bottleneck") else ""
    table = Table(title=f"service {svc['service']} ({kind}){bottleneck} — mean ms per request")
    for col in ("stage", "replicas", "devices", "requests", "errors", "transfer in", "queued", "compute", "forward", ""):
        table.add_column(col, justify="left" if col in ("devices", "") else "right")
    for s in svc["stages"]:
        table.add_row(f"{s['stage']}/{s['stages']}", str(s["replicas"]), ", ".join(s["devices"]), f"{s['requests']:,}",
                      f"{s['errors']:,}", *(_fmt(s.get(f), "{:.2f}") for f in ("transfer_ms", "wait_ms", "compute_ms",
                                                                               "forward_ms")),
                      "← bottleneck" if s.get("bottleneck") else "")
    out.print(table)


def _duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _health_cells(r: dict[str, Any]) -> list[str]:
    drift = r.get("drift")
    return [
        f"{r.get('inferences', 0):,}", _fmt(r.get("error_rate"), "{:.2%}"),
        _fmt(r.get("p50_ms"), "{:.2f} ms"), _fmt(r.get("p95_ms"), "{:.2f} ms"), _fmt(r.get("p99_ms"), "{:.2f} ms"),
        _fmt(r.get("availability"), "{:.2%}"), _fmt(r.get("outages")), _duration_text(r.get("mtbf_s")),
        _duration_text(r.get("mttr_s")), _fmt(r.get("restarts")),
        _fmt(r.get("accuracy"), "{:.2%}"), _fmt(r.get("recall"), "{:.2%}"),
        "-" if drift is None else (f"[red]yes[/red] {r['drift_psi']:.2f}" if drift else f"no {r['drift_psi']:.2f}"),
    ]


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    window: Annotated[str, typer.Option(help="Health window: 90s, 15m, 24h, 7d.")] = "24h",
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One device: health over the window, latest health report, history, sessions, deployments."""
    from .client import ServerClient

    try:
        window_s = parse_window(window)
        with ServerClient(server, token=token) as client:
            d = client.device(device_id, window_s)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(d)
        return
    model = d.get("model") or {}
    dep = d.get("deployment") or {}
    w = d["window"]
    lines = [
        f"{d['id']}: {'online' if d['online'] else 'offline'}, agent {d.get('agent_version') or '?'}, "
        f"runtime {d.get('runtime') or '?'}, profile {d.get('profile') or '-'}, "
        f"labels {','.join(f'{k}={v}' for k, v in sorted((d.get('labels') or {}).items())) or '-'}",
        f"  model {model.get('name', '-')} {model.get('version', '')}; deployment {dep.get('id', '-')} "
        f"{dep.get('state', '')}; first seen {(d.get('first_seen') or '-')[:19]}, last seen {(d.get('last_seen') or '-')[:19]}",
        f"  last {window}: {w.get('inferences', 0):,} inferences, error rate {_fmt(w.get('error_rate'), '{:.2%}')}, "
        f"p50 {_fmt(w.get('p50_ms'), '{:.2f} ms')}, p95 {_fmt(w.get('p95_ms'), '{:.2f} ms')}, "
        f"p99 {_fmt(w.get('p99_ms'), '{:.2f} ms')}; availability {_fmt(w.get('availability'), '{:.2%}')}, "
        f"{w.get('outages', 0)} outage(s), MTBF {_duration_text(w.get('mtbf_s'))}, MTTR {_duration_text(w.get('mttr_s'))}, "
        f"{w.get('restarts', 0)} restart(s), {w.get('model_load_failures', 0)} failed deployment(s); "
        f"accuracy {_fmt(w.get('accuracy'), '{:.2%}')} over {w.get('labelled', 0)} labelled; "
        f"drift PSI {_fmt(w.get('drift_psi'), '{:.3f}')}",
    ]
    st = w.get("stage")
    if st:
        lines.append(f"  stage {st['stage']}/{st['stages']} of service {st['service']}: {st['requests']:,} request(s), "
                     f"{st['errors']:,} error(s); mean transfer in {_fmt(st.get('transfer_ms'), '{:.2f} ms')}, queued "
                     f"{_fmt(st.get('wait_ms'), '{:.2f} ms')}, compute {_fmt(st.get('compute_ms'), '{:.2f} ms')}, "
                     f"forward {_fmt(st.get('forward_ms'), '{:.2f} ms')}")
    if d.get("health"):
        lines.append(f"  health ({(d.get('health_at') or '')[:19]}): "
                     + ", ".join(f"{k}={v}" for k, v in sorted(d["health"].items())))
    out.print("\n".join(lines), highlight=False)
    for title, cols, items in (
        ("hourly history", ("hour", "inferences", "errors", "p50", "p95"),
         [(h["hour"][:16], f"{h['inferences']:,}", f"{h['errors']:,}", _fmt(h.get("p50_ms"), "{:.2f} ms"),
           _fmt(h.get("p95_ms"), "{:.2f} ms")) for h in d.get("history", [])]),
        ("connection sessions", ("started", "ended", "reason"),
         [(x["started_at"][:19], (x.get("ended_at") or "open")[:19], x.get("end_reason") or "-") for x in d.get("sessions", [])]),
        ("deployments", ("deployment", "model", "state", "updated", "detail"),
         [(x["id"], f"{x['name']} {x['version']}", x["state"], x["updated_at"][:19], (x.get("detail") or "")[:60])
          for x in d.get("deployments", [])]),
        ("events", ("at", "kind", "detail"), [(e["at"][:19], e["kind"], e["detail"][:80]) for e in d.get("events", [])]),
    ):
        if items:
            table = Table(title=title)
            for c in cols:
                table.add_column(c)
            for row in items:
                table.add_row(*row)
            out.print(table)


@app.command()
def feedback(
    request_id: Annotated[str | None, typer.Argument(help="Request id (hex of the request's MQTT CorrelationData).")] = None,
    label: Annotated[int | None, typer.Argument(help="The true class of that request.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="CSV (request_id,label per line) or JSON list of {request_id, label}.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send ground-truth labels for inference requests; fleet health joins them to predictions."""
    from .client import ServerClient

    try:
        labels = _read_labels(request_id, label, file)
        with ServerClient(server, token=token) as client:
            result = client.feedback(labels)
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(result)
        return
    out.print(f"stored {result['stored']} label(s); {result['matched']} match a prediction the fleet reported",
              highlight=False)


def _read_labels(request_id: str | None, label: int | None, file: Path | None) -> list[tuple[str, int]]:
    if (request_id is None) == (file is None) or (request_id is not None and label is None):
        raise EdgeError("give either REQUEST_ID LABEL or --file FILE")
    if file is None:
        return [(request_id, label)]  # type: ignore[list-item]
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    pairs: list[tuple[str, int]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
            pairs = [(str(x["request_id"]), int(x["label"])) for x in items]
        except (ValueError, TypeError, KeyError) as exc:
            raise EdgeError(f"{file}: expected a JSON list of {{request_id, label}} objects ({exc})") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#") or line.lower().startswith("request_id"):
                continue
            rid, _, lab = line.partition(",")
            if not rid.strip() or not lab.strip().isdigit():
                raise EdgeError(f"{file}:{n}: expected request_id,label (a non-negative integer)")
            pairs.append((rid.strip(), int(lab)))
    if not pairs:
        raise EdgeError(f"{file} holds no labels")
    return pairs


@app.command()
def infer(
    device: Annotated[str, typer.Argument(help="Device id (with --service: the .npy input).")],
    input_file: Annotated[Path | None, typer.Argument(help=".npy tensor to send.")] = None,
    service: Annotated[str | None, typer.Option(help="Ask a service (pipeline or replica pool) instead of one device.")] = None,
    retries: Annotated[int, typer.Option(help="With --service: send again this many times when no answer comes within --timeout.")] = 2,
    broker: Annotated[str | None, typer.Option(help="Broker URL (default: asked from the server).")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Broker username (e.g. edgectl-operator on a --secure broker).")] = None,
    password_file: Annotated[Path | None, typer.Option("--password-file", help="File holding the broker password (DATA/broker/operator.password).")] = None,
    ca_file: Annotated[Path | None, typer.Option("--ca-file", help="With an mqtts:// broker: the CA certificate to check it against.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer (per attempt with --service).")] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Send one inference request to DEVICE (or to --service NAME) over MQTT and print the answer."""
    import numpy as np

    from .client import ServerClient
    from .infer import InferenceClient

    if service is not None:
        if input_file is not None:
            fail("give either DEVICE INPUT or --service NAME INPUT, not both a device and a service")
        input_file, who = Path(device), f"service {service}"
    elif input_file is None:
        fail("missing INPUT: edgectl infer DEVICE INPUT.npy (or --service NAME INPUT.npy)")
    else:
        who = f"device {device}"
    try:
        x = np.load(input_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {input_file} as .npy: {exc}")
    try:
        if broker is None:
            with ServerClient(server, token=token) as client:
                broker = client.info()["broker_url"]
        password = None
        if password_file is not None:
            try:
                password = password_file.read_text().strip()
            except OSError as exc:
                raise EdgeError(f"cannot read --password-file {password_file}: {exc.strerror or exc}") from None
        with InferenceClient(broker, username=user, password=password,
                             ca_file=str(ca_file) if ca_file else None) as ic:
            if service is not None:
                resp = ic.infer_service(service, x, timeout=timeout, retries=max(0, retries))
            else:
                resp = ic.infer(device, x, timeout=timeout)
    except EdgeError as exc:
        fail(str(exc))
    if not resp.ok:
        fail(f"{who} answered with an error: {resp.error}")
    assert resp.output is not None
    if as_json:
        emit_json({("service" if service else "device"): service or device, "model_version": resp.model_version,
                   "latency_ms": resp.latency_ms, "output": resp.output.tolist(),
                   "argmax": int(np.argmax(resp.output)), "stages": list(resp.trace)})
        return
    out.print(f"{service or device} ({resp.model_version}, {resp.latency_ms:.2f} ms): argmax {int(np.argmax(resp.output))}; "
              f"output {np.array2string(resp.output, precision=4, threshold=20)}", highlight=False)
    for t in resp.trace:
        transfer = f"transfer in {t['transfer_ms']:.2f} ms, " if "transfer_ms" in t else ""
        out.print(f"  stage {t['stage']} on {t.get('device', '?')}: {transfer}queued {t['wait_ms']:.2f} ms, "
                  f"compute {t['compute_ms']:.2f} ms", highlight=False)


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


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="Directory for edgectl-signing.key (0600) and .pub.")] = Path("keys"),
) -> None:
    """Create a signing key pair; install the .pub file on agents (--trusted-key)."""
    from .protocol.signing import generate_keys, load_public_keys

    try:
        priv, pub = generate_keys(out)
        kid = next(iter(load_public_keys([pub])))
    except EdgeError as exc:
        fail(str(exc))
    typer.echo(f"wrote {priv} (keep it secret) and {pub}; key id {kid}")


@keys_app.command("sign")
def keys_sign(
    bundle: Annotated[Path, typer.Argument(help="Bundle to sign (rewritten in place).")],
    key: Annotated[Path, typer.Option(help="Private key (edgectl-signing.key).")],
) -> None:
    """Sign a bundle (after verifying it); its sha256 changes."""
    from .protocol.bundle import resign
    from .protocol.signing import signer

    try:
        sha = resign(bundle, signer(key))
    except EdgeError as exc:
        fail(str(exc))
    typer.echo(f"signed {bundle}: sha256 {sha}")


rollout_app = typer.Typer(no_args_is_help=True, help="Gated rollouts: progress, pause/resume/abort, rollback.")
app.add_typer(rollout_app, name="rollout")
PHASE_STYLE = {"completed": "green", "rolled_back": "red", "aborted": "yellow", "superseded": "yellow",
               "paused": "yellow", "installing": "cyan", "soaking": "cyan", "pending": "cyan"}


def _phase(phase: str) -> str:
    return f"[{PHASE_STYLE.get(phase, 'white')}]{phase.replace('_', ' ')}[/]"


def _clip(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters at a word boundary, "…" marking the cut; as
    literal text for a rich table cell (an agent's detail may hold brackets)."""
    from rich.markup import escape

    if len(text) > n:
        text = text[: text.rfind(" ", 0, n) if " " in text[:n] else n].rstrip(" ,;:(") + " …"
    return escape(text)


def rollout_renderables(ro: dict[str, Any]) -> list[Any]:
    """What `edgectl rollout show` prints: the summary in words, then waves, devices, gates, history."""
    from rich.text import Text

    parts: list[Any] = [Text.from_markup(
        f"rollout [b]{ro['id']}[/b] (deployment {ro['deployment_id']}): {ro.get('model') or '?'} "
        f"{ro.get('version') or ro['artifact'][:12]} — {_phase(ro['phase'])}")]
    parts += [Text("  " + line) for line in ro.get("summary", [])]
    waves = Table(title="waves")
    for col in ("wave", "devices", "status"):
        waves.add_column(col)
    for w in ro["waves"]:
        waves.add_row(w["label"], ", ".join(w["devices"]), _phase(w["status"]) if w["status"] in PHASE_STYLE
                      else {"passed": "[green]passed[/]", "failed": "[red]failed[/]"}.get(w["status"], w["status"]))
    devices = Table(title="devices")
    for col in ("device", "wave", "rollout state", "reported", "runs now", "before", "online", "note"):
        devices.add_column(col)
    for d in ro["devices"]:
        note = d.get("detail") or ""
        if d.get("variant"):
            note = f"variant {d['variant']['quantization']}: {d['variant']['why']}" + (f"; {note}" if note else "")
        if d.get("target_state") == "rolled_back":
            note = "back on its previous model" if d.get("on_previous") else "returning to its previous model"
        elif d.get("target_state") == "skipped":
            note = "never told: the rollout ended before its wave"
        devices.add_row(d["device_id"], d.get("wave_label", str(d["wave"])), d["state"].replace("_", " "),
                        (d.get("target_state") or "-").replace("_", " "), d.get("running_model") or "-",
                        d.get("previous_model") or "-", "yes" if d.get("online") else "no", _clip(note, 120))
    parts += [waves, devices]
    if ro.get("gate_results"):
        gates = Table(title=f"gates of the last judged wave (soak {ro['strategy']['soak_s']:g} s)")
        for col in ("gate", "result", "detail"):
            gates.add_column(col)
        for g in ro["gate_results"]:
            gates.add_row(g["gate"], "[green]pass[/]" if g["passed"] else "[red]FAIL[/]", _clip(g["detail"], 400))
        parts.append(gates)
    if ro.get("history"):
        parts.append(Text("history:\n" + "\n".join(f"  {h}" for h in ro["history"])))
    return parts


def print_rollout(ro: dict[str, Any]) -> None:
    for part in rollout_renderables(ro):
        out.print(part, highlight=False)


@rollout_app.command("list")
def rollout_list(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every rollout, newest first: phase, progress, and why it stopped."""

    rows = ask(server, token, lambda client: client.rollouts())
    if as_json:
        emit_json(rows)
        return
    table = Table(title=f"{len(rows)} rollout(s)")
    for col in ("rollout", "deployment", "model", "devices", "waves passed", "phase", "updated", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], r["deployment_id"], f"{r.get('model') or '?'} {r.get('version') or ''}",
                      str(r["devices"]), f"{r['waves_passed']}/{r['waves']}", _phase(r["phase"]),
                      (r.get("updated_at") or "")[:19], _clip(r.get("reason") or "", 100))
    out.print(table)


@rollout_app.command("show")
def rollout_show(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id (r-...) or its deployment id (d-...).")],
    watch: Annotated[bool, typer.Option("--watch", help="Follow live progress until the rollout ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Stop watching after this many seconds.")] = 3600.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One rollout: per wave and per device state, the gates it was judged by, and in words why
    it completed or rolled back."""
    from .client import ServerClient
    from .rollouts import wait_rollout

    try:
        with ServerClient(server, token=token) as client:
            if not watch:
                ro = client.rollout(rollout_id)
            elif as_json or not out.is_terminal:
                seen: list[str] = []

                def progress(view: dict[str, Any]) -> None:
                    line = f"{view['phase']} wave {view['wave'] + 1}/{len(view['waves'])}: " + ", ".join(
                        f"{d['device_id']}={d['state']}" for d in view["devices"] if d["wave"] == view["wave"])
                    if not as_json and (not seen or seen[-1] != line):
                        seen.append(line)
                        out.print(line, highlight=False)

                ro, _ = wait_rollout(client, rollout_id, timeout, poll_s=interval, on_update=progress)
            else:
                from rich.console import Group
                from rich.live import Live

                with Live(console=out, refresh_per_second=4) as live:
                    ro, _ = wait_rollout(client, rollout_id, timeout, poll_s=interval,
                                         on_update=lambda v: live.update(Group(*rollout_renderables(v))))
                return
    except EdgeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(ro)
        return
    print_rollout(ro)


def _rollout_action(action: str, rollout_id: str, server: str | None, token: str | None, as_json: bool) -> None:

    ro = ask(server, token, lambda client: client.rollout_action(rollout_id, action))
    if as_json:
        emit_json(ro)
        return
    print_rollout(ro)


RolloutId = Annotated[str, typer.Argument(help="Rollout id (r-...) or its deployment id (d-...).")]


@rollout_app.command("pause")
def rollout_pause(rollout_id: RolloutId, server: ServerOpt = None, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Hold the rollout where it is (no new wave, no judgement) until resumed."""
    _rollout_action("pause", rollout_id, server, token, as_json)


@rollout_app.command("resume")
def rollout_resume(rollout_id: RolloutId, server: ServerOpt = None, token: TokenOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Continue a paused rollout (the soak of the current wave starts over)."""
    _rollout_action("resume", rollout_id, server, token, as_json)


@rollout_app.command("abort")
def rollout_abort(rollout_id: RolloutId, server: ServerOpt = None, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Stop the rollout: devices keep what they run now, later waves never start."""
    _rollout_action("abort", rollout_id, server, token, as_json)


@rollout_app.command("rollback")
def rollout_rollback(rollout_id: RolloutId, server: ServerOpt = None, token: TokenOpt = None,
                     as_json: JsonOpt = False) -> None:
    """Return every device this rollout changed to its previous model (from the agents' second slot)."""
    _rollout_action("rollback", rollout_id, server, token, as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

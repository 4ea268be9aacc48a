"""Model parallel: split a Keras model into pipeline stages for several (heterogeneous) devices.

1. **Cut points.** A cut between two consecutive layers (in topological order) is allowed only
   where exactly one tensor crosses it: a cut inside a residual block, where the skip tensor is
   still live, is refused (and reported), never silently broken.
2. **Cost model.** The model is cut at every allowed point into *units*; each unit is converted to
   TFLite and timed on this host. A stage's predicted time on a device is the sum of its units'
   host times × the device profile's ``speed_factor``, plus the time to send its output tensor over
   the slower link of the two devices at the cut.
3. **Plan.** Dynamic programming over (stage, last unit) finds the cuts that minimise the pipeline
   bottleneck (max over stages of compute + transfer) exactly — :func:`plan` — checked against
   brute force in the tests.
4. **Bundle.** Each stage becomes ``stage-NN.tflite``; the manifest's ``pipeline`` lists the stages
   in order with their input/output tensors, quantization parameters and a per-stage smoke test.
   ``manifest["model"]`` describes stage 1, so the bundle format stays valid for every reader.
5. **int8.** Each stage is calibrated on its own input distribution: the calibration set is run
   through the float stages, and stage k is converted with the float inputs of stage k as its
   representative data. Stages take and give int8 (a quarter of the bytes on the link); the
   quantization parameters in the pipeline description let the sender requantize for the next
   stage and let the first and last stage accept and answer float32
   (:func:`sdk.protocol.pipeline.adapt`). The bundle is written only if the pipeline gives the
   whole float model's top-1 class on at least ``min_top1_agreement`` of the evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import CompressionError
from .protocol.bundle import write_bundle
from .protocol.frames import tensor_to_npy
from .protocol.pipeline import adapt
from .protocol.profiles import Profile, get_profile
from .protocol.runtime import TFLiteModel

HOST_LINK_MBPS = 1000.0  # used when no device profiles are given


@dataclass(frozen=True)
class Unit:
    """Layers between two allowed cut points."""

    layers: tuple[str, ...]
    params: int
    host_ms: float
    out_shape: tuple[int, ...]
    out_bytes: int  # per sample, as sent (float32, or int8 for int8 pipelines)


@dataclass(frozen=True)
class StagePlan:
    index: int
    device: str
    units: tuple[int, int]  # first and last unit (inclusive)
    layers: tuple[str, ...]
    params: int
    compute_ms: float
    transfer_ms: float
    out_shape: tuple[int, ...]
    out_bytes: int

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.transfer_ms


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    refused_cuts: tuple[str, ...] = ()

    @property
    def bottleneck_ms(self) -> float:
        return max(s.total_ms for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"bottleneck_ms": self.bottleneck_ms, "refused_cuts": list(self.refused_cuts),
                "stages": [{"index": s.index, "device": s.device, "layers": list(s.layers), "params": s.params,
                            "predicted_compute_ms": s.compute_ms, "predicted_transfer_ms": s.transfer_ms,
                            "out_shape": list(s.out_shape), "out_bytes": s.out_bytes} for s in self.stages]}


# -- the optimiser (pure) -------------------------------------------------------------------------

def stage_cost(unit_ms: list[float], out_bytes: list[int], speed: list[float], link: list[float],
               s: int, i: int, j: int) -> tuple[float, float]:
    """(compute, transfer) ms of stage ``s`` running units ``i..j`` (inclusive)."""
    compute = sum(unit_ms[i : j + 1]) * speed[s]
    if s == len(speed) - 1:
        return compute, 0.0
    mbps = min(link[s], link[s + 1])
    return compute, out_bytes[j] * 8 / (mbps * 1e6) * 1000


def plan_cuts(unit_ms: list[float], out_bytes: list[int], speed: list[float], link: list[float]) -> list[tuple[int, int]]:
    """Exact minimum-bottleneck split of units into ``len(speed)`` consecutive non-empty stages.

    DP over (stage, last unit): best[s][j] = min over i of max(best[s-1][i-1], cost(s, i..j)).
    O(stages × units²). Returns the (first, last) unit of each stage.
    """
    k, n = len(unit_ms), len(speed)
    if n > k:
        raise CompressionError(f"cannot make {n} stages from {k} unit(s): the model has only {k - 1} allowed cut point(s)")
    inf = float("inf")
    best = [[inf] * k for _ in range(n)]
    arg = [[-1] * k for _ in range(n)]
    for j in range(k):
        best[0][j] = sum(stage_cost(unit_ms, out_bytes, speed, link, 0, 0, j))
    for s in range(1, n):
        for j in range(s, k):
            for i in range(s, j + 1):  # stage s covers units i..j; stages 0..s-1 cover 0..i-1
                c = max(best[s - 1][i - 1], sum(stage_cost(unit_ms, out_bytes, speed, link, s, i, j)))
                if c < best[s][j]:
                    best[s][j], arg[s][j] = c, i
    bounds, j = [], k - 1
    for s in range(n - 1, -1, -1):
        i = arg[s][j] if s > 0 else 0
        bounds.append((i, j))
        j = i - 1
    return bounds[::-1]


def brute_force_cuts(unit_ms: list[float], out_bytes: list[int], speed: list[float], link: list[float]) -> float:
    """The optimum bottleneck by trying every split (for tests)."""
    k, n = len(unit_ms), len(speed)
    best = float("inf")
    for cuts in combinations(range(1, k), n - 1):
        edges = [0, *cuts, k]
        worst = max(sum(stage_cost(unit_ms, out_bytes, speed, link, s, edges[s], edges[s + 1] - 1)) for s in range(n))
        best = min(best, worst)
    return best


# -- the Keras side ---------------------------------------------------------------------------------

@dataclass
class Graph:
    model: Any  # the functional graph (a Sequential model's inner Functional)
    layers: list[Any]  # topological order, input layers excluded
    nodes: list[Any] = field(default_factory=list)  # each layer's call in this graph
    cuts: list[int] = field(default_factory=list)  # allowed: cut after layers[i]
    refused: list[str] = field(default_factory=list)


def _graph_nodes(model: Any) -> list[Any]:
    """The calls (nodes) of this model's own graph. A layer's ``_inbound_nodes`` also lists calls
    made while Keras rebuilt it (a loaded Sequential has several), so never take ``[0]``."""
    by_depth = getattr(model, "_nodes_by_depth", None)
    if not by_depth:
        raise CompressionError("partitioning needs a functional or Sequential Keras model (a subclassed "
                               "model has no layer graph to cut)")
    return [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]]


def analyse(model: Any) -> Graph:
    """Find the allowed cut points of a single-input, single-output Keras model."""
    model = getattr(model, "_functional", None) or model  # Sequential wraps a Functional
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CompressionError("partitioning needs a single-input, single-output model")
    layers = [layer for layer in model.layers if layer.__class__.__name__ != "InputLayer"]
    calls: dict[int, list[Any]] = {}
    for node in _graph_nodes(model):
        calls.setdefault(id(node.operation), []).append(node)
    for layer in layers:
        if len(calls.get(id(layer), [])) != 1:
            raise CompressionError(f"layer {layer.name} is used {len(calls.get(id(layer), []))} times (shared "
                                   "weights); partitioning needs each layer called once")
    nodes = [calls[id(layer)][0] for layer in layers]
    ios = [([id(t) for t in n.input_tensors], [id(t) for t in n.output_tensors]) for n in nodes]
    g = Graph(model, layers, nodes)
    out_id = id(model.outputs[0])
    for p in range(len(layers) - 1):
        produced = {id(model.inputs[0])} | {t for _, outs in ios[: p + 1] for t in outs}
        needed = {t for ins, _ in ios[p + 1 :] for t in ins} | {out_id}
        live = produced & needed
        if len(live) == 1:
            g.cuts.append(p)
        else:
            g.refused.append(f"after {layers[p].name}: {len(live)} tensors are live (inside a residual/skip block)")
    return g


def _tensor_after(g: Graph, p: int) -> Any:
    """The single tensor crossing the cut after layers[p] (or the model input for p = -1)."""
    if p < 0:
        return g.model.inputs[0]
    return g.nodes[p].output_tensors[0]


def submodel(g: Graph, after: int, upto: int) -> Any:
    """Keras model from the tensor after layers[after] to the tensor after layers[upto]."""
    import keras

    return keras.Model(inputs=_tensor_after(g, after), outputs=_tensor_after(g, upto))


def _units(g: Graph) -> list[tuple[int, int]]:
    """(after, upto) layer index pairs of the units between allowed cuts."""
    edges = [-1, *g.cuts, len(g.layers) - 1]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _time_ms(model: TFLiteModel, x: np.ndarray, runs: int) -> float:
    from .compress import latency_ms

    return latency_ms(model, x, runs)["median"]


def _convert(keras_model: Any, quantize: str, calibration: np.ndarray | None) -> bytes:
    from .compress import Source, convert

    return convert(Source(Path("<stage>"), "keras", 0, keras_model=keras_model), quantize, calibration)


def _predict(keras_model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras_model(x, training=False), dtype=np.float32)


def _sample_for(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=(1, *[d for d in shape[1:]])).astype(np.float32)


@dataclass
class PartitionResult:
    plan: Plan
    bundle_path: Path
    bundle_sha256: str
    stage_measured_ms: list[float]
    max_abs_diff: float
    manifest: dict[str, Any]
    #: Share of evaluation rows where the pipeline's top-1 class equals the whole float model's.
    top1_agreement: float | None = None
    eval_rows: int = 0


def partition(model_path: str | Path, output: str | Path, *, stages: int, devices: list[str] | None = None,
              quantize: str = "none", calibration: np.ndarray | None = None, name: str | None = None,
              version: str | None = None, runs: int = 50, eval_x: np.ndarray | None = None,
              min_top1_agreement: float = 0.99) -> PartitionResult:
    """Plan, split, convert and bundle; verify that the stages reproduce the whole model.

    float32 stages must match the whole model within 1e-5; quantized ones must give its top-1
    class on ``min_top1_agreement`` of ``eval_x`` (default: the calibration set).
    """
    from .compress import load_source, quiet_native_output

    if stages < 1:
        raise CompressionError("--stages must be at least 1")
    if quantize not in ("none", "dynamic", "float16", "int8"):
        raise CompressionError(f"--quantize {quantize!r} is not supported for pipelines: use none, dynamic, float16 or int8")
    if quantize == "int8" and calibration is None:
        raise CompressionError("int8 pipelines need a calibration set to calibrate every stage: pass --calibration FILE.npz (array x)")
    profiles: list[Profile] = [get_profile(d) for d in devices] if devices else []
    if profiles and len(profiles) != stages:
        raise CompressionError(f"--devices names {len(profiles)} profile(s) for {stages} stage(s)")
    speed = [p.speed_factor for p in profiles] or [1.0] * stages
    link = [p.link_mbps for p in profiles] or [HOST_LINK_MBPS] * stages
    labels = [p.name for p in profiles] or ["host"] * stages

    src = load_source(model_path)
    if src.keras_model is None:
        raise CompressionError("partitioning needs a Keras model (.keras or .h5), not a SavedModel or .tflite")
    g = analyse(src.keras_model)
    spans = _units(g)
    if stages > len(spans):
        raise CompressionError(f"cannot make {stages} stages: the model has only {len(spans) - 1} allowed cut point(s)"
                               + (f"; refused: {'; '.join(g.refused[:3])}" if g.refused else ""))
    rng = np.random.default_rng(0)
    elem_bytes = 1 if quantize == "int8" else 4  # what crosses a cut: int8 pipelines send int8
    units: list[Unit] = []
    with quiet_native_output():
        for after, upto in spans:
            sub = submodel(g, after, upto)
            tfl = TFLiteModel(_convert(sub, "none", None))
            x = _sample_for(tuple(sub.inputs[0].shape), rng)
            out_shape = tuple(int(d) if d is not None else -1 for d in sub.outputs[0].shape)
            units.append(Unit(tuple(layer.name for layer in g.layers[after + 1 : upto + 1]),
                              int(sum(layer.count_params() for layer in g.layers[after + 1 : upto + 1])),
                              _time_ms(tfl, x, runs), out_shape, int(np.prod(out_shape[1:])) * elem_bytes))
    bounds = plan_cuts([u.host_ms for u in units], [u.out_bytes for u in units], speed, link)
    stage_plans = []
    for s, (i, j) in enumerate(bounds):
        compute, transfer = stage_cost([u.host_ms for u in units], [u.out_bytes for u in units], speed, link, s, i, j)
        stage_plans.append(StagePlan(s + 1, labels[s], (i, j), tuple(n for u in units[i : j + 1] for n in u.layers),
                                     sum(u.params for u in units[i : j + 1]), compute, transfer,
                                     units[j].out_shape, units[j].out_bytes))
    the_plan = Plan(tuple(stage_plans), tuple(g.refused))

    # Build, convert and check the stages.
    files: dict[str, bytes] = {}
    stage_entries = []
    measured = []
    x0 = (np.asarray(calibration[:1], dtype=np.float32) if calibration is not None
          else _sample_for(tuple(src.keras_model.inputs[0].shape), rng))
    cal_in = np.asarray(calibration, dtype=np.float32) if calibration is not None else None
    with quiet_native_output():
        whole = TFLiteModel(_convert(src.keras_model, "none", None))
        prev_out: dict[str, Any] = whole.input_spec  # what the caller sends: float32
        x = x0
        for sp in stage_plans:
            after, upto = spans[sp.units[0]][0], spans[sp.units[1]][1]
            sub = submodel(g, after, upto)
            data = _convert(sub, quantize, cal_in)  # int8: calibrated on this stage's own inputs
            if cal_in is not None and sp.index < len(stage_plans):
                cal_in = _predict(sub, cal_in)  # float inputs of the next stage
            tfl = TFLiteModel(data)
            fname = f"stage-{sp.index:02d}.tflite"
            files[fname] = data
            xs = adapt(x, prev_out, tfl.input_spec)
            y = tfl.run(xs)
            exact = np.dtype(tfl.output_spec["dtype"]).kind == "f"
            files[f"stage-{sp.index:02d}-input.npy"] = tensor_to_npy(xs)
            files[f"stage-{sp.index:02d}-output.npy"] = tensor_to_npy(y)
            measured.append(_time_ms(tfl, xs, runs) * speed[sp.index - 1])
            stage_entries.append({
                "index": sp.index, "file": fname, "device": sp.device, "layers": list(sp.layers), "params": sp.params,
                "inputs": [tfl.input_spec], "outputs": [tfl.output_spec],
                # integer outputs: one quantization step of slack for a different CPU kernel
                "sample": {"input": f"stage-{sp.index:02d}-input.npy", "output": f"stage-{sp.index:02d}-output.npy",
                           "atol": 1e-3 if exact else 1.0, "rtol": 1e-3 if exact else 0.0},
                "predicted_compute_ms": sp.compute_ms, "predicted_transfer_ms": sp.transfer_ms,
            })
            x, prev_out = y, tfl.output_spec
        x = adapt(x, prev_out, whole.output_spec)
        expected = whole.run(x0)
    diff = float(np.max(np.abs(x.astype(np.float64) - expected.astype(np.float64))))
    if quantize == "none" and diff > 1e-5:
        raise CompressionError(f"the stages do not reproduce the whole model (max abs difference {diff:.3g} > 1e-5)")
    pipeline = {"stages": stage_entries, "input": whole.input_spec, "output": whole.output_spec,
                "sample": {"input": "sample_input.npy", "output": "sample_output.npy"},
                "plan": the_plan.to_dict(), "max_abs_diff": diff}
    agreement, rows = None, 0
    xe = eval_x if eval_x is not None else calibration
    if xe is not None and int(np.prod(whole.output_spec["shape"][1:])) > 1:
        xe = np.asarray(xe, dtype=np.float32)
        with quiet_native_output():
            ref = np.argmax(whole.run(xe), axis=-1)
            got = np.argmax(_run_stages(files, pipeline, xe), axis=-1)
        agreement, rows = float(np.mean(ref == got)), len(xe)
        pipeline["top1_agreement"], pipeline["eval_rows"] = agreement, rows
        if quantize != "none" and agreement < min_top1_agreement:
            raise CompressionError(
                f"the {quantize} stages give the whole float model's top-1 class on only {agreement:.2%} of "
                f"{rows} rows (need {min_top1_agreement:.0%}): use a larger or more representative calibration set, "
                "or --quantize dynamic/none")
    files["sample_input.npy"], files["sample_output.npy"] = tensor_to_npy(x0), tensor_to_npy(x)
    first = stage_entries[0]
    manifest = {
        "name": name or Path(model_path).name.split(".")[0],
        "version": version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": "pipeline",
        "quantization": quantize,
        "model": {"file": first["file"], "inputs": first["inputs"], "outputs": first["outputs"]},
        "sample": first["sample"],
        "pipeline": pipeline,
    }
    out = Path(output)
    sha = write_bundle(out, manifest, files)
    return PartitionResult(the_plan, out, sha, measured, diff, manifest, agreement, rows)


def _run_stages(files: dict[str, bytes], pipeline: dict[str, Any], x: np.ndarray) -> np.ndarray:
    y, spec = x, pipeline["input"]
    for st in pipeline["stages"]:
        model = TFLiteModel(files[st["file"]])
        y = model.run(adapt(y, spec, model.input_spec))
        spec = model.output_spec
    return adapt(y, spec, pipeline["output"])


def run_pipeline(bundle: Any, x: np.ndarray) -> np.ndarray:
    """Run a pipeline bundle's stages in order on this host (reference for agents and tests):
    float32 in and out like the whole model, tensors converted between stages as agents do."""
    return _run_stages(bundle.files, bundle.manifest["pipeline"], x)

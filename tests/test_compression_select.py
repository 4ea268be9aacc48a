"""Pure logic of the compression suite: schedules, masks, the accuracy budget, runtime support."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sdk.compression.pruning import check_sparsity, magnitude_mask, polynomial_sparsity
from sdk.compression.select import choose, diagnose_collapse
from sdk.compression.tflite_info import runtime_support
from sdk.protocol import CompressionError
from sdk.protocol.profiles import get_profile


def test_polynomial_schedule_ramps_from_zero_to_target_and_holds() -> None:
    vals = [polynomial_sparsity(s, final=0.8, begin=0, end=100) for s in range(0, 130, 10)]
    assert vals[0] == 0.0 and vals[10] == pytest.approx(0.8) and vals[-1] == 0.8
    assert all(b >= a for a, b in itertools.pairwise(vals))
    assert polynomial_sparsity(50, final=0.8, begin=0, end=100) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)


def test_magnitude_mask_zeroes_exactly_the_smallest_fraction() -> None:
    w = np.random.default_rng(0).normal(size=(40, 25)).astype(np.float32)
    m = magnitude_mask(w, 0.8)
    assert m.sum() == 200
    assert np.abs(w[m == 1]).min() >= np.abs(w[m == 0]).max()


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2])
def test_sparsity_outside_open_unit_interval_is_refused(bad: float) -> None:
    with pytest.raises(CompressionError, match=r"outside \(0, 1\)"):
        check_sparsity(bad)


def _cand(label: str, q: str, acc: float, gz: int, *, rt_ok: bool = True) -> dict:
    return {"label": label, "quantization": q, "accuracy": acc, "size_bytes": gz * 2, "gzip_bytes": gz,
            "runtime": {"host_loaded": True, "float_ops": {},
                        "support": {"tflite-runtime": {"ok": rt_ok, "why": "needs 2.17.0"},
                                    "ai-edge-litert": {"ok": True, "why": ""}}}}


def test_choose_ships_the_smallest_within_budget_and_says_why_others_lost() -> None:
    ref = {"accuracy": 0.95}
    cands = [_cand("float16", "float16", 0.95, 300), _cand("dynamic", "dynamic", 0.948, 100, rt_ok=False),
             _cand("int8", "int8", 0.945, 110), _cand("pruned 80% + int8", "int8", 0.90, 40)]
    best = choose(cands, ref, max_drop=1.0, profile=None)
    assert best["label"] == "dynamic"
    assert "exceeds the budget of 1" in cands[3]["rejected"][0]
    best = choose(cands, ref, max_drop=1.0, profile=get_profile("coral-dev-board"))
    assert best["label"] == "int8"  # coral: int8 only, and tflite-runtime cannot load dynamic
    assert any("tflite-runtime cannot load it" in r for r in cands[1]["rejected"])
    assert any("accepts int8 only" in r for r in cands[0]["rejected"])
    with pytest.raises(CompressionError, match="no variant meets"):
        choose(cands, ref, max_drop=0.1, profile=get_profile("coral-dev-board"))


def test_collapse_is_named_with_its_likely_cause() -> None:
    ref = {"accuracy": 0.95}
    c = {**_cand("int8", "int8", 0.30, 10), "top_class": 3, "top_class_share": 0.7, "top_label_share": 0.1}
    msg = diagnose_collapse(c, ref, calibration_rows=20, calibration_shift=0.9)
    assert msg and "collapsed" in msg and "class 3 takes 70%" in msg
    assert "calibration set is small (20 rows" in msg and "unrepresentative" in msg
    ok = {**_cand("int8", "int8", 0.94, 10), "top_class_share": 0.11, "top_label_share": 0.1}
    assert diagnose_collapse(ok, ref, calibration_rows=200, calibration_shift=0.0) is None


def test_runtime_support_compares_op_versions_with_the_measured_runtime_limits() -> None:
    dyn = {"ops": [{"op": "FULLY_CONNECTED", "version": 12}], "custom_ops": [], "min_runtime_version": "2.17.0"}
    ok, why = runtime_support(dyn, "tflite-runtime", host_loaded=True)
    assert not ok and "FULLY_CONNECTED version 12 (max in tflite-runtime 2.14.0: 10)" in why and "2.17.0" in why
    old_fc = {**dyn, "ops": [{"op": "FULLY_CONNECTED", "version": 9}], "min_runtime_version": "2.3.0"}
    ok, why = runtime_support(old_fc, "tflite-runtime", host_loaded=True)
    assert ok and "2.14.0" in why
    assert runtime_support(dyn, "ai-edge-litert", host_loaded=True)[0]
    assert not runtime_support(dyn, "ai-edge-litert", host_loaded=False)[0]

"""Choosing a variant: the accuracy budget, device constraints, and int8 collapse diagnosis.

Pure logic over plain dicts (one per candidate, as recorded in the manifest), so it is tested
without TensorFlow.
"""

from __future__ import annotations

from typing import Any

from ..protocol import CompressionError

#: A quantized variant "collapses" when it loses this many accuracy points or more...
COLLAPSE_DROP_POINTS = 10.0
#: ...or when one class takes this share of the predictions while the labels are balanced-ish.
COLLAPSE_CLASS_SHARE = 0.5


def drop_points(reference: dict[str, Any], cand: dict[str, Any]) -> float | None:
    if reference.get("accuracy") is None or cand.get("accuracy") is None:
        return None
    return round((reference["accuracy"] - cand["accuracy"]) * 100, 4)


def diagnose_collapse(cand: dict[str, Any], reference: dict[str, Any], *, calibration_rows: int | None,
                      calibration_shift: float | None) -> str | None:
    """A sentence naming the collapse and its likely causes, or None when the variant is fine."""
    if cand["quantization"] not in ("int8", "int16x8"):
        return None
    drop = drop_points(reference, cand)
    share = cand.get("top_class_share")
    label_share = cand.get("top_label_share") or 0.0
    dominated = share is not None and share >= max(COLLAPSE_CLASS_SHARE, 2 * label_share)
    if not (dominated or (drop is not None and drop >= COLLAPSE_DROP_POINTS)):
        return None
    what = []
    if drop is not None:
        what.append(f"accuracy fell {drop:.1f} points")
    if dominated:
        what.append(f"class {cand.get('top_class')} takes {share:.0%} of the predictions")
    causes = []
    if calibration_rows is not None and calibration_rows < 100:
        causes.append(f"the calibration set is small ({calibration_rows} rows; use 100-500 representative rows)")
    if calibration_shift is not None and calibration_shift > 0.5:
        causes.append(f"the calibration set is unrepresentative (its value range differs from the eval data's "
                      f"by {calibration_shift:.0%})")
    float_ops = cand.get("runtime", {}).get("float_ops") or {}
    if float_ops:
        causes.append("ops were left in float: " + ", ".join(f"{k}×{v}" for k, v in sorted(float_ops.items())))
    if not causes:
        causes.append("activation ranges the calibration set did not cover, or layers that quantize badly "
                      "(e.g. wide-range activations); try more calibration rows or int16x8")
    return f"{cand['quantization']} collapsed: {' and '.join(what)}; likely cause: {'; '.join(causes)}"


def constraints(cand: dict[str, Any], profile: Any | None) -> list[str]:
    """Reasons a device profile cannot take this candidate (empty: it can)."""
    why = []
    rt = cand.get("runtime", {})
    if profile is not None:
        if cand["quantization"] not in profile.quantizations:
            why.append(f"{profile.name} accepts {', '.join(profile.quantizations)} only ({profile.accelerator} "
                       f"accelerator), not {cand['quantization']}")
        if cand["size_bytes"] > profile.max_model_mb * 1024 * 1024:
            why.append(f"{cand['size_bytes']:,} B exceeds {profile.name}'s max_model_mb={profile.max_model_mb}")
        support = rt.get("support", {}).get(profile.runtime)
        if support and not support["ok"]:
            why.append(f"{profile.runtime} cannot load it: {support['why']}")
    if rt.get("host_loaded") is False:
        why.append("the host runtime cannot load it")
    return why


def choose(candidates: list[dict[str, Any]], reference: dict[str, Any], *, max_drop: float,
           profile: Any | None) -> dict[str, Any]:
    """Pick the smallest (gzip size = what travels) candidate within budget and constraints.

    Marks every candidate with ``eligible`` and ``rejected`` (reasons); returns the chosen one.
    Ties on size go to the more accurate. Raises when nothing qualifies, listing why.
    """
    if max_drop < 0:
        raise CompressionError(f"--max-accuracy-drop must be >= 0 points, got {max_drop}")
    for c in candidates:
        reasons = [c["collapse"]] if c.get("collapse") else []
        reasons += constraints(c, profile)
        d = drop_points(reference, c)
        c["accuracy_drop_points"] = d
        if d is None:
            reasons.append("no accuracy measured")
        elif d > max_drop:
            reasons.append(f"accuracy drop {d:.2f} points exceeds the budget of {max_drop:g}")
        c["rejected"] = reasons
        c["eligible"] = not reasons
    ok = [c for c in candidates if c["eligible"]]
    if not ok:
        lines = "; ".join(f"{c['label']}: {c['rejected'][0]}" for c in candidates)
        raise CompressionError(f"no variant meets the constraints ({lines})")
    best = min(ok, key=lambda c: (c["gzip_bytes"], -(c.get("accuracy") or 0.0)))
    for c in candidates:
        c["chosen"] = c is best
    return best

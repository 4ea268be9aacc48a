"""Compression figures for the README: quantization, pruning + int8, distillation, measured here.

Two models trained on this machine from scikit-learn's digits (shipped with the package):
* ``digits-cnn``: the demo's small CNN on the 8x8 images (``sdk.demo.train_digits``);
* ``digits32-wide``: a wider CNN (≈ 0.6 M parameters) on the digits upsampled to 32x32.
Every variant goes through ``sdk.compress.compress`` (the code behind ``edgectl compress``):
size, gzip size, top-1 accuracy on the held-out 20 %, host latency (LiteRT, 1 thread, median of
200 invokes) and the TFLite runtime version the variant needs. Then distillation of the digits CNN
into a student with < 1/4 of its parameters. Run: ``.venv/bin/python benchmarks/compression.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from sdk.compress import compress, quiet_native_output
from sdk.demo import train_digits

PRUNE_EPOCHS = 10


def digits_split(size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    if size != 8:
        x = np.kron(x, np.ones((1, size // 8, size // 8), np.float32))
    x_tr, x_te, y_tr, y_te = train_test_split(x[..., None], d.target, test_size=0.2, random_state=0,
                                              stratify=d.target)
    return x_tr, x_te, y_tr.astype(np.int64), y_te.astype(np.int64)


def train_wide(work: Path) -> dict[str, Path]:
    import keras

    x_tr, x_te, y_tr, y_te = digits_split(32)
    with quiet_native_output():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([
            keras.Input((32, 32, 1), name="pixels"),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ])
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr, epochs=12, batch_size=32, verbose=0)
        m.save(work / "wide.keras")
    np.savez(work / "wide-eval.npz", x=x_te, y=y_te)
    np.savez(work / "wide-cal.npz", x=x_tr[:300])
    np.savez(work / "wide-train.npz", x=x_tr, y=y_tr)
    return {"model": work / "wide.keras", "eval": work / "wide-eval.npz", "calibration": work / "wide-cal.npz",
            "train": work / "wide-train.npz"}


def measure(name: str, paths: dict[str, Path], work: Path) -> list[str]:
    rows = []
    runs = [("dynamic", None), ("float16", None), ("int8", None), ("int16x8", None), ("int8", 0.8)]
    ref = None
    for mode, prune in runs:
        t0 = time.perf_counter()
        r = compress(paths["model"], work / f"{name}-{mode}-{prune}.bundle", quantize=mode,
                     calibration=paths["calibration"], eval_data=paths["eval"], name=name, version="bench",
                     prune=prune, train=paths["train"] if prune else None, prune_epochs=PRUNE_EPOCHS).report
        took = time.perf_counter() - t0
        if ref is None:
            ref = r["reference"]
            rows.append(f"| {name} | float32 | {ref['size_bytes']:,} | 1.00 | {ref['gzip_bytes']:,} | 1.00 | "
                        f"{ref['accuracy']:.2%} | – | {ref['latency_ms']['median']:.3f} | "
                        f"{ref['runtime']['min_runtime_version']} | yes | |")
        v = r["variant"]
        extra = f"sparsity {v['pruning']['achieved_sparsity']:.1%}, " if v.get("pruning") else ""
        rows.append(
            f"| {name} | {v['label']} | {v['size_bytes']:,} | {v['size_bytes'] / ref['size_bytes']:.2f} | "
            f"{v['gzip_bytes']:,} | {v['gzip_bytes'] / ref['gzip_bytes']:.3f} | {v['accuracy']:.2%} | "
            f"{(ref['accuracy'] - v['accuracy']) * 100:+.2f} | {v['latency_ms']['median']:.3f} | "
            f"{v['runtime']['min_runtime_version']} | "
            f"{'yes' if v['runtime']['support']['tflite-runtime']['ok'] else 'no'} | {extra}{took:.0f} s |")
        print(rows[-1], flush=True)
    return rows


def distillation(paths: dict[str, Path]) -> str:
    import keras

    from sdk.compression.distill import distill

    x_tr, x_te, y_tr, y_te = digits_split(8)
    with quiet_native_output():
        teacher = keras.models.load_model(paths["model"], compile=False)
        student = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])
        rep = distill(teacher, student, x_tr, y_tr, x_eval=x_te, y_eval=y_te, temperature=4.0, alpha=0.7,
                      epochs=40).report
    return (f"| digits-cnn | {rep['teacher']['params']:,} | {rep['teacher']['accuracy']:.2%} | "
            f"{rep['student_distilled']['params']:,} ({rep['param_ratio']:.1%}) | "
            f"{rep['student_scratch']['accuracy']:.2%} | {rep['student_distilled']['accuracy']:.2%} | "
            f"{rep['retained']:.1%} | {rep['gain_over_scratch'] * 100:+.2f} |")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="edgectl-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        digits = train_digits(work / "digits", epochs=20)
        x_tr, _, y_tr, _ = digits_split(8)
        np.savez(work / "digits-train.npz", x=x_tr, y=y_tr)
        digits = {**digits, "train": work / "digits-train.npz"}
        wide = train_wide(work)
        print(f"trained both models in {time.perf_counter() - t0:.0f} s\n")
        header = ("| model | variant | size B | × f32 | gzip B | gzip × f32 | top-1 | drop (pts) | p50 ms | "
                  "needs runtime ≥ | tflite-runtime 2.14 | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(header)
        rows = measure("digits-cnn", digits, work) + measure("digits32-wide", wide, work)
        print("\n" + header + "\n" + "\n".join(rows))
        print("\n| model | teacher params | teacher top-1 | student params | scratch top-1 | distilled top-1 | "
              "retained | gain (pts) |\n|---|---|---|---|---|---|---|---|")
        print(distillation(digits))


if __name__ == "__main__":
    main()

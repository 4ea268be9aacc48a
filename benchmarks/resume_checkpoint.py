"""What resumable downloads cost: the agent's chunk path with progress recorded every chunk,
every 16 chunks (the default), or never, on this machine's disk.

    .venv/bin/python benchmarks/resume_checkpoint.py [--chunks 256] [--chunk-size 65536] [--dir D]

Drives ``Agent.handle_chunk`` in process (no broker) with real files: each chunk is written with
pwrite; a checkpoint is fsync(.part) + an atomic write of the progress sidecar. Prints the
median and mean time per chunk and the checkpoints taken. ``--dir`` puts the data dir on another
disk (an SD card on a Pi is where this matters).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core import Agent
from agent.slots import DataDir
from sdk.protocol import frames, messages


class NullTransport:
    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        return None

    def start(self, on_connect, on_message) -> None:
        pass

    def subscribe(self, topics, qos=1) -> None:
        pass

    def stop(self, final=None, timeout=5.0) -> None:
        pass


def run(root: Path, chunks: int, chunk_size: int, every: int | None) -> tuple[float, float, int]:
    agent = Agent("bench-1", NullTransport(), DataDir(root), model_factory=lambda b: None)  # type: ignore[arg-type,return-value]
    agent.checkpoint_chunks = every if every is not None else 10**9
    agent.checkpoint_s = math.inf
    sha = "ab" * 32
    agent.handle_desired(messages.Desired("dep-b", sha, chunks * chunk_size, chunk_size, "m", "1").encode())
    payloads = [frames.Chunk(sha, i, chunks, bytes([i % 256]) * chunk_size).encode() for i in range(chunks - 1)]
    saves = 0
    from agent import resume

    real_save = resume.save

    def counting(part, progress):
        nonlocal saves
        saves += 1
        real_save(part, progress)

    resume.save = counting
    times = []
    try:
        for p in payloads:  # the last chunk is left out: it would start verification
            t0 = time.perf_counter()
            agent.handle_chunk(p)
            times.append(time.perf_counter() - t0)
    finally:
        resume.save = real_save
        agent._cancel_download()
    return statistics.median(times) * 1e6, statistics.fmean(times) * 1e6, saves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    print(f"{args.chunks} chunks of {args.chunk_size} B ({args.chunks * args.chunk_size / 2**20:.0f} MiB)")
    print(f"{'progress recorded':<22} {'median µs/chunk':>16} {'mean µs/chunk':>14} {'checkpoints':>12}")
    for label, every in (("never", None), ("every 16 chunks", 16), ("every chunk", 1)):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            med, mean, saves = run(Path(tmp), args.chunks, args.chunk_size, every)
        print(f"{label:<22} {med:>16.0f} {mean:>14.0f} {saves:>12}")


if __name__ == "__main__":
    main()

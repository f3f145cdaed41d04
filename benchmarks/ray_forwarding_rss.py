"""Does a bare Ray actor that forwards calls grow its memory? (the generator pool's soak growth, issue 19)

    .venv/bin/python benchmarks/ray_forwarding_rss.py [--calls 3000] [--shards 2] [--mode refs]

No rl_service code: a `Forwarder` actor calls `Engine.generate.remote(...)` on each of `--shards`
engine actors and hands the driver the object references (`refs`, what `GeneratorPool.generate`
does), or waits for the results and returns them itself (`values`). The driver fetches every result
and drops the refs, as a training step does. The Forwarder's RSS is read through psutil after each
block of calls; growth = least-squares slope over the second half, in bytes per call and in % per
100 calls of the RSS at the half. If `refs` grows and `values` does not, the growth is the owner's
side of Ray's reference counting for refs it handed out, not the caller's code.

The last line is one JSON object: {"mode", "calls", "bytes_per_call", "growth_pct_per_100_calls", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402


@ray.remote
class Engine:
    def generate(self, payload_bytes: int, seed: int, request: bytes = b"") -> bytes:
        # Above Ray's 100 KiB inline limit, a result lives in the object store, as a rollout shard does.
        return np.random.default_rng(seed).bytes(payload_bytes)

    def load(self, weights: list) -> int:
        return len(ray.get(weights[0]))


@ray.remote
class Forwarder:
    def __init__(self, engines, gauge: bool, wait: bool):
        self.engines = engines
        self.pending = []
        self.wait = wait
        self.gauge = None
        if gauge:
            from ray.util.metrics import Gauge

            self.gauge = Gauge("forwarder_queue_depth", "samples queued", tag_keys=("job_name", "engine"))

    def pid(self) -> int:
        return os.getpid()

    def generate_refs(self, payload_bytes: int, seed: int, request: bytes = b""):
        if self.wait and self.pending:   # what GeneratorPool.outstanding_work does before each hand-out
            ready, _ = ray.wait(self.pending, num_returns=len(self.pending), timeout=0, fetch_local=False)
            done = set(ready)
            self.pending = [ref for ref in self.pending if ref not in done]
        # `request`: the call's own argument, split over the engines (a rollout's prompts, inline in each task).
        share = len(request) // len(self.engines)
        refs = [engine.generate.remote(payload_bytes, seed * 1000 + index, request[index * share:(index + 1) * share])
                for index, engine in enumerate(self.engines)]
        if self.wait:
            self.pending.extend(refs)
        if self.gauge is not None:
            for index in range(len(self.engines)):
                self.gauge.set(float(index), tags={"job_name": "probe", "engine": f"generator/{index}"})
        return refs

    def load_weights(self, weights: list) -> list[int]:
        """A borrowed ref passed on to every engine, as GeneratorPool.update_weights does."""
        return ray.get([engine.load.remote(weights) for engine in self.engines])

    def generate_values(self, payload_bytes: int, seed: int, request: bytes = b""):
        return ray.get(self.generate_refs(payload_bytes, seed, request))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--payload-kib", type=int, default=256)
    parser.add_argument("--mode", choices=("refs", "values"), default="refs")
    parser.add_argument("--block", type=int, default=100, help="calls between RSS readings")
    parser.add_argument("--gauge", action="store_true", help="record a ray.util.metrics Gauge per engine per call")
    parser.add_argument("--wait", action="store_true", help="ray.wait(fetch_local=False) on earlier results per call")
    parser.add_argument("--weights", action="store_true", help="also pass a put object's ref through, per call")
    parser.add_argument("--request-kib", type=int, default=0, help="argument bytes per call, split over the engines")
    args = parser.parse_args()

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rayfw"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    engines = [Engine.remote() for _ in range(args.shards)]
    forwarder = Forwarder.remote(engines, args.gauge, args.wait)
    process = psutil.Process(ray.get(forwarder.pid.remote()))
    payload = args.payload_kib * 1024
    request = os.urandom(args.request_kib * 1024)
    readings = []      # (calls done, RSS bytes)
    started = time.perf_counter()
    for call in range(args.calls):
        if args.mode == "refs":
            results = ray.get(ray.get(forwarder.generate_refs.remote(payload, call, request)))
        else:
            results = ray.get(forwarder.generate_values.remote(payload, call, request))
        assert len(results) == args.shards and len(results[0]) == payload
        if args.weights:
            weights = ray.put(np.zeros(payload // 8))
            assert ray.get(forwarder.load_weights.remote([weights])) == [payload // 8] * args.shards
            del weights
        del results
        if (call + 1) % args.block == 0:
            readings.append((call + 1, process.memory_info().rss))
    wall = time.perf_counter() - started
    ray.shutdown()

    calls, rss = np.array(readings, dtype=float).T
    half = calls >= args.calls / 2
    slope = float(np.polyfit(calls[half], rss[half], 1)[0])     # bytes per call
    at_half = float(rss[half][0])
    print(f"machine: {machine()}")
    print(f"ray {ray.__version__}, mode {args.mode}, gauge {args.gauge}, wait {args.wait}, weights {args.weights}, {args.shards} engines, {args.payload_kib} KiB results, "
          f"{args.calls} calls in {wall:.0f} s")
    for count, value in readings[:: max(1, len(readings) // 10)]:
        print(f"  after {int(count):>6} calls: Forwarder RSS {value / 2**20:8.1f} MiB")
    result = {"mode": args.mode, "gauge": args.gauge, "wait": args.wait, "weights": args.weights, "request_kib": args.request_kib, "calls": args.calls, "shards": args.shards, "ray": ray.__version__,
              "rss_half_mib": round(at_half / 2**20, 2), "rss_end_mib": round(float(rss[-1]) / 2**20, 2),
              "bytes_per_call": round(slope, 1), "growth_pct_per_100_calls": round(100 * 100 * slope / at_half, 3),
              "machine": machine()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Does a bare Ray actor that forwards calls grow its memory? (the generator pool's soak growth, issue 19)

    .venv/bin/python benchmarks/ray_forwarding_rss.py [--calls 3000] [--shards 2] [--mode refs]
    .venv/bin/python benchmarks/ray_forwarding_rss.py --calls 800 --shards 1 --payload-kib 64    # the leak

No rl_service code: a `Forwarder` actor calls `Engine.generate.remote(...)` on each of `--shards`
engine actors and hands the driver the object references (`refs`, what `GeneratorPool.generate`
does), or waits for the results and returns them itself (`values`). The driver fetches every result
and drops the refs, as a training step does. The Forwarder's RSS is read through psutil after each
block of calls; growth = least-squares slope over the second half, in bytes per call and in % per
100 calls of the RSS at the half. If `refs` grows and `values` does not, the growth is the owner's
side of Ray's reference counting for refs it handed out, not the caller's code.

The leak (issue 19): a result under Ray's inline limit (`max_direct_call_object_size`, 100 KiB) comes
back to its owner (the Forwarder) inside the task reply and sits in the owner's in-process memory store.
Once the owner hands the ref out (`refs` mode: serialised into its reply; `--ready`: after the value has
arrived; `--no-fetch`: nobody ever reads it) the value is never dropped from that store, though the ref
goes out of scope everywhere: `--payload-kib 64` grows the Forwarder by the whole result per call and
`owner_memory_store` (objects, bytes in the Forwarder's memory store at the end) counts one object per
call. `values` mode (no ref leaves the owner) and results above the limit (the default 256 KiB, stored
in plasma) do not grow. `--engine-max-direct-kib 8` (RAY_max_direct_call_object_size in the engines'
environment: their results go to plasma) is the workaround. A quickstart rollout shard is ~78 KB.

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
    def generate(self, payload_bytes: int, seed: int, request: bytes = b"", delay_s: float = 0.0) -> bytes:
        time.sleep(delay_s)
        # Above Ray's 100 KiB inline limit a result lives in the object store; below it (a quickstart
        # rollout shard, ~78 KB) it comes back inside the task reply into the owner's memory store.
        return np.random.default_rng(seed).bytes(payload_bytes)

    def load(self, weights: list) -> int:
        return len(ray.get(weights[0]))


@ray.remote
class Forwarder:
    def __init__(self, engines, gauge: bool, wait: bool, ready: bool = False, delay_s: float = 0.0):
        self.engines = engines
        self.delay_s = delay_s
        self.ready = ready
        self.pending = []
        self.wait = wait
        self.gauge = None
        if gauge:
            from ray.util.metrics import Gauge

            self.gauge = Gauge("forwarder_queue_depth", "samples queued", tag_keys=("job_name", "engine"))

    def pid(self) -> int:
        return os.getpid()

    def memory_store(self) -> tuple[int, int]:
        """(objects, bytes) in this process's in-memory object store."""
        core_worker = ray._private.worker.global_worker.core_worker
        return core_worker.get_memory_store_size(), core_worker.get_local_memory_store_bytes_used()

    def generate_refs(self, payload_bytes: int, seed: int, request: bytes = b""):
        if self.wait and self.pending:   # what GeneratorPool.outstanding_work does before each hand-out
            ready, _ = ray.wait(self.pending, num_returns=len(self.pending), timeout=0, fetch_local=False)
            done = set(ready)
            self.pending = [ref for ref in self.pending if ref not in done]
        # `request`: the call's own argument, split over the engines (a rollout's prompts, inline in each task).
        share = len(request) // len(self.engines)
        refs = [engine.generate.remote(payload_bytes, seed * 1000 + index, request[index * share:(index + 1) * share], self.delay_s)
                for index, engine in enumerate(self.engines)]
        if self.wait:
            self.pending.extend(refs)
        if self.ready:   # the results have arrived (inline ones are in this process's memory store) before the refs leave
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
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
    parser.add_argument("--ready", action="store_true", help="the Forwarder waits for the results before handing out their refs")
    parser.add_argument("--engine-max-direct-kib", type=int, default=None,
                        help="RAY_max_direct_call_object_size for the engines (KiB): larger results go to plasma")
    parser.add_argument("--engine-delay-s", type=float, default=0.0, help="engine sleeps this long before returning")
    parser.add_argument("--no-fetch", action="store_true", help="refs mode: the driver drops the refs without fetching the results")
    args = parser.parse_args()

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rayfw"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    engine_options = {} if args.engine_max_direct_kib is None else {"runtime_env": {"env_vars": {
        "RAY_max_direct_call_object_size": str(args.engine_max_direct_kib * 1024)}}}
    engines = [Engine.options(**engine_options).remote() for _ in range(args.shards)]
    forwarder = Forwarder.remote(engines, args.gauge, args.wait, args.ready, args.engine_delay_s)
    process = psutil.Process(ray.get(forwarder.pid.remote()))
    payload = args.payload_kib * 1024
    request = os.urandom(args.request_kib * 1024)
    readings = []      # (calls done, RSS bytes)
    started = time.perf_counter()
    for call in range(args.calls):
        if args.mode == "refs" and args.no_fetch:
            refs = ray.get(forwarder.generate_refs.remote(payload, call, request))
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
            results = [b"x" * payload] * len(refs)
            del refs
        elif args.mode == "refs":
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
    store_objects, store_bytes = ray.get(forwarder.memory_store.remote())
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
    result = {"mode": args.mode, "ready": args.ready, "no_fetch": args.no_fetch, "payload_kib": args.payload_kib, "engine_max_direct_kib": args.engine_max_direct_kib, "engine_delay_s": args.engine_delay_s,
              "owner_memory_store": {"objects": store_objects, "bytes": store_bytes}, "gauge": args.gauge, "wait": args.wait, "weights": args.weights, "request_kib": args.request_kib, "calls": args.calls, "shards": args.shards, "ray": ray.__version__,
              "rss_half_mib": round(at_half / 2**20, 2), "rss_end_mib": round(float(rss[-1]) / 2**20, 2),
              "bytes_per_call": round(slope, 1), "growth_pct_per_100_calls": round(100 * 100 * slope / at_half, 3),
              "machine": machine()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

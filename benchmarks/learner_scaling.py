"""Learner step time for 1 and 2 DeepSpeed ranks at ZeRO 0, 2 and 3, on this machine (CPU, gloo).

The same global batch every time: one step's rollouts of the quickstart (16 prompts × 8 samples of
the built-in task, generated once with the HF engine), trained with the quickstart's learner
settings through the production path (`start_learner_group`, `train_step`). The rank count does not
change the update (tests/test_distributed_learner.py); it changes who computes it. The node's
learner threads are shared by the ranks on it (2 cores: 1 rank × 2 threads or 2 ranks × 1 thread).

    .venv/bin/python benchmarks/learner_scaling.py [--steps 6] [--model-million 0]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402


def rollout_of_one_step(model_path: str, prompts: int, samples: int):
    from rl_service.data.arithmetic import make_arithmetic_split
    from rl_service.data.prompts import PromptRecord
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.rollout import GenerationRequest, SamplingParams
    from rl_service.tasks import PromptTokenizer

    engine = HFGenerationEngine(model_path)
    train, _ = make_arithmetic_split(seed=0, num_train=prompts, num_eval=1, levels=[1, 2, 3, 4, 5])
    tokenize = PromptTokenizer(engine.tokenizer, thinking=True)
    requests = [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), samples)
                for k, p in enumerate(train)]
    return engine.generate(requests, SamplingParams(max_new_tokens=64), seed=1)


def step_seconds(config, rollout_ref, count: int, steps: int) -> tuple[float, float]:
    """(median step seconds after one warm-up step, median rank spread)."""
    import ray

    from actors.learner_group import start_learner_group

    group = start_learner_group(config)
    try:
        times, spreads = [], []
        for step in range(steps + 1):
            rewards = [float((k * 5 + step) % 3 == 0) for k in range(count)]
            started = time.perf_counter()
            metrics, _ = ray.get(group.train_step.remote([rollout_ref], rewards))
            if step:
                times.append(time.perf_counter() - started)
                spreads.append(metrics.get("train_seconds_rank_spread", 0.0))
        return statistics.median(times), statistics.median(spreads)
    finally:
        group.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model-million", type=int, default=0, choices=[0, 1, 10, 100],
                        help="0: the built-in model; else a random-weight model of that size (benchmarks/weight_sync.py)")
    args = parser.parse_args()
    import ray

    from actors.process import ACTOR_ENV
    from rl_service.config import load_config

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    print(f"machine: {machine()}")
    scratch = tempfile.TemporaryDirectory()
    model_path = "builtin"
    if args.model_million:
        from benchmarks.weight_sync import build_model

        model_path = str(Path(scratch.name) / "model")
        build_model(args.model_million, Path(model_path))
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": dict(ACTOR_ENV)}, log_to_driver=False)
    rollout = rollout_of_one_step(model_path, prompts=16, samples=8)
    rollout_ref = ray.put(rollout)
    rows = []
    print(f"{'ranks':>5} {'ZeRO':>4} {'step s':>8} {'rank spread s':>13} {'vs 1 rank':>9}")
    for stage in (0, 2, 3):
        one_rank = None
        for ranks in (1, 2):
            config = load_config(REPO / "configs" / "quickstart.yaml", [
                f"model.path={model_path}", "schedule.mode=sync", f"learner.num_ranks={ranks}",
                f"learner.zero_stage={stage}", "learner.num_cpus=0.5"])
            seconds, spread = step_seconds(config, rollout_ref, len(rollout), args.steps)
            one_rank = one_rank or seconds
            rows.append({"ranks": ranks, "zero_stage": stage, "step_seconds": seconds, "rank_spread_seconds": spread,
                         "speedup_vs_1_rank": one_rank / seconds})
            print(f"{ranks:>5} {stage:>4} {seconds:8.3f} {spread:13.4f} {one_rank / seconds:9.2f}", flush=True)
    ray.shutdown()
    print(json.dumps({"machine": machine(), "model": model_path if not args.model_million else f"{args.model_million}M random",
                      "samples_per_step": len(rollout), "rows": rows}))


if __name__ == "__main__":
    main()

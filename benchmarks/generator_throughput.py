"""Generation throughput: the same prompts through (a) a bare vLLM engine in this process, (b) our
GeneratorPool over one GeneratorActor (vLLM) through Ray, (c) the HF `generate` backend and (d) the
`torch` backend (our decode loop over the same HF model), both in this process.

    .venv/bin/python benchmarks/generator_throughput.py [--prompts 64] [--samples 8] [--max-new-tokens 64]
        [--temperature 1.0] [--repeats 3] [--threads N] [--model builtin]

Prompts come from the built-in arithmetic task, chat-formatted as a job formats them. Each backend
is warmed with one call, then timed `--repeats` times (median). (a) and (b) are given the same
seeds (the pool seeds its single shard with `seed * 1_000_003`, the bare engine is called with that
seed), so they sample the same tokens and their ratio is the pool's own overhead: a Ray call to the
pool, the pool's call to the engine, and the driver's `ray.get` of the samples (what a driver pays).
The bare engine is shut down before Ray starts, so (a) and (b) never share the cores; torch and
OpenMP threads are set the same way for every backend (`--threads`, the generator's recipe).
Prints the machine, tokens/s and completions/s of each backend and the ratios; the last line is one
JSON object with `pool_vs_bare_vllm`, `vllm_vs_hf` and the absolute figures. Target: pool ≥ 0.9 × bare.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402



def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads per process (default: all cores)")
    parser.add_argument("--model", default="builtin", help="'builtin' or a local HF causal-LM directory")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def timed_runs(generate, seeds: list[int]) -> dict:
    """Warm once, then time one call per seed; `generate(seed)` returns a list of Rollouts."""
    generate(seeds[0] + 10_000)
    seconds, tokens, completions = [], [], []
    for seed in seeds:
        start = time.perf_counter()
        rollouts = generate(seed)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(rollout.num_completion_tokens for rollout in rollouts))
        completions.append(sum(len(rollout) for rollout in rollouts))
    rates = [t / s for t, s in zip(tokens, seconds)]
    middle = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]   # the median run
    return {"seconds": seconds[middle], "tokens": tokens[middle], "completions": completions[middle],
            "tokens_per_s": rates[middle], "completions_per_s": completions[middle] / seconds[middle],
            "all_tokens": tokens, "all_seconds": [round(s, 4) for s in seconds]}


def main() -> None:
    args = parse_args()
    threads = args.threads or os.cpu_count() or 1
    # The same thread recipe in this process and in the Ray actor (which inherits the environment).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")   # keep the table readable

    from actors.process import configure_process
    from rl_service.config import load_config
    from rl_service.generation.vllm_engine import apply_vllm_env_defaults
    from rl_service.models.loading import load_tokenizer
    from rl_service.rollout import GenerationRequest, SamplingParams
    from rl_service.tasks import PromptTokenizer, load_task

    import torch

    apply_vllm_env_defaults(on_cpu=not torch.cuda.is_available())   # before vLLM is imported anywhere
    cores = os.cpu_count() or 1
    config = load_config(None, [
        f"model.path={args.model}", "generator.backend=vllm", f"cluster.torch_threads={threads}",
        f"cluster.num_cpus={max(4, cores)}", f"data.arithmetic.num_train={args.prompts}", "data.arithmetic.num_eval=1",
        f"generator.max_new_tokens={args.max_new_tokens}", f"generator.temperature={args.temperature}",
        "generator.num_cpus=1", "job_name=generator_throughput"])
    task = load_task(config)
    tokenize = PromptTokenizer(load_tokenizer(config.model.path, config.model.trust_remote_code), config.model.thinking)
    requests = [GenerationRequest(index, record.prompt_id, tokenize(record), args.samples)
                for index, record in enumerate(task.train[:args.prompts])]
    sampling = SamplingParams(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens)
    # Seeds of the timed calls; the pool seeds its one shard (index 0) with seed * 1_000_003.
    seeds = [args.seed + 1 + repeat for repeat in range(args.repeats)]
    prompt_tokens = sum(len(request.prompt_token_ids) for request in requests)
    print(f"machine: {machine()}; torch threads {threads}; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"workload: {len(requests)} prompts ({prompt_tokens / max(len(requests), 1):.0f} tokens each on average) "
          f"× {args.samples} samples, max {args.max_new_tokens} new tokens, temperature {args.temperature}; "
          f"{args.repeats} timed calls per backend after one warm-up (median)", flush=True)
    results = {}

    # (a) the bare vLLM engine, in this process.
    from rl_service.generation.engines import make_engine

    configure_process(threads)
    engine = make_engine(config)
    results["bare_vllm"] = timed_runs(lambda seed: [engine.generate(requests, sampling, seed * 1_000_003)], seeds)
    engine.shutdown()
    engine = None
    gc.collect()
    print(f"(a) bare vLLM done: {results['bare_vllm']['tokens_per_s']:.0f} tokens/s", flush=True)

    # (b) the pool over one GeneratorActor, through Ray; the driver fetches the samples.
    import ray

    from actors.generator import GeneratorActor
    from actors.generator_pool import GeneratorPool
    from rl_service.driver.roles import start_ray

    start_ray(config)
    try:
        actor = GeneratorActor.options(num_cpus=config.generator.num_cpus).remote(config, 0)
        pool = GeneratorPool.options(num_cpus=0.01).remote([actor])
        ray.get([actor.weight_version.remote(), pool.num_engines.remote()])

        def through_pool(seed):
            return ray.get(ray.get(pool.generate.remote(requests, sampling, seed)))

        results["pool_vllm"] = timed_runs(through_pool, seeds)
        ray.get(actor.shutdown.remote())
    finally:
        ray.shutdown()
    print(f"(b) pool (Ray) done: {results['pool_vllm']['tokens_per_s']:.0f} tokens/s", flush=True)

    # (c) the HF reference backend, in this process.
    from rl_service.generation.hf_engine import HFGenerationEngine

    configure_process(threads)
    hf = HFGenerationEngine(config.model.path, config.model.dtype, config.model.trust_remote_code)
    results["hf"] = timed_runs(lambda seed: [hf.generate(requests, sampling, seed * 1_000_003)], seeds)
    hf = None
    gc.collect()

    # (d) our decode loop over the same HF model (the `torch` backend), in this process.
    from rl_service.generation.torch_engine import TorchGenerationEngine

    configure_process(threads)
    loop = TorchGenerationEngine(config.model.path, config.model.dtype, config.model.trust_remote_code)
    results["torch"] = timed_runs(lambda seed: [loop.generate(requests, sampling, seed * 1_000_003)], seeds)
    loop = None
    gc.collect()

    labels = {"bare_vllm": "(a) bare vLLM", "pool_vllm": "(b) pool, 1 engine, Ray", "hf": "(c) HF generate",
              "torch": "(d) torch decode loop"}
    print(f"{'backend':<26}{'s/call':>9}{'tokens/s':>11}{'completions/s':>15}{'tokens':>9}")
    for key, label in labels.items():
        row = results[key]
        print(f"{label:<26}{row['seconds']:>9.3f}{row['tokens_per_s']:>11.0f}{row['completions_per_s']:>15.1f}{row['tokens']:>9}")
    same_samples = results["bare_vllm"]["all_tokens"] == results["pool_vllm"]["all_tokens"]
    pool_vs_bare = results["pool_vllm"]["tokens_per_s"] / results["bare_vllm"]["tokens_per_s"]
    vllm_vs_hf = results["bare_vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    torch_vs_vllm = results["torch"]["completions_per_s"] / results["bare_vllm"]["completions_per_s"]
    print(f"pool / bare vLLM: {pool_vs_bare:.3f} (target >= 0.9; same tokens sampled: {same_samples}); "
          f"vLLM / HF: {vllm_vs_hf:.2f}; torch loop / bare vLLM (completions/s): {torch_vs_vllm:.2f}")
    summary = {"machine": machine(), "threads": threads, "prompts": len(requests), "samples": args.samples,
               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "repeats": args.repeats,
               "pool_vs_bare_vllm": pool_vs_bare, "vllm_vs_hf": vllm_vs_hf, "torch_vs_vllm": torch_vs_vllm,
               "same_samples_bare_and_pool": same_samples}
    for key in labels:
        for field in ("tokens_per_s", "completions_per_s", "seconds", "tokens", "all_seconds"):
            summary[f"{key}_{field}"] = results[key][field]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

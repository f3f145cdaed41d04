"""Weight sync under LoRA (`learner.lora`) vs full weights, side by side in one run (issue 20).

Under LoRA the learner publishes the merged weights W + (alpha / r) B A under the base's names
(rl_service/training/lora.py), so every engine loads a LoRA run exactly as a full-weight one. This
measures what that costs: for random-weight Qwen2 models of about 10M and 100M parameters (the
built-in architecture scaled up, benchmarks/weight_sync.py), 1 HF generator, the object-store and
shared-memory transports, one publication timed from the driver's side as a training step does it
(`WeightSync.publish`: merge, hand over, every engine loaded), best of `--repeats` after a warm-up.
Alongside: the bytes of the adapter alone (what an adapter-only transfer to LoRA-serving vLLM
engines would carry) and the learner's time to merge them (`published_weights()`).

    .venv/bin/python benchmarks/lora_sync.py [--sizes 10 100] [--rank 16] [--repeats 3]

Last line: one JSON object with `lora_vs_full_seconds` (LoRA sync seconds / full sync seconds, the
headline transport: shared_memory at the largest size), `lora_bytes`, `full_bytes`, `adapter_bytes`,
`merge_seconds`, `lora_vs_full_learner_step` and every case.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from benchmarks.weight_sync import SHAPES, build_model, sync_seconds  # noqa: E402


def adapter_bytes_and_merge_seconds(model_dir: Path, overrides: list[str], repeats: int) -> tuple[int, float]:
    """Bytes of the trainable adapter tensors, and the best time to build the merged weights once."""
    import torch

    from rl_service.config import load_config
    from rl_service.models.loading import load_causal_lm
    from rl_service.training.engine import EngineWeights
    from rl_service.training.lora import with_adapters

    config = load_config(None, [f"model.path={model_dir}", *overrides])
    model = with_adapters(load_causal_lm(str(model_dir), "float32"), config.learner.lora)
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    weights = EngineWeights()
    weights.config, weights.engine = config, type("Engine", (), {"module": model})()
    best = math.inf
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            weights.published_weights()
            best = min(best, time.perf_counter() - started)
    return adapter, best


def learner_step_seconds(overrides: list[str], repeats: int) -> float:
    """Best seconds of one GRPO learner step (DeepSpeed, world of one) on the built-in model, on a
    fixed batch of 16 prompts x 8 samples of the arithmetic task; the first step is a warm-up."""
    from rl_service.config import load_config
    from rl_service.data.arithmetic import make_arithmetic_split
    from rl_service.data.prompts import PromptRecord
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.rollout import GenerationRequest, SamplingParams
    from rl_service.tasks import PromptTokenizer
    from rl_service.training.policy_learner import PolicyLearner

    engine = HFGenerationEngine("builtin")
    train, _ = make_arithmetic_split(seed=0, num_train=16, num_eval=1, levels=[1, 2, 3])
    tokenize = PromptTokenizer(engine.tokenizer, thinking=True)
    requests = [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), 8)
                for k, p in enumerate(train)]
    rollout = engine.generate(requests, SamplingParams(max_new_tokens=48), seed=0)
    rewards = [float(k % 3 == 0) for k in range(len(rollout))]   # a spread in every group
    learner = PolicyLearner(load_config(None, ["learner.zero_stage=1", "learner.micro_batch_size=64", *overrides]))
    best = math.inf
    for attempt in range(repeats + 1):
        started = time.perf_counter()
        learner.train_step(rollout, rewards)
        if attempt:
            best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], choices=sorted(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", nargs="+", default=["object_store", "shared_memory"],
                        choices=["object_store", "shared_memory"])
    args = parser.parse_args()
    import ray

    from actors.process import ACTOR_ENV

    lora = [f"learner.lora.rank={args.rank}", f"learner.lora.alpha={2 * args.rank}"]
    print(f"machine: {machine()}")
    print(f"LoRA rank {args.rank}, all linear layers; 1 HF generator; best of {args.repeats} after a warm-up", flush=True)
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": dict(ACTOR_ENV)}, log_to_driver=False)
    step_full = learner_step_seconds([], args.repeats)
    step_lora = learner_step_seconds(lora, args.repeats)
    print(f"learner step, built-in model, 128 samples: full {step_full:.3f} s, LoRA {step_lora:.3f} s "
          f"(ratio {step_lora / step_full:.2f})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for million in args.sizes:
            model_dir = Path(scratch) / f"model_{million}m"
            parameters = build_model(million, model_dir)
            adapter, merge = adapter_bytes_and_merge_seconds(model_dir, lora, args.repeats)
            for transport in args.transports:
                full_s, full_bytes = sync_seconds(model_dir, 1, args.repeats, transport, "hf")
                lora_s, lora_bytes = sync_seconds(model_dir, 1, args.repeats, transport, "hf", tuple(lora))
                rows.append({"parameters": parameters, "transport": transport, "full_seconds": full_s,
                             "lora_seconds": lora_s, "lora_vs_full_seconds": lora_s / full_s, "full_bytes": full_bytes,
                             "lora_bytes": lora_bytes, "adapter_bytes": adapter, "merge_seconds": merge})
                print(f"{parameters / 1e6:7.1f}M params  {transport:13s}  full {full_bytes / 2**20:8.1f} MiB "
                      f"{full_s * 1e3:8.1f} ms   LoRA (merged) {lora_bytes / 2**20:8.1f} MiB {lora_s * 1e3:8.1f} ms   "
                      f"ratio {lora_s / full_s:.2f}   adapter alone {adapter / 2**20:6.2f} MiB "
                      f"({adapter / full_bytes:.1%} of full), merge {merge * 1e3:.1f} ms", flush=True)
    ray.shutdown()
    head = max((row for row in rows if row["transport"] == args.transports[-1]), key=lambda row: row["parameters"])
    print(json.dumps({"lora_vs_full_seconds": round(head["lora_vs_full_seconds"], 4),
                      "lora_seconds": round(head["lora_seconds"], 4), "full_seconds": round(head["full_seconds"], 4),
                      "lora_bytes": head["lora_bytes"], "full_bytes": head["full_bytes"],
                      "adapter_bytes": head["adapter_bytes"], "merge_seconds": round(head["merge_seconds"], 4),
                      "transport": head["transport"], "parameters": head["parameters"], "rank": args.rank,
                      "learner_step_seconds_full": round(step_full, 4), "learner_step_seconds_lora": round(step_lora, 4),
                      "lora_vs_full_learner_step": round(step_lora / step_full, 4),
                      "machine": machine(), "cases": rows}))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()

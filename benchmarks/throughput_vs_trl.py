"""Training throughput of rl_service against TRL's GRPOTrainer on the same job, same machine, one run.

    .venv/bin/python benchmarks/throughput_vs_trl.py [--steps 20] [--config configs/quickstart.yaml]
        [--set k=v ...] [--seed S] [--prompts-per-step P]

Both sides train the built-in model with GRPO on the same prompts, in the same order (our
`PromptSampler`'s batches), with the same token ids, verifier, samples per prompt, completion
limit, sampling, learning rate, clip range, loss aggregation and one optimizer step per batch; every
setting of the TRL side is derived from our job config, so `--set` overrides reach both
(`--set schedule.mode=async` only concerns ours). Each side runs in its own child process, one
after the other (ours first), with the whole machine: ours as configured (Ray, the config's
generator backend, DeepSpeed),
TRL in-process with `torch.set_num_threads(os.cpu_count())` and its default HF `generate` path
(`use_vllm=False`: TRL's vLLM colocate mode needs CUDA). A step is one batch of rollouts and its optimizer step; the first
step of each side is skipped as warm-up. Prints completions/s, tokens/s, their ratio and our step
breakdown; the last line is one JSON object (`ratio_vs_trl` = ours / TRL in completions per second).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import machine  # noqa: E402

PHASES = ("generate", "reward", "statistics", "train", "publish", "driver")


def job_config(args):
    from rl_service.config import load_config

    overrides = [f"steps={args.steps}", "eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
                 "data.eval_limit=8"]  # the before/after evals are outside the timed steps; keep them short
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.prompts_per_step is not None:
        overrides.append(f"data.prompts_per_step={args.prompts_per_step}")
    config = load_config(args.config, overrides + args.overrides)
    if config.algorithm.name != "grpo" or config.learner.mini_batches != 1 or config.learner.ppo_epochs != 1:
        raise SystemExit("the TRL comparison covers GRPO with one optimizer step per batch of rollouts")
    return config


def summarize(step_s: list[float], completions: list[float], tokens: list[float]) -> dict:
    """Throughput over the measured steps: totals over total seconds (= per-batch size / mean step)."""
    seconds = float(np.sum(step_s))
    return {"steps_measured": len(step_s), "step_s": seconds / len(step_s), "wall_s": seconds,
            "completions_per_s": float(np.sum(completions)) / seconds, "tokens_per_s": float(np.sum(tokens)) / seconds,
            "completion_length_mean": float(np.sum(tokens) / np.sum(completions))}


# -- ours ----------------------------------------------------------------------------------------
def run_ours(args) -> dict:
    from rl_service.driver import prepare_job, run_training

    config = job_config(args)
    with tempfile.TemporaryDirectory() as run_dir:
        run_training(prepare_job(config), run_dir)  # Ray is shut down when this returns
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "step_seconds" in row]
    steps = steps[1:] or steps
    result = summarize([r["step_seconds"] for r in steps], [r["completions"] for r in steps],
                       [r["completion_tokens"] for r in steps])
    step_s = result["step_s"]
    for phase in PHASES:
        seconds = float(np.mean([row.get(f"time_{phase}_s", 0.0) for row in steps]))
        result[f"{phase}_s"], result[f"{phase}_share"] = seconds, seconds / step_s
    result["reward_mean"] = float(np.mean([row["reward_mean"] for row in steps]))
    result["schedule"] = config.schedule.mode
    result["generator_backend"] = config.generator.backend
    return result


# -- TRL -----------------------------------------------------------------------------------------
def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl_service.data.sampler import PromptSampler
    from rl_service.models.loading import load_causal_lm, load_tokenizer, render_prompt, resolve_model_dir
    from rl_service.rewards.verifiers import score_batch
    from rl_service.tasks import PromptTokenizer, load_task

    torch.set_num_threads(os.cpu_count())
    config = job_config(args)
    gen, learner, algorithm = config.generator, config.learner, config.algorithm
    task = load_task(config)
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    prompt_tokens = PromptTokenizer(tokenizer, config.model.thinking)
    # Our sampler's batches in order; TRL walks an unshuffled dataset in order, one batch per step.
    sampler = PromptSampler(len(task.train), config.data.prompts_per_step, config.seed)
    records = [task.train[i] for _ in range(config.steps) for i in sampler.next_batch()]
    # Prompts go in already chat-templated: plain strings are not "conversational" to TRL, so it
    # tokenizes them as they are (no second template); checked against our token ids below.
    texts = [render_prompt(tokenizer, r.prompt, config.model.thinking) for r in records]
    dataset = Dataset.from_list([{"prompt": t, "answer": r.answer} for t, r in zip(texts, records)])

    eos = tokenizer.eos_token_id
    token_counts: list[int] = []

    def verifier_reward(completion_ids, answer, **_):
        # Decode as our generators do (special tokens kept, the final EOS dropped): TRL's own
        # `completions` skip special tokens. Also counts completion tokens (EOS included, as ours).
        token_counts.append(sum(len(ids) for ids in completion_ids))
        texts = [tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids, skip_special_tokens=False)
                 for ids in completion_ids]
        return score_batch(texts, answer, task.verifier, config.reward.timeout_s)

    completions_per_step = config.data.prompts_per_step * gen.samples_per_prompt
    micro = min(learner.micro_batch_size, completions_per_step)
    if completions_per_step % micro:
        raise SystemExit(f"{completions_per_step} completions per step do not split into micro-batches of {micro}")
    output_dir = tempfile.mkdtemp(prefix="trl_bench_")
    trl_args = GRPOConfig(
        output_dir=output_dir, seed=config.seed, max_steps=config.steps, use_cpu=True, bf16=False, fp16=False,
        # One generation batch (prompts_per_step × samples) = one optimizer step of `micro`-sized
        # micro-batches, as our learner does it (steps_per_generation defaults to the accumulation).
        per_device_train_batch_size=micro, gradient_accumulation_steps=completions_per_step // micro,
        num_generations=gen.samples_per_prompt, num_iterations=1, shuffle_dataset=False,
        max_completion_length=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, top_k=0,
        learning_rate=learner.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=learner.warmup_steps,
        weight_decay=learner.weight_decay, adam_beta1=learner.adam_betas[0], adam_beta2=learner.adam_betas[1],
        max_grad_norm=learner.grad_clip, beta=algorithm.kl_coef, epsilon=algorithm.clip_low,
        epsilon_high=algorithm.clip_high, scale_rewards="group" if algorithm.scale_rewards else "none",
        # dapo = token mean over the whole accumulated batch (our token_mean); grpo = per-sequence mean.
        loss_type="dapo" if algorithm.aggregation == "token_mean" else "grpo",
        gradient_checkpointing=False,  # TRL defaults it on; ours does not recompute activations
        use_vllm=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    model = load_causal_lm(str(resolve_model_dir(config.model.path)), "float32", config.model.trust_remote_code)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.logs = [], [], []

        def on_step_begin(self, *_, **__):
            self.begin.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.end.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.logs.append(logs)

    times = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=[verifier_reward], args=trl_args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[times])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict (disable_tqdm swaps it in)
    # TRL's own prompt tokenization (private, but the exact path it generates from) against ours.
    trl_ids, _, _ = trainer._tokenize_prompts(texts[:8])
    if [list(ids) for ids in trl_ids] != [prompt_tokens(r) for r in records[:8]]:
        raise SystemExit("TRL tokenizes the prompts differently from rl_service")
    loop_started = time.perf_counter()
    trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)  # save_strategy="no": nothing in it worth keeping
    # A step = everything from one optimizer step's end to the next (data, generation, reward,
    # micro-batches, optimizer, logging); step 1 runs from the loop's start and is warm-up.
    ends = [loop_started, *times.end]
    step_s = list(np.diff(ends))[1:]
    lengths = [log["completions/mean_length"] for log in times.logs][1:]
    result = summarize(step_s, [completions_per_step] * len(step_s), [n * completions_per_step for n in lengths])
    result["step_s_begin_to_end"] = float(np.mean(np.subtract(times.end, times.begin)[1:]))
    if abs(np.sum(token_counts[1:]) - np.sum(lengths) * completions_per_step) > 0.01 * np.sum(token_counts[1:]):
        print("warning: TRL's logged completion lengths disagree with the tokens its reward saw", file=sys.stderr)
    result["reward_mean"] = float(np.mean([log["reward"] for log in times.logs][1:]))
    result["version"] = trl.__version__
    return result


# -- both ----------------------------------------------------------------------------------------
def run_side(side: str, argv: list[str]) -> dict:
    """One side in a fresh process: no Ray workers, thread settings or env vars leak into the other."""
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, *argv]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its stderr (logs) passes through
    if done.returncode != 0:
        sys.stdout.write(done.stdout)
        raise SystemExit(f"the {side} side failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--prompts-per-step", type=int, default=None, help="both sides (quicker smoke runs)")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # internal: one side's child
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of each side is warm-up)")
    if args.side:
        print(json.dumps(run_ours(args) if args.side == "ours" else run_trl(args)))
        return

    argv = sys.argv[1:]
    config = job_config(args)
    per_step = config.data.prompts_per_step * config.generator.samples_per_prompt
    ours, trl = run_side("ours", argv), run_side("trl", argv)
    print(f"machine: {machine()}")
    print(f"job: {config.data.prompts_per_step} prompts x {config.generator.samples_per_prompt} samples = {per_step} "
          f"completions/step, <= {config.generator.max_new_tokens} new tokens, {args.steps} steps (first skipped)")
    print(f"{'side':<26}{'s/step':>8}{'compl/s':>9}{'tok/s':>9}{'mean len':>10}{'reward':>8}{'wall s':>8}")
    for name, side in ((f"TRL {trl['version']} (HF generate)", trl), (f"rl_service ({ours['schedule']}, {ours['generator_backend']})", ours)):
        print(f"{name:<26}{side['step_s']:>8.3f}{side['completions_per_s']:>9.1f}{side['tokens_per_s']:>9.0f}"
              f"{side['completion_length_mean']:>10.1f}{side['reward_mean']:>8.3f}{side['wall_s']:>8.1f}")
    ratio = ours["completions_per_s"] / trl["completions_per_s"]
    token_ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    print(f"ours / TRL: {ratio:.2f}x completions/s, {token_ratio:.2f}x tokens/s")
    print("TRL ran use_vllm=False (its HF generate path); TRL's vLLM colocate mode needs CUDA.")
    print(f"our step breakdown:\n{'phase':<12}{'s/step':>10}{'share':>9}")
    for phase in PHASES:
        print(f"{phase:<12}{ours[f'{phase}_s']:>10.4f}{ours[f'{phase}_share']:>9.1%}")
    result = {"machine": machine(), "steps": args.steps, "steps_measured": ours["steps_measured"],
              "completions_per_step": per_step, "max_new_tokens": config.generator.max_new_tokens,
              "schedule": ours["schedule"], "generator_backend": ours["generator_backend"], "trl_version": trl["version"], "trl_generation": "hf_generate",
              "ratio_vs_trl": ratio, "tokens_ratio_vs_trl": token_ratio,
              "trl_completions_per_s": trl["completions_per_s"], "ours_completions_per_s": ours["completions_per_s"],
              "trl_tokens_per_s": trl["tokens_per_s"], "ours_tokens_per_s": ours["tokens_per_s"],
              "trl_step_s": trl["step_s"], "ours_step_s": ours["step_s"],
              "trl_step_s_begin_to_end": trl["step_s_begin_to_end"],
              "trl_wall_s": trl["wall_s"], "ours_wall_s": ours["wall_s"],
              "trl_completion_length_mean": trl["completion_length_mean"],
              "ours_completion_length_mean": ours["completion_length_mean"],
              "trl_reward_mean": trl["reward_mean"], "ours_reward_mean": ours["reward_mean"],
              **{f"ours_{phase}_share": ours[f"{phase}_share"] for phase in PHASES}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

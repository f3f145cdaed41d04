#!/usr/bin/env python
"""Build the built-in model: tokenizer + tiny Qwen2 pre-trained on synthetic arithmetic.

Why a script and not just shipped weights: the checkpoint must be reproducible (same --seed ->
same bytes on CPU) and its accuracy deliberately *middling* (40–55% greedy on the held-out set),
so that RL has visible headroom in minutes on two cores. SFT is therefore stopped at the first
evaluation that lands in the band, not trained to convergence.

    .venv/bin/python scripts/build_builtin_model.py [--seed 0] [--out rl_service/models/builtin]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rl_service.data.arithmetic import (  # noqa: E402
    LEVELS,
    format_completion,
    is_correct,
    make_arithmetic_split,
    make_problem,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]

# Qwen3-style: the empty think block after the generation prompt is how thinking is switched off.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

EVAL_SEED, EVAL_SIZE = 1234, 256
ALL_LEVELS = sorted(LEVELS)


def prompt_text(question: str, thinking: bool) -> str:
    """What CHAT_TEMPLATE renders for one user message (checked against it in build_tokenizer)."""
    p = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return p if thinking else p + "<think>\n\n</think>\n\n"


def build_tokenizer(seed: int):
    """Byte-level BPE with every digit its own token.

    Splitting digits keeps column arithmetic learnable: a merged "47" token would hide the
    digits the traces operate on. The consequence is a small vocab (~300): once digits are
    isolated, the task text has few other frequent pairs left to merge.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Newline runs are isolated so no token spans the prompt/completion boundary: with thinking
    # off the prompt ends in "\n\n" and the answer may start with "-"; a "\n\n-" token would
    # make prompt+completion tokenize differently from prompt, then completion.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
         pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # Registered before training so the trainer splits the corpus on them and never learns
    # merges across a tag. <think> tags are not special, as in Qwen3: decoding with
    # skip_special_tokens=True must keep them so the reward can find the last </think>.
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    trainer = trainers.BpeTrainer(
        vocab_size=512, min_frequency=2, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = random.Random(f"tokenizer-{seed}")
    corpus = []
    for i in range(4000):
        q, a, t = make_problem(rng, ALL_LEVELS[i % len(ALL_LEVELS)])
        think = i % 5 != 0
        corpus.append(prompt_text(q, think) + format_completion(t, a, think) + "<|im_end|>\n")
    tok.train_from_iterator(corpus, trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, model_max_length=256, clean_up_tokenization_spaces=False,
    )
    msgs = [{"role": "user", "content": "What is 1 + 2?"}]
    for think in (True, False):
        got = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                     enable_thinking=think)
        assert got == prompt_text("What is 1 + 2?", think), got
    for t in SPECIAL + THINK:
        assert len(tok.encode(t).ids) == 1, t
    return hf


def build_model(tokenizer, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64,  # vLLM CPU attention needs 64
        max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="float32", use_cache=True,
    )
    return Qwen2ForCausalLM(cfg)


def is_fact(question: str) -> bool:
    """Single-digit operands only ("What is 7 * 8?"): a finite table, learnt by heart."""
    a, _, b = question.removeprefix("What is ").rstrip("?").split()
    return abs(int(a)) < 10 and abs(int(b)) < 10


class Batcher:
    """Fresh SFT examples drawn on the fly, so the model never sees the same stream twice.

    Held-out eval questions are excluded, except the single-digit fact tables (levels 1 and
    3's 1x1): those are finite, there is nothing to generalise from, and a model that has never
    seen "7*8" cannot know it.
    """

    def __init__(self, tok, seed: int, exclude: set[str], think_frac: float = 0.8):
        self.tok, self.exclude, self.think_frac = tok, exclude, think_frac
        self.rng = random.Random(f"sft-{seed}")
        self.backend = tok.backend_tokenizer
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id

    def _draw(self):
        while True:
            q, a, t = make_problem(self.rng, self.rng.choice(ALL_LEVELS))
            if q not in self.exclude:
                return q, a, t

    def __call__(self, n: int):
        # evaluate() pads batches through the same fast tokenizer, which turns padding on in its
        # backend for good: without this, prompts and completions here would come back padded to
        # the batch's longest, and the model would learn to emit pad tokens before its answer.
        self.backend.no_padding()
        self.backend.no_truncation()
        prompts, comps = [], []
        for _ in range(n):
            q, a, t = self._draw()
            think = self.rng.random() < self.think_frac
            prompts.append(prompt_text(q, think))
            comps.append(format_completion(t, a, think))
        p_ids = [e.ids for e in self.backend.encode_batch(prompts, add_special_tokens=False)]
        c_ids = [e.ids for e in self.backend.encode_batch(comps, add_special_tokens=False)]
        seqs = [p + c + [self.eos] for p, c in zip(p_ids, c_ids)]
        width = max(map(len, seqs))
        # Right padding and no attention mask: under the causal mask trailing pads cannot affect
        # real tokens, and their labels are ignored, so the faster is_causal SDPA path is exact.
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        for i, (p, s) in enumerate(zip(p_ids, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, len(p): len(s)] = torch.tensor(s[len(p):])
        return ids, labels


@torch.no_grad()
def evaluate(model, tok, problems, max_new_tokens: int = 64, batch: int = 128):
    """Greedy, thinking on, batched with left padding; returns (acc per level, overall, lengths)."""
    model.eval()
    tok.padding_side = "left"
    hits: dict[int, list[int]] = {}
    lengths: list[int] = []
    for s in range(0, len(problems), batch):
        chunk = problems[s: s + batch]
        enc = tok([prompt_text(p.question, True) for p in chunk], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        for p, row in zip(chunk, gen.tolist()):
            n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            lengths.append(n)
            # Special tokens kept, as the service's verifier sees them: a stray pad is a miss.
            text = tok.decode(row[:n], skip_special_tokens=False)
            hits.setdefault(p.level, []).append(int(is_correct(text, p.answer)))
    model.train()
    per_level = {lv: sum(h) / len(h) for lv, h in sorted(hits.items())}
    overall = sum(sum(h) for h in hits.values()) / len(problems)
    return per_level, overall, lengths


def lr_at(step: int, lr: float, warmup: int) -> float:
    # Constant after warmup: the stop point is decided by accuracy, not by a schedule's end.
    return lr * min(1.0, (step + 1) / warmup)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "rl_service" / "models" / "builtin")
    ap.add_argument("--band", type=float, nargs=2, default=(0.40, 0.55), metavar=("LOW", "HIGH"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=5000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    low, high = args.band

    tok = build_tokenizer(args.seed)
    model = build_model(tok, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, params {n_params:,}", flush=True)

    _, eval_set = make_arithmetic_split(EVAL_SEED, 0, EVAL_SIZE, ALL_LEVELS)
    exclude = {p.question for p in eval_set if not is_fact(p.question)}
    batcher = Batcher(tok, args.seed, exclude)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                            weight_decay=0.01)
    history, step, per_level, overall, lengths = [], 0, {}, 0.0, []
    next_eval = args.eval_every
    model.train()
    while step < args.max_steps:
        ids, labels = batcher(args.batch_size)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == next_eval:
            per_level, overall, lengths = evaluate(model, tok, eval_set)
            history.append({"step": step, "loss": round(loss.item(), 4),
                            "acc": round(overall, 4), "t": round(time.time() - t0, 1)})
            print(f"step {step} loss {loss.item():.3f} acc {overall:.3f} "
                  f"{ {k: round(v, 2) for k, v in per_level.items()} } {time.time() - t0:.0f}s",
                  flush=True)
            if overall >= low:
                break
            # Close to the band, evaluate more often so the stop does not overshoot it.
            next_eval = step + (args.eval_every if overall < low - 0.12 else max(1, args.eval_every // 5))
    wall = time.time() - t0
    in_band = low <= overall <= high

    from transformers import GenerationConfig

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_new_tokens=64,  # HF's default max_length=20 would cut completions short
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tok.padding_side = "right"
    tok.save_pretrained(args.out)
    info = {
        "seed": args.seed, "steps": step, "wall_seconds": round(wall, 1), "threads": args.threads,
        "batch_size": args.batch_size, "lr": args.lr, "params": n_params, "vocab_size": len(tok),
        "eval": {"seed": EVAL_SEED, "num_eval": EVAL_SIZE, "levels": ALL_LEVELS,
                 "mode": "greedy, thinking on"},
        "accuracy": {"overall": round(overall, 4), **{str(k): round(v, 4) for k, v in per_level.items()}},
        "completion_tokens": {"mean": round(sum(lengths) / max(1, len(lengths)), 1),
                              "max": max(lengths, default=0)},
        "band": [low, high], "in_band": in_band, "history": history,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("steps", "wall_seconds", "accuracy", "completion_tokens")}))
    if not in_band:
        print(f"WARNING: accuracy {overall:.3f} outside band [{low}, {high}]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reward-model backend: score (prompt, completion) texts with a local Hugging Face sequence classifier.

Ranks BVPO's pairs when `preference.reward_source` is `reward_model` (ALGORITHMS.md §BVPO.1: "ranked
by the reward (verifier or reward model)"). Any `AutoModelForSequenceClassification` directory loads,
safetensors only and without remote code: a model directory is user input, and a pickle file or
custom modelling code could run arbitrary Python.

The score of a text is the classifier's logit when it has one label, else the log-probability of
its last label (the usual "positive" class). Like the verifiers, the model sees the final answer —
the completion after its last `</think>` — not the trace: BVPO's objective is the answer marginal
π(y|x) (§BVPO.1), and the two modes' responses are then judged on the same thing. With a chat
template the text is the (user, assistant) conversation, else ``prompt + "\\n" + answer``.

:func:`check_reward_model_dir` refuses, before Ray starts, a directory that is not a trained
classifier: transformers loads a causal-LM checkpoint (or one whose head was not saved) into
``AutoModelForSequenceClassification`` with a randomly initialised head and only a log line, and
the pairs would then be ranked by noise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rl_service.errors import ModelLoadError
from rl_service.models.loading import _read_json, _reason, _safetensors_shapes, resolve_model_dir
from rl_service.rewards.verifiers import final_answer_text

_CLASSIFIER_SUFFIX = "ForSequenceClassification"


def check_reward_model_dir(path: str | Path | None, source: str = "preference.reward_model_path") -> Path:
    """The directory of a trained sequence classifier, or a ModelLoadError naming `source`: config.json's
    `architectures` name a *ForSequenceClassification class and the safetensors headers hold the
    tensors of that class's head (`score.weight` for Llama/Qwen-style models). Reads only config.json
    and the headers; the class is built on the meta device to learn its head's names."""
    if path is None:
        raise ModelLoadError(f"{source}: not set; preference.reward_source=reward_model needs a local "
                             "sequence-classification model directory")
    directory = resolve_model_dir(path, source, allow_builtin=False, trust_remote_code=False)
    config_json = _read_json(directory / "config.json", source)
    architectures = config_json.get("architectures") if isinstance(config_json, dict) else None
    if architectures and not any(str(name).endswith(_CLASSIFIER_SUFFIX) for name in architectures):
        raise ModelLoadError(f"{source}: {directory} is a {', '.join(map(str, architectures))} checkpoint, not a reward "
                             f"model: config.json's architectures must name a *{_CLASSIFIER_SUFFIX} class (its score "
                             "head would be initialised at random)")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - what transformers says about the config is the user's to see
        raise ModelLoadError(f"{source}: {directory}/config.json does not build a sequence classifier "
                             f"({_reason(exc)})") from None
    # The head is what lies outside the base model (`model.` for Qwen2: `score.weight`; `bert.` for BERT: `classifier.*`).
    prefix = f"{model.base_model_prefix}."
    head = [name for name in model.state_dict() if not name.startswith(prefix)]
    stored = {name for file in sorted(directory.glob("*.safetensors")) for name in _safetensors_shapes(file)}
    missing = [name for name in head if name not in stored]
    if missing:
        raise ModelLoadError(f"{source}: {directory} holds no {', '.join(missing)}, the classification head of "
                             f"{type(model).__name__} (a causal-LM or base-model checkpoint?): it would be "
                             "initialised at random")
    return directory


class RewardModelScorer:
    """Batched scores from a local sequence-classification model (eval mode, no gradients).

    Args:
        path: the model directory.
        batch_size: texts per forward pass.
        max_length: longest text in tokens; longer ones keep their end (where the answer is).
        source: the config field named in errors.
    """

    def __init__(self, path: str | Path, batch_size: int = 32, max_length: int = 512,
                 source: str = "preference.reward_model_path"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

        from rl_service.models.loading import _GENERIC_TOKENIZER_CLASSES, _saved_tokenizer_class

        directory = check_reward_model_dir(path, source)
        # A bare tokenizer.json loads as saved (see models/loading.py: AutoTokenizer would rebuild it).
        tokenizer_class = (PreTrainedTokenizerFast if _saved_tokenizer_class(directory) in _GENERIC_TOKENIZER_CLASSES
                           else AutoTokenizer)
        try:
            self.tokenizer = tokenizer_class.from_pretrained(str(directory), local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(directory), use_safetensors=True, trust_remote_code=False, local_files_only=True).eval()
        except Exception as exc:
            raise ModelLoadError(f"{source}: cannot load a sequence-classification model from {directory} ({exc})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.tokenizer.pad_token_id is None:
            raise ModelLoadError(f"{source}: the tokenizer in {directory} has no pad, eos or unk token to pad batches with")
        # The classifier reads the last non-pad token of each row: it must know the pad id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.batch_size = batch_size
        self.max_length = max_length

    def format(self, prompt: str, completion: str) -> str:
        answer = final_answer_text(completion)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n{answer}"

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One float per (prompt, completion), in order; padding does not change a score."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        texts = [self.format(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False, return_tensors="pt")
            logits = self.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.float()
            if logits.shape[-1] == 1:
                batch_scores = logits[:, 0]
            else:
                batch_scores = torch.log_softmax(logits, dim=-1)[:, -1]
            scores.extend(float(value) for value in batch_scores)
        return scores

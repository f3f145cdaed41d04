"""The shipped model and tokenizer, as every role loads them."""
from __future__ import annotations

import json

from tokenizers import Tokenizer

from rl_service.data.arithmetic import make_arithmetic_split
from rl_service.models.loading import BUILTIN_MODEL_DIR, load_tokenizer, render_prompt


def test_loaded_tokenizer_tokenizes_exactly_as_its_tokenizer_json():
    """transformers may swap in a model-specific tokenizer class with its own pre-tokenizer; the
    model was trained on tokenizer.json's ids, so those are the reference."""
    reference = Tokenizer.from_file(str(BUILTIN_MODEL_DIR / "tokenizer.json"))
    tokenizer = load_tokenizer("builtin")
    train, _ = make_arithmetic_split(seed=3, num_train=50, num_eval=0, levels=[1, 2, 3, 4, 5])
    for problem in train:
        for thinking in (True, False):
            text = render_prompt(tokenizer, problem.question, thinking)
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == \
                reference.encode(text, add_special_tokens=False).ids, text


def test_chat_template_switches_reasoning_off_with_an_empty_think_block():
    tokenizer = load_tokenizer("builtin")
    on, off = (render_prompt(tokenizer, "What is 1 + 2?", thinking) for thinking in (True, False))
    assert on.endswith("<|im_start|>assistant\n") and off == on + "<think>\n\n</think>\n\n"


def test_greedy_completions_are_clean_and_accuracy_is_middling():
    """No pad tokens inside completions (the model once learnt to emit them from padded SFT
    batches), and the shipped accuracy leaves RL room to climb (build band 40-55%)."""
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.rollout import GenerationRequest, SamplingParams
    from rl_service.tasks import PromptTokenizer
    from rl_service.data.prompts import PromptRecord

    engine = HFGenerationEngine("builtin")
    _, evaluation = make_arithmetic_split(seed=0, num_train=0, num_eval=40, levels=[1, 2, 3, 4, 5])
    tokenize = PromptTokenizer(engine.tokenizer, thinking=True)
    requests = [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), 1)
                for k, p in enumerate(evaluation)]
    rollout = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=64), seed=0)
    for tokens in rollout.completion_token_ids:
        assert engine.pad_token_id not in tokens
        assert engine.tokenizer.convert_ids_to_tokens(tokens[0]) == "<think>"
    info = json.loads((BUILTIN_MODEL_DIR / "build_info.json").read_text())
    assert info["in_band"] and 0.40 <= info["accuracy"]["overall"] <= 0.55

"""The reward-model backend (ALGORITHMS.md §BVPO.1 ranking): a tiny sequence classifier built here, saved as
safetensors, scored in batches; and behind the RewardActor's existing `score` interface."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rl_service.errors import ModelLoadError
from rl_service.rewards.reward_model import RewardModelScorer

BUILTIN = Path(__file__).resolve().parents[1] / "rl_service" / "models" / "builtin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROMPTS = ["What is 3 + 4?", "What is 12 * 3?", "What is 9 - 5?", "What is 100 + 1?", "What is 7 * 8?"]
COMPLETIONS = ["<think>\n3+4=7. So 7.\n</think>\n\n7", "36", "<think>\nlong wrong trace, 9-5=3\n</think>\n\n3",
               "101", "<think>\n7*8=56. So 56.\n</think>\n\n56"]


def _tiny_classifier(directory: Path, num_labels: int = 1, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=308, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_labels=num_labels,
                         pad_token_id=0, max_position_embeddings=256)
    model = Qwen2ForSequenceClassification(config).eval()
    with torch.no_grad():  # a score head far from zero, so scores differ clearly between texts
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(BUILTIN / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _tiny_classifier(tmp_path_factory.mktemp("reward_model"))


def test_batched_scores_equal_one_by_one(model_dir):
    scorer = RewardModelScorer(model_dir, batch_size=4)
    batched = scorer.score(PROMPTS, COMPLETIONS)
    single = [RewardModelScorer(model_dir, batch_size=1).score([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert len(batched) == len(PROMPTS)
    assert batched == pytest.approx(single, abs=1e-5)            # padding never changes a score
    assert len({round(score, 4) for score in batched}) == len(batched)


def test_score_is_the_classifier_logit_of_the_final_answer(model_dir):
    from transformers import AutoModelForSequenceClassification

    scorer = RewardModelScorer(model_dir)
    text = scorer.format(PROMPTS[0], COMPLETIONS[0])
    assert "<think>" not in text and text.endswith("<|im_start|>assistant\n7<|im_end|>\n")
    ids = scorer.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    with torch.no_grad():
        expected = float(model(input_ids=ids).logits[0, 0])
    assert scorer.score(PROMPTS[:1], COMPLETIONS[:1])[0] == pytest.approx(expected, abs=1e-5)
    # Only the answer is judged: another trace with the same answer scores the same.
    assert scorer.score([PROMPTS[0]], ["<think>\nother\n</think>\n\n7"]) == pytest.approx(scorer.score([PROMPTS[0]], ["7"]))


def test_multi_label_classifier_scores_the_last_label_log_probability(tmp_path):
    scorer = RewardModelScorer(_tiny_classifier(tmp_path / "two", num_labels=2))
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert all(score <= 0.0 for score in scores)


def test_unsafe_or_missing_model_dirs_are_user_errors(tmp_path, model_dir):
    with pytest.raises(ModelLoadError, match="preference.reward_model_path: .* is not a directory"):
        RewardModelScorer(tmp_path / "nowhere")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(model_dir / "config.json", pickled / "config.json")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        RewardModelScorer(pickled)


def test_reward_actor_scores_with_the_reward_model_behind_the_same_interface(model_dir):
    import ray

    from actors.reward import RewardActor
    from rl_service.rollout import Rollout

    rollout = Rollout(request_index=[0, 0, 1], prompt_token_ids=[[1], [1], [2]],
                      completion_token_ids=[[5], [6], [7]], behaviour_logprobs=[None] * 3,
                      completion_texts=[COMPLETIONS[0], "8", COMPLETIONS[1]], finished=[True] * 3, weight_versions=[0] * 3)
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        actor = RewardActor.remote("integer", 5.0, None, str(model_dir), 2)
        answers = ["7", "36"]
        by_model = ray.get(actor.score.remote([ray.put(rollout)], answers, PROMPTS[:2]))
        by_verifier = ray.get(actor.score.remote([ray.put(rollout)], answers))
    finally:
        ray.shutdown()
    expected = RewardModelScorer(model_dir).score([PROMPTS[0], PROMPTS[0], PROMPTS[1]], rollout.completion_texts)
    assert by_model["rewards"] == pytest.approx(expected, abs=1e-5)
    assert by_verifier["rewards"] == [1.0, 0.0, 1.0]
    assert by_model["request_index"] == [0, 0, 1]

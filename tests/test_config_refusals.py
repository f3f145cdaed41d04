"""Settings a job would not read are refused at load, naming the field and why (README: "a setting
the chosen algorithm would ignore is refused"); defaults written out and the shipped configs pass."""
from __future__ import annotations

from pathlib import Path

import pytest

from rl_service.config import load_config
from rl_service.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.mark.parametrize("config, overrides, expected", [
    # A GRPO job never reads the preference section: an offline DPO job meant here trained GRPO.
    ("quickstart.yaml", ["preference.mode=offline", "preference.dataset_path=/nonexist.jsonl"],
     "preference.mode applies to dpo and bvpo jobs; algorithm.name 'grpo'"),
    # A preference job starts no statistics role: no allocation happens.
    ("dpo.yaml", ["statistics.allocation=gvm"], "statistics.allocation applies to grpo and raft++ jobs; the dpo loop"),
    ("dpo.yaml", ["preference.alpha=0.3"], "preference.alpha (0.3) applies to bvpo"),
    ("bvpo.yaml", ["preference.alpha_ema=0.5"], "preference.alpha_ema applies to preference.alpha_mode 'online'"),
    ("bvpo.yaml", ["preference.alpha_mode=online", "preference.alpha=0.2"],
     "preference.alpha (0.2) is not read with preference.alpha_mode 'online'"),
    # Without eval.samples evaluation is greedy: eval.temperature / top_p are never read.
    ("quickstart.yaml", ["eval.temperature=0.5"], "eval.temperature applies to the sampled evaluation"),
    ("quickstart.yaml", ["eval.top_p=0.9"], "eval.top_p applies to the sampled evaluation"),
])
def test_a_setting_the_job_ignores_is_refused(config, overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / config, overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("config, overrides", [
    ("dpo.yaml", ["preference.alpha=1.0"]),            # the value dpo uses (configs/dpo.yaml writes it)
    ("quickstart.yaml", ["preference.beta=0.1"]),      # a default written out changes nothing
    ("dpo.yaml", ["statistics.allocation=uniform"]),
    ("quickstart.yaml", ["eval.samples=4", "eval.temperature=0.5"]),
    ("bvpo.yaml", ["preference.alpha_mode=online", "preference.alpha_ema=0.5"]),
])
def test_settings_that_are_read_or_default_pass(config, overrides):
    load_config(CONFIGS / config, overrides)


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(config):
    load_config(CONFIGS / config)


def test_a_custom_reward_whose_neighbour_module_is_hidden_is_told_to_list_it(tmp_path, monkeypatch):
    from rl_service.errors import UserError
    from rl_service.rewards.custom import check_custom_reward, custom_reward_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "helpers.py").write_text("def score(completion, answer):\n    return 1.0\n")
    (tmp_path / "my_reward.py").write_text("import helpers\n\n\ndef reward(completion, answer):\n"
                                           "    return helpers.score(completion, answer)\n")
    config = load_config(CONFIGS / "quickstart.yaml", ["reward.custom=my_reward.py:reward"])
    with pytest.raises(UserError) as error:
        check_custom_reward(custom_reward_spec(config.reward))
    assert str(error.value).endswith("No module named 'helpers' (a module beside the reward file is importable only "
                                     "when listed in reward.custom_readable: add helpers.py)")
    # The fix the message names works.
    config = load_config(CONFIGS / "quickstart.yaml", ["reward.custom=my_reward.py:reward",
                                                       "reward.custom_readable=[helpers.py]"])
    check_custom_reward(custom_reward_spec(config.reward))


# -- `none` is YAML's string "none", not null ------------------------------------------------------

@pytest.mark.parametrize("override, read", [
    ("checkpoint.keep_last=none", lambda config: config.checkpoint.keep_last),
    ("statistics.n_max=None", lambda config: config.statistics.n_max),
    ("guard.max_eval_drop=none", lambda config: config.guard.max_eval_drop),
    ("generator.autoscale=none", lambda config: config.generator.autoscale),
])
def test_none_is_read_as_null_where_no_text_can_be_meant(override, read):
    assert read(load_config(CONFIGS / "quickstart.yaml", [override])) is None


def test_none_stays_text_where_text_or_a_listed_choice_is_meant():
    config = load_config(CONFIGS / "hf_dataset.yaml", ["data.hf.id_column=none", "learner.offload=none"])
    assert config.data.hf.id_column == "none" and config.learner.offload == "none"


def test_descriptions_and_shipped_comments_write_null_not_none():
    # `eval_split: none` in a copied config would name a split "none"; the docs must show what YAML reads as null.
    from rl_service.config.sections import CheckpointConfig, HFDataConfig

    assert "null: no eval" in HFDataConfig.model_fields["eval_split"].description
    assert "null = keep all" in CheckpointConfig.model_fields["keep_last"].description
    text = (CONFIGS / "hf_dataset.yaml").read_text()
    assert "# none" not in text and "; none:" not in text


# -- numbers --set to text fields -----------------------------------------------------------------

def test_a_number_set_to_a_text_field_is_the_text_typed():
    config = load_config(CONFIGS / "hf_dataset.yaml", ["job_name=123", "data.hf.train_split=007", "data.hf.eval_split=1.10"])
    assert (config.job_name, config.data.hf.train_split, config.data.hf.eval_split) == ("123", "007", "1.10")


def test_a_number_in_a_file_for_a_text_field_says_to_quote_it(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("job_name: 123\n")
    with pytest.raises(ConfigError, match=r"job_name: Input should be a valid string \(got 123\); quote it to mean text"):
        load_config(job)

"""JobConfig: YAML files validate, overrides apply, mistakes name their field."""
from pathlib import Path

import pytest

from rl_service.config import JobConfig, load_config
from rl_service.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert isinstance(config, JobConfig)


def test_overrides_parse_yaml_scalars_and_lists():
    config = load_config(None, ["learner.lr=1e-5", "data.arithmetic.levels=[1, 3]", "model.thinking=false",
                                "algorithm.dual_clip=3"])
    assert config.learner.lr == pytest.approx(1e-5)
    assert config.data.arithmetic.levels == [1, 3]
    assert config.model.thinking is False
    assert config.algorithm.dual_clip == 3.0


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("learner:\n  lr: 3e-5\n")
    assert load_config(path).learner.lr == pytest.approx(3e-5)


@pytest.mark.parametrize("overrides, expected", [
    (["learner.lrr=1"], "learner.lrr: unknown key"),
    (["learner.lr=-1"], "learner.lr: Input should be greater than 0"),
    (["generator.temperature=hot"], "generator.temperature"),
    (["algorithm.name=ppo"], "algorithm.name"),
    (["generator.samples_per_prompt=1"], "generator.samples_per_prompt must be >= 2"),
    (["data.source=jsonl"], "data.train_path is required"),
    (["learner"], "expected KEY=VALUE"),
    (["learner.lr=1", "learner.lr.x=2"], "learner.lr is not a section"),
])
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_unknown_section_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("learnr:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: learnr: unknown key"):
        load_config(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 3\nlearner:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: line \d+"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_collapse_guard_needs_a_drop_beyond_the_noise_of_the_eval_set():
    from rl_service.guard import eval_collapsed

    # 16 prompts: SE at 50% is 12.5 points, so a 19-point drop is within 3 SE (37.5 points): noise.
    assert not eval_collapsed([0.5625, 0.375], 0.15, 16)
    # 256 prompts: SE ≈ 3.1 points; a 19-point drop is both > 0.15 and > 3 SE.
    assert eval_collapsed([0.5625, 0.375], 0.15, 256)
    assert not eval_collapsed([0.5, 0.4], 0.15, 10_000)     # > 3 SE but within the configured drop
    assert not eval_collapsed([0.5, 0.0], None, 256)        # guard off


def test_a_preference_job_takes_the_shared_memory_transport_but_not_zero_3_or_collective():
    # One LearnerActor serves both job kinds: the preference learner publishes like an RL rank.
    from rl_service.errors import ConfigError

    load_config(None, ["algorithm.name=dpo", "weight_sync.transport=shared_memory"])
    for override in ("weight_sync.transport=collective", "learner.zero_stage=3"):
        with pytest.raises(ConfigError, match="apply to grpo and raft\\+\\+ jobs; the dpo learner runs as one ZeRO 0-2 rank"):
            load_config(None, ["algorithm.name=dpo", override])

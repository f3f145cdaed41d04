"""JobConfig: YAML files validate, overrides apply, mistakes name their field."""
from pathlib import Path

import pytest
import yaml

from rl_service.config import JobConfig, dump_config, load_config
from rl_service.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


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
    (["algorithm.name=ppo"], "algorithm.name: 'ppo' is not one of grpo, raft++, dpo, bvpo"),
    (["algorithm=3"], "algorithm: expected a section whose name is one of grpo, raft++, dpo, bvpo, got 3"),
    (["algorithm.clip_low=2"], "algorithm.clip_low: Input should be less than or equal to 1 (got 2)"),
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
    for text in ("", "# only a comment\n"):   # would have trained the default job
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"list\.yaml: holds no settings"):
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


@pytest.mark.parametrize("overrides, expected", [
    (["algorithm.name=raft++", "algorithm.scale_rewards=false"],
     "algorithm.scale_rewards: not a setting of algorithm.name 'raft++' (its settings: clip_low,"),
    (["algorithm.name=grpo", "algorithm.drop_rejected=true"], "algorithm.drop_rejected: not a setting of algorithm.name 'grpo'"),
    (["algorithm.name=dpo", "algorithm.kl_coef=0.1"],
     "algorithm.kl_coef: not a setting of algorithm.name 'dpo' (its settings are the `preference:` section)"),
    (["algorithm.name=bvpo", "algorithm.clip_high=0.3"], "algorithm.clip_high: not a setting of algorithm.name 'bvpo'"),
])
def test_an_algorithm_setting_belongs_to_the_algorithms_that_read_it(overrides, expected):
    """`algorithm` is one section per algorithm.name (a discriminated union): a setting the chosen
    algorithm would ignore is refused, naming the field as the user wrote it (no union tag in it)."""
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert f"(defaults): {expected}" in str(error.value)


def test_the_algorithm_section_is_chosen_by_its_name_and_defaults_to_grpo(tmp_path):
    from rl_service.config import BVPOConfig, DPOConfig, GRPOConfig, RAFTPlusPlusConfig

    path = tmp_path / "job.yaml"
    path.write_text("algorithm:\n  kl_coef: 0.05\n")   # no name: the default algorithm, GRPO
    config = load_config(path)
    assert type(config.algorithm) is GRPOConfig and config.algorithm.kl_coef == 0.05
    for name, section, preference in (("raft++", RAFTPlusPlusConfig, False), ("dpo", DPOConfig, True), ("bvpo", BVPOConfig, True)):
        algorithm = load_config(None, [f"algorithm.name={name}"]).algorithm
        assert (type(algorithm), algorithm.is_preference) == (section, preference)
    # The written config names the algorithm first, and reads back to the same config.
    dumped = dump_config(load_config(REPO / "configs" / "gvm_raft.yaml"))
    assert dumped.split("algorithm:\n", 1)[1].startswith("  name: raft++\n  clip_low: 0.2\n")
    saved = tmp_path / "saved.yaml"
    saved.write_text(dumped)
    assert load_config(saved) == load_config(REPO / "configs" / "gvm_raft.yaml")


def test_offline_pilot_defaults_to_the_papers_pilot_of_eight():
    # §GVM.5: the paper's pilot is 8 samples a prompt; the online policy's pilot for a new prompt is 4.
    assert load_config(None, ["statistics.mode=offline_pilot"]).statistics.n_pilot == 8
    assert load_config(None, ["statistics.mode=offline_pilot", "statistics.n_pilot=3"]).statistics.n_pilot == 3
    assert load_config(None, ["statistics.mode=online"]).statistics.n_pilot == 4


@pytest.mark.parametrize("override,expected", [
    ("data.arithmetic.levels=[1, 99]", "data.arithmetic.levels: unknown level"),
    ("data.arithmetic.levels=[2, 2]", "data.arithmetic.levels: duplicate"),
    ("learner.adam_betas=[0.9, 1.5]", r"learner.adam_betas: each beta must be in \[0, 1\)"),
])
def test_values_that_failed_only_inside_ray_are_refused_at_load_time(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    # PyYAML keeps the last of two equal keys: the first section's settings would vanish silently.
    path = tmp_path / "job.yaml"
    path.write_text("learner:\n  lr: 1.0e-4\n  zero_stage: 1\nlearner:\n  micro_batch_size: 32\n")
    with pytest.raises(ConfigError, match=r"job.yaml: line 4: duplicate key 'learner' \(first on line 1\)"):
        load_config(path)
    path.write_text("learner:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match="line 3: duplicate key 'lr'"):
        load_config(path)
    # A YAML merge key is not a duplicate: the explicit key overrides the merged one.
    path.write_text("learner:\n  <<: {lr: 1.0e-4, zero_stage: 1}\n  lr: 2.0e-4\n")
    assert load_config(path).learner.lr == pytest.approx(2e-4) and load_config(path).learner.zero_stage == 1
    # ... also when the merged mapping is itself a merge, nested deeper than its use (PyYAML flattens
    # a node in place when it constructs it): loads as yaml.safe_load loads it.
    from rl_service.config.loading import _load_yaml

    text = "outer: {inner: &d {<<: &b {a: 1}, a: 3}}\nx: {<<: *d}\n"
    assert _load_yaml(text) == yaml.safe_load(text)


def test_an_error_from_a_set_override_names_the_override():
    with pytest.raises(ConfigError, match=r"nosuch: unknown key \(from --set nosuch.path=1\)"):
        load_config(None, ["nosuch.path=1"])
    with pytest.raises(ConfigError, match=r"learner.lr: .*greater than 0.*\(from --set learner.lr=-1\)"):
        load_config(None, ["learner.lr=-1"])
    # A section's own check is not pinned on an unrelated --set inside that section.
    with pytest.raises(ConfigError) as error:
        load_config(None, ["reward.num_actors=2", "reward.clip=[1.0, 0.0]"])
    assert "(from --set reward.num_actors=2)" not in str(error.value)


def test_cluster_address_local_is_our_loopback_local_ray_and_garbage_is_refused(monkeypatch):
    # Ray's "local" means a new local Ray: ours binds to 127.0.0.1; joining "local" bound to every interface.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert load_config(None, ["cluster.address=local"]).cluster.address_to_join() is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert load_config(None).cluster.address_to_join() is None
    assert load_config(None, ["cluster.address=10.0.0.1:6379"]).cluster.address_to_join() == "10.0.0.1:6379"
    with pytest.raises(ConfigError, match="cluster.address: 'garbage' is not a Ray address"):
        load_config(None, ["cluster.address=garbage"])


@pytest.mark.parametrize("override,expected", [
    ("steps=true", "steps: expected a number, got true"),
    ("learner.lr=false", "learner.lr: expected a number, got false"),
    ("statistics.n_max=true", "statistics.n_max: expected a number, got true"),
    ("learner.lora.rank=true", "learner.lora.rank: expected a number, got true"),   # LoRA had its own base
    ("model.trust_remote_code=1", "model.trust_remote_code: expected true or false, got 1"),
    ("algorithm.dynamic_sampling=0", "algorithm.dynamic_sampling: expected true or false, got 0"),
    ("logging.progress_bar=1.0", "logging.progress_bar: expected true or false, got 1.0"),
])
def test_a_boolean_is_not_a_number(override, expected):
    # pydantic's lax mode had read `steps: true` as 1, and `trust_remote_code: 1` as true.
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])
    assert load_config(None, ["model.thinking=false"]).model.thinking is False   # a bool field still takes one


def test_an_empty_custom_reward_is_refused_not_read_as_none():
    # `custom: ""` (an unset variable in a templated config) had silently meant the task's verifier.
    with pytest.raises(ConfigError, match=r"reward\.custom: is empty"):
        load_config(None, ['reward.custom=""'])
    assert load_config(None, ["reward.custom=null"]).reward.custom is None


@pytest.mark.parametrize("overrides, named", [
    (["data.train_path=mine.jsonl"], "data.train_path is set but data.source is not, and its default 'arithmetic'"),
    (["data.eval_path=held_out.jsonl"], "data.eval_path is set but data.source is not"),
    (["data.hf.path=/data/math"], "data.hf is set but data.source is not, .* set data.source: hf"),
])
def test_a_data_file_with_the_source_left_at_its_default_is_refused(overrides, named):
    # Without data.source: jsonl, a train_path was ignored and the run trained on the built-in task.
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)
    # A source chosen explicitly is the user's word (a smoke test of a jsonl job on the built-in task).
    assert load_config(None, ["data.source=arithmetic", *overrides]).data.source == "arithmetic"

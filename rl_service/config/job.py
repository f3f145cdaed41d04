"""`JobConfig`: the whole job, its sections, and the checks that span several of them."""
from __future__ import annotations

from pydantic import Field, model_validator

from rl_service.config.algorithm import AlgorithmConfig, GRPOConfig, PreferenceConfig
from rl_service.config.cluster import ClusterConfig, ScheduleConfig
from rl_service.config.section import _Section
from rl_service.config.sections import (
    ModelConfig, DataConfig, GeneratorConfig, RewardConfig, StatisticsConfig, LearnerConfig,
    WeightSyncConfig, CheckpointConfig, GuardConfig, EvalConfig)
from rl_service.config.tracking import LoggingConfig


def _explicit_changes(section: _Section) -> list[str]:
    """The fields written in the job (file or --set) with a value other than their default: a default
    written out (`alpha: 0.5` in a template) changes nothing, so it is never refused as ignored."""
    changed = []
    for name in section.model_fields_set:
        field = type(section).model_fields[name]
        if getattr(section, name) != field.get_default(call_default_factory=True):
            changed.append(name)
    return sorted(changed, key=list(type(section).model_fields).index)   # in declaration order: stable messages


class JobConfig(_Section):
    job_name: str = Field("rl_service", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="one seed for data, sampling and init: same seed, same CPU run")
    steps: int = Field(50, ge=1, le=10_000_000, description="training steps (one batch of rollouts each)")
    eval_every: int = Field(10, ge=0, description="evaluate every N steps (and before and after); 0 = only before and after")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    algorithm: AlgorithmConfig = Field(default_factory=GRPOConfig, description="one section per algorithm.name")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)

    @model_validator(mode="after")
    def _no_setting_is_ignored(self) -> "JobConfig":
        """README: "a setting the chosen algorithm would ignore is refused". A field written with a
        value other than its default that this job's loop never reads is a mistake (a job meant to be
        offline DPO trains GRPO), so it is named with the reason, not dropped silently."""
        name = self.algorithm.name
        preference = self.preference
        if not self.algorithm.is_preference:
            changed = _explicit_changes(preference)
            if changed:
                raise ValueError(f"preference.{changed[0]} applies to dpo and bvpo jobs; algorithm.name '{name}' "
                                 "reads no preference section (set algorithm.name, or leave preference out)")
        else:
            # roles.py starts no statistics actor for a preference job: nothing is allocated or piloted.
            changed = _explicit_changes(self.statistics)
            if changed:
                raise ValueError(f"statistics.{changed[0]} applies to grpo and raft++ jobs; the {name} loop reads no "
                                 "statistics section (every prompt gets generator.samples_per_prompt samples)")
            # dpo is trace-only, BVPO with α = 1 (preference_learner.py): 1 is the value it uses, so it passes too.
            if name == "dpo" and "alpha" in _explicit_changes(preference) and preference.alpha != 1.0:
                raise ValueError(f"preference.alpha ({preference.alpha:g}) applies to bvpo (the trace loss's weight); "
                                 "dpo is trace-only, α = 1 (use algorithm.name: bvpo, or leave alpha out)")
            if preference.alpha_mode == "fixed":
                estimator = [field for field in _explicit_changes(preference)
                             if field in ("alpha_resamples", "alpha_ema", "alpha_min", "alpha_max")]
                if estimator:
                    raise ValueError(f"preference.{estimator[0]} applies to preference.alpha_mode 'online' (the α̂ "
                                     "estimator, §BVPO.6); alpha_mode 'fixed' uses preference.alpha")
            elif "alpha" in _explicit_changes(preference):
                raise ValueError(f"preference.alpha ({preference.alpha:g}) is not read with preference.alpha_mode "
                                 "'online' (α̂ is estimated each step, §BVPO.6): leave it out, or use alpha_mode 'fixed'")
        # Without eval.samples the evaluation is greedy only: the sampled evaluation's settings are unread.
        if self.eval.samples is None:
            changed = [field for field in _explicit_changes(self.eval) if field != "samples"]
            if changed:
                raise ValueError(f"eval.{changed[0]} applies to the sampled evaluation, which runs only with "
                                 "eval.samples set (k completions per eval prompt); without it evaluation is greedy")
        return self

    @model_validator(mode="after")
    def _preference_job_is_complete(self) -> "JobConfig":
        if not self.algorithm.is_preference:
            return self
        preference = self.preference
        if preference.mode == "offline" and not preference.dataset_path:
            raise ValueError("preference.dataset_path is required when preference.mode is 'offline'")
        if preference.reward_source == "reward_model" and not preference.reward_model_path:
            raise ValueError("preference.reward_model_path is required when preference.reward_source is 'reward_model'")
        if preference.alpha_mode == "online" and (self.algorithm.name != "bvpo" or preference.mode != "online"):
            raise ValueError("preference.alpha_mode 'online' needs algorithm.name 'bvpo' and preference.mode 'online' "
                             "(α̂ comes from resampled generated traces, §BVPO.6)")
        per_prompt = self.generator.samples_per_prompt
        if preference.mode == "online" and per_prompt < 2:
            raise ValueError("generator.samples_per_prompt must be >= 2 for online dpo/bvpo (a pair needs two samples)")
        if preference.alpha_mode == "online" and per_prompt < 3:
            # Two samples give at most one reward-ordered pair: all K resamples are that pair, tr Σ̂_t = 0
            # and α̂ = 1 whatever the estimators do (§BVPO.6 needs resamples that can differ).
            raise ValueError(f"generator.samples_per_prompt ({per_prompt}) must be >= 3 with preference.alpha_mode=online: "
                             "the preference.alpha_resamples trace pairs of 2 samples are all the same pair (α̂ would be 1)")
        if preference.off_samples_per_prompt is not None and (self.algorithm.name != "bvpo" or preference.mode != "online"):
            raise ValueError("preference.off_samples_per_prompt applies to online bvpo only (reasoning-off samples); "
                             f"got algorithm.name={self.algorithm.name}, preference.mode={preference.mode}")
        return self

    @model_validator(mode="after")
    def _sampled_eval_is_for_policy_jobs(self) -> "JobConfig":
        # The preference loop evaluates greedily per reasoning mode; its sampled evaluation (the hook:
        # rl_service.pass_at_k.sampled_eval_metrics per mode) is not wired yet, so say so, not ignore it.
        if self.eval.samples is not None and self.algorithm.is_preference:
            raise ValueError(f"eval.samples applies to grpo and raft++ jobs; the {self.algorithm.name} loop evaluates "
                             "greedily (reasoning on and off)")
        return self

    def _check_groups_exist(self) -> None:
        statistics, data = self.statistics, self.data
        if statistics.allocation != "gvm":
            raise ValueError("statistics.unseen_prompts 'group' applies to statistics.allocation 'gvm' (uniform "
                             "allocation reads no statistics)")
        if statistics.mode != "online":
            raise ValueError(f"statistics.unseen_prompts 'group' applies to statistics.mode 'online' (the pilots of "
                             f"'{statistics.mode}' measure every prompt)")
        named = {"arithmetic": "level", "jsonl": data.group_field,
                 "hf": data.hf.group_column if data.hf is not None else None}[data.source]
        if named is None:
            field = "data.group_field" if data.source == "jsonl" else "data.hf.group_column"
            raise ValueError(f"statistics.unseen_prompts 'group' needs each prompt's group: set {field}")

    @model_validator(mode="after")
    def _acceptance_is_defined(self) -> "JobConfig":
        """GVM, the pilots and RAFT++ train on "accepted" samples; a custom reward has no "correct"."""
        uses_acceptance = self.statistics.allocation == "gvm" or self.algorithm.name == "raft++"
        if self.reward.custom and uses_acceptance and self.statistics.accept_threshold is None:
            what = "statistics.allocation 'gvm'" if self.statistics.allocation == "gvm" else "algorithm.name 'raft++'"
            raise ValueError(f"statistics.accept_threshold is required with reward.custom and {what}: it says which "
                             "rewards count as accepted (ALGORITHMS.md §GVM.1)")
        return self

    @model_validator(mode="after")
    def _dynamic_sampling_is_for_grpo(self) -> "JobConfig":
        if not (isinstance(self.algorithm, GRPOConfig) and self.algorithm.dynamic_sampling):
            return self
        if self.generator.samples_per_prompt < 2:
            raise ValueError("algorithm.dynamic_sampling needs generator.samples_per_prompt >= 2 (a spread needs two samples)")
        if self.schedule.mode == "async" and self.schedule.max_staleness > 0:
            raise ValueError("algorithm.dynamic_sampling draws more prompts after a batch is scored: it needs "
                             "schedule.mode 'sync' (or schedule.max_staleness 0)")
        return self

    @model_validator(mode="after")
    def _async_is_for_policy_jobs(self) -> "JobConfig":
        if self.schedule.mode == "async" and self.algorithm.is_preference:
            raise ValueError(f"schedule.mode 'async' applies to grpo and raft++ jobs; algorithm.name "
                             f"'{self.algorithm.name}' runs the synchronous preference loop")
        return self

    @model_validator(mode="after")
    def _ranks_divide_the_batch(self) -> "JobConfig":
        learner = self.learner
        if self.algorithm.is_preference and (learner.zero_stage == 3 or self.weight_sync.transport == "collective"):
            raise ValueError(f"learner.zero_stage 3 and weight_sync.transport 'collective' apply to grpo and raft++ "
                             f"jobs; the {self.algorithm.name} learner runs as one ZeRO 0-2 rank (object store or "
                             "shared memory)")
        if learner.num_ranks == 1:
            return self
        if self.algorithm.is_preference:
            raise ValueError(f"learner.num_ranks ({learner.num_ranks}) > 1 applies to grpo and raft++ jobs; the "
                             f"{self.algorithm.name} learner runs as one rank")
        batch = self.data.prompts_per_step * self.generator.samples_per_prompt
        per_mini_batch = batch // learner.mini_batches
        if batch % learner.mini_batches or per_mini_batch % learner.num_ranks:
            raise ValueError(
                f"learner.num_ranks ({learner.num_ranks}) must divide each mini-batch: data.prompts_per_step × "
                f"generator.samples_per_prompt = {batch} samples in {learner.mini_batches} mini-batch(es) of "
                f"{batch / learner.mini_batches:g}")
        return self

    @model_validator(mode="after")
    def _autoscale_needs_the_object_store(self) -> "JobConfig":
        if self.generator.autoscale is not None and self.weight_sync.transport == "collective":
            raise ValueError("generator.autoscale needs weight_sync.transport 'object_store', 'shared_memory' or 'auto' on CPU: a "
                             "collective weight group has a fixed membership")
        return self

    @model_validator(mode="after")
    def _tensor_parallel_needs_gpus(self) -> "JobConfig":
        generator = self.generator
        if generator.tensor_parallel > 1 and generator.num_gpus == 0:
            raise ValueError(f"generator.tensor_parallel ({generator.tensor_parallel}) > 1 needs GPUs: tensor-parallel "
                             "engines run on GPU clusters only (set generator.num_gpus > 0, or tensor_parallel 1 on CPU)")
        return self

    @model_validator(mode="after")
    def _algorithm_fits_sampling(self) -> "JobConfig":
        per_prompt = self.generator.samples_per_prompt
        if self.algorithm.name == "grpo" and per_prompt < 2:
            raise ValueError("generator.samples_per_prompt must be >= 2 for GRPO (a group needs a spread)")
        statistics = self.statistics
        if statistics.allocation == "gvm":
            # The budget per step is prompts × samples_per_prompt; these bounds must leave it spendable.
            if statistics.n_min > per_prompt:
                raise ValueError(f"statistics.n_min ({statistics.n_min}) exceeds generator.samples_per_prompt "
                                 f"({per_prompt}): the budget cannot give every prompt n_min samples")
            if statistics.n_max is not None and statistics.n_max < per_prompt:
                raise ValueError(f"statistics.n_max ({statistics.n_max}) is below generator.samples_per_prompt "
                                 f"({per_prompt}): the budget cannot be spent")
            if statistics.mode == "online" and statistics.n_pilot > per_prompt:
                raise ValueError(f"statistics.n_pilot ({statistics.n_pilot}) exceeds generator.samples_per_prompt "
                                 f"({per_prompt}): a batch of unseen prompts would overspend the budget")
        if statistics.unseen_prompts == "group":
            self._check_groups_exist()
        if self.algorithm.divides_by_expected_count and statistics.mode != "online":
            # p̄ must not come from the samples it normalises: the moving averages of earlier visits do not.
            raise ValueError(f"algorithm.accepted_normaliser 'expected' reads p̄ from the statistics role's moving "
                             f"averages (statistics.mode 'online'), not statistics.mode '{statistics.mode}'")
        return self

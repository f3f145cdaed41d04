"""The `algorithm` section, one model per `algorithm.name` (a discriminated union), and the
`preference:` section that DPO and BVPO read (ALGORITHMS.md §GRPO, §RAFT, §DPO, §BVPO).

A setting belongs to the algorithms that read it: `algorithm.dynamic_sampling` on a RAFT++ job is an
unknown key, not a silently ignored one, and `config.algorithm.is_preference` says which loop runs.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from rl_service.config.section import _Section


class _PolicyGradientConfig(_Section):
    """What GRPO and RAFT++ share: the clipped token surrogate, the KL penalty and how token losses
    are averaged (ALGORITHMS.md §GRPO.3–5)."""
    is_preference: ClassVar[bool] = False
    name: str = Field(description="the algorithm (each subclass narrows it to its own name)")
    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="ε_low of the ratio clip")
    clip_high: float = Field(0.28, ge=0.0, le=10.0, description="ε_high of the ratio clip (clip-higher)")
    dual_clip: float | None = Field(None, gt=1.0, description="dual-clip constant c for A < 0; none = off")
    kl_coef: float = Field(0.0, ge=0.0, description="β_kl of the k3 KL penalty; >0 loads a frozen reference model")
    kl_clamp: float | None = Field(None, gt=0.0, description="clamp k3 to [−v, v]")
    kl_bias_correction: bool = Field(False, description="multiply k3 by the ratio (TRL's use_bias_correction_kl)")
    aggregation: Literal["token_mean", "sequence_mean", "prompt_mean"] = Field(
        "token_mean", description="§GRPO.5; prompt_mean (ours): token mean per prompt, then mean over prompts, so a "
                                  "prompt's weight does not grow with its GVM sample count (the §GVM.2 estimator)")

    @property
    def divides_by_expected_count(self) -> bool:
        """Whether the learner needs the statistics role's p̄ each step (RAFT++ `accepted_normaliser: expected`)."""
        return False


class GRPOConfig(_PolicyGradientConfig):
    name: Literal["grpo"] = Field("grpo", description="ALGORITHMS.md §GRPO")
    advantage_epsilon: float = Field(1e-6, gt=0.0, description="ε in A = (r − mean)/(std + ε), §GRPO.2")
    scale_rewards: bool = Field(True, description="divide by the group std (False: Dr. GRPO)")
    filter_zero_variance_groups: bool = Field(False, description="drop groups whose rewards are all equal (§GRPO.2)")
    dynamic_sampling: bool = Field(
        False, description="DAPO dynamic sampling (§DAPO): drop groups whose rewards are all equal and sample more "
                           "prompts until the batch holds data.prompts_per_step groups with a spread; every generated "
                           "sample counts in the step's completions")
    dynamic_sampling_target: Literal["groups", "samples"] = Field(
        "groups", description="dynamic sampling fills the step with data.prompts_per_step groups with a spread (groups, "
                              "DAPO) or with prompts_per_step × generator.samples_per_prompt samples in such groups "
                              "(samples, ours: GVM's unequal groups fill a sample budget in fewer rounds)")
    dynamic_sampling_max_rounds: int = Field(
        3, ge=1, le=64, description="dynamic sampling: most rounds of generation in one step (the first included); "
                                    "a step that still lacks groups trains on those it has")


class RAFTPlusPlusConfig(_PolicyGradientConfig):
    name: Literal["raft++"] = Field("raft++", description="ALGORITHMS.md §RAFT (RAFT++): A = 1 accepted, 0 rejected")
    drop_rejected: bool = Field(False, description="drop rejected samples instead of A = 0 (ours)")
    accepted_normaliser: Literal["observed", "expected"] = Field(
        "observed", description="prompt_mean with drop_rejected: divide a prompt's accepted samples by their count "
                                "(observed) or by n·p̄, the count the statistics role's acceptance estimate expects "
                                "(expected: the EM-gradient estimator whose variance §GVM.2 minimises, its expectation "
                                "free of n; ours. Measured: with moving-average p̄ its 1/p̄ weights are heavy-tailed, "
                                "benchmarks/README.md)")

    @property
    def divides_by_expected_count(self) -> bool:
        return self.accepted_normaliser == "expected"

    @model_validator(mode="after")
    def _expected_needs_the_accepted_prompt_mean(self):
        if self.accepted_normaliser == "expected" and (self.aggregation != "prompt_mean" or not self.drop_rejected):
            raise ValueError("accepted_normaliser 'expected' rescales the per-prompt mean over accepted samples: it "
                             "needs algorithm.aggregation: prompt_mean and algorithm.drop_rejected: true")
        return self


class _PreferenceAlgorithmConfig(_Section):
    """DPO and BVPO: pairs, not rewards, reach the learner; their settings are the `preference:`
    section (kept apart so that the users' `preference.*` keys stay what they were)."""
    is_preference: ClassVar[bool] = True
    divides_by_expected_count: ClassVar[bool] = False


class DPOConfig(_PreferenceAlgorithmConfig):
    """Trace-only DPO (ALGORITHMS.md §DPO; BVPO with α = 1)."""
    name: Literal["dpo"] = "dpo"


class BVPOConfig(_PreferenceAlgorithmConfig):
    """BVPO (ALGORITHMS.md §BVPO): trace and empty-reasoning pairs mixed by α."""
    name: Literal["bvpo"] = "bvpo"


ALGORITHMS = {"grpo": GRPOConfig, "raft++": RAFTPlusPlusConfig, "dpo": DPOConfig, "bvpo": BVPOConfig}


def _algorithm_name(value) -> str | None:
    """The union's tag; a section without `name` is GRPO, the default job."""
    if isinstance(value, dict):
        return value.get("name", "grpo")
    return getattr(value, "name", None)


# One section per algorithm, chosen by `algorithm.name`: a setting belongs to the algorithms that read
# it, so `algorithm.dynamic_sampling` on a RAFT++ job is an unknown key, not a silently ignored one.
AlgorithmConfig = Annotated[
    Union[tuple(Annotated[model, Tag(name)] for name, model in ALGORITHMS.items())],
    Discriminator(_algorithm_name)]


class PreferenceConfig(_Section):
    """DPO / BVPO jobs (ALGORITHMS.md §DPO, §BVPO); read only when algorithm.name is dpo or bvpo."""
    beta: float = Field(0.1, gt=0.0, le=100.0, description="DPO β of both loss terms (§DPO; KL strength, unitless)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="BVPO weight α of the trace loss in [0, 1] (§BVPO.3; paper: 0.5); dpo uses 1")
    alpha_mode: Literal["fixed", "online"] = Field(
        "fixed", description="fixed: use `alpha`; online: α̂ from trace resamples each step (§BVPO.6, ours; online mode, bvpo only)")
    alpha_resamples: int = Field(4, ge=2, le=256, description="K, trace-pair resamples per prompt for α̂ (§BVPO.6); "
                                                              "needs generator.samples_per_prompt >= 3 so they can differ")
    pairing: Literal["same_prompts", "per_term"] = Field(
        "per_term", description="same_prompts: train only prompts with a pair in both modes; per_term: every pair, "
                                "L = α·mean(trace pairs) + (1 − α)·mean(empty pairs), each over its own pairs (§BVPO.3)")
    off_samples_per_prompt: int | None = Field(
        None, ge=2, le=1024, description="online bvpo: reasoning-off samples per prompt (the budget split between "
                                         "modes); none = generator.samples_per_prompt, as reasoning on")
    alpha_ema: float = Field(0.9, ge=0.0, lt=1.0, description="EMA weight of the past in α̂'s numerator/denominator (§BVPO.6; 0 = none)")
    alpha_min: float = Field(0.0, ge=0.0, le=1.0, description="lower clip of α̂ (§BVPO.6)")
    alpha_max: float = Field(1.0, ge=0.0, le=1.0, description="upper clip of α̂ (§BVPO.6)")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: the pool generates reasoning-on and -off samples; offline: pairs from `dataset_path` (§BVPO.7)")
    dataset_path: str | None = Field(None, description="offline mode: JSONL preference rows (prompt, trace_chosen/rejected, empty_chosen/rejected)")
    on_bad_row: Literal["skip", "error"] = Field(
        "skip", description="offline data: skip bad rows (reported with file:line, counted) or stop at the first one")
    reward_source: Literal["verifier", "reward_model"] = Field(
        "verifier", description="online pair ranking: the task's verifier or a sequence-classification reward model")
    reward_model_path: str | None = Field(None, description="local HF AutoModelForSequenceClassification directory (safetensors) for reward_source=reward_model")
    reward_model_batch_size: int = Field(32, ge=1, le=65_536, description="texts per reward-model forward")
    reference_cache_size: int = Field(1_000_000, ge=1, description="reference log-probs kept (pairs, LRU; 4 floats each)")

    @model_validator(mode="after")
    def _alpha_bounds_ordered(self) -> "PreferenceConfig":
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"preference.alpha_min ({self.alpha_min}) must be <= preference.alpha_max ({self.alpha_max})")
        return self

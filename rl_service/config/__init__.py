"""The job configuration: one tree of pydantic models (`JobConfig`).

Every field carries its default, unit and range; unknown keys are errors (`extra="forbid"`), so a
typo in a YAML file or a `--set` override fails before any Ray start, naming the field.
`sections.py` holds the sections (`cluster.py` and `tracking.py` the cluster/schedule and logging ones,
`section.py` their base), `algorithm.py` the algorithm union and the preference section,
`job.py` the tree and its cross-section checks, `loading.py` the YAML and `--set` parsing.
"""
from rl_service.config.algorithm import (
    AlgorithmConfig, GRPOConfig, RAFTPlusPlusConfig, DPOConfig, BVPOConfig, PreferenceConfig)
from rl_service.config.job import JobConfig
from rl_service.config.loading import apply_overrides, dump_config, load_config, parse_override
from rl_service.config.cluster import ClusterConfig, ScheduleConfig
from rl_service.config.sections import (
    ModelConfig, ArithmeticDataConfig, DataConfig, AutoscaleConfig, GeneratorConfig, RewardConfig,
    StatisticsConfig, LearnerConfig, WeightSyncConfig, CheckpointConfig, GuardConfig)
from rl_service.config.tracking import LoggingConfig

__all__ = [
    "JobConfig", "apply_overrides", "dump_config", "load_config", "parse_override", "ModelConfig",
    "ArithmeticDataConfig", "DataConfig", "AutoscaleConfig", "GeneratorConfig", "RewardConfig",
    "StatisticsConfig", "LearnerConfig", "WeightSyncConfig", "AlgorithmConfig", "GRPOConfig",
    "RAFTPlusPlusConfig", "DPOConfig", "BVPOConfig", "PreferenceConfig",
    "ClusterConfig", "ScheduleConfig", "LoggingConfig", "CheckpointConfig", "GuardConfig"]

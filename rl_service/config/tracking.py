"""`logging`: TensorBoard, log lines, and the optional trackers (Weights & Biases, MLflow)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rl_service.config.section import _Section


def _tracker_installed(package: str, field: str) -> None:
    # find_spec imports nothing: a run that names a tracker fails here, before Ray starts, not mid-run.
    from importlib.util import find_spec

    if find_spec(package) is None:
        raise ValueError(f"{field} needs the {package} package, which is not installed "
                         "(pip install 'rl_service[trackers]')")


class WandbConfig(_Section):
    """Weights & Biases (rl_service/trackers.py): the resolved config once, every metrics row at its step."""
    project: str = Field(..., min_length=1, max_length=128, description="W&B project name")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online: stream to the server (WANDB_API_KEY or `wandb login`); offline: write under "
                              "RUN_DIR/wandb for a later `wandb sync`; disabled: no-op")

    @model_validator(mode="after")
    def _installed(self) -> "WandbConfig":
        if self.mode != "disabled":
            _tracker_installed("wandb", "logging.wandb")
        return self


class MlflowConfig(_Section):
    """MLflow (rl_service/trackers.py): the resolved config as params, every metrics row at its step."""
    tracking_uri: str | None = Field(
        None, min_length=1, description="MLflow tracking URI (a server http://…, or file:///abs/path for a local "
                                        "store); null: MLFLOW_TRACKING_URI or MLflow's default")
    experiment: str = Field("rl_service", min_length=1, max_length=256, description="experiment name (created if missing)")

    @model_validator(mode="after")
    def _installed(self) -> "MlflowConfig":
        _tracker_installed("mlflow", "logging.mlflow")
        return self


class LoggingConfig(_Section):
    tensorboard: bool = Field(True, description="write TensorBoard events to RUN_DIR/tb")
    wandb: WandbConfig | None = Field(None, description="null: off; {project, mode}: log to Weights & Biases too")
    mlflow: MlflowConfig | None = Field(None, description="null: off; {tracking_uri, experiment}: log to MLflow too")
    progress_bar: bool = Field(True, description="rich progress bar when stdout is a terminal (a job log or pipe gets "
                                                 "log lines instead, see log_every)")
    log_every: int = Field(
        1, ge=0, le=1_000_000, description="one log line every N steps (step, reward, accepted fraction, loss, KL, grad "
                                           "norm, completions/s, phase shares) when stdout is not a terminal or the bar "
                                           "is off (under the bar: to RUN_DIR/driver.log only); every evaluation is "
                                           "logged with its step; 0 = no step lines")
    output_dir: str = Field(
        "runs", min_length=1, description="where run directories go: <output_dir>/<job_name>-<timestamp>-<hex> for `run`, "
                                          "<output_dir>/<job id> for `submit` (made absolute on the submitting "
                                          "machine; on a multi-node cluster use storage every node mounts); "
                                          "--run-dir names the run directory itself")

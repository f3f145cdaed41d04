"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow.

`open_trackers(config, run_dir)` gives the trackers `logging.wandb` / `logging.mlflow` name;
`RunDirectory` (run_dir.py) hands each of them the resolved config once and every metrics row it
writes, at that row's step. A tracker's package is imported only when the config names it (the
`trackers` extra installs both), so a job without trackers never loads them.

A resumed or restarted run continues the same tracker run (their ids are kept in
RUN_DIR/tracker_runs.json); a new run, `--overwrite` included, starts new ones. Steps replayed after
a checkpoint are sent again: W&B keeps the first value of a step, MLflow's history holds both. A
tracker that fails mid-run (a lost server) is logged once and dropped: the run's own record
(metrics.jsonl) is complete without it.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from rl_service.config import JobConfig
from rl_service.errors import UserError

log = logging.getLogger("rl_service")

RUNS_FILE = "tracker_runs.json"   # {"wandb": id, "mlflow": run id} of this run directory

START_TIMEOUT_S = 10   # as the other reachability checks (driver/preflight.py CONNECT_TIMEOUT_S)
# MLflow's HTTP defaults (7 retries, exponential backoff, 120 s a request) keep a run waiting about
# 4 minutes on a server that is down. Starting the tracker uses these instead; a value the user set
# in the environment is kept.
_START_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": str(START_TIMEOUT_S)}


PENDING_ROWS_MAX = 10_000   # rows held for a server that is slow or down before the oldest are dropped
CLOSE_TIMEOUT_S = 30.0      # the end of a run waits this long for the rows still unsent


def _numeric(row: dict) -> dict[str, float]:
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def flatten_config(config: JobConfig) -> dict[str, str]:
    """`section.field` -> value text: MLflow params are flat strings."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return flat


class WandbTracker:
    name = "wandb"

    def __init__(self, config: JobConfig, run_dir: Path, run_id: str | None):
        import wandb

        settings = config.logging.wandb
        self._run = wandb.init(project=settings.project, mode=settings.mode, dir=str(run_dir), name=run_dir.name,
                               id=run_id, resume="allow" if run_id else None, config=config.model_dump(mode="json"),
                               reinit="create_new")
        self.run_id = self._run.id

    def log(self, step: int, row: dict) -> None:
        # The driver writes a step's train row and then its eval row: both land at that step.
        self._run.log(_numeric(row), step=step)

    def close(self) -> None:
        self._run.finish()


@contextmanager
def _bounded_mlflow_http():
    """MLflow reads these variables at each request: set the unset ones for the tracker's start only."""
    unset = [name for name in _START_HTTP_ENV if name not in os.environ]
    os.environ.update({name: _START_HTTP_ENV[name] for name in unset})
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


def _check_server_reachable(uri: str, source: str) -> None:
    """Refuse, within START_TIMEOUT_S, an http(s) tracking URI where nothing accepts a connection. A
    URI reached through a proxy is left to MLflow (its bounded retries)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:   # a bad port: MLflow's own error says so
        return
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return
    try:
        with socket.create_connection((parts.hostname, port), timeout=START_TIMEOUT_S):
            pass
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()   # no credentials in the message
        raise UserError(f"{source} {shown}: cannot reach an MLflow server there ({reason} within "
                        f"{START_TIMEOUT_S:g} s; is it up and the port right?)") from None


class MlflowTracker:
    name = "mlflow"

    def __init__(self, config: JobConfig, run_dir: Path, run_id: str | None):
        # The client API, not mlflow's fluent one: no process-global active run to leak between jobs.
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        settings = config.logging.mlflow
        uri = settings.tracking_uri
        if uri is not None and (uri.startswith("file:") or "://" not in uri):
            # MLflow 3 refuses a file store unless this is set; a config that names one asked for it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if uri is not None:
            _check_server_reachable(uri, "logging.mlflow.tracking_uri")
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            _check_server_reachable(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
        with _bounded_mlflow_http():
            self._client = MlflowClient(tracking_uri=uri)
            experiment = self._client.get_experiment_by_name(settings.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self._client.create_experiment(settings.experiment))
            if run_id is not None:
                self.run_id = run_id
                self._client.update_run(run_id, status="RUNNING")
            else:
                run = self._client.create_run(experiment_id, run_name=run_dir.name,
                                              tags={"rl_service.driver.run_dir": str(run_dir.resolve())})
                self.run_id = run.info.run_id
                params = [Param(key, value[:6000]) for key, value in flatten_config(config).items()]
                for start in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
                    self._client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in _numeric(row).items()]
        for start in range(0, len(metrics), 1000):   # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _words(error: BaseException) -> str:
    return " ".join(str(error).split())[:400] or type(error).__name__


class BackgroundSender:
    """Sends a started tracker's rows, in order, from one thread; `log` only queues. A send that
    fails (MLflow has retried by then) is reported at the next `log`, and the tracker is dropped as a
    failing one is (`Trackers.log`). `close` waits CLOSE_TIMEOUT_S for the queue, then gives up on it."""

    def __init__(self, tracker):
        self.name, self.run_id = tracker.name, tracker.run_id
        self._tracker = tracker
        self._pending: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._closing = self._abandoned = self._sending = False
        self._failure: BaseException | None = None
        self._dropped = 0
        self._thread = threading.Thread(target=self._send, name=f"{tracker.name}-sender", daemon=True)
        self._thread.start()

    def log(self, step: int, row: dict) -> None:
        with self._wake:
            if self._failure is not None:
                raise self._failure
            if len(self._pending) >= PENDING_ROWS_MAX:
                self._pending.popleft()
                self._dropped += 1
                if self._dropped == 1:
                    log.warning("logging.%s: the server is behind by %d rows; the oldest are dropped "
                                "(metrics.jsonl is complete)", self.name, PENDING_ROWS_MAX)
            self._pending.append((step, dict(row)))
            self._wake.notify()

    def _send(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if self._abandoned:
                    return
                if not self._pending:   # closing, and every row sent
                    break
                step, row = self._pending.popleft()
                self._sending = True
            try:
                self._tracker.log(step, row)
            except Exception as exc:   # noqa: BLE001 - reported by log/close, in the caller's thread
                with self._wake:
                    self._failure = exc
                    self._pending.clear()
                return
            finally:
                self._sending = False
        try:
            self._tracker.close()
        except Exception as exc:   # noqa: BLE001
            self._failure = exc

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(CLOSE_TIMEOUT_S)
        with self._wake:
            if self._thread.is_alive():
                self._abandoned = True
                unsent = len(self._pending) + self._sending
                self._pending.clear()
                left = f"{unsent} rows not sent" if unsent else "the run is not marked finished there"
                log.warning("logging.%s: no answer from the server within %g s at the end of the run; %s "
                            "(metrics.jsonl is complete)", self.name, CLOSE_TIMEOUT_S, left)
            elif self._failure is not None:
                log.warning("logging.%s failed (%s); metrics.jsonl is complete", self.name, _words(self._failure))


class Trackers:
    """The configured trackers as one; empty (and importing nothing) when none is configured."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, step: int, row: dict) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.log(step, row)
            except Exception as exc:   # a tracker's own error types vary; the run must not die of one
                log.warning("logging.%s failed (%s); it is off for the rest of this run, metrics.jsonl is complete",
                            tracker.name, _words(exc))
                self.trackers.remove(tracker)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:
                log.warning("logging.%s: closing failed (%s)", tracker.name, exc)
        self.trackers = []


def open_trackers(config: JobConfig, run_dir: Path, resume: bool = False) -> Trackers:
    """The configured trackers; `resume`: continue the tracker runs this run directory started."""
    kinds = {"wandb": WandbTracker, "mlflow": lambda *args: BackgroundSender(MlflowTracker(*args))}
    wanted = [name for name in kinds if getattr(config.logging, name) is not None
              and getattr(getattr(config.logging, name), "mode", None) != "disabled"]
    if not wanted:
        return Trackers([])
    runs_file = run_dir / RUNS_FILE
    known = json.loads(runs_file.read_text(encoding="utf-8")) if resume and runs_file.is_file() else {}
    trackers = []
    for name in wanted:
        try:
            trackers.append(kinds[name](config, run_dir, known.get(name)))
        except UserError:   # already one line naming the field
            for started in trackers:
                started.close()
            raise
        except Exception as exc:   # a bad URI, a refused login, a store MLflow will not open: one line, before Ray
            for started in trackers:
                started.close()
            raise UserError(f"logging.{name}: cannot start the tracker ({_words(exc)})") from None
    runs_file.write_text(json.dumps({tracker.name: tracker.run_id for tracker in trackers}), encoding="utf-8")
    return Trackers(trackers)

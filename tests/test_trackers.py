"""Experiment trackers (rl_service/trackers.py), offline: W&B in offline mode (its run file read back
record by record) and MLflow on a file store under tmp_path. No network is used."""
from __future__ import annotations

import glob
import json
import math
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 refuses a file store unless told


def _config(tmp_path: Path, extra: list[str] = ()):
    from rl_service.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", [
        "logging.tensorboard=false", "logging.wandb.project=rl-service-test", "logging.wandb.mode=offline",
        f"logging.mlflow.tracking_uri={(tmp_path / 'mlruns').as_uri()}", "logging.mlflow.experiment=tests",
        *extra])


def wandb_history(run_dir: Path) -> tuple[dict[int, dict[str, float]], dict[str, object]]:
    """{step: {key: value}} and the config of an offline W&B run, read from its .wandb file: a
    LevelDB-style log (7-byte file header, 32 KiB blocks, records of crc32/length/type + a protobuf)."""
    from wandb.proto import wandb_internal_pb2

    history: dict[int, dict[str, float]] = {}
    config: dict[str, object] = {}
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, position, payload = Path(path).read_bytes(), 7, b""
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:      # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            payload += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind not in (1, 4):                # FULL or LAST completes a record
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                keys = [(item.key or "/".join(item.nested_key), item) for item in record.history.item]
                items = {key: json.loads(item.value_json) for key, item in keys if not key.startswith("_")}
                history.setdefault(record.history.step.num, {}).update(items)
            elif record.WhichOneof("record_type") == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return history, config


def mlflow_run(tmp_path: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    return client, client.get_run(run_id)


def test_trackers_get_the_config_and_every_row(tmp_path):
    from rl_service.driver.run_dir import RunDirectory

    run_dir = tmp_path / "run"
    directory = RunDirectory(run_dir, _config(tmp_path))
    rows = [(0, {"eval_accuracy": 0.25}), (1, {"loss": 1.5, "kl": math.nan, "reward_mean": 0.5}),
            (1, {"eval_accuracy": 0.75}), (2, {"loss": 0.5})]
    for step, metrics in rows:
        directory.log(step, metrics)
    directory.close()
    ids = json.loads((run_dir / "tracker_runs.json").read_text())

    # MLflow: every finite value at its step (NaN is left out, as metrics.jsonl writes it null).
    client, run = mlflow_run(tmp_path, ids["mlflow"])
    assert run.data.params["job_name"] == "quickstart" and run.data.params["learner.lr"] == "0.0001"
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "eval_accuracy")] == [(0, 0.25), (1, 0.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss")] == [(1, 1.5), (2, 0.5)]
    assert client.get_metric_history(ids["mlflow"], "kl") == []

    # W&B: the resolved config and every row, merged per step.
    history, config = wandb_history(run_dir)
    assert config["job_name"] == "quickstart" and config["learner"]["lr"] == 1e-4
    assert history == {0: {"eval_accuracy": 0.25}, 1: {"loss": 1.5, "reward_mean": 0.5, "eval_accuracy": 0.75},
                       2: {"loss": 0.5}}

    # A resumed run directory logs into the same tracker runs; the new ids file names them again.
    resumed = RunDirectory(run_dir, _config(tmp_path), resume_step=2)
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    assert json.loads((run_dir / "tracker_runs.json").read_text()) == ids
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")] == [1, 2, 3]


def test_a_run_without_trackers_imports_neither(tmp_path):
    code = ("import sys; from rl_service.config import load_config; from rl_service.driver.run_dir import RunDirectory\n"
            f"d = RunDirectory({str(tmp_path)!r}, load_config('configs/quickstart.yaml', ['logging.tensorboard=false']))\n"
            "d.log(0, {'loss': 1.0}); d.close()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not (tmp_path / "tracker_runs.json").exists()


def test_tracker_config_errors(tmp_path, monkeypatch):
    from rl_service.config import load_config
    from rl_service.errors import UserError
    from rl_service.driver.run_dir import RunDirectory

    with pytest.raises(UserError, match="logging.wandb.project"):
        load_config(REPO / "configs" / "quickstart.yaml", ["logging.wandb.mode=offline"])
    with pytest.raises(UserError, match="logging.wandb.mode"):
        load_config(REPO / "configs" / "quickstart.yaml", ["logging.wandb.project=p", "logging.wandb.mode=sometimes"])
    # A store MLflow cannot open is one line naming the tracker, raised before any step runs.
    with pytest.raises(UserError, match=r"^logging.mlflow: cannot start the tracker \(.*nosuchscheme"):
        RunDirectory(tmp_path / "run", load_config(REPO / "configs" / "quickstart.yaml", [
            "logging.tensorboard=false", "logging.mlflow.tracking_uri=nosuchscheme://host/x"]))


def test_unreachable_mlflow_server_is_one_line_naming_the_field(tmp_path):
    """A tracking server that is down is refused at once (MLflow's own retries wait about 4 minutes),
    before Ray starts: the tracker opens in RunDirectory, ahead of ray_session."""
    import socket

    code = ("from rl_service.config import load_config; from rl_service.driver.run_dir import RunDirectory\n"
            "from rl_service.errors import UserError\n"
            "try:\n"
            f"    RunDirectory({str(tmp_path / 'run')!r}, load_config('configs/quickstart.yaml', [\n"
            "        'logging.tensorboard=false', 'logging.mlflow.tracking_uri=' + __import__('sys').argv[1]]))\n"
            "except UserError as error:\n"
            "    print(error)\n")
    with socket.socket() as held:   # bound, never listening: a connection to it is refused
        held.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{held.getsockname()[1]}"
        out = subprocess.run([sys.executable, "-c", code, uri], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=120).stdout   # MLflow's defaults took about 250 s
    assert out.startswith(f"logging.mlflow.tracking_uri {uri}: cannot reach an MLflow server there"), out
    assert len(out.strip().splitlines()) == 1, out


def test_file_store_needs_no_environment(tmp_path, monkeypatch):
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: a config naming one sets it."""
    from rl_service.driver.run_dir import RunDirectory

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    config = _config(tmp_path, ["logging.wandb=null"])
    directory = RunDirectory(tmp_path / "run", config)
    directory.log(0, {"loss": 2.0})
    directory.close()
    client, _ = mlflow_run(tmp_path, json.loads((tmp_path / "run" / "tracker_runs.json").read_text())["mlflow"])
    assert [m.value for m in client.get_metric_history(client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id])[0].info.run_id, "loss")] == [2.0]


@pytest.mark.slow   # a real Ray run (~55 s): the default suite stays under its 15 minutes
def test_real_run_logs_every_metrics_row_to_both(tmp_path):
    from conftest import read_metrics, run_short_job

    run_dir = tmp_path / "run"
    run_short_job(run_dir, [
        "logging.wandb.project=rl-service-test", "logging.wandb.mode=offline",
        f"logging.mlflow.tracking_uri={(tmp_path / 'mlruns').as_uri()}", "logging.mlflow.experiment=e2e",
        "data.arithmetic.num_eval=8"], steps=1)
    rows = read_metrics(run_dir)
    ids = json.loads((run_dir / "tracker_runs.json").read_text())
    client, run = mlflow_run(tmp_path, ids["mlflow"])
    history, config = wandb_history(run_dir)
    assert config["steps"] == 1 and run.data.params["steps"] == "1"
    expected: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, []).append((row["step"], float(value)))
                assert history[row["step"]][key] == pytest.approx(value), key
    assert {"eval_accuracy", "loss", "reward_mean"} <= set(expected)
    for key, points in expected.items():
        logged = client.get_metric_history(ids["mlflow"], key)
        assert [m.step for m in logged] == [step for step, _ in points], key
        assert [m.value for m in logged] == pytest.approx([value for _, value in points]), key


def _mlflow_only(tmp_path: Path):
    from rl_service.driver.run_dir import RunDirectory

    run_dir = tmp_path / "run"
    directory = RunDirectory(run_dir, _config(tmp_path, ["logging.wandb=null"]))
    run_id = json.loads((run_dir / "tracker_runs.json").read_text())["mlflow"]
    [metrics] = glob.glob(str(tmp_path / "mlruns" / "*" / run_id / "metrics"))
    return directory, run_id, Path(metrics)


def _stall(metrics: Path, key: str) -> Path:
    """The file store's file for `key` made a FIFO nobody reads: MLflow's write of that metric blocks
    in open(), as a send to a server that accepted the connection and never answers does."""
    metrics.mkdir(parents=True, exist_ok=True)
    fifo = metrics / key
    os.mkfifo(fifo)
    return fifo


def _in_thread(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(60)   # a deadline for a hang, not a timing claim: the action returns at once or never
    return thread


def test_a_stalled_mlflow_server_never_stalls_a_step(tmp_path):
    directory, run_id, metrics = _mlflow_only(tmp_path)
    fifo = _stall(metrics, "loss")
    steps = _in_thread(lambda: [directory.log(step, {"loss": float(step)}) for step in (1, 2, 3)])
    assert not steps.is_alive(), "RunDirectory.log waited for the stalled tracker"
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # The server comes back: every row is sent, in order, and the run is marked finished.
    received: list[str] = []
    done = threading.Event()

    def serve():
        while not done.is_set():
            with open(fifo, encoding="utf-8") as reader:   # one open per MLflow append
                received.extend(reader.read().splitlines())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    closing = _in_thread(directory.close)
    assert not closing.is_alive()
    done.set()
    with open(fifo, "w"):   # let the reader's last open() return
        pass
    server.join(60)
    assert [tuple(line.split()[1:]) for line in received] == [("1.0", "1"), ("2.0", "2"), ("3.0", "3")]
    fifo.unlink()   # get_run reads every metric file
    client, run = mlflow_run(tmp_path, run_id)
    assert run.info.status == "FINISHED"


def test_the_end_of_a_run_waits_a_bounded_time_for_a_stalled_server(tmp_path, monkeypatch, caplog):
    import rl_service.trackers as trackers

    monkeypatch.setattr(trackers, "CLOSE_TIMEOUT_S", 0.5)
    directory, run_id, metrics = _mlflow_only(tmp_path)
    fifo = _stall(metrics, "loss")
    for step in (1, 2):
        directory.log(step, {"loss": 1.0})
    with caplog.at_level("WARNING", logger="rl_service"):
        closing = _in_thread(directory.close)
    assert not closing.is_alive()
    assert "logging.mlflow: no answer from the server within 0.5 s at the end of the run; 2 rows not sent" in caplog.text
    with open(fifo, encoding="utf-8") as reader:   # release the sender's write: it then stops, sending nothing more
        assert [line.split()[2] for line in reader.read().splitlines()] == ["1"]


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_run_goes_on(tmp_path, caplog):
    directory, run_id, metrics = _mlflow_only(tmp_path)
    (metrics / "loss").mkdir(parents=True)   # the store refuses this metric's write (IsADirectoryError)
    with caplog.at_level("WARNING", logger="rl_service"):
        directory.log(1, {"loss": 1.0, "kl": 0.5})
        _in_thread(lambda: directory._trackers.trackers[0]._thread.join()).join()
        directory.log(2, {"loss": 0.5})
        directory.log(3, {"loss": 0.25})
        directory.close()
    assert caplog.text.count("logging.mlflow failed") == 1 and "off for the rest of this run" in caplog.text
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3

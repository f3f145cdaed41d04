"""deploy/: the manifests parse, agree with each other and with configs/cluster.yaml, and the Grafana
dashboard charts exactly the metrics named in rl_service/telemetry_names.py.

No Ray cluster and no Kubernetes: these read files. The launcher YAML is checked against the JSON
schema the installed Ray ships, so a misspelt key fails here rather than at `ray up`.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from rl_service.config import load_config
from rl_service.telemetry_names import JOB_TAG, METRIC_NAMES, METRICS, SUBMISSION_TAG, prometheus_series

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
LAUNCHER = DEPLOY / "cluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
DASHBOARD = DEPLOY / "grafana" / "rl_service.json"
CLUSTER_JOB = REPO / "configs" / "cluster.yaml"

# Resources Ray defines itself; everything else a node advertises is a custom resource.
RAY_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
PROMQL_RAY_SERIES = re.compile(r"\bray_[A-Za-z_:][A-Za-z0-9_:]*")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def launcher_custom_resources() -> dict[str, dict[str, float]]:
    """Worker node type -> the custom resources it advertises."""
    launcher = load_yaml(LAUNCHER)
    return {name: {key: float(value) for key, value in node_type["resources"].items() if key not in RAY_BUILTIN_RESOURCES}
            for name, node_type in launcher["available_node_types"].items() if name != launcher["head_node_type"]}


def rayjob_custom_resources() -> dict[str, dict[str, float]]:
    """Worker group -> the custom resources its `ray start --resources` advertises. KubeRay takes the
    value as an escaped JSON string inside a string ('"{\\"rollout\\": 1}"'): decoded twice."""
    groups = load_yaml(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    found = {}
    for group in groups:
        text = group["rayStartParams"].get("resources", '"{}"')
        resources = json.loads(json.loads(text))
        found[group["groupName"]] = {key: float(value) for key, value in resources.items()}
    return found


def test_every_manifest_in_deploy_parses():
    manifests = sorted(path for path in DEPLOY.rglob("*") if path.suffix in (".yaml", ".yml", ".json"))
    assert {LAUNCHER, RAYJOB, DASHBOARD} <= set(manifests)
    for path in manifests:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path
        else:
            documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
            assert documents and all(isinstance(doc, dict) for doc in documents), path


def test_launcher_config_is_valid_for_the_installed_ray():
    jsonschema = pytest.importorskip("jsonschema")
    ray_spec = importlib.util.find_spec("ray")
    assert ray_spec is not None and ray_spec.submodule_search_locations
    schema_file = Path(list(ray_spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(load_yaml(LAUNCHER), json.loads(schema_file.read_text(encoding="utf-8")))


def test_cluster_job_config_validates_and_asks_for_gpus():
    config = load_config(CLUSTER_JOB)
    assert config.generator.num_gpus > 0 and config.learner.num_gpus > 0
    assert config.generator.resources and config.learner.resources


def test_custom_resources_agree_across_launcher_rayjob_and_job_config():
    config = load_config(CLUSTER_JOB)
    requested = {"generator": config.generator.resources, "learner": config.learner.resources}
    asked_for = set(requested["generator"]) | set(requested["learner"])
    launcher, rayjob = launcher_custom_resources(), rayjob_custom_resources()
    assert set().union(*launcher.values()) == asked_for
    assert set().union(*rayjob.values()) == asked_for
    # Each role fits on some worker type of each deployment, and rollout and learner GPUs are
    # different machines (the point of separate resources: they scale on their own).
    for deployment in (launcher, rayjob):
        homes = {}
        for role, wants in requested.items():
            fitting = [name for name, has in deployment.items()
                       if all(has.get(key, 0.0) >= amount for key, amount in wants.items())]
            assert fitting, f"no worker type advertises {wants} for the {role}"
            homes[role] = set(fitting)
        assert homes["generator"].isdisjoint(homes["learner"])


def _rayjob_containers(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    containers = {"submitter": rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0],
                  "head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster["workerGroupSpecs"]:
        containers[group["groupName"]] = group["template"]["spec"]["containers"][0]
    return containers


def test_rayjob_runs_the_cluster_config_with_token_auth_from_one_secret():
    rayjob = load_yaml(RAYJOB)
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    entrypoint = rayjob["spec"]["entrypoint"]
    assert "rl-service run" in entrypoint and entrypoint.split()[2].endswith("configs/cluster.yaml")
    secrets = set()
    for where, container in _rayjob_containers(rayjob).items():
        env = {item["name"]: item for item in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{where}: a literal token in a manifest"
        reference = token["valueFrom"]["secretKeyRef"]
        secrets.add((reference["name"], reference["key"]))
    assert len(secrets) == 1, f"every container must read the same Secret key, got {secrets}"


def test_launcher_starts_every_node_with_token_auth():
    launcher = load_yaml(LAUNCHER)
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in launcher[commands] if "ray start" in command]
        assert starts and all("RAY_AUTH_MODE=token" in command for command in starts), commands
    assert "~/.ray/auth_token" in launcher["file_mounts"].values()


def _dashboard_queries(dashboard: dict) -> list[str]:
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_charts_exactly_the_named_metrics_filtered_by_job_and_submission():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    series_to_metric = {series: metric.name for metric in METRICS for series in prometheus_series(metric.name)}
    charted = set()
    for query in _dashboard_queries(dashboard):
        for series in PROMQL_RAY_SERIES.findall(query):
            assert series in series_to_metric, f"{series} is not in rl_service/telemetry_names.py (query: {query})"
            charted.add(series_to_metric[series])
    assert charted == set(METRIC_NAMES), f"metrics without a panel: {sorted(set(METRIC_NAMES) - charted)}"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert "job" in variables and JOB_TAG in variables["job"]["definition"]
    assert "submission" in variables and SUBMISSION_TAG in variables["submission"]["definition"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["type"] == "prometheus"
        for target in panel["targets"]:
            assert f'{JOB_TAG}=~"$job"' in target["expr"], f"panel {panel['title']!r} ignores the job variable"
            # Two runs of one config are two lines, not one max over both.
            assert f'{SUBMISSION_TAG}=~"$submission"' in target["expr"] and SUBMISSION_TAG in target["legendFormat"], \
                f"panel {panel['title']!r} does not keep submissions apart"


def test_metric_names_are_valid_prometheus_names_with_one_line_descriptions():
    assert len(METRIC_NAMES) == len(METRICS), "a metric name appears twice"
    for name, description in METRIC_NAMES.items():
        assert re.fullmatch(r"rl_service_[a-z0-9_]+", name), name
        assert description.strip() and "\n" not in description, name

"""Per-role resources place the roles where a user names: on a `ray.cluster_utils.Cluster` of a
head, a "rollout" node and a "learner" node, every generator lands on the rollout node and every
learner rank on the learner node (real Ray, the production `start_roles`)."""
from __future__ import annotations

import os

import pytest

from rl_service.config import load_config

pytestmark = pytest.mark.cluster   # own Ray head or multi-node Cluster: `pytest -m cluster`


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    rollout = cluster.add_node(num_cpus=2, resources={"rollout": 2})
    learner = cluster.add_node(num_cpus=2, resources={"learner": 2})
    cluster.wait_for_nodes()
    yield cluster, rollout.node_id, learner.node_id
    cluster.shutdown()


def test_generators_run_on_the_rollout_node_and_learner_ranks_on_the_learner_node(cluster):
    import ray

    from rl_service.driver.roles import start_ray, start_roles, stop_roles

    ray_cluster, rollout_node, learner_node = cluster
    config = load_config(None, [
        f"cluster.address={ray_cluster.address}", "generator.backend=hf", "generator.num_engines=2",
        "generator.resources={rollout: 1}", "generator.num_cpus=0.5", "learner.num_ranks=2",
        "learner.resources={learner: 1}", "learner.num_cpus=0.5", "data.prompts_per_step=4",
        "generator.samples_per_prompt=4", "cluster.torch_threads=1"])
    start_ray(config)
    try:
        roles = start_roles(config, "integer")
        generator_nodes = ray.get([engine.node_id.remote() for engine in roles.generators])
        learner_nodes = [location["node_id"] for location in roles.learner.locations]
        assert generator_nodes == [rollout_node, rollout_node]
        assert learner_nodes == [learner_node, learner_node]
        stop_roles(roles)
        roles.learner.release()
    finally:
        ray.shutdown()

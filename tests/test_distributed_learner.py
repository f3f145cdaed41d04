"""The learner as several DeepSpeed ranks on Ray (real Ray on 127.0.0.1, real DeepSpeed, gloo on CPU).

Two ranks at ZeRO 0, 1, 2 and 3 must end where one rank ends after the same steps on the same global
batch. They cannot match to the bit: the ranks' gradients are summed in another order than one
rank's micro-batches are. The tolerance is measured, not guessed: one rank with a different
micro-batch size (the same sum, also reordered) gives the float32 reordering noise of this setup;
two ranks must stay within 10x of it (and 1e-6 absolute where it is tinier).
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from conftest import arithmetic_requests, assert_engines_match_the_learner
from rl_service.config import load_config
from rl_service.rollout import SamplingParams

STEPS = 2
METRICS_SUMMED_OVER_RANKS = ("loss", "behaviour_logprob_abs_diff", "clip_frac_low", "ratio_mean", "grad_norm")


@pytest.fixture(scope="module")
def rollout_ref(ray_session):
    from rl_service.generation.hf_engine import HFGenerationEngine

    engine = HFGenerationEngine("builtin")
    rollout = engine.generate(arithmetic_requests(6, 4, seed=11), SamplingParams(max_new_tokens=24), seed=5)
    return ray_session.put(rollout), len(rollout)


def _config(ranks: int, stage: int, micro: int = 4, extra=()):
    # 24 samples, 2 mini-batches of 12: each rank takes 6, in micro-batches of 4 (so 2 and 2, with the
    # zero-advantage rows skipped: uneven counts that the idle passes even out).
    return load_config(None, [f"learner.num_ranks={ranks}", f"learner.zero_stage={stage}",
                              f"learner.micro_batch_size={micro}", "learner.lr=1e-3", "learner.mini_batches=2",
                              "learner.ppo_epochs=2", "learner.num_cpus=0.5", "data.prompts_per_step=6",
                              "generator.samples_per_prompt=4", "learner.join_timeout_s=120", *extra])


def _rewards(count: int, step: int) -> list[float]:
    return [float((k * 7 + step) % 3 == 0) for k in range(count)]


def _train(ray, config, rollout_ref) -> tuple[dict[str, np.ndarray], list[dict], list[float]]:
    """Parameters after STEPS steps (as published), each step's metrics, and step 1's GVM norms."""
    from actors.learner_group import start_learner_group

    ref, count = rollout_ref
    group = start_learner_group(config)
    try:
        metrics, norms = [], None
        for step in range(1, STEPS + 1):
            step_metrics, step_norms = ray.get(group.train_step.remote([ref], _rewards(count, step), step == 1))
            metrics.append(step_metrics)
            norms = norms if norms is not None else step_norms
        published = ray.get(group.publish_weights.remote(STEPS))
        group.raise_earlier_failures()
        buckets = ray.get(published.bucket_refs)
        params = {name: tensor.clone().numpy() for bucket in buckets for name, tensor in bucket.tensors()}
        assert published.version == STEPS and published.num_bytes == sum(b.num_bytes for b in buckets)
        return params, metrics, norms
    finally:
        group.release()


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


@pytest.fixture(scope="module")
def one_rank(ray_session, rollout_ref):
    reference = _train(ray_session, _config(1, 0), rollout_ref)
    reordered = _train(ray_session, _config(1, 0, micro=3), rollout_ref)
    noise = _max_diff(reference[0], reordered[0])
    # The same for the reported metrics: the loss is a sum of order-1 terms that nearly cancel
    # (advantages sum to zero in a group), so it is compared absolutely, at its own noise.
    metric_noise = {key: max(abs(want[key] - got[key]) for want, got in zip(reference[1], reordered[1]))
                    for key in METRICS_SUMMED_OVER_RANKS if key in reference[1][0]}
    # Step 2's metrics also carry step 1's parameter difference, hence the 1e-4 relative floor.
    metric_tolerance = {key: max(10 * value, 1e-4 * max(1.0, abs(reference[1][-1][key])))
                        for key, value in metric_noise.items()}
    return reference, max(10 * noise, 1e-6), metric_tolerance


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_match_one_rank(ray_session, rollout_ref, one_rank, stage):
    (params, metrics, norms), tolerance, metric_tolerance = one_rank
    got_params, got_metrics, got_norms = _train(ray_session, _config(2, stage), rollout_ref)
    assert _max_diff(got_params, params) <= tolerance
    for want, got in zip(metrics, got_metrics):
        # Summed over the ranks, the metrics are the one-rank metrics.
        for key, limit in metric_tolerance.items():
            if key == "grad_norm" and stage == 3:
                # ZeRO-3 computes the norm from its partitions (measured 1e-3 relative off one rank's;
                # the parameters above still match, Adam being blind to the gradient's scale).
                limit = max(limit, 2e-3 * want[key])
            assert abs(got[key] - want[key]) <= limit, (key, got[key], want[key], limit)
        for key in ("forward_sample_fraction", "trained_samples", "optimizer_steps", "learning_rate"):
            assert got[key] == want[key], key
        assert {"train_seconds_rank_0", "train_seconds_rank_1"} <= got.keys()
    # §GVM.1 norms: every accepted sample's, computed by the rank that had it.
    assert np.allclose(np.asarray(got_norms), np.asarray(norms), rtol=1e-4, equal_nan=True)
    assert np.isfinite(np.asarray(norms)).sum() > 0


def test_generators_serve_the_new_version_with_the_learners_logprobs(ray_session, rollout_ref):
    """ZeRO-3 on two ranks publishes (one bucket per tensor: gathered bucket by bucket), two HF
    generators load it, and their samples' log-probs are the learner's to 1e-4."""
    from actors.generator import GeneratorActor
    from actors.generator_pool import GeneratorPool
    from actors.learner_group import start_learner_group

    ray = ray_session
    config = _config(2, 3, extra=["weight_sync.bucket_mb=0.01", "generator.backend=hf"])
    ref, count = rollout_ref
    group = start_learner_group(config)
    engines = [GeneratorActor.options(num_cpus=0.5).remote(config, index) for index in range(2)]
    pool = GeneratorPool.options(num_cpus=0.1).remote(engines)
    try:
        ray.get(group.train_step.remote([ref], _rewards(count, 1)))
        published_ref = group.publish_weights.remote(1)
        published = ray.get(published_ref)
        assert len(published.bucket_refs) > 10          # small buckets: many gathers, one at a time
        assert ray.get(pool.update_weights.remote([published_ref])) == [1, 1]
        assert_engines_match_the_learner(ray, pool, group, version=1)
    finally:
        group.release()
        for engine in engines:
            ray.kill(engine)


def test_a_rank_that_does_not_join_is_named_and_every_rank_released(ray_session):
    """A hung rank (its process stopped, as on a frozen node): the join times out naming it and its
    node, within the limit, and the other rank is killed, not left waiting in the rendezvous."""
    import time

    from actors.learner_group import RankJoinTimeout, join_learner_group, start_learner_group

    ray = ray_session
    config = _config(2, 0, extra=["learner.join_timeout_s=20"])
    group = start_learner_group(config, join=False)
    hung_pid = ray.get(group.ranks[1].location.remote())["pid"]
    os.kill(hung_pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        with pytest.raises(RankJoinTimeout, match=r"learner rank 1 on node [\d.]+ \(\w+, pid \d+\) did not join .*does not respond"):
            join_learner_group(group, config)
        assert time.monotonic() - started < 60
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(group.ranks[0].ready.remote(), timeout=30)
    finally:
        os.kill(hung_pid, signal.SIGCONT)


def test_a_world_size_that_does_not_divide_the_batch_is_a_config_error():
    from rl_service.errors import ConfigError

    with pytest.raises(ConfigError, match=r"learner.num_ranks \(5\) must divide each mini-batch"):
        load_config(None, ["learner.num_ranks=5", "data.prompts_per_step=6", "generator.samples_per_prompt=4"])
    with pytest.raises(ConfigError, match=r"learner.num_ranks \(2\) > 1 applies to grpo and raft\+\+"):
        load_config(None, ["learner.num_ranks=2", "algorithm.name=dpo"])
    assert load_config(None, ["learner.num_ranks=4", "data.prompts_per_step=6", "generator.samples_per_prompt=4",
                              "learner.mini_batches=3"]).learner.num_ranks == 4


def test_flat_weight_buckets_are_planned_in_order_within_the_size():
    from rl_service.weights.flat import plan_buckets

    sizes = [("a", 40), ("b", 70), ("c", 200), ("d", 10), ("e", 0), ("f", 90)]
    assert plan_buckets(sizes, 100) == [["a"], ["b"], ["c"], ["d", "e", "f"]]
    assert plan_buckets(sizes, 10**6) == [["a", "b", "c", "d", "e", "f"]]
    with pytest.raises(ValueError, match="positive"):
        plan_buckets(sizes, 0)


def test_a_two_rank_zero3_checkpoint_resumes_bit_for_bit(ray_session, rollout_ref, tmp_path):
    """Each rank saves its own optimizer partition; two fresh ranks restored from them take step 3
    exactly as the ranks that never stopped."""
    from actors.learner_group import start_learner_group

    ray = ray_session
    ref, count = rollout_ref
    config = _config(2, 3)
    original = start_learner_group(config)
    try:
        for step in (1, 2):
            ray.get(original.train_step.remote([ref], _rewards(count, step)))
        ray.get(original.publish_weights.remote(2))
        ray.get(original.save_checkpoint.remote(str(tmp_path)))
        assert {"learner_state.json", "learner_state.rank1.json"} <= {path.name for path in tmp_path.iterdir()}
        want_metrics, _ = ray.get(original.train_step.remote([ref], _rewards(count, 3)))
        want = ray.get(ray.get(original.publish_weights.remote(3)).bucket_refs)
    finally:
        original.release()
    restored = start_learner_group(config, str(tmp_path))
    try:
        got_metrics, _ = ray.get(restored.train_step.remote([ref], _rewards(count, 3)))
        got = ray.get(ray.get(restored.publish_weights.remote(3)).bucket_refs)
    finally:
        restored.release()
    assert got_metrics["loss"] == want_metrics["loss"]
    want_tensors = [tensor for bucket in want for _, tensor in bucket.tensors()]
    got_tensors = [tensor for bucket in got for _, tensor in bucket.tensors()]
    assert len(want_tensors) == len(got_tensors) and all(map(torch.equal, want_tensors, got_tensors))


def test_the_rendezvous_store_listens_on_its_address_only():
    """Issue #19 finding 2: torch's env:// store listened on every interface; ours binds the group's address."""
    from datetime import timedelta

    import psutil

    from rl_service.training.rendezvous import rendezvous_store
    from rl_service.training.engine import free_port

    port = free_port("127.0.0.1")
    store = rendezvous_store("127.0.0.1", port, 1, True, timedelta(seconds=30))
    store.set("key", "value")
    listening = {(connection.laddr.ip, connection.laddr.port)
                 for connection in psutil.Process().net_connections(kind="inet")
                 if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port}
    assert listening == {("127.0.0.1", port)}
    assert store.get("key") == b"value"
    del store

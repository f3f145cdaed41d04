"""The generator pool: the balancer as a pure function, and the pool for real (Ray on 127.0.0.1, HF engines).

The balancer's contract (rl_service/rollout.py `balance_requests`): contiguous shards whose
concatenation is the request order (the driver and the reward actors rely on it), sample work as even
as whole requests allow once each engine's outstanding work is counted, deterministic.
"""
from __future__ import annotations

import os
import random
import threading

import pytest

from rl_service.config import load_config
from rl_service.errors import ConfigError
from rl_service.driver.roles import tensor_parallel_bundles
from rl_service.rollout import GenerationRequest, Rollout, SamplingParams, balance_requests, request_work


def make_requests(counts: list[int]) -> list[GenerationRequest]:
    return [GenerationRequest(index, 1000 + index, [1, 2, index % 7 + 3], count) for index, count in enumerate(counts)]


def flatten(assignment) -> list[GenerationRequest]:
    return [request for _, shard in assignment for request in shard]


def loads(assignment, outstanding: list[int], max_new_tokens: int = 1) -> list[int]:
    result = list(outstanding)
    for engine, shard in assignment:
        result[engine] += sum(request_work(request, max_new_tokens) for request in shard)
    return result


# -- the balancer, pure --------------------------------------------------------------------------

@pytest.mark.parametrize("trial", range(40))
def test_shards_are_contiguous_in_request_order_and_balanced(trial):
    rng = random.Random(trial)
    counts = [rng.choice([0, 1, 2, 4, 8, 16]) for _ in range(rng.randint(1, 60))]
    num_engines = rng.randint(1, 6)
    requests = make_requests(counts)
    assignment = balance_requests(requests, [0] * num_engines, max_new_tokens=32)
    assert flatten(assignment) == requests                       # concatenation = request order
    engines = [engine for engine, _ in assignment]
    assert engines == sorted(set(engines))                        # each engine at most one shard, in order
    assert all(shard for _, shard in assignment)                  # no empty shards
    if sum(counts):
        # Each shard is within one request's work of the even share (midpoint rule).
        share = sum(counts) * 32 / num_engines
        biggest = max(counts) * 32
        for load in loads(assignment, [0] * num_engines, 32):
            assert load <= share + biggest
        if len(assignment) < num_engines:   # an engine left idle only when requests are too coarse
            assert biggest >= share / 2


def _even_split(requests, num_shards: int) -> list:
    """The balancer with `num_shards` idle engines: what a pool of fresh engines is handed."""
    return [shard for _, shard in balance_requests(requests, [0] * num_shards)]


def test_even_counts_split_exactly():
    requests = make_requests([4] * 12)
    assignment = balance_requests(requests, [0, 0, 0])
    assert [(engine, [r.request_index for r in shard]) for engine, shard in assignment] == [
        (0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9, 10, 11])]
    assert _even_split(requests[:1], 4) == [requests[:1]]


def test_outstanding_work_is_respected():
    requests = make_requests([2] * 8)                     # 16 samples × 10 tokens = 160 units
    # Engine 1 still has more than the whole call outstanding: it gets nothing; the others share it.
    assignment = balance_requests(requests, [0, 500, 0], max_new_tokens=10)
    assert [engine for engine, _ in assignment] == [0, 2]
    assert loads(assignment, [0, 500, 0], 10) == [80, 500, 80]
    # Partly busy engines are filled up to a common level: 40 + 120 = 160 new units -> level 100.
    assignment = balance_requests(requests, [40, 0, 120], max_new_tokens=10)
    assert flatten(assignment) == requests
    assert loads(assignment, [40, 0, 120], 10) == [100, 100, 120]
    # Tie in load: the lower engine index first; identical inputs give identical outputs.
    assert balance_requests(requests, [7, 7], 3) == balance_requests(list(requests), [7, 7], 3)


def water_level(outstanding: list[int], work: int) -> float:
    """The level L with sum(max(0, L - o)) == work, by bisection (independent of the balancer's method)."""
    low, high = float(min(outstanding)), float(max(outstanding) + work)
    for _ in range(200):
        middle = (low + high) / 2
        if sum(max(0.0, middle - o) for o in outstanding) < work:
            low = middle
        else:
            high = middle
    return high


def test_outstanding_balancing_over_random_inputs():
    rng = random.Random(11)
    for _ in range(300):
        counts = [rng.randint(0, 6) for _ in range(rng.randint(1, 40))]
        if not sum(counts):
            continue
        outstanding = [rng.choice([0, 0, 5, 20, 100]) for _ in range(rng.randint(1, 5))]
        requests = make_requests(counts)
        assignment = balance_requests(requests, outstanding)
        assert flatten(assignment) == requests
        final = loads(assignment, outstanding)
        level, biggest, eps = water_level(outstanding, sum(counts)), max(counts), 1e-6
        for engine in range(len(outstanding)):
            if final[engine] > outstanding[engine]:              # it received work:
                assert outstanding[engine] < level + eps          # it was below the water level,
                assert final[engine] <= level + biggest + eps     # and ends within one request of it
            if outstanding[engine] < level - biggest - eps:       # far below the level: it is filled
                assert final[engine] >= level - biggest - eps


def test_zero_count_requests_are_kept_in_place():
    requests = make_requests([0, 3, 0, 0, 3, 0])
    assignment = balance_requests(requests, [0, 0])
    assert flatten(assignment) == requests
    assert [sum(r.num_samples for r in shard) for _, shard in assignment] == [3, 3]
    # Only zero-count requests: one shard, to the least-loaded engine.
    zeros = make_requests([0, 0, 0])
    assert balance_requests(zeros, [5, 1, 1]) == [(1, zeros)]
    assert balance_requests([], [0, 0]) == []
    assert _even_split(zeros, 3) == [zeros]


def test_balancer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one engine"):
        balance_requests(make_requests([1]), [])
    with pytest.raises(ValueError, match="outstanding"):
        balance_requests(make_requests([1]), [-1])


# -- tensor parallel: bundles and the CPU config error ------------------------------------------

def test_tensor_parallel_bundles_and_cpu_config_error():
    gpu = load_config(None, ["generator.tensor_parallel=4", "generator.num_gpus=1", "generator.num_cpus=2",
                             "generator.resources={rollout: 1}"]).generator
    assert tensor_parallel_bundles(gpu) == [{"GPU": 1.0, "CPU": 2.0, "rollout": 1.0}] + [{"GPU": 1.0, "CPU": 2.0}] * 3
    assert tensor_parallel_bundles(load_config(None, ["generator.num_gpus=1"]).generator) is None
    assert tensor_parallel_bundles(load_config(None, []).generator) is None
    hf = load_config(None, ["generator.tensor_parallel=2", "generator.num_gpus=1", "generator.backend=hf"]).generator
    assert tensor_parallel_bundles(hf) is None
    with pytest.raises(ConfigError, match=r"generator\.tensor_parallel"):
        load_config(None, ["generator.tensor_parallel=2"])


# -- the pool through Ray ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


def test_pool_over_hf_engines_returns_samples_in_request_order(ray_local):
    ray = ray_local
    from actors.generator import GeneratorActor
    from actors.generator_pool import GeneratorPool
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.tasks import PromptTokenizer

    config = load_config(None, ["generator.backend=hf", "cluster.torch_threads=1"])
    engines = [GeneratorActor.options(num_cpus=1).remote(config, index) for index in range(2)]
    pool = GeneratorPool.options(num_cpus=0.01).remote(engines)
    reference = HFGenerationEngine("builtin")
    from rl_service.data.arithmetic import make_arithmetic_split
    from rl_service.data.prompts import PromptRecord

    train, _ = make_arithmetic_split(seed=3, num_train=6, num_eval=1, levels=[1, 2])
    tokenize = PromptTokenizer(reference.tokenizer, thinking=True)
    counts = [2, 0, 3, 1, 2, 2]
    requests = [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), n)
                for k, (p, n) in enumerate(zip(train, counts))]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8)

    refs = ray.get(pool.generate.remote(requests, sampling, 5))
    assert len(refs) == 2
    shards = ray.get(refs)
    merged = Rollout.concat(shards)
    assert merged.request_index == [k for k, n in enumerate(counts) for _ in range(n)]
    assert all(len(tokens) <= 8 for tokens in merged.completion_token_ids)
    assert merged.weight_versions == [0] * len(merged)
    # Shard k is shard k of the balancer, seeded (seed, k): the same samples as the engine run in-process.
    expected = [reference.generate(shard, sampling, 5 * 1_000_003 + k)
                for k, shard in enumerate(_even_split(requests, 2))]
    assert [s.completion_token_ids for s in shards] == [e.completion_token_ids for e in expected]
    assert ray.get(pool.outstanding_work.remote()) == [0, 0]
    assert ray.get([engine.weight_version.remote() for engine in engines]) == [0, 0]
    # Only zero-count requests: one (empty) shard comes back.
    empty = ray.get(ray.get(pool.generate.remote([requests[1]], sampling, 6)))
    assert len(empty) == 1 and len(empty[0]) == 0
    for engine in engines:
        ray.kill(engine)
    ray.kill(pool)


def _gated_engine_class(ray):
    @ray.remote(max_concurrency=4)
    class GatedEngine:
        """A stand-in engine that holds its results until released (to make work outstanding)."""

        def __init__(self, gated: bool):
            self.gate = threading.Event()
            if not gated:
                self.gate.set()

        def generate(self, requests, sampling, seed):
            self.gate.wait(60)
            rollout = Rollout()
            for request in requests:
                for _ in range(request.num_samples):
                    rollout.request_index.append(request.request_index)
            return rollout

        def release(self):
            self.gate.set()

    return GatedEngine


def test_pool_balances_by_outstanding_work(ray_local):
    ray = ray_local
    from actors.generator_pool import GeneratorPool

    gated_class = _gated_engine_class(ray)
    busy, free = gated_class.options(num_cpus=0.01).remote(True), gated_class.options(num_cpus=0.01).remote(False)
    pool = GeneratorPool.options(num_cpus=0.01).remote([busy, free])
    sampling = SamplingParams(max_new_tokens=4)

    first = ray.get(pool.generate.remote(make_requests([2] * 8), sampling, 0))   # 8 samples each
    assert len(first) == 2
    ray.get(first[1])                                                          # the free engine's half is done
    assert ray.get(pool.outstanding_work.remote()) == [8 * 4, 0]
    # The next call (8 samples × 4 tokens) fits under the busy engine's backlog: all to the free one.
    second = ray.get(pool.generate.remote(make_requests([1] * 8), sampling, 1))
    assert len(second) == 1
    assert ray.get(second[0]).request_index == list(range(8))
    # Returned in request order even when the shards finish out of order.
    ray.get(busy.release.remote())
    merged = Rollout.concat(ray.get(first))
    assert merged.request_index == [k for k in range(8) for _ in range(2)]
    assert ray.get(pool.outstanding_work.remote()) == [0, 0]
    # Idle again: an even split.
    assert len(ray.get(pool.generate.remote(make_requests([1] * 8), sampling, 2))) == 2
    for actor in (busy, free, pool):
        ray.kill(actor)


def test_the_pool_keeps_no_shard_it_handed_out(ray_local):
    """Issue #19 finding 9: Ray kept every result under its inline limit (100 KiB) in the owner's memory
    store once the owner handed the ref on, so the pool grew by one ~78 KB rollout shard per step
    (benchmarks/soak.py). Engines made with `generator_options` return larger-than-8-KiB results
    through the shared object store: after many steps of generate, fetch and weight update (the
    driver's async order), the pool's own store holds no shard bytes. Without the option the same
    loop leaves about one shard per step there."""
    ray = ray_local
    from actors.generator_pool import GeneratorPool
    from rl_service.driver.roles import INLINE_RESULT_BYTES, generator_options

    shard_bytes = 64 * 1024

    @ray.remote
    class ShardEngine:   # an engine's call pattern, a result the size of a quickstart shard
        def generate(self, shard, sampling, seed):
            return os.urandom(shard_bytes)

        def load_weights(self, notice):
            return 1

    @ray.remote
    class Learner:   # reads the shards where they are (the driver only waits for them), publishes
        def train(self, shard_refs):
            return sum(len(result) for result in ray.get(shard_refs))

        def publish(self, version):
            return version

    config = load_config(None, ["job_name=inline_results", "generator.num_cpus=0.1"])
    options = generator_options(config, 0)
    pass  #  == str(INLINE_RESULT_BYTES)
    engine = ShardEngine.options(**options).remote()
    pool = GeneratorPool.options(num_cpus=0.01).remote([engine])
    learner = Learner.remote()
    sampling = SamplingParams(max_new_tokens=4)
    # Async mode's order (rl_service/driver/rollout_client.py): step k + 1's rollout is launched before step
    # k's is trained on; in sync mode Ray kept only a few shards.
    ahead = ray.get(pool.generate.remote(make_requests([2, 2]), sampling, 0, True))
    for step in range(40):
        refs, ahead = ahead, ray.get(pool.generate.remote(make_requests([2, 2]), sampling, step + 1, True))
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        assert ray.get(learner.train.remote(refs)) == shard_bytes
        del refs
        assert ray.get(pool.update_weights.remote([learner.publish.remote(step + 1)])) == [1]
    ray.get(ahead)
    del ahead
    store_bytes = ray.get(pool.__ray_call__.remote(
        lambda _: ray._private.worker.global_worker.core_worker.get_local_memory_store_bytes_used()))
    assert store_bytes < shard_bytes, store_bytes

"""Weight sync's transports behind one `publish(version)` (real Ray on 127.0.0.1, real DeepSpeed).

The collective transport is the GPU one (NCCL); here it runs over gloo, the same code with CPU
buffers: learner rank 0 of a two-rank ZeRO-3 learner broadcasts bucket by bucket to an HF and a vLLM
engine. Afterwards every engine serves the new version and samples with the learner's log-probs.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import arithmetic_requests, assert_engines_match_the_learner
from rl_service.config import load_config
from rl_service.rollout import SamplingParams


@dataclass
class _Roles:
    learner: object
    generators: list
    pool: object


def _config(transport: str, backend: str = "hf"):
    return load_config(None, ["learner.num_ranks=2", "learner.zero_stage=3", "learner.lr=1e-3",
                              "learner.micro_batch_size=8", "data.prompts_per_step=4", "generator.samples_per_prompt=4",
                              f"weight_sync.transport={transport}", "weight_sync.bucket_mb=0.05",
                              f"generator.backend={backend}", "cluster.torch_threads=1"])


def _sync_and_check(ray, transport: str, backends: list[str]) -> dict[str, float]:
    from actors.generator import GeneratorActor
    from actors.generator_pool import GeneratorPool
    from actors.learner_group import start_learner_group
    from rl_service.driver.weight_sync import make_weight_sync

    config = _config(transport)
    group = start_learner_group(config)
    engines = [GeneratorActor.options(num_cpus=0.5).remote(_config(transport, backend), index)
               for index, backend in enumerate(backends)]
    pool = GeneratorPool.options(num_cpus=0.1).remote(engines)
    try:
        sync = make_weight_sync(_Roles(group, engines, pool), config)
        assert sync.transport == transport
        # A step of training on the engines' own samples, so version 1 differs from version 0.
        first = ray.get(pool.generate.remote(arithmetic_requests(4, 4, seed=1), SamplingParams(max_new_tokens=16), 3))
        ray.get(group.train_step.remote(first, [float(k % 3 == 0) for k in range(16)]))
        versions, metrics = sync.publish(1)
        assert versions == [1] * len(engines)
        assert_engines_match_the_learner(ray, pool, group, version=1)
        if transport == "shared_memory":
            _check_the_mailbox(ray, sync, group, pool, first, backends)
        with pytest.raises(Exception, match="went backwards"):
            ray.get(engines[0].load_weights.remote(ray.get(group.publish_weights.remote(0, via_object_store=True))))
        return metrics
    finally:
        group.release()
        for engine in engines:
            ray.kill(engine)


def test_object_store_transport_reports_bytes_and_seconds(ray_session):
    from rl_service.models.loading import load_causal_lm

    metrics = _sync_and_check(ray_session, "object_store", ["hf", "hf"])
    parameters = sum(tensor.numel() for tensor in load_causal_lm("builtin", "float32", False).parameters())
    assert metrics["weight_sync_bytes"] == 4 * parameters and metrics["weight_sync_seconds"] > 0


def test_collective_transport_over_gloo_reaches_an_hf_and_a_vllm_engine(ray_session):
    pytest.importorskip("vllm")
    metrics = _sync_and_check(ray_session, "collective", ["hf", "vllm"])
    assert metrics["weight_sync_bytes"] > 0


def _check_the_mailbox(ray, sync, group, pool, rollout, backends) -> None:
    """HF engines serve from the slot of the latest version, vLLM engines from their own copy; the
    next versions go to the other slot, each time served whole."""
    from rl_service.weights.shared_memory import MailboxLayout, WeightMailbox

    path, _, layout = ray.get(group.ranks[0].open_weight_mailbox.remote("again"))
    assert ray.get(group.ranks[0].open_weight_mailbox.remote("once more"))[0] == path   # one mailbox per learner
    assert isinstance(layout, MailboxLayout)
    mailbox = WeightMailbox.open(path, layout)
    for version in (2, 3):
        ray.get(group.train_step.remote(rollout, [float(k % 2 == 0) for k in range(16)]))
        versions, metrics = sync.publish(version)
        assert versions == [version] * len(backends) and metrics["weight_sync_bytes"] == layout.num_bytes
        latest = int(mailbox.header[4])
        held = {index: slot for index, _, slot in mailbox.readers()}
        assert held == {index: latest if backend == "hf" else None for index, backend in enumerate(backends)}
        assert_engines_match_the_learner(ray, pool, group, version=version)


def test_shared_memory_transport_serves_hf_from_the_mailbox_and_reloads_vllm(ray_session):
    pytest.importorskip("vllm")
    metrics = _sync_and_check(ray_session, "shared_memory", ["hf", "vllm"])
    assert metrics["weight_sync_bytes"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL weight broadcast needs 2 GPUs (learner rank 0 and "
                                                            "an engine on separate devices); this host has "
                                                            f"{torch.cuda.device_count()}")
def test_collective_transport_over_nccl_between_two_gpus():
    """Learner side on GPU 0, receiver on GPU 1, in two processes: the bytes arrive intact."""
    import multiprocessing

    from rl_service.training.engine import free_port

    port = free_port()
    context = multiprocessing.get_context("spawn")
    receiver = context.Process(target=_nccl_receiver, args=(port,))
    receiver.start()
    from rl_service.weights.collective import WeightBroadcastGroup
    from rl_service.weights.flat import flatten_named_tensors

    torch.cuda.set_device(0)
    group = WeightBroadcastGroup("127.0.0.1", port, 0, 2, "cuda:0", 120)
    torch.manual_seed(0)
    named = [("a", torch.randn(1000, 256)), ("b", torch.randn(77).to(torch.bfloat16))]
    assert group.send([flatten_named_tensors(named, 1)]) > 0
    receiver.join(120)
    assert receiver.exitcode == 0


def _nccl_receiver(port: int) -> None:
    from rl_service.weights.collective import BucketLayout, WeightBroadcastGroup
    from rl_service.weights.flat import flatten_named_tensors

    torch.cuda.set_device(1)
    torch.manual_seed(0)
    named = [("a", torch.randn(1000, 256)), ("b", torch.randn(77).to(torch.bfloat16))]
    layout = BucketLayout.of(flatten_named_tensors(named, 1))
    group = WeightBroadcastGroup("127.0.0.1", port, 1, 2, "cuda:1", 120)
    (bucket,) = list(group.receive([layout]))
    for (name, want), (got_name, got) in zip(named, bucket):
        assert name == got_name and torch.equal(want, got.cpu())

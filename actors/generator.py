"""GeneratorActor: one inference engine serving one weight version at a time."""
from __future__ import annotations

import ray

from actors.process import configure_process, role_threads
from rl_service.config import JobConfig
from rl_service.generation.engines import make_engine
from rl_service.rollout import GenerationRequest, Rollout, SamplingParams
from rl_service.weights.flat import FlatWeights, PublishedWeights


@ray.remote
class GeneratorActor:
    def __init__(self, config: JobConfig, engine_index: int):
        configure_process(role_threads(config, "generator"))
        self.engine_index = engine_index
        self.engine = make_engine(config)

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams, seed: int) -> Rollout:
        return self.engine.generate(requests, sampling, seed)

    def load_weights(self, weights: PublishedWeights | FlatWeights) -> int:
        """Load one version: published buckets (read zero-copy from this node's object store) or one
        flat buffer. Calls to an actor run one at a time, so no generate call sees half a version."""
        if isinstance(weights, PublishedWeights):
            weights = ray.get(weights.bucket_refs)
        return self.engine.load_weights(weights)

    def node_id(self) -> str:
        """The Ray node this engine runs on (placement checks, the dashboard's view)."""
        return ray.get_runtime_context().get_node_id()

    def weight_group_size(self) -> int:
        """Members this engine adds to the collective weight group (one per worker)."""
        return self.engine.weight_group_size

    def join_weight_group(self, master_addr: str, master_port: int, first_rank: int, world_size: int,
                          device: str, timeout_s: float) -> bool:
        self.engine.join_weight_group(master_addr, master_port, first_rank, world_size, device, timeout_s)
        return True

    def receive_weights(self, layouts: list, version: int) -> int:
        """Collective transport: receive version `version` from learner rank 0 and load it in place."""
        return self.engine.receive_weights(layouts, version)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def shutdown(self) -> None:
        """Stop the engine before Ray tears the process down (vLLM: no abort at exit)."""
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()

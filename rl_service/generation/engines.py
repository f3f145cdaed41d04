"""Pick the generation backend a job asks for; both share one interface (`generate`, `load_weights`,
`weight_version`, `tokenizer`), so the generator actor never knows which one it holds."""
from __future__ import annotations

from rl_service.config import JobConfig


def make_engine(config: JobConfig):
    model, generator = config.model, config.generator
    if generator.backend == "hf":
        from rl_service.generation.hf_engine import HFGenerationEngine

        return HFGenerationEngine(model.path, model.dtype, model.trust_remote_code)
    if generator.backend == "torch":
        from rl_service.generation.torch_engine import TorchGenerationEngine

        return TorchGenerationEngine(model.path, model.dtype, model.trust_remote_code)
    from rl_service.generation.vllm_engine import VLLMGenerationEngine

    engine_kwargs = {} if generator.kv_cache_blocks is None else {"num_gpu_blocks_override": generator.kv_cache_blocks}
    return VLLMGenerationEngine(model.path, model.dtype, model.trust_remote_code,
                                tensor_parallel_size=generator.tensor_parallel, engine_kwargs=engine_kwargs)

"""The vLLM generation backend: the same interface and the same samples' meaning as `HFGenerationEngine`.

What a caller gets is what the HF reference returns (rl_service/rollout.py): per request, its
`num_samples` completions in order, token ids through EOS when they stopped, the behaviour log-probs
`log softmax(logits / T)` of every sampled token (top-p truncation not reflected, as TRL and verl
define π_old and as the learner recomputes it), decoded texts with special tokens kept, and the weight
version that produced them. vLLM is driven with prompt token ids only (`skip_tokenizer_init`): the
model directory's own tokenizer, loaded by `load_tokenizer`, encodes and decodes, because
transformers' `AutoTokenizer` would re-tokenize the built-in model differently.

Three things vLLM 0.32 does not do by itself, supplied here (the first two by the worker extension):
- Log-probs of the temperature-scaled, untruncated distribution: `logprobs_mode="processed_logprobs"`
  renormalises over the top-p nucleus, so with top_p < 1 it disagrees with HF and with the learner.
- In-place weight updates on CPU: the CPU backend repacks linear weights into kernel handles and
  empties the parameters, so `model.load_weights` fails; `reload_weights` (layerwise) works, except
  that a tied `lm_head` keeps the old packed copy of the embedding, which must be repacked.
- A fresh prefix cache after an update, so no prompt reuses KV computed with the old weights.
And one setting: on CPU, chunked prefill is off. A seeded request whose prompt is split over two
steps makes vLLM rewind its generator's offset, which CPU generators lack ("CPU Generator does not
use offset"): any step whose prompts exceed `max_num_batched_tokens` would crash.

The CPU recipes of DESIGN.md ("Known working recipes") are applied as environment defaults before
vLLM is imported; any of them set by the operator wins. Threads: vLLM means to serve with one torch
thread, but its CPU worker first replaces `torch.set_num_threads` with a no-op, so in-process the
reduction never happens; with 2 threads on 2 shared cores, generation measured 5-10x slower and
erratic (OpenMP spin-waits on every small step). The engine sets `cpu_threads` itself and puts
`torch.set_num_threads` back, so the rest of the process can still set its own.
No Ray here: `actors/` wraps this class.
"""
from __future__ import annotations

import gc
import os
import threading
from typing import Sequence

import numpy as np
import torch

from rl_service.errors import ModelLoadError
from rl_service.models.loading import load_tokenizer, resolve_model_dir
from rl_service.rollout import GenerationRequest, Rollout, SamplingParams
from rl_service.weights.flat import FlatWeights, named_tensors_of

# Measured on the 2-core CPU machines (DESIGN.md). setdefault: an operator's value wins.
VLLM_CPU_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",   # in-process engine: no engine-core process to leak
    "VLLM_CPU_KVCACHE_SPACE": "1",           # GiB (an integer) of KV cache, resident; CPU ignores kv_cache_memory_bytes
    "TORCHDYNAMO_DISABLE": "1",              # vLLM's torch.compile'd helpers cost 9-16 s at start on 2 cores
    "VLLM_USE_V2_MODEL_RUNNER": "0",         # the log-prob hook below targets the V1 runner's sampler
}
# Every weight reload logs INFO lines and "RotaryEmbedding/ParallelLMHead: Failed to load weights"
# warnings (layers with nothing to load: expected); per step that drowns the run's own log.
VLLM_LOG_LEVEL_DEFAULT = "ERROR"

WORKER_EXTENSION = f"{__name__}.WeightSyncWorkerExtension"


def apply_vllm_env_defaults(on_cpu: bool = True) -> None:
    """Set the recipes before `import vllm` (vLLM and torch read some of them at import time)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", VLLM_LOG_LEVEL_DEFAULT)
    for name, value in VLLM_CPU_ENV_DEFAULTS.items():
        if on_cpu or name == "VLLM_USE_V2_MODEL_RUNNER":
            os.environ.setdefault(name, value)


def request_seed(seed: int, request_index: int) -> int:
    """The sampling seed of one request: depends only on the call's seed and the request's position."""
    return (seed * 1_000_003 + request_index * 104_729 + 7) % (2**31 - 1)


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called through `LLM.collective_rpc`.

    Runs inside every worker, so with tensor parallelism each rank loads its own shard.
    """

    def rl_use_untruncated_logprobs(self) -> bool:
        """Make the sampler report log softmax(logits / T) of the drawn token, before top-k/top-p."""
        sampler = getattr(getattr(self, "model_runner", None), "sampler", None)
        truncating = getattr(sampler, "topk_topp_sampler", None)
        if truncating is None:
            raise RuntimeError("vLLM's model runner has no sampler.topk_topp_sampler; this vLLM version is "
                               "not supported by VLLMGenerationEngine (set VLLM_USE_V2_MODEL_RUNNER=0)")
        if getattr(truncating, "rl_untruncated_logprobs", False):
            return True
        truncating_forward = truncating.forward

        def forward(logits, generators, k, p):
            # `logits` arrive divided by the temperature and not yet truncated; the truncating sampler
            # masks them in place, so take the log-softmax first.
            logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
            sampled, _ = truncating_forward(logits, generators, k, p)
            return sampled, logprobs

        truncating.forward = forward
        truncating.rl_untruncated_logprobs = True
        return True

    def rl_join_weight_group(self, master_addr: str, master_port: int, first_rank: int, world_size: int,
                             device: str, timeout_s: float) -> bool:
        """Join the learner-engines weight group as member `first_rank` + this worker's TP rank."""
        from rl_service.weights.collective import WeightBroadcastGroup

        rank = first_rank + int(getattr(self, "rank", 0))
        self.rl_weight_group = WeightBroadcastGroup(master_addr, master_port, rank, world_size, device, timeout_s)
        return True

    def rl_receive_weights(self, layouts) -> int:
        """Receive every bucket from learner rank 0, then reload them all at once (as the object-store
        path does), so the model never holds two versions."""
        named = [item for bucket in self.rl_weight_group.receive(layouts) for item in bucket]
        return self.rl_reload_weights(named)

    def rl_reload_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format (HF-named) tensors in place and redo what the kernels derived from them."""
        self.reload_weights(weights_iterator=named_tensors)
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # A tied lm_head shares the embedding's parameter but keeps its own packed GEMM copy,
            # which reload_weights does not rebuild (nothing is loaded under the lm_head's name).
            for module in self.model_runner.get_model().modules():
                if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
                    module.quant_method.process_weights_after_loading(module)
        return len(named_tensors)


class VLLMGenerationEngine:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False, *,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 enforce_eager: bool | None = None, cpu_threads: int | None = 1, engine_kwargs: dict | None = None):
        on_cpu = not torch.cuda.is_available()
        apply_vllm_env_defaults(on_cpu)
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ModelLoadError(f"generator.backend vllm: vLLM is not installed ({exc}); on CPU run "
                                 "scripts/install_vllm_cpu.sh") from None
        directory = resolve_model_dir(model_path)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.weight_version = 0
        self._lock = threading.Lock()   # a weight load never lands inside a generate call
        settings = {"enable_chunked_prefill": False} if on_cpu else {}
        settings.update(engine_kwargs or {})
        set_num_threads = torch.set_num_threads
        if on_cpu and cpu_threads is not None:
            set_num_threads(cpu_threads)
        try:
            self.llm = LLM(
                model=str(directory), dtype=dtype, trust_remote_code=trust_remote_code,
                skip_tokenizer_init=True, tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len, enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION, seed=0, **settings)
        except Exception as exc:  # vLLM reports unsupported head sizes, missing files, ... in many types
            raise ModelLoadError(f"model.path: vLLM cannot load {directory} ({type(exc).__name__}: {exc})") from exc
        finally:
            torch.set_num_threads = set_num_threads
        self.llm.collective_rpc("rl_use_untruncated_logprobs")
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def load_weights(self, flat: FlatWeights | Sequence[FlatWeights]) -> int:
        """One version, as one flat buffer or as its buckets: one reload of all of them, under the
        lock, so no generate call sees a mix of versions."""
        buckets = list(flat) if isinstance(flat, (list, tuple)) else [flat]
        return self._reload(named_tensors_of(buckets), buckets[0].version)

    def load_shared_weights(self, named_tensors, version: int, share: bool = True) -> bool:
        """One version as views of the node's weight mailbox: reloaded (one copy), never shared, since
        vLLM keeps its own weight layout (on CPU, GEMM weights repacked for its kernels)."""
        self._reload(list(named_tensors), version)
        return False

    def _reload(self, named_tensors: list, version: int) -> int:
        return self._update_weights("rl_reload_weights", (named_tensors,), version)

    def _update_weights(self, worker_method: str, args: tuple, version: int) -> int:
        """Run a weight-loading worker method under the lock, so no generate call sees a mix of
        versions; refuses a version older than the one served."""
        if version < self.weight_version:
            raise ValueError(f"weight version went backwards: {version} < {self.weight_version}")
        with self._lock:
            self.llm.collective_rpc(worker_method, args=args)
            self.llm.reset_prefix_cache()   # cached KV was computed with the old weights
            self.weight_version = version
        return self.weight_version

    @property
    def weight_group_size(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size

    def join_weight_group(self, master_addr: str, master_port: int, first_rank: int, world_size: int,
                          device: str, timeout_s: float) -> None:
        self.llm.collective_rpc("rl_join_weight_group",
                                args=(master_addr, master_port, first_rank, world_size, device, timeout_s))

    def receive_weights(self, layouts, version: int) -> int:
        return self._update_weights("rl_receive_weights", (layouts,), version)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams, seed: int) -> Rollout:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm import TokensPrompt

        for request in requests:
            if len(request.prompt_token_ids) >= self.max_model_len:
                raise ValueError(f"request {request.request_index} (prompt {request.prompt_id}): prompt of "
                                 f"{len(request.prompt_token_ids)} tokens does not fit the context of {self.max_model_len}")
        # Greedy samples are identical: generate one (vLLM allows n=1 only) and repeat it.
        active = [request for request in requests if request.num_samples > 0]
        prompts = [TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)) for request in active]
        params = [VLLMSamplingParams(
            n=1 if sampling.greedy else request.num_samples,
            temperature=sampling.temperature, top_p=1.0 if sampling.greedy else sampling.top_p, top_k=0,
            max_tokens=min(sampling.max_new_tokens, self.max_model_len - len(request.prompt_token_ids)),
            seed=request_seed(seed, request.request_index), logprobs=0,
            stop_token_ids=[self.eos_token_id], detokenize=False) for request in active]
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
            version = self.weight_version

        rollout = Rollout()
        for request, output in zip(active, outputs):
            completions = sorted(output.outputs, key=lambda completion: completion.index)
            if sampling.greedy:
                completions = completions * request.num_samples
            for completion in completions:
                tokens = list(completion.token_ids)
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
                finished = bool(tokens) and tokens[-1] == self.eos_token_id
                rollout.request_index.append(request.request_index)
                rollout.prompt_token_ids.append(request.prompt_token_ids)
                rollout.completion_token_ids.append(tokens)
                rollout.behaviour_logprobs.append(np.asarray(logprobs, dtype=np.float32))
                # Keep <think>/</think> (they may be special tokens): verifiers find the answer after them.
                text_tokens = tokens[:-1] if finished else tokens
                rollout.completion_texts.append(self.tokenizer.decode(text_tokens, skip_special_tokens=False))
                rollout.finished.append(finished)
                rollout.weight_versions.append(version)
        return rollout

    def shutdown(self) -> None:
        """Stop the engine core (and its process in multiprocess mode) so nothing aborts at exit."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

"""A learner rank's DeepSpeed engine: its process group, its config, its weights going out.

Every rank builds the same model from the same seed and DeepSpeed partitions what the ZeRO stage
says (1: optimizer state, 2: + gradients, 3: + parameters). The process group is set up by the ranks
themselves from an address rank 0 hands out (`actors/learner_group.py`): gloo on CPU, NCCL on GPU.
No Ray here.
"""
from __future__ import annotations

import functools
import os
import socket
from contextlib import closing, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch

from rl_service.config import JobConfig
from rl_service.models.loading import load_causal_lm, load_tokenizer
from rl_service.weights.flat import FlatWeights, WeightViews, flatten_named_tensors, plan_buckets, tensor_views
from rl_service.training.lora import unchanged
from rl_service.training.rendezvous import rendezvous_store
from rl_service.weights.collective import BucketLayout
from rl_service.weights.shared_memory import MailboxLayout

# How long a collective (a gradient reduction, a ZeRO-3 gather) may wait for the slowest rank.
# Joining has its own, shorter limit (`learner.join_timeout_s`), enforced by the group.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def free_port(host: str = "127.0.0.1") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_process_group(rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                       master_port: int | None = None) -> None:
    """Join the learner's process group (gloo on CPU, NCCL on GPU); a world of one needs no peer."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # Always an explicit port: an inherited MASTER_PORT (a process that ran a learner before starting
    # Ray passes its environment on to every actor) names a port that process still listens on.
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port or free_port(master_addr)),
                      RANK=str(rank), WORLD_SIZE=str(world_size),
                      # Ray gives each GPU rank its own CUDA_VISIBLE_DEVICES: its one device is device 0.
                      LOCAL_RANK="0")
    if master_addr in ("127.0.0.1", "localhost"):
        # A local job: gloo's own listeners stay on loopback too (they bind the hostname's address).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op that only its inference
        # path uses. The build holds a file lock in ~/.cache/torch_extensions: a process killed while
        # building leaves the lock behind and every later learner waits on it forever (seen after a
        # killed test run). Training never calls the op, so it is not built.
        import importlib

        # (`deepspeed.comm.torch` as an attribute is torch itself: take the module by its name.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # The rendezvous store made here, not by torch's env:// (whose server listens on every interface,
    # without authentication): rank 0 serves it from a socket bound to `master_addr` only (loopback
    # for a local job). DeepSpeed then finds the group already initialised and wraps it.
    store = rendezvous_store(master_addr, int(os.environ["MASTER_PORT"]), world_size, rank == 0, COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=COLLECTIVE_TIMEOUT,
                               rank=rank, world_size=world_size)


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(config: JobConfig) -> dict:
    learner = config.learner
    zero: dict = {"stage": learner.zero_stage}
    if learner.offload == "cpu" and learner.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if learner.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # Batches vary in size (GVM, filtered groups): we own the accumulation boundary and the
        # loss normalisation, and call step() once per mini-batch.
        "managed_gradient_accumulation": False,
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # Offload with our torch AdamW (DeepSpeedCPUAdam needs a C++ build a CPU host may lack).
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": config.model.dtype == "bfloat16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(config: JobConfig, resume_from: str | Path | None = None):
    """(tokenizer, DeepSpeed engine) of the policy: seeded, AdamW with linear warm-up, our config;
    weights from `model.path`, or from the checkpoint `resume_from` (its `model/`; under LoRA the
    base from `model.path` and the adapter from its `adapter/`). The process group must exist
    (`init_process_group`); a world of one is made here if not."""
    import deepspeed

    torch.manual_seed(config.seed)
    init_process_group()
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    lora = config.learner.lora
    checkpoint = Path(resume_from) if resume_from is not None else None
    weights_from = config.model.path if lora is not None or checkpoint is None else str(checkpoint / "model")
    # Every rank materialises the whole model before ZeRO-3 partitions it: deepspeed.zero.Init, which
    # would build it partitioned, fails on torch 2.13 (its Tensor.__new__ patch no longer matches).
    model = load_causal_lm(weights_from, config.model.dtype, config.model.trust_remote_code)
    model.config.use_cache = False
    if lora is not None:
        from rl_service.training.lora import ADAPTER_DIR, with_adapters

        model = with_adapters(model, lora, checkpoint / ADAPTER_DIR if checkpoint is not None else None)
    learner = config.learner
    # Only what trains (all of it, or the adapters) gets optimizer state.
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad],
                                  lr=learner.lr, betas=learner.adam_betas,
                                  weight_decay=learner.weight_decay, foreach=False)
    warmup = learner.warmup_steps

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(config))
    return tokenizer, engine


def reference_policy(config: JobConfig, engine):
    """π_ref, the initial policy frozen (the KL term's reference, §DPO's π_ref): a second copy from
    `model.path`, or under LoRA the engine's own base with the adapters off (no second copy)."""
    if config.learner.lora is not None:
        from rl_service.training.lora import AdaptersOff

        return AdaptersOff(engine.module)
    return load_causal_lm(config.model.path, config.model.dtype, config.model.trust_remote_code).eval().requires_grad_(False)


@contextmanager
def gathered(parameters: list[torch.nn.Parameter], zero_stage: int) -> Iterator[None]:
    """ZeRO-3: the full values of `parameters` on every rank inside the block (a collective: every
    rank enters it with the same list); other stages hold them whole already."""
    if zero_stage != 3:
        with nullcontext():
            yield
        return
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(parameters, modifier_rank=None):
        yield


def full_numel(parameter: torch.nn.Parameter) -> int:
    return int(getattr(parameter, "ds_numel", parameter.numel()))


class EngineWeights:
    """What every learner does with its weights: publish them in flat buckets (DESIGN.md "Weight sync")
    and save them as a loadable HF directory (safetensors + tokenizer). Needs `engine`, `tokenizer`
    and `config`. Under LoRA what goes out is the merged weights under the base's names
    (rl_service/training/lora.py): the engines never see adapters."""

    weight_version = 0   # the version these weights were last published as (0: the initial model)

    def published_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of what the generators load: the parameters, or the merged LoRA weights."""
        return [(name, make()) for name, _, make in self._published_sources()]

    def _published_sources(self) -> list[tuple[str, torch.Tensor, Callable[[], torch.Tensor]]]:
        """(name, a tensor of the published shape and dtype, what makes the published tensor): under
        LoRA a merged layer is made only when its bucket goes out (rl_service/training/lora.py)."""
        if self.config.learner.lora is not None:
            from rl_service.training.lora import published_sources

            return list(published_sources(self.engine.module))
        return [(name, parameter, functools.partial(unchanged, parameter))
                for name, parameter in self.engine.module.named_parameters()]

    def weight_buckets(self, version: int, bucket_bytes: int | None = None,
                       packed: bool = True) -> Iterator[FlatWeights | WeightViews]:
        """The weights as buckets of at most `bucket_bytes` (one tensor larger than that is a bucket
        of its own): packed into one flat buffer each (`FlatWeights`, what a broadcast sends), or as
        views of the parameters (`WeightViews`, valid until the next bucket: what `ray.put` copies).
        Rank 0 yields them, the other ranks only take part in ZeRO-3's gathers. Under ZeRO-3 only one
        bucket is gathered at a time, so no rank ever holds the whole model."""
        if bucket_bytes is None:
            bucket_bytes = int(self.config.weight_sync.bucket_mb * 2**20)
        self.weight_version = version
        rank, _ = rank_and_world()
        sources = {name: (tensor, make) for name, tensor, make in self._published_sources()}
        sizes = [(name, full_numel(tensor) * tensor.element_size()) for name, (tensor, _) in sources.items()]
        for bucket in plan_buckets(sizes, bucket_bytes):
            with gathered([sources[name][0] for name in bucket], self.config.learner.zero_stage):
                if rank == 0:
                    pack = flatten_named_tensors if packed else tensor_views
                    yield pack(((name, sources[name][1]()) for name in bucket), version)

    def bucket_layouts(self) -> list[BucketLayout]:
        """The layout of every bucket `weight_buckets` packs (the same at every version), from the
        parameters' full shapes: nothing is packed, gathered or merged."""
        bucket_bytes = int(self.config.weight_sync.bucket_mb * 2**20)
        named = {name: tensor for name, tensor, _ in self._published_sources()}
        sizes = [(name, full_numel(tensor) * tensor.element_size()) for name, tensor in named.items()]
        return [BucketLayout.plan((name, tuple(getattr(named[name], "ds_shape", named[name].shape)), named[name].dtype)
                                  for name in bucket)
                for bucket in plan_buckets(sizes, bucket_bytes)]

    def mailbox_layout(self) -> MailboxLayout:
        """Where each parameter sits in a weight-mailbox slot: from full shapes, nothing gathered or merged."""
        return MailboxLayout.of((name, tuple(getattr(tensor, "ds_shape", tensor.shape)), tensor.dtype)
                                for name, tensor, _ in self._published_sources())

    def flat_weights(self, version: int) -> FlatWeights:
        """All weights in one flat buffer (rank 0; a world of one, or tests)."""
        (flat,) = list(self.weight_buckets(version, bucket_bytes=2**62))
        return flat

    def save_pretrained(self, directory: str | Path) -> None:
        """A loadable HF directory of the weights (under LoRA: merged, with the adapter in `adapter/`).
        Rank 0 writes; under ZeRO-3 every rank must call it (the parameters are gathered)."""
        directory = Path(directory)
        rank, _ = rank_and_world()
        with gathered(list(self.engine.module.parameters()), self.config.learner.zero_stage):
            if rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                if self.config.learner.lora is not None:
                    from rl_service.training.lora import ADAPTER_DIR, save_adapter, save_merged

                    save_merged(self.engine.module, self.tokenizer, directory)
                    save_adapter(self.engine.module, directory / ADAPTER_DIR)
                    return
                self.engine.module.save_pretrained(str(directory), safe_serialization=True)
                self.tokenizer.save_pretrained(str(directory))

    def save_checkpoint_weights(self, directory: str | Path) -> None:
        """A checkpoint's weights, what `build_engine(config, directory)` resumes from: `model/`; under
        LoRA the adapter (`adapter/`) and, with `lora.save_merged`, the merged model in `model/`."""
        directory = Path(directory)
        lora = self.config.learner.lora
        if lora is None:
            self.save_pretrained(directory / "model")
            return
        from rl_service.training.lora import ADAPTER_DIR, save_adapter, save_merged

        if rank_and_world()[0] == 0:   # no ZeRO-3 under LoRA: every rank holds the adapters whole
            save_adapter(self.engine.module, directory / ADAPTER_DIR)
            if lora.save_merged:
                save_merged(self.engine.module, self.tokenizer, directory / "model")

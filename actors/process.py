"""Process set-up shared by every actor: environment and CPU threads before torch does work."""
from __future__ import annotations

import os

# Environment every role's process needs, for Ray's runtime_env (set before modules import torch).
ACTOR_ENV = {
    "DS_ACCELERATOR": "cpu",              # DeepSpeed picks CUDA itself where it exists; on CPU it must be told
    "TOKENIZERS_PARALLELISM": "false",    # actors fork nothing; avoid the tokenizers fork warning
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_OFFLINE": "1",                # models are local directories; never reach for a hub
    # An actor's output goes to the driver's log, never a terminal: transformers' and the hub's tqdm
    # bars ("Writing model shards", "Loading weights") filled a job's log with a pair per checkpoint.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

# The learner copies every weight version into the weight mailbox tensor by tensor, a few MiB each.
# glibc's memcpy streams past the cache (non-temporal stores) only above ~3/4 of the L3 size (181
# MiB on the CI machine), so those copies ran through the cache at about half the bandwidth of one
# large copy: 381 MiB in 10 MiB pieces took 60 ms against 35 ms in one piece, and 35 ms in pieces
# with the threshold at 1 MiB (benchmarks/README.md, weight sync). Other architectures and libcs
# ignore the variable.
LEARNER_ENV = {**ACTOR_ENV, "GLIBC_TUNABLES": "glibc.cpu.x86_non_temporal_threshold=0x100000"}


def role_threads(config, role: str) -> int:
    """Torch threads of a generator or learner process on this node.

    `cluster.torch_threads` when set. Otherwise sync mode gives every role all cores (one role
    works at a time) and async mode halves them, generator and learner each taking half (they work
    at the same time; oversubscribed OpenMP threads spin and slow both down)."""
    if config.cluster.torch_threads:
        return config.cluster.torch_threads
    cores = os.cpu_count() or 1
    if config.schedule.mode == "async" and config.schedule.max_staleness > 0:
        return max(1, cores // 2) if role == "generator" else max(1, cores - cores // 2)
    return cores


def configure_process(torch_threads: int | None) -> None:
    """Pin torch's thread count: Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors, which would
    leave one core idle when a role runs alone in sync mode."""
    import torch

    for key, value in ACTOR_ENV.items():
        os.environ.setdefault(key, value)
    threads = torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)

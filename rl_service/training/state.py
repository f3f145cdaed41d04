"""A learner's training state in a checkpoint, without pickle: optimizer moments and step counts,
the LR schedule's position and torch's RNG, as `learner_state.safetensors` (tensors) plus
`learner_state.json` (everything else). Restored onto a learner built the same way (same model,
optimizer, ZeRO stage and world size), a run continues exactly where it stopped.

Torch's `state_dict` of an optimizer is `{"state": {index: {name: tensor | number}}, "param_groups":
[{hyper-parameters, "params": [index, ...]}]}`; tensors go to safetensors under
`optimizer/<index>/<name>`, numbers and groups to JSON. DeepSpeed ZeRO 1-2 keep the moments in their
own base optimizer over flat fp32 partitions: that optimizer is the one saved here.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

TENSORS_FILE = "learner_state.safetensors"
META_FILE = "learner_state.json"


def _files(directory: Path, rank: int) -> tuple[Path, Path]:
    """Rank 0's files keep the one-rank names; rank r > 0 (its own ZeRO partition) gets `.rank{r}`."""
    if rank == 0:
        return directory / TENSORS_FILE, directory / META_FILE
    return (directory / TENSORS_FILE.replace(".safetensors", f".rank{rank}.safetensors"),
            directory / META_FILE.replace(".json", f".rank{rank}.json"))


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding the moments: DeepSpeed's ZeRO wrapper keeps it as `.optimizer`."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


@contextmanager
def optimizer_with_params(engine) -> Iterator[torch.optim.Optimizer]:
    """The base optimizer with its parameters in place: ZeRO-3 puts its fp32 partitions into the
    param groups only around a step, and torch's state_dict needs them there."""
    wrapper = engine.optimizer
    zero3 = hasattr(wrapper, "_set_fp32_optimizer_param_groups")
    if zero3:
        wrapper._set_fp32_optimizer_param_groups()
    try:
        yield base_optimizer(engine)
    finally:
        if zero3:
            wrapper._clear_fp32_optimizer_param_groups()


def save_learner_state(directory: str | Path, engine, counters: dict[str, int], layout: dict, rank: int = 0) -> None:
    """`layout`: how the state is sharded (ZeRO stage, world size); a restore must match it.
    Every rank writes its own file (ZeRO 1-3 partition the optimizer state over the ranks)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with optimizer_with_params(engine) as optimizer:
        optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, dict[str, float | int]] = {}
    for index, slots in optimizer_state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                numbers.setdefault(str(index), {})[name] = value
    tensors["rng/torch"] = torch.get_rng_state()
    scheduler = engine.lr_scheduler
    scheduler_state = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"} \
        if scheduler is not None else None
    meta = {
        "param_groups": optimizer_state["param_groups"],
        "state_numbers": numbers,
        "scheduler": scheduler_state,
        "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                   "micro_steps": engine.micro_steps},
        "counters": counters,
        "layout": layout,
    }
    tensors_file, meta_file = _files(directory, rank)
    save_file(tensors, str(tensors_file))
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")


def load_learner_state(directory: str | Path, engine, layout: dict, rank: int = 0) -> dict[str, int]:
    """Restore what `save_learner_state` wrote onto `engine`; returns the saved counters."""
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors_file, meta_file = _files(directory, rank)
    if not meta_file.is_file():
        raise ValueError(f"{directory}: no optimizer state for learner rank {rank} ({meta_file.name}): the checkpoint "
                         f"was written by fewer ranks; resume with the same learner.num_ranks")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    for name, value in layout.items():
        if meta["layout"].get(name) != value:
            raise ValueError(f"{directory}: the checkpoint's optimizer state was written with {name} "
                             f"{meta['layout'].get(name)}, this learner has {value}; resume with the same setting")
    tensors = load_file(str(tensors_file))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, *rest = key.split("/")
        if kind == "optimizer":
            index, name = rest
            state.setdefault(int(index), {})[name] = value
    for index, numbers in meta["state_numbers"].items():
        state.setdefault(int(index), {}).update(numbers)
    with optimizer_with_params(engine) as optimizer:
        if len(optimizer.param_groups) != len(meta["param_groups"]):
            raise ValueError(f"{directory}: the checkpoint's optimizer has {len(meta['param_groups'])} parameter "
                             f"groups, this learner {len(optimizer.param_groups)} (another model, ZeRO stage or world size?)")
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if meta["scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    for name, value in meta["engine"].items():
        setattr(engine, name, value)
    torch.set_rng_state(tensors["rng/torch"])
    return meta["counters"]

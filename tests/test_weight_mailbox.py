"""The shared-memory weight mailbox (rl_service/weights/shared_memory.py), without Ray: layout,
round trip across processes, the two slots, the reader table that keeps a served slot from being
overwritten, orphan removal, and an HF engine serving its parameters from the mailbox."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from rl_service.weights.flat import copy_into_
from rl_service.weights.shared_memory import (ALIGNMENT, MailboxLayout, WeightMailbox, remove_orphans,
                                              room_for)


def _tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [("embed.weight", torch.randn(7, 5, generator=generator)),
            ("norm.weight", torch.randn(3, generator=generator).to(torch.bfloat16)),
            ("empty", torch.empty(0, 4)),
            ("steps", torch.arange(5, dtype=torch.int64) * seed)]


def _layout() -> MailboxLayout:
    return MailboxLayout.of((name, tensor.shape, tensor.dtype) for name, tensor in _tensors(0))


def _as_bytes(named):
    return [(name, tensor.reshape(-1).view(torch.uint8).numpy()) for name, tensor in named]


def _dead_pid() -> int:
    process = multiprocessing.get_context("spawn").Process(target=int)
    process.start()
    process.join()
    return process.pid


def test_layout_aligns_every_tensor_and_counts_its_bytes():
    layout = _layout()
    assert all(offset % ALIGNMENT == 0 for offset in layout.offsets)
    assert layout.tensor_bytes == (7 * 5 * 4, 3 * 2, 0, 5 * 8)
    assert layout.num_bytes == 140 + 6 + 40
    assert layout.slot_bytes % 4096 == 0 and layout.file_bytes == 4096 + 2 * layout.slot_bytes
    assert layout.offsets == (0, 192, 256, 256)   # 140 bytes rounded up to 192; the empty tensor takes none
    assert room_for(layout) and not room_for(MailboxLayout.of([("huge", (2**50,), torch.float32)]))


def _read_in_another_process(path: str, layout: MailboxLayout, slot: int, version: int, queue) -> None:
    reader = WeightMailbox.open(path, layout)
    queue.put([(name, bytes(array)) for name, array in _as_bytes(reader.tensors(slot, version))])


def test_a_version_written_by_one_process_is_read_whole_by_another(tmp_path):
    layout = _layout()
    writer = WeightMailbox.create(layout, tag="job/1", directory=tmp_path)
    assert writer.path.name.startswith("rl_service-weights-job_1-") and writer.path.name.endswith(f"-{os.getpid()}")
    slot = writer.write(_as_bytes(_tensors(3)), version=1)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_read_in_another_process, args=(str(writer.path), layout, slot, 1, queue))
    process.start()
    # A spawned process imports torch and this module first: 300 s, not 60, on a loaded 2-core machine.
    received = queue.get(timeout=300)
    process.join(300)
    assert received == [(name, bytes(array)) for name, array in _as_bytes(_tensors(3))]
    writer.close()
    assert not writer.path.exists()


def test_writes_alternate_slots_and_a_reader_sees_only_the_version_it_asks_for(tmp_path):
    layout = _layout()
    writer = WeightMailbox.create(layout, directory=tmp_path)
    reader = WeightMailbox.open(writer.path, layout)
    assert [writer.write(_as_bytes(_tensors(version)), version) for version in (1, 2, 3)] == [0, 1, 0]
    assert torch.equal(dict(reader.tensors(1, 2))["steps"], torch.arange(5) * 2)
    assert torch.equal(dict(reader.tensors(0, 3))["embed.weight"], _tensors(3)[0][1])
    with pytest.raises(ValueError, match="slot 0 holds version 3, not 1"):
        reader.tensors(0, 1)
    with pytest.raises(PermissionError):
        reader.write(_as_bytes(_tensors(4)), 4)
    writer.close()


def test_a_slot_an_engine_still_serves_is_never_overwritten(tmp_path):
    layout = _layout()
    writer = WeightMailbox.create(layout, directory=tmp_path)
    reader = WeightMailbox.open(writer.path, layout)
    writer.write(_as_bytes(_tensors(1)), 1)                    # slot 0
    reader.hold(5, 0)                                          # engine 5 serves version 1 from slot 0
    assert writer.readers() == [(5, os.getpid(), 0)]
    assert writer.write(_as_bytes(_tensors(2)), 2) == 1        # the other slot: allowed
    with pytest.raises(RuntimeError, match=r"slot 0 \(version 1\) is still served by engine\(s\) \[\(5, "):
        writer.write(_as_bytes(_tensors(3)), 3)
    assert torch.equal(dict(reader.tensors(0, 1))["steps"], torch.arange(5))   # untouched
    reader.hold(5, 1)                                          # engine 5 moved on to version 2
    assert writer.write(_as_bytes(_tensors(3)), 3) == 0
    reader.hold(5, None)
    assert writer.readers() == [(5, os.getpid(), None)]
    writer.close()


def test_a_dead_engines_hold_does_not_block_the_learner(tmp_path):
    layout = _layout()
    writer = WeightMailbox.create(layout, directory=tmp_path)
    writer.write(_as_bytes(_tensors(1)), 1)
    writer.header[8:10] = [_dead_pid(), 1]                     # reader 0: a dead process holding slot 0
    writer.write(_as_bytes(_tensors(2)), 2)
    assert writer.write(_as_bytes(_tensors(3)), 3) == 0
    writer.close()


def test_bad_versions_are_refused_and_a_half_written_slot_is_not_served(tmp_path):
    layout = _layout()
    writer = WeightMailbox.create(layout, directory=tmp_path)
    reader = WeightMailbox.open(writer.path, layout)
    writer.write(_as_bytes(_tensors(1)), 1)
    with pytest.raises(KeyError, match="no tensor named 'lm_head.weight'"):
        writer.write(_as_bytes(_tensors(2)) + [("lm_head.weight", np.zeros(4, np.uint8))], 2)
    with pytest.raises(ValueError, match="slot 1 holds version -1, not 2"):
        reader.tensors(1, 2)
    with pytest.raises(ValueError, match=r"version 2 lacks \['steps'\]"):
        writer.write(_as_bytes(_tensors(2))[:3], 2)
    with pytest.raises(ValueError, match="embed.weight has 4 bytes, the layout says 140"):
        writer.write([("embed.weight", np.zeros(4, np.uint8))], 2)
    assert torch.equal(dict(reader.tensors(0, 1))["steps"], torch.arange(5))   # the latest is intact
    with pytest.raises(ValueError, match="the layout needs"):
        WeightMailbox.open(writer.path, MailboxLayout.of([("x", (2**20,), torch.float32)]))
    impostor = tmp_path / "impostor"
    impostor.write_bytes(bytes(layout.file_bytes))
    with pytest.raises(ValueError, match="not a weight mailbox of this layout"):
        WeightMailbox.open(impostor, layout)
    writer.close()


def test_orphans_of_dead_learners_are_removed_and_live_ones_kept(tmp_path):
    live = WeightMailbox.create(_layout(), directory=tmp_path)
    orphan = tmp_path / f"rl_service-weights-job-abcd1234-{_dead_pid()}"
    orphan.write_bytes(b"x")
    unrelated = tmp_path / "rl_service-weights-notes"
    unrelated.write_bytes(b"x")
    assert remove_orphans(tmp_path) == [orphan]
    assert live.path.exists() and unrelated.exists() and not orphan.exists()
    live.close()


def test_copy_into_matches_torch_copy_for_every_layout():
    source = torch.randn(64, 33)
    for target, value in [(torch.empty(64, 33), source), (torch.empty(64, 33, dtype=torch.bfloat16), source),
                          (torch.empty(33, 64).t(), source), (torch.empty(64, 33), source.t().contiguous().t()),
                          (torch.empty(0), torch.empty(0))]:
        expected = target.clone().copy_(value)
        copy_into_(target, value)
        assert torch.equal(target, expected)


def test_an_hf_engine_serves_from_the_mailbox_without_a_copy_and_owns_its_weights_again(tmp_path):
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.models.loading import load_causal_lm
    from rl_service.rollout import GenerationRequest, SamplingParams
    from rl_service.weights.flat import flatten_named_tensors

    learner = load_causal_lm("builtin", "float32", False)
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    named = [(name, parameter.detach()) for name, parameter in learner.named_parameters()]
    layout = MailboxLayout.of((name, tensor.shape, tensor.dtype) for name, tensor in named)
    writer = WeightMailbox.create(layout, directory=tmp_path)
    slot = writer.write(_as_bytes(named), 1)
    reader = WeightMailbox.open(writer.path, layout)

    shared, copied = HFGenerationEngine("builtin"), HFGenerationEngine("builtin")
    assert shared.load_shared_weights(reader.tensors(slot, 1), 1) is True
    assert copied.load_shared_weights(reader.tensors(slot, 1), 1, share=False) is False
    start = np.frombuffer(reader._slots_map, dtype=np.uint8).ctypes.data
    inside = [start <= parameter.data_ptr() < start + 2 * layout.slot_bytes for parameter in shared.model.parameters()]
    assert all(inside) and not any(start <= parameter.data_ptr() < start + 2 * layout.slot_bytes
                                   for parameter in copied.model.parameters())
    requests = [GenerationRequest(request_index=0, prompt_id=0, prompt_token_ids=[5, 6, 7, 8], num_samples=3)]
    one, two = (engine.generate(requests, SamplingParams(max_new_tokens=12), seed=4) for engine in (shared, copied))
    assert one.completion_token_ids == two.completion_token_ids
    np.testing.assert_allclose(np.concatenate(one.behaviour_logprobs), np.concatenate(two.behaviour_logprobs), atol=1e-6)
    with pytest.raises(ValueError, match="went backwards"):
        shared.load_shared_weights(reader.tensors(slot, 1), 0)

    # A copy load (object store, collective) first gives the parameters memory of their own.
    shared.load_weights(flatten_named_tensors(named, 2))
    assert shared.shares_weights is False and not any(
        start <= parameter.data_ptr() < start + 2 * layout.slot_bytes for parameter in shared.model.parameters())
    assert all(torch.equal(parameter, dict(named)[name]) for name, parameter in shared.model.named_parameters())
    writer.close()

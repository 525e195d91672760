"""The random state a checkpoint holds, and where it may be restored (issue 25, items 3-4)."""

from __future__ import annotations

import random

import pytest
import torch

from amoc import checkpoint
from amoc.errors import CheckpointError


class FewGPUs:
    """torch.cuda as a machine with `count` GPUs shows it, for the RNG calls: torch's
    set_rng_state_all sets one state per entry and fails on an index past the count."""

    def __init__(self, count: int) -> None:
        self.count = count

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [torch.zeros(16, dtype=torch.uint8) for _ in range(self.count)]

    def set_rng_state_all(self, states) -> None:
        for index, _ in enumerate(states):
            if index >= self.count:
                raise IndexError(f"device index {index} out of range ({self.count} GPUs)")


def test_a_checkpoint_from_8_gpus_resumes_on_a_machine_with_1(monkeypatch):
    """docs/distributed.md promises 8 -> 4 -> 1. Nothing draws from the global CUDA RNG
    (every device draw takes a run generator), so no per-GPU state is stored, and one in
    an older checkpoint is not restored."""
    g = torch.Generator().manual_seed(3)
    monkeypatch.setattr(torch, "cuda", FewGPUs(8))
    state = checkpoint.rng_state(g)
    assert "cuda" not in state
    state["cuda"] = FewGPUs(8).get_rng_state_all()  # as checkpoints before 2026-12-04 held it
    expected = torch.rand(4, generator=g)
    monkeypatch.setattr(torch, "cuda", FewGPUs(1))
    random.seed(0)
    checkpoint.set_rng_state(state, g)
    assert torch.equal(torch.rand(4, generator=g), expected)


def test_a_generator_state_of_another_device_type_is_one_clear_error():
    state = checkpoint.rng_state(torch.Generator().manual_seed(0))
    state["generators"] = [torch.zeros(16, dtype=torch.uint8)]  # a CUDA generator's state: seed, offset
    with pytest.raises(CheckpointError, match=r"does not fit this run's cpu generator .* without --resume"):
        checkpoint.set_rng_state(state, torch.Generator())

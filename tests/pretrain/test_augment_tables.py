"""PIL blur's coefficient tables are built once per (size, radii, dtype, device) and kept,
on every device: on CUDA a rebuild is ~20 kernel launches in every augmentation call.
The meta device stands in for a GPU (no data, the same code path as any non-CPU device)."""

from __future__ import annotations

import pytest
import torch

from amoc.pretrain import augment


@pytest.fixture
def fresh_tables(monkeypatch) -> dict:
    tables: dict = {}
    monkeypatch.setattr(augment, "_BOX_TABLES", tables)
    return tables


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_the_second_blur_call_reuses_the_tables(fresh_tables, device):
    sigma = torch.tensor([0.3, 1.2, 2.0], device=device)
    first = augment.pil_blur_matrices(sigma, 16, 2.0, dtype=torch.float64)
    (key,) = fresh_tables
    assert key == (16, augment._box_int(2.0) + 2, torch.float64, torch.device(device))
    table = fresh_tables[key]
    second = augment.pil_blur_matrices(sigma, 16, 2.0, dtype=torch.float64)
    assert list(fresh_tables) == [key] and fresh_tables[key] is table  # a hit: nothing rebuilt
    assert augment._pil_box_tables(16, key[1], torch.float64, torch.device(device)) is table
    assert first.shape == second.shape == (3, 16, 16) and first.device == torch.device(device)
    if device == "cpu":
        assert torch.equal(first, second)


def test_tables_are_kept_apart_by_size_dtype_and_device(fresh_tables):
    for device, dtype, n in [("cpu", torch.float32, 8), ("cpu", torch.float64, 8), ("meta", torch.float32, 8)]:
        augment._pil_box_tables(n, 3, dtype, torch.device(device))
    augment._pil_box_tables(12, 3, torch.float32, torch.device("cpu"))
    assert len(fresh_tables) == 4
    cpu32 = fresh_tables[(8, 3, torch.float32, torch.device("cpu"))]
    assert torch.equal(cpu32.double(), fresh_tables[(8, 3, torch.float64, torch.device("cpu"))])

"""Shared fixtures: the repo root, the real CIFAR-10 subset (skipped when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding ../shared/data's real archives (or $AMOC_SHARED_DATA)."""
    folder = Path(os.environ.get("AMOC_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (folder / "cifar-10-python-subset.tar.gz").is_file():
        pytest.skip(f"real CIFAR-10 subset not found in {folder}; set AMOC_SHARED_DATA to the shared/data folder")
    return folder


SUBSET_SHA256 = "f1c898c7ca14db7a3a2c6cacfb3057ebab65ea258d0842fb86712666b62d7b01"
SUBSET_MD5 = "64d2c6eb85d0e40bc46b0fc02fd3a5d6"
JPEG_SHA256 = "d6b111c178e2bf2b4eec9c8634057a1f2f368b5d64fb5e56e31865acecd566c9"

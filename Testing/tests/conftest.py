"""Shared fixtures. ``Testing/`` is put on the path for the reference-weight and data helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTING_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTING_DIR.parent
for path in (REPO_ROOT, TESTING_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised tiny model (same classes as the full-size ones), deterministic."""
    from FastSAM3DLib import build_model

    torch.manual_seed(0)
    return build_model("tiny")

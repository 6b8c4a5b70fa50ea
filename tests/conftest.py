"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "tensor") -> None:
    """Assert max|actual - expected| <= rtol * max|expected| (plus a tiny floor), printing both errors."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    rel = diff / max(scale, 1e-30)
    assert diff <= rtol * max(scale, 1e-12), f"{name}: max abs err {diff:.3e}, max rel err {rel:.3e} > {rtol:.0e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

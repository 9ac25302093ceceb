"""Shared fixtures: offline hub, small thread count, and the optional ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FOPRO_KD_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder; tests that need it are skipped when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared not present at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def ham10000_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "ham10000"
    if not (path / "HAM10000_metadata.csv").is_file():
        pytest.skip("HAM10000 not present in ../shared")
    return path


@pytest.fixture(scope="session")
def mobilenet_weights(shared_dir: Path) -> Path:
    path = shared_dir / "weights" / "mobilenetv2_100_imagenet_keras_int8_timm.pth"
    if not path.is_file():
        pytest.skip("MobileNetV2 weights not present in ../shared")
    return path

"""Shared fixtures for the unit tests: a demo model directory and a CPU model registry."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from pipeline.models import ModelRegistry, init_demo


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest-asyncio is not a dependency (these tests drive their loops with asyncio.run), but
    # where an environment has it installed it warns at configure time that its loop scope is
    # unset, and with warnings as errors that aborts the whole run before any test.
    warnings.filterwarnings(
        "ignore",
        message=r'The configuration option "asyncio_default_fixture_loop_scope" is unset',
        category=pytest.PytestDeprecationWarning,
    )


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding the demo model, versions 1 (safetensors) and 2 (state_dict).

    Shared by the session: tests must not write into it (use ``tmp_path`` for that).
    """
    path = tmp_path_factory.mktemp("models")
    init_demo(path)
    return path


@pytest.fixture
def registry(demo_dir: Path) -> ModelRegistry:
    return ModelRegistry(demo_dir, device=torch.device("cpu"))

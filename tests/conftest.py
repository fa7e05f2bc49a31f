"""Shared fixtures: the offline demo models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding freshly built `demo-llama/` and `demo-falcon/` model dirs."""
    from app.models.demo import build_demo_models

    out = tmp_path_factory.mktemp("demo-models")
    build_demo_models(out)
    return out


@pytest.fixture(scope="session", autouse=True)
def lanner_kernels_built() -> None:
    """Build Lanner's C++ kernels (app/quant/kernels.py) before any test starts a server: on a fresh machine
    the ~12 s build then happens once here, not inside the first server's start-up timeout (the servers'
    workers find it in the cache)."""
    from app.quant import kernels

    kernels.load()

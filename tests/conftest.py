"""Shared fixtures: every test writes under its own tmp folders, seeded."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_roots(tmp_path_factory, monkeypatch):
    """Point MEGACONTEXT_*_ROOT at temp folders unless a session-wide cache is set up."""
    monkeypatch.delenv("MEGACONTEXT_SEED", raising=False)
    monkeypatch.delenv("MEGACONTEXT_FORCE_DATA_REBUILD", raising=False)
    monkeypatch.delenv("MEGACONTEXT_ENABLE_WANDB", raising=False)

"""Shared fixtures: seeded, isolated roots; smoke data and base built once per session."""

from __future__ import annotations

import os

import pytest

from megacontext.config import Config, load_config, seed_everything

_USER_ENV = (
    "MEGACONTEXT_SEED",
    "MEGACONTEXT_FORCE_DATA_REBUILD",
    "MEGACONTEXT_ENABLE_WANDB",
    "MEGACONTEXT_DATA_ROOT",
    "MEGACONTEXT_ARTIFACT_ROOT",
    "WANDB_MODE",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Tests never see the developer's MEGACONTEXT_* variables; randomness is seeded."""
    for var in _USER_ENV:
        monkeypatch.delenv(var, raising=False)
    seed_everything(0)


@pytest.fixture(scope="session")
def smoke_roots(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("smoke")
    return {"data_root": str(root / "data"), "artifact_root": str(root / "artifacts")}


# A short training run: two steps per phase, a checkpoint after every step (mid-phase
# checkpoints to kill or resume between), small label and focus settings, one thread.
SHORT_RUN_SETS = (
    "train.checkpoint_every=1",
    "train.phases.warm_gist.steps=2",
    "train.phases.warm_lens.steps=2",
    "train.phases.jt1.steps=2",
    "train.phases.jt2.steps=2",
    "train.phases.jt3.steps=2",
    "train.labels.candidates=4",
    "train.focus_rounds=2",
    "train.cpu_threads=1",  # the same in every run; no stalls on a busy machine
)


def smoke_config(roots: dict[str, str], *overrides: str) -> Config:
    """configs/smoke.yaml with data/artifact roots in the session's temp folder."""
    sets = [f"paths.data_root={roots['data_root']}", f"paths.artifact_root={roots['artifact_root']}"]
    return load_config("smoke", sets + list(overrides), env={})


@pytest.fixture(scope="session")
def smoke_cfg(smoke_roots) -> Config:
    return smoke_config(smoke_roots)


@pytest.fixture(scope="session")
def smoke_data(smoke_cfg):
    """The smoke dataset, prepared once (python-stdlib, 80 documents, BPE 512)."""
    from megacontext.data import prepare_dataset

    return prepare_dataset(smoke_cfg, progress=False)


@pytest.fixture(scope="session")
def smoke_base(smoke_cfg, smoke_data):
    """The smoke embedded base, pretrained once (seconds), loaded as a BaseModel."""
    from megacontext.base_model import BaseModel
    from megacontext.training.pretrain_base import pretrain_base

    pretrain_base(smoke_cfg, progress=False)
    return BaseModel.from_config(smoke_cfg)


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

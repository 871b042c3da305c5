"""Config: precedence (command line > env > file > defaults), env vars, errors, shipped files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megacontext.config import ENV_VARS, REPO_CONFIG_DIR, Config, derive_seed, load_config
from megacontext.errors import ConfigError


def write_yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_without_a_file():
    cfg = load_config(None, env={})
    assert cfg.focus.budget == Config().focus.budget and cfg.seed == Config().seed
    assert Path(cfg.paths.data_root).is_absolute()


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    path = write_yaml(tmp_path, "seed: 5\nfocus:\n  budget: 512\ntrain:\n  horizon: 16\n")
    env = {"MEGACONTEXT_SEED": "6"}
    assert load_config(path, env={}).seed == 5  # file > defaults
    assert load_config(path, env={}).train.history_max == Config().train.history_max  # untouched default
    assert load_config(path, env=env).seed == 6  # env > file
    cfg = load_config(path, ["seed=7", "focus.budget=384"], env=env)  # command line > env
    assert (cfg.seed, cfg.focus.budget, cfg.train.horizon) == (7, 384, 16)


@pytest.mark.parametrize(
    "var, value, check",
    [
        ("MEGACONTEXT_DATA_ROOT", "/tmp/mc-data", lambda c: c.paths.data_root == "/tmp/mc-data"),
        ("MEGACONTEXT_ARTIFACT_ROOT", "/tmp/mc-art", lambda c: c.paths.artifact_root == "/tmp/mc-art"),
        ("MEGACONTEXT_SEED", "99", lambda c: c.seed == 99),
        ("MEGACONTEXT_FORCE_DATA_REBUILD", "1", lambda c: c.data.force_rebuild is True),
        ("MEGACONTEXT_ENABLE_WANDB", "1", lambda c: c.wandb.enabled is True),
        ("WANDB_MODE", "online", lambda c: c.wandb.mode == "online"),
    ],
)
def test_each_environment_variable(var, value, check):
    assert not check(load_config("default", env={}))
    assert check(load_config("default", env={var: value}))


def test_every_documented_env_var_is_tested():
    assert set(ENV_VARS) == {
        "MEGACONTEXT_DATA_ROOT",
        "MEGACONTEXT_ARTIFACT_ROOT",
        "MEGACONTEXT_SEED",
        "MEGACONTEXT_FORCE_DATA_REBUILD",
        "MEGACONTEXT_ENABLE_WANDB",
    }


def test_force_rebuild_env_zero_means_off():
    assert load_config("default", env={"MEGACONTEXT_FORCE_DATA_REBUILD": "0"}).data.force_rebuild is False


@pytest.mark.parametrize(
    "text, key",
    [
        ("focus:\n  budgett: 256\n", "focus.budgett"),
        ("nosuchsection: 1\n", "nosuchsection"),
        ("focus:\n  budget: lots\n", "focus.budget"),
        ("data:\n  force_rebuild: maybe\n", "data.force_rebuild"),
        ("focus:\n  position_mode: sideways\n", "focus.position_mode"),
        ("focus:\n  budget: 3\n", "focus.budget"),
        ("data:\n  val_fraction: 0.7\n", "data.val_fraction"),
        ("train:\n  history_min: 4096\n  history_max: 100\n", "train.history_min"),
        ("embedded:\n  copy_length: 4096\n", "embedded.copy_length"),
        ("embedded:\n  copy_rows: 0\n", "embedded.induction_steps"),
    ],
)
def test_file_errors_name_the_key_and_file(tmp_path, text, key):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert e.value.key == key
    assert key in str(e.value) and str(path) in str(e.value)


def test_override_and_env_errors_name_their_origin():
    with pytest.raises(ConfigError, match="focus.budget.*command line"):
        load_config("default", ["focus.budget=abc"], env={})
    with pytest.raises(ConfigError, match="MEGACONTEXT_SEED"):
        load_config("default", env={"MEGACONTEXT_SEED": "abc"})
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("default", ["focus.budget"], env={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no-such-config", env={})


@pytest.mark.parametrize("name", ["default", "smoke", "gpu"])
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(name, env={})
    assert cfg.source_file == str(REPO_CONFIG_DIR / f"{name}.yaml")
    assert cfg.focus.budget >= (cfg.focus.tail_blocks + 2) * cfg.tree.block_size


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, "jt1", 3) == derive_seed(1, "jt1", 3)
    assert len({derive_seed(1, "jt1", 3), derive_seed(1, "jt1", 4), derive_seed(2, "jt1", 3)}) == 3


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("megacontext")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "megacontext"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MEGACONTEXT_DATA_ROOT": str(tmp_path)}
    r = subprocess.run(
        cmd + ["prepare", "--set", "focus.budget=3"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "focus.budget" in lines[0]
    assert lines[0].startswith("megacontext prepare: error:")
    assert not any(Path(tmp_path).iterdir()), "a config error must not touch the data root"


@pytest.mark.parametrize(
    "old, new",
    [
        ("train.jt1_steps", "train.phases.jt1.steps"),
        ("train.lr_lora", "train.phases.jt3.lr"),
        ("train.label_candidates", "train.labels.candidates"),
        ("train.val_windows", "train.validation.windows"),
        ("train.keepalive_weight", "train.lora.keepalive_weight"),
        ("train.lens_rank_weight", "train.lens.rank_weight"),
    ],
)
def test_moved_train_keys_are_rejected_with_their_new_name(tmp_path, old, new):
    with pytest.raises(ConfigError, match=f"{old} has moved: use {new}.*command line"):
        load_config("smoke", [f"{old}=3"], env={})
    section, key = old.split(".")
    path = write_yaml(tmp_path, f"{section}:\n  {key}: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert e.value.key == old and new in str(e.value) and str(path) in str(e.value)


def test_nested_train_keys_set_from_the_command_line():
    cfg = load_config("smoke", ["train.phases.jt2.steps=7", "train.labels.reuse=2", "train.optim.grad_clip=0.5"], env={})
    assert (cfg.train.phases.jt2.steps, cfg.train.labels.reuse, cfg.train.optim.grad_clip) == (7, 2, 0.5)
    for bad in ("train.labels.reuse=0", "train.phases.jt1.steps=-1", "train.cpu_threads=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("smoke", [bad], env={})

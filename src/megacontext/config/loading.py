"""Typed configuration: YAML files -> nested dataclasses, with one precedence.

Precedence (highest first)::

    command line (--set section.key=value, and flags such as --budget)
    environment  (MEGACONTEXT_DATA_ROOT, MEGACONTEXT_ARTIFACT_ROOT, MEGACONTEXT_SEED,
                  MEGACONTEXT_FORCE_DATA_REBUILD, MEGACONTEXT_ENABLE_WANDB)
    config file  (--config PATH, YAML)
    defaults     (the dataclasses of megacontext.config.schema)

Every problem (unknown key, wrong type, impossible value) raises :class:`ConfigError`
with the offending key and the file it came from; the CLI prints it without a traceback.
This module is also the one place that resolves paths and seeds randomness.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megacontext.config.schema import PHASE_NAMES, RENAMED_KEYS, Config
from megacontext.errors import ConfigError

REPO_CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


ENV_VARS: dict[str, str] = {
    "MEGACONTEXT_DATA_ROOT": "paths.data_root",
    "MEGACONTEXT_ARTIFACT_ROOT": "paths.artifact_root",
    "MEGACONTEXT_SEED": "seed",
    "MEGACONTEXT_FORCE_DATA_REBUILD": "data.force_rebuild",
    "MEGACONTEXT_ENABLE_WANDB": "wandb.enabled",
}


# ---------------------------------------------------------------------- coercion
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check/convert one value to the annotated type; strings (CLI/env) are parsed."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}", key=key, where=where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}",
                key=key,
                where=where,
            )
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "null":
            return None
        return _coerce(value, args[0], key, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: (f, hints[f.name])
        for f in dataclasses.fields(cls)
        if not f.metadata.get("internal")
    }


def _merge(
    obj: Any, data: Mapping[str, Any], prefix: str, where: str, origins: dict | None = None
) -> None:
    """Apply a nested mapping onto a dataclass instance in place (recording origins)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping", key=prefix, where=where)
    fields = _fields(type(obj))
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            if key in RENAMED_KEYS:
                raise ConfigError(f"{key} has moved: use {RENAMED_KEYS[key]}", key=key, where=where)
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {key!r} (known here: {known})", key=key, where=where)
        _, tp = fields[k]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, k), v, key, where, origins)
        else:
            setattr(obj, k, _coerce(v, tp, key, where))
            if origins is not None:
                origins[key] = where


def _set_dotted(cfg: Config, dotted: str, raw: Any, where: str) -> None:
    parts = dotted.split(".")
    nested: dict[str, Any] = {}
    cur = nested
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    if isinstance(raw, str):
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            parsed = raw
        # keep strings like "1e-3" numeric but never turn e.g. a path into a dict
        raw = parsed if not isinstance(parsed, dict) else raw
    cur[parts[-1]] = raw
    _merge(cfg, nested, "", where, cfg.origins)


def parse_overrides(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"--set expects section.key=value, got {item!r}", key=item, where="command line"
            )
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    return out


def resolve_config_path(path: str | os.PathLike | None) -> Path | None:
    """A config path as given, or a bare name looked up in the repo's configs/ folder."""
    if path is None:
        return None
    p = Path(path)
    if p.exists():
        return p
    for cand in (REPO_CONFIG_DIR / p, REPO_CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file not found: {path}", key="--config", where=str(path))


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] | Sequence[tuple[str, Any]] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build a validated Config: defaults < file < environment < overrides."""
    cfg = Config()
    cfg_path = resolve_config_path(path)
    if cfg_path is not None:
        where = str(cfg_path)
        try:
            data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {e}", key="", where=where) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config: {e}", key="", where=where) from None
        _merge(cfg, data, "", where, cfg.origins)
        cfg.source_file = where
    env = os.environ if env is None else env
    for var, dotted in ENV_VARS.items():
        if env.get(var, "") != "":
            _set_dotted(cfg, dotted, env[var], f"environment variable {var}")
    if env.get("WANDB_MODE") in ("online", "offline"):
        cfg.wandb.mode = env["WANDB_MODE"]  # type: ignore[assignment]
    return _finish(cfg, overrides, "command line")


def apply_overrides(
    cfg: Config, overrides: Sequence[str] | Sequence[tuple[str, Any]], where: str = "overrides"
) -> Config:
    """A validated copy of ``cfg`` with ``section.key=value`` overrides applied (``cfg`` is unchanged)."""
    return _finish(copy.deepcopy(cfg), overrides, where)


def _finish(cfg: Config, overrides: Sequence[str] | Sequence[tuple[str, Any]], where: str) -> Config:
    """Apply the overrides, validate, resolve the two roots."""
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for k, v in pairs:  # type: ignore[misc]
        _set_dotted(cfg, k, v, where)
    validate(cfg)
    for key in ("data_root", "artifact_root"):
        folder = Path(getattr(cfg.paths, key)).expanduser().resolve()
        _check_folder(folder, f"paths.{key}", cfg.origins.get(f"paths.{key}", cfg.source_file))
        setattr(cfg.paths, key, str(folder))
    return cfg


def _check_folder(folder: Path, key: str, where: str) -> None:
    """ConfigError when ``folder`` (or the nearest of its parents that exists) is not a directory."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"is inside {existing}, which is a file"
        raise ConfigError(f"{key} {folder} {what}: point it at a folder (created if missing)", key=key, where=where)


def validate(cfg: Config) -> None:
    """Reject impossible combinations with one message naming the key and its origin."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            where = cfg.origins.get(key, cfg.source_file)
            raise ConfigError(f"{key}: {msg}", key=key, where=where)

    K = cfg.tree.block_size
    need(K >= 2, "tree.block_size", "must be at least 2")
    need(cfg.tree.levels >= 1, "tree.levels", "must be at least 1")
    need(cfg.focus.tail_blocks >= 0, "focus.tail_blocks", "must be >= 0")
    tail = (cfg.focus.tail_blocks + 1) * K
    need(
        cfg.focus.budget >= tail + K,
        "focus.budget",
        f"budget {cfg.focus.budget} is too small: the raw tail alone needs {tail} "
        f"(tail_blocks+1 blocks of {K}) plus one block of headroom = {tail + K}",
    )
    for b in cfg.eval.budgets:
        need(b >= tail + K, "eval.budgets", f"budget {b} is below tail + one block ({tail + K})")
    need(cfg.focus.n_diff >= 1, "focus.n_diff", "must be at least 1")
    need(cfg.focus.cooldown >= 0, "focus.cooldown", "must be >= 0")
    need(1 <= cfg.focus.passes <= 3, "focus.passes", "must be 1, 2 or 3")
    need(cfg.focus.temperature > 0, "focus.temperature", "must be > 0")
    need(0 <= cfg.focus.tau_expand < 1, "focus.tau_expand", "must be in [0, 1)")
    need(0 <= cfg.focus.tau_collapse < 1, "focus.tau_collapse", "must be in [0, 1)")
    need(cfg.base.max_context > cfg.train.horizon, "base.max_context", "must exceed train.horizon")
    need(cfg.train.horizon >= 1, "train.horizon", "must be at least 1")
    need(
        cfg.train.history_min <= cfg.train.history_max,
        "train.history_min",
        "must be <= train.history_max",
    )
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(cfg.train.cycles >= 1, "train.cycles", "must be at least 1")
    need(cfg.train.labels.reuse >= 1, "train.labels.reuse", "must be at least 1")
    need(cfg.train.cpu_threads >= 0, "train.cpu_threads", "must be >= 0")
    tasks = cfg.train.tasks
    need(tasks.passkey >= 0 and tasks.multikey >= 0 and tasks.passkey + tasks.multikey <= 1,
         "train.tasks.passkey", "task shares must be >= 0 and add up to at most 1")
    need(tasks.passkey + tasks.multikey == 0 or tasks.history_max >= cfg.train.history_min,
         "train.tasks.history_max", "must be >= train.history_min when a task has a share")
    need(1 <= tasks.facts <= 10, "train.tasks.facts", "must be in [1, 10]")
    unknown = [p for p in tasks.phases if p not in PHASE_NAMES]
    need(not unknown, "train.tasks.phases", f"unknown phases {unknown} (known: {', '.join(PHASE_NAMES)})")
    for name in PHASE_NAMES:
        need(getattr(cfg.train.phases, name).steps >= 0, f"train.phases.{name}.steps", "must be >= 0")
    need(4 <= cfg.train.lora.rank <= 64, "train.lora.rank", "must be in [4, 64]")
    for k in ("val_fraction", "test_fraction"):
        v = getattr(cfg.data, k)
        need(0 <= v < 0.5, f"data.{k}", "must be in [0, 0.5)")
    need(cfg.data.vocab_size >= 300, "data.vocab_size", "must be at least 300 (256 bytes + specials)")
    need(0 <= cfg.embedded.passkey_fraction < 1, "embedded.passkey_fraction", "must be in [0, 1)")
    need(0 <= cfg.embedded.passkey_run_keys <= 1, "embedded.passkey_run_keys", "must be in [0, 1]")
    need(cfg.embedded.copy_rows >= 0, "embedded.copy_rows", "must be >= 0")
    need(
        64 <= cfg.embedded.copy_length <= cfg.embedded.context,
        "embedded.copy_length",
        f"must be in [64, embedded.context = {cfg.embedded.context}]",
    )
    need(cfg.embedded.induction_steps >= 0, "embedded.induction_steps", "must be >= 0")
    need(
        cfg.embedded.induction_steps == 0 or cfg.embedded.copy_rows > 0,
        "embedded.induction_steps",
        "needs embedded.copy_rows > 0 (the warm-up trains on the drill rows)",
    )
    need(cfg.embedded.induction_target > 0, "embedded.induction_target", "must be > 0")
    need(
        cfg.embedded.hidden_size % cfg.embedded.heads == 0,
        "embedded.hidden_size",
        "must be divisible by embedded.heads",
    )
    need(cfg.lensnet.width % cfg.lensnet.heads == 0, "lensnet.width", "must be divisible by lensnet.heads")
    need(1 <= cfg.lensnet.stacks <= 3, "lensnet.stacks", "must be 1, 2 or 3")
    need(all(0 <= d <= 1 for d in cfg.eval.passkey_depths), "eval.passkey_depths", "must be in [0, 1]")


# ----------------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the one place randomness is seeded)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(seed: int, *parts: Any) -> int:
    """A deterministic sub-seed for (seed, cycle, phase, step, ...) — resume-safe."""
    h = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


"""Typed configuration: the schema (:mod:`.schema`) and how it is loaded (:mod:`.loading`).

``load_config(path, overrides, env)`` is the one entry point: YAML file < environment
(``MEGACONTEXT_*``) < ``--set section.key=value``, validated with messages that name the key
and where its value came from. ``derive_seed`` / ``seed_everything`` are the one place
randomness is seeded; ``Config.data_root`` / ``artifact_root`` the one place paths resolve.
"""

from megacontext.config.loading import (
    ENV_VARS,
    REPO_CONFIG_DIR,
    apply_overrides,
    derive_seed,
    load_config,
    parse_overrides,
    resolve_config_path,
    seed_everything,
    validate,
)
from megacontext.config.schema import *  # noqa: F403 — every section dataclass, PHASE_NAMES, RENAMED_KEYS
from megacontext.config.schema import __all__ as _schema_names

__all__ = [
    "ENV_VARS",
    "REPO_CONFIG_DIR",
    "apply_overrides",
    "derive_seed",
    "load_config",
    "parse_overrides",
    "resolve_config_path",
    "seed_everything",
    "validate",
    *_schema_names,
]

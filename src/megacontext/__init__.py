"""MegaContext: effectively unbounded memory for a frozen language model, at constant compute.

The public API lives in :mod:`megacontext.api` and is re-exported here on first use, so
``import megacontext`` stays cheap (no torch, no transformers)::

    from megacontext import MegaContext

    mc = MegaContext.load("default", checkpoint="auto")
    with mc.session() as s:
        s.append("some long history ...")
        print(s.generate("a prompt", max_new_tokens=16))
        print(s.window())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megacontext.errors import ConfigError, DataError, MegaContextError, MegaContextWarning, TreeError

if TYPE_CHECKING:
    from megacontext.api import MegaContext, MegaSession, TreeInfo, Window, inspect_tree, resolve_config

_API = ("MegaContext", "MegaSession", "TreeInfo", "Window", "inspect_tree", "resolve_config")

__all__ = [
    "ConfigError",
    "DataError",
    "MegaContext",
    "MegaContextError",
    "MegaContextWarning",
    "MegaSession",
    "TreeError",
    "TreeInfo",
    "Window",
    "inspect_tree",
    "resolve_config",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        from megacontext import api

        return getattr(api, name)
    raise AttributeError(f"module 'megacontext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

"""User-facing errors: the CLI prints these as one clear line, never a traceback."""

from __future__ import annotations


class MegaContextError(Exception):
    """A problem the user can fix (bad input, missing artifact, wrong option)."""


class ConfigError(MegaContextError):
    """A bad configuration value; names the key and where it came from."""

    def __init__(self, message: str, key: str = "", where: str = "") -> None:
        self.key = key
        self.where = where
        super().__init__(f"{message} [in {where}]" if where else message)


class DataError(MegaContextError):
    """A data source or prepared shard is missing, unreadable or corrupted."""


class TreeError(MegaContextError):
    """A MegaContext tree cannot be opened or does not match the model."""


class MegaContextWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints one line)."""

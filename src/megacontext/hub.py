"""The Hugging Face hub: probe it once, so an offline machine fails in seconds, not a minute.

Without network, every hub request of ``transformers`` / ``datasets`` is retried for about
a minute before it gives up. :func:`prefer_offline` opens one TCP connection to the hub
(or to the configured HTTPS proxy), waiting at most :data:`PROBE_TIMEOUT_S`; when that
fails it switches this process to offline mode (``HF_HUB_OFFLINE=1``), so models,
tokenizers and datasets load from the local cache or fail at once with a clear message.
It must run before ``huggingface_hub`` is imported (the CLI calls it while loading the
config), since the library reads the variable at import time.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from megacontext.config import Config
from megacontext.errors import MegaContextWarning

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


class OfflineWarning(MegaContextWarning):
    """The hub is unreachable: this process works from the local cache only."""


def needs_hub(cfg: Config) -> bool:
    """Whether the config names a hub model (not embedded, not an existing folder) or an ``hf:`` source."""
    b = cfg.base.name
    return (b != "embedded" and not Path(b).expanduser().exists()) or cfg.data.source.startswith("hf:")


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_address(endpoint: str) -> tuple[str, int]:
    """(host, port) a hub request would connect to first: the HTTPS proxy if one is set, else the endpoint."""
    url = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or endpoint)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to host:port succeeds within ``timeout`` seconds (name lookup included)."""
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)  # a hung name lookup is abandoned, not waited for
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def prefer_offline(cfg: Config) -> None:
    """Switch to offline mode when ``cfg`` needs the hub and the hub is unreachable (an
    :class:`OfflineWarning` says so)."""
    if not needs_hub(cfg) or is_offline():
        return
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if reachable(*_probe_address(endpoint)):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    warnings.warn(
        f"the Hugging Face hub ({endpoint}) is unreachable: using only the local cache "
        "(set HF_HUB_OFFLINE=1 to skip this check, or give base.name / data.source as local paths)",
        OfflineWarning,
        stacklevel=2,
    )

"""Module weights: architecture identity, content hashing and safetensors files.

- :func:`module_config`: what identifies a module's architecture (class, config dataclass, sizes).
- :func:`module_version`: short sha256 of a module's config and state dict (any module:
  GistNet, LensNet, a ``ParameterList`` of LoRA weights, ...).
- :func:`hash_state` / :func:`tensor_bytes`: the hashing pieces, reused by ``TreeGister``.
- :func:`save_module` / :func:`load_module`: safetensors weights (never pickle) with the
  config stored as metadata under ``"megacontext.module"`` and checked on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from megacontext.errors import MegaContextError

_META_KEY = "megacontext.module"


def module_config(module: nn.Module) -> dict:
    """What identifies a module's architecture: class, config dataclass and sizes."""
    cfg = getattr(module, "cfg", None)
    out: dict = {"class": type(module).__name__}
    if dataclasses.is_dataclass(cfg):
        out["cfg"] = dataclasses.asdict(cfg)
    for name in ("dim", "block_size", "levels"):
        if isinstance(getattr(module, name, None), int):
            out[name] = getattr(module, name)
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (detached, on CPU, contiguous, flattened)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def hash_state(h: hashlib._Hash, state: dict[str, torch.Tensor]) -> None:
    """Feed every tensor of ``state`` (name, dtype, shape, bytes; sorted by name) into ``h``."""
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))


def module_version(module: nn.Module) -> str:
    """Short sha256 (16 hex) of the module's config and every tensor of its state dict."""
    h = hashlib.sha256(json.dumps(module_config(module), sort_keys=True).encode())
    hash_state(h, module.state_dict())
    return h.hexdigest()[:16]


def save_module(module: nn.Module, path: str | os.PathLike) -> None:
    """Weights to ``path`` (safetensors, written atomically) with the config as metadata."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(module_config(module), sort_keys=True)})
    os.replace(tmp, path)


def load_module(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights saved by :func:`save_module` into ``module`` (in place; returns it).

    Raises MegaContextError when the file is missing/corrupt or was saved from another
    architecture (config metadata or tensor names/shapes differ).
    """
    path = Path(path)
    if not path.is_file():
        raise MegaContextError(f"no module weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise MegaContextError(f"cannot read module weights {path}: {e}") from None
    saved = json.loads(meta.get(_META_KEY, "{}"))
    expected = module_config(module)
    if saved != expected:
        raise MegaContextError(f"{path} holds a {saved or 'module without config'}; expected {expected}")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise MegaContextError(f"{path} does not fit this {type(module).__name__}: {e}") from None
    return module

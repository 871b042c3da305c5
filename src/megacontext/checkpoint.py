"""Crash-safe training checkpoints: write to a temp folder, checksum, rename, move `latest`.

One checkpoint folder, ``RUN_DIR/checkpoints/c<cycle>-<phase>[-s<step>]/``::

    gistnet.safetensors     GistNet weights (weights.save_module: config in the metadata)
    lensnet.safetensors     LensNet weights
    lora/                   the LoRA adapter in peft format (save_pretrained, safetensors)
    optimizer.pt            optimiser + scheduler state of an unfinished phase (mid-phase only)
    rng.pt                  torch / numpy / python RNG states
    state.json              position (cycle, phase, step), metrics so far, telemetry offsets
    config.yaml             the run's config snapshot
    checksums.json          sha256 of every file above (written last)

The folder is renamed into place only when complete, and ``checkpoints/latest`` (a
one-line file naming the folder) is replaced atomically with :func:`os.replace`, so a
SIGKILL at any instant leaves the previous checkpoint intact. Weights are never read
through pickle; ``optimizer.pt``/``rng.pt`` are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from megacontext.config import PHASE_NAMES, Config
from megacontext.durable import fsync_dir, sha256_file
from megacontext.errors import MegaContextError, MegaContextWarning
from megacontext.weights import load_module, save_module

LATEST = "latest"
CHECKSUMS = "checksums.json"
_NAME = re.compile(rf"^c(\d+)-({'|'.join(PHASE_NAMES)})(?:-s(\d+))?$")


class CheckpointError(MegaContextError):
    """A checkpoint is missing, partial or corrupted."""


class CheckpointWarning(MegaContextWarning):
    """A damaged checkpoint was skipped in favour of an older valid one."""


# ------------------------------------------------------------------------ names
def checkpoint_name(cycle: int, phase: str, step: int | None = None) -> str:
    """``c1-jt1`` at a phase end, ``c1-jt1-s00020`` after step 20 of an unfinished phase."""
    return f"c{cycle}-{phase}" if step is None else f"c{cycle}-{phase}-s{step:05d}"


def order_key(name: str) -> tuple[int, int, float] | None:
    """Training-order key of a checkpoint folder name (None if it is not one)."""
    m = _NAME.match(name)
    if m is None:
        return None
    step = float("inf") if m.group(3) is None else int(m.group(3))
    return int(m.group(1)), PHASE_NAMES.index(m.group(2)), step


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders under ``root``, oldest first (unverified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and order_key(p.name) is not None]
    return sorted(found, key=lambda p: order_key(p.name))  # type: ignore[arg-type,return-value]


# --------------------------------------------------------------------- checksums
def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file listed in checksums.json matches."""
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {CHECKSUMS})")
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {CHECKSUMS} ({e})") from None
    for rel, digest in sums.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupted ({rel} fails its checksum)")


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """torch / numpy / python global RNG states as tensors and plain tuples."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- save
def save_checkpoint(
    root: Path,
    name: str,
    *,
    gistnet: torch.nn.Module,
    lensnet: torch.nn.Module,
    lora: Any | None,
    state: dict[str, Any],
    config_text: str,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``root/name`` atomically and point ``root/latest`` at it.

    A failed write (a full disk) removes the partial folder; one left by a killed run
    (``.tmp-<name>-<pid>``) is removed when the same checkpoint is written again.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    for prefix in (f".tmp-{name}-", f".stale-{name}-"):
        for leftover in root.glob(f"{prefix}*"):
            if leftover.name[len(prefix) :].isdigit():
                shutil.rmtree(leftover)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, gistnet, lensnet, lora, state, config_text, optimizer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # left by a run that was killed after writing it; replace
        stale = root / f".stale-{name}-{os.getpid()}"
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    with open(pointer, "rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)
    fsync_dir(root)
    return final


def _write_files(
    folder: Path,
    gistnet: torch.nn.Module,
    lensnet: torch.nn.Module,
    lora: Any | None,
    state: dict[str, Any],
    config_text: str,
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Every file of a checkpoint into ``folder``, checksums.json last, all fsynced."""
    save_module(gistnet, folder / "gistnet.safetensors")
    save_module(lensnet, folder / "lensnet.safetensors")
    if lora is not None:
        lora.save_pretrained(str(folder / "lora"), safe_serialization=True)
    if optimizer_state is not None:
        torch.save(optimizer_state, folder / "optimizer.pt")
    torch.save(rng_state(), folder / "rng.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    (folder / "config.yaml").write_text(config_text)
    sums = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))
    _fsync_tree(folder)


# --------------------------------------------------------------------------- load
@dataclass
class Checkpoint:
    """A verified checkpoint folder and its parsed state."""

    path: Path
    state: dict[str, Any]

    def load_module(self, name: str, module: torch.nn.Module) -> None:
        """Load ``<name>.safetensors`` into ``module`` (strict; the architecture must match)."""
        load_module(module, self.path / f"{name}.safetensors")

    @property
    def has_lora(self) -> bool:
        return (self.path / "lora" / "adapter_model.safetensors").is_file()

    def load_lora(self, lora: Any) -> None:
        """Load the saved adapter weights into a peft model with the same adapter config."""
        from peft import set_peft_model_state_dict

        f = self.path / "lora" / "adapter_model.safetensors"
        if not f.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no LoRA adapter")
        result = set_peft_model_state_dict(lora, load_file(str(f)))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"checkpoint {self.path}: adapter does not match ({result.unexpected_keys[:3]})")

    def optimizer_state(self) -> dict[str, Any] | None:
        f = self.path / "optimizer.pt"
        return torch.load(f, weights_only=True) if f.is_file() else None

    def restore_rng(self) -> None:
        set_rng_state(torch.load(self.path / "rng.pt", weights_only=True))


def open_checkpoint(path: Path) -> Checkpoint:
    """Verify checksums and parse state.json; raise CheckpointError if damaged."""
    verify_checkpoint(path)
    return Checkpoint(path=path, state=json.loads((path / "state.json").read_text()))


def _latest_name(root: Path) -> str | None:
    """The checkpoint ``root/latest`` names (None when it is missing or damaged: not a name)."""
    f = root / LATEST
    if not f.is_file():
        return None
    name = f.read_bytes().decode("ascii", "replace").strip()
    return name if order_key(name) is not None else None


def resolve_resume(checkpoints_root: Path, spec: str) -> Checkpoint:
    """The checkpoint to resume from: ``latest`` or a folder path, else the newest valid older one.

    A damaged candidate is reported with a :class:`CheckpointWarning` and the previous
    valid checkpoint (in training order) is used instead.
    """
    if spec == LATEST:
        root = checkpoints_root
        name = _latest_name(root)
        all_ckpts = list_checkpoints(root)
        if name is None:
            if not all_ckpts:
                raise CheckpointError(f"no checkpoint in {root}")
            candidate = all_ckpts[-1]
        else:
            candidate = root / name
    else:
        candidate = Path(spec).expanduser().resolve()
        root = candidate.parent
        if order_key(candidate.name) is None:
            raise CheckpointError(f"{spec} is not a checkpoint folder (expected c<cycle>-<phase>[-s<step>])")
    key = order_key(candidate.name)
    older = [p for p in list_checkpoints(root) if order_key(p.name) < key]  # type: ignore[operator]
    for path in [candidate] + older[::-1]:
        try:
            return open_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"{e}; trying the previous checkpoint", CheckpointWarning, stacklevel=2)
    raise CheckpointError(f"no valid checkpoint at or before {candidate}")


# ------------------------------------------------------------------ runtime use
def find_checkpoint(cfg: Config, which: str | None) -> Path | None:
    """A checkpoint folder for inference, or None for untrained modules.

    ``which``: a checkpoint or run folder; ``latest`` (the newest run under
    ``<artifact_root>/runs``, its ``latest`` checkpoint; an error when there is none);
    ``auto`` (the same, but None when there is none); ``none`` or None (None).
    """
    if which in (None, "none"):
        return None
    advice = "pass --checkpoint with another run or checkpoint folder, or --checkpoint none for untrained modules"
    if which in ("latest", "auto"):
        runs = cfg.artifact_root / "runs"
        run_dirs = sorted((p for p in runs.iterdir() if (p / "checkpoints").is_dir()), key=lambda p: p.name) if runs.is_dir() else []
        if not run_dirs:
            if which == "latest":
                raise CheckpointError(f"no training run under {runs}: train one (`megacontext train`), or {advice}")
            return None
        root = run_dirs[-1] / "checkpoints"
    else:
        p = Path(which).expanduser()
        if order_key(p.name) is not None:
            return open_checkpoint(p).path
        if not (p / "checkpoints").is_dir():
            raise CheckpointError(f"{which} is neither a checkpoint nor a run folder: {advice}")
        root = p / "checkpoints"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CheckpointWarning)
            return resolve_resume(root, LATEST).path
    except CheckpointError as e:
        if which == "auto":  # nothing usable: untrained modules
            warnings.warn(f"{e}: using untrained modules", CheckpointWarning, stacklevel=2)
            return None
        raise CheckpointError(f"{e}: {advice}") from None

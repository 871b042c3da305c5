"""The floors of the package (docs/architecture.md): imports go one way, files stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "megacontext"
MAX_LINES = 550

# What each room may import from the package (lower floors only). A room not listed here
# must be added with its floor: see docs/architecture.md.
FLOORS = [
    {"errors", "durable"},
    {"config", "lock"},
    {"data", "hub"},
    {"base_model", "layers", "weights", "tree_format"},
    {"tree_storage", "working_context"},
    {"tree", "gistnet", "lensnet", "allocator"},
    {"checkpoint"},
    {"modules"},
    {"focus"},
    {"telemetry", "runtime"},
    {"training", "eval", "api"},
    {"cli"},
    {"__main__"},
]


def _room(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def _floor(room: str) -> int:
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    raise AssertionError(f"room {room!r} has no floor in tests/test_architecture.py")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megacontext"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("megacontext")}
    return out


FILES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    here = _room(path)
    for module in _imports(path):
        parts = module.split(".")
        if len(parts) < 2:
            continue
        there = parts[1]
        if there == here:
            continue
        assert _floor(there) < _floor(here), (
            f"{path.relative_to(SRC)} ({here}, floor {_floor(here)}) imports {module} (floor {_floor(there)})"
        )


def test_nothing_below_training_imports_training():
    offenders = [str(p.relative_to(SRC)) for p in FILES if _room(p) not in ("training", "cli")
                 and any(m.startswith("megacontext.training") for m in _imports(p))]
    assert offenders == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_files_stay_readable(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES

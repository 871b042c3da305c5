"""Typed configuration: YAML files -> nested dataclasses, with one precedence.

Precedence (highest first)::

    command line (--set section.key=value, and flags such as --budget)
    environment  (MEGACONTEXT_DATA_ROOT, MEGACONTEXT_ARTIFACT_ROOT, MEGACONTEXT_SEED,
                  MEGACONTEXT_FORCE_DATA_REBUILD, MEGACONTEXT_ENABLE_WANDB)
    config file  (--config PATH, YAML)
    defaults     (the dataclasses below)

Every problem (unknown key, wrong type, impossible value) raises :class:`ConfigError`
with the offending key and the file it came from; the CLI prints it without a traceback.
This module is also the one place that resolves paths and seeds randomness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from megacontext.errors import ConfigError

REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class PathsConfig:
    data_root: str = "data"  # MEGACONTEXT_DATA_ROOT: dataset shards + tokenizers
    artifact_root: str = "artifacts"  # MEGACONTEXT_ARTIFACT_ROOT: bases, runs, checkpoints


@dataclass
class DataConfig:
    source: str = "python-stdlib"  # python-stdlib | files:GLOB | jsonl:PATH[:field] | hf:NAME[:split]
    name: str = ""  # dataset folder name; "" derives one from source + tokenizer
    max_documents: int = 0  # 0 = every document the source yields
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    shard_tokens: int = 2_000_000  # approximate tokens per Arrow shard
    vocab_size: int = 1024  # byte-level BPE size for the embedded base's tokenizer
    force_rebuild: bool = False  # MEGACONTEXT_FORCE_DATA_REBUILD=1


@dataclass
class BaseConfig:
    name: str = "embedded"  # "embedded" (tiny Llama the project trains) | HF hub id | local dir
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    max_context: int = 1024  # tokens the base may attend to (reference context length)
    attn_implementation: str = "sdpa"


@dataclass
class EmbeddedBaseConfig:
    """Architecture and pretraining recipe of the embedded tiny Llama."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    context: int = 1024
    steps: int = 1000
    batch_size: int = 4
    lr: float = 2e-3
    warmup_steps: int = 50
    passkey_fraction: float = 0.1  # share of training sequences that are synthetic passkey docs
    copy_rows: int = 4  # rows of repeated random tokens per step (the induction drill); 0 = none
    copy_length: int = 512  # tokens per drill row, period random in [8, copy_length / 2]; warm-up: half
    induction_steps: int = 3000  # most drill-only warm-up steps before the corpus (0 = none)
    induction_target: float = 0.5  # the warm-up ends once the drill's repeat loss falls below this
    eval_sequences: int = 32  # validation sequences of length `context` for the report
    passkey_trials: int = 30  # in-window passkey prompts (greedy exact match) for the report


@dataclass(frozen=True)
class TreeShape:
    """What every layer above the tree needs of its geometry: ``K`` and the gist levels."""

    block_size: int  # K: tokens per block, children per gist
    levels: int  # gist levels above LOD0


@dataclass
class TreeConfig:
    block_size: int = 32  # K: tokens per block, children per gist
    levels: int = 2  # gist levels above LOD0
    gist_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # on-disk dtype

    @property
    def shape(self) -> TreeShape:
        return TreeShape(self.block_size, self.levels)


@dataclass
class GistNetConfig:
    kind: Literal["transformer", "mean"] = "transformer"  # "mean" = no-backbone baseline
    layers: int = 2
    heads: int = 4
    hidden: int = 0  # internal width; 0 = the base's embedding width
    pooling: Literal["mean", "query", "cls"] = "query"
    projection: Literal["linear", "mlp"] = "mlp"
    per_level: bool = False  # one net per level instead of a shared net + level embedding


@dataclass
class LensNetConfig:
    kind: Literal["dual_cross", "transformer"] = "dual_cross"
    width: int = 64
    stacks: int = 2
    heads: int = 4
    lod1_conditioning: int = 4  # latest LOD1 gists in the conditioning set


@dataclass
class FocusConfig:
    """Working-context budget and focus-allocator policy."""

    budget: int = 256  # W_max in cost units (LOD0 token = 1, any gist = 1)
    tail_blocks: int = 2  # complete blocks kept raw besides the unfinished block
    position_mode: Literal["compact", "absolute"] = "compact"
    tau_expand: float = 0.2
    tau_collapse: float = 0.2
    n_diff: int = 4  # most actions per refocus
    cooldown: int = 2  # refocuses before a node may take the opposite action
    passes: int = 1  # allocator refinement passes per refocus (re-scoring between)
    stochastic: bool = False
    temperature: float = 1.0
    top_k: int = 8


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    blocks: Literal["first", "last"] = "last"  # which two blocks get attention adapters
    embeddings: bool = True  # adapter on the input embeddings
    keepalive_weight: float = 0.1  # JT3: KL to the adapter-free reference, next to NLL@H


@dataclass
class PhaseConfig:
    """Steps and peak learning rate of one training phase (0 steps: the phase is skipped)."""

    steps: int
    lr: float


@dataclass
class PhasesConfig:
    """One entry per phase, in training order: the warm start, then each cycle's JT1 -> JT2 -> JT3."""

    warm_gist: PhaseConfig = field(default_factory=lambda: PhaseConfig(100, 1e-3))  # GistNet
    warm_lens: PhaseConfig = field(default_factory=lambda: PhaseConfig(30, 1e-3))  # LensNet
    jt1: PhaseConfig = field(default_factory=lambda: PhaseConfig(40, 1e-3))  # GistNet
    jt2: PhaseConfig = field(default_factory=lambda: PhaseConfig(30, 1e-3))  # LensNet
    jt3: PhaseConfig = field(default_factory=lambda: PhaseConfig(60, 1e-4))  # LoRA


@dataclass
class OptimConfig:
    """AdamW + linear warm-up + cosine decay, shared by every phase."""

    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    weight_decay: float = 0.01


@dataclass
class GistObjectiveConfig:
    """GistNet's loss (warm_gist, JT1)."""

    substitutability: Literal["kl", "dnll"] = "kl"
    contrastive_weight: float = 0.0


@dataclass
class LensObjectiveConfig:
    """LensNet's loss (warm_lens, JT2): signed regression + these weighted terms."""

    rank_weight: float = 0.5  # pairwise ranking term
    budget_weight: float = 0.1  # expand/collapse cost balance term
    legality_weight: float = 0.1  # penalty on scores asking for impossible actions


@dataclass
class LabelConfig:
    """Counterfactual labels for LensNet."""

    snapshots: int = 4  # on-policy snapshots per label generation step
    candidates: int = 16  # counterfactual candidates per snapshot
    batch: int = 8  # counterfactual windows per batched base forward
    reuse: int = 1  # LensNet steps that train on each label step's snapshots (>= 1)


@dataclass
class ValidationConfig:
    windows: int = 16  # validation windows after every phase
    plateau_patience: int = 0  # cycles without improvement before stopping; 0 = never stop early
    plateau_tolerance: float = 0.005


@dataclass
class TrainConfig:
    cycles: int = 3
    horizon: int = 64  # H
    history_min: int = 1024  # tokens of history before the cursor (sampled per window)
    history_max: int = 2048
    batch_size: int = 4
    focus_rounds: int = 3  # refocuses from the initial assembly that form an on-policy window
    checkpoint_every: int = 0  # steps; 0 = only at phase ends
    cpu_threads: int = 0  # torch CPU threads while training; 0 = torch's default. 1 avoids stalls on a shared CPU
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gist: GistObjectiveConfig = field(default_factory=GistObjectiveConfig)
    lens: LensObjectiveConfig = field(default_factory=LensObjectiveConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


PHASE_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PhasesConfig))

# Keys of earlier versions -> where the setting lives now (named in the error message).
RENAMED_KEYS: dict[str, str] = {
    **{f"train.{p}_steps": f"train.phases.{p}.steps" for p in PHASE_NAMES},
    "train.lr_gist": "train.phases.warm_gist.lr and train.phases.jt1.lr",
    "train.lr_lens": "train.phases.warm_lens.lr and train.phases.jt2.lr",
    "train.lr_lora": "train.phases.jt3.lr",
    **{f"train.{k}": f"train.optim.{k}" for k in ("warmup_fraction", "grad_clip", "weight_decay")},
    "train.substitutability": "train.gist.substitutability",
    "train.contrastive_weight": "train.gist.contrastive_weight",
    "train.keepalive_weight": "train.lora.keepalive_weight",
    **{f"train.lens_{k}_weight": f"train.lens.{k}_weight" for k in ("rank", "budget", "legality")},
    **{f"train.label_{k}": f"train.labels.{k}" for k in ("snapshots", "candidates", "batch", "reuse")},
    "train.val_windows": "train.validation.windows",
    "train.plateau_patience": "train.validation.plateau_patience",
    "train.plateau_tolerance": "train.validation.plateau_tolerance",
}


@dataclass
class EvalConfig:
    budgets: list[int] = field(default_factory=lambda: [256])
    windows: int = 32
    split: str = "test"
    cursor: Literal["random", "end"] = "random"
    history_tokens: int = 1024  # history before the cursor (>= 4x budget)
    sinks: int = 4  # StreamingLLM attention-sink tokens
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_trials: int = 8
    batch_size: int = 8  # windows per batched base forward (loss@H and passkey scoring)


@dataclass
class WandbConfig:
    enabled: bool = False  # MEGACONTEXT_ENABLE_WANDB=1
    mode: Literal["online", "offline"] = "offline"  # WANDB_MODE overrides
    project: str = "megacontext"
    entity: str = ""


@dataclass
class Config:
    seed: int = 1234  # MEGACONTEXT_SEED
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    embedded: EmbeddedBaseConfig = field(default_factory=EmbeddedBaseConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    gistnet: GistNetConfig = field(default_factory=GistNetConfig)
    lensnet: LensNetConfig = field(default_factory=LensNetConfig)
    focus: FocusConfig = field(default_factory=FocusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    source_file: str = field(default="<defaults>", metadata={"internal": True})
    # dotted key -> where its value came from ("command line", "environment variable X", a file)
    origins: dict = field(default_factory=dict, metadata={"internal": True}, repr=False)

    # ------------------------------------------------------------------ paths
    @property
    def data_root(self) -> Path:
        return Path(self.paths.data_root)

    @property
    def artifact_root(self) -> Path:
        return Path(self.paths.artifact_root)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for YAML/JSON snapshots); never contains secrets."""
        out = dataclasses.asdict(self)
        out.pop("source_file", None)
        out.pop("origins", None)
        return out

    def fingerprint(self, *sections: str) -> str:
        """Stable short hash of the named sections (or everything) for content caching."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for k, v in pairs:  # type: ignore[misc]
        _set_dotted(cfg, k, v, "command line")
    validate(cfg)
    cfg.paths.data_root = str(Path(cfg.paths.data_root).expanduser().resolve())
    cfg.paths.artifact_root = str(Path(cfg.paths.artifact_root).expanduser().resolve())
    return cfg


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
    for name in PHASE_NAMES:
        need(getattr(cfg.train.phases, name).steps >= 0, f"train.phases.{name}.steps", "must be >= 0")
    need(4 <= cfg.train.lora.rank <= 64, "train.lora.rank", "must be in [4, 64]")
    for k in ("val_fraction", "test_fraction"):
        v = getattr(cfg.data, k)
        need(0 <= v < 0.5, f"data.{k}", "must be in [0, 0.5)")
    need(cfg.data.vocab_size >= 300, "data.vocab_size", "must be at least 300 (256 bytes + specials)")
    need(0 <= cfg.embedded.passkey_fraction < 1, "embedded.passkey_fraction", "must be in [0, 1)")
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


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

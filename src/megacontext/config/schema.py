"""The configuration schema: one typed dataclass per section, with the defaults.

``Config`` nests one dataclass per concern (paths, data, base, embedded, tree, gistnet,
lensnet, focus, train, eval, wandb); ``TrainConfig`` nests its own (phases, optim, gist,
lens, labels, validation, lora). :data:`PHASE_NAMES` — the training phases in order — is
read from :class:`PhasesConfig`, so the config is the one place that names them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "PathsConfig",
    "DataConfig",
    "BaseConfig",
    "EmbeddedBaseConfig",
    "TreeShape",
    "TreeConfig",
    "GistNetConfig",
    "LensNetConfig",
    "FocusConfig",
    "LoraConfig",
    "PhaseConfig",
    "PhasesConfig",
    "OptimConfig",
    "GistObjectiveConfig",
    "LensObjectiveConfig",
    "LabelConfig",
    "ValidationConfig",
    "TaskConfig",
    "TrainConfig",
    "EvalConfig",
    "WandbConfig",
    "Config",
    "PHASE_NAMES",
    "RENAMED_KEYS",
    "dump_yaml",
]


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
    passkey_run_keys: float = 0.5  # share of their keys with a run of 3-5 equal digits (rare in uniform keys)
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
    levels: int = 2  # gist levels a new tree starts with, and that GistNet/LensNet are built for; trees grow more
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
    query_likelihood: bool = False  # read each entry's query-likelihood gain (focus/likelihood.py) as a feature


@dataclass
class FocusConfig:
    """Working-context budget and focus-allocator policy."""

    budget: int = 256  # W_max in cost units (LOD0 token = 1, any gist = 1)
    tail_blocks: int = 2  # complete blocks kept raw besides the unfinished block
    position_mode: Literal["compact", "absolute"] = "compact"
    tau_expand: float = 0.2
    tau_collapse: float = 0.2
    n_diff: int = 4  # most actions per refocus
    pay_for_expands: bool = True  # an expand that does not fit may collapse low-scored groups to pay for it
    pay_margin: float = 0.4  # ... when its score exceeds each such group's mean score by more than this
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
    reconstruction_weight: float = 0.0  # JT3: + this x NLL of blocks the adapted base reconstructs from gists


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
    initial_assembly: float = 0.0  # warm_gist: share of windows read as the initial assembly (else random spans)
    reconstruction_weight: float = 0.0  # warm_gist: + this x NLL of blocks the base reconstructs from their gists
    reconstruction_blocks: int = 8  # random complete blocks per window for that term


@dataclass
class LensObjectiveConfig:
    """LensNet's loss (warm_lens, JT2): signed regression + these weighted terms."""

    rank_weight: float = 0.5  # pairwise ranking term
    listwise_weight: float = 0.0  # softmax over a snapshot's expands + a "nothing helps" option at tau_expand
    listwise_temperature: float = 0.05
    listwise_null_target: float = 0.2  # target of the "nothing helps" option (its score is tau_expand)
    positive_weight: float = 0.0  # regression weight of a candidate: 1 + positive_weight * max(0, target)
    budget_weight: float = 0.1  # expand/collapse cost balance term
    legality_weight: float = 0.1  # penalty on scores asking for impossible actions


@dataclass
class LabelConfig:
    """Counterfactual labels for LensNet."""

    snapshots: int = 4  # on-policy snapshots per label generation step
    candidates: int = 16  # counterfactual candidates per snapshot
    batch: int = 8  # counterfactual windows per batched base forward
    reuse: int = 1  # LensNet steps that train on each label step's snapshots (>= 1)
    scale: float = 0.1  # nats per horizon token that make a target of tanh(1) = 0.76
    margin: float = 0.01  # noise floor: gains below it count as nothing
    lookahead: bool = True  # level >= 2 gists are credited with their best child path
    lookahead_noise_z: float = 2.0  # ... counted above its median path by more than this many robust s.d.
    pay_collapses: bool = False  # collapses labelled by what they pay for (the best expand), not only their harm
    explore: float = 0.0  # share of snapshots taken after random-focus rounds instead of LensNet's


@dataclass
class ValidationConfig:
    windows: int = 16  # validation windows after every phase
    task_windows: int = 8  # passkey windows (training templates, validation documents) when tasks are on
    plateau_patience: int = 0  # cycles without improvement before stopping; 0 = never stop early
    plateau_tolerance: float = 0.005


@dataclass
class TaskConfig:
    """Training tasks mixed with corpus windows (``data.tasks``), in the phases listed."""

    passkey: float = 0.0  # share of a step's windows that are passkey tasks
    multikey: float = 0.0  # share that are multi-key recall tasks
    history_max: int = 4096  # task histories are uniform in [train.history_min, history_max]
    facts: int = 4  # key/value facts per multikey window
    phases: list[str] = field(default_factory=lambda: ["warm_lens", "jt2"])


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
    tasks: TaskConfig = field(default_factory=TaskConfig)
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
    multikey_facts: int = 4  # multi-key recall grid: facts per prompt (0: no multikey grid)
    multikey_lengths: list[int] = field(default_factory=lambda: [4096])
    multikey_trials: int = 8
    oracle_windows: int = 16  # windows of the oracle_focus ceiling (0: none); it costs a counterfactual search each
    gist_windows: int = 128  # windows of the gist-value panel (recency vs uniform_gists, paired; 0: none)


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


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

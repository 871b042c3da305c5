"""`megacontext eval`: loss@H per policy and budget, passkey accuracy, timing -> eval.json.

Windows come from the chosen split's documents with at least ``history + H`` tokens;
``history = max(eval.history_tokens, 4 * max(budgets))`` tokens before the cursor, the
cursor random (seeded) or at the document's end. Every policy sees the same windows.
Loss@H is the mean NLL of the ``H`` real tokens after the cursor (training's
:func:`~megacontext.focus.horizon.horizon_nll`), with the window held fixed over them.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from megacontext.base_model import BaseModel
from megacontext.config import Config, derive_seed
from megacontext.data import SPLITS, PreparedDataset, Window, WindowSampler, prepare_dataset
from megacontext.errors import DataError, MegaContextError
from megacontext.eval.ceiling import ceiling_rows
from megacontext.eval.gists import gist_value_rows, reconstruction_quality
from megacontext.eval.passkey import passkey_grid
from megacontext.eval.results import loss_rows, make_eval_json
from megacontext.eval.timing import measure_timing
from megacontext.focus.policies import POLICIES, RAW_POLICIES, FocusSettings, PolicyWindow, policy_nll
from megacontext.focus.source import build_source
from megacontext.focus.trace import FocusTrace
from megacontext.modules import Modules

Say = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ data
@dataclass
class EvalData:
    name: str  # dataset name
    split: str  # split(s) the windows come from, e.g. "test" or "train+val+test"
    docs: list[np.ndarray]  # documents with >= history + H tokens
    filler: list[np.ndarray]  # every document of those splits (passkey haystacks)


def _long(docs: Sequence[np.ndarray], min_tokens: int) -> list[np.ndarray]:
    return [d for d in docs if len(d) >= min_tokens]


def load_eval_data(
    cfg: Config, base: BaseModel, source: str | None, split: str | None, min_tokens: int, progress: bool,
    say: Say = _stderr,
) -> EvalData:
    """Documents of ``split`` with >= ``min_tokens`` tokens.

    ``source`` (any data source spec) is prepared with the base's tokenizer and cached. A
    corpus the base was not trained on is evaluated on ALL its documents unless ``split``
    names one; if that split has no long-enough document, every split is used (and said so).
    Without ``source``, ``split`` None means ``eval.split``.
    """
    if source is not None and split is None:
        split = "all"
    split = cfg.eval.split if split is None else split
    if split != "all" and split not in SPLITS:
        raise MegaContextError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if source is None:
        ds = prepare_dataset(cfg, progress=progress)
    else:
        own = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=""))
        ds = prepare_dataset(own, source=source, tokenizer=base.tokenizer, progress=progress)
    docs = _long(ds.documents(split), min_tokens) if split != "all" else []
    if docs:
        return EvalData(ds.name, split, docs, list(ds.documents(split)))
    if source is None:
        raise DataError(_too_short(ds, split, min_tokens))
    every = [d for s in SPLITS for d in ds.documents(s)]
    docs = _long(every, min_tokens)
    if not docs:
        raise DataError(_too_short(ds, "any", min_tokens))
    if split != "all":
        say(f"the {split} split of {ds.name} has no document of >= {min_tokens} tokens; "
            f"using all its splits ({len(docs)} long documents)")
    return EvalData(ds.name, "+".join(SPLITS), docs, every)


def _too_short(ds: PreparedDataset, split: str, min_tokens: int) -> str:
    splits = SPLITS if split == "any" else (split,)
    longest = max((len(d) for s in splits for d in ds.documents(s)), default=0)
    return (f"no document in the {split} split of {ds.name} has history + horizon = {min_tokens} "
            f"tokens (the longest has {longest}); lower eval.history_tokens or the budgets")


def select_windows(
    docs: Sequence[np.ndarray], history: int, horizon: int, cursor: Literal["random", "end"], n: int, seed: int
) -> list[Window]:
    """``n`` windows of exactly ``history`` tokens + ``horizon``, deterministic in ``seed``.

    ``random``: seeded cursors (documents weighted by their number of valid cursors).
    ``end``: the horizon is a document's last ``H`` tokens, one window per distinct
    document (fewer than ``n`` when there are fewer long documents).
    """
    sampler = WindowSampler(docs, horizon, history, history, cursor, seed)
    if cursor == "random":
        return sampler.batch(0, n)
    rng = np.random.default_rng(derive_seed(seed, "eval-end-windows"))
    out = []
    for i in rng.permutation(sampler.eligible)[:n]:
        doc = np.asarray(docs[i], dtype=np.int64)
        c = len(doc) - horizon
        out.append(Window(int(i), c, doc[c - history : c], doc[c:]))
    return out


# ------------------------------------------------------------------------- loss@H
@dataclass
class PolicyStats:
    """Per-window measurements of one (budget, policy)."""

    losses: list[float] = field(default_factory=list)
    costs: list[int] = field(default_factory=list)
    gist_entries: list[int] = field(default_factory=list)
    swap_rates: list[float] = field(default_factory=list)  # the allocator's, per window

    def add(self, losses: Sequence[float], windows: Sequence[PolicyWindow], traces: Sequence[FocusTrace]) -> None:
        self.losses.extend(losses)
        self.swap_rates.extend(t.swap_rate for t in traces)
        self.costs.extend(w.cost for w in windows)
        self.gist_entries.extend(w.gist_entries for w in windows)


def _window_rng(seed: int, policy: str, budget: int, index: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, "eval", policy, budget, index))


@torch.no_grad()
def loss_at_h(
    mods: Modules,
    settings: FocusSettings,
    windows: Sequence[Window],
    budgets: Sequence[int],
    policies: Sequence[str],
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> dict[tuple[int, str], PolicyStats]:
    """loss@H of every window under every (budget, policy); one batched forward per group.

    The reference does not depend on the budget: it is measured once and reported at each.
    """
    stats = {(b, p): PolicyStats() for b in budgets for p in policies}
    needs_gists = any(p not in RAW_POLICIES for p in policies)
    bar = tqdm(total=len(windows), desc="loss@H", unit="win", disable=not progress)
    for lo in range(0, len(windows), batch_size):
        batch = windows[lo : lo + batch_size]
        sources = [build_source(mods.base, mods.gistnet, w.history, settings.shape) if needs_gists else None for w in batch]
        for policy in policies:
            for budget in budgets[:1] if policy == "reference" else budgets:
                rngs = [_window_rng(seed, policy, budget, i) for i in range(lo, lo + len(batch))]
                traces = [FocusTrace() for _ in batch]
                nll, pws = policy_nll(policy, mods, settings.at_budget(budget), batch, sources, rngs, traces)
                for b in budgets if policy == "reference" else [budget]:
                    stats[(b, policy)].add(nll, pws, traces)
        bar.update(len(batch))
    bar.close()
    return stats


# -------------------------------------------------------------------------- driver
@dataclass
class EvalOptions:
    budgets: list[int]
    windows: int
    cursor: Literal["random", "end"]
    split: str | None = "test"  # None: eval.split, or every document of a --data corpus
    data: str | None = None  # a data source spec; None = the config's prepared dataset
    passkey: bool = True
    loss: bool = True  # False: passkey only
    oracle_windows: int = 0  # the oracle_focus ceiling on the first N loss windows
    gist_windows: int = 0  # the gist-value panel's windows (recency vs uniform_gists, paired)
    policies: tuple[str, ...] = POLICIES

    @classmethod
    def from_config(cls, cfg: Config) -> EvalOptions:
        e = cfg.eval
        return cls(list(e.budgets), e.windows, e.cursor, e.split, oracle_windows=e.oracle_windows,
                   gist_windows=e.gist_windows)


@dataclass
class EvalRun:
    """eval.json plus the per-window details behind it (for tests and the report)."""

    json: dict
    stats: dict[tuple[int, str], PolicyStats]
    windows: list[Window]


def eval_history_tokens(cfg: Config, budgets: Sequence[int]) -> int:
    """History before the cursor: eval.history_tokens, raised to 4x the largest budget."""
    return max(cfg.eval.history_tokens, 4 * max(budgets))


def evaluate(
    cfg: Config, modules: Modules, opts: EvalOptions, progress: bool = True, say: Say = _stderr
) -> EvalRun:
    """Run the protocol of spec §6 and return eval.json (not yet written)."""
    if not opts.budgets:
        raise MegaContextError("no budget to evaluate: give --budgets or eval.budgets")
    tail = (cfg.focus.tail_blocks + 1) * cfg.tree.block_size
    for b in opts.budgets:
        if b < tail + cfg.tree.block_size:
            raise MegaContextError(f"budget {b} is below the raw tail + one block ({tail + cfg.tree.block_size})")
    base = modules.base
    H = cfg.train.horizon
    history = eval_history_tokens(cfg, opts.budgets)
    if history != cfg.eval.history_tokens:
        say(f"history raised from {cfg.eval.history_tokens} to {history} tokens (>= 4x the largest budget)")
    min_tokens = history + H if opts.loss else 1  # passkey only: any document can be filler
    data = load_eval_data(cfg, base, opts.data, opts.split, min_tokens, progress, say)
    if modules.checkpoint is None:
        say("no trained checkpoint: evaluating untrained GistNet/LensNet")
    settings = FocusSettings.from_config(cfg, greedy=True)
    budgets = sorted(set(opts.budgets))
    stats: dict[tuple[int, str], PolicyStats] = {}
    windows: list[Window] = []
    if opts.loss:
        windows = select_windows(data.docs, history, H, opts.cursor, opts.windows, cfg.seed)
        stats = loss_at_h(modules, settings, windows, budgets, opts.policies, cfg.eval.batch_size, cfg.seed, progress)
    ceiling = []
    if opts.loss and opts.oracle_windows > 0:
        if progress:
            say(f"oracle_focus ceiling on {min(opts.oracle_windows, len(windows))} windows")
        ceiling = ceiling_rows(modules, settings, windows[: opts.oracle_windows], budgets, cfg.seed,
                               cfg.eval.batch_size)
    gists, recon = [], {}
    if opts.loss and opts.gist_windows > 0:
        if progress:
            say(f"gist value on {opts.gist_windows} windows")
        gist_windows = select_windows(data.docs, history, H, opts.cursor, opts.gist_windows, cfg.seed)
        gists = gist_value_rows(modules, settings, gist_windows, budgets, cfg.eval.batch_size)
        recon = reconstruction_quality(modules, gist_windows, cfg.tree.block_size, cfg.seed)
    passkey = []
    if opts.passkey:
        passkey = passkey_grid(modules, settings, cfg.eval, data.filler, budgets, opts.policies, cfg.seed, progress)
    multikey = []
    if opts.passkey and cfg.eval.multikey_facts > 0:
        multikey = passkey_grid(modules, settings, cfg.eval, data.filler, budgets, opts.policies, cfg.seed, progress,
                                task="multikey")
    timing = measure_timing(modules, settings.at_budget(max(budgets)), max(data.docs, key=len), cfg.seed)
    header = {
        "horizon": H,
        "block_size": cfg.tree.block_size,
        "base": base.name,
        "checkpoint": str(modules.checkpoint) if modules.checkpoint is not None else None,
        "data": data.name,
        "split": data.split,
        "cursor": opts.cursor,
    }
    results = loss_rows({k: v.losses for k, v in stats.items()}, {k: v.swap_rates for k, v in stats.items()})
    return EvalRun(make_eval_json(header, results, passkey, timing, ceiling, multikey, gists, recon), stats, windows)

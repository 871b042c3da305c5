"""Passkey retrieval (spec §6): exact-match accuracy over history length x depth, per policy.

Examples come from :func:`megacontext.data.make_passkey`, seeded per (length, depth,
trial), each needle moved by up to half a block from its depth point (``spread`` = the
block size), so a cell holds every block phase — a fixed position put every trial of
4,096 / 0.1 (and of 1,024 / 0.7) across a block border, and no trial of the other cells;
the multi-key grid (``task="multikey"``) from :func:`megacontext.data.make_multikey`
(``eval.multikey_facts`` facts that share their wording, the asked one at the depth). A policy is correct when greedy decoding of ``len(answer)`` tokens reproduces the
answer exactly. With the window held fixed over those few tokens, that is the same as
"the argmax at every teacher-forced answer slot is the answer token" (greedy stays on the
answer as long as it is right), so one batched forward scores every policy of an example.

Every policy, ``megacontext`` included, builds its window over the whole prompt at once
(:func:`~megacontext.focus.policies.policy_window`: the initial assembly at the full budget,
then ``train.focus_rounds`` refocuses with the question in the raw tail), so the rows compare
scores, not protocols. One more row, ``megacontext_session`` (:data:`SESSION_ROW`, added
whenever ``megacontext`` is asked for), is what the runtime gives a user: a
:class:`~megacontext.runtime.Session` over a RAM tree ingests the prompt (forced collapses
keep it in budget, one block of the budget held back as decoding headroom, one refocus once
it is all in) and refocuses ``train.focus_rounds`` more times.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from megacontext.base_model import BaseModel
from megacontext.config import EvalConfig, derive_seed
from megacontext.data import PasskeyExample, make_multikey, make_passkey
from megacontext.focus.horizon import PrefixLike, horizon_logits
from megacontext.focus.policies import RAW_POLICIES, FocusSettings, PolicyRequest, policy_window, reading
from megacontext.focus.source import build_source
from megacontext.modules import Modules
from megacontext.runtime import Session
from megacontext.tree import MegaContextTree
from megacontext.working_context import Assembled

Case = tuple[int, float, int]  # (history tokens, depth, trial)


TASKS = ("passkey", "multikey")
SESSION_ROW = "megacontext_session"  # the runtime's window (see the module docstring)


def passkey_examples(
    ecfg: EvalConfig, tokenizer, filler: Sequence[np.ndarray], seed: int, task: str = "passkey", spread: int = 0
) -> list[tuple[Case, PasskeyExample]]:
    """The grid lengths x passkey_depths x trials of ``task``, deterministic in ``seed``
    (passkey: passkey_lengths x passkey_trials; multikey: multikey_lengths x multikey_trials);
    ``spread``: see :func:`megacontext.data.passkey.depth_cut`."""
    multi = task == "multikey"
    lengths, trials = (ecfg.multikey_lengths, ecfg.multikey_trials) if multi else (ecfg.passkey_lengths,
                                                                                   ecfg.passkey_trials)
    out = []
    for length in lengths:
        for depth in ecfg.passkey_depths:
            for trial in range(trials):
                rng = np.random.default_rng(derive_seed(seed, task, length, depth, trial))
                ex = (make_multikey(rng, tokenizer, filler, length, ecfg.multikey_facts, depth=depth, spread=spread)
                      if multi else make_passkey(rng, tokenizer, filler, length, depth, spread=spread))
                out.append(((length, depth, trial), ex))
    return out


@torch.no_grad()
def answer_correct(base: BaseModel, prefixes: Sequence[PrefixLike], answer: np.ndarray) -> list[bool]:
    """Greedy exact match of ``answer`` int64 [A] after each prefix (one batched forward)."""
    target = torch.as_tensor(np.tile(answer, (len(prefixes), 1)))
    logits = horizon_logits(base, list(prefixes), target)  # [B, A, V]
    hits = logits.argmax(dim=-1).cpu() == target
    return hits.all(dim=1).tolist()


@torch.no_grad()
def session_window(mods: Modules, settings: FocusSettings, prompt: np.ndarray, seed: int) -> Assembled:
    """The runtime's window after ingesting ``prompt`` (one refocus when it is all in, then
    ``settings.rounds`` more)."""
    shape = settings.shape
    tree = MegaContextTree.create_ram(shape.block_size, shape.levels, mods.base.dim, mods.gister())
    session = Session(mods, tree, settings.focus, seed=seed)
    session.ingest(prompt)
    for _ in range(settings.rounds):
        session.refocus()
    return session.assemble()


def _prefix(
    policy: str, mods: Modules, settings: FocusSettings, ex: PasskeyExample, source, rng: np.random.Generator,
    seed: int,
) -> PrefixLike:
    if policy == SESSION_ROW:
        return session_window(mods, settings, ex.prompt, seed)
    with reading(mods, policy):
        return policy_window(policy, PolicyRequest(mods, settings, ex.prompt, source, len(ex.answer), rng)).prefix


@torch.no_grad()
def passkey_grid(
    mods: Modules,
    settings: FocusSettings,
    ecfg: EvalConfig,
    filler: Sequence[np.ndarray],
    budgets: Sequence[int],
    policies: Sequence[str],
    seed: int,
    progress: bool = False,
    task: str = "passkey",
    session: bool = True,
) -> list[dict]:
    """eval.json passkey (or multikey) rows: {budget, history_tokens, depth, policy, accuracy, n};
    ``session``: add the :data:`SESSION_ROW` right after ``megacontext`` when it is asked for."""
    examples = passkey_examples(ecfg, mods.base.tokenizer, filler, seed, task, settings.shape.block_size)
    hits: dict[tuple[int, int, float, str], list[bool]] = defaultdict(list)
    policies = [q for p in policies for q in ((p, SESSION_ROW) if p == "megacontext" and session else (p,))]
    needs_source = any(p not in RAW_POLICIES and p != SESSION_ROW for p in policies)
    for (length, depth, trial), ex in tqdm(examples, desc=task, unit="ex", disable=not progress):
        source = (
            build_source(mods.base, mods.gistnet, ex.prompt, settings.shape) if needs_source else None
        )
        keys, prefixes = [], []
        for policy in policies:
            for budget in budgets[:1] if policy == "reference" else budgets:
                rng = np.random.default_rng(derive_seed(seed, f"{task}-policy", policy, budget, length, depth, trial))
                keys.append((policy, budget))
                prefixes.append(_prefix(policy, mods, settings.at_budget(budget), ex, source, rng, seed))
        ok = _score(mods, keys, prefixes, ex.answer, ecfg.batch_size)
        for (policy, budget), correct in zip(keys, ok):
            for b in budgets if policy == "reference" else [budget]:
                hits[(b, length, depth, policy)].append(correct)
    return [
        {"budget": b, "history_tokens": length, "depth": depth, "policy": policy,
         "accuracy": float(np.mean(v)), "n": len(v)}
        for (b, length, depth, policy), v in sorted(hits.items(), key=lambda kv: _order(kv[0], policies))
    ]


def _score(
    mods: Modules, keys: Sequence[tuple[str, int]], prefixes: Sequence[PrefixLike],
    answer: np.ndarray, batch_size: int,
) -> list[bool]:
    """Exact match per prefix, batched per reading base (plain for raw policies)."""
    ok = [False] * len(keys)
    for raw in (True, False):
        sel = [i for i, (policy, _) in enumerate(keys) if (policy in RAW_POLICIES) == raw]
        with mods.plain() if raw else nullcontext():
            for lo in range(0, len(sel), batch_size):
                chunk = sel[lo : lo + batch_size]
                for i, hit in zip(chunk, answer_correct(mods.base, [prefixes[i] for i in chunk], answer)):
                    ok[i] = hit
    return ok


def _order(key: tuple[int, int, float, str], policies: Sequence[str]) -> tuple:
    b, length, depth, policy = key
    return b, length, depth, list(policies).index(policy)

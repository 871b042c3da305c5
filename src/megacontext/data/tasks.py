"""Training tasks where focus matters, mixed with corpus windows (the seed's "mixed long-context tasks").

- ``passkey``  one needle at a uniform depth of a history of ``[history_min, history_max]``
  tokens; the horizon is the answer, then filler up to ``H`` tokens;
- ``multikey`` ``facts`` key/value needles that share their wording (``# <name> code: <key>``)
  at random depths; the question asks for one of them: surface similarity to the question
  points at every fact, only the name tells them apart.

Templates and seeds are training's own (:data:`TRAIN_PASSKEY_TEMPLATES`, ``"task"`` seeds);
evaluation uses :data:`~megacontext.data.passkey.EVAL_TEMPLATE` / ``EVAL_FACTS`` with its own seeds, so
evaluation is never memorised. Every window is a pure function of (seed, step, row).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megacontext.config import TaskConfig, derive_seed
from megacontext.data.passkey import FactTemplate, PasskeyTemplate, filler_tokens, make_multikey, make_passkey
from megacontext.data.sampler import Window, WindowSampler

TASKS = ("corpus", "passkey", "multikey")

TRAIN_PASSKEY_TEMPLATES = (
    PasskeyTemplate("\n# access code: {key}\n", ("\n# what was the access code? access code:", "\n# access code ="), " {key}\n"),
    PasskeyTemplate("\n# the magic number is {key}\n", ("\n# recall: the magic number is", "\n# magic number ="), " {key}\n"),
    PasskeyTemplate("\nSECRET = {key}  # keep it\n", ("\n# what is SECRET?\nSECRET =", "\n# SECRET:"), " {key}\n"),
)
TRAIN_FACTS = FactTemplate(
    "\n# {name} code: {key}\n", ("\n# what is the {name} code? {name} code:", "\n# {name} code ="), " {key}\n",
    ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"),
)


def _horizon(rng: np.random.Generator, answer: np.ndarray, filler_docs: Sequence[np.ndarray], horizon: int) -> np.ndarray:
    """int64 [horizon]: the answer, then filler (the answer alone when it is that long)."""
    rest = horizon - len(answer)
    tail = filler_tokens(rng, filler_docs, rest) if rest > 0 else np.zeros(0, np.int64)
    return np.concatenate([answer, tail]).astype(np.int64)[:horizon]


def passkey_window(
    rng: np.random.Generator, tokenizer, filler_docs: Sequence[np.ndarray], history: int, horizon: int
) -> Window:
    """A passkey prompt of ``history`` tokens (a training template, uniform depth) + its horizon."""
    template = TRAIN_PASSKEY_TEMPLATES[int(rng.integers(len(TRAIN_PASSKEY_TEMPLATES)))]
    ex = make_passkey(rng, tokenizer, filler_docs, history, float(rng.uniform()), template)
    return Window(-1, history, ex.prompt, _horizon(rng, ex.answer, filler_docs, horizon), "passkey")


def multikey_window(
    rng: np.random.Generator, tokenizer, filler_docs: Sequence[np.ndarray], history: int, horizon: int, facts: int
) -> Window:
    """``facts`` named codes planted at random depths; the question asks one of them."""
    ex = make_multikey(rng, tokenizer, filler_docs, history, facts, TRAIN_FACTS)
    return Window(-1, history, ex.prompt, _horizon(rng, ex.answer, filler_docs, horizon), "multikey")


class TaskMixture:
    """Training windows: corpus windows (``corpus.batch``) mixed with task windows by share.

    Row ``r`` of step ``s`` draws its task from ``derive_seed(seed, "task", s, r)``; task
    histories are uniform in ``[corpus.history_min, cfg.history_max]``. With zero shares
    the batch is exactly ``corpus.batch(step, n)``.
    """

    def __init__(self, corpus: WindowSampler, filler_docs: Sequence[np.ndarray], tokenizer, cfg: TaskConfig,
                 seed: int) -> None:
        self.corpus, self.filler, self.tokenizer, self.cfg, self.seed = corpus, filler_docs, tokenizer, cfg, seed
        self.shares = np.asarray([1.0 - cfg.passkey - cfg.multikey, cfg.passkey, cfg.multikey])

    def batch(self, step: int, batch_size: int) -> list[Window]:
        windows = self.corpus.batch(step, batch_size)
        if self.shares[0] >= 1.0:
            return windows
        for r in range(batch_size):
            rng = np.random.default_rng(derive_seed(self.seed, "task", step, r))
            task = TASKS[int(rng.choice(len(TASKS), p=self.shares))]
            if task == "corpus":
                continue
            history = int(rng.integers(self.corpus.history_min, max(self.corpus.history_min, self.cfg.history_max) + 1))
            H = self.corpus.horizon
            if task == "passkey":
                windows[r] = passkey_window(rng, self.tokenizer, self.filler, history, H)
            else:
                windows[r] = multikey_window(rng, self.tokenizer, self.filler, history, H, self.cfg.facts)
        return windows

"""Synthetic passkey retrieval, dressed as code comments so it fits a code corpus.

A 5-digit key is planted at fraction ``depth`` of a haystack of filler tokens::

    <filler> "\n# pass key: 48213\n" <filler> "\n# what is the pass key? pass key:"

and the correct continuation is exactly the answer tokens of ``" 48213\n"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megacontext.errors import DataError

NEEDLE = "\n# pass key: {key}\n"
# Question variants, tried in order until one does not merge with the answer's first token.
QUESTIONS = ("\n# what is the pass key? pass key:", "\n# what is the pass key?\n# pass key =")
ANSWER = " {key}\n"
KEY_DIGITS = 5


@dataclass(frozen=True)
class PasskeyTemplate:
    """The texts of one passkey task: ``needle`` and ``answer`` hold ``{key}``; ``questions``
    are variants tried in order until one does not merge with the answer's first token."""

    needle: str
    questions: tuple[str, ...]
    answer: str


EVAL_TEMPLATE = PasskeyTemplate(NEEDLE, QUESTIONS, ANSWER)  # evaluation's (and the base's pretraining)


@dataclass
class PasskeyExample:
    prompt: np.ndarray  # int64 [T]: filler + needle + filler + question
    answer: np.ndarray  # int64 [A]: tokens of the answer (" <key>\n" in the eval template)
    key: str  # the 5 digits
    depth: float  # requested needle depth in [0, 1]
    needle_pos: int  # index in ``prompt`` of the needle's first token


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def question_and_answer(tokenizer, template: PasskeyTemplate, key: str) -> tuple[list[int], list[int]]:
    """(question ids, answer ids): the answer ids are the tail of tokenize(question + answer),
    so they are exactly the continuation a model reading the full text would see; the
    question must survive as a prefix."""
    for question in template.questions:
        q_ids = _encode(tokenizer, question)
        full = _encode(tokenizer, question + template.answer.format(key=key))
        if full[: len(q_ids)] == q_ids and key in tokenizer.decode(full[len(q_ids) :]):
            return q_ids, full[len(q_ids) :]
    raise DataError("this tokenizer merges every passkey question with its answer; cannot build passkeys")


def random_key(rng: np.random.Generator, run_keys: float = 0.0) -> str:
    """A random 5-digit key; with probability ``run_keys`` one holding a run of 3 to 5 equal
    digits (``12111``). Uniform keys hold such a run only ~3% of the time, and a small base that
    rarely sees one drops a digit of it when it copies. ``run_keys=0`` draws exactly one integer,
    so evaluation's keys do not depend on this option."""
    if run_keys <= 0.0 or rng.random() >= run_keys:
        return str(int(rng.integers(10_000, 100_000)))
    digits = [str(int(d)) for d in rng.integers(0, 10, size=KEY_DIGITS)]
    run = int(rng.integers(3, KEY_DIGITS + 1))
    start = int(rng.integers(0, KEY_DIGITS - run + 1))
    digits[start : start + run] = [str(int(rng.integers(0, 10)))] * run
    if digits[0] == "0":  # a 5-digit key: every 0 becomes one nonzero digit, so a run stays a run
        nonzero = str(int(rng.integers(1, 10)))
        digits = [nonzero if d == "0" else d for d in digits]
    return "".join(digits)


def _parts(
    rng: np.random.Generator, tokenizer, template: PasskeyTemplate, run_keys: float = 0.0
) -> tuple[str, list[int], list[int], list[int]]:
    """(key, needle ids, question ids, answer ids) of a random 5-digit key (:func:`random_key`)."""
    key = random_key(rng, run_keys)
    q_ids, a_ids = question_and_answer(tokenizer, template, key)
    return key, _encode(tokenizer, template.needle.format(key=key)), q_ids, a_ids


def filler_tokens(rng: np.random.Generator, filler_docs: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``n`` filler tokens: a random document from a random offset, then whole random documents."""
    docs = [d for d in filler_docs if len(d)]
    if not docs:
        raise DataError("passkey filler needs at least one non-empty document")
    pieces, have = [], 0
    first = docs[int(rng.integers(len(docs)))]
    pieces.append(first[int(rng.integers(len(first))) :])
    have += len(pieces[-1])
    while have < n:
        pieces.append(docs[int(rng.integers(len(docs)))])
        have += len(pieces[-1])
    return np.concatenate(pieces).astype(np.int64)[:n]


def depth_cut(rng: np.random.Generator, depth: float, n_filler: int, spread: int) -> int:
    """The filler offset of a needle at ``depth``: ``depth * n_filler``, moved by a uniform
    integer in ``[-spread // 2, spread // 2]`` (clipped to the filler). With ``spread`` = the
    block size, the trials of one depth land at every offset inside a block: without it every
    trial of a (length, depth) cell falls at the same offset, so a cell measures one block
    phase (e.g. every needle cut in two by a block border) instead of the depth."""
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"needle depth must be in [0, 1], got {depth}")
    shift = int(rng.integers(-(spread // 2), spread // 2 + 1)) if spread > 0 else 0
    return min(max(int(round(depth * n_filler)) + shift, 0), n_filler)


def _assemble(
    rng: np.random.Generator,
    filler_docs: Sequence[np.ndarray],
    prompt_tokens: int,
    depth: float,
    needle: list[int],
    question: list[int],
    spread: int,
) -> tuple[np.ndarray, int]:
    n_filler = prompt_tokens - len(needle) - len(question)
    if n_filler < 0:
        raise DataError(
            f"a passkey prompt of {prompt_tokens} tokens is too short: needle and question "
            f"alone take {len(needle) + len(question)}"
        )
    filler = filler_tokens(rng, filler_docs, n_filler) if n_filler else np.zeros(0, np.int64)
    pos = depth_cut(rng, depth, n_filler, spread)
    prompt = np.concatenate([filler[:pos], needle, filler[pos:], question]).astype(np.int64)
    return prompt, pos


def make_passkey(
    rng: np.random.Generator,
    tokenizer,
    filler_docs: Sequence[np.ndarray],
    total_tokens: int,
    depth: float,
    template: PasskeyTemplate = EVAL_TEMPLATE,
    spread: int = 0,
    run_keys: float = 0.0,
) -> PasskeyExample:
    """A passkey prompt of exactly ``total_tokens`` tokens with the needle at ``depth``
    (give or take ``spread // 2`` tokens, see :func:`depth_cut`, which checks ``depth``);
    ``run_keys`` is training's share of keys with a digit run (:func:`random_key`)."""
    key, needle, question, answer = _parts(rng, tokenizer, template, run_keys)
    prompt, pos = _assemble(rng, filler_docs, total_tokens, depth, needle, question, spread)
    return PasskeyExample(prompt, np.asarray(answer, dtype=np.int64), key, depth, pos)


@dataclass(frozen=True)
class FactTemplate:
    """Multi-key recall: ``needle`` holds ``{name}`` and ``{key}``; the questions ``{name}``.
    Every fact shares the wording, so only the name tells the asked one apart."""

    needle: str
    questions: tuple[str, ...]
    answer: str
    names: tuple[str, ...]


EVAL_FACTS = FactTemplate(
    "\n# {name} id: {key}\n",
    ("\n# which is the {name} id? {name} id:", "\n# {name} id ="),
    " {key}\n",
    ("red", "green", "blue", "amber", "olive", "ivory", "coral", "slate", "mauve", "azure"),
)


def make_multikey(
    rng: np.random.Generator,
    tokenizer,
    filler_docs: Sequence[np.ndarray],
    total_tokens: int,
    facts: int,
    template: FactTemplate = EVAL_FACTS,
    depth: float | None = None,
    spread: int = 0,
) -> PasskeyExample:
    """``facts`` named 5-digit keys at random depths of a ``total_tokens`` prompt; the question
    asks one of them (planted at ``depth`` when given). ``needle_pos``/``depth``: the asked fact's."""
    if not 1 <= facts <= len(template.names):
        raise DataError(f"multikey needs 1..{len(template.names)} facts, got {facts}")
    names = [template.names[i] for i in rng.choice(len(template.names), size=facts, replace=False)]
    keys = [str(int(rng.integers(10_000, 100_000))) for _ in range(facts)]
    asked = int(rng.integers(facts))
    asked_fmt = PasskeyTemplate(template.needle, tuple(q.format(name=names[asked]) for q in template.questions),
                                template.answer)
    question, answer = question_and_answer(tokenizer, asked_fmt, keys[asked])
    needles = [_encode(tokenizer, template.needle.format(name=n, key=k)) for n, k in zip(names, keys)]
    n_filler = total_tokens - len(question) - sum(len(x) for x in needles)
    if n_filler < 0:
        raise DataError(f"a multikey prompt of {total_tokens} tokens cannot hold {facts} facts and the question")
    filler = filler_tokens(rng, filler_docs, n_filler)
    cuts = rng.integers(0, n_filler + 1, size=facts)
    if depth is not None:
        cuts[asked] = depth_cut(rng, depth, n_filler, spread)
    order = np.argsort(cuts, kind="stable")
    pieces, last, pos = [], 0, 0
    for i in order:
        pieces += [filler[last : cuts[i]]]
        if i == asked:
            pos = sum(len(p) for p in pieces)
        pieces += [np.asarray(needles[i], dtype=np.int64)]
        last = int(cuts[i])
    prompt = np.concatenate([*pieces, filler[last:], np.asarray(question, dtype=np.int64)]).astype(np.int64)
    return PasskeyExample(prompt, np.asarray(answer, dtype=np.int64), keys[asked],
                          float(cuts[asked]) / max(1, n_filler), pos)

"""Tokenizers: the HF base's own, or a byte-level BPE trained for the embedded base."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megacontext.errors import DataError, MegaContextError

BOS_EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenisation) with ``<|endoftext|>`` and ``<|pad|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        model_max_length=1 << 30,  # documents are long; lengths are the caller's business
    )


def load_hf_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a HF hub id or local directory; a DataError when it cannot load."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - hub/network/cache failures have many types
        raise DataError(
            f"cannot load the tokenizer of base {name!r}: it needs network access, the "
            f"Hugging Face cache, or a local directory saved with save_pretrained "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    tok.model_max_length = max(tok.model_max_length or 0, 1 << 30)
    return tok


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full definition (fast: its JSON; slow: vocab + specials)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps([sorted(tok.get_vocab().items()), tok.all_special_tokens])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_batch(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the fast backend when there is one)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


# ------------------------------------------------------------------- streaming decode
def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (MegaContextError for anything else)."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise MegaContextError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stops)


def decode_pieces(tokenizer: PreTrainedTokenizerBase, tokens: Iterator[int], stops: tuple[str, ...] = ()) -> Iterator[str]:
    """Decoded text of ``tokens``, piece by piece, cut before the first stop string.

    Incremental decoding with two offsets (as text-generation-inference does): a piece is
    released once the tokens decode to whole characters, so the pieces concatenate to the
    decoding of all tokens. Text that could be the start of a stop string is held back
    until it is known not to be one.
    """
    ids: list[int] = []
    prefix = read = 0
    pending = ""
    for tok in tokens:
        ids.append(tok)
        before, text = tokenizer.decode(ids[prefix:read]), tokenizer.decode(ids[prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            continue  # an incomplete character: wait for the next token
        pending += text[len(before) :]
        prefix, read = read, len(ids)
        cut = _first_stop(pending, stops)
        if cut is not None:
            if cut:
                yield pending[:cut]
            return  # the token iterator is dropped: nothing more is generated
        ready = len(pending) - _stop_prefix(pending, stops)
        if ready > 0:
            yield pending[:ready]
            pending = pending[ready:]
    pending += tokenizer.decode(ids[prefix:])[len(tokenizer.decode(ids[prefix:read])) :]
    cut = _first_stop(pending, stops)
    if cut is not None:
        pending = pending[:cut]
    if pending:
        yield pending


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in ``text`` (None: none does)."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)

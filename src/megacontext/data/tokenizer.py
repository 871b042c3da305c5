"""Tokenizers: the HF base's own, or a byte-level BPE trained for the embedded base."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megacontext.errors import DataError

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

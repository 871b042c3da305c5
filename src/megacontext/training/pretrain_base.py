"""`pretrain_base`: the embedded tiny Llama, trained on the prepared corpus (cached by content).

Recipe: ``LlamaForCausalLM`` (RoPE, tied embeddings, sizes from ``cfg.embedded``) trained
on packed sequences of ``cfg.embedded.context`` tokens cut at random offsets from the train
split (whole documents, shuffled, each followed by EOS); a ``passkey_fraction`` share of the
sequences are synthetic passkey documents so the base learns to copy a key from far back in
its context. AdamW, linear warmup, cosine decay to 10%, gradient clipping, seeded.

The induction drill. A tiny model on a few million tokens of text does not grow induction
heads (attend to the token after an earlier occurrence of the current one, copy it); without
them it barely gains from context and cannot copy a passkey. So training starts with a warm-up
on rows of random tokens repeated with a random period per row (:func:`repeat_batch`), until
the loss on the repeats falls below ``induction_target`` -- the circuit forms abruptly after
about 1,500 steps of 8 x 256 tokens -- and every later step adds ``copy_rows`` such rows to
the corpus batch so the circuit is kept while the model learns the language. The period must
vary: with a fixed one the model learns a positional offset instead, which does not transfer.

Output (``embedded_base_dir(cfg)``, written to a temporary folder and renamed at the end)::

    config.json  model.safetensors  generation_config.json   save_pretrained
    tokenizer.json  tokenizer_config.json ...                the dataset's BPE
    pretrain_summary.json                                    metrics (written last)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from megacontext.base_model import COMPLETE_MARKER, embedded_base_dir, resolve_device
from megacontext.config import Config, EmbeddedBaseConfig, derive_seed, seed_everything
from megacontext.data import make_passkey, prepare_dataset
from megacontext.errors import ConfigError, DataError

EARLY_POSITIONS = 64  # the report's "early" window is [0, min(64, context/8))
PASSKEY_PROMPT_MARGIN = 16  # in-window passkey prompts leave room for the answer
PASSKEY_MIN_PROMPT = 48  # shortest training passkey prompt (needle + question take ~20 tokens)
MIN_LR_FRACTION = 0.1
EVAL_BATCH = 4
MIN_PERIOD = 8  # shortest period of an induction-drill row
INDUCTION_WINDOW = 20  # the warm-up stops on the mean repeat loss of this many steps
ANSWER_WEIGHT = 1.0  # extra weight of the passkey answer tokens' mean loss (see training_loss)


def _say(msg: str) -> None:
    print(f"[pretrain-base] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ data
def token_stream(docs: list[np.ndarray], eos_id: int, seed: int) -> np.ndarray:
    """int64 [N]: the documents in a seeded random order, each followed by EOS."""
    order = np.random.default_rng(seed).permutation(len(docs))
    eos = np.array([eos_id], dtype=np.int64)
    return np.concatenate([np.concatenate([docs[i].astype(np.int64), eos]) for i in order])


def _check_stream(stream: np.ndarray, length: int, split: str) -> None:
    if len(stream) < length:
        raise DataError(
            f"the {split} split has {len(stream):,} tokens, fewer than one sequence of {length:,}; "
            f"use more documents (data.max_documents) or a shorter embedded.context"
        )


def passkey_sequence(
    rng: np.random.Generator,
    tokenizer: PreTrainedTokenizerBase,
    filler_docs: list[np.ndarray],
    stream: np.ndarray,
    length: int,
    run_keys: float = 0.0,
) -> tuple[np.ndarray, slice]:
    """int64 [length]: a passkey prompt, its answer, then EOS and natural text from the stream;
    plus the slice of the answer tokens.

    The prompt length is log-uniform in [PASSKEY_MIN_PROMPT, length - PASSKEY_PROMPT_MARGIN]
    and the needle depth uniform: short prompts let the copy mechanism emerge early (attention
    over a few dozen tokens gets a strong gradient), long ones stretch it over the context.
    """
    longest = length - PASSKEY_PROMPT_MARGIN
    shortest = min(PASSKEY_MIN_PROMPT, longest)
    n = int(round(math.exp(rng.uniform(math.log(shortest), math.log(longest)))))
    ex = make_passkey(rng, tokenizer, filler_docs, n, float(rng.uniform()), run_keys=run_keys)
    rest = length - len(ex.prompt) - len(ex.answer)
    start = int(rng.integers(0, len(stream) - rest + 1))
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    seq = np.concatenate([ex.prompt, ex.answer, eos, stream[start : start + rest - 1]])
    return seq, slice(len(ex.prompt), len(ex.prompt) + len(ex.answer))


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [B, L]
    answer_targets: torch.Tensor  # bool [B, L-1]: targets that are passkey answer tokens
    passkeys: int  # rows that are passkey sequences


def training_batch(
    rng: np.random.Generator,
    stream: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    filler_docs: list[np.ndarray],
    batch_size: int,
    length: int,
    passkey_fraction: float,
    run_keys: float = 0.0,
) -> Batch:
    """Random windows of the stream, each replaced with probability ``passkey_fraction``
    by a passkey sequence (:func:`passkey_sequence`, ``run_keys`` of them with a digit run)."""
    rows, answers = [], np.zeros((batch_size, length - 1), dtype=bool)
    for i in range(batch_size):
        if rng.random() < passkey_fraction:
            seq, span = passkey_sequence(rng, tokenizer, filler_docs, stream, length, run_keys)
            rows.append(seq)
            answers[i, span.start - 1 : span.stop - 1] = True  # target j is token j + 1
        else:
            start = int(rng.integers(0, len(stream) - length + 1))
            rows.append(stream[start : start + length])
    tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
    return Batch(tokens, torch.from_numpy(answers), int(answers.any(axis=1).sum()))


def drill_vocabulary(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """int64 [V']: the token ids the induction drill draws from (every id but the specials)."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)


def repeat_batch(rng: np.random.Generator, vocab: np.ndarray, rows: int, length: int) -> Batch:
    """``rows`` sequences of ``length`` tokens, each a random token block repeated end to end.

    The period is uniform in [MIN_PERIOD, length // 2] per row, so the repeats are predictable
    only by matching content (an induction head), not by a fixed positional offset.
    ``answer_targets`` [rows, length - 1] marks the predictable targets: those whose input
    token occurred before (input position >= period).
    """
    tokens = np.empty((rows, length), dtype=np.int64)
    repeats = np.zeros((rows, length - 1), dtype=bool)
    for i in range(rows):
        period = int(rng.integers(MIN_PERIOD, length // 2 + 1))
        block = vocab[rng.integers(0, len(vocab), period)]
        tokens[i] = np.resize(block, length)
        repeats[i, period:] = True  # target j is token j + 1; token j recurs from j = period
    return Batch(torch.from_numpy(tokens), torch.from_numpy(repeats), 0)


def eval_sequences(stream: np.ndarray, n: int, length: int) -> torch.Tensor:
    """LongTensor [n, length]: windows at evenly spaced offsets of the stream."""
    starts = np.linspace(0, len(stream) - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + length] for s in starts]))


# ----------------------------------------------------------------------------- model
def build_model(emb: EmbeddedBaseConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=emb.hidden_size,
        intermediate_size=emb.intermediate_size,
        num_hidden_layers=emb.layers,
        num_attention_heads=emb.heads,
        num_key_value_heads=emb.heads,
        max_position_embeddings=emb.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def lr_at(step: int, emb: EmbeddedBaseConfig) -> float:
    """Linear warmup to ``emb.lr``, then cosine decay to ``MIN_LR_FRACTION * emb.lr``."""
    if step < emb.warmup_steps:
        return emb.lr * (step + 1) / emb.warmup_steps
    t = (step - emb.warmup_steps) / max(1, emb.steps - emb.warmup_steps)
    return emb.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, emb: EmbeddedBaseConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=emb.lr, betas=(0.9, 0.95))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 mixed precision where the hardware has native bf16 matmuls, else None (fp32).

    On CPU that is AVX512-BF16/AMX (about 1.4-3x faster here); weights stay fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return None
        return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else None
    return None


def mixed_precision(device: torch.device, amp: torch.dtype | None) -> torch.autocast:
    """The autocast context for ``amp`` (from :func:`autocast_dtype`); a no-op when None."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def lm_loss(model: LlamaForCausalLM, seq: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``seq`` [B, T+1]: mean, or per position [B, T]."""
    seq = seq.to(model.device)
    logits = model(input_ids=seq[:, :-1], use_cache=False).logits
    loss = F.cross_entropy(logits.float().transpose(1, 2), seq[:, 1:], reduction="none")
    return loss.mean() if reduction == "mean" else loss


def training_loss(per_token: torch.Tensor, answer_targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(objective, plain LM loss): mean next-token loss over ``per_token`` [B, T], plus
    ``ANSWER_WEIGHT`` x the mean loss on passkey answer targets (bool [B, T]) when any.

    The answer tokens are a few per thousand; without the extra term the copy skill gets
    too little of the gradient to emerge within a short CPU pretraining.
    """
    lm = per_token.mean()
    if not answer_targets.any():
        return lm, lm.item()
    return lm + ANSWER_WEIGHT * per_token[answer_targets].mean(), lm.item()


def repeat_loss(model: LlamaForCausalLM, batch: Batch, amp: torch.dtype | None) -> torch.Tensor:
    """Mean next-token loss on the repeated targets of an induction-drill ``batch``."""
    with mixed_precision(model.device, amp):
        per_token = lm_loss(model, batch.tokens, "none")
    return per_token[batch.answer_targets.to(model.device)].mean()


def tenth_mean(values: list[float], last: bool = True) -> float | None:
    """Mean of the last (or first) tenth of ``values``, at least one value; None when empty."""
    if not values:
        return None
    n = max(1, len(values) // 10)
    return float(np.mean(values[-n:] if last else values[:n]))


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def induction_warmup(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    vocab: np.ndarray,
    amp: torch.dtype | None,
    progress: bool,
) -> list[float]:
    """Drill-only steps until the repeat loss (mean of the last ``INDUCTION_WINDOW`` steps) is
    below ``embedded.induction_target`` or ``embedded.induction_steps`` have run; the losses.

    The warm-up rows are half as long as the corpus stage's drill rows (twice as many, same
    tokens per step): periods up to ``copy_length / 4``. With 512-token rows (periods up to
    256) the circuit did not form within 3,000 steps; with 256-token rows it forms after
    about 1,500, and then stretches to the longer periods in the corpus stage.

    The learning rate warms up linearly over ``embedded.warmup_steps`` and then stays at
    ``embedded.lr`` (the corpus stage runs its own schedule afterwards).
    """
    emb = cfg.embedded
    losses: list[float] = []
    model.train()
    bar = tqdm(range(emb.induction_steps), desc="induction warm-up", unit="step", disable=not progress)
    for step in bar:
        rng = np.random.default_rng(derive_seed(cfg.seed, "pretrain-induction", step))
        for group in optimizer.param_groups:
            group["lr"] = emb.lr * min(1.0, (step + 1) / emb.warmup_steps)
        batch = repeat_batch(rng, vocab, 2 * emb.copy_rows, emb.copy_length // 2 + 1)
        loss = repeat_loss(model, batch, amp)
        optimizer_step(model, optimizer, loss)
        losses.append(loss.item())
        recent = float(np.mean(losses[-INDUCTION_WINDOW:]))
        bar.set_postfix(repeat_loss=f"{recent:.3f}")
        if len(losses) >= INDUCTION_WINDOW and recent < emb.induction_target:
            break
    bar.close()
    return losses


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def position_losses(model: torch.nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """Mean loss at each context position over ``seqs`` [N, T+1] -> [T]."""
    model.eval()
    per_pos = [lm_loss(model, seqs[i : i + EVAL_BATCH], "none").sum(0) for i in range(0, len(seqs), EVAL_BATCH)]
    return torch.stack(per_pos).sum(0) / len(seqs)


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decode ``steps`` tokens after equal-length ``prompts`` [N, T] -> [N, steps]."""
    model.eval()
    out = model(input_ids=prompts.to(model.device), use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1][:, None], cache=out.cache, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    filler_docs: list[np.ndarray],
    prompt_tokens: int,
    depths: list[float],
    trials: int,
    seed: int,
) -> dict[str, float]:
    """In-window passkey exact match by greedy decoding: overall and per depth.

    ``trials`` prompts of ``prompt_tokens`` tokens, spread evenly over ``depths``.
    """
    rng = np.random.default_rng(seed)
    hits: dict[float, list[bool]] = {d: [] for d in depths}
    per_depth = [trials // len(depths) + (i < trials % len(depths)) for i in range(len(depths))]
    for depth, n in zip(depths, per_depth):
        if n == 0:
            continue
        examples = [make_passkey(rng, tokenizer, filler_docs, prompt_tokens, depth) for _ in range(n)]
        steps = max(len(e.answer) for e in examples)
        for i in range(0, n, EVAL_BATCH * 2):
            chunk = examples[i : i + EVAL_BATCH * 2]
            out = greedy_continuation(model, torch.from_numpy(np.stack([e.prompt for e in chunk])), steps)
            for e, gen in zip(chunk, out):
                hits[depth].append(gen[: len(e.answer)].tolist() == e.answer.tolist())
    result = {f"depth_{d:g}": float(np.mean(h)) for d, h in hits.items() if h}
    result["overall"] = float(np.mean([x for h in hits.values() for x in h]))
    return result


def evaluate(
    model: torch.nn.Module,
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    val_stream: np.ndarray,
    val_docs: list[np.ndarray],
) -> dict:
    """Validation loss (overall, early vs late positions) and in-window passkey accuracy."""
    emb = cfg.embedded
    ctx = emb.context
    losses = position_losses(model, eval_sequences(val_stream, emb.eval_sequences, ctx + 1))
    early = (0, min(EARLY_POSITIONS, ctx // 8))
    late = (ctx // 2, ctx)
    passkey = passkey_accuracy(
        model,
        tokenizer,
        val_docs,
        ctx - PASSKEY_PROMPT_MARGIN,
        list(cfg.eval.passkey_depths),
        emb.passkey_trials,
        derive_seed(cfg.seed, "pretrain-passkey-eval"),
    )
    return {
        "val_loss": float(losses.mean()),
        "val_loss_early": float(losses[early[0] : early[1]].mean()),
        "val_loss_late": float(losses[late[0] : late[1]].mean()),
        "early_positions": list(early),
        "late_positions": list(late),
        "passkey_accuracy": passkey["overall"],
        "passkey_by_depth": {k: v for k, v in passkey.items() if k != "overall"},
        "passkey_trials": emb.passkey_trials,
        "passkey_prompt_tokens": ctx - PASSKEY_PROMPT_MARGIN,
    }


# ------------------------------------------------------------------------- caching
def read_summary(out_dir: Path) -> dict | None:
    """The summary of a complete base directory, or None."""
    try:
        summary = json.loads((out_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()
    return summary if complete and isinstance(summary, dict) else None


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing an old one only at the very end."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------ training
def pretrain_base(cfg: Config, progress: bool = True, force: bool = False) -> dict:
    """Pretrain (or reuse) the embedded base for ``cfg``; returns its summary.

    The summary's ``status`` is "trained" or "reused" (a complete directory for the same
    content hash already existed; ``force`` retrains anyway).
    """
    if cfg.base.name != "embedded":
        raise ConfigError(
            f"base.name is {cfg.base.name!r}: pretrain-base only trains the embedded base "
            f"(use --set base.name=embedded)",
            key="base.name",
            where=cfg.source_file,
        )
    out_dir = embedded_base_dir(cfg)
    summary = None if force else read_summary(out_dir)
    if summary is not None:
        _say(f"reused {out_dir}")
        return {**summary, "status": "reused", "output_dir": str(out_dir)}

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # every core while pretraining; restored after
    try:
        return _train_and_save(cfg, out_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _train_and_save(cfg: Config, out_dir: Path, progress: bool) -> dict:
    """Train the embedded base for ``cfg``, evaluate it and publish it at ``out_dir``."""
    t_start = time.perf_counter()
    emb = cfg.embedded
    ds = prepare_dataset(cfg, progress=progress)
    tokenizer = ds.tokenizer()
    eos = tokenizer.eos_token_id
    train_docs, val_docs = ds.documents("train"), ds.documents("val")
    train_stream = token_stream(train_docs, eos, derive_seed(cfg.seed, "pretrain-stream"))
    val_stream = token_stream(val_docs, eos, derive_seed(cfg.seed, "pretrain-val-stream"))
    _check_stream(train_stream, emb.context + 1, "train")
    _check_stream(val_stream, emb.context + 1, "val")

    seed_everything(cfg.seed)
    device = resolve_device(cfg.base.device)
    amp = autocast_dtype(device)
    model = build_model(emb, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, emb)
    _say(
        f"training {n_params / 1e6:.2f}M parameters on {len(train_stream):,} tokens of {ds.name}: "
        f"{emb.steps} steps x {emb.batch_size} x {emb.context} tokens on {device}"
        f"{' (bf16 autocast)' if amp else ''}"
    )

    vocab = drill_vocabulary(tokenizer)
    t_train = time.perf_counter()
    drill = induction_warmup(model, optimizer, cfg, vocab, amp, progress) if emb.induction_steps else []
    drill_loss = float(np.mean(drill[-INDUCTION_WINDOW:])) if drill else None
    if drill:
        _say(f"induction warm-up: {len(drill)} steps, repeat loss {drill_loss:.3f}")

    losses: list[float] = []
    copy_losses: list[float] = []
    tokens_seen, passkey_rows = 0, 0
    t_corpus = time.perf_counter()
    bar = tqdm(range(emb.steps), desc="pretrain-base", unit="step", disable=not progress)
    for step in bar:
        rng = np.random.default_rng(derive_seed(cfg.seed, "pretrain-batch", step))
        batch = training_batch(
            rng, train_stream, tokenizer, train_docs, emb.batch_size, emb.context + 1,
            emb.passkey_fraction, emb.passkey_run_keys,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, emb)
        model.train()
        with mixed_precision(device, amp):
            per_token = lm_loss(model, batch.tokens, "none")
        loss, lm = training_loss(per_token, batch.answer_targets.to(device))
        if emb.copy_rows:
            copy = repeat_loss(model, repeat_batch(rng, vocab, emb.copy_rows, emb.copy_length + 1), amp)
            loss = loss + copy
            copy_losses.append(copy.item())
        optimizer_step(model, optimizer, loss)
        losses.append(lm)
        tokens_seen += batch.tokens.shape[0] * emb.context
        passkey_rows += batch.passkeys
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_seen / (time.perf_counter() - t_corpus):,.0f}")
    bar.close()
    corpus_s = time.perf_counter() - t_corpus
    train_s = time.perf_counter() - t_train

    _say("evaluating on the val split")
    metrics = evaluate(model, cfg, tokenizer, val_stream, val_docs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = {
        "status": "trained",
        "output_dir": str(out_dir),
        "dataset": ds.name,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "steps": emb.steps,
        "tokens_seen": tokens_seen,
        "passkey_sequences": passkey_rows,
        "train_seconds": round(train_s, 1),
        "train_tokens_per_s": round(tokens_seen / corpus_s, 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "train_loss_first": tenth_mean(losses, last=False),
        "train_loss_last": tenth_mean(losses),
        "train_losses": [round(x, 4) for x in losses],
        "induction_warmup_steps": len(drill),
        "induction_warmup_loss": drill_loss,
        "copy_loss_last": tenth_mean(copy_losses),
        **metrics,
        "seed": cfg.seed,
        "embedded": cfg.to_dict()["embedded"],
        "device": str(device),
        "autocast": str(amp).removeprefix("torch.") if amp else "none",
        "threads": torch.get_num_threads(),
    }
    (tmp / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _publish(tmp, out_dir)
    _say(f"saved {out_dir}")
    return summary

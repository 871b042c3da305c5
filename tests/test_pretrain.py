"""pretrain-base on the smoke config: it learns, saves a loadable HF model, reuses, reports."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megacontext.base_model import COMPLETE_MARKER, embedded_base_dir
from megacontext.cli import main
from megacontext.data.passkey import NEEDLE, QUESTIONS
from megacontext.errors import ConfigError
from megacontext.training.pretrain_base import (
    INDUCTION_WINDOW,
    build_model,
    drill_vocabulary,
    greedy_continuation,
    induction_warmup,
    lr_at,
    make_optimizer,
    pretrain_base,
    repeat_batch,
    token_stream,
    training_batch,
)

from conftest import smoke_config


@pytest.fixture(scope="module")
def summary(smoke_cfg, smoke_base) -> dict:
    """The smoke base's summary as written next to its weights."""
    return json.loads((embedded_base_dir(smoke_cfg) / COMPLETE_MARKER).read_text())


def test_training_loss_falls(summary, smoke_cfg):
    losses = summary["train_losses"]
    assert len(losses) == summary["steps"] == smoke_cfg.embedded.steps
    assert summary["train_loss_last"] < summary["train_loss_first"] - 0.5
    assert np.log(summary["vocab_size"]) - 0.5 > summary["val_loss"], "no better than a uniform guess"


def test_summary_reports_the_metrics(summary, smoke_cfg):
    ctx = smoke_cfg.embedded.context
    assert summary["tokens_seen"] == smoke_cfg.embedded.steps * smoke_cfg.embedded.batch_size * ctx
    assert summary["late_positions"] == [ctx // 2, ctx] and summary["early_positions"][0] == 0
    for key in ("val_loss", "val_loss_early", "val_loss_late", "train_tokens_per_s", "wall_seconds"):
        assert np.isfinite(summary[key]) and summary[key] > 0, key
    assert 0.0 <= summary["passkey_accuracy"] <= 1.0
    assert set(summary["passkey_by_depth"]) == {f"depth_{d:g}" for d in smoke_cfg.eval.passkey_depths}
    assert summary["passkey_prompt_tokens"] < ctx
    assert 1 <= summary["induction_warmup_steps"] <= smoke_cfg.embedded.induction_steps
    assert np.isfinite(summary["induction_warmup_loss"]) and np.isfinite(summary["copy_loss_last"])


def test_output_is_a_plain_hf_model(smoke_cfg, smoke_base):
    out = embedded_base_dir(smoke_cfg)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.config.hidden_size == smoke_cfg.embedded.hidden_size == smoke_base.dim
    assert model.config.vocab_size == len(tok) == len(smoke_base.tokenizer)
    ids = torch.tensor([tok.encode("def main():\n    return 0\n")])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = smoke_base.forward(smoke_base.embed(ids), torch.arange(ids.shape[1])[None]).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert smoke_base.name == out.name and smoke_base.max_context == smoke_cfg.base.max_context


def test_second_call_reuses_the_base(smoke_cfg, smoke_base):
    weights = embedded_base_dir(smoke_cfg) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = pretrain_base(smoke_cfg, progress=False)
    assert time.perf_counter() - t0 < 2.0
    assert again["status"] == "reused" and again["output_dir"] == str(embedded_base_dir(smoke_cfg))
    assert weights.stat().st_mtime_ns == mtime


def test_seeded_retrain_is_identical_and_replaces_an_incomplete_dir(smoke_roots, smoke_base, tmp_path):
    """Same config elsewhere -> bit-identical weights; a leftover without summary is not reused."""
    cfg = smoke_config({**smoke_roots, "artifact_root": str(tmp_path)}, "embedded.steps=3", "embedded.passkey_trials=2")
    out = embedded_base_dir(cfg)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # a crashed, incomplete run
    first = pretrain_base(cfg, progress=False)
    assert first["status"] == "trained" and (out / COMPLETE_MARKER).is_file()
    w1 = (out / "model.safetensors").read_bytes()
    second = pretrain_base(cfg, progress=False, force=True)
    assert second["status"] == "trained"
    assert (out / "model.safetensors").read_bytes() == w1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_pretrain_refuses_a_hub_base(smoke_roots):
    cfg = smoke_config(smoke_roots, "base.name=someone/some-model")
    with pytest.raises(ConfigError, match="base.name"):
        pretrain_base(cfg, progress=False)


def test_cli_prints_the_report(smoke_roots, smoke_base, capsys):
    sets = [f"paths.{k}={v}" for k, v in smoke_roots.items()]
    argv = ["pretrain-base", "--config", "smoke"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in ("reused", "parameters", "val loss", "passkey", "tokens/s", "[256,512)", "induction"):
        assert word in out, word


def test_token_stream_keeps_whole_documents_with_eos():
    docs = [np.array([5, 6, 7], np.uint32), np.array([8], np.uint32), np.array([9, 10], np.uint32)]
    s = token_stream(docs, eos_id=0, seed=3)
    assert s.dtype == np.int64 and len(s) == 3 + 1 + 2 + 3
    pieces = [tuple(p) for p in np.split(s, np.flatnonzero(s == 0) + 1) if len(p)]
    assert sorted(pieces) == sorted(tuple(d.tolist()) + (0,) for d in docs)
    assert np.array_equal(s, token_stream(docs, eos_id=0, seed=3))


def test_training_batch_mixes_passkeys_deterministically(smoke_data):
    tok, docs = smoke_data.tokenizer(), smoke_data.documents("train")
    stream = token_stream(docs, tok.eos_token_id, 0)

    def batch(frac: float, seed: int = 0):
        return training_batch(np.random.default_rng(seed), stream, tok, docs, 16, 129, frac)

    plain = batch(0.0)
    assert plain.passkeys == 0 and plain.tokens.shape == (16, 129) and not plain.answer_targets.any()
    assert torch.equal(plain.tokens, batch(0.0).tokens)
    mixed = batch(0.5, seed=1)
    assert 0 < mixed.passkeys < 16 and mixed.answer_targets.shape == (16, 128)
    for row, answer in zip(mixed.tokens, mixed.answer_targets):
        text = tok.decode(row.tolist())
        if not answer.any():
            assert "what is the pass key?" not in text
            continue
        key = tok.decode(row[1:][answer].tolist())
        assert re.fullmatch(r" \d{5}\n", key), key
        assert NEEDLE.format(key=key.strip()) in text, "the answer is not the planted key"
        first = int(answer.nonzero()[0])
        assert tok.decode(row[: first + 1].tolist()).endswith(QUESTIONS)


def test_repeat_batch_rows_repeat_with_their_own_period():
    vocab = np.arange(3, 50)
    batch = repeat_batch(np.random.default_rng(0), vocab, 32, 129)
    tokens, marked = batch.tokens.numpy(), batch.answer_targets.numpy()
    assert tokens.shape == (32, 129) and marked.shape == (32, 128) and batch.passkeys == 0
    assert np.isin(tokens, vocab).all()
    periods = set()
    for row, mask in zip(tokens, marked):
        period = int(mask.argmax())  # first marked input position
        assert mask[period:].all() and not mask[:period].any()
        assert 8 <= period <= 64
        assert np.array_equal(row[period:], row[:-period]), "not periodic with the marked period"
        periods.add(period)
    assert len(periods) > 10, "periods must vary between rows (else a positional shortcut works)"
    assert torch.equal(batch.tokens, repeat_batch(np.random.default_rng(0), vocab, 32, 129).tokens)


def test_drill_vocabulary_leaves_out_special_tokens(smoke_data):
    tok = smoke_data.tokenizer()
    vocab = drill_vocabulary(tok)
    assert len(vocab) == len(tok) - len(set(tok.all_special_ids))
    assert not set(vocab.tolist()) & set(tok.all_special_ids)


@pytest.mark.parametrize(("target", "expect_steps"), [(100.0, INDUCTION_WINDOW), (1e-6, 30)])
def test_induction_warmup_stops_at_its_target_or_its_step_limit(smoke_roots, smoke_data, target, expect_steps):
    cfg = smoke_config(smoke_roots, "embedded.induction_steps=30", f"embedded.induction_target={target}")
    tok = smoke_data.tokenizer()
    torch.manual_seed(0)
    model = build_model(cfg.embedded, tok)
    before = model.model.embed_tokens.weight.detach().clone()
    losses = induction_warmup(model, make_optimizer(model, cfg.embedded), cfg, drill_vocabulary(tok), None, False)
    assert len(losses) == expect_steps and all(np.isfinite(losses))
    assert not torch.equal(before, model.model.embed_tokens.weight), "the warm-up did not train the model"


def test_lr_schedule_warms_up_then_decays(smoke_cfg):
    emb = smoke_cfg.embedded
    lrs = [lr_at(s, emb) for s in range(emb.steps)]
    peak = emb.warmup_steps - 1
    assert lrs[0] < lrs[peak] == pytest.approx(emb.lr)
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert lrs[-1] >= 0.1 * emb.lr and lrs[-1] < 0.2 * emb.lr


def test_greedy_continuation_matches_uncached_argmax(smoke_base):
    model = smoke_base.model
    prompts = torch.randint(2, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    got = greedy_continuation(model, prompts, 4)
    seq = prompts
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 20:])

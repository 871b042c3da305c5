"""Any Hugging Face causal LM (issue #14): tiny models of six architectures, saved locally with
``save_pretrained``, run ingest -> generate through the API and a short training smoke.

Rotary positions (Llama, Qwen2 with grouped KV heads, GPT-NeoX with partial rotary, Phi) and
learned absolute ones (GPT-2, with fused Conv1D attention; OPT, whose table starts at offset 2).
A model whose forward takes no ``inputs_embeds`` / ``position_ids`` is refused by class name.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from megacontext import MegaContext
from megacontext.base_model import BaseModel
from megacontext.checkpoint import save_checkpoint
from megacontext.config import load_config
from megacontext.data import WindowSampler
from megacontext.data.tokenizer import train_bpe
from megacontext.errors import MegaContextError
from megacontext.focus.likelihood import block_gains
from megacontext.modules import Modules, lora_targets
from megacontext.training.phases import PHASES, label_step, lens_examples, lens_step

CONTEXT = 512  # = configs/smoke.yaml base.max_context
TINY = {"num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": CONTEXT}
ARCHS = {  # name: (model class, config class, config arguments, attention projections LoRA must find)
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig,
              {**TINY, "hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2, "tie_word_embeddings": True},
              {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config,
              {**TINY, "hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 1, "tie_word_embeddings": True},
              {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, {**TINY, "hidden_size": 32, "intermediate_size": 64},
                 {"query_key_value", "dense"}),
    "phi": (tf.PhiForCausalLM, tf.PhiConfig, {**TINY, "hidden_size": 32, "intermediate_size": 64},
            {"q_proj", "k_proj", "v_proj", "dense"}),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config, {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_inner": 64, "n_positions": CONTEXT},
             {"c_attn", "c_proj"}),
    "opt": (tf.OPTForCausalLM, tf.OPTConfig,
            {**TINY, "hidden_size": 32, "ffn_dim": 64, "word_embed_proj_dim": 32},
            {"q_proj", "k_proj", "v_proj", "out_proj"}),
}
WORDS = ["def", "return", "x", "y", "(", ")", ":", "\n", "    ", "import", "for", "in", "range", "if", "else", "=", "+", "1"]


def _text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([_text(i, 400) for i in range(8)], vocab_size=300)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """arch -> a folder with a tiny random model of that architecture (built on first use)."""
    root, built = tmp_path_factory.mktemp("hf"), {}

    def get(arch: str) -> Path:
        if arch not in built:
            model_cls, config_cls, kwargs, _ = ARCHS[arch]
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
            torch.manual_seed(0)
            model = model_cls(config_cls(vocab_size=len(tokenizer), **ids, **kwargs))
            built[arch] = root / arch
            model.save_pretrained(built[arch])
            tokenizer.save_pretrained(built[arch])
        return built[arch]

    return get


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("roots")
    return [f"paths.data_root={root / 'data'}", f"paths.artifact_root={root / 'artifacts'}"]


def _cfg(roots: list[str], folder: Path, *sets: str):
    return load_config("smoke", [*roots, f"base.name={folder}", *sets], env={})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_ingest_then_generate_through_the_api(arch, model_dirs, roots, tmp_path):
    mc = MegaContext.load(_cfg(roots, model_dirs(arch)), checkpoint=None)
    base = mc.modules.base
    assert base.model_class == ARCHS[arch][0].__name__
    assert base.position_limit == (CONTEXT if arch in ("gpt2", "opt") else None)
    history = _text(1, 1000)
    with mc.session(tmp_path / "tree") as s:
        s.append(history)
        n = s.num_tokens
        assert n > 2 * mc.config.focus.budget
        text = s.generate("def f(x):", max_new_tokens=8)
        w = s.window()
        assert w.cost <= w.budget and w.covered_tokens == w.history_tokens == s.num_tokens
        assert w.entries_per_level["1"] + w.entries_per_level["2"] > 0
        rt = s.runtime  # the KV-cached decode step equals a fresh forward over the window
        for tok in mc.encode(" return y"):
            cached = rt.next_logits()
            window = rt.assemble()
            with torch.no_grad():
                fresh = base.forward(window.embeds[None], window.position_ids[None]).logits[0, -1]
            torch.testing.assert_close(cached, fresh.float(), atol=1e-4, rtol=1e-4)
            s.append([tok])
        K = rt.block_size  # the refocus reads the query against kept block-pair keys and values
        first, gains = rt.source.query_gains(K)
        ids = rt.tree.tokens(first * K, rt.num_tokens).astype(np.int64)
        assert rt.source._pairs.supported and rt.source._pairs.pairs == len(gains) - 1
        with torch.no_grad():
            np.testing.assert_allclose(gains, block_gains(base, ids, K, len(ids) // K * K), atol=2e-3)
    with mc.session(tmp_path / "tree") as s:  # reopened: the whole history, and it goes on
        assert s.num_tokens > n
        s.generate("y", max_new_tokens=2)
    with mc.session() as a, mc.session() as b:
        a.append(history)
        b.append(history)
        assert a.generate("def f(x):", 8) == "".join(b.generate("def f(x):", 8, stream=True)) == text


def _params(m: Modules) -> dict[tuple[str, str], torch.Tensor]:
    out = {("gistnet", n): p for n, p in m.gistnet.named_parameters()}
    out |= {("lensnet", n): p for n, p in m.lensnet.named_parameters()}
    out |= {("lora" if "lora_" in n else "base", n): p for n, p in m.base.model.named_parameters()}
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_smoke_and_checkpoint_reload(arch, model_dirs, roots, tmp_path):
    """One step of every phase: each changes only its module; the checkpoint (LoRA included) reloads."""
    cfg = _cfg(roots, model_dirs(arch))
    m = Modules.fresh(cfg, BaseModel.from_config(cfg), lora=True)
    names = lora_targets(BaseModel.from_config(cfg).model, cfg.train.lora)
    assert {t.rsplit(".", 1)[-1] for t in names[:-1]} == ARCHS[arch][3]  # the last is the input embedding
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, m.base.vocab_size, 1600) for _ in range(3)]
    t = cfg.train
    windows = WindowSampler(docs, t.horizon, t.history_min, t.history_max, "random", 3).batch(0, 2)
    for phase in PHASES:
        m.set_trainable(phase.owner)
        before = _params(m)
        opt = torch.optim.AdamW(m.parameters_of(phase.owner), lr=1e-2)
        if phase.step is None:
            snaps, rows = label_step(m, cfg, windows, np.random.default_rng(0), 1, 0, on_policy=phase.name == "jt2",
                                     gist_version="v")
            out = lens_step(m, cfg, lens_examples(m, cfg, snaps, rows))
        else:
            out = phase.step(m, cfg, windows, np.random.default_rng(0))
        assert torch.isfinite(out.loss), phase.name
        out.loss.backward()
        opt.step()
        m.set_trainable(None)
        after = _params(m)
        assert {k[0] for k in before if not torch.equal(before[k], after[k])} == {phase.owner}, phase.name

    path = save_checkpoint(tmp_path / "checkpoints", "c1-jt3", gistnet=m.gistnet, lensnet=m.lensnet, lora=m.lora,
                           state={}, config_text="")
    mc = MegaContext.load(cfg, checkpoint=path)
    assert mc.checkpoint == path and mc.modules.lora is not None
    trained = {n: p for n, p in m.base.model.named_parameters() if "lora_B" in n}
    loaded = {n: p for n, p in mc.modules.base.model.named_parameters() if "lora_B" in n}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[n], loaded[n]) for n in trained)
    with mc.session() as s:
        s.append(_text(2, 600))
        assert isinstance(s.generate("def", 4), str) and s.window().cost <= s.budget


def test_a_whole_training_run_on_gpt2(model_dirs, roots, tmp_path):
    """`train` end to end (prepare with the model's own tokenizer, every phase, validation,
    checkpoints) on the learned-position, Conv1D architecture; the run then serves a session."""
    from megacontext.training.loop import train

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": _text(10 + i, 1200)}) + "\n" for i in range(16)), encoding="utf-8")
    steps = [f"train.phases.{p}.steps=1" for p in ("warm_gist", "warm_lens", "jt1", "jt2", "jt3")]
    cfg = _cfg(roots, model_dirs("gpt2"), f"data.source=jsonl:{corpus}", "data.name=gpt2-tiny", "data.val_fraction=0.2",
               "data.test_fraction=0.0", "train.history_min=200", "train.history_max=300", "train.horizon=16",
               "train.cycles=1", *steps, "train.labels.candidates=4", "train.labels.snapshots=1", "train.focus_rounds=1",
               "train.validation.windows=1", "train.validation.task_windows=0", "train.cpu_threads=1")
    summary = train(cfg, out_dir=tmp_path / "run", progress=False)
    assert summary["phases_done"] == ["c0-warm_gist", "c0-warm_lens", "c1-jt1", "c1-jt2", "c1-jt3"]
    mc = MegaContext.load(cfg, checkpoint=tmp_path / "run")
    assert mc.checkpoint.name == "c1-jt3" and mc.modules.lora is not None
    with mc.session() as s:
        s.append(_text(3, 600))
        assert isinstance(s.generate("def", 4), str)


def test_learned_positions_are_bounded_with_clear_errors(model_dirs, roots):
    folder = model_dirs("gpt2")
    with pytest.raises(MegaContextError, match=f"base.max_context 1024 is more than the {CONTEXT} positions GPT2LMHeadModel"):
        BaseModel.load(folder, device="cpu", max_context=1024)
    mc = MegaContext.load(_cfg(roots, folder, "focus.position_mode=absolute"), checkpoint=None)
    refusal = "position_mode=absolute .* GPT2LMHeadModel has learned: use focus.position_mode=compact"
    with pytest.raises(MegaContextError, match=refusal):
        mc.session(budget=128)  # a budget given: checked at once
    with mc.session() as s:
        s.append(_text(4, 300))  # appending needs no window
        with pytest.raises(MegaContextError, match=refusal):
            s.generate("def", 2)
    base = mc.modules.base
    with pytest.raises(MegaContextError, match=f"position {CONTEXT} is past the {CONTEXT} positions GPT2LMHeadModel"):
        base.forward(torch.zeros(1, 2, base.dim), torch.tensor([[0, CONTEXT]]))


class NoEmbedsLM(torch.nn.Module):
    """A causal LM that only reads token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.embed(input_ids)


def test_a_model_without_inputs_embeds_or_positions_is_refused_by_class_name(tokenizer):
    with pytest.raises(MegaContextError, match="NoEmbedsLM cannot be a MegaContext base: its forward\\(\\) takes no "
                                               "inputs_embeds, position_ids"):
        BaseModel(NoEmbedsLM(), tokenizer, "no-embeds")
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(MegaContextError, match="BloomForCausalLM cannot be a MegaContext base: .* takes no position_ids"):
        BaseModel(bloom, tokenizer, "bloom")

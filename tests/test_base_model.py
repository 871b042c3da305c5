"""BaseModel: embeddings in / logits out, padding, freezing, loading errors (tiny local model)."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from megacontext.base_model import BaseModel, embedded_base_dir, resolve_device, resolve_dtype
from megacontext.config import load_config
from megacontext.errors import MegaContextError

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x = 0\n    y = 1\n", "for i in range(10): print(i)"]


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tiny_dir) -> BaseModel:
    return BaseModel.load(tiny_dir, dtype="float32", device="cpu")


def _ids(base: BaseModel, text: str) -> torch.Tensor:
    return torch.tensor(base.tokenizer.encode(text, add_special_tokens=False))


def test_load_attributes_and_frozen(base, tiny_dir):
    assert base.dim == 32
    assert base.max_context == 128  # from max_position_embeddings
    assert base.device.type == "cpu" and base.dtype == torch.float32
    assert base.name == str(tiny_dir)
    assert not base.model.training
    assert all(not p.requires_grad for p in base.model.parameters())
    assert BaseModel.load(tiny_dir, device="cpu", max_context=48).max_context == 48


def test_embed_shapes_match_embedding_table(base):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    e = base.embed(ids)
    assert e.shape == (2, 3, 32)
    assert torch.equal(e[1, 2], base.model.get_input_embeddings().weight[6])


def test_logits_from_embeds_equal_logits_from_ids(base):
    ids = _ids(base, TEXTS[0] + TEXTS[1])[None]
    T = ids.shape[1]
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
        out = base.forward(base.embed(ids), torch.arange(T)[None]).logits
    assert out.shape == (1, T, base.model.config.vocab_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_last_logits_are_the_tail_of_the_full_logits(base):
    ids = _ids(base, TEXTS[0])[None].repeat(2, 1)
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
        out = base.last_logits(ids, 5)
    assert out.shape == (2, 5, base.model.config.vocab_size)
    torch.testing.assert_close(out, ref[:, -5:], atol=1e-5, rtol=1e-5)


def test_forward_padded_equals_per_row_forward(base):
    torch.manual_seed(1)
    lengths = [5, 17, 11]
    embeds = [torch.randn(n, base.dim) for n in lengths]
    # absolute-mode style positions with gaps (gists at span centres) and a plain range
    positions = [torch.tensor([0, 16, 48, 64, 65]), torch.arange(3, 20), torch.arange(11)]
    with torch.no_grad():
        logits, mask = base.forward_padded(embeds, positions)
        assert logits.shape[:2] == mask.shape == (3, 17)
        assert torch.isfinite(logits[mask]).all()
        for i, (e, p) in enumerate(zip(embeds, positions)):
            n = len(p)
            assert mask[i].sum() == n and mask[i, -n:].all()
            single = base.forward(e[None], p[None]).logits[0]
            torch.testing.assert_close(logits[i, -n:], single, atol=1e-5, rtol=1e-5)


def test_position_gaps_do_not_split_attention(base):
    """Non-consecutive position_ids must still be one causal sequence (no packed-sequence mask)."""
    torch.manual_seed(2)
    e = torch.randn(6, base.dim)
    pos = torch.tensor([0, 32, 64, 96, 97, 98])
    with torch.no_grad():
        a = base.forward(e[None], pos[None]).logits[0, -1]
        e2 = e.clone()
        e2[0] += 1.0  # only the first entry changes
        b = base.forward(e2[None], pos[None]).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-4), "the last entry does not see the first one"


def test_kv_cache_continuation_matches_full_forward(base):
    ids = _ids(base, TEXTS[2])[None]
    T = ids.shape[1]
    emb = base.embed(ids)
    with torch.no_grad():
        full = base.forward(emb, torch.arange(T)[None]).logits
        first = base.forward(emb[:, :-3], torch.arange(T - 3)[None], use_cache=True)
        rest = base.forward(emb[:, -3:], torch.arange(T - 3, T)[None], past_key_values=first.cache)
    torch.testing.assert_close(rest.logits, full[:, -3:], atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_inputs_through_frozen_base(base):
    e = torch.randn(1, 4, base.dim, requires_grad=True)
    base.forward(e, torch.arange(4)[None]).logits.sum().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.model.parameters())


def test_embed_and_forward_follow_a_peft_replacement(tiny_dir):
    from peft import LoraConfig, get_peft_model

    b = BaseModel.load(tiny_dir, device="cpu")
    ids = torch.tensor([[3, 4, 5, 6]])
    before = b.forward(b.embed(ids), torch.arange(4)[None]).logits.detach()
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    b.model = get_peft_model(b.model, peft_cfg)
    after = b.forward(b.embed(ids), torch.arange(4)[None]).logits.detach()
    assert not torch.allclose(before, after, atol=1e-4), "adapters are not used by embed/forward"
    with b.model.disable_adapter():
        torch.testing.assert_close(b.forward(b.embed(ids), torch.arange(4)[None]).logits, before)


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(MegaContextError, match="no model at"):
        BaseModel.load(tmp_path / "nope")


def test_unknown_hub_id_offline_is_a_user_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MegaContextError, match="no-such-org/no-such-model.*network"):
        BaseModel.load("no-such-org/no-such-model")


def test_from_config_without_pretrained_embedded_base(tmp_path):
    cfg = load_config("smoke", [f"paths.artifact_root={tmp_path}", f"paths.data_root={tmp_path}"], env={})
    with pytest.raises(MegaContextError, match="pretrain-base"):
        BaseModel.from_config(cfg)


def test_embedded_dir_hash_covers_its_inputs(tmp_path):
    def d(*sets: str):
        return embedded_base_dir(load_config("smoke", [f"paths.artifact_root={tmp_path}", *sets], env={}))

    same = d()
    assert same == d() and same.parent == tmp_path.resolve() / "base" and same.name.startswith("embedded-")
    assert d("data.force_rebuild=true") == same
    for change in ("seed=8", "embedded.lr=0.001", "data.vocab_size=1024", "data.max_documents=81"):
        assert d(change) != same, change
    assert d("focus.budget=256") == same  # unrelated sections do not retrain the base


def test_device_and_dtype_resolution():
    dev = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else dev.type
    assert dev.type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(MegaContextError):
        resolve_dtype("float8", torch.device("cpu"))

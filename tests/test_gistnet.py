"""GistNet: shapes, scale, gradients, pooling sees every child, levels, history gists, versions, files."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from megacontext.config import GistNetConfig
from megacontext.errors import MegaContextError
from megacontext.gistnet import GistNet, TreeGister, gists_for_history
from megacontext.weights import load_module, module_version, save_module

D, K = 32, 8
POOLINGS = ["mean", "query", "cls"]
VARIANTS = list(itertools.product(POOLINGS, ["linear", "mlp"], [False, True]))


def make(seed: int = 0, dim: int = D, block_size: int = K, **kw) -> GistNet:
    torch.manual_seed(seed)
    return GistNet(GistNetConfig(**{"layers": 1, "heads": 2, **kw}), dim, block_size=block_size, levels=2)


def children(n: int, seed: int = 1, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, D, generator=g) * scale


def rms(x: torch.Tensor, dims) -> torch.Tensor:
    return x.square().mean(dims).sqrt()


@pytest.mark.parametrize("pooling,projection", list(itertools.product(POOLINGS, ["linear", "mlp"])))
def test_untrained_gist_is_scale_matched_mean_pool(pooling, projection):
    net = make(pooling=pooling, projection=projection)
    x = children(5)
    out = net(x, 1)
    assert out.shape == (5, D) and out.dtype == x.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(rms(out, -1), rms(x, (1, 2)), rtol=1e-4, atol=0)  # embedding-space scale
    cos = nn.functional.cosine_similarity(out, x.mean(1), dim=-1)
    assert (cos > 0.95).all() and (cos < 1 - 1e-6).all()  # near the mean, but the backbone contributes


@pytest.mark.parametrize("pooling,projection,per_level", VARIANTS)
def test_gradients_reach_every_parameter(pooling, projection, per_level):
    net = make(pooling=pooling, projection=projection, per_level=per_level)
    target = torch.randn(6, D)
    out = net(children(6), torch.tensor([1, 2, 1, 2, 1, 2]))
    (out * target).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooled_features_depend_on_every_child(pooling):
    """Spec §8: a CLS slot under a causal mask sees only itself -> constant gists."""
    net = make(pooling=pooling)
    x = children(3).requires_grad_(True)
    pooled = net.encode(x, 1)
    (pooled[0] * torch.randn(pooled.shape[1])).sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).all()  # every child of node 0 moves its pooled vector
    assert (x.grad[1:] == 0).all()  # and no other node's children do
    other = net.encode(children(3, seed=2), 1)
    spread = (pooled - pooled.mean(0)).abs().max()
    assert spread > 0.05 * pooled.abs().max()  # different children -> different vectors
    assert (pooled.detach() - other).abs().max() > 0.05 * pooled.abs().max()  # two batches differ


@pytest.mark.parametrize("pooling,per_level", list(itertools.product(POOLINGS, [False, True])))
def test_batched_equals_one_at_a_time(pooling, per_level):
    net = make(pooling=pooling, per_level=per_level).eval()
    x, lv = children(7), torch.tensor([1, 2, 2, 1, 1, 2, 1])
    batched = net(x, lv)
    single = torch.cat([net(x[i : i + 1], int(lv[i])) for i in range(7)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("per_level", [False, True])
def test_levels_give_different_gists(per_level):
    net = make(per_level=per_level)
    x = children(4)
    e1, e2 = net.encode(x, 1), net.encode(x, 2)
    assert (e1 - e2).abs().max() > 0.05 * e1.abs().max()
    assert not torch.allclose(net(x, 1), net(x, 2), rtol=1e-5, atol=1e-7)


def test_mean_kind_is_the_scale_matched_mean_with_only_gains():
    net = make(kind="mean")
    assert [n for n, _ in net.named_parameters()] == ["gain"]
    x = children(4)
    m = x.mean(1)
    expected = m * (rms(x, (1, 2)) / rms(m, -1))[:, None]
    torch.testing.assert_close(net(x, 2), expected)


def test_low_precision_children_keep_their_dtype():
    net = make()
    x = children(3)
    out = net(x.bfloat16(), 1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, net(x.bfloat16().float(), 1).bfloat16())  # computed in float32, rounded once


# --------------------------------------------------------------------- history gists
@pytest.mark.parametrize("T,n1,n2", [(1000, 31, 0), (2100, 65, 2), (31, 0, 0)])
def test_gists_for_history_counts_and_matches_direct_calls(T, n1, n2):
    net = make(dim=16, block_size=32).eval()
    tokens = torch.randn(T, 16)
    g1, g2 = gists_for_history(net, tokens, 32, 2)
    assert g1.shape == (n1, 16) and g2.shape == (n2, 16)
    if n1:
        torch.testing.assert_close(g1, net(tokens[: n1 * 32].reshape(n1, 32, 16), 1))
    if n2:
        torch.testing.assert_close(g2, net(g1[: n2 * 32].reshape(n2, 32, 16), 2))


def test_gists_for_history_never_uses_incomplete_nodes():
    net = make(dim=16, block_size=32).eval()
    tokens = torch.randn(2100, 16)
    g1, g2 = gists_for_history(net, tokens, 32, 2)
    changed = tokens.clone()
    changed[2080:] = torch.randn(20, 16)  # the unfinished block
    h1, h2 = gists_for_history(net, changed, 32, 2)
    assert torch.equal(g1, h1) and torch.equal(g2, h2)
    changed[2048:2080] = torch.randn(32, 16)  # LOD1 #64: complete, but its LOD2 parent is not
    h1, h2 = gists_for_history(net, changed, 32, 2)
    assert not torch.equal(g1[64], h1[64]) and torch.equal(g1[:64], h1[:64]) and torch.equal(g2, h2)


def test_gists_for_history_is_differentiable():
    net = make(dim=16, block_size=32)
    tokens = torch.randn(2048, 16, requires_grad=True)
    _, g2 = gists_for_history(net, tokens, 32, 2)
    (g2 * torch.randn_like(g2)).sum().backward()
    assert tokens.grad.abs().sum(-1).gt(0).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# --------------------------------------------------------------------- versions and files
def test_version_tracks_weights_and_config():
    net = make()
    v0 = module_version(net)
    assert v0 == module_version(make()) and len(v0) == 16
    assert v0 != module_version(make(seed=1))
    saved = net.cores[0].blocks[0].qkv.weight.detach().clone()
    with torch.no_grad():
        net.cores[0].blocks[0].qkv.weight[0, 0] += 1e-3
    assert module_version(net) != v0
    with torch.no_grad():
        net.cores[0].blocks[0].qkv.weight.copy_(saved)
    assert module_version(net) == v0


def test_save_load_round_trip(tmp_path):
    net = make(pooling="cls")
    path = tmp_path / "gistnet.safetensors"
    save_module(net, path)
    other = load_module(make(seed=5, pooling="cls"), path)
    assert module_version(other) == module_version(net)
    x = children(3)
    torch.testing.assert_close(other(x, 2), net(x, 2), atol=0, rtol=0)
    with pytest.raises(MegaContextError, match="expected"):
        load_module(make(pooling="query"), path)  # another architecture
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MegaContextError):
        load_module(make(pooling="cls"), path)
    with pytest.raises(MegaContextError):
        load_module(net, tmp_path / "missing.safetensors")


# --------------------------------------------------------------------- tree gister
def test_tree_gister_matches_gistnet_in_eval_chunks():
    net = make().train()
    emb = nn.Embedding(50, D)
    gister = TreeGister(net, emb, chunk=3)
    ids = torch.arange(7 * K) % 50
    tok = gister.embed_tokens(ids)
    assert tok.shape == (7 * K, D) and not tok.requires_grad and gister.dim == D
    with torch.no_grad():
        out = gister.gist(1, tok.reshape(7, K, D))
        expected = net.eval()(tok.reshape(7, K, D), 1)
    net.train()
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    gister.gist(2, tok.reshape(7, K, D))
    assert net.training  # the caller's mode is restored


def test_tree_gister_version_follows_gistnet_and_embedding():
    net, emb = make(), nn.Embedding(50, D)
    gister = TreeGister(net, emb)
    v0 = gister.version
    assert v0 == gister.version and v0 != module_version(net)
    with torch.no_grad():
        emb.weight[3, 0] += 0.5  # e.g. a LoRA adapter on the embeddings moved
    v1 = gister.version
    assert v1 != v0
    with torch.no_grad():
        torch._foreach_add_(list(net.parameters()), 1e-3)  # what a (foreach) optimiser step does in place
    v2 = gister.version
    assert v2 not in (v0, v1)
    net.load_state_dict(make().state_dict())  # back to the first weights (copy_ in place)
    assert gister.version == v1
    net.load_state_dict(make(seed=3).state_dict())
    v2 = gister.version
    assert v2 not in (v0, v1)
    assert TreeGister(net, nn.Embedding(50, D)).version != v2  # another embedding table
    table = torch.randn(50, D)
    by_fn = TreeGister(net, lambda ids: table[ids])
    f0 = by_fn.version
    table[0, 0] += 1.0
    assert by_fn.version != f0

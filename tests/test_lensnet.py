"""LensNet: score range and masking, non-causality, padding invariance, gradients, conditioning."""

from __future__ import annotations

import math

import pytest
import torch

from megacontext.config import LensNetConfig
from megacontext.lensnet import LensNet, build_conditioning, entry_features
from megacontext.weights import load_module, save_module

D, M = 24, 4  # entry width, LOD1 conditioning count -> C = 6
C = M + 2
KINDS = ["dual_cross", "transformer"]


def make(kind: str, seed: int = 0) -> LensNet:
    torch.manual_seed(seed)
    return LensNet(LensNetConfig(kind=kind, width=16, stacks=2, heads=2, lod1_conditioning=M), D, levels=2)


def inputs(B: int, W: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        embeds=torch.randn(B, W, D, generator=g),
        levels=torch.randint(0, 3, (B, W), generator=g),
        log_width=torch.rand(B, W, generator=g) * 7,
        log_distance=torch.rand(B, W, generator=g) * 10,
        mask=torch.ones(B, W, dtype=torch.bool),
        cond=torch.randn(B, C, D, generator=g),
        cond_mask=torch.ones(B, C, dtype=torch.bool),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_scores_shape_range_and_masked_zeros(kind):
    net = make(kind)
    with torch.no_grad():
        net.head.weight.mul_(1000)  # saturate: tanh must still bound the scores
    x = inputs(3, 12)
    x["mask"][1, 8:] = False
    s = net(**x)
    assert s.shape == (3, 12) and torch.isfinite(s).all()
    assert s.abs().max() <= 1 and s.abs().max() > 0.9
    assert (s[1, 8:] == 0).all() and (s[x["mask"]] != 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_scores_stay_below_allocator_thresholds(kind):
    s = make(kind)(**inputs(2, 64))
    assert 0 < s.abs().max() < 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_non_causal_early_entry_sees_the_tail(kind):
    """Spec §8: the score of entry 0 must depend on the newest entries and the tail summary."""
    net = make(kind)
    x = inputs(1, 20)
    base = net(**x)[0, 0]
    tail = dict(x, embeds=x["embeds"].clone())
    tail["embeds"][0, -4:] = torch.randn(4, D)
    assert (net(**tail)[0, 0] - base).abs() > 1e-5
    summary = dict(x, cond=x["cond"].clone())
    summary["cond"][0, -1] = torch.randn(D)  # only the raw-tail mean changed
    assert (net(**summary)[0, 0] - base).abs() > 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_padding_and_masked_conditioning_are_ignored(kind):
    net = make(kind).eval()
    a, b = inputs(1, 10, seed=1), inputs(1, 7, seed=2)
    b["cond_mask"][0, 2:4] = False
    alone_a, alone_b = net(**a)[0], net(**b)[0]
    batch = inputs(2, 10, seed=3)  # garbage everywhere, overwritten where real
    for key in batch:
        if key in ("cond", "cond_mask"):
            batch[key][0], batch[key][1] = a[key][0], b[key][0]
        else:
            batch[key][0] = a[key][0]
            batch[key][1, :7] = b[key][0]
    batch["mask"][1, 7:] = False
    batch["cond"][1, 2:4] = torch.randn(2, D) * 100  # masked slots: any content
    s = net(**batch)
    torch.testing.assert_close(s[0], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s[1, :7], alone_b, atol=1e-5, rtol=1e-4)
    assert (s[1, 7:] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    net = make(kind)
    x = inputs(2, 16)
    x["mask"][1, 10:] = False
    (net(**x) * torch.randn(2, 16)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_no_conditioning_and_no_entries_stay_finite(kind):
    net = make(kind)
    x = inputs(2, 5)
    x["cond_mask"][:] = False
    x["mask"][1] = False
    s = net(**x)
    assert torch.isfinite(s).all() and (s[1] == 0).all()
    (s.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_wrong_conditioning_count_is_rejected():
    x = inputs(1, 4)
    x["cond"], x["cond_mask"] = x["cond"][:, :3], x["cond_mask"][:, :3]
    with pytest.raises(ValueError, match="conditioning"):
        make("dual_cross")(**x)


def test_save_load_round_trip(tmp_path):
    net, other = make("dual_cross"), make("dual_cross", seed=7)
    save_module(net, tmp_path / "lens.safetensors")
    load_module(other, tmp_path / "lens.safetensors")
    x = inputs(1, 9)
    torch.testing.assert_close(other(**x), net(**x), atol=0, rtol=0)


# --------------------------------------------------------------------- conditioning + features
class TableSource:
    """EntrySource over fixed tables: tokens [T, d], gists[k-1] [T // K**k, d]."""

    def __init__(self, T: int, K: int, levels: int):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randn(T, D, generator=g)
        self.gists = [torch.randn(T // K**k, D, generator=g) for k in range(1, levels + 1)]

    def token_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        return self.tokens[positions]

    def gist_vectors(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        return self.gists[level - 1][indices]


def test_build_conditioning_full():
    src = TableSource(2100, 32, 2)
    cond, mask = build_conditioning(src, 2100, 2048, 32, 2, M, D)
    assert cond.shape == (C, D) and cond.dtype == torch.float32 and mask.tolist() == [True] * C
    assert torch.equal(cond[0], src.gists[1][1])  # latest complete LOD2
    assert torch.equal(cond[1 : 1 + M], src.gists[0][[64, 63, 62, 61]])  # newest LOD1 first
    torch.testing.assert_close(cond[-1], src.tokens[2048:2100].mean(0))


@pytest.mark.parametrize(
    "T,tail_start,levels,expected",
    [
        (100, 32, 2, [False, True, True, True, False, True]),  # 3 LOD1 gists, no LOD2
        (2100, 2048, 1, [False, True, True, True, True, True]),  # one level: no LOD2 slot
        (10, 0, 2, [False, False, False, False, False, True]),  # only a raw tail
        (0, 0, 2, [False] * C),  # nothing yet
    ],
)
def test_build_conditioning_masks(T, tail_start, levels, expected):
    src = TableSource(max(T, 1), 32, levels)
    cond, mask = build_conditioning(src, T, tail_start, 32, levels, M, D)
    assert cond.shape == (C, D) and mask.tolist() == expected
    assert (cond[~mask] == 0).all() and (cond[mask].abs().sum(-1) > 0).all()
    scores = make("dual_cross")(torch.randn(1, 3, D), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3),
                                torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), cond[None], mask[None])
    assert torch.isfinite(scores).all()


def test_entry_features():
    levels = torch.tensor([2, 1, 0, 0])
    starts = torch.tensor([0, 1024, 1056, 1057])
    ends = torch.tensor([1024, 1056, 1057, 1058])
    log_w, log_d = entry_features(levels, starts, ends, 1060, 32)
    torch.testing.assert_close(log_w, torch.tensor([1024.0, 32, 1, 1]).log1p())
    torch.testing.assert_close(log_d, torch.tensor([36.0, 4, 3, 2]).log1p())
    assert log_d[-1] == pytest.approx(math.log(3))
    with pytest.raises(ValueError):
        entry_features(levels, starts, ends + 1, 1060, 32)

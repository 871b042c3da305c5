"""Attention building blocks shared by GistNet and LensNet.

- :func:`masked_attention`: softmax attention ``q [N,h,Sq,hd]`` over ``k, v [N,h,Sk,hd]``
  with an optional key mask ``[N, Sk]`` -> ``[N,h,Sq,hd]`` (zero output for rows with no key).
- :func:`rope_tables` / :func:`apply_rope`: rotary position tables ``(cos, sin) [S, hd]``
  and their application to ``x [N,h,S,hd]`` (Llama half-split convention).
- :class:`MLP`: ``Linear -> GELU -> Linear``, ``[..., d_in] -> [..., d_out]``.
- :class:`TransformerBlock`: bidirectional pre-norm block, ``x [N, S, w] -> [N, S, w]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 10_000.0
EPS = 1e-6


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention ``q [N,h,Sq,hd]`` over ``k, v [N,h,Sk,hd]`` -> ``[N,h,Sq,hd]``.

    ``key_mask [N, Sk]`` bool, True = the key takes part. A row with no valid key gets a
    zero output (never NaN).
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    has_key = key_mask.any(-1)  # [N]
    allowed = key_mask | ~has_key[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])
    return out * has_key[:, None, None, None].to(out.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for float ``positions [S]`` -> ``(cos, sin)`` each ``[S, head_dim]``."""
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [N,h,S,hd]`` by ``cos, sin [S,hd]`` (Llama half-split convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class MLP(nn.Module):
    """``Linear -> GELU -> Linear``: ``[..., d_in] -> [..., d_out]``."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    """Bidirectional pre-norm block (no causal mask): ``x [N, S, w] -> [N, S, w]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(width, eps=EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.RMSNorm(width, eps=EPS)
        self.mlp = MLP(width, 4 * width, width)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rope``: ``(cos, sin) [S, hd]`` applied to q/k; ``key_mask [N, S]`` True = real."""
        N, S, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, S, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = masked_attention(q, k, v, key_mask).transpose(1, 2).reshape(N, S, w)
        x = x + self.attn_out(a)
        return x + self.mlp(self.norm2(x))

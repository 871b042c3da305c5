"""GistNet (spec §3.3): the K child vectors of one node -> one gist in the base's embedding space.

``GistNet(cfg, dim, block_size, levels)(children [N, K, d], level) -> [N, d]``::

    x      = in_proj(RMSNorm(children))          [N, K, w]   (+ level embedding, shared mode)
    x      = blocks(x)                           bidirectional pre-norm, local RoPE 0..K-1
    pooled = pool(RMSNorm(x))                    [N, w]      mean | learned query | CLS slot
    h      = mean(children) + r * proj(pooled)   [N, d]      r = RMS of the node's children
    gist   = gain[level] * r * h / RMS(h)        [N, d]      scale matched to the children

Levels above ``levels`` (a tree grows them when its history outgrows the budget) are
served by the top trained level's weights: its level embedding (shared mode), its core
(``per_level``) and its gain. A gist of gists is the same task at every level above LOD1,
and the scale matching keeps the new level at the RMS of its children.

The projection's last layer starts small, so an untrained GistNet is (almost) the
scale-matched mean-pooling baseline, and training only has to learn a correction. The
final rescale keeps every gist at the RMS of the vectors it replaces (token embeddings for
LOD1, LOD1 gists for LOD2): gists live in the base's input-embedding space.
``cfg.kind == "mean"`` is that baseline with no backbone: ``gain[level] * r * m / RMS(m)``
for ``m = mean(children)``; its only parameters are the per-level gains (so an optimiser
still has something to hold).

Also here: :func:`gists_for_history` (differentiable, for training) and :class:`TreeGister`
(what the tree calls). The attention pieces live in :mod:`megacontext.layers` (shared with
LensNet); weight files and version hashes in :mod:`megacontext.weights`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from megacontext.config import GistNetConfig
from megacontext.errors import ConfigError
from megacontext.layers import EPS, MLP, TransformerBlock, masked_attention, rope_tables
from megacontext.weights import hash_state, module_version, tensor_bytes

SCALE_EPS = 1e-12  # for RMS matching: far below any embedding scale (HF tables are ~1e-2)
GIST_CHUNK = 256  # nodes per TreeGister batch (bounds activation memory)
LEVEL_EMBED_STD = 0.5  # the stream is unit-RMS after the input norm; levels must be visible
PROJ_INIT_STD = 1e-3  # last projection layer: small, not zero (gradients must reach the backbone)


# ----------------------------------------------------------------------------- GistNet
def _small_init(layer: nn.Linear) -> nn.Linear:
    nn.init.normal_(layer.weight, std=PROJ_INIT_STD)
    nn.init.zeros_(layer.bias)
    return layer


class _QueryPool(nn.Module):
    """Learned-query multi-head attention over the K outputs: ``[N, K, w] -> [N, w]``.

    The query starts near zero, i.e. near-uniform attention (= mean pooling).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.kv = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K, w = x.shape
        k, v = self.kv(x).view(N, K, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q = self.query.view(1, self.heads, 1, w // self.heads).expand(N, -1, -1, -1)
        return masked_attention(q, k, v).reshape(N, w)


class _GistCore(nn.Module):
    """One backbone + pooling head + projection (shared by all levels, or one per level)."""

    def __init__(self, cfg: GistNetConfig, dim: int, width: int) -> None:
        super().__init__()
        self.pooling = cfg.pooling
        self.head_dim = width // cfg.heads
        self.in_norm = nn.RMSNorm(dim, eps=EPS)
        self.in_proj = nn.Linear(dim, width) if width != dim else nn.Identity()
        self.blocks = nn.ModuleList(TransformerBlock(width, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(width, eps=EPS)
        if cfg.pooling == "cls":
            self.cls = nn.Parameter(torch.randn(width) * 0.02)
        elif cfg.pooling == "query":
            self.pool = _QueryPool(width, cfg.heads)
        if cfg.projection == "linear":
            self.proj: nn.Module = _small_init(nn.Linear(width, dim))
        else:
            self.proj = MLP(width, 4 * width, dim)
            _small_init(self.proj.out)

    def encode(self, children: torch.Tensor, level_vec: torch.Tensor | None) -> torch.Tensor:
        """``children [N, K, d]``, ``level_vec [N, w]`` or None -> pooled features ``[N, w]``."""
        N, K, _ = children.shape
        x = self.in_proj(self.in_norm(children))
        if level_vec is not None:
            x = x + level_vec[:, None, :]
        cos, sin = rope_tables(torch.arange(K, device=x.device), self.head_dim)
        if self.pooling == "cls":
            # The CLS slot is unrotated (= position 0); attention is bidirectional, so it sees every child.
            x = torch.cat([self.cls.to(x.dtype).expand(N, 1, -1), x], dim=1)
            cos = torch.cat([torch.ones_like(cos[:1]), cos])
            sin = torch.cat([torch.zeros_like(sin[:1]), sin])
        for block in self.blocks:
            x = block(x, rope=(cos, sin))
        x = self.norm(x)
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "query":
            return self.pool(x)
        return x.mean(1)


class GistNet(nn.Module):
    """K children -> one gist. ``forward(children [N, K, d], level) -> [N, d]``.

    ``level``: an int >= 1 or a LongTensor ``[N]`` (one level per node); a level above
    ``levels`` is served as ``levels`` (see the module docstring).
    """

    def __init__(self, cfg: GistNetConfig, dim: int, block_size: int = 32, levels: int = 2) -> None:
        super().__init__()
        self.cfg, self.dim, self.block_size, self.levels = cfg, dim, block_size, levels
        self.width = cfg.hidden or dim
        if cfg.kind == "transformer" and (self.width % cfg.heads or (self.width // cfg.heads) % 2):
            raise ConfigError(
                f"gistnet width {self.width} must split into {cfg.heads} heads of even size", key="gistnet.heads"
            )
        self.gain = nn.Parameter(torch.ones(levels))  # per-level output scale (the "mean" kind's only weight)
        n_cores = 0 if cfg.kind == "mean" else levels if cfg.per_level else 1
        self.cores = nn.ModuleList(_GistCore(cfg, dim, self.width) for _ in range(n_cores))
        self.level_embed: nn.Embedding | None = None
        if n_cores == 1:
            self.level_embed = nn.Embedding(levels, self.width)
            nn.init.normal_(self.level_embed.weight, std=LEVEL_EMBED_STD)

    def _level_index(self, level: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        """0-based index of the trained level that serves each node: LongTensor ``[n]``."""
        if isinstance(level, torch.Tensor):
            if level.shape != (n,):
                raise ValueError(f"level tensor must have shape ({n},), got {tuple(level.shape)}")
            return level.to(device=device, dtype=torch.long).clamp(max=self.levels) - 1
        if level < 1:
            raise ValueError(f"level must be >= 1, got {level}")
        return torch.full((n,), min(level, self.levels) - 1, dtype=torch.long, device=device)

    def encode(self, children: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[N, w]`` (before the projection); needs a backbone."""
        if not self.cores:
            raise ValueError("the mean-pooling GistNet has no backbone to encode with")
        x = children.to(self.gain.dtype)
        lv = self._level_index(level, x.shape[0], x.device)
        if self.level_embed is not None:
            return self.cores[0].encode(x, self.level_embed(lv))
        if isinstance(level, int):
            return self.cores[min(level, self.levels) - 1].encode(x, None)
        out = x.new_zeros(x.shape[0], self.width)
        for lvl in lv.unique().tolist():
            idx = (lv == lvl).nonzero().squeeze(1)
            out = out.index_copy(0, idx, self.cores[lvl].encode(x[idx], None))
        return out

    def _correction(self, x: torch.Tensor, level: int | torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        """``proj(pooled)`` ``[N, d]`` in units of the children's RMS."""
        if len(self.cores) == 1:
            return self.cores[0].proj(self.encode(x, level))
        if isinstance(level, int):
            return self.cores[min(level, self.levels) - 1].proj(self.encode(x, level))
        out = x.new_zeros(x.shape[0], self.dim)
        for lvl in lv.unique().tolist():
            idx = (lv == lvl).nonzero().squeeze(1)
            out = out.index_copy(0, idx, self.cores[lvl].proj(self.cores[lvl].encode(x[idx], None)))
        return out

    def forward(self, children: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
        """``children [N, K, d]`` -> gists ``[N, d]`` (computed in the parameters' dtype,
        returned in the children's dtype)."""
        x = children.to(self.gain.dtype)
        lv = self._level_index(level, x.shape[0], x.device)
        rms = x.square().mean(dim=(1, 2)).add(SCALE_EPS).sqrt()[:, None]  # [N, 1]
        h = x.mean(1)
        if self.cores:
            h = h + rms * self._correction(x, level, lv)
        out = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + SCALE_EPS) * rms * self.gain[lv][:, None]
        return out.to(children.dtype)


def gists_for_history(gistnet: GistNet, token_embeds: torch.Tensor, block_size: int, levels: int) -> list[torch.Tensor]:
    """Every complete node's gist, differentiable: ``token_embeds [T, d]`` -> list over
    levels ``k = 1..levels`` of ``[T // K**k, d]``. One batched call per level; the
    unfinished block (and any incomplete parent) is never padded in."""
    K = block_size
    d = token_embeds.shape[-1]
    out: list[torch.Tensor] = []
    children = token_embeds
    for level in range(1, levels + 1):
        n = children.shape[0] // K
        g = gistnet(children[: n * K].reshape(n, K, d), level) if n else token_embeds.new_zeros(0, d)
        out.append(g)
        children = g
    return out


# ----------------------------------------------------------------------------- tree gister
def _tensors_of(obj: object) -> list[torch.Tensor]:
    return list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else []


class TreeGister:
    """The tree's ``Gister``: GistNet + the base's input embedding (LoRA adapter included).

    ``version`` hashes the GistNet AND the embedding weights. It is cached and recomputed
    only when a tensor changes (any in-place update — optimiser step, ``load_state_dict`` —
    bumps the tensor's version counter) or is replaced. A plain callable embedding (not an
    ``nn.Module``) is fingerprinted by its output on token ids 0..15.
    """

    PROBE_IDS = 16

    def __init__(self, gistnet: GistNet, embedding: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 chunk: int = GIST_CHUNK) -> None:
        self.gistnet = gistnet
        self.embedding = embedding
        self.chunk = chunk
        self._cache: tuple[tuple | None, str] | None = None

    @property
    def dim(self) -> int:
        return self.gistnet.dim

    def _state_key(self) -> tuple:
        tensors = _tensors_of(self.gistnet) + _tensors_of(self.embedding)
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors)

    @property
    def version(self) -> str:
        key = self._state_key() if isinstance(self.embedding, nn.Module) else None
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        h = hashlib.sha256(module_version(self.gistnet).encode())
        if isinstance(self.embedding, nn.Module):
            hash_state(h, self.embedding.state_dict())
        else:
            with torch.no_grad():
                h.update(tensor_bytes(self.embedding(torch.arange(self.PROBE_IDS))))
        version = h.hexdigest()[:16]
        self._cache = (key, version)
        return version

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N]`` -> input embeddings ``[N, d]`` (on the embedding's device)."""
        if isinstance(self.embedding, nn.Module):
            weights = _tensors_of(self.embedding)
            if weights:
                ids = ids.to(weights[0].device)
        return self.embedding(ids)

    @torch.no_grad()
    def gist(self, level: int, children: torch.Tensor) -> torch.Tensor:
        """``children [N, K, d]`` -> gists ``[N, d]`` float32, eval mode, ``chunk`` nodes per call."""
        net = self.gistnet
        was_training = net.training
        net.eval()
        try:
            x = children.to(device=net.gain.device, dtype=net.gain.dtype)
            parts = [net(x[i : i + self.chunk], level) for i in range(0, x.shape[0], self.chunk)]
        finally:
            net.train(was_training)
        return torch.cat(parts).float() if parts else x.new_zeros(0, net.dim)

"""`BaseModel`: any Hugging Face causal LM driven through ``inputs_embeds`` (frozen).

The working context is a ``[W, d]`` tensor of token embeddings and gists, so the base is
always called with embeddings and explicit ``position_ids``; this adapter hides device,
dtype, padding and the attention-mask details. A model whose ``forward`` takes no
``inputs_embeds`` / ``position_ids`` is refused with a message naming its class. Rotary
(Llama, Qwen2, GPT-NeoX, Phi) and learned absolute positions (GPT-2, OPT) both work; with a
learned position table, ``max_context`` is at most its size and a position past it is a
MegaContextError instead of an index error deep inside the model. ``self.model`` may be replaced (e.g. by a
peft-wrapped model): every call goes through ``self.model`` and its
``get_input_embeddings()``, so LoRA adapters on the embeddings apply to :meth:`embed`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from megacontext.config import Config
from megacontext.errors import ConfigError, MegaContextError

EMBEDDED_RECIPE_VERSION = 1  # bump when pretrain_base changes what it produces
COMPLETE_MARKER = "pretrain_summary.json"  # written last into an embedded base directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEEDED_INPUTS = ("inputs_embeds", "position_ids", "attention_mask")  # what BaseModel.forward passes by name
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # learned absolute positions (GPT-2, OPT, ...)


def embedded_base_dir(cfg: Config) -> Path:
    """``<artifact_root>/base/embedded-<hash>``; the hash covers every input of the result.

    That is the data settings (except ``force_rebuild``, which changes nothing produced),
    the architecture and recipe (``cfg.embedded``), the seed and the recipe version.
    Cheap: no data is read.
    """
    from megacontext.data.sources import source_identity

    data = {k: v for k, v in cfg.to_dict()["data"].items() if k != "force_rebuild"}
    data["source_identity"] = source_identity(cfg.data.source)
    key = {
        "recipe": EMBEDDED_RECIPE_VERSION,
        "data": data,
        "embedded": cfg.to_dict()["embedded"],
        "seed": cfg.seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cfg.artifact_root / "base" / f"embedded-{digest}"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; a named device must exist here (ConfigError)."""
    if str(device) != "auto":
        return _check_device(torch.device(device))
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_device(dev: torch.device) -> torch.device:
    fix = "use --set base.device=auto (the best device here) or base.device=cpu"
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(f"base.device is {str(dev)!r} but this PyTorch build has no CUDA support: {fix}", key="base.device")
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"base.device is {str(dev)!r} but no CUDA device is visible (no driver, or "
                              f"CUDA_VISIBLE_DEVICES hides them): {fix}", key="base.device")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"base.device is {str(dev)!r} but only {count} CUDA device(s) are visible: {fix}",
                              key="base.device")
    if dev.type == "mps" and not _mps_available():
        raise ConfigError(f"base.device is 'mps' but this machine has no usable Apple MPS device: {fix}", key="base.device")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise MegaContextError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name" or "name")."""
    p = Path(name).expanduser()
    return p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or p.exists()


def check_supported(model: torch.nn.Module) -> None:
    """MegaContextError, naming the model's class, unless it can be driven by embeddings at explicit positions."""
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    missing = [p for p in NEEDED_INPUTS if p not in params]
    if missing:
        raise MegaContextError(
            f"{name} cannot be a MegaContext base: its forward() takes no {', '.join(missing)} (the working "
            "context is fed as embeddings at explicit positions); use a causal LM that accepts inputs_embeds "
            "and position_ids (Llama, Qwen2, GPT-NeoX, GPT-2, ...)"
        )
    try:
        emb = model.get_input_embeddings()
    except NotImplementedError:
        emb = None
    if not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise MegaContextError(f"{name} cannot be a MegaContext base: it exposes no input embedding table "
                               "(get_input_embeddings())")


def learned_positions(model: torch.nn.Module) -> int | None:
    """How many positions a model with a learned absolute position table can read (None:
    rotary, ALiBi or other positions without a fixed table)."""
    inputs = model.get_input_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding) and mod is not inputs and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            return int(mod.num_embeddings) - int(getattr(mod, "offset", 0))  # OPT's table starts at offset 2
    return None


def _max_context(model: torch.nn.Module, max_context: int | None, table: int | None) -> int:
    """The context the base may attend to: ``max_context``, else the model config's; never past a learned table."""
    name = type(model).__name__
    configured = getattr(model.config, "max_position_embeddings", None) or table
    n = int(max_context or configured or 0)
    if n <= 0:
        raise MegaContextError(f"{name} does not say how long its context is: set base.max_context")
    if table is not None and n > table:
        raise MegaContextError(
            f"base.max_context {n} is more than the {table} positions {name} has learned (its absolute position "
            f"table): set base.max_context to at most {table}"
        )
    return n


def crop_cache(cache: object, length: int) -> bool:
    """Cut a KV ``cache`` (``.cache`` of :meth:`BaseModel.forward`) back to its first ``length``
    positions, in place. False, leaving it as it was, when some layer cannot be cut back (a
    sliding-window or linear-attention layer, or a transformers without cache layers): then
    only a new cache will do."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(
        getattr(layer, "is_croppable", False) and not getattr(layer, "is_sliding", True) for layer in layers
    ):
        return False
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)  # a negative count: drop that many from the end (every transformers that has layers)
    return True


class BaseModel:
    """A frozen HF causal LM: embeddings in, logits out.

    Attributes: ``model`` (replaceable), ``tokenizer``, ``device``, ``dtype``,
    ``max_context`` (tokens the base may attend to), ``dim`` (embedding width), ``name``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        max_context: int | None = None,
        freeze: bool = True,
    ) -> None:
        check_supported(model)
        self.model = model
        self.model_class = type(model).__name__  # (self.model may become a peft wrapper)
        self.tokenizer = tokenizer
        self.name = name
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.vocab_size, self.dim = (int(n) for n in model.get_input_embeddings().weight.shape)  # rows = ids it can embed
        self.position_limit = learned_positions(model)  # None unless positions come from a learned table
        self.max_context = _max_context(model, max_context, self.position_limit)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        if freeze:
            model.requires_grad_(False)
            model.eval()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        name_or_dir: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "auto",
        max_context: int | None = None,
        attn_implementation: str = "sdpa",
        name: str | None = None,
    ) -> BaseModel:
        """Load a local ``save_pretrained`` directory or a hub id (hub ids need network)."""
        source = str(name_or_dir)
        is_path = isinstance(name_or_dir, Path) or _looks_like_path(source)
        if is_path:
            path = Path(source).expanduser()
            if not (path / "config.json").is_file():
                raise MegaContextError(f"no model at {path}: expected a directory saved with save_pretrained")
            source = str(path)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, attn_implementation=attn_implementation
            )
            tokenizer = AutoTokenizer.from_pretrained(source)
            tokenizer.model_max_length = max(tokenizer.model_max_length or 0, 1 << 30)  # histories are long by design
        except (OSError, ValueError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if is_path:
                raise MegaContextError(f"cannot load the model in {source}: {detail}") from None
            raise MegaContextError(
                f"cannot load base model {source!r}: a hub model needs network access (or the "
                f"Hugging Face cache); otherwise pass a local directory saved with save_pretrained "
                f"({detail})"
            ) from None
        model.to(dev)
        return cls(model, tokenizer, name or source, max_context)

    @classmethod
    def from_config(cls, cfg: Config) -> BaseModel:
        """The configured base; "embedded" is the project's pretrained tiny Llama."""
        b = cfg.base
        if b.name == "embedded":
            path = embedded_base_dir(cfg)
            if not (path / COMPLETE_MARKER).is_file():
                raise MegaContextError(
                    f"the embedded base for this config is not trained yet ({path}); run "
                    f"`megacontext pretrain-base --config {cfg.source_file}` first"
                )
            return cls.load(path, b.dtype, b.device, b.max_context, b.attn_implementation, name=path.name)
        return cls.load(b.name, b.dtype, b.device, b.max_context, b.attn_implementation)

    # ------------------------------------------------------------------ compute
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: LongTensor ``[..., T]`` -> ``[..., T, d]`` (adapters included)."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        last_only: bool = False,
    ):
        """Run the base on ``inputs_embeds`` ``[B, T, d]`` at ``position_ids`` ``[B, T]``.

        ``attention_mask`` ``[B, T_past + T]`` (1 = real, 0 = padding) defaults to all ones.
        It is always passed explicitly: without one, transformers reads non-consecutive
        ``position_ids`` (gists in absolute mode) as packed separate sequences.
        Returns the HF output: ``.logits`` ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``
        where the model can skip the LM head on the others) and, with ``use_cache``, the KV
        cache as ``.cache`` (transformers >= 5.24, which the project requires; ``.past_key_values``
        is its deprecated alias),
        which :func:`crop_cache` can cut back.
        """
        B, T, _ = inputs_embeds.shape
        if self.position_limit is not None:
            self._check_positions(position_ids)
        if attention_mask is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=self.device)
        extra = self._keep_logits(1) if last_only else {}
        return self.model(
            inputs_embeds=inputs_embeds.to(device=self.device, dtype=self.dtype),
            position_ids=position_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            cache=past_key_values,
            use_cache=use_cache,
            **extra,
        )

    def _check_positions(self, position_ids: torch.Tensor) -> None:
        """MegaContextError when a position is past the learned position table (``[B, T]``)."""
        top = int(position_ids.max()) if position_ids.numel() else 0
        if top >= self.position_limit:
            raise MegaContextError(
                f"position {top} is past the {self.position_limit} positions {self.model_class} has learned: "
                "with learned absolute positions use focus.position_mode=compact and a budget plus horizon "
                f"within base.max_context ({self.max_context})"
            )

    def last_logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits ``[B, keep, V]`` of the last ``keep`` positions of ``input_ids`` ``[B, S]``
        (the LM head runs only on those where the model takes ``logits_to_keep``)."""
        return self.model(input_ids=input_ids, **self._keep_logits(keep)).logits[:, -keep:]

    def _keep_logits(self, keep: int) -> dict[str, int]:
        """The model's kwargs that run the LM head on the last ``keep`` positions only ({} when it cannot)."""
        return {"logits_to_keep": keep} if self._logits_to_keep else {}

    def forward_padded(
        self, embeds: Sequence[torch.Tensor], positions: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched forward over rows of different lengths, left padded.

        ``embeds[i]`` ``[T_i, d]``, ``positions[i]`` ``[T_i]`` -> (logits ``[B, T_max, V]``,
        mask ``[B, T_max]`` bool, True at real entries). Row i's real logits are
        ``logits[i, T_max - T_i:]`` and equal an unpadded forward of that row.
        """
        if len(embeds) != len(positions) or not embeds:
            raise ValueError("forward_padded needs one positions tensor per (non-empty) embeds list")
        T_max = max(int(e.shape[0]) for e in embeds)
        rows, pos, mask = [], [], []
        for i, (e, p) in enumerate(zip(embeds, positions)):
            n = int(e.shape[0])
            if p.shape[0] != n:
                raise ValueError(f"row {i}: {n} embeddings but {p.shape[0]} positions")
            pad = T_max - n
            e = e.to(device=self.device, dtype=self.dtype)
            rows.append(torch.cat([e.new_zeros(pad, self.dim), e]))
            pos.append(torch.cat([torch.zeros(pad, dtype=torch.long, device=self.device), p.to(self.device)]))
            mask.append(torch.arange(T_max, device=self.device) >= pad)
        x, pos_t, mask_t = torch.stack(rows), torch.stack(pos), torch.stack(mask)
        out = self.forward(x, pos_t, attention_mask=mask_t.long())
        return out.logits, mask_t

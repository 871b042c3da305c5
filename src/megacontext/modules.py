"""The one bundle of modules every command reads: base, GistNet, LensNet and the LoRA adapter.

``Modules.fresh(cfg, base, lora=...)`` builds untrained GistNet / LensNet (and, when asked,
fresh LoRA adapters) with ONE seed rule: ``torch.manual_seed(derive_seed(cfg.seed, "init"))``
then GistNet, LensNet, LoRA, in that order. ``Modules.load(cfg, checkpoint, ablate=None)``
is the one checkpoint loader for evaluation and the runtime; training resumes with
:meth:`Modules.load_checkpoint` on its own fresh bundle.

The *plain base* is the same base with the adapter switched off (:meth:`Modules.plain`):
the raw baselines (reference, recency, sinks) are read by it, gist windows by the adapted
base. The base itself is always frozen.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from megacontext.base_model import BaseModel
from megacontext.checkpoint import Checkpoint, find_checkpoint, open_checkpoint
from megacontext.config import Config, LoraConfig, derive_seed
from megacontext.errors import MegaContextError
from megacontext.gistnet import GistNet, TreeGister
from megacontext.lensnet import LensNet
from megacontext.weights import module_version

OWNERS = ("gistnet", "lensnet", "lora")
ABLATIONS = OWNERS  # ``eval --ablate``: an untrained module (gistnet, lensnet) or no adapter (lora)


ATTENTION_NAMES = re.compile(r"attn|attention", re.IGNORECASE)  # self_attn, attn, attention, self_attention


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(full name, list) of the model's decoder blocks, e.g. ``model.layers`` (Llama, Qwen2, Phi),
    ``transformer.h`` (GPT-2), ``gpt_neox.layers``: the outermost ModuleList of
    ``config.num_hidden_layers`` entries (the longest one when the config does not say)."""
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod)]
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [item for item in lists if len(item[1]) == n_layers]
    if exact:
        return min(exact, key=lambda item: item[0].count("."))
    if not lists:
        raise MegaContextError(f"cannot place LoRA adapters: found no list of decoder blocks in {type(model).__name__}")
    return max(lists, key=lambda item: (len(item[1]), -item[0].count(".")))


def _projections(block: torch.nn.Module) -> list[str]:
    """Names (inside ``block``) of the linear layers of its attention module: q/k/v/o, or a fused qkv + output."""
    from transformers.pytorch_utils import Conv1D

    attention = [name for name, mod in block.named_children() if ATTENTION_NAMES.search(name)]
    return [
        f"{att}.{name}"
        for att in attention
        for name, mod in block.get_submodule(att).named_modules()
        if name and isinstance(mod, (torch.nn.Linear, Conv1D))
    ]


def lora_targets(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the attention projections of the first or last two decoder blocks (plus the
    input embedding when ``cfg.embeddings``): q/k/v/o_proj in Llama or Qwen2, c_attn/c_proj in
    GPT-2, query_key_value/dense in GPT-NeoX."""
    prefix, blocks = decoder_blocks(model)
    found = [(i, f"{prefix}.{i}.{name}") for i, block in enumerate(blocks) for name in _projections(block)]
    if not found:
        raise MegaContextError(
            f"cannot place LoRA adapters: no linear layers in an attention module (a child named *attn* or "
            f"*attention*) of the blocks {prefix}.N of {type(model).__name__}"
        )
    layers = sorted({i for i, _ in found})
    chosen = set(layers[:2] if cfg.blocks == "first" else layers[-2:])
    targets = [name for i, name in found if i in chosen]
    if cfg.embeddings:
        emb = model.get_input_embeddings()
        targets += [name for name, mod in model.named_modules() if mod is emb]
    return targets


def _fan_in_fan_out(model: torch.nn.Module, targets: list[str]) -> bool:
    """GPT-2 style Conv1D projections store their weight transposed (peft's fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(model.get_submodule(t), Conv1D) for t in targets)


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft probes deprecated transformers attributes and notes that a tied embedding is
    adapted: intended — only the INPUT embedding path gets the adapter, the head is untouched."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        yield


def attach_lora(base: BaseModel, cfg: LoraConfig):
    """Inject fresh peft LoRA adapters into ``base.model`` in place; returns the PeftModel.

    ``base.forward``/``base.embed`` use the adapters from now on. Fresh adapters are a
    no-op (B = 0).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(base.model, cfg)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=_fan_in_fan_out(base.model, targets),
    )
    with _quiet_peft():
        return get_peft_model(base.model, peft_cfg)


def inject_saved_lora(base: BaseModel, folder: Path):
    """Inject the adapter saved in ``folder`` (peft format) into ``base.model``, NOT merged:
    with tied input/output embeddings a merged embedding adapter would also change the head."""
    from peft import PeftModel

    with _quiet_peft():
        lora = PeftModel.from_pretrained(base.model, str(folder))
    base.model.eval()
    return lora


@dataclass
class Modules:
    """The frozen base and the three trainable parts (``lora`` is None without an adapter)."""

    base: BaseModel
    gistnet: GistNet
    lensnet: LensNet
    lora: object | None = None
    checkpoint: Path | None = None  # where the weights came from (None: untrained)
    ablate: str | None = None  # the module left untrained / switched off, if any

    # ------------------------------------------------------------------ building
    @classmethod
    def fresh(cls, cfg: Config, base: BaseModel, lora: bool = False) -> Modules:
        """Untrained GistNet and LensNet (and fresh LoRA adapters when ``lora``) for ``base``."""
        base.model.requires_grad_(False)
        base.model.eval()
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        shape = cfg.tree.shape
        gistnet = GistNet(cfg.gistnet, base.dim, shape.block_size, shape.levels).to(base.device)
        lensnet = LensNet(cfg.lensnet, base.dim, shape.levels).to(base.device)
        adapter = attach_lora(base, cfg.train.lora) if lora else None
        modules = cls(base, gistnet, lensnet, adapter)
        modules.set_trainable(None)
        return modules

    @classmethod
    def load(cls, cfg: Config, checkpoint: str | None = "auto", ablate: str | None = None) -> Modules:
        """The configured base + the modules of ``checkpoint`` (see :func:`find_checkpoint`).

        ``ablate``: "gistnet" / "lensnet" keep that module untrained; "lora" leaves the
        adapter out (the checkpoint's GistNet and LensNet are kept).
        """
        if ablate not in (None, *ABLATIONS):
            raise MegaContextError(f"--ablate must be one of {', '.join(ABLATIONS)}, got {ablate!r}")
        path = find_checkpoint(cfg, checkpoint)
        modules = cls.fresh(cfg, BaseModel.from_config(cfg))
        modules.ablate = ablate
        if path is not None:
            ckpt = open_checkpoint(path)
            if ablate == "lora" and not ckpt.has_lora:
                warnings.warn(f"checkpoint {path} has no LoRA adapter: --ablate lora changes nothing", stacklevel=2)
            modules.load_checkpoint(ckpt, skip=ablate)
        return modules

    def load_checkpoint(self, ckpt: Checkpoint, skip: str | None = None) -> None:
        """Load every module ``ckpt`` holds (all but ``skip``): into the attached adapter when
        there is one (training resume), else by injecting the saved adapter."""
        for name in ("gistnet", "lensnet"):
            if name != skip:
                ckpt.load_module(name, getattr(self, name))
        if skip != "lora" and ckpt.has_lora:
            if self.lora is None:
                self.lora = inject_saved_lora(self.base, ckpt.path / "lora")
            else:
                ckpt.load_lora(self.lora)
        self.checkpoint = ckpt.path
        self.set_trainable(None)

    # ------------------------------------------------------------------ training
    def parameters_of(self, owner: str) -> list[torch.nn.Parameter]:
        if owner == "gistnet":
            return list(self.gistnet.parameters())
        if owner == "lensnet":
            return list(self.lensnet.parameters())
        if owner == "lora":
            if self.lora is None:
                raise MegaContextError("JT3 needs LoRA adapters but none are attached")
            return [p for n, p in self.lora.named_parameters() if "lora_" in n]
        raise ValueError(f"unknown module {owner!r}")

    def set_trainable(self, owner: str | None) -> None:
        """requires_grad only on ``owner``'s parameters (None: nothing trains); base always frozen."""
        self.base.model.requires_grad_(False)
        self.gistnet.requires_grad_(owner == "gistnet")
        self.lensnet.requires_grad_(owner == "lensnet")
        self.gistnet.train(owner == "gistnet")
        self.lensnet.train(owner == "lensnet")
        if self.lora is not None:
            for p in self.parameters_of("lora"):
                p.requires_grad_(owner == "lora")

    # ------------------------------------------------------------------ reading
    def plain(self) -> AbstractContextManager:
        """Context manager: the plain base (adapter disabled) — a no-op without LoRA."""
        return self.lora.disable_adapter() if self.lora is not None else nullcontext()

    def gister(self) -> TreeGister:
        """What a tree calls to gist: GistNet + the base's (adapted) input embedding."""
        return TreeGister(self.gistnet, self.base.model.get_input_embeddings())

    def gist_version(self) -> str:
        """Version of everything a gist depends on: GistNet and the (adapted) input embedding."""
        return self.gister().version

    def adapter_version(self) -> str:
        """Hash of the LoRA weights ("none" without LoRA): keys the cached adapted-recency baseline."""
        if self.lora is None:
            return "none"
        return module_version(torch.nn.ParameterList(self.parameters_of("lora")))

"""The public Python API: a frozen LM with a MegaContext memory, in a few calls.

    from megacontext import MegaContext

    mc = MegaContext.load("default", checkpoint="auto")  # config name | path | Config; trained modules
    with mc.session("my_tree") as s:                     # a folder (reopened when it holds a tree); None: RAM
        s.append(open("book.txt").read())                # text or token ids; gists as blocks complete
        print(s.generate("Who wrote it?", max_new_tokens=32, stop="\\n"))
        for piece in s.generate("And then", 16, stream=True):
            print(piece, end="")
        print(s.window())                                # entries, levels, spans, cost <= budget

A thin layer over the package: :class:`MegaContext` is a loaded config plus its
:class:`~megacontext.modules.Modules`; :class:`MegaSession` wraps a
:class:`~megacontext.runtime.Session` over a :class:`~megacontext.tree.MegaContextTree`.
The CLI's ``ingest``, ``generate`` and ``inspect`` are wrappers over it.

The working context is built when it is first needed (:meth:`MegaSession.window`,
:meth:`MegaSession.generate`): then a disk session's saved focus state is restored and the
budget checked against the whole history. Until then :meth:`MegaSession.append` only
grows the history (of any length, as ``megacontext ingest`` does); once the window exists,
an append that would outgrow the budget is refused before anything is appended.

User mistakes raise :class:`~megacontext.errors.MegaContextError` (one-line messages).
Heavy imports (torch, transformers) happen inside the functions, after the config is
loaded: ``import megacontext`` stays cheap, and the hub probe of
:func:`~megacontext.hub.prefer_offline` runs before ``huggingface_hub`` is imported.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from megacontext.errors import MegaContextError, MegaContextWarning

if TYPE_CHECKING:
    import torch

    from megacontext.config import Config, FocusConfig
    from megacontext.modules import Modules
    from megacontext.runtime import Session
    from megacontext.tree import MegaContextTree



# ------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Window:
    """The working context the base reads: one entry per unit of cost, oldest first.

    ``entries[i] = (level, index)``: level 0 is raw token ``index``; level ``k`` the gist of
    tokens ``[index*K**k, (index+1)*K**k)``, which ``spans[i]`` gives as ``(start, end)``.
    """

    entries: tuple[tuple[int, int], ...]
    spans: tuple[tuple[int, int], ...]
    cost: int
    budget: int
    history_tokens: int
    covered_tokens: int
    entries_per_level: dict[str, int]
    refocuses: int
    actions: int

    @property
    def levels(self) -> tuple[int, ...]:
        """The level of each entry (0 = raw token)."""
        return tuple(level for level, _ in self.entries)

    def summary(self) -> dict[str, Any]:
        """cost, budget, entries_per_level, covered_tokens, history_tokens, refocuses, actions
        (what ``megacontext generate --json`` prints besides the text)."""
        return {
            "cost": self.cost,
            "budget": self.budget,
            "entries_per_level": dict(self.entries_per_level),
            "covered_tokens": self.covered_tokens,
            "history_tokens": self.history_tokens,
            "refocuses": self.refocuses,
            "actions": self.actions,
        }

    def __str__(self) -> str:
        return (
            f"Window(cost {self.cost}/{self.budget}, entries per level {self.entries_per_level}, "
            f"covers {self.covered_tokens}/{self.history_tokens} tokens, {self.refocuses} refocuses, "
            f"{self.actions} actions)"
        )


@dataclass(frozen=True)
class TreeInfo:
    """A tree's size (what ``megacontext inspect`` shows); ``path`` is None for a RAM tree.

    ``levels``: its gist levels (``tree.levels`` at creation, more once the history outgrew a
    session's budget); ``nodes_per_level`` has one entry per level, ``"1"`` .. ``str(levels)``.
    """

    path: Path | None
    tokens: int
    levels: int
    nodes_per_level: dict[str, int]
    gist_version: str
    bytes_on_disk: int
    max_token_id: int

    def to_dict(self) -> dict[str, Any]:
        """The keys of ``megacontext inspect --json``."""
        return {
            "tokens": self.tokens,
            "levels": self.levels,
            "nodes_per_level": dict(self.nodes_per_level),
            "gist_version": self.gist_version,
            "bytes_on_disk": self.bytes_on_disk,
            "max_token_id": self.max_token_id,
        }


def _tree_info(tree: MegaContextTree) -> TreeInfo:
    return TreeInfo(
        path=tree.path,
        tokens=tree.num_tokens,
        levels=tree.levels,
        nodes_per_level={str(k): tree.num_nodes(k) for k in range(1, tree.levels + 1)},
        gist_version=tree.gist_version,
        bytes_on_disk=tree.bytes_on_disk,
        max_token_id=tree.max_token(),
    )


def inspect_tree(tree_dir: str | os.PathLike) -> TreeInfo:
    """A disk tree's :class:`TreeInfo`, read without a model and without its writer lock."""
    from megacontext.tree import MegaContextTree

    with MegaContextTree.open(Path(tree_dir)) as tree:
        return _tree_info(tree)


# ------------------------------------------------------------------------- loading
def resolve_config(config: str | os.PathLike | Config = "default", overrides: Sequence[str] = ()) -> Config:
    """A Config from a name in configs/ ("default", "smoke", "gpu"), a YAML path or a Config,
    with ``section.key=value`` overrides on top (a given Config is copied, not changed)."""
    from megacontext import config as config_module  # attribute lookup at call time (tests patch load_config)

    if isinstance(overrides, str):
        raise MegaContextError(f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}")
    if isinstance(config, config_module.Config):
        return config_module.apply_overrides(config, list(overrides)) if overrides else config
    if not isinstance(config, (str, os.PathLike)):
        raise MegaContextError(f"config must be a config name, a YAML path or a Config, got {type(config).__name__}")
    return config_module.load_config(config, list(overrides))


@dataclass
class MegaContext:
    """A loaded configuration and its modules (frozen base, GistNet, LensNet, LoRA)."""

    config: Config
    modules: Modules

    @classmethod
    def load(
        cls,
        config: str | os.PathLike | Config = "default",
        checkpoint: str | os.PathLike | None = "auto",
        overrides: Sequence[str] = (),
    ) -> MegaContext:
        """Load the base and the trained modules.

        ``config``: see :func:`resolve_config`. ``checkpoint``: a checkpoint or run folder,
        "latest" (the newest run under the artifact root), "auto" (latest if there is one,
        else untrained modules) or None / "none" (untrained).
        """
        from megacontext.hub import prefer_offline

        cfg = resolve_config(config, overrides)
        prefer_offline(cfg)  # before the model stack (huggingface_hub) is imported
        from megacontext.modules import Modules

        which = None if checkpoint is None else str(checkpoint)
        return cls(cfg, Modules.load(cfg, which))

    @property
    def tokenizer(self) -> Any:
        """The base's tokenizer (a transformers tokenizer)."""
        return self.modules.base.tokenizer

    @property
    def checkpoint(self) -> Path | None:
        """Where the trained modules came from (None: untrained)."""
        return self.modules.checkpoint

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens), as ``ingest`` and ``generate`` read it."""
        if not isinstance(text, str):
            raise MegaContextError(f"encode takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise MegaContextError("the text is not valid UTF-8 (it holds lone surrogates); nothing was changed") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def session(
        self, tree_dir: str | os.PathLike | None = None, *, budget: int | None = None, create: bool = True
    ) -> MegaSession:
        """A session over a history: in RAM when ``tree_dir`` is None, else the disk tree in
        ``tree_dir`` (reopened, with its history and focus state, when it exists; created
        when it does not, unless ``create=False``). ``budget``: the working context's cost
        W_max, at most the base's context length; checked at once when given, and when the
        window is first built for the default ``focus.budget`` (appending needs no budget).
        A disk tree holds its writer lock until the session is closed."""
        from megacontext.runtime import open_or_create_tree
        from megacontext.tree import MegaContextTree

        focus = self._focus(budget)
        if budget is not None:
            check_window(focus, self.modules.base)
        if tree_dir is None:
            t = self.config.tree
            tree = MegaContextTree.create_ram(t.block_size, t.levels, self.modules.base.dim, self.modules.gister())
        else:
            path = Path(tree_dir)
            if not create and not path.exists():
                raise MegaContextError(f"no tree at {path}: create one with session({str(path)!r}) or "
                                       f"`megacontext ingest --tree {path} --input FILE`")
            tree = open_or_create_tree(self.config, self.modules, path, create=create)
        return MegaSession(self, tree, focus)

    def __repr__(self) -> str:
        return (f"MegaContext(config={self.config.source_file!r}, base={self.modules.base.name!r}, "
                f"checkpoint={str(self.checkpoint) if self.checkpoint else None!r})")

    def _focus(self, budget: int | None) -> FocusConfig:
        import dataclasses

        focus = self.config.focus
        if budget is None:
            return focus
        K = self.config.tree.block_size
        least = (focus.tail_blocks + 2) * K  # the raw tail (tail_blocks + 1 blocks) plus a block of headroom
        if not _is_int(budget) or budget < least:
            raise MegaContextError(
                f"budget must be an integer >= {least} (the raw tail of {focus.tail_blocks + 1} blocks of {K} "
                f"plus one block of headroom), got {budget!r}"
            )
        return dataclasses.replace(focus, budget=int(budget))


def check_window(focus: FocusConfig, base: Any) -> None:
    """MegaContextError when the base cannot read a window of these settings (budget past its
    context, or absolute positions past a learned position table)."""
    from megacontext.runtime import check_budget

    check_budget(focus.budget, base)
    if base.position_limit is not None and focus.position_mode == "absolute":
        raise MegaContextError(
            f"focus.position_mode=absolute puts each entry at its token position, past the {base.position_limit} "
            f"positions {base.model_class} has learned: use focus.position_mode=compact"
        )


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ------------------------------------------------------------------------- session
class MegaSession:
    """One history (a tree in RAM or on disk), its working context and the modules that read it.

    Use it as a context manager, or call :meth:`close`: closing a disk session saves its focus
    state (``session.json``) and releases the tree's writer lock; leaving the ``with`` block
    on an exception releases it without saving it (the tree still commits the history it
    holds: appends are committed per block, and the last unfinished block on close; when the
    disk refuses that commit, a MegaContextWarning says so and the exception stays the one raised).
    """

    def __init__(self, mc: MegaContext, tree: MegaContextTree, focus: FocusConfig) -> None:
        """Private: use :meth:`MegaContext.session`."""
        self.mc = mc
        self.tree = tree
        self.focus = focus
        self._rt: Session | None = None
        self._closed = False

    # ------------------------------------------------------------------ state
    @property
    def path(self) -> Path | None:
        """The tree's folder (None: a RAM session)."""
        return self.tree.path

    @property
    def num_tokens(self) -> int:
        """Tokens in the history."""
        return self.tree.num_tokens

    @property
    def budget(self) -> int:
        return self.focus.budget

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def runtime(self) -> Session:
        """The underlying :class:`~megacontext.runtime.Session` (its window built if it was not yet)."""
        self._check_open()
        if self._rt is None:
            from megacontext.runtime import Session

            check_window(self.focus, self.mc.modules.base)
            rt = Session(self.mc.modules, self.tree, self.focus, seed=self.mc.config.seed)
            rt.restore_focus()  # a disk session's saved window (a SessionWarning when it is damaged)
            self._rt = rt
        return self._rt

    def window(self) -> Window:
        """The current working context (empty before anything was appended)."""
        rt = self.runtime
        s = rt.window_summary()
        entries: tuple[tuple[int, int], ...] = ()
        spans: tuple[tuple[int, int], ...] = ()
        if rt.wc is not None:
            entries = tuple((int(k), int(i)) for k, i in rt.wc.entries)
            starts, ends = rt.wc.spans()
            spans = tuple(zip(starts.tolist(), ends.tolist()))
        return Window(entries, spans, s["cost"], s["budget"], s["history_tokens"], s["covered_tokens"],
                      dict(s["entries_per_level"]), s["refocuses"], s["actions"])

    def tree_info(self) -> TreeInfo:
        """The history's size: tokens, gists per level, gist version, bytes on disk."""
        self._check_open()
        return _tree_info(self.tree)

    # ------------------------------------------------------------------ writes
    def append(
        self, data: str | Sequence[int] | np.ndarray | torch.Tensor, progress: Callable[[int], None] | None = None
    ) -> int:
        """Append text (tokenized without special tokens) or token ids to the history;
        returns the number of tokens appended. Gists are computed as blocks complete, in
        chunks of 8,192 tokens (one disk commit each); ``progress(n)`` after each chunk.
        Ids outside the base's vocabulary are refused before anything is appended; so is,
        once the window exists, a history that would outgrow the budget. An interrupted or
        failing disk append closes the session and says how many tokens the tree kept."""
        from megacontext.tree import CHUNK_TOKENS  # tokens per tree append: one disk commit each

        self._check_open()
        ids = self._ids(data, "append")
        with self._committing(len(ids)):
            if self._rt is not None:
                self._rt.ingest_bulk(ids, progress, CHUNK_TOKENS)
            else:
                for i in range(0, len(ids), CHUNK_TOKENS):
                    self.tree.append(ids[i : i + CHUNK_TOKENS])
                    if progress is not None:
                        progress(min(CHUNK_TOKENS, len(ids) - i))
        return len(ids)

    @overload
    def generate(self, prompt: str | Sequence[int] = ..., max_new_tokens: int = ..., temperature: float = ...,
                 stop: str | Sequence[str] | None = ..., stream: Literal[False] = ...) -> str: ...

    @overload
    def generate(self, prompt: str | Sequence[int] = ..., max_new_tokens: int = ..., temperature: float = ...,
                 stop: str | Sequence[str] | None = ..., *, stream: Literal[True]) -> Iterator[str]: ...

    def generate(
        self,
        prompt: str | Sequence[int] = "",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Append ``prompt`` (text or ids) to the history, then generate up to ``max_new_tokens``
        tokens, greedily (``temperature`` 0) or by sampling (seeded by the config's seed).

        Returns the generated text; with ``stream=True`` an iterator of its pieces (one per
        token, as soon as it decodes to whole characters), whose concatenation is the same
        text. ``stop``: a string or strings; generation ends at the first one, which is left
        out of the text (its tokens stay in the history, as every generated token does).
        The checks (sampling values, vocabulary, budget) run at the call, before any change.
        """
        from megacontext.data.tokenizer import decode_pieces, stop_strings

        self._check_open()
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise MegaContextError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0
        ):
            raise MegaContextError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        stops = stop_strings(stop)
        ids = self._ids(prompt, "generate")
        tokens = self.runtime.stream(ids, int(max_new_tokens), float(temperature))
        if stream:
            return decode_pieces(self.mc.tokenizer, tokens, stops)
        if not stops:
            return self.mc.decode(list(tokens))
        return "".join(decode_pieces(self.mc.tokenizer, tokens, stops))

    # ------------------------------------------------------------------ lifecycle
    def save(self) -> None:
        """Write the focus state beside the disk tree (atomic, checksummed ``session.json``);
        nothing to write before the window was first built. MegaContextError for a RAM session."""
        self._check_open()
        if self.path is None:
            raise MegaContextError("a RAM session has no folder to save to: open it with mc.session(tree_dir)")
        if self._rt is not None:
            self._rt.save()

    def close(self) -> None:
        """Save (a disk session) and release the tree. Idempotent. When the disk refuses the last
        commit or the save (a full disk): MegaContextError, saying what the tree keeps."""
        if self._closed:
            return
        try:
            if self.path is not None:
                self.save()
        except BaseException as e:
            self._release()
            if isinstance(e, OSError):
                raise MegaContextError(self._refused(e)) from None
            raise
        if (error := self._release()) is not None:
            raise MegaContextError(self._refused(error))

    def _release(self) -> OSError | None:
        """Release the tree without saving; it commits its unfinished block first. -> the error
        when the disk refused that commit (the tree is released all the same): the caller says so,
        unless it is on its way out of another error, which this must not hide."""
        self._closed = True
        try:
            self.tree.close()
        except OSError as e:
            return e
        return None

    def _refused(self, e: OSError) -> str:
        """What a commit or save the disk refused on closing means: what the tree keeps."""
        tree, where = self.tree, f" ({e.filename})" if e.filename else ""
        lost = tree.num_tokens - tree.committed_tokens
        kept = f"the last {lost} were not committed" if lost else "its focus state was not saved"
        return (f"{e.strerror or e}{where}: the tree {self.path} keeps {tree.committed_tokens} of its "
                f"{tree.num_tokens} tokens ({kept})")

    def __enter__(self) -> MegaSession:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        elif (error := self._release()) is not None:  # the error on its way out stays the one raised
            warnings.warn(self._refused(error), MegaContextWarning, stacklevel=2)

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "RAM"
        state = "closed" if self._closed else f"{self.num_tokens} tokens"
        return f"MegaSession({where}, {state}, budget={self.budget})"

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise MegaContextError("this session is closed: open a new one with mc.session(...)")

    def _ids(self, data: object, what: str) -> np.ndarray:
        """Text or token ids -> int64 [N], each in the base's vocabulary (MegaContextError otherwise)."""
        if isinstance(data, str):
            return np.asarray(self.mc.encode(data), dtype=np.int64)
        if hasattr(data, "detach"):  # a torch tensor
            data = data.detach().cpu().numpy()  # type: ignore[union-attr]
        if isinstance(data, (bytes, dict, set)) or not isinstance(data, (Sequence, np.ndarray)):
            raise MegaContextError(f"{what} takes text (str) or a 1-D sequence of token ids, got {type(data).__name__}")
        arr = np.asarray(data)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise MegaContextError(
                f"{what} takes text (str) or a 1-D sequence of integer token ids, got an array of shape "
                f"{tuple(arr.shape)} and dtype {arr.dtype}"
            )
        ids = arr.astype(np.int64)
        vocab = self.mc.modules.base.vocab_size
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            raise MegaContextError(
                f"token id {int(ids[bad[0]])} at position {int(bad[0])} of the input is outside the base's "
                f"vocabulary [0, {vocab}); nothing was appended"
            )
        return ids

    @contextmanager
    def _committing(self, new: int) -> Iterator[None]:
        """A disk append interrupted (KeyboardInterrupt) or failing (OSError) closes the session
        and says what the tree kept (a commit the close could not make either goes unsaid: the
        tree is read back); a RAM session re-raises as is. ``new`` counts the tokens held back
        from before, which the append commits first."""
        path, before = self.path, self.tree.committed_tokens
        new += self.num_tokens - before
        try:
            yield
        except KeyboardInterrupt:
            if path is None:
                raise
            self._release()
            raise KeyboardInterrupt(_kept(path, before, new)) from None
        except OSError as e:
            if path is None:
                raise
            self._release()
            where = f" ({e.filename})" if e.filename else ""
            raise MegaContextError(f"{e.strerror or e}{where}: {_kept(path, before, new)}") from None


def _kept(path: Path, before: int, new: int) -> str:
    """What an interrupted append left: the committed history, read back from disk."""
    from megacontext.tree import MegaContextTree

    with MegaContextTree.open(path) as tree:
        n = tree.num_tokens
    return f"the tree {path} keeps {n} tokens ({n - before} of the {new} new ones were committed, the rest were not ingested)"


__all__ = ["MegaContext", "MegaSession", "TreeInfo", "Window", "inspect_tree", "resolve_config"]

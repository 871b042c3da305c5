"""`megacontext` command line: one module per command group, registered here.

Each command module exposes ``register(subparsers)``; it adds its subcommands with
:func:`add_common` options and sets ``func(args) -> int`` as the handler; a handler loads
its config (:func:`load_args_config`) before it imports the model stack.
User mistakes surface as :class:`~megacontext.errors.MegaContextError` and are printed
as one line (exit status 2); so are OS errors (a full disk, a missing permission), and
:class:`~megacontext.errors.MegaContextWarning` as one ``warning:`` line each. There is
never a traceback for those.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from megacontext.errors import MegaContextError, MegaContextWarning

# Command modules, in the order their subcommands appear in --help.
COMMAND_MODULES = [
    "megacontext.cli.data",
    "megacontext.cli.base",
    "megacontext.cli.memory",
    "megacontext.cli.train",
    "megacontext.cli.eval",
]

DESCRIPTION = """\
MegaContext: effectively unbounded memory for a frozen language model at constant compute.

The history lives in a tree (raw tokens, gists of 32-token blocks, gists of gists);
a learned focus policy picks a fixed-budget working context that the base model reads.

Typical flow on the embedded default (CPU, offline):
  megacontext run             # all of the below, into a new run folder
  megacontext prepare         # corpus -> tokenizer + Arrow shards
  megacontext pretrain-base   # the tiny Llama base (cached by content)
  megacontext train           # warm start, then cycles of JT1 GistNet -> JT2 LensNet -> JT3 LoRA
  megacontext eval            # loss@H per policy and budget, passkey, timing -> eval.json
  megacontext ingest / generate --tree DIR   # a long session on disk

Every subcommand takes --config PATH (YAML, or a name from configs/) and repeated
--set section.key=value overrides. Precedence: command line > environment
(MEGACONTEXT_*) > config file > defaults.
"""


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    """--checkpoint, resolved by ``megacontext.checkpoint`` the same way for every command."""
    p.add_argument(
        "--checkpoint",
        default="auto",
        metavar="PATH",
        help="trained GistNet/LensNet/LoRA modules: a checkpoint folder, a run folder, 'latest' (newest run under "
        "$MEGACONTEXT_ARTIFACT_ROOT/runs), 'none' (untrained) or 'auto' (latest if any, else none; "
        "the default)",
    )


def add_common(p: argparse.ArgumentParser) -> None:
    """--config and --set, shared by every subcommand."""
    p.add_argument(
        "--config",
        metavar="PATH",
        default="default",
        help="YAML config file, or the name of one in configs/ (default: %(default)s)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable (e.g. --set focus.budget=512)",
    )


def load_args_config(args: argparse.Namespace, extra: Sequence[str] = ()):
    """The Config for a parsed command line (file < env < --set < extra).

    When it names a hub model or dataset and the hub is unreachable, the process is
    switched to offline mode here, before ``huggingface_hub`` is imported.
    """
    from megacontext.config import load_config
    from megacontext.hub import prefer_offline

    cfg = load_config(args.config, list(args.overrides) + list(extra))
    prefer_offline(cfg)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacontext",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


@contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Inside the block, each MegaContextWarning is printed as ``megacontext CMD: warning: ...``."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MegaContextWarning):
            print(f"megacontext {command}: warning: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    say = f"megacontext {args.command}"
    try:
        with one_line_warnings(args.command):
            return int(args.func(args) or 0)
    except MegaContextError as e:
        print(f"{say}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment: a full disk, a permission, a vanished file
        where = f" ({e.filename})" if e.filename else ""
        print(f"{say}: error: {e.strerror or e}{where}; check the path, its permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{say}: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

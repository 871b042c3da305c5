"""`megacontext` command line: one module per command group, registered here.

Each command module exposes ``register(subparsers)``; it adds its subcommands with
:func:`add_common` options and sets ``func(args) -> int`` as the handler.
User mistakes surface as :class:`~megacontext.errors.MegaContextError` and are printed
as one line (exit status 2); there is never a traceback for those.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from megacontext.errors import MegaContextError

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
    """The Config for a parsed command line (file < env < --set < extra)."""
    from megacontext.config import load_config

    return load_config(args.config, list(args.overrides) + list(extra))


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MegaContextError as e:
        print(f"megacontext {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megacontext {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`ingest`, `inspect`, `generate`: work with a MegaContext tree on disk."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megacontext.cli import add_checkpoint, add_common, load_args_config
from megacontext.errors import MegaContextError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="tokenize text and append it to a tree on disk",
        description="Tokenize a UTF-8 text file (or stdin with '-') with the configured base's "
        "tokenizer and append it to a MegaContext tree on disk, computing the gists of every "
        "completed block. The tree is created if DIR does not exist; ingesting more text later "
        "appends to the same history.",
    )
    add_common(p)
    p.add_argument("--tree", required=True, metavar="DIR", help="tree folder (created if missing)")
    p.add_argument("--input", required=True, metavar="FILE", help="UTF-8 text file, or - for stdin")
    add_checkpoint(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "inspect",
        help="show a tree's size, levels and gist version",
        description="Report a tree's token count, nodes per level, gist version and bytes on "
        "disk. Needs no model.",
    )
    add_common(p)
    p.add_argument("--tree", required=True, metavar="DIR", help="tree folder")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "generate",
        help="continue a session: prompt in, continuation out",
        description="Open a tree as a session, append the prompt to its history, and generate a "
        "continuation with the base reading a working context of at most --budget cost units "
        "(raw tokens where the focus policy wants detail, gists elsewhere). The prompt and the "
        "continuation become part of the history.",
    )
    add_common(p)
    p.add_argument("--tree", required=True, metavar="DIR", help="tree folder (made by ingest)")
    p.add_argument("--prompt", required=True, help="text to append before generating")
    p.add_argument("--budget", type=int, default=None,
                   help="W_max in cost units, at most the base's context length (default: focus.budget)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default: %(default)s)")
    add_checkpoint(p)
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=cmd_generate)


def _read_input(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise MegaContextError(f"cannot read input {path!r}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MegaContextError(
            f"input {path!r} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); nothing was ingested"
        ) from None


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = load_args_config(args)  # first: it may switch the hub to offline mode before the imports below
    text = _read_input(args.input)  # before touching the tree

    from tqdm import tqdm

    from megacontext.modules import Modules
    from megacontext.runtime import open_or_create_tree

    modules = Modules.load(cfg, args.checkpoint)
    ckpt = modules.checkpoint
    ids = modules.base.tokenizer.encode(text, add_special_tokens=False)
    path = Path(args.tree)
    tree = open_or_create_tree(cfg, modules, path, create=True)
    before = tree.num_tokens
    chunk = 8192
    try:
        with tqdm(total=len(ids), unit="tok", desc="ingest", disable=not sys.stderr.isatty()) as bar:
            for i in range(0, len(ids), chunk):
                tree.append(ids[i : i + chunk])
                bar.update(min(chunk, len(ids) - i))
    except KeyboardInterrupt:
        tree.close()
        raise KeyboardInterrupt(_kept(path, before, len(ids))) from None
    except OSError as e:
        tree.close()
        where = f" ({e.filename})" if e.filename else ""
        raise MegaContextError(f"{e.strerror or e}{where}: {_kept(path, before, len(ids))}") from None
    n = tree.num_tokens
    counts = {str(k): tree.num_nodes(k) for k in range(1, tree.levels + 1)}
    tree.close()
    print(
        f"ingested {len(ids)} tokens into {args.tree} (history {before} -> {n} tokens; "
        f"gists per level {counts}; modules: {ckpt or 'untrained'})"
    )
    return 0


def _kept(path: Path, before: int, new: int) -> str:
    """What an interrupted ingest left: the committed history, read back from disk."""
    from megacontext.tree import MegaContextTree

    with MegaContextTree.open(path) as tree:
        n = tree.num_tokens
    return (
        f"the tree {path} keeps {n} tokens ({n - before} of the {new} new ones were committed, "
        f"the rest were not ingested)"
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from megacontext.tree import MegaContextTree

    tree = MegaContextTree.open(Path(args.tree))
    info = {
        "tokens": tree.num_tokens,
        "nodes_per_level": {str(k): tree.num_nodes(k) for k in range(1, tree.levels + 1)},
        "gist_version": tree.gist_version,
        "bytes_on_disk": tree.bytes_on_disk,
        "max_token_id": tree.max_token(),
    }
    tree.close()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"tree {args.tree}")
        print(f"  tokens         {info['tokens']}")
        for k, v in info["nodes_per_level"].items():
            print(f"  LOD{k} gists     {v}")
        print(f"  gist version   {info['gist_version']}")
        print(f"  bytes on disk  {info['bytes_on_disk']}")
        print(f"  max token id   {info['max_token_id']} (generate and ingest check it against the base's vocabulary)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise MegaContextError("the prompt is not valid UTF-8; nothing was changed") from None
    extra = [f"focus.budget={args.budget}"] if args.budget is not None else []
    cfg = load_args_config(args, extra)  # first: it may switch the hub to offline mode before the imports below

    from megacontext.modules import Modules
    from megacontext.runtime import Session, check_budget, check_sampling, open_or_create_tree

    check_sampling(args.max_new_tokens, args.temperature)
    if not Path(args.tree).exists():
        raise MegaContextError(f"no tree at {args.tree}: create one with `megacontext ingest --tree {args.tree} --input FILE`")
    modules = Modules.load(cfg, args.checkpoint)
    base, ckpt = modules.base, modules.checkpoint
    check_budget(cfg.focus.budget, base)
    tree = open_or_create_tree(cfg, modules, Path(args.tree), create=False)
    try:
        session = Session(modules, tree, cfg.focus, seed=cfg.seed)
        session.restore_focus()
        prompt_ids = base.tokenizer.encode(args.prompt, add_special_tokens=False)
        out_ids = session.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature)
        session.save()
        summary = session.window_summary()
    finally:
        tree.close()
    text = base.tokenizer.decode(out_ids)
    if args.json:
        print(json.dumps({"text": text, **summary}))
    else:
        print(text)
        print(
            f"\n[window: cost {summary['cost']}/{summary['budget']}, entries per level "
            f"{summary['entries_per_level']}, covers {summary['covered_tokens']}/"
            f"{summary['history_tokens']} tokens, {summary['refocuses']} refocuses, "
            f"{summary['actions']} actions; modules: {ckpt or 'untrained'}]",
            file=sys.stderr,
        )
    return 0

"""`prepare`: corpus -> tokenizer + Arrow shards + manifest (validated and reused on re-runs)."""

from __future__ import annotations

import argparse

from megacontext.cli import add_common, load_args_config

SOURCE_HELP = (
    "data source (default: data.source of the config, python-stdlib in default.yaml): "
    "python-stdlib (this interpreter's standard library, test suites skipped) | files:GLOB "
    "(** recurses) | jsonl:PATH[:field] (field defaults to 'text') | hf:NAME[:split] "
    "(needs network or a local datasets cache)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into Arrow shards (cached)",
        description="Read a corpus, split it into train/val/test by document hash "
        "(data.val_fraction, data.test_fraction), tokenize it with the configured base's "
        "tokenizer (for the embedded base: a byte-level BPE of data.vocab_size trained on the "
        "train split), and write Arrow shards plus manifest.json under "
        "$MEGACONTEXT_DATA_ROOT/<dataset>/. A re-run verifies the shards' checksums and reuses "
        "them; corrupted or missing shards are reported and rebuilt, and so is a dataset whose "
        "local source changed since (files added, removed, resized or touched).",
    )
    add_common(p)
    p.add_argument("--source", default=None, metavar="SPEC", help=SOURCE_HELP)
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if valid shards exist (same as MEGACONTEXT_FORCE_DATA_REBUILD=1)",
    )
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_args_config(args, ["data.force_rebuild=true"] if args.force else [])

    from megacontext.data import prepare_dataset

    ds = prepare_dataset(cfg, source=args.source)
    m = ds.manifest
    tok = m["tokenizer"]
    print(f"dataset    {ds.root}")
    print(f"source     {m['source']['spec']} ({m['source']['documents']} documents read, "
          f"{m['source']['skipped_non_utf8']} not UTF-8, {m['source']['duplicates_dropped']} duplicates)")
    print(f"tokenizer  {tok['kind']} {tok['name']} (vocab {tok['vocab_size']}, sha256 {tok['sha256'][:12]})")
    for split, info in m["splits"].items():
        docs, tokens, shards = info["documents"], info["tokens"], len(info["shards"])
        print(f"{split:<10} {docs:>7,} docs {tokens:>12,} tokens  {shards} shards")
    print(f"status     {ds.status} in {ds.elapsed_s:.1f}s")
    return 0

"""`pretrain-base`: train (or reuse) the embedded tiny Llama base and print its report."""

from __future__ import annotations

import argparse

from megacontext.cli import add_common, load_args_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain-base",
        help="pretrain the embedded tiny Llama base (cached by content)",
        description="Prepare the dataset if needed, then pretrain the embedded base (a tiny "
        "Llama; sizes and recipe in the config's `embedded:` section): first an induction "
        "warm-up on repeated random tokens (until their loss < embedded.induction_target), then "
        "packed sequences of the train split mixed with synthetic passkey documents, with "
        "embedded.copy_rows drill rows kept in every step. Evaluate it on the val split "
        "and save it in Hugging Face format under "
        "$MEGACONTEXT_ARTIFACT_ROOT/base/embedded-<hash>/. The hash covers the data settings, "
        "the `embedded:` section and the seed; a complete base with the same hash is reused.",
    )
    add_common(p)
    p.add_argument("--force", action="store_true", help="retrain even if a complete base exists")
    p.set_defaults(func=cmd_pretrain_base)


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    cfg = load_args_config(args)

    from megacontext.training.pretrain_base import pretrain_base

    s = pretrain_base(cfg, force=args.force)
    early, late = s["early_positions"], s["late_positions"]
    depths = "  ".join(f"{k.removeprefix('depth_')}: {v:.0%}" for k, v in s["passkey_by_depth"].items())
    print(f"base        {s['output_dir']} ({s['status']})")
    print(f"parameters  {s['parameters']:,} (vocab {s['vocab_size']:,})")
    print(f"steps       {s['steps']:,} ({s['tokens_seen']:,} tokens, {s['passkey_sequences']} passkey sequences)")
    print(f"wall time   {s['wall_seconds']:.0f}s (training {s['train_tokens_per_s']:,.0f} tokens/s "
          f"on {s['threads']} threads)")
    if s.get("induction_warmup_steps"):
        print(f"induction   warm-up {s['induction_warmup_steps']:,} steps to repeat loss "
              f"{s['induction_warmup_loss']:.3f}; drill loss at the end {s['copy_loss_last']:.3f}")
    print(f"train loss  {s['train_loss_first']:.3f} -> {s['train_loss_last']:.3f}")
    print(f"val loss    {s['val_loss']:.3f}  positions [{early[0]},{early[1]}): {s['val_loss_early']:.3f}  "
          f"[{late[0]},{late[1]}): {s['val_loss_late']:.3f}")
    print(f"passkey     {s['passkey_accuracy']:.0%} exact match in-window ({s['passkey_trials']} prompts of "
          f"{s['passkey_prompt_tokens']} tokens; by depth {depths})")
    return 0

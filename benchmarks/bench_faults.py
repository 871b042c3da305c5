"""Kill-and-reopen benchmark (a script, not a test): SIGKILL `ingest`, `generate` and `train`.

For each target, one uninterrupted reference run, then --trials kills at random moments
(a quarter during the command's start-up, the rest spread over its work), each followed
by the check of tests/test_faults.py:

  ingest    the reopened tree is an exact prefix of the reference (tokens and every gist,
            bit for bit), and appending the rest of the text gives the reference tree;
  generate  the history is a prefix of the reference's, session.json is intact, and
            generate runs again cleanly without changing what it found;
  train     `train --resume latest` (or a fresh start when no checkpoint was written)
            reproduces the reference: validation rows, final weights, telemetry.

A commit is lost when what was committed before the kill (metadata.json, or the
checkpoint `latest` named, read just before it) is not there after it. Commands run in
children forked from one helper process (tests/faultkit.py), on the smoke config, one CPU
thread each. Prints one summary line per target; exits 1 on any inconsistent trial or
lost commit.

Usage:  uv run python benchmarks/bench_faults.py [--trials 20] [--targets ingest generate train]
        [--root DIR] [--seed 0] [--verbose]
--root keeps the smoke dataset and base (built there on first use, a minute or two) and
the work folders; the default is a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faultkit import TRAIN_SETS, Forker, GenerateKills, IngestKills, KillTrials, Outcome, TrainKills  # noqa: E402

from megacontext.config import load_config  # noqa: E402
from megacontext.data import PreparedDataset, dataset_dir  # noqa: E402

CONSISTENT = {"ingest": "consistent prefixes", "generate": "consistent prefixes", "train": "exact resumes"}


def _smoke_cli(root: Path) -> list[str]:
    return ["--config", "smoke", "--set", f"paths.data_root={root / 'data'}",
            "--set", f"paths.artifact_root={root / 'art'}"]


def _write_text(root: Path, tokens: int, name: str) -> Path:
    """UTF-8 text of the first ``tokens`` training tokens of the smoke dataset."""
    cfg = load_config("smoke", [f"paths.data_root={root / 'data'}"], env={})
    data = PreparedDataset.open(dataset_dir(cfg))
    ids = np.concatenate(data.documents("train"))[:tokens]
    path = root / name
    path.write_text(data.tokenizer().decode(ids.tolist()), encoding="utf-8")
    return path


def _targets(name: str, forker: Forker, work: Path, root: Path, args: argparse.Namespace) -> KillTrials:
    cli = _smoke_cli(root)
    if name == "ingest":
        return IngestKills(forker, work, cli, _write_text(root, args.ingest_tokens, "ingest.txt"))
    if name == "generate":
        return GenerateKills(forker, work, cli, _write_text(root, 4000, "generate.txt"), args.new_tokens)
    return TrainKills(forker, work, cli + [a for s in TRAIN_SETS for a in ("--set", s)])


def _run_target(trials: KillTrials, n: int, rng: np.random.Generator, verbose: bool) -> list[Outcome]:
    """Kills until ``n`` commands were really killed (a kill planned after the command ended does not count)."""
    outcomes: list[Outcome] = []
    while sum(o.killed for o in outcomes) < n and len(outcomes) < 2 * n:
        outcome = trials.trial(trials.plan(rng, 1)[0])
        outcomes.append(outcome)
        if verbose or not outcome.consistent or outcome.lost:
            print(f"  {trials.name} #{len(outcomes)}: {'killed' if outcome.killed else 'finished'}, {outcome.detail}",
                  flush=True)
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="kills per target (default: %(default)s)")
    ap.add_argument("--targets", nargs="+", choices=["ingest", "generate", "train"], default=["ingest", "generate", "train"])
    ap.add_argument("--root", type=Path, default=None, help="smoke data/base and work folders (default: a temp folder)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--ingest-tokens", type=int, default=60_000, help="tokens of the ingested text (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generate writes (default: %(default)s)")
    ap.add_argument("--verbose", action="store_true", help="one line per trial")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        root = (args.root or Path(tmp)).resolve()
        work = Path(tempfile.mkdtemp(prefix="work-", dir=root))
        forker = Forker(work / "forker")
        failed = False
        try:
            t0 = time.perf_counter()
            for cmd in (["prepare"], ["pretrain-base"]):
                r = forker.run([cmd[0], *_smoke_cli(root)])
                if r.rc:
                    raise SystemExit(f"`megacontext {cmd[0]}` failed: {r.log[-2000:]}")
            print(f"smoke data and base ready under {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
            rng = np.random.default_rng(args.seed)
            for name in args.targets:
                t0 = time.perf_counter()
                trials = _targets(name, forker, work, root, args)
                outcomes = _run_target(trials, args.trials, rng, args.verbose)
                killed = [o for o in outcomes if o.killed]
                failed |= not all(o.consistent and not o.lost for o in outcomes)
                print(f"{name}: {len(killed)} kills, {sum(o.consistent for o in killed)} {CONSISTENT[name]}, "
                      f"{sum(o.lost for o in killed)} lost commits ({len(outcomes) - len(killed)} more finished "
                      f"before their kill{'' if all(o.consistent for o in outcomes) else ', NOT ALL CONSISTENT'}; "
                      f"reference start-up {trials.startup:.1f} s, work {trials.span:.1f} s; "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            forker.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

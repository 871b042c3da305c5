"""Fault injection for tests/test_faults.py and benchmarks/bench_faults.py (not a test module).

:class:`Forker` is a helper process that imports the CLI and model stack once and runs each
job (a ``megacontext`` command line, or a Python snippet) in a forked child, which it
SIGKILLs after a given delay when asked. A job then starts in well under a second instead
of the 10-20 s a fresh interpreter needs to import torch and transformers, so many kills
fit in a test run. The child is a real process: what a kill leaves on disk is exactly
what it would leave of a ``megacontext`` process. Every child runs with one CPU thread
(``OMP_NUM_THREADS=1``) and offline.

:class:`KillTrials` subclasses (:class:`IngestKills`, :class:`GenerateKills`,
:class:`TrainKills`) make an uninterrupted reference run once, then kill the same command
at chosen moments, reopen or resume what it left, and compare with the reference.
:class:`DiskQuota` makes writes fail with ENOSPC once a number of bytes was written.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from megacontext.checkpoint import CheckpointError, list_checkpoints, open_checkpoint
from megacontext.durable import checksum_ok
from megacontext.errors import TreeError
from megacontext.runtime import SESSION_FILE
from megacontext.tree import MegaContextTree

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "WANDB_MODE": "disabled"}
# The smallest training run that writes every kind of checkpoint file: mid-phase
# checkpoints (optimizer.pt), focus labels (warm_lens) and a LoRA adapter (jt3).
TRAIN_SETS = (
    "train.checkpoint_every=1",
    "train.cycles=1",
    "train.phases.warm_gist.steps=2",
    "train.phases.warm_lens.steps=2",
    "train.phases.jt1.steps=0",
    "train.phases.jt2.steps=0",
    "train.phases.jt3.steps=2",
    "train.labels.candidates=4",
    "train.focus_rounds=2",
    "train.cpu_threads=1",
)
PRELOAD = ("megacontext.cli.data", "megacontext.cli.base", "megacontext.cli.memory", "megacontext.cli.train",
           "megacontext.cli.eval", "megacontext.modules", "megacontext.runtime", "megacontext.training.loop",
           "megacontext.training.pretrain_base", "transformers.models.llama.modeling_llama", "peft", "accelerate",
           "pyarrow.parquet")

_ZYGOTE = r"""
import importlib, json, os, signal, sys, time, traceback
sys.path[:0] = json.loads(sys.argv[1])
from megacontext.cli import main
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
print("ready", flush=True)


def child(job, log):
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if "argv" in job:
            rc = main(job["argv"])
        else:
            exec(compile(job["code"], "<job>", "exec"), {"__name__": "__job__"})
            rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 70
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def observe(paths):
    out = {}
    for p in paths:
        try:
            with open(p, "rb") as f:
                out[p] = f.read().decode("utf-8", "replace")
        except OSError:
            out[p] = None
    return out


while line := sys.stdin.readline():
    job = json.loads(line)
    marker = job.get("start_when")
    before = stamp(marker) if marker else None
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(job, log)
    os.close(log)
    kill_after = job.get("kill_after")
    deadline = None if kill_after is None or marker else t0 + kill_after
    seen, killed, marked = {}, False, None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if marker and marked is None and stamp(marker) != before:
            marked = time.monotonic() - t0
            deadline = None if kill_after is None else t0 + marked + kill_after
        if deadline is not None and time.monotonic() >= deadline:
            seen = observe(job.get("observe", []))  # committed before the kill, by construction
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.002)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "killed": killed, "seen": seen,
                      "elapsed": time.monotonic() - t0, "marked": marked}), flush=True)
"""


def one_thread_env(**extra: str) -> dict[str, str]:
    """The environment of every process the fault suite starts (one CPU thread, offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGACONTEXT_")}
    return {**env, **ONE_THREAD, **extra}


@dataclass
class JobResult:
    rc: int  # exit status; -9 when killed
    killed: bool
    seen: dict[str, str | None]  # observed files (read just before the kill)
    elapsed: float
    marked: float | None  # when `start_when` first changed (s after the start), if it did
    log: str  # the child's stdout + stderr


class Forker:
    """A process that imports the CLI stack once and forks a child per job (see module docstring).

    ``paths``: prepended to the helper's sys.path; ``preload``: more modules to import up front.
    The helper starts at once; the first job waits until it is ready.
    """

    def __init__(self, workdir: Path, paths: tuple[str, ...] = (), preload: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.workdir / "forker.log", "w")
        src = str(Path(__file__).resolve().parents[1] / "src")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, json.dumps([src, *paths]), json.dumps([*PRELOAD, *preload])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=one_thread_env(),
        )
        self._ready = False
        self._jobs = 0

    def run(self, argv: list[str] | None = None, code: str | None = None, kill_after: float | None = None,
            observe: tuple[Path, ...] = (), start_when: Path | None = None) -> JobResult:
        """Run one job (a CLI command line, or Python code) to its end, or SIGKILL it ``kill_after`` s
        after it started, first reading the ``observe`` files. With ``start_when``, the delay counts
        from the first change of that file (created, replaced or touched) instead."""
        if not self._ready:
            line = self._proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"the fork helper failed to start: {(self.workdir / 'forker.log').read_text()[-3000:]}")
            self._ready = True
        self._jobs += 1
        log = self.workdir / f"job-{self._jobs}.log"
        job: dict[str, Any] = {"log": str(log), "kill_after": kill_after, "observe": [str(p) for p in observe],
                               "start_when": str(start_when) if start_when else None}
        job.update({"argv": argv} if argv is not None else {"code": code})
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fork helper died: {(self.workdir / 'forker.log').read_text()[-3000:]}")
        r = json.loads(reply)
        return JobResult(r["rc"], r["killed"], r["seen"], r["elapsed"], r["marked"], log.read_text(errors="replace"))

    def close(self) -> None:
        """End the helper (it exits when its input closes)."""
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._log.close()


# ------------------------------------------------------------------------ a full disk
class DiskQuota:
    """``open`` for the modules under test: files opened for writing fail with ENOSPC once
    ``left`` bytes (characters, in text mode) were written, after writing the part that fit."""

    def __init__(self, left: int | None = None) -> None:
        self.left = left  # None: no limit

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)
        return _Limited(f, self) if set(mode) & set("wax+") else f


class _Limited:
    """A file whose writes draw on a :class:`DiskQuota`."""

    def __init__(self, f: Any, quota: DiskQuota) -> None:
        self._f = f
        self._quota = quota

    def write(self, data: Any) -> int:
        q = self._quota
        if q.left is not None and len(data) > q.left:
            self._f.write(data[: q.left])
            q.left = 0
            raise OSError(errno.ENOSPC, "No space left on device", self._f.name)
        if q.left is not None:
            q.left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


# ------------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    """One kill: was it killed, is what it left consistent with the reference, was a commit lost."""

    killed: bool
    consistent: bool
    lost: bool
    detail: str


def committed_tokens(meta_text: str | None) -> int:
    """LOD0 length in a metadata.json text (0 when there was none yet)."""
    return json.loads(meta_text)["committed"]["LOD0"] if meta_text else 0


def tree_prefix_problem(path: Path, ref: Path) -> tuple[int, str | None]:
    """(tokens in the tree at ``path``, why it is not an exact prefix of the tree at ``ref`` or None).

    Exact prefix: its tokens are the reference's first ones, and its gists at every level are
    the reference's first ``num_tokens // K**k`` (bit for bit: the same computation).
    """
    try:
        tree = MegaContextTree.open(path)
    except TreeError as e:
        return -1, f"cannot reopen: {e}"
    with tree, MegaContextTree.open(ref) as reference:
        n = tree.num_tokens
        if n > reference.num_tokens or not np.array_equal(tree.tokens(), reference.tokens(0, n)):
            return n, f"its {n} tokens are not a prefix of the reference"
        if tree.gist_version != reference.gist_version:
            return n, f"gist version {tree.gist_version!r} != {reference.gist_version!r}"
        for k in range(1, tree.levels + 1):
            if not torch.equal(tree.gist_range(k), reference.gist_range(k, 0, tree.num_nodes(k))):
                return n, f"its LOD{k} gists differ from the reference's"
    return n, None


def same_tree(path: Path, ref: Path) -> str | None:
    """Why the tree at ``path`` is not the same history as the one at ``ref`` (None when it is)."""
    n, problem = tree_prefix_problem(path, ref)
    with MegaContextTree.open(ref) as reference:
        if problem is None and n != reference.num_tokens:
            problem = f"{n} tokens, the reference has {reference.num_tokens}"
    return problem


def run_problem(run: Path, ref: Path) -> str | None:
    """Why a finished training run differs from the reference run (None: the same results)."""
    dump = lambda rows: json.dumps(rows, sort_keys=True)  # noqa: E731  (NaN-safe comparison)
    summary, reference = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    if dump(summary["validation"]) != dump(reference["validation"]):
        return "validation results differ"
    if summary["phases_done"] != reference["phases_done"]:
        return f"phases {summary['phases_done']} != {reference['phases_done']}"
    final, final_ref = (r / "checkpoints" / reference["phases_done"][-1] for r in (run, ref))
    for f in sorted(p.relative_to(final_ref) for p in final_ref.rglob("*.safetensors")):
        a, b = load_file(final / f), load_file(final_ref / f)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return f"final weights {f} differ"
    if (run / "telemetry.jsonl").read_text() != (ref / "telemetry.jsonl").read_text():
        return "telemetry differs"
    return None


# ------------------------------------------------------------------------ kill trials
@dataclass(frozen=True)
class Kill:
    """When to kill: ``delay`` seconds after the start, or after the work began (``at_work``)."""

    delay: float
    at_work: bool

    def __str__(self) -> str:
        return f"{self.delay:.2f}s into the {'work' if self.at_work else 'start-up'}"


class KillTrials(ABC):
    """Kill one command at chosen moments and check what it leaves against an uninterrupted run.

    The work begins when the file :meth:`marker` names first changes; the uninterrupted
    reference run measures the start-up (until then) and the work (after it).
    """

    name = ""

    def __init__(self, forker: Forker, work: Path, cli: list[str]) -> None:
        self.forker = forker
        self.work = Path(work)
        self.cli = cli  # --config/--set arguments of every command
        self.startup = self.span = 0.0  # seconds, measured by :meth:`reference`
        self.trials = 0

    @abstractmethod
    def marker(self, target: Path) -> Path:
        """The file whose first change means the work began."""

    @abstractmethod
    def command(self, target: Path) -> list[str]:
        """The command line that writes ``target``."""

    @abstractmethod
    def trial(self, when: Kill) -> Outcome:
        """Kill the command ``when``, check what it left, then reopen or resume and check again."""

    def cmd(self, *argv: str) -> JobResult:
        """Run a command to its end; RuntimeError unless it succeeds."""
        r = self.forker.run([argv[0], *self.cli, *argv[1:]])
        if r.rc != 0:
            raise RuntimeError(f"`megacontext {' '.join(argv)}` failed (rc {r.rc}): {r.log[-3000:]}")
        return r

    def reference(self, target: Path) -> None:
        """The uninterrupted run into ``target``; measures its start-up and work spans."""
        r = self.forker.run(self.command(target), start_when=self.marker(target))
        if r.rc != 0 or r.marked is None:
            raise RuntimeError(f"the reference {self.name} failed (rc {r.rc}): {r.log[-3000:]}")
        self.startup, self.span = r.marked, r.elapsed - r.marked

    def plan(self, rng: np.random.Generator, n: int) -> list[Kill]:
        """``n`` kill moments: a quarter during the start-up, the rest spread over the work."""
        return [Kill(float(rng.uniform(0, self.startup)), False) if rng.random() < 0.25
                else Kill(float(rng.uniform(0, 0.95 * self.span)), True) for _ in range(n)]

    def kill(self, target: Path, when: Kill, observe: Path) -> tuple[JobResult, str | None]:
        """Run the command into ``target`` and kill it ``when``; (result, ``observe`` as read just before)."""
        r = self.forker.run(self.command(target), kill_after=when.delay, observe=(observe,),
                            start_when=self.marker(target) if when.at_work else None)
        return r, r.seen.get(str(observe))


class IngestKills(KillTrials):
    """``megacontext ingest`` of a long text into a new tree, killed; then the rest is appended."""

    name = "ingest"
    _REST = """
from pathlib import Path
from megacontext.config import load_config
from megacontext.modules import Modules
from megacontext.runtime import open_or_create_tree
cfg = load_config({config!r}, {sets!r})
modules = Modules.load(cfg, "none")
ids = modules.base.tokenizer.encode(Path({text!r}).read_text(encoding="utf-8"), add_special_tokens=False)
with open_or_create_tree(cfg, modules, Path({tree!r}), create=True) as tree:
    for i in range(tree.num_tokens, len(ids), 8192):  # the chunks of `ingest`, from where it stopped
        tree.append(ids[i : i + 8192])
"""

    def __init__(self, forker: Forker, work: Path, cli: list[str], text: Path) -> None:
        super().__init__(forker, work, cli)
        self.text = text
        self.ref = self.work / "ingest-ref"
        self.reference(self.ref)

    def marker(self, target: Path) -> Path:
        return target / "metadata.json"  # the new tree's first commit

    def command(self, target: Path) -> list[str]:
        return ["ingest", *self.cli, "--tree", str(target), "--input", str(self.text), "--checkpoint", "none"]

    def trial(self, when: Kill) -> Outcome:
        self.trials += 1
        path = self.work / f"ingest-{self.trials}"
        r, meta = self.kill(path, when, path / "metadata.json")
        seen = committed_tokens(meta)
        if (path / "metadata.json").exists():
            n, problem = tree_prefix_problem(path, self.ref)
        else:
            n, problem = 0, None  # killed before the new tree's first commit: nothing was committed
        if problem is None:
            sets = [self.cli[i + 1] for i, a in enumerate(self.cli) if a == "--set"]
            rest = self.forker.run(code=self._REST.format(config=self.cli[1], sets=sets, text=str(self.text), tree=str(path)))
            problem = f"appending the rest failed: {rest.log[-2000:]}" if rest.rc else same_tree(path, self.ref)
        shutil.rmtree(path, ignore_errors=True)
        return Outcome(r.killed, problem is None, seen > n, f"kill {when}: {n} tokens kept; {problem or 'ok'}")


class GenerateKills(KillTrials):
    """``megacontext generate`` on a tree with a saved session, killed; then generate again."""

    name = "generate"
    _ARGS = ("--prompt", "def f(", "--checkpoint", "none", "--json")

    def __init__(self, forker: Forker, work: Path, cli: list[str], text: Path, new_tokens: int) -> None:
        super().__init__(forker, work, cli)
        self.base = self.work / "generate-base"
        self.cmd("ingest", "--tree", str(self.base), "--input", str(text), "--checkpoint", "none")
        self.cmd("generate", "--tree", str(self.base), *self._ARGS, "--max-new-tokens", "2")  # saves a session
        with MegaContextTree.open(self.base) as tree:
            self.base_tokens = tree.num_tokens
        self.new_tokens = str(new_tokens)
        self.ref = self.work / "generate-ref"
        shutil.copytree(self.base, self.ref)
        self.reference(self.ref)

    def marker(self, target: Path) -> Path:
        return target / "metadata.json"  # replaced by the prompt's first commit

    def command(self, target: Path) -> list[str]:
        return ["generate", *self.cli, "--tree", str(target), *self._ARGS, "--max-new-tokens", self.new_tokens]

    def trial(self, when: Kill) -> Outcome:
        self.trials += 1
        path = self.work / f"generate-{self.trials}"
        shutil.copytree(self.base, path)
        r, meta = self.kill(path, when, path / "metadata.json")
        seen = committed_tokens(meta)
        n, problem = tree_prefix_problem(path, self.ref)
        if problem is None and n < self.base_tokens:
            problem = f"{n} tokens, fewer than the {self.base_tokens} of the history before"
        if problem is None and not checksum_ok(json.loads((path / SESSION_FILE).read_text())):
            problem = f"{SESSION_FILE} was left torn"
        if problem is None:
            again = self.forker.run(["generate", *self.cli, "--tree", str(path), *self._ARGS, "--max-new-tokens", "2"])
            if again.rc or ": warning: " in again.log:
                problem = f"generate after the kill: rc {again.rc}: {again.log[-2000:]}"
            else:
                with MegaContextTree.open(path) as tree, MegaContextTree.open(self.ref) as reference:
                    if not np.array_equal(tree.tokens(0, n), reference.tokens(0, n)):
                        problem = "generate after the kill changed the history it found"
        shutil.rmtree(path, ignore_errors=True)
        return Outcome(r.killed, problem is None, seen > n,
                       f"kill {when}: {n - self.base_tokens} new tokens kept; {problem or 'ok'}")


class TrainKills(KillTrials):
    """``megacontext train`` (a checkpoint after every step), killed; then ``--resume latest``."""

    name = "train"

    def __init__(self, forker: Forker, work: Path, cli: list[str]) -> None:
        super().__init__(forker, work, cli)
        self.ref = self.work / "train-ref"
        self.reference(self.ref)

    def marker(self, target: Path) -> Path:
        return target / "checkpoints" / "latest"  # the first checkpoint

    def command(self, target: Path) -> list[str]:
        return ["train", *self.cli, "--out", str(target), "--no-progress"]

    def trial(self, when: Kill) -> Outcome:
        self.trials += 1
        run = self.work / f"train-{self.trials}"
        r, seen = self.kill(run, when, run / "checkpoints" / "latest")
        seen = (seen or "").strip()
        lost = False
        if seen:
            try:
                open_checkpoint(run / "checkpoints" / seen)
            except CheckpointError:
                lost = True
        problem = None
        if r.killed:
            resume = ["--resume", "latest"] if list_checkpoints(run / "checkpoints") else []
            again = self.forker.run([*self.command(run), *resume])
            lost |= "trying the previous checkpoint" in again.log  # it fell back past a committed checkpoint
            if again.rc:
                problem = f"resume failed (rc {again.rc}): {again.log[-2000:]}"
        elif r.rc:
            problem = f"the run failed (rc {r.rc}): {r.log[-2000:]}"
        problem = problem or run_problem(run, self.ref)
        shutil.rmtree(run, ignore_errors=True)
        return Outcome(r.killed, problem is None, lost, f"kill {when} (after {seen or 'no checkpoint'}); {problem or 'ok'}")

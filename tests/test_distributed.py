"""Data-parallel training (#14 item 5): the smoke training under ``accelerate launch`` with two
CPU processes (gloo): the same trainable weights in every process after every phase, step
losses averaged over the processes, every file written once, and ``--resume latest``.

Two launches (about 15 s of start-up each: the launcher, then both processes import torch and
transformers): one uninterrupted run, and a copy of it cut back to a mid-phase checkpoint —
what a SIGKILL there leaves (tests/test_training.py kills for real) — resumed. What only the
main process does (validation, the run folder's lock) is checked in two processes forked from
this one and joined over gloo, as ``accelerate launch`` would start them (no start-up cost)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import PartialState
from safetensors.torch import load_file

from megacontext.base_model import BaseModel
from megacontext.checkpoint import list_checkpoints, open_checkpoint, order_key
from megacontext.cli.train import locked_run
from megacontext.config import derive_seed
from megacontext.data import prepare_dataset
from megacontext.errors import MegaContextError
from megacontext.modules import Modules
from megacontext.training.loop import _sampler, cpu_threads, make_optimizer, on_main, schedule, trainable_version
from megacontext.training.phases import PHASE_BY_NAME

from conftest import SHORT_RUN_SETS, smoke_config

SETS = ("train.cycles=1", *SHORT_RUN_SETS)  # one short cycle (mid-phase checkpoints to resume from)
PROCESSES = 2
SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(roots: dict[str, str], out: Path, *args: str) -> str:
    """``accelerate launch --multi_gpu --num_processes 2 -m megacontext train ...`` (its stdout):
    with ``base.device: cpu`` (or no GPU) the processes train on CPU over gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "megacontext", "train", "--config", "smoke", "--out", str(out), "--no-progress", *args]
    for s in (f"paths.data_root={roots['data_root']}", f"paths.artifact_root={roots['artifact_root']}", *SETS):
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def cfg(smoke_roots, smoke_base):
    return smoke_config(smoke_roots, *SETS)


@pytest.fixture(scope="module")
def run_a(smoke_roots, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "A"
    return out, launch(smoke_roots, out)


def _rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_two_processes_keep_one_set_of_weights_and_write_once(run_a, cfg):
    out, stdout = run_a
    assert stdout.count("checkpoint  ") == 1  # one process reports
    plan = schedule(cfg.train)
    names = [p.name for p in plan]
    ckpts = out / "checkpoints"
    expected = set(names) | {f"{n}-s00001" for n in names} | {"latest"}
    assert {p.name for p in ckpts.iterdir()} == expected  # no temp or stale folders: one writer
    assert (ckpts / "latest").read_text().strip() == names[-1]
    assert (out / "writer.lock").read_text() == ""  # taken (by the main process) and released
    telemetry = _rows(out, "telemetry.jsonl")
    assert [(r["phase"], r["step"]) for r in telemetry] == [(p.phase, s) for p in plan for s in range(p.steps)]
    lrs = []  # the schedule of one process: the learning rate moves once per step, not once per process
    for p in plan:
        optimizer, scheduler = make_optimizer([torch.nn.Parameter(torch.zeros(1))], p.spec.settings(cfg).lr,
                                              cfg.train.optim, p.steps)
        for _ in range(p.steps):
            optimizer.step()
            scheduler.step()
            lrs.append(scheduler.get_last_lr()[0])
    assert [r["metrics"]["lr"] for r in telemetry] == lrs
    validation = _rows(out, "validation.jsonl")
    assert [r["name"] for r in validation] == names
    base = BaseModel.from_config(cfg)
    m = Modules.fresh(cfg, base, lora=True)
    for row in validation:  # after every phase: the same weights in both processes, and in its checkpoint
        versions = row["process_weights"]
        assert len(versions) == PROCESSES and len(set(versions)) == 1, row["name"]
        m.load_checkpoint(open_checkpoint(ckpts / row["name"]))
        assert trainable_version(m) == versions[0], row["name"]


def test_step_losses_are_the_mean_over_processes(run_a, cfg):
    """The first step (fresh modules) recomputed here on each process's share of the windows."""
    out, _ = run_a
    logged = _rows(out, "telemetry.jsonl")[0]
    assert (logged["phase"], logged["step"]) == ("warm_gist", 0)
    plan = schedule(cfg.train)[0]
    base = BaseModel.from_config(cfg)
    m = Modules.fresh(cfg, base, lora=True)
    m.set_trainable("gistnet")
    docs = prepare_dataset(cfg, progress=False).documents("train")
    sampler = _sampler(SimpleNamespace(cfg=cfg, train_docs=docs, modules=m), plan)
    losses = []
    with cpu_threads(1):
        for rank in range(PROCESSES):
            rng = np.random.default_rng(derive_seed(cfg.seed, 0, "warm_gist", 0))
            torch.manual_seed(derive_seed(cfg.seed, 0, "warm_gist", 0, "torch"))
            windows = sampler.batch(0, cfg.train.batch_size)[rank::PROCESSES]
            losses.append(PHASE_BY_NAME["warm_gist"].step(m, cfg, windows, rng).metrics["loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # the two shards differ...
    assert logged["metrics"]["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)  # ...and are averaged


def test_resume_latest_in_two_processes_reproduces_the_run(run_a, smoke_roots, tmp_path):
    out_a, _ = run_a
    out_b = tmp_path / "B"
    shutil.copytree(out_a, out_b)
    cut = "c1-jt2-s00001"  # killed after this checkpoint: the later ones never written, telemetry runs on
    ckpts = out_b / "checkpoints"
    for p in list_checkpoints(ckpts):
        if order_key(p.name) > order_key(cut):
            shutil.rmtree(p)
    (ckpts / "latest").write_text(cut + "\n")
    (out_b / "summary.json").unlink()
    launch(smoke_roots, out_b, "--resume", "latest")
    assert {p.name for p in ckpts.iterdir()} == {p.name for p in (out_a / "checkpoints").iterdir()}
    assert _rows(out_b, "validation.jsonl") == _rows(out_a, "validation.jsonl")  # process_weights included
    assert (out_b / "telemetry.jsonl").read_text() == (out_a / "telemetry.jsonl").read_text()
    final_a, final_b = out_a / "checkpoints" / "c1-jt3", ckpts / "c1-jt3"
    for f in ("gistnet.safetensors", "lensnet.safetensors", "lora/adapter_model.safetensors"):
        ta, tb = load_file(final_a / f), load_file(final_b / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f


def in_two_processes(body, *args) -> list:
    """``body(*args)`` in two processes forked from this one and joined over gloo (the
    environment ``accelerate launch`` gives them): what each returned, or ("raised", type
    name, message), by rank."""
    fork, port = multiprocessing.get_context("fork"), _free_port()
    results = fork.Queue()

    def child(rank: int) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(PROCESSES),
                          LOCAL_WORLD_SIZE=str(PROCESSES), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        PartialState._reset_state()  # this process's own place, not the parent's (alone)
        try:
            out = body(*args)
        except Exception as e:  # reported to the parent
            out = ("raised", type(e).__name__, str(e))
        torch.distributed.barrier()  # neither leaves while the other still talks to it
        results.put((rank, out))

    children = [fork.Process(target=child, args=(rank,)) for rank in range(PROCESSES)]
    for c in children:
        c.start()
    try:
        got = dict(results.get(timeout=60) for _ in children)  # a process left waiting: no answer
    finally:
        for c in children:
            c.join(timeout=10)
            if c.is_alive():
                c.kill()
    return [got[rank] for rank in range(PROCESSES)]


def _validate_on_main() -> tuple:
    calls = []

    def validated() -> dict[str, float]:  # a result that differs per process, as GPU floats may
        calls.append(PartialState().process_index)
        return {"loss_megacontext": 2.0 + PartialState().process_index}

    def fails() -> None:
        raise MegaContextError("validation failed")

    row = on_main(PartialState(cpu=True), validated)
    try:
        on_main(PartialState(), fails)
    except MegaContextError as e:
        return calls, row, str(e)
    return calls, row, None


def test_validation_runs_once_and_every_process_gets_its_row():
    """Every process appends the same row (the plateau decision it drives is the same in all)."""
    (calls0, row0, err0), (calls1, row1, err1) = in_two_processes(_validate_on_main)
    assert (calls0, calls1) == ([0], [])  # validated once, by the main process
    assert row0 == row1 == {"loss_megacontext": 2.0}
    assert err0 == err1 == "validation failed"  # its failure stops every process, none left waiting


def _enter_run(cfg, out: Path) -> str:
    with locked_run(cfg, str(out), None):
        return "entered"


def test_a_held_run_folder_stops_every_process_with_one_message(cfg, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = "import sys, time; from pathlib import Path; from megacontext.lock import WriterLock; " \
           "lock = WriterLock(Path(sys.argv[1]), 'run'); print('locked', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        main, other = in_two_processes(_enter_run, cfg, out)
    finally:
        holder.kill()
        holder.wait()
    assert main[:2] == ("raised", "LockedError") and other[:2] == ("raised", "MegaContextError")
    assert main[2] == other[2] and f"in use by process {holder.pid}" in main[2]

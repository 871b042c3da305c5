"""`megacontext train`: warm start, then cycles of JT1 -> JT2 -> JT3 (spec §4).

Read :func:`train` top to bottom. The schedule is a flat list of phases::

    c0 warm_gist, c0 warm_lens, c1 jt1, c1 jt2, c1 jt3, c2 jt1, ...

Each phase builds an AdamW over ONLY its owner's parameters (linear warmup + cosine), runs
its steps under ``accelerate`` (windows and every stochastic choice of step ``s`` come from
``derive_seed(seed, cycle, phase, s)``), then validates (loss@H at the budget for
megacontext / recency / reference, swap rate, residency) and checkpoints. Mid-phase
checkpoints every ``train.checkpoint_every`` steps make a SIGKILL cost at most that many
steps; ``--resume`` replays the rest bit-identically on CPU.

Data parallelism (``accelerate launch``): each process takes an equal share of every step's
windows (and of a lens phase's label steps) and gradients are averaged explicitly before the
step — the modules are not DDP-wrapped because which one trains flips between phases. Step
metrics are averaged over the processes; after every phase the processes check that they
hold the same trainable weights. Only the main process validates (:func:`on_main`: every
process gets its row, so all take the same plateau decision) and writes: labels (gathered to
it), telemetry, checkpoints, the run folder's lock (``cli.train.locked_run``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch import distributed

from megacontext.base_model import BaseModel, resolve_device
from megacontext.checkpoint import (
    Checkpoint,
    CheckpointWarning,
    checkpoint_name,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from megacontext.config import Config, OptimConfig, TrainConfig, derive_seed, dump_yaml
from megacontext.data import TaskMixture, Window, WindowSampler, prepare_dataset
from megacontext.data.tasks import TASKS
from megacontext.durable import sha256_file
from megacontext.errors import MegaContextError
from megacontext.modules import Modules
from megacontext.telemetry import Telemetry
from megacontext.training.labels import (
    LABELS,
    SNAPSHOTS,
    LabelRows,
    LensExample,
    Snapshot,
    read_labels,
    write_labels,
)
from megacontext.training.phases import PHASE_BY_NAME, PHASES, Phase, label_step, lens_examples, lens_step
from megacontext.training.validation import validate
from megacontext.weights import module_version


# ------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class PhasePlan:
    cycle: int  # 0 = warm start
    phase: str  # a name of config.PHASE_NAMES
    steps: int

    @property
    def name(self) -> str:
        return checkpoint_name(self.cycle, self.phase)

    @property
    def spec(self) -> Phase:
        return PHASE_BY_NAME[self.phase]


def schedule(t: TrainConfig) -> list[PhasePlan]:
    """Every phase with at least one step, in training order: the warm start, then cycles."""
    steps = {p.name: getattr(t.phases, p.name).steps for p in PHASES}
    plan = [PhasePlan(0, p.name, steps[p.name]) for p in PHASES if not p.in_cycle]
    for c in range(1, t.cycles + 1):
        plan += [PhasePlan(c, p.name, steps[p.name]) for p in PHASES if p.in_cycle]
    return [p for p in plan if p.steps > 0]


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, t: OptimConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW + linear warmup (``warmup_fraction`` of the steps) + cosine decay to 0."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    warmup = max(1, round(t.warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plateaued(losses: list[float], patience: int, tolerance: float) -> bool:
    """True when the last ``patience`` cycle-end losses improved on the best before them by
    less than ``tolerance`` (``patience`` 0 never stops)."""
    if patience <= 0 or len(losses) <= patience:
        return False
    return min(losses[-patience:]) > min(losses[:-patience]) - tolerance


# ------------------------------------------------------------------------ state
@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's state.json."""

    done: list[str] = field(default_factory=list)  # names of finished phases
    phase: str = ""  # the unfinished phase (name), "" between phases
    step: int = 0  # steps done in the unfinished phase
    global_step: int = 0
    validation: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per finished phase
    gist_versions: dict[str, str] = field(default_factory=dict)  # phase name -> gist version after it
    telemetry_offsets: dict[str, int] = field(default_factory=dict)
    labels_sha256: dict[str, str] = field(default_factory=dict)  # label file (relative to the run) -> sha256

    def cycle_end_losses(self, plan: list[PhasePlan]) -> list[float]:
        last = {}
        for p in plan:
            if p.cycle > 0:
                last[p.cycle] = p.name
        ends = set(last.values())
        return [row["loss_megacontext"] for row in self.validation if row["name"] in ends]


# ------------------------------------------------------------------------ processes
def processes(cfg: Config) -> PartialState:
    """This process's place among those ``accelerate launch`` started (alone without it). Made
    before the base loads: it gives each process its own GPU (gloo on CPU)."""
    return PartialState(cpu=resolve_device(cfg.base.device).type == "cpu")


def on_main(procs: PartialState | Accelerator, work: Callable[[], Any]) -> Any:
    """``work()`` in the main process only, its (picklable) result sent to every process;
    alone: just ``work()``. A failure there is raised in every process (elsewhere as a
    MegaContextError with its message) rather than leaving them waiting in a collective."""
    if procs.num_processes == 1:
        return work()
    result, failure = None, None
    if procs.is_main_process:
        try:
            result = work()
        except Exception as e:  # re-raised below, once the others have heard of it
            failure = e
    result, message = broadcast_object_list([result, None if failure is None else str(failure)])
    if failure is not None:
        raise failure
    if message is not None:
        raise MegaContextError(message)
    return result


def trainable_version(m: Modules) -> str:
    """Versions of GistNet, LensNet and the LoRA weights (what the processes must agree on)."""
    return "-".join((module_version(m.gistnet), module_version(m.lensnet), m.adapter_version()))


# ------------------------------------------------------------------------ run folder
def resolve_run_dir(cfg: Config, out_dir: str | os.PathLike | None, resume: str | None) -> Path:
    """``--out``; else the run of the ``--resume`` checkpoint; else a new timestamped run
    (the main process's choice, or its error, in every process)."""
    return Path(on_main(processes(cfg), lambda: str(_run_dir(cfg, out_dir, resume))))


def _run_dir(cfg: Config, out_dir: str | os.PathLike | None, resume: str | None) -> Path:
    runs = cfg.artifact_root / "runs"
    if out_dir is not None:
        run_dir = Path(out_dir).expanduser().resolve()
    elif resume not in (None, "latest"):
        run_dir = Path(resume).expanduser().resolve().parent.parent  # type: ignore[arg-type]
    elif resume == "latest":
        found = sorted(p for p in runs.glob("*") if (p / "checkpoints").is_dir()) if runs.is_dir() else []
        if not found:
            raise MegaContextError(f"--resume latest: no run with checkpoints under {runs} (pass --out RUN_DIR)")
        run_dir = found[-1]
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = runs / f"{stamp}-{cfg.fingerprint()[:8]}"
    if resume is None and list_checkpoints(run_dir / "checkpoints"):  # not: only the temp folder of a killed first save
        raise MegaContextError(f"{run_dir} already holds a training run: add --resume latest, or pick another --out")
    return run_dir


# ------------------------------------------------------------------------ one phase
@dataclass
class Context:
    """Everything a phase needs, built once by :func:`train`."""

    cfg: Config
    run_dir: Path
    modules: Modules
    accelerator: Accelerator
    telemetry: Telemetry
    train_docs: list[np.ndarray]
    val_windows: list[Window]
    state: TrainState
    task_windows: list[Window] = field(default_factory=list)  # validation windows of the training tasks
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # validate()'s raw-loss cache


def _sampler(ctx: Context, plan: PhasePlan, *key: Any) -> WindowSampler | TaskMixture:
    """The phase's training windows: corpus windows, mixed with the training tasks in the
    phases ``train.tasks.phases`` lists."""
    t = ctx.cfg.train
    seed = derive_seed(ctx.cfg.seed, plan.cycle, plan.phase, *key)
    corpus = WindowSampler(ctx.train_docs, t.horizon, t.history_min, t.history_max, "random", seed)
    if plan.phase not in t.tasks.phases:
        return corpus
    return TaskMixture(corpus, ctx.train_docs, ctx.modules.base.tokenizer, t.tasks, seed)


def phase_labels(ctx: Context, plan: PhasePlan, regenerate: bool) -> list[list[LensExample]]:
    """LensNet examples per label step of a lens phase, read back from ``deltas/cycle<c>/``.

    Training step ``s`` uses label step ``s // train.labels.reuse``. ``regenerate``: build
    the labels with the current (frozen) GistNet and LensNet first — at the start of every
    LensNet phase; a resumed mid-phase run reads the saved ones.
    """
    cfg, m, acc = ctx.cfg, ctx.modules, ctx.accelerator
    m.set_trainable(None)
    folder = ctx.run_dir / "deltas" / f"cycle{plan.cycle}"
    label_steps = -(-plan.steps // cfg.train.labels.reuse)
    if regenerate:
        sampler = _sampler(ctx, plan, "labels")
        version = m.gist_version()
        mine = range(acc.process_index, label_steps, acc.num_processes)  # every label step, in one process
        made: list[tuple[Snapshot, LabelRows]] = []
        ctx.telemetry.start_phase(f"c{plan.cycle} {plan.phase} labels", len(mine), 0)
        for step in mine:
            rng = np.random.default_rng(derive_seed(cfg.seed, plan.cycle, plan.phase, "labels", step))
            windows = sampler.batch(step, cfg.train.labels.snapshots)
            made += zip(*label_step(m, cfg, windows, rng, plan.cycle, step, plan.spec.in_cycle, version))
            ctx.telemetry.advance()
        ctx.telemetry.end_phase()
        if acc.num_processes > 1:  # to the main process, the writer; stable sort: snapshot order kept
            shares: list[Any] | None = [None] * acc.num_processes if acc.is_main_process else None
            distributed.gather_object(made, shares, dst=0)
            made = sorted((pair for share in shares or [] for pair in share), key=lambda pair: pair[0].step)
        if acc.is_main_process:
            write_labels(folder, [s for s, _ in made], [r for _, r in made])
        acc.wait_for_everyone()
        for name in (SNAPSHOTS, LABELS):
            ctx.state.labels_sha256[str((folder / name).relative_to(ctx.run_dir))] = sha256_file(folder / name)
    snapshots, rows = _read_labels_checked(ctx, folder)
    by_step: list[list[LensExample]] = [[] for _ in range(label_steps)]
    examples = lens_examples(m, cfg, snapshots, rows)
    for s, e in zip(snapshots, examples):
        by_step[s.step].append(e)
    return by_step


def _read_labels_checked(ctx: Context, folder: Path) -> tuple[list[Snapshot], list[LabelRows]]:
    """:func:`read_labels`, after checking each file against the sha256 recorded when it was
    written (saved in every later checkpoint): damaged labels are a clear error, never
    other training data."""
    before = ctx.run_dir / "checkpoints" / ctx.state.done[-1] if ctx.state.done else None
    advice = (f"resume from {before} (the checkpoint before this phase), which makes them again" if before
              else "start the run again")
    for rel, digest in ctx.state.labels_sha256.items():
        f = ctx.run_dir / rel
        if f.parent == folder and f.is_file() and sha256_file(f) != digest:
            raise MegaContextError(f"focus labels {f} fail their checksum (damaged since they were written): {advice}")
    try:
        return read_labels(folder)
    except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException, MegaContextError) as e:
        raise MegaContextError(f"cannot read the focus labels in {folder}: {e}; {advice}") from None


def run_phase(ctx: Context, plan: PhasePlan, resume_from: Checkpoint | None) -> None:
    """Train one phase from ``ctx.state.step``, then validate and checkpoint it."""
    cfg, m, acc, tel, state = ctx.cfg, ctx.modules, ctx.accelerator, ctx.telemetry, ctx.state
    t_start = time.perf_counter()
    phase = plan.spec
    start = state.step if state.phase == plan.name else 0
    examples = phase_labels(ctx, plan, regenerate=start == 0) if phase.step is None else None
    m.set_trainable(phase.owner)
    params = m.parameters_of(phase.owner)
    optimizer, scheduler = make_optimizer(params, phase.settings(cfg).lr, cfg.train.optim, plan.steps)
    if start > 0:
        saved = resume_from.optimizer_state() if resume_from is not None else None
        if saved is None:
            raise MegaContextError(f"checkpoint for {plan.name} step {start} has no optimiser state")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    state.phase, state.step = plan.name, start
    optimizer = acc.prepare(optimizer)  # not the scheduler: accelerate would step it once per process

    sampler = _sampler(ctx, plan)
    tel.start_phase(f"c{plan.cycle} {plan.phase}", plan.steps, start)
    for step in range(start, plan.steps):
        rng = np.random.default_rng(derive_seed(cfg.seed, plan.cycle, plan.phase, step))
        torch.manual_seed(derive_seed(cfg.seed, plan.cycle, plan.phase, step, "torch"))
        optimizer.zero_grad(set_to_none=True)
        if examples is not None:
            batch = examples[step // cfg.train.labels.reuse]
            out = lens_step(m, cfg, batch[acc.process_index :: acc.num_processes])
        else:
            windows = sampler.batch(step, cfg.train.batch_size)[acc.process_index :: acc.num_processes]
            out = phase.step(m, cfg, windows, rng)  # type: ignore[misc]
        acc.backward(out.loss)
        _average_gradients(acc, params)
        grad_norm = acc.clip_grad_norm_(params, cfg.train.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        state.step, state.global_step = step + 1, state.global_step + 1
        metrics = {**_mean_over_processes(acc, out.metrics), "grad_norm": float(grad_norm),
                   "lr": float(scheduler.get_last_lr()[0])}
        tel.log_step(plan.phase, plan.cycle, step, state.global_step, metrics)
        every = cfg.train.checkpoint_every
        if every > 0 and state.step % every == 0 and state.step < plan.steps:
            opt_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            _checkpoint(ctx, checkpoint_name(plan.cycle, plan.phase, state.step), opt_state)
    tel.end_phase()

    m.set_trainable(None)
    traces: list[dict] = []

    def validated() -> dict[str, float]:
        metrics, records = validate(m, cfg, ctx.val_windows, ctx.baselines, ctx.task_windows)
        traces.extend(records)  # the main process's, which it alone writes
        return metrics

    metrics = on_main(acc, validated)  # one validation; every process appends the same row
    version = m.gist_version()
    row = {"cycle": plan.cycle, "phase": plan.phase, "name": plan.name, "steps": plan.steps,
           "gist_version": version, **metrics}
    if acc.num_processes > 1:
        row["process_weights"] = _same_weights_everywhere(acc, m, plan.name)
    tel.log_validation(row, state.global_step)
    tel.log_traces(plan.name, traces)
    state.validation.append(row)
    state.done.append(plan.name)
    state.phase, state.step = "", 0
    state.gist_versions[plan.name] = version
    state.timings[plan.name] = state.timings.get(plan.name, 0.0) + time.perf_counter() - t_start
    _checkpoint(ctx, plan.name, None)


def _average_gradients(acc: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Data parallelism: every gradient becomes its mean over the processes, in one all-reduce
    (no-op in one process). A parameter no window of a process reached counts as a zero
    gradient there; one no process reached keeps no gradient, as in one process."""
    if acc.num_processes == 1:
        return
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=acc.device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
    flat = acc.reduce(torch.cat([reached, *grads]), reduction="sum")
    offset = len(params)
    for p, anywhere in zip(params, flat[: len(params)].tolist()):
        mean = flat[offset : offset + p.numel()] / acc.num_processes
        p.grad = mean.view_as(p).to(p.dtype) if anywhere else None
        offset += p.numel()


def _mean_over_processes(acc: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each step metric's mean over the processes (each saw an equal share of the step's windows)."""
    if acc.num_processes == 1:
        return metrics
    every = gather_object([metrics])
    keys = dict.fromkeys(k for one in every for k in one)
    return {k: float(np.mean([one[k] for one in every if k in one])) for k in keys}


def _same_weights_everywhere(acc: Accelerator, m: Modules, name: str) -> list[str]:
    """:func:`trainable_version` of every process after phase ``name``; a MegaContextError
    when a process's weights differ from the main process's (the replicas drifted apart)."""
    versions = gather_object([trainable_version(m)])
    drifted = [i for i, v in enumerate(versions) if v != versions[0]]
    if drifted:
        raise MegaContextError(f"after {name} the trainable weights of process(es) {drifted} differ from the "
                               f"main process's ({versions}): data-parallel training lost sync")
    return versions


def _checkpoint(ctx: Context, name: str, optimizer_state: dict | None) -> None:
    """Checkpoint ``name`` (main process only) with the telemetry offsets it covers."""
    if not ctx.accelerator.is_main_process:
        return
    ctx.state.telemetry_offsets = ctx.telemetry.offsets()
    m = ctx.modules
    save_checkpoint(
        ctx.run_dir / "checkpoints",
        name,
        gistnet=m.gistnet,
        lensnet=m.lensnet,
        lora=m.lora,
        state=asdict(ctx.state),
        config_text=dump_yaml(ctx.cfg),
        optimizer_state=optimizer_state,
    )


def restore(ckpt: Checkpoint, cfg: Config, m: Modules, telemetry: Telemetry) -> TrainState:
    """Load weights and RNG states, cut telemetry back to the checkpoint, return its state."""
    saved = yaml.safe_load((ckpt.path / "config.yaml").read_text()) or {}
    now = cfg.to_dict()
    for d in (saved, now):  # settings that do not change what is computed
        d.get("train", {}).pop("cycles", None)
        d.pop("paths", None)
        d.pop("wandb", None)
    if saved != now:
        warnings.warn(f"the config differs from the one {ckpt.path.name} was trained with; the run will not replay exactly", stacklevel=2)
    m.load_checkpoint(ckpt)
    ckpt.restore_rng()
    state = TrainState(**ckpt.state)
    telemetry.truncate(state.telemetry_offsets)
    return state


def _task_windows(cfg: Config, val_sampler: WindowSampler, docs: list[np.ndarray], base: BaseModel) -> list[Window]:
    """``validation.task_windows`` windows of each training task that has a share (validation documents)."""
    t, out = cfg.train, []
    for task in TASKS[1:]:  # every training task after "corpus"
        if getattr(t.tasks, task) > 0 and t.validation.task_windows > 0:
            only = dataclasses.replace(t.tasks, passkey=float(task == "passkey"), multikey=float(task == "multikey"))
            mix = TaskMixture(val_sampler, docs, base.tokenizer, only, derive_seed(cfg.seed, "validation", task))
            out += mix.batch(0, t.validation.task_windows)
    return out


# ------------------------------------------------------------------------ entry point
@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch intra-op CPU threads = ``n`` inside the block (0: unchanged); restored after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    cfg: Config,
    out_dir: str | os.PathLike | None = None,
    cycles: int | None = None,
    resume: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Warm start + ``cycles`` x (JT1 -> JT2 -> JT3); returns the run summary (also
    ``RUN_DIR/summary.json``). ``resume``: "latest" or a checkpoint folder."""
    with cpu_threads(cfg.train.cpu_threads):
        return _train(cfg, out_dir, cycles, resume, progress)


def _train(
    cfg: Config, out_dir: str | os.PathLike | None, cycles: int | None, resume: str | None, progress: bool
) -> dict[str, Any]:
    if cycles is not None:
        if cycles < 1:
            raise MegaContextError(f"--cycles must be at least 1, got {cycles}")
        cfg.train.cycles = cycles
    t0 = time.perf_counter()
    accelerator = Accelerator(cpu=resolve_device(cfg.base.device).type == "cpu")  # before the base: its GPU
    run_dir = resolve_run_dir(cfg, out_dir, resume)
    ckpt = None
    if resume is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CheckpointWarning)
            ckpt = resolve_resume(run_dir / "checkpoints", resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and not (run_dir / "config.yaml").exists():
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    t = cfg.train
    for key, n in (("train.batch_size", t.batch_size), ("train.labels.snapshots", t.labels.snapshots)):
        if n % accelerator.num_processes:
            raise MegaContextError(f"{key} ({n}) must be a multiple of the number of processes "
                                   f"({accelerator.num_processes}): each takes an equal share of every step")
    with accelerator.main_process_first():  # the main process prepares the data; the others reuse it
        base = BaseModel.from_config(cfg)
        data = prepare_dataset(cfg, progress=progress)
    val_sampler = WindowSampler(
        data.documents("val"), t.horizon, t.history_min, t.history_max, "random", derive_seed(cfg.seed, "validation")
    )
    modules = Modules.fresh(cfg, base, lora=t.phases.jt3.steps > 0)
    telemetry = Telemetry(run_dir, cfg, progress, writes=accelerator.is_main_process)
    state = restore(ckpt, cfg, modules, telemetry) if ckpt is not None else TrainState()
    ctx = Context(
        cfg=cfg,
        run_dir=run_dir,
        modules=modules,
        accelerator=accelerator,
        telemetry=telemetry,
        train_docs=data.documents("train"),
        val_windows=val_sampler.batch(0, t.validation.windows),
        state=state,
        task_windows=_task_windows(cfg, val_sampler, data.documents("val"), base),
    )

    plan = schedule(t)
    stopped_early = False
    try:
        for p in plan:
            if p.name in state.done:
                continue
            if plateaued(state.cycle_end_losses(plan), t.validation.plateau_patience, t.validation.plateau_tolerance):
                stopped_early = True
                break
            run_phase(ctx, p, ckpt if state.phase == p.name else None)
    finally:
        telemetry.close()

    summary = {
        "run_dir": str(run_dir),
        "validation": state.validation,
        "final": state.validation[-1] if state.validation else {},
        "checkpoint": str(run_dir / "checkpoints" / state.done[-1]) if state.done else None,
        "phases_done": state.done,
        "stopped_early": stopped_early,
        "timings_s": {**state.timings, "this_session": time.perf_counter() - t0},
        "total_phase_s": sum(state.timings.values()),
    }
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    if accelerator.num_processes > 1:  # tear the process group down before exit: gloo's threads
        accelerator.wait_for_everyone()  # alive at interpreter exit can abort a rank (seen once in CI)
        accelerator.end_training()
    return summary

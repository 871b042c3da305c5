"""What ``notebooks/megacontext.ipynb`` runs: the setup console and one call per section.

Each section helper makes the library call its CLI command makes (nothing shells out)
and shows the result the notebook way::

    prepare(cfg)            megacontext prepare        prepare_dataset
    base(cfg)               megacontext pretrain-base  pretrain_base (embedded) / the hub model's files
    train(cfg, resume)      megacontext train          training.loop.train, with a live view
    checkpoints(console)    (Checkpoints & Resume)     the run's checkpoint folders, a picker, "continue"
    evaluate(cfg, run)      megacontext eval           eval.evaluate + write_eval_json
    report(cfg, run)        megacontext report         cli.eval.make_report, plots shown inline

The console (:class:`SetupConsole`, re-exported here) is :mod:`megacontext.cli.notebook_console`.
A front end like the CLI, so it lives beside it; nothing is imported at module level that
would load torch before the console has run.
"""

from __future__ import annotations

import html
import io
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megacontext.cli.notebook_console import (
    CUSTOM,
    LATEST,
    NEW_RUN,
    TOKEN_VARS,
    WANDB_MODES,
    CheckpointInfo,
    SetupConsole,
    StepFailed,
    available_configs,
    checkpoint_table,
    config_rows,
    latest_run,
    list_run_checkpoints,
    step,
)
from megacontext.cli.notebook_console import display_html as _html
from megacontext.cli.notebook_console import display_obj as _display
from megacontext.cli.notebook_console import frame as _frame
from megacontext.config import Config
from megacontext.errors import MegaContextError

__all__ = [
    "CUSTOM", "LATEST", "NEW_RUN", "TOKEN_VARS", "WANDB_MODES", "CheckpointInfo", "SetupConsole", "StepFailed",
    "available_configs", "checkpoint_table", "config_rows", "latest_run", "list_run_checkpoints", "step",
    "prepare", "base", "train", "checkpoints", "CheckpointsPanel", "evaluate", "report", "LiveTraining", "training_figure",
]

LOSS_LINES = (  # validation loss@H series drawn by the live view, (key, label)
    ("loss_megacontext", "megacontext"),
    ("loss_uniform_gists", "uniform_gists"),
    ("loss_recency", "recency"),
    ("loss_reference", "reference"),
)


def _quiet_weight_loading() -> None:
    """No "Loading weights" bar from transformers each time a section loads the base (the
    hub's download bars stay)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ========================================================================== sections
def prepare(cfg: Config):
    """``megacontext prepare``: build, or validate and reuse, the dataset's shards."""
    from megacontext.data import prepare_dataset

    with step("prepare"):
        ds = prepare_dataset(cfg)
    m = ds.manifest
    if ds.status == "reused":
        n = sum(len(s["shards"]) for s in m["splits"].values())
        print(f"reused the valid shards of {ds.name}: {n} shards verified against their checksums in "
              f"{ds.elapsed_s:.1f}s (MEGACONTEXT_FORCE_DATA_REBUILD=1 rebuilds them)")
    else:
        print(f"{ds.status} {ds.name} in {ds.elapsed_s:.1f}s")
    tok = m["tokenizer"]
    print(f"dataset    {ds.root}")
    print(f"tokenizer  {tok['kind']} {tok['name']} (vocab {tok['vocab_size']})")
    _display(_frame([{"split": s, "documents": i["documents"], "tokens": i["tokens"], "shards": len(i["shards"])}
                     for s, i in m["splits"].items()]))
    return ds


def base(cfg: Config) -> dict[str, Any]:
    """``megacontext pretrain-base`` for the embedded base (cached by content); for a hub
    model, fetch its files into the local cache now (``HF_TOKEN`` is used for gated ones)."""
    if cfg.base.name == "embedded":
        from megacontext.training.pretrain_base import pretrain_base

        with step("pretrain-base"):
            s = pretrain_base(cfg)
        if s["status"] == "reused":
            print(f"reused the cached embedded base {s['output_dir']} (same data, recipe and seed)")
        else:
            print(f"trained the embedded base in {s['wall_seconds']:.0f}s: {s['output_dir']}")
        print(f"parameters {s['parameters']:,} | val loss {s['val_loss']:.3f} | "
              f"in-window passkey {s['passkey_accuracy']:.0%}")
        return s
    name = cfg.base.name
    if Path(name).expanduser().is_dir():
        print(f"base: the local model folder {name}")
        return {"status": "local", "output_dir": name}
    from huggingface_hub import snapshot_download

    with step("base"):
        try:
            path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
        except Exception as e:  # the hub's own errors (gated, unknown id, offline without a cache)
            raise StepFailed(f"base: cannot fetch {name} ({type(e).__name__}: {e}); a gated model needs the "
                             "Hugging Face token in the console") from None
    print(f"base: {name} (Hugging Face) in the local cache at {path}; frozen, {cfg.base.dtype} on {cfg.base.device}")
    return {"status": "hub", "output_dir": path}


# ----------------------------------------------------------------- live training view
def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a torn last line
    return rows


def training_figure(run_dir: Path) -> bytes | None:
    """PNG: validation loss@H after each phase (megacontext against uniform_gists, recency and
    the reference), and the training loss per step of the latest phase, one line per cycle;
    read from the run's validation.jsonl / telemetry.jsonl."""
    from matplotlib.figure import Figure

    val = _read_jsonl(Path(run_dir) / "validation.jsonl")
    tel = _read_jsonl(Path(run_dir) / "telemetry.jsonl")
    if not val and not tel:
        return None
    fig = Figure(figsize=(11, 3.4))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    names = [r.get("name", "?") for r in val]
    for key, label in LOSS_LINES[::-1]:  # megacontext last: on top
        ys = [r.get(key) if isinstance(r.get(key), (int, float)) else float("nan") for r in val]
        if any(y == y for y in ys):
            mc = key == "loss_megacontext"
            ax.plot(range(len(ys)), ys, marker="o", label=label, lw=2.4 if mc else 1.2, zorder=3 if mc else 2,
                    ls="-" if mc else "--", ms=5 if mc else 3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("validation loss@H")
    ax.set_title("loss@H after each phase")
    if val:
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], fontsize=8)
    if tel:
        phase = str(tel[-1].get("phase"))
        by_cycle: dict[int, list[tuple[int, float]]] = {}
        for r in tel:
            loss = r.get("metrics", {}).get("loss")
            if str(r.get("phase")) == phase and isinstance(loss, (int, float)):
                by_cycle.setdefault(int(r.get("cycle", 0)), []).append((int(r.get("step", 0)), float(loss)))
        for cycle, points in sorted(by_cycle.items()):
            xs, ys = zip(*sorted(points))
            ax2.plot(xs, ys, marker="." if len(xs) < 50 else None, label=f"cycle {cycle}")
        ax2.set_title(f"{phase}: training loss per step")
        ax2.set_xlabel("step")
        if by_cycle:
            ax2.legend(fontsize=8)
    else:
        ax2.set_axis_off()
    fig.tight_layout()
    return _png(fig)


class LiveTraining:
    """A progress bar over every step of the schedule, the current phase, and the live
    loss@H plot, redrawn after every phase (and at most every ``redraw_s`` during one)."""

    def __init__(self, cfg: Config, redraw_s: float = 10.0) -> None:
        import ipywidgets as w

        from megacontext.training.loop import schedule

        self.plan = schedule(cfg.train)
        self.total = sum(p.steps for p in self.plan)
        self.offsets = {}
        done = 0
        for p in self.plan:
            self.offsets[f"c{p.cycle} {p.phase}"] = done
            done += p.steps
        self.redraw_s = redraw_s
        self.run_dir: Path | None = None
        self._last_draw = 0.0
        self._labels: tuple[int, int] | None = None
        self.bar = w.IntProgress(min=0, max=max(1, self.total), description="training", bar_style="info",
                                 layout=w.Layout(width="640px"))
        self.text = w.HTML()
        self.plot = w.Image(format="png", layout=w.Layout(max_width="980px"))
        self.widget = w.VBox([w.HBox([self.bar, self.text]), self.plot])
        self._phase = ""
        self._phase_total = 0

    # events from the training loop's telemetry
    def opened(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.redraw()

    def phase(self, label: str, total: int, done: int) -> None:
        self._phase, self._phase_total = label, total
        if label.endswith(" labels"):
            self._labels = (done, total)
        else:
            self._labels = None
            self.bar.value = self.offsets.get(label, self.bar.value) + done
        self._say(done)

    def advance(self) -> None:
        if self._labels is not None:
            self._labels = (self._labels[0] + 1, self._labels[1])
            self._say(self._labels[0])

    def step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.bar.value = min(self.bar.max, self.offsets.get(self._phase, 0) + step + 1)
        loss = metrics.get("loss")
        self._say(step + 1, f" | loss {loss:.4g}" if isinstance(loss, (int, float)) else "")
        if time.monotonic() - self._last_draw > self.redraw_s:
            self.redraw()

    def validation(self, row: Mapping[str, Any]) -> None:
        mc, ref = row.get("loss_megacontext"), row.get("loss_reference")
        if isinstance(mc, (int, float)) and isinstance(ref, (int, float)):
            self.text.value = f"&nbsp;{html.escape(str(row.get('name')))} validated: loss@H megacontext {mc:.4f}, reference {ref:.4f}"
        self.redraw()

    def _say(self, done: int, extra: str = "") -> None:
        what = "making focus labels" if self._labels is not None else "step"
        total = self._labels[1] if self._labels is not None else self._phase_total
        self.text.value = (f"&nbsp;<b>{html.escape(self._phase.removesuffix(' labels'))}</b> {what} {done}/{total}"
                           f" &middot; {self.bar.value}/{self.total} steps{html.escape(extra)}")

    def redraw(self) -> bytes | None:
        self._last_draw = time.monotonic()
        png = training_figure(self.run_dir) if self.run_dir is not None else None
        if png:
            self.plot.value = png
        return png

    def finish(self) -> bytes | None:
        """The bar marked done (green) or stopped (orange); returns the final plot."""
        self.bar.bar_style = "success" if self.bar.value >= self.bar.max else "warning"
        return self.redraw()


@contextmanager
def _live_telemetry(view: LiveTraining) -> Iterator[None]:
    """Inside the block, the training loop's Telemetry also drives ``view`` (its own tqdm
    progress is off). The loop builds ``Telemetry(run_dir, cfg, progress, writes=...)`` by name,
    so the subclass is put in its place for the block."""
    from megacontext.telemetry import Telemetry
    from megacontext.training import loop

    class LiveTelemetry(Telemetry):
        def __init__(self, run_dir, cfg, progress=True, writes=True):
            super().__init__(run_dir, cfg, progress=False, writes=writes)
            view.opened(self.run_dir)

        def start_phase(self, label, total, done):
            super().start_phase(label, total, done)
            view.phase(label, total, done)

        def advance(self):
            super().advance()
            view.advance()

        def log_step(self, phase, cycle, step, global_step, metrics):
            super().log_step(phase, cycle, step, global_step, metrics)
            view.step(step, metrics)

        def log_validation(self, row, global_step):
            super().log_validation(row, global_step)
            view.validation(row)

    saved = loop.Telemetry
    loop.Telemetry = LiveTelemetry  # type: ignore[misc]
    try:
        yield
    finally:
        loop.Telemetry = saved  # type: ignore[misc]


def train(cfg: Config, resume: str | None = None, out: str | None = None, live: bool = True) -> dict[str, Any]:
    """``megacontext train [--resume latest|PATH] [--out RUN_DIR]`` with a live progress bar
    and loss@H plot; returns the run summary (``summary["run_dir"]`` is the run folder)."""
    import warnings

    from IPython.display import Image

    from megacontext.checkpoint import CheckpointWarning, resolve_resume
    from megacontext.cli.train import locked_run
    from megacontext.telemetry import format_validation_header, format_validation_row
    from megacontext.training import loop

    _quiet_weight_loading()
    with step("train"):
        if resume is not None:
            run_dir = loop.resolve_run_dir(cfg, out, resume)
            with warnings.catch_warnings():
                warnings.simplefilter("always", CheckpointWarning)
                ckpt = resolve_resume(run_dir / "checkpoints", resume)
            done = ckpt.state.get("done", [])
            where = f" (mid-phase: {ckpt.state['phase']} step {ckpt.state['step']})" if ckpt.state.get("phase") else ""
            todo = [p.name for p in loop.schedule(cfg.train) if p.name not in done]
            print(f"resuming {run_dir.name} from checkpoint {ckpt.path.name}{where}: {len(done)} phases done, "
                  f"global step {ckpt.state.get('global_step', 0)}; "
                  + (f"{len(todo)} phases to go ({', '.join(todo)})" if todo else
                     "nothing left to train (raise train.cycles in the overrides to continue, or pick 'new run')"))
        view = LiveTraining(cfg) if live else None
        if view is not None:
            _display(view.widget)
        with locked_run(cfg, out, resume) as run_dir:
            if resume is None:
                print(f"new run {run_dir}")
            with _live_telemetry(view) if view is not None else _nothing():
                summary = loop.train(cfg, out_dir=run_dir, resume=resume, progress=view is None)
    if view is not None:
        png = view.finish()
        if png:
            _display(Image(data=png))  # a static copy, seen where widgets are not rendered
    if summary["validation"]:
        print(format_validation_header())
        for row in summary["validation"]:
            print(format_validation_row(row))
    final = summary["final"]
    print(f"run         {summary['run_dir']}")
    print(f"checkpoint  {summary['checkpoint']}")
    if final:
        print(f"loss@H      megacontext {final['loss_megacontext']:.4f}  recency {final['loss_recency']:.4f}  "
              f"reference {final['loss_reference']:.4f}  (budget {cfg.focus.budget})")
    if summary["stopped_early"]:
        print("stopped early: validation loss@H plateaued")
    return summary


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ----------------------------------------------------------------- checkpoints & resume
@dataclass
class CheckpointsPanel:
    """What :func:`checkpoints` shows: the listed checkpoints, the "continue" button and the
    output area the training it starts is shown in."""

    infos: list[CheckpointInfo]
    button: Any
    output: Any


def checkpoints(console: SetupConsole) -> CheckpointsPanel:
    """The Checkpoints & Resume section: every checkpoint under the artifact root (newest
    first), the console's resume picker, and a button that continues training from the pick."""
    import ipywidgets as w

    infos = console.refresh_checkpoints()
    if not infos:
        print(f"no checkpoint under {console.artifact_root.value} yet")
    else:
        _display(checkpoint_table(infos))
    out = w.Output()
    go = w.Button(description="Continue training from the pick", button_style="warning", icon="play",
                  layout=w.Layout(width="280px"))

    def clicked(_: Any) -> None:
        with out:
            try:
                train(console.config(), resume=console.resume)
            except StepFailed as e:
                print(e)

    go.on_click(clicked)
    _display(w.VBox([w.HTML("Pick a checkpoint (the same picker as the console's <i>resume from</i>), then "
                            "continue here, or re-run section 3:"),
                     w.HBox([console.resume_picker, go]), out]))
    return CheckpointsPanel(infos, go, out)


# ---------------------------------------------------------------------------- eval
def evaluate(cfg: Config, run_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """``megacontext eval --checkpoint RUN_DIR`` into RUN_DIR/eval.json; shows the tables."""
    from megacontext.eval.evaluate import EvalOptions
    from megacontext.eval.evaluate import evaluate as run_eval
    from megacontext.eval.results import acceptance_lines, write_eval_json
    from megacontext.modules import Modules

    _quiet_weight_loading()
    with step("eval"):
        run = Path(run_dir) if run_dir is not None else latest_run(cfg)
        if run is None:
            raise MegaContextError(f"no trained run under {cfg.artifact_root / 'runs'}: run section 3 first")
        modules = Modules.load(cfg, str(run))
        result = run_eval(cfg, modules, EvalOptions.from_config(cfg), progress=progress)
        path = write_eval_json(result.json, run / "eval.json")
    data = result.json
    rows = [{"budget": r["budget"], "policy": r["policy"], "loss@H": r["loss_at_h"],
             "ΔNLL vs reference": r["delta_nll_vs_reference"], "± s.e. (reference)": r["se"],
             "Δ vs uniform_gists": r["delta_vs_uniform_gists"], "± s.e. (uniform_gists)": r["se_vs_uniform_gists"],
             "swap rate": r.get("swap_rate"), "windows": r["n_windows"]} for r in data["results"]]
    _html(f"<b>loss@H</b> (H = {data['horizon']}, {data['split']} split of <code>{html.escape(str(data['data']))}</code>)")
    _display(_frame(rows))
    for key, title in (("passkey", "passkey accuracy"), ("multikey", "multi-key recall")):
        if data.get(key):
            _html(f"<b>{title}</b> (exact match, by history length and needle depth)")
            _display(_frame([{k: r[k] for k in ("budget", "history_tokens", "depth", "policy", "accuracy", "n")}
                             for r in data[key]]))
    if data.get("ceiling"):
        _html("<b>oracle_focus ceiling</b> (a search that reads the horizon; never a policy)")
        _display(_frame(data["ceiling"]))
    for budget, share in data.get("gap_closed", {}).items():
        print(f"gap closed at W={budget}: " + ("n/a (no recency -> reference gap)" if share is None else f"{100 * share:.1f}%"))
    for line in acceptance_lines(data):
        print(line)
    print(f"wrote {path}")
    return data


def report(cfg: Config, run_dir: str | os.PathLike | None = None) -> Path:
    """``megacontext report --run RUN_DIR``; shows the report's plots inline."""
    from IPython.display import Image, Markdown

    from megacontext.cli.eval import make_report

    _quiet_weight_loading()
    with step("report"):
        run = Path(run_dir) if run_dir is not None else latest_run(cfg)
        if run is None:
            raise MegaContextError(f"no run under {cfg.artifact_root / 'runs'}: run section 3 first")
        path = make_report(cfg, run)
    title = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("![") and "](" in line and title is not None:
            image = run / line[line.index("](") + 2 : line.rindex(")")]
            _display(Markdown(f"**{title}**"))
            _display(Image(filename=str(image)))
        elif line.startswith("_Not available") and title is not None:
            _display(Markdown(f"**{title}**: {line.strip('_')}"))
    print(f"wrote {path}")
    return path

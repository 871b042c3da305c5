"""The notebook's setup console (``notebooks/megacontext.ipynb``, "0. Setup Console").

:class:`SetupConsole` (ipywidgets) sets what the CLI reads from the environment
(``MEGACONTEXT_DATA_ROOT``, ``MEGACONTEXT_ARTIFACT_ROOT``, ``MEGACONTEXT_SEED``,
``MEGACONTEXT_FORCE_DATA_REBUILD``, ``MEGACONTEXT_ENABLE_WANDB`` + ``WANDB_MODE``) and picks
the config, its overrides and the checkpoint to resume from (:func:`list_run_checkpoints`).
The W&B and Hugging Face tokens typed into its password fields go into this process's
environment only (``WANDB_API_KEY``, ``HF_TOKEN``): the field is emptied at once, so the value
is neither kept in the widget (nor in a saved notebook's widget state) nor shown, and nothing
here writes it to a file, a config dump or a log (the config has no field for it).

No torch / transformers here: the console must be able to switch the hub to offline mode
(:func:`megacontext.hub.prefer_offline`) before they load. The sections live in
:mod:`megacontext.cli.notebook`.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from megacontext.config import REPO_CONFIG_DIR, Config, load_config
from megacontext.errors import MegaContextError

TOKEN_VARS = {"wandb": ("WANDB_API_KEY", "W&B API key"), "hf": ("HF_TOKEN", "Hugging Face token")}
WANDB_MODES = ("disabled", "offline", "online")
NEW_RUN = "new"  # resume picker: start a new run
LATEST = "latest"  # resume picker: the newest run's latest valid checkpoint
CUSTOM = "(custom path)"


class StepFailed(Exception):
    """A section stopped on a user-facing problem; the notebook shows its one line, no traceback."""

    def _render_traceback_(self) -> list[str]:  # IPython: what to show instead of a traceback
        return [f"\x1b[31m{self}\x1b[0m"]


@contextmanager
def step(name: str) -> Iterator[None]:
    """One section: MegaContextError (and an interrupt) become a one-line StepFailed;
    MegaContextWarning is printed as one ``warning:`` line, as the CLI does."""
    from megacontext.cli import one_line_warnings

    try:
        with one_line_warnings(name):
            yield
    except MegaContextError as e:
        raise StepFailed(f"{name}: {e}") from None
    except KeyboardInterrupt:
        raise StepFailed(f"{name}: interrupted (checkpoints are kept: pick 'latest' in the console to resume)") from None


def display_obj(obj: Any) -> None:
    from IPython.display import display

    display(obj)


def display_html(text: str) -> None:
    from IPython.display import HTML

    display_obj(HTML(text))


def frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None):
    """A pandas DataFrame of ``rows`` (or, without pandas, an HTML table with the same cells)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        from IPython.display import HTML

        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
        )
        return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


# ============================================================================ configs
def available_configs() -> list[str]:
    """Names of the YAML files in the repo's ``configs/`` (what ``--config NAME`` accepts)."""
    return sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.yaml"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"phases": {"jt1": {"steps": 3}}}}`` -> ``{"train.phases.jt1.steps": 3}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_rows(cfg: Config) -> list[dict[str, Any]]:
    """Every config value with its origin, in precedence order: ``command line`` (the
    console's overrides), ``environment variable X``, the YAML file, ``default``."""

    def rank(origin: str) -> int:
        return 0 if origin == "command line" else 1 if origin.startswith("environment") else 3 if origin == "default" else 2

    rows = [{"key": k, "value": v, "origin": cfg.origins.get(k, "default")} for k, v in flatten(cfg.to_dict()).items()]
    return sorted(rows, key=lambda r: rank(r["origin"]))


def config_html(cfg: Config) -> str:
    """The resolved config as HTML: the values something set, then (folded) the defaults."""

    def table(rows: list[dict[str, Any]]) -> str:
        body = "".join(
            f"<tr><td><code>{html.escape(r['key'])}</code></td><td>{html.escape(json.dumps(r['value']))}</td>"
            f"<td>{html.escape('override (console)' if r['origin'] == 'command line' else str(r['origin']))}</td></tr>"
            for r in rows
        )
        return f"<table><tr><th>key</th><th>value</th><th>origin</th></tr>{body}</table>"

    rows = config_rows(cfg)
    set_rows = [r for r in rows if r["origin"] != "default"]
    default_rows = [r for r in rows if r["origin"] == "default"]
    return (
        f"<b>Resolved config</b> ({html.escape(cfg.source_file)}; precedence: console overrides &gt; "
        f"environment &gt; file &gt; defaults)<br>{table(set_rows)}"
        f"<details><summary>{len(default_rows)} more keys at their defaults</summary>{table(default_rows)}</details>"
    )


# ======================================================================= checkpoints
@dataclass
class CheckpointInfo:
    """One checkpoint folder of a run, as the Checkpoints & Resume table shows it."""

    run: str
    name: str
    path: Path
    cycle: int
    phase: str
    step: int  # steps of the phase done (the phase's length at a phase end)
    global_step: int
    time: datetime
    loss: float | None  # validation loss@H (megacontext) after the phase; None mid-phase
    latest: bool  # the run's ``checkpoints/latest`` names it

    def row(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "checkpoint": self.name + (" (latest)" if self.latest else ""),
            "phase": self.phase,
            "cycle": self.cycle,
            "step": self.step,
            "global step": self.global_step,
            "time": self.time.strftime("%Y-%m-%d %H:%M:%S"),
            "val loss@H": self.loss,
        }

    def label(self) -> str:
        loss = f", val loss@H {self.loss:.4f}" if self.loss is not None else ""
        return f"{self.run} / {self.name} (step {self.step}, {self.time:%m-%d %H:%M}{loss})"


def _info(run_dir: Path, path: Path, latest_name: str | None) -> CheckpointInfo:
    from megacontext.checkpoint import CHECKSUMS, order_key
    from megacontext.config import PHASE_NAMES

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    cycle, phase_index, mid = order_key(path.name)  # type: ignore[misc]  # listed folders have checkpoint names
    row = next((r for r in state.get("validation", []) if r.get("name") == path.name), None)
    loss = row.get("loss_megacontext") if row else None
    stamp_file = path / CHECKSUMS if (path / CHECKSUMS).is_file() else path
    return CheckpointInfo(
        run=run_dir.name,
        name=path.name,
        path=path,
        cycle=cycle,
        phase=PHASE_NAMES[phase_index],
        step=int(mid) if mid != float("inf") else int(row.get("steps", 0)) if row else 0,
        global_step=int(state.get("global_step", 0)),
        time=datetime.fromtimestamp(stamp_file.stat().st_mtime),
        loss=float(loss) if isinstance(loss, (int, float)) and loss == loss else None,
        latest=path.name == latest_name,
    )


def list_run_checkpoints(artifact_root: str | os.PathLike) -> list[CheckpointInfo]:
    """Every checkpoint under ``<artifact_root>/runs``, newest first: the newest run first (run
    folders are named by start time, which is also what ``--resume latest`` picks), and inside a
    run the latest in training order first. Unverified (resuming verifies checksums)."""
    from megacontext.checkpoint import LATEST as LATEST_FILE
    from megacontext.checkpoint import list_checkpoints

    runs = Path(artifact_root) / "runs"
    if not runs.is_dir():
        return []
    out: list[CheckpointInfo] = []
    for run_dir in sorted((p for p in runs.iterdir() if (p / "checkpoints").is_dir()), reverse=True):
        root = run_dir / "checkpoints"
        pointer = root / LATEST_FILE
        latest_name = pointer.read_text(encoding="ascii", errors="replace").strip() if pointer.is_file() else None
        out += [_info(run_dir, p, latest_name) for p in reversed(list_checkpoints(root))]
    return out


def checkpoint_table(infos: Sequence[CheckpointInfo]):
    """The Checkpoints & Resume table (a DataFrame): run, checkpoint, phase, cycle, step, time, loss."""
    return frame([i.row() for i in infos])


def latest_run(cfg: Config) -> Path | None:
    """The newest run folder with checkpoints under the artifact root (what ``latest`` means)."""
    runs = cfg.artifact_root / "runs"
    found = sorted(p for p in runs.glob("*") if (p / "checkpoints").is_dir()) if runs.is_dir() else []
    return found[-1] if found else None


# =========================================================================== console
def _config_wandb_mode(source: str) -> str:
    """The W&B mode a config file asks for (``disabled`` unless its ``wandb.enabled``)."""
    try:
        cfg = load_config(source, env={})
    except MegaContextError:
        return "disabled"
    return cfg.wandb.mode if cfg.wandb.enabled else "disabled"


class SetupConsole:
    """The notebook's "0. Setup Console": config, storage roots, W&B, tokens, seed, data
    rebuild, overrides and the checkpoint to resume from; "Apply" writes the environment
    and shows the resolved config with the origin of every value.

    The constructor's arguments are the initial widget values (a parameterised run passes
    them; ``""`` means: what the environment says, else the default). ``resume``: ``"auto"``
    (``latest`` when a checkpoint exists, else a new run), ``"new"``, ``"latest"`` or a
    checkpoint folder. ``wandb_key`` / ``hf_token`` are typed-in token values: they are
    applied like the password fields' contents and never kept.
    """

    def __init__(
        self,
        config: str = "default",
        data_root: str = "",
        artifact_root: str = "",
        wandb_mode: str = "",
        seed: str | int = "",
        force_rebuild: bool | None = None,
        resume: str | None = "auto",
        overrides: Sequence[str] | str = (),
        wandb_key: str = "",
        hf_token: str = "",
    ) -> None:
        import ipywidgets as w

        env = os.environ
        self.cfg: Config | None = None
        names = available_configs()
        custom = config not in names
        wide = w.Layout(width="640px")
        style = {"description_width": "150px"}
        self.config_name = w.Dropdown(options=[*names, CUSTOM], value=CUSTOM if custom else config,
                                      description="config", style=style)
        self.config_path = w.Text(value=str(config) if custom else "", placeholder="path/to/config.yaml",
                                  description="custom YAML path", style=style, layout=wide)
        self.data_root = w.Text(value=data_root or env.get("MEGACONTEXT_DATA_ROOT") or os.path.abspath("data"),
                                description="MEGACONTEXT_DATA_ROOT", style=style, layout=wide)
        self.artifact_root = w.Text(
            value=artifact_root or env.get("MEGACONTEXT_ARTIFACT_ROOT") or os.path.abspath("artifacts"),
            description="MEGACONTEXT_ARTIFACT_ROOT", style=style, layout=wide)
        roots_hint = w.HTML(
            "<small>Point both roots at <b>durable storage</b> (a mounted Google Drive folder such as "
            "<code>/content/drive/MyDrive/megacontext</code>, a network volume): a VM reset then keeps the "
            "shards, the base and every checkpoint, and training resumes where it stopped.</small>")
        flag = env.get("MEGACONTEXT_ENABLE_WANDB", "").lower()
        self._wandb_follows_config = not wandb_mode and flag == ""
        if not wandb_mode:
            if flag == "":
                wandb_mode = _config_wandb_mode(config)
            else:
                wandb_mode = env.get("WANDB_MODE", "offline") if flag in ("1", "true", "yes", "on") else "disabled"
        self.wandb_mode = w.ToggleButtons(options=list(WANDB_MODES),
                                          value=wandb_mode if wandb_mode in WANDB_MODES else "disabled",
                                          description="W&B", style=style)
        self.wandb_mode.observe(self._wandb_touched, names="value")
        self.tokens: dict[str, Any] = {}
        self.token_status: dict[str, Any] = {}
        for key, typed in (("wandb", wandb_key), ("hf", hf_token)):
            var, label = TOKEN_VARS[key]
            self.tokens[key] = w.Password(value="", placeholder="paste, then Apply (kept for this session only)",
                                          description=label, style=style, layout=w.Layout(width="520px"))
            self.token_status[key] = w.HTML()
            if typed:
                self.tokens[key].value = typed
        self.seed = w.Text(value=str(seed) if seed not in ("", None) else env.get("MEGACONTEXT_SEED", ""),
                           placeholder="the config's seed", description="MEGACONTEXT_SEED", style=style)
        if force_rebuild is None:
            force_rebuild = env.get("MEGACONTEXT_FORCE_DATA_REBUILD", "").lower() in ("1", "true", "yes", "on")
        self.force_rebuild = w.Checkbox(value=bool(force_rebuild), indent=False,
                                        description="MEGACONTEXT_FORCE_DATA_REBUILD (rebuild shards even when valid ones exist)",
                                        layout=w.Layout(width="640px"))
        if not isinstance(overrides, str):
            overrides = "\n".join(overrides)
        self.overrides = w.Textarea(value=overrides, placeholder="section.key=value, one a line (as --set)",
                                    description="overrides", style=style, layout=w.Layout(width="640px", height="90px"))
        self.resume_picker = w.Dropdown(description="resume from", style=style, layout=wide)
        self.refresh_button = w.Button(description="refresh", icon="refresh", layout=w.Layout(width="100px"))
        self.refresh_button.on_click(lambda _: self.refresh_checkpoints())
        self.apply_button = w.Button(description="Apply", button_style="primary", icon="check")
        self.apply_button.on_click(lambda _: self.apply(raise_errors=False, echo=False))
        self.status = w.HTML()
        self.resolved = w.HTML()
        self.config_name.observe(lambda _: self._config_changed(), names="value")
        self.artifact_root.observe(lambda _: self.refresh_checkpoints(), names="value")
        self._show_custom()
        self.refresh_checkpoints(initial=NEW_RUN if resume is None else resume)
        self.widget = w.VBox([
            w.HTML("<h3>MegaContext setup console</h3>"),
            w.HBox([self.config_name]), self.config_path,
            self.data_root, self.artifact_root, roots_hint,
            self.wandb_mode,
            w.HBox([self.tokens["wandb"], self.token_status["wandb"]]),
            w.HBox([self.tokens["hf"], self.token_status["hf"]]),
            self.seed, self.force_rebuild, self.overrides,
            w.HBox([self.resume_picker, self.refresh_button]),
            w.HBox([self.apply_button, self.status]),
            self.resolved,
        ])

    # ------------------------------------------------------------------ widgets
    def _show_custom(self) -> None:
        self.config_path.layout.display = "" if self.config_name.value == CUSTOM else "none"

    def _config_changed(self) -> None:
        """Show the path field for a custom config; the W&B mode follows the config's
        ``wandb:`` section until it is chosen by hand."""
        self._show_custom()
        if self._wandb_follows_config and self.config_name.value != CUSTOM:
            self._setting_wandb = True
            try:
                self.wandb_mode.value = _config_wandb_mode(self.config_name.value)
            finally:
                self._setting_wandb = False

    def _wandb_touched(self, _: Any) -> None:
        if not getattr(self, "_setting_wandb", False):
            self._wandb_follows_config = False

    def refresh_checkpoints(self, initial: str | None = None) -> list[CheckpointInfo]:
        """Re-list the checkpoints under the artifact root into the resume picker (keeping the
        choice when it is still there; ``initial``: the choice to make, see the class doc)."""
        infos = list_run_checkpoints(os.path.expanduser(self.artifact_root.value))
        newest = next((i for i in infos if i.latest), infos[0] if infos else None)
        latest_label = f"latest: {newest.run} / {newest.name}" if newest else "latest (no checkpoint yet)"
        options = [("new run (start from scratch)", NEW_RUN), (latest_label, LATEST)]
        options += [(i.label(), str(i.path)) for i in infos]
        keep = self.resume_picker.value if initial is None else None
        if initial in (None, "auto"):
            initial = keep if keep in [v for _, v in options] else (LATEST if infos else NEW_RUN)
        elif initial not in (NEW_RUN, LATEST):
            path = str(Path(initial).expanduser().resolve())
            if path not in [v for _, v in options]:
                options.append((f"{path} (not under this artifact root)", path))
            initial = path
        self.resume_picker.options = options
        self.resume_picker.value = initial
        return infos

    @property
    def resume(self) -> str | None:
        """What training resumes from: None (a new run), ``"latest"`` or a checkpoint folder."""
        value = self.resume_picker.value
        return None if value in (None, NEW_RUN) else value

    def config_source(self) -> str:
        if self.config_name.value == CUSTOM:
            path = self.config_path.value.strip()
            if not path:
                raise StepFailed("setup console: choose a config, or type the path of a YAML file")
            return os.path.expanduser(path)
        return self.config_name.value

    def override_list(self) -> list[str]:
        return [line.strip() for line in self.overrides.value.splitlines() if line.strip() and not line.strip().startswith("#")]

    # -------------------------------------------------------------------- apply
    def _write_env(self) -> None:
        env = os.environ
        env["MEGACONTEXT_DATA_ROOT"] = os.path.abspath(os.path.expanduser(self.data_root.value.strip() or "data"))
        env["MEGACONTEXT_ARTIFACT_ROOT"] = os.path.abspath(os.path.expanduser(self.artifact_root.value.strip() or "artifacts"))
        seed = self.seed.value.strip()
        if seed:
            try:
                int(seed.replace("_", ""))
            except ValueError:
                raise StepFailed(f"setup console: MEGACONTEXT_SEED must be an integer, got {seed!r}") from None
            env["MEGACONTEXT_SEED"] = seed
        else:
            env.pop("MEGACONTEXT_SEED", None)
        if self.force_rebuild.value:
            env["MEGACONTEXT_FORCE_DATA_REBUILD"] = "1"
        else:
            env.pop("MEGACONTEXT_FORCE_DATA_REBUILD", None)
        mode = self.wandb_mode.value
        if mode == "disabled":
            env["MEGACONTEXT_ENABLE_WANDB"] = "0"
            env.pop("WANDB_MODE", None)
        else:
            env["MEGACONTEXT_ENABLE_WANDB"] = "1"
            env["WANDB_MODE"] = mode
        for key, field in self.tokens.items():
            value = field.value.strip()
            field.value = ""  # never kept in the widget (nor in a saved notebook's widget state)
            if value:
                env[TOKEN_VARS[key][0]] = value

    def _token_lines(self) -> list[str]:
        out = []
        for key, (var, label) in TOKEN_VARS.items():
            held = bool(os.environ.get(var))
            self.token_status[key].value = (
                f"<span style='color:green'>&#10003; {var} set for this session</span>" if held
                else f"<span style='color:gray'>{var} not set</span>")
            out.append(f"{label}: {'set for this session (hidden, never saved)' if held else 'not set'}")
        return out

    def apply(self, raise_errors: bool = True, echo: bool = True) -> Config | None:
        """Write the environment from the widgets, load the config, show it; returns it.

        ``echo``: also print a short plain-text summary (seen where widgets are not rendered).
        ``raise_errors`` False (the Apply button): a problem is shown in the console only.
        """
        from megacontext.hub import prefer_offline

        try:
            self._write_env()
            with step("setup console"):
                cfg = load_config(self.config_source(), self.override_list())
                prefer_offline(cfg)
        except StepFailed as e:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            self._token_lines()
            if raise_errors:
                raise
            return None
        self.cfg = cfg
        tokens = self._token_lines()
        infos = self.refresh_checkpoints()
        mode = self.wandb_mode.value
        warn = ""
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            warn = " &mdash; <span style='color:#b60'>W&amp;B online needs a W&amp;B API key</span>"
        self.status.value = f"<span style='color:green'>applied at {datetime.now():%H:%M:%S}</span>{warn}"
        env_rows = "".join(
            f"<tr><td><code>{v}</code></td><td>{html.escape(os.environ.get(v, '(unset)'))}</td></tr>"
            for v in ("MEGACONTEXT_DATA_ROOT", "MEGACONTEXT_ARTIFACT_ROOT", "MEGACONTEXT_SEED",
                      "MEGACONTEXT_FORCE_DATA_REBUILD", "MEGACONTEXT_ENABLE_WANDB", "WANDB_MODE"))
        token_rows = "".join(f"<tr><td>{html.escape(t.split(':')[0])}</td><td>{html.escape(t.split(': ', 1)[1])}</td></tr>"
                             for t in tokens)
        self.resolved.value = (
            f"<b>Environment of this session</b><table>{env_rows}{token_rows}</table>"
            f"<b>Resume</b>: {html.escape(self._resume_text(infos))}<br>{config_html(cfg)}")
        if echo:
            print(f"config     {cfg.source_file}" + (f" + {len(self.override_list())} overrides" if self.override_list() else ""))
            print(f"data       {cfg.paths.data_root}")
            print(f"artifacts  {cfg.paths.artifact_root}")
            print(f"seed       {cfg.seed} | base {cfg.base.name} | budget W_max {cfg.focus.budget} | "
                  f"W&B {mode}")
            print(f"tokens     {'; '.join(tokens)}")
            print(f"resume     {self._resume_text(infos)}")
        return cfg

    def _resume_text(self, infos: Sequence[CheckpointInfo]) -> str:
        r = self.resume
        if r is None:
            return "new run"
        if r == LATEST:
            newest = next((i for i in infos if i.latest), infos[0] if infos else None)
            return f"latest ({newest.run} / {newest.name})" if newest else "latest (no checkpoint under this artifact root yet)"
        return r

    def config(self) -> Config:
        """The config from the console's current values (applied again, so an edit made
        without pressing Apply counts too)."""
        cfg = self.apply(echo=False)
        assert cfg is not None
        return cfg

    def show(self) -> None:
        display_obj(self.widget)

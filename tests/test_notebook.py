"""notebooks/megacontext.ipynb runs headless (nbclient + ipykernel) on the smoke settings.

Two executions in one temporary root, the console's values supplied as a parameterised run
supplies them (a cell after the one tagged ``parameters``): a new run of one cycle with W&B
offline and both tokens typed in, then ``RESUME = "latest"`` with one more cycle, which must
continue the same run from its checkpoint. The token values never reach a file: not the data
or artifact roots, the W&B or IPython folders, nor the executed notebooks (widget state included).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "megacontext.ipynb"

# configs/smoke.yaml cut further: one thread, short phases and histories, a small eval. The data
# and embedded settings stay as they are, so the session's smoke dataset and base are reused.
FAST = [
    "train.cpu_threads=1",
    "train.history_min=400",
    "train.history_max=500",
    "train.phases.warm_gist.steps=2",
    "train.phases.warm_lens.steps=2",
    "train.phases.jt1.steps=2",
    "train.phases.jt2.steps=2",
    "train.phases.jt3.steps=2",
    "train.validation.windows=1",
    "train.labels.snapshots=1",
    "train.labels.candidates=4",
    "eval.windows=2",
    "eval.passkey_trials=1",
    "eval.multikey_facts=0",
    "eval.oracle_windows=0",
]


def run_notebook(params: dict[str, str], workdir: Path, name: str):
    """Execute the notebook with ``params`` (Python source per name) injected after its
    parameters cell; the executed notebook is saved as ``workdir/name``."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", store_widget_state=True,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    nbformat.write(nb, workdir / name)
    return nb


def cell_text(nb, needle: str) -> str:
    """The text output of the code cell whose source contains ``needle``."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(str(out["data"].get("text/plain", "")) + str(out["data"].get("text/html", "")))
    return "".join(parts)


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            hits += [f"{f} holds token {n.decode()[:12]}..." for n in needles if n in data]
    return hits


def test_repo_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_notebook_runs_headless_then_resumes(tmp_path, monkeypatch, smoke_cfg, smoke_base):
    wandb_key = "mc-test-wandb-" + secrets.token_hex(12)
    hf_token = "hf_mctest" + secrets.token_hex(12)
    env = {
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
        "MC_TEST_WANDB_KEY": wandb_key, "MC_TEST_HF_TOKEN": hf_token,
        "IPYTHONDIR": str(tmp_path / "ipython"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter"),
        "MPLCONFIGDIR": str(tmp_path / "mpl"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_SILENT": "true",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
    for k in ("WANDB_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    # the session's smoke dataset (validated, not rebuilt) and base (linked into this artifact root)
    from megacontext.base_model import embedded_base_dir

    data_root, artifact_root = smoke_cfg.data_root, tmp_path / "artifacts"
    base_dir = embedded_base_dir(smoke_cfg)
    (artifact_root / "base").mkdir(parents=True)
    (artifact_root / "base" / base_dir.name).symlink_to(base_dir, target_is_directory=True)
    common = {
        "CONFIG": '"smoke"',
        "DATA_ROOT": repr(str(data_root)),
        "ARTIFACT_ROOT": repr(str(artifact_root)),
        "SEED": repr(str(smoke_cfg.seed)),  # the smoke base's seed (its cache key includes it)
    }

    # 1. a new run of one cycle, W&B offline, both tokens typed into the console
    first = run_notebook({
        **common, "WANDB_MODE": '"offline"', "RESUME": '"auto"', "OVERRIDES": repr([*FAST, "train.cycles=1"]),
        "WANDB_API_KEY": 'os.environ.pop("MC_TEST_WANDB_KEY")', "HF_TOKEN": 'os.environ.pop("MC_TEST_HF_TOKEN")',
    }, tmp_path, "first.ipynb")
    runs = sorted((artifact_root / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    ckpts = run / "checkpoints"
    assert (ckpts / "c1-jt3").is_dir() and (ckpts / "latest").read_text().strip() == "c1-jt3"
    assert not (ckpts / "c2-jt1").exists()
    assert (run / "eval.json").is_file() and (run / "report.md").is_file()
    assert list((run / "report").glob("*.png"))
    assert (run / "wandb").is_dir()  # W&B offline wrote its files in the run folder
    console = cell_text(first, "nb.SetupConsole(")
    assert "W&B API key: set for this session" in console and "Hugging Face token: set for this session" in console
    assert "resume     new run" in console
    assert "new run" in cell_text(first, "nb.train(")
    assert "reused the valid shards" in cell_text(first, "nb.prepare(")
    assert "reused the cached embedded base" in cell_text(first, "nb.base(")
    assert "c1-jt3 (latest)" in cell_text(first, "nb.checkpoints(")
    steps_first = [json.loads(line) for line in (run / "telemetry.jsonl").read_text().splitlines()]

    # 2. resume = latest with one more cycle: the same run continues from c1-jt3
    second = run_notebook({
        **common, "WANDB_MODE": '"disabled"', "RESUME": '"latest"', "OVERRIDES": repr([*FAST, "train.cycles=2"]),
    }, tmp_path, "second.ipynb")
    assert sorted((artifact_root / "runs").iterdir()) == [run]
    assert (ckpts / "latest").read_text().strip() == "c2-jt3"
    trained = cell_text(second, "nb.train(")
    assert f"resuming {run.name} from checkpoint c1-jt3" in trained and "3 phases to go" in trained
    assert "reused the valid shards" in cell_text(second, "nb.prepare(")
    assert "reused the cached embedded base" in cell_text(second, "nb.base(")
    steps = [json.loads(line) for line in (run / "telemetry.jsonl").read_text().splitlines()]
    assert steps[: len(steps_first)] == steps_first  # the first session's records, untouched
    assert {(r["cycle"], r["phase"]) for r in steps[len(steps_first):]} == {(2, "jt1"), (2, "jt2"), (2, "jt3")}
    names = [json.loads(line)["name"] for line in (run / "validation.jsonl").read_text().splitlines()]
    assert names == ["c0-warm_gist", "c0-warm_lens", "c1-jt1", "c1-jt2", "c1-jt3", "c2-jt1", "c2-jt2", "c2-jt3"]
    assert json.loads((run / "eval.json").read_text())["checkpoint"].endswith("c2-jt3")

    # the tokens: in no file of the roots, W&B, IPython, or the executed notebooks (widget state included)
    assert "mc-test-wandb" not in NOTEBOOK.read_text() and "hf_mctest" not in NOTEBOOK.read_text()
    for root in (tmp_path, data_root, base_dir):
        assert files_containing(root, [wandb_key.encode(), hf_token.encode()]) == []
    assert "widgets" in first.metadata  # the widget state was saved (and searched above)


def test_console_writes_the_environment_and_forgets_tokens(tmp_path, monkeypatch):
    """In-process (no kernel): what Apply writes, the origins it shows, the resume picker."""
    from megacontext.cli import notebook as nb

    for var in ("WANDB_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)  # restored after the test, as are the MEGACONTEXT_* ones
    runs = tmp_path / "artifacts" / "runs"
    for run, names, latest in (("20260101-000000-aaaa", ["c0-warm_gist", "c0-warm_lens"], "c0-warm_lens"),
                               ("20260202-000000-bbbb", ["c0-warm_gist", "c1-jt1-s00002"], "c1-jt1-s00002")):
        for name in names:
            (runs / run / "checkpoints" / name).mkdir(parents=True)
            state = {"global_step": 3, "validation": [{"name": name, "steps": 4, "loss_megacontext": 2.5}]}
            (runs / run / "checkpoints" / name / "state.json").write_text(json.dumps(state))
        (runs / run / "checkpoints" / "latest").write_text(latest + "\n")
    key = "mc-test-" + secrets.token_hex(8)
    console = nb.SetupConsole("smoke", str(tmp_path / "data"), str(tmp_path / "artifacts"), "offline", "5", True,
                              "auto", ["focus.budget=160"], wandb_key=key)
    assert console.resume_picker.value == nb.LATEST and console.resume == "latest"  # a checkpoint exists
    infos = nb.list_run_checkpoints(tmp_path / "artifacts")
    assert [(i.run[:8], i.name, i.latest) for i in infos] == [
        ("20260202", "c1-jt1-s00002", True), ("20260202", "c0-warm_gist", False),
        ("20260101", "c0-warm_lens", True), ("20260101", "c0-warm_gist", False)]
    assert infos[0].step == 2 and infos[0].loss == 2.5 and infos[1].step == 4

    cfg = console.apply(echo=False)
    assert os.environ["WANDB_API_KEY"] == key and console.tokens["wandb"].value == ""  # moved, not kept
    assert "HF_TOKEN" not in os.environ
    assert key not in console.resolved.value and key not in console.widget.children[0].value
    assert (os.environ["MEGACONTEXT_ENABLE_WANDB"], os.environ["WANDB_MODE"]) == ("1", "offline")
    assert cfg.seed == 5 and cfg.data.force_rebuild and cfg.wandb.enabled and cfg.focus.budget == 160
    origins = {r["key"]: r["origin"] for r in nb.config_rows(cfg)}
    assert origins["seed"] == "environment variable MEGACONTEXT_SEED"
    assert origins["focus.budget"] == "command line"
    assert origins["tree.block_size"].endswith("smoke.yaml") and origins["train.lora.dropout"] == "default"
    assert "environment variable MEGACONTEXT_SEED" in console.resolved.value

    console.wandb_mode.value, console.seed.value, console.force_rebuild.value = "disabled", "", False
    console.resume_picker.value = nb.NEW_RUN
    cfg = console.config()
    assert os.environ["MEGACONTEXT_ENABLE_WANDB"] == "0" and "WANDB_MODE" not in os.environ
    assert "MEGACONTEXT_SEED" not in os.environ and cfg.seed == 7 and not cfg.wandb.enabled
    assert console.resume is None and os.environ["WANDB_API_KEY"] == key  # an empty field keeps the session's token
    console.seed.value = "seven"
    with pytest.raises(nb.StepFailed, match="MEGACONTEXT_SEED must be an integer"):
        console.apply(echo=False)


def test_console_wandb_mode_follows_the_config_until_chosen(tmp_path):
    from megacontext.cli import notebook as nb

    console = nb.SetupConsole("smoke", str(tmp_path / "d"), str(tmp_path / "a"))
    assert console.wandb_mode.value == "disabled" and console.resume is None  # no checkpoint: a new run
    console.config_name.value = "gpu"  # configs/gpu.yaml: wandb enabled, online
    assert console.wandb_mode.value == "online"
    console.wandb_mode.value = "offline"  # chosen by hand: kept from now on
    console.config_name.value = "default"
    assert console.wandb_mode.value == "offline"
    console.config_name.value = nb.CUSTOM
    assert console.config_path.layout.display == ""
    with pytest.raises(nb.StepFailed, match="type the path"):
        console.apply(echo=False)

"""The one place that names the files of a run.

Steps talk to each other only through files under ``run_dir``; every path comes from here.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .io import atomic_write, read_json

__all__ = ["RunLayout", "STEP_DEPENDS_ON"]

#: which steps read the output of which: re-running a step with other parameters or inputs makes
#: the steps that depend on it stale
STEP_DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "01_preprocess": (),
    "02_finetune": ("01_preprocess",),
    "03_evaluate": ("01_preprocess", "02_finetune"),
    "04_zeroshot": ("01_preprocess",),
}


class RunLayout:
    """Paths of one protocol run.

    ::

        run_dir/
          params/<step>.yaml          the parameters each step ran with
          logs/<step>.log             each step's log
          reports/NN_step.ipynb/.html executed notebooks (the runner writes these)
          figures/<name>.png
          data/prepared.h5ad          01: filtered, normalised, genes matched, obs["split"]
          data/labels.json            01: label <-> id mapping, split summary
          data/inspection.json        01: what was found in the input data
          checkpoint.json             01: which pretrained checkpoint the run uses
          pretrained/                 01: the tiny demo checkpoint, when no real one is given
          model/                      02: fine-tuned checkpoint (best epoch) + labels.json
          train/                      02: last-epoch state for resume, history.csv, summary.json
          predictions.csv, metrics.json, data/evaluated.h5ad      03
          query_predictions.csv       03, with an external query (and query_crosstab.csv: label x call)
          export/vars.h5              03: normalised expression of the evaluated cells (CSR) + var
          export/obs.duckdb           03: tables obs (one row per evaluated cell), metrics, per_class, coverage
          zeroshot/predictions.csv, zeroshot/metrics.json         04
          run_manifest.json           the runner: parameters, versions, checksums, timings
          stale/<step>-<UTC time>/    the runner: a step's files set aside when a step it depends on
                                      re-ran with other parameters or inputs (same relative paths)
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.run_dir)!r})"

    # -- folders --
    @property
    def params_dir(self) -> Path:
        return self.run_dir / "params"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def reports_dir(self) -> Path:
        return self.run_dir / "reports"

    @property
    def figures_dir(self) -> Path:
        return self.run_dir / "figures"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    # -- 01 preprocess --
    @property
    def prepared_adata(self) -> Path:
        return self.data_dir / "prepared.h5ad"

    @property
    def labels(self) -> Path:
        return self.data_dir / "labels.json"

    @property
    def inspection(self) -> Path:
        return self.data_dir / "inspection.json"

    @property
    def checkpoint_record(self) -> Path:
        return self.run_dir / "checkpoint.json"

    @property
    def demo_checkpoint_dir(self) -> Path:
        return self.run_dir / "pretrained"

    # -- 02 fine-tune --
    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def train_state(self) -> Path:
        return self.train_dir / "last_state.pt"

    @property
    def history(self) -> Path:
        return self.train_dir / "history.csv"

    @property
    def train_summary(self) -> Path:
        return self.train_dir / "summary.json"

    # -- 03 evaluate --
    @property
    def predictions(self) -> Path:
        return self.run_dir / "predictions.csv"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.json"

    @property
    def query_predictions(self) -> Path:
        return self.run_dir / "query_predictions.csv"

    @property
    def query_crosstab(self) -> Path:
        return self.run_dir / "query_crosstab.csv"

    @property
    def evaluated_adata(self) -> Path:
        return self.data_dir / "evaluated.h5ad"

    @property
    def prediction_store(self) -> Path:
        """03's per-cell probabilities and embeddings when streamed (``EvaluateParams.store_outputs``)."""
        return self.data_dir / "predictions.h5"

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def vars_h5(self) -> Path:
        return self.export_dir / "vars.h5"

    @property
    def obs_duckdb(self) -> Path:
        return self.export_dir / "obs.duckdb"

    # -- 04 zero-shot --
    @property
    def zeroshot_dir(self) -> Path:
        return self.run_dir / "zeroshot"

    @property
    def zeroshot_predictions(self) -> Path:
        return self.zeroshot_dir / "predictions.csv"

    @property
    def zeroshot_metrics(self) -> Path:
        return self.zeroshot_dir / "metrics.json"

    # -- runner --
    @property
    def run_manifest(self) -> Path:
        """``run_manifest.json``: the headless runner's record of the run (a saved model's own record is
        ``model/manifest.json``)."""
        return self.run_dir / "run_manifest.json"

    @property
    def manifest(self) -> Path:
        """The old name of :attr:`run_manifest` ("manifest" alone also names a saved model's record)."""
        import warnings

        warnings.warn("RunLayout.manifest is now RunLayout.run_manifest; the old name goes in a later release",
                      DeprecationWarning, stacklevel=2)
        return self.run_manifest

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{name}.png"

    def step_log(self, step: str) -> Path:
        return self.logs_dir / f"{step}.log"

    def kernel_log(self, step: str) -> Path:
        """What the kernel of a headless step wrote outside its cells (its warnings, a crash's stack)."""
        return self.logs_dir / f"{step}.kernel.log"

    def step_params(self, step: str) -> Path:
        return self.params_dir / f"{step}.yaml"

    def step_report(self, step: str) -> Path:
        return self.reports_dir / f"{step}.ipynb"

    #: the figures each step saves (``save_figure(fig, layout, name)`` in its notebook)
    STEP_FIGURES: dict[str, tuple[str, ...]] = {
        "01_preprocess": ("qc", "class_counts", "overview_umap"),
        "02_finetune": ("training_curves",),
        "03_evaluate": ("per_class_f1", "confusion", "umap", "call_umaps", "confidence_by_type", "marker_dotplot",
                        "reliability", "coverage_curve"),
        "04_zeroshot": ("zeroshot_umap", "zeroshot_coverage_curve"),
    }

    def step_artifacts(self, step: str, *, outputs_only: bool = False) -> list[Path]:
        """Every file or folder ``step`` (``"02_finetune"``...) writes: its outputs, figures, report
        (.ipynb/.html), log and parameters; with ``outputs_only`` its outputs and figures (what a notebook
        running that step again sets aside while its report, log and parameters are being written)."""
        outputs = {
            "01_preprocess": [self.prepared_adata, self.labels, self.inspection, self.checkpoint_record,
                              self.demo_checkpoint_dir],
            "02_finetune": [self.model_dir, self.train_dir],
            "03_evaluate": [self.predictions, self.metrics, self.evaluated_adata, self.prediction_store,
                            self.query_predictions, self.query_crosstab,
                            self.export_dir],
            "04_zeroshot": [self.zeroshot_dir],
        }
        if step not in outputs:
            msg = f"unknown step {step!r}; steps: {sorted(outputs)}."
            raise KeyError(msg)
        report, name = self.step_report(step), step.split("_", 1)[1]  # logs and params use "preprocess" etc.
        figures = [self.figure(figure).with_suffix(suffix) for figure in self.STEP_FIGURES[step]
                   for suffix in (".png", ".pdf")]  # save_figure writes a PDF beside each PNG
        if outputs_only:
            return [*outputs[step], *figures]
        return [*outputs[step], *figures, report,
                report.with_suffix(".html"), report.with_name(report.name + ".incomplete"), self.step_log(name),
                self.kernel_log(name), self.step_params(name)]

    @property
    def stale_dir(self) -> Path:
        return self.run_dir / "stale"

    def set_aside(self, step: str, stamp: str, *, outputs_only: bool = False) -> tuple[Path, list[Path]]:
        """Move what ``step`` wrote (:meth:`step_artifacts`) to ``stale/<step>-<stamp>/``, keeping paths
        relative to ``run_dir``.

        Nothing is deleted. Returns the folder and the moved paths (relative); the folder is not created
        when there is nothing to move.
        """
        target = self.stale_dir / f"{step}-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.stale_dir / f"{step}-{stamp}-{n}"
        moved = []
        for path in self.step_artifacts(step, outputs_only=outputs_only):
            if not (path.exists() or path.is_symlink()):
                continue
            rel = path.relative_to(self.run_dir)
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(target / rel))
            moved.append(rel)
        return target, moved

    # -- leftovers of failed writes --
    def leftovers(self, step: str) -> list[Path]:
        """The temporary files a failed or killed ``step`` left behind: ``.<name>.<random>.partial<suffix>`` of
        :func:`~scgpt_protocol.core.io.atomic_write` beside (or inside) its artifacts, and its truncated report
        (``reports/<step>.ipynb.incomplete``), and those of the run's own records (manifest, summary page).
        ``step``: ``"01_preprocess"`` or ``"preprocess"``. Only the run folder's lock holder may remove them."""
        step = self.full_step(step)
        found: set[Path] = set()
        for path in [*self.step_artifacts(step), self.run_manifest, self.reports_dir / "index.html"]:
            if path.name.endswith(".incomplete") and path.is_file():
                found.add(path)
            elif path.is_dir():
                found.update(p for p in path.rglob(".*.partial*") if p.is_file())
            elif path.parent.is_dir():
                found.update(p for p in path.parent.glob(f".{path.stem}.*.partial{path.suffix}") if p.is_file())
        return sorted(found)

    def remove_leftovers(self, step: str) -> tuple[dict[Path, int], list[str]]:
        """Remove :meth:`leftovers` of ``step`` and log what it did: ({removed path: its bytes},
        ``"<path>: <why not>"`` for each that could not be)."""
        removed: dict[Path, int] = {}
        kept = []
        for path in self.leftovers(step):
            try:
                size = path.stat().st_size
                path.unlink()
                removed[path] = size
            except FileNotFoundError:
                continue
            except OSError as err:
                kept.append(f"{path}: {err.strerror or err}")
        log = logging.getLogger(__name__)
        if removed:
            log.info("removed %d file(s) that an earlier or failed run of %s left half-written: %s", len(removed),
                     step, ", ".join(str(p.relative_to(self.run_dir)) for p in removed))
        if kept:
            log.warning("could not remove what %s left half-written: %s", step, "; ".join(kept))
        return removed, kept

    @staticmethod
    def full_step(step: str) -> str:
        """``"01_preprocess"`` for ``"preprocess"``, ``"01"`` or ``"01_preprocess"``."""
        for name in STEP_DEPENDS_ON:
            if step in (name, name.split("_", 1)[1], name.split("_", 1)[0]):
                return name
        msg = f"unknown step {step!r}; steps: {list(STEP_DEPENDS_ON)}."
        raise KeyError(msg)

    # -- one writer at a time --
    def hold(self, step: str) -> RunLayout:
        """Take this run folder for ``step`` (:func:`~scgpt_protocol.core.lock.hold_run_dir`; a notebook's set-up
        cell), and remove what an earlier failed run of the step left half-written. Raises
        :class:`~scgpt_protocol.core.errors.RunDirInUse` when another run or notebook writes here."""
        from .lock import hold_run_dir, release_others

        step = self.full_step(step)
        release_others(self.run_dir, "notebook")  # a set-up cell run again with another run_dir frees the old one
        hold_run_dir(self.run_dir, step=step, holder="notebook")
        self.remove_leftovers(step)
        return self

    def release(self) -> None:
        """Give this run folder back (the last cell of each notebook; also when the kernel ends)."""
        from .lock import held_lock

        lock = held_lock(self.run_dir)
        if lock is not None:
            lock.release()

    def make_dirs(self) -> RunLayout:
        for folder in (self.params_dir, self.logs_dir, self.figures_dir, self.data_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    # -- small JSON records --
    def write_json(self, path: Path, obj: Any) -> Path:
        """Write JSON atomically (:func:`atomic_write`)."""
        return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))

    def write_csv(self, frame: Any, path: Path, *, index: bool = True) -> Path:
        """Write a DataFrame as CSV atomically (:func:`atomic_write`)."""
        label = (frame.index.name or "cell") if index else None
        return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=index, index_label=label))

    def write_h5ad(self, adata: Any, path: Path) -> Path:
        """Write an AnnData atomically (:func:`atomic_write`)."""
        return atomic_write(path, adata.write_h5ad)

    def read_json(self, path: Path, *, step: str) -> Any:
        """Read a JSON record another step wrote; a clear error if that step has not run."""
        return read_json(path, missing_hint=f"run step {step!r} first with the same run_dir ({self.run_dir}).")

    def require(self, path: Path, *, step: str) -> Path:
        """``path``, or a clear error naming the step that writes it."""
        if not path.exists():
            msg = f"{path} does not exist: run step {step!r} first with the same run_dir ({self.run_dir})."
            raise FileNotFoundError(msg)
        return path

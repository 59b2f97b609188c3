"""What the executed notebooks show a reader: banners, the closing summary, 02's settings and curve.

The notebooks end a cell with one of these; each returns an object that Jupyter displays richly
(HTML, or a pandas ``Styler``) and that prints as plain text elsewhere (the tables themselves are
:mod:`scgpt_protocol.protocol.tables`):

* :func:`checkpoint_banner` -- which pretrained model the run uses; a visible warning box for the
  tiny random demo checkpoint (once per report);
* :func:`run_summary` -- the closing ``## Summary`` of 03 and 04: scGPT fine-tuned, the baseline and
  zero-shot kNN on the same cells under the same rule, with a one-line verdict;
* :func:`training_report` / :func:`settings_table` -- what 02 ran with and what its curve says;
* :func:`describe_refinement` -- abstention and majority voting in words;
* :func:`next_steps` -- the closing "Next" of a report: what to run or change next.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..annotate.refinement import UNKNOWN
from ..metrics import BASELINE, HEADERS, SCGPT, SUMMARY_METRICS, ZEROSHOT, metrics_table
from .tables import DECIMALS, styled

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

    from ..core.layout import RunLayout
    from ..core.params import StepParams

__all__ = ["describe_refinement", "HEADERS", "Banner", "Summary", "checkpoint_banner", "run_summary", "summary_of",
    "training_report", "settings_table", "next_steps", "read_json_if_present"]


def describe_refinement(params: Mapping[str, Any] | None) -> str:
    """One readable paragraph of a refinement's parameters (``Prediction.refinement``)."""
    if not params:
        return "no abstention, no majority voting: every cell keeps the model's predicted class"
    lines = []
    t = params.get("min_confidence") or 0.0
    if t:
        lines.append(f"abstention: {params['n_unknown']:,} of the {params['n_cells']:,} cells of all splits have a "
                     f"confidence below min_confidence={t:g} and are {UNKNOWN!r} (coverage {params['coverage']:.3f}); "
                     "the test split's counts are in the next table")
    else:
        lines.append("abstention off (min_confidence=0): every cell keeps its predicted class")
    if params.get("majority_voting"):
        res = params.get("resolution")
        res_text = (", ".join(f"{k} {v:g}" for k, v in res.items()) if isinstance(res, Mapping) else f"{res:g}")
        lines.append(f"majority voting: {params['n_clusters']:,} over-clusters (Leiden resolution {res_text}; "
                     f"{params['n_neighbors']} neighbours on the model's embedding)")
    else:
        lines.append("majority voting off")
    return "\n".join(lines)

#: the three methods of :func:`run_summary`, as a reader sees them
SCGPT_NAME, BASELINE_NAME, ZEROSHOT_NAME = SCGPT.label, BASELINE.label, ZEROSHOT.label


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.{DECIMALS}f}"


# -- banner ---------------------------------------------------------------------------------
@dataclass
class Banner:
    """A short message shown as a coloured box in notebooks and as plain text elsewhere."""

    title: str
    text: str
    level: str = "warning"  # "warning" (amber box) or "info" (grey line)

    def __repr__(self) -> str:
        return f"{self.title}: {self.text}" if self.title else self.text

    def _repr_html_(self) -> str:
        if self.level == "warning":
            style = ("border-left:6px solid #d08c00;background:#fff4d6;padding:8px 12px;margin:4px 0;"
                     "color:#3d2c00;font-size:14px;line-height:1.4")
        else:
            style = "border-left:4px solid #9aa5b1;background:#f3f5f7;padding:6px 12px;margin:4px 0;font-size:13px"
        title = f"<b>{html.escape(self.title)}</b> " if self.title else ""
        return f"<div style='{style}'>{title}{html.escape(self.text)}</div>"

    def _repr_markdown_(self) -> str:
        text = html.escape(self.text)
        return f"> **{html.escape(self.title)}** {text}" if self.title else f"> {text}"


def checkpoint_banner(record: Mapping[str, Any]) -> Banner:
    """Which pretrained checkpoint the run uses (``checkpoint.json`` of 01), as a banner.

    The tiny randomly initialised demo checkpoint gets a visible warning: its numbers show that the
    protocol runs, not what scGPT can do.
    """
    if record.get("kind") == "demo":
        return Banner(
            "Demo checkpoint.",
            "This run uses a tiny, randomly initialised model in the released layout, not the pretrained "
            "scGPT: its numbers show that the protocol runs end to end, not what scGPT can do. For real "
            "results set checkpoint='whole-human' in 01_preprocess.",
        )
    sha = str(record.get("sha256") or "")[:12]
    return Banner("", f"Pretrained checkpoint: {record.get('checkpoint')}" + (f" (sha256 {sha}...)" if sha else ""),
                  level="info")


# -- metric tables --------------------------------------------------------------------------












# -- closing summary ------------------------------------------------------------------------
@dataclass
class Summary:
    """The closing summary of 03 and 04: one rounded table and a one-line verdict."""

    table: pd.DataFrame  # index: method; Accuracy, Macro-F1, Weighted-F1, n cells, Note
    verdict: str
    caveat: str = ""
    cells: str = ""
    notes: list[str] = field(default_factory=list)

    def _text_table(self) -> pd.DataFrame:
        out = self.table.copy()
        for column in ("Accuracy", "Macro-F1", "Weighted-F1"):
            out[column] = [_fmt(v) for v in out[column]]
        out["n cells"] = [_fmt(None if pd.isna(v) else int(v)) for v in out["n cells"]]
        return out

    def __repr__(self) -> str:
        lines = [f"Summary ({self.cells})" if self.cells else "Summary", self._text_table().to_string(), "",
                 self.verdict]
        if self.caveat:
            lines.append(self.caveat)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        table = styled(self._text_table(), text=[c for c in ("Note",) if c in self.table.columns]).to_html()
        caption = f"<p style='margin:2px 0'><i>{html.escape(self.cells)}</i></p>" if self.cells else ""
        caveat = (f"<p style='margin:4px 0;color:#7a5200'><b>Caveat:</b> {html.escape(self.caveat)}</p>"
                  if self.caveat else "")
        return (f"<div>{caption}{table}<p style='margin:6px 0;font-size:14px'><b>Verdict:</b> "
                f"{html.escape(self.verdict)}</p>{caveat}</div>")


def read_json_if_present(path: Any) -> Any:
    """A run's JSON record (``metrics.json``, ``checkpoint.json``...), or None when the step has not written it."""
    return json.loads(path.read_text()) if path.is_file() else None


def _cells(path: Any) -> set[str] | None:
    if not path.is_file():
        return None
    return set(pd.read_csv(path, index_col=0, usecols=[0]).index.astype(str))


def summary_of(
    rows: Mapping[str, Mapping[str, Any] | str],
    *,
    demo: bool = False,
    cells: str = "",
) -> Summary:
    """Build a :class:`Summary` from method -> metrics dict (or a string saying why it is missing).

    The verdict compares macro-F1 (every cell type counts the same) of the methods that have it.
    """
    numeric = {m: v for m, v in rows.items() if not isinstance(v, str)}
    missing = {m: v for m, v in rows.items() if isinstance(v, str)}
    headers = [HEADERS[k] for k in (*SUMMARY_METRICS, "n_cells")]
    table = (metrics_table(numeric, SUMMARY_METRICS, decimals=DECIMALS, readable=True) if numeric
             else pd.DataFrame(columns=headers, dtype=float))
    table = table.reindex(list(rows))  # rows in the order given; a missing method's numbers are NaN
    table[HEADERS["n_cells"]] = table[HEADERS["n_cells"]].astype("Int64")
    if missing:
        table["Note"] = pd.Series({m: missing.get(m, "") for m in rows})
    table.index.name = "Method"
    scored = {m: float(table.loc[m, HEADERS["macro_f1"]]) for m in numeric}
    verdict = _verdict(scored)
    caveat = ""
    if demo:
        caveat = ("the checkpoint is the tiny RANDOMLY INITIALISED demo one, so scGPT's numbers say nothing "
                  "about the real model; rerun with checkpoint='whole-human'.")
    n = {int(v) for v in table["n cells"].dropna()}
    if len(n) == 1 and next(iter(n)) < 500:
        size = f"with {next(iter(n))} cells, differences below about 0.05 can be chance."
        caveat = f"{caveat} Also, {size}" if caveat else size[0].upper() + size[1:]
    return Summary(table=table, verdict=verdict, caveat=caveat, cells=cells, notes=list(missing.values()))


def _verdict(scored: Mapping[str, float]) -> str:
    if not scored:
        return "No method has metrics on these cells yet."
    ranked = sorted(scored.items(), key=lambda kv: kv[1], reverse=True)
    if len(ranked) == 1:
        return f"Only {ranked[0][0]} has metrics here: macro-F1 {ranked[0][1]:.3f}."
    (best, top), (second, runner_up) = ranked[0], ranked[1]
    gap = top - runner_up
    rest = "".join(f", then {m} ({v:.3f})" for m, v in ranked[2:])
    if gap < 0.01:
        return (f"{best} and {second} are level on macro-F1 ({top:.3f} vs {runner_up:.3f}){rest}; "
                "macro-F1 counts every cell type the same.")
    return (f"{best} wins on macro-F1 (every cell type counts the same): {top:.3f}, {gap:.3f} ahead of "
            f"{second} ({runner_up:.3f}){rest}.")


def _rule(methods: Mapping[str, Any]) -> str:
    """The rule every row of a summary is scored with, in words."""
    from ..metrics import SCGPT_METHOD

    refined = (methods.get(SCGPT_METHOD) or {}).get("refinement") or {}
    t = float(refined.get("min_confidence") or 0.0)
    return (f"the same rule for every method: {UNKNOWN!r} below a confidence of {t:g} counted wrong" if t
            else "every cell labelled with its most likely class")


def run_summary(layout: RunLayout, *, step: str | None = None) -> Summary:
    """The closing summary of a run: scGPT fine-tuned (03), the baseline (03) and zero-shot kNN (04).

    Reads ``metrics.json``, ``predictions.csv``, ``zeroshot/metrics.json``, ``zeroshot/predictions.csv``
    and ``checkpoint.json`` of the run. Methods are put side by side only when they were measured on
    the same cells (the run's test split) under the same rule (03 scores the baseline with scGPT's
    ``min_confidence``; 04 the kNN vote with its own); a method that has not run, or ran on other cells, gets
    a row that says so instead of numbers.

    Parameters
    ----------
    step
        The step whose report shows the summary (``"03_evaluate"``): a later step that has not run yet is
        then said to run after this one, with a pointer to the run summary ``reports/index.html``.

    Returns
    -------
    Summary
        ``.table`` (Accuracy, Macro-F1, Weighted-F1 rounded to 3 decimals, n cells, Note), ``.verdict``
        (which wins on macro-F1 and by how much) and ``.caveat`` (the demo checkpoint, small numbers).
    """
    record = read_json_if_present(layout.checkpoint_record) or {}
    metrics = read_json_if_present(layout.metrics) or {}
    methods = metrics.get("methods") or {}
    from ..metrics import BASELINE_METHOD, SCGPT_METHOD

    eval_cells = _cells(layout.predictions)
    zs_cells = _cells(layout.zeroshot_predictions)
    zs = read_json_if_present(layout.zeroshot_metrics) or {}
    rows: dict[str, Mapping[str, Any] | str] = {}
    rows[SCGPT_NAME] = methods.get(SCGPT_METHOD) or "not run yet: run 03_evaluate"
    rows[BASELINE_NAME] = methods.get(BASELINE_METHOD) or (
        "not run yet: run 03_evaluate" if not methods else "not computed (baseline=False in 03)")
    if not zs:
        rows[ZEROSHOT_NAME] = ("04_zeroshot runs after this notebook: the run summary reports/index.html shows it "
                               "beside these" if step == "03_evaluate" else "not run yet: run 04_zeroshot")
    elif not zs.get("knn_vote"):
        rows[ZEROSHOT_NAME] = "the zero-shot query has no labels: no metrics"
    elif eval_cells is not None and zs_cells is not None and eval_cells != zs_cells:
        rows[ZEROSHOT_NAME] = (f"measured on other cells ({len(zs_cells):,} query cells, not the "
                               f"{len(eval_cells):,} test cells of 03): see 04")
    else:
        rows[ZEROSHOT_NAME] = zs["knn_vote"]
    n = next((int(v["n_cells"]) for v in rows.values() if not isinstance(v, str)), None)
    where = f"the {n:,} test cells of this run" if n is not None else "the test cells of this run"
    k = (zs.get("params") or {}).get("k", 10)
    return summary_of(rows, demo=record.get("kind") == "demo",
                      cells=f"All methods on {where}, {_rule(methods)} (zero-shot: the vote of the k={k} "
                            "nearest reference cells)")


#: above this expected calibration error on the test cells, 03's Next points to the reliability diagram
CALIBRATION_TIP_ECE = 0.1


def next_steps(layout: RunLayout, step: str, *, summary_page: bool = False) -> Banner:
    """The closing "Next" of a step's report: the notebook to run next and the parameter to change, read
    from what the run wrote (the best epoch, scGPT against the baseline, the coverage of abstention).
    ``summary_page``: for ``reports/index.html`` itself (no pointer to it)."""
    from ..metrics import BASELINE_METHOD, SCGPT_METHOD

    tips: list[str] = []
    demo = (read_json_if_present(layout.checkpoint_record) or {}).get("kind") == "demo"
    if step == "01_preprocess":
        tips.append("run 02_finetune with the same run_dir to fine-tune on the train split.")
    elif step == "02_finetune":
        summary = read_json_if_present(layout.train_summary) or {}
        best, run = summary.get("best_epoch"), summary.get("epochs_run")
        if best is not None and best == run and (run or 0) > 1:
            tips.append(f"the best epoch is the last one ({best}): raise epochs and run 02 again with the same "
                        "run_dir (training continues), or go on.")
        tips.append("run 03_evaluate with the same run_dir to score the model on the test split.")
    elif step in ("03_evaluate", "04_zeroshot"):
        evaluated = read_json_if_present(layout.metrics) or {}
        methods = evaluated.get("methods") or {}
        scgpt, base = methods.get(SCGPT_METHOD) or {}, methods.get(BASELINE_METHOD) or {}
        calibration = evaluated.get("calibration") or {}
        ece = calibration.get("ece_after", calibration.get("ece_before"))
        if step == "03_evaluate" and ece is not None and ece > CALIBRATION_TIP_ECE:
            tips.append(f"scGPT's confidence is off by {ece:.2f} on average (ECE on the test cells, "
                        f"{'calibrated' if calibration.get('ece_after') is not None else 'raw: calibrate=False'}): "
                        "read reliability.png before choosing min_confidence" + (
                            "; more validation cells (val_size in 01) pin the temperature better." if
                            calibration.get("ece_after") is not None else "; set calibrate=True."))
        refined = scgpt.get("refinement") or {}
        if refined.get("min_confidence") and (refined.get("coverage") or 1.0) < 0.7:
            tips.append(f"only {refined['coverage']:.0%} of the test cells got a cell type: read the coverage "
                        "curve and lower min_confidence in 03 if the assigned cells' accuracy allows it.")
        if scgpt and base and (scgpt.get("macro_f1") or 0) < (base.get("macro_f1") or 0):
            tips.append("the baseline beats scGPT on macro-F1: " + (
                "expected with the random demo checkpoint; set checkpoint='whole-human' in 01." if demo else
                "try more epochs or another strategy in 02 (e.g. strategy='lora'), or class_weighted=True."))
        if step == "03_evaluate":
            tips.append("run 04_zeroshot with the same run_dir for label transfer without fine-tuning.")
        elif not summary_page:
            tips.append("open reports/index.html in the run folder: every step's headline and figures on one page.")
    if demo and not any("whole-human" in t for t in tips):
        tips.append("for real results set checkpoint='whole-human' in 01 and run the four notebooks again.")
    return Banner("Next:", " ".join(f"({i}) {t}" for i, t in enumerate(tips, 1)), level="info")


# -- 02 fine-tuning -------------------------------------------------------------------------
def settings_table(params: StepParams, *, keys: Sequence[str] | None = None) -> Styler:
    """The values this run uses beside the defaults, changed ones first, then those the recipe set.

    Parameters
    ----------
    params
        The step's parameters (e.g. :class:`~scgpt_protocol.core.params.FinetuneParams`).
    keys
        Which fields (default: every field except ``run_dir``, ``mount_drive`` and ``device``).

    Returns
    -------
    pandas.io.formats.style.Styler
        ``.data``: index ``Parameter``; columns ``This run``, ``Default``, ``Changed`` (yes; recipe: a None
        default set from the checkpoint's recipe; empty) and ``What it is`` (the help text).
    """

    fields = {f.name: f for f in dataclasses.fields(params)}
    names = list(keys) if keys is not None else [n for n in fields if n not in {"run_dir", "mount_drive", "device"}]
    rows, recipe = [], getattr(params, "recipe", None) or {"set": {}}  # with_recipe: what None became
    for name in names:
        value, default = getattr(params, name), fields[name].default
        shown = f"None: {recipe['kind']} recipe" if name in recipe["set"] else repr(default)
        rows.append({"Parameter": name, "This run": repr(value), "Default": shown,
                     "Changed": "recipe" if name in recipe["set"] else "yes" if value != default else "",
                     "What it is": fields[name].metadata.get("help", "")})
    frame = pd.DataFrame(rows).set_index("Parameter").sort_values("Changed", ascending=False, kind="stable")
    return styled(frame, text=list(frame.columns))


def training_report(summary: Mapping[str, Any], history: pd.DataFrame | None = None) -> Banner:
    """What 02's training says, in a sentence or two (``train/summary.json`` and the history).

    Says which epoch was kept; when it is the last epoch run (and training was not stopped early),
    says that validation macro-F1 was still improving and more epochs may help.
    """
    best, run = int(summary["best_epoch"]), int(summary["epochs_run"])
    score = summary.get("best_val_macro_f1")
    memory = summary.get("peak_memory_bytes")
    text = (f"strategy {summary.get('strategy')}: kept epoch {best} of {run} "
            f"(validation macro-F1 {_fmt(score)}); {int(summary.get('trainable_parameters', 0)):,} of "
            f"{int(summary.get('total_parameters', 0)):,} parameters trained in {float(summary.get('seconds', 0)):.0f} s"
            + (f", peak memory {memory / 2**20:,.0f} MB." if memory else "."))
    if best == run and run > 1:
        return Banner("The best epoch is the last one.",
                      f"{text} Validation macro-F1 was still improving when training ended, so more epochs "
                      "may help: raise epochs and run this notebook again with the same run_dir (training "
                      "continues from the last epoch).")
    stopped = history is not None and "stopped" in history.columns and bool(history["stopped"].fillna(False).any())
    tail = f" Training stopped early: no better validation macro-F1 for {run - best} epochs." if stopped else ""
    return Banner("", text + tail, level="info")


# -- files ----------------------------------------------------------------------------------

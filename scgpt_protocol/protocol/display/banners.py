"""What the executed notebooks say in words: banners, 02's settings and curve, the closing "Next".

The notebooks end a cell with one of these; each returns an object that Jupyter displays richly
(HTML, or a pandas ``Styler``) and that prints as plain text elsewhere (the tables are in
:mod:`~scgpt_protocol.protocol.display.tables`, the closing summary in
:mod:`~scgpt_protocol.protocol.display.summary`):

* :func:`checkpoint_banner` -- which pretrained model the run uses; a visible warning box for the
  tiny random demo checkpoint (once per report);
* :func:`training_report` / :func:`settings_table` -- what 02 ran with and what its curve says;
* :func:`describe_refinement` -- abstention and majority voting in words;
* :func:`next_steps` -- the closing "Next" of a report: what to run or change next.
"""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd

from ...core.io import read_json
from ...data.labels import UNKNOWN
from ...metrics import BASELINE_METHOD, SCGPT_METHOD
from .tables import fmt_value, styled

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

    from ...core.layout import RunLayout
    from ...core.params import StepParams

__all__ = ["describe_refinement", "Banner", "checkpoint_banner", "training_report", "settings_table", "next_steps"]


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


#: above this expected calibration error on the test cells, 03's Next points to the reliability diagram
CALIBRATION_TIP_ECE = 0.1


def next_steps(layout: RunLayout, step: str, *, summary_page: bool = False) -> Banner:
    """The closing "Next" of a step's report: the notebook to run next and the parameter to change, read
    from what the run wrote (the best epoch, scGPT against the baseline, the coverage of abstention).
    ``summary_page``: for ``reports/index.html`` itself (no pointer to it)."""
    tips: list[str] = []
    demo = (read_json(layout.checkpoint_record, default={}) or {}).get("kind") == "demo"
    if step == "01_preprocess":
        tips.append("run 02_finetune with the same run_dir to fine-tune on the train split.")
    elif step == "02_finetune":
        summary = read_json(layout.train_summary, default={}) or {}
        best, run = summary.get("best_epoch"), summary.get("epochs_run")
        if best is not None and best == run and (run or 0) > 1:
            tips.append(f"the best epoch is the last one ({best}): raise epochs and run 02 again with the same "
                        "run_dir (training continues), or go on.")
        tips.append("run 03_evaluate with the same run_dir to score the model on the test split.")
    elif step in ("03_evaluate", "04_zeroshot"):
        evaluated = read_json(layout.metrics, default={}) or {}
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
            f"(validation macro-F1 {fmt_value(score)}); {int(summary.get('trainable_parameters', 0)):,} of "
            f"{int(summary.get('total_parameters', 0)):,} parameters trained in "
            f"{float(summary.get('seconds', 0)):.0f} s"
            + (f", peak memory {memory / 2**20:,.0f} MB." if memory else "."))
    if best == run and run > 1:
        return Banner("The best epoch is the last one.",
                      f"{text} Validation macro-F1 was still improving when training ended, so more epochs "
                      "may help: raise epochs and run this notebook again with the same run_dir (training "
                      "continues from the last epoch).")
    stopped = history is not None and "stopped" in history.columns and bool(history["stopped"].fillna(False).any())
    tail = f" Training stopped early: no better validation macro-F1 for {run - best} epochs." if stopped else ""
    return Banner("", text + tail, level="info")


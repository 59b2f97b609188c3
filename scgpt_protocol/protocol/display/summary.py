"""The closing summary of 03 and 04 (and of ``reports/index.html``): scGPT fine-tuned, the baseline and zero-shot
kNN on the same cells under the same rule, one rounded table and a one-line verdict (:func:`run_summary`)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from ...core.io import read_json
from ...data.labels import UNKNOWN
from ...metrics import BASELINE, BASELINE_METHOD, HEADERS, SCGPT, SCGPT_METHOD, SUMMARY_METRICS, ZEROSHOT, metrics_table
from .tables import DECIMALS, fmt_value, styled

if TYPE_CHECKING:
    from ...core.layout import RunLayout

__all__ = ["Summary", "summary_of", "run_summary"]

#: the three methods of :func:`run_summary`, as a reader sees them
SCGPT_NAME, BASELINE_NAME, ZEROSHOT_NAME = SCGPT.label, BASELINE.label, ZEROSHOT.label


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
            out[column] = [fmt_value(v) for v in out[column]]
        out["n cells"] = [fmt_value(None if pd.isna(v) else int(v)) for v in out["n cells"]]
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
    record = read_json(layout.checkpoint_record, default={}) or {}
    metrics = read_json(layout.metrics, default={}) or {}
    methods = metrics.get("methods") or {}
    eval_cells = _cells(layout.predictions)
    zs_cells = _cells(layout.zeroshot_predictions)
    zs = read_json(layout.zeroshot_metrics, default={}) or {}
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

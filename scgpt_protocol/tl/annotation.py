"""Which way of adapting scGPT works on *your* labelled data, at what cost, and does it beat a baseline?

:func:`adapt_annotation` inspects and prepares the data once (one stratified, recorded split), adapts
the pretrained model with each requested strategy on the same split, ranks the strategies by
validation macro-F1, keeps the best, and writes a bundle: a comparison table (CSV and Markdown) with
test metrics, trainable parameters, training time, peak memory and saved size per strategy, beside a
logistic-regression baseline; the best model's confusion matrix; plots.

Strategies (:mod:`scgpt_protocol.adapt.strategies`): ``probe``, ``head``, ``full`` (ours, plain PyTorch),
``lora`` and ``ia3`` (through ``peft``), ``adapter`` and ``prefix_tuning`` (small modules of ours,
since ``peft`` has no such method for a custom model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..adapt.cells import data_fingerprint
from ..adapt.saved import load_finetuned, save_finetuned
from ..adapt.train import TrainResult, finetune, strategy_config
from ..annotate.inference import predict
from ..annotate.prediction import Prediction
from ..core.io import atomic_write, read_json
from ..core.layout import RunLayout
from ..core.params import STRATEGY_NAMES, FinetuneParams, ParamsError, PreprocessParams
from ..core.renamed import renamed_arguments
from ..evaluate.baseline import logistic_regression_baseline
from ..metrics import BASELINE_METHOD, classification_metrics, confusion
from ..model.checkpoint import load_model, read_vocab

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model.scgpt import ScGPT
    from ..pp.inspect import Inspection

logger = logging.getLogger(__name__)

__all__ = ["AnnotationRunner", "adapt_annotation", "compare_strategies", "inspect_annotation_data"]



def _checkpoint_dir(checkpoint: str | Path) -> Path:
    """``"whole-human"`` (downloaded once into the cache) or a checkpoint folder."""
    from ..model.checkpoint import locate_checkpoint

    return locate_checkpoint(checkpoint)[0]


def _checkpoint_record(checkpoint: str | Path) -> dict[str, Any]:
    """The record of a checkpoint (a clear error when it is not one: its vocabulary is read)."""
    from ..model.checkpoint import checkpoint_record, locate_checkpoint

    path, kind = locate_checkpoint(checkpoint)
    read_vocab(path)
    return checkpoint_record(path, kind)


def inspect_annotation_data(
    adata: AnnData, label_key: str, *, checkpoint: str | Path = "whole-human", batch_key: str | None = None,
    layer: str | None = None, gene_symbol_key: str | None = None,
) -> Inspection:
    """What the data holds for annotation with ``checkpoint``: genes matched and overlap ratio, class counts
    and the smallest class, counts or log-normalised values, and warnings. Prints readably in a notebook."""
    from ..pp.inspect import inspect_adata

    vocab = read_vocab(_checkpoint_dir(checkpoint))
    return inspect_adata(adata, label_key=label_key, vocab=vocab, batch_key=batch_key, layer=layer,
                         gene_symbol_key=gene_symbol_key)


@dataclass
class StrategyOutcome:
    """One strategy's row of the comparison."""

    strategy: str
    train: TrainResult
    test_metrics: dict[str, Any]
    saved_bytes: int
    model_dir: Path | None
    test_confusion: pd.DataFrame  # row-normalised, rows = true labels (from the one test-split prediction)


@dataclass
class AnnotationRunner:
    """Adapts a pretrained checkpoint to a prepared, split dataset with one or more strategies.

    ``adata`` holds non-negative expression, labels in ``obs[label_key]`` and ``obs["split"]``
    (``train`` / ``val`` / ``test``), as 01_preprocess or :func:`adapt_annotation` write it.
    """

    adata: AnnData
    label_key: str
    categories: list[str]
    base_checkpoint: dict[str, Any]
    params: FinetuneParams = field(default_factory=FinetuneParams)
    outcomes: dict[str, StrategyOutcome] = field(default_factory=dict)
    best_strategy: str | None = None
    model: ScGPT | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None

    def __post_init__(self) -> None:  # parameters left at None: the recipe for the base checkpoint
        self.params = self.params.with_recipe(self.base_checkpoint.get("kind"))

    # -- training --
    def fit(self, strategies: Sequence[str], *, output_dir: str | Path | None = None) -> pd.DataFrame:
        """Train each strategy on the same split; keep the best by validation macro-F1.

        With ``output_dir`` each strategy's model is saved to ``output_dir/strategies/<name>/`` (its
        saved size is measured there), and a strategy already saved there with the same settings is
        reloaded instead of retrained (resume after an interruption).
        """
        unknown = [s for s in strategies if s not in STRATEGY_NAMES]
        if unknown or not strategies:
            msg = f"unknown strategy {unknown or strategies!r}; valid strategies: {list(STRATEGY_NAMES)}."
            raise ValueError(msg)
        test = self.adata[(self.adata.obs["split"] == "test").to_numpy()]
        best_score = -1.0
        for strategy in dict.fromkeys(strategies):
            outcome, model = self._fit_one(strategy, test, Path(output_dir) if output_dir else None)
            self.outcomes[strategy] = outcome
            if outcome.train.best_val_macro_f1 > best_score:
                best_score, self.best_strategy, self.model = outcome.train.best_val_macro_f1, strategy, model
            logger.info("%s: val macro-F1 %.4f, test macro-F1 %.4f", strategy, outcome.train.best_val_macro_f1,
                        outcome.test_metrics["macro_f1"])
        self.model = self.model.cpu() if self.model is not None else None
        self.manifest = self._manifest(self.best_strategy)
        logger.info("best strategy by validation macro-F1: %s", self.best_strategy)
        self._calibrate()
        return self.comparison

    def _calibrate(self) -> None:
        """The best model's temperature, fitted on the validation cells: :meth:`predict` then gives calibrated
        probabilities, and :meth:`save` records it."""
        from ..annotate.calibration import fit_validation_temperature

        if self.model is None or not (self.adata.obs["split"] == "val").any():
            logger.warning("no validation cells: the best model's probabilities stay uncalibrated")
            return
        record = fit_validation_temperature(self._require_model(), self.adata, self.manifest, self.params,
                                            self.params.max_seq_len)
        self.model.temperature = record["temperature"]
        self.manifest["calibration"] = record

    def _fit_one(self, strategy: str, test: AnnData, output_dir: Path | None) -> tuple[StrategyOutcome, ScGPT]:
        directory = output_dir / "strategies" / strategy if output_dir else None
        fingerprint = data_fingerprint(self.adata, self.label_key, self.categories,
                                       base_sha256=self.base_checkpoint.get("sha256"))
        if directory is not None and (directory / "outcome.json").is_file():
            saved = read_json(directory / "outcome.json", default={}, lenient=True)
            if saved.get("training") == self.params.to_dict() and saved.get("data") == fingerprint:
                logger.info("%s: reusing the model saved in %s", strategy, directory)
                model, _ = load_finetuned(directory, device=self.params.device)
                train = TrainResult(**{**saved["train"], "history": pd.DataFrame(saved["history"]),
                                       "model_dir": directory})
                conf = pd.DataFrame(saved["test_confusion"]["values"]).reindex(index=self.categories,
                                                                               columns=self.categories)
                conf.attrs.update(saved["test_confusion"]["attrs"])
                outcome = StrategyOutcome(strategy, train, saved["test_metrics"], saved["saved_bytes"], directory, conf)
                return outcome, model
        model = load_model(self.base_checkpoint["checkpoint"], n_classes=len(self.categories),
                           head_seed=self.params.seed, device=self.params.device)
        result = finetune(model, self.adata, self.params, label_key=self.label_key, categories=self.categories,
                          strategy=strategy, base_checkpoint=self.base_checkpoint)
        pred = self._predict_with(model, test, desc=f"{strategy}: test split")
        truth = test.obs[self.label_key].astype(str).to_numpy()
        metrics = classification_metrics(truth, pred.labels, categories=self.categories, proba=pred.probabilities)
        conf = confusion(truth, pred.labels, self.categories)
        saved_bytes = 0
        if directory is not None:
            save_finetuned(model, directory, strategy=strategy, config=strategy_config(self.params, strategy),
                           label_key=self.label_key, categories=self.categories, genes=list(self.adata.var_names),
                           base_checkpoint=self.base_checkpoint,
                           extra={"training": self.params.to_dict(), "val_macro_f1": result.best_val_macro_f1})
            saved_bytes = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            result.model_dir = directory
            record = {"training": self.params.to_dict(), "data": fingerprint,
                      "train": result.summary() | {"model_dir": None},
                      "history": result.history.to_dict(orient="list"), "test_metrics": metrics,
                      "test_confusion": {"values": conf.to_dict(), "attrs": conf.attrs}, "saved_bytes": saved_bytes}
            RunLayout(directory).write_json(directory / "outcome.json", record)
        return StrategyOutcome(strategy, result, metrics, saved_bytes, directory, conf), model.cpu()

    def _predict_with(self, model: ScGPT, adata: AnnData, desc: str = "predicting",
                      genes: Sequence[str] | None = None) -> Prediction:
        return predict(model, adata, categories=self.categories, batch_size=self.params.batch_size * 2,
                       max_seq_len=self.params.max_seq_len, seed=self.params.seed, desc=desc, genes=genes,
                       precision=self.params.precision if self.params.amp else "fp32")

    def fit_baseline(self) -> dict[str, Any]:
        """CellTypist-style logistic regression on log1p-CP10k HVGs of the same split (the row every comparison
        shows)."""
        result = logistic_regression_baseline(self.adata, label_key=self.label_key, seed=self.params.seed)
        self.baseline = {"metrics": result.metrics, "n_genes": result.n_genes, "n_classes": len(result.categories)}
        return self.baseline

    # -- results --
    @property
    def comparison(self) -> pd.DataFrame:
        """One row per strategy (and the baseline): test metrics and costs; sorted by validation macro-F1."""
        rows = []
        for name, o in self.outcomes.items():
            rows.append({
                "strategy": name, "val_macro_f1": o.train.best_val_macro_f1,
                "test_accuracy": o.test_metrics["accuracy"], "test_macro_f1": o.test_metrics["macro_f1"],
                "test_weighted_f1": o.test_metrics["weighted_f1"],
                "trainable_parameters": o.train.trainable_parameters, "train_seconds": o.train.seconds,
                "peak_memory_mb": round(o.train.peak_memory_bytes / 2**20, 1),
                "saved_mb": round(o.saved_bytes / 2**20, 3) if o.saved_bytes else None,
                "best": name == self.best_strategy,
            })
        rows.sort(key=lambda r: -r["val_macro_f1"])
        if self.baseline is not None:
            m = self.baseline["metrics"]
            rows.append({"strategy": f"baseline: {BASELINE_METHOD}", "val_macro_f1": None,
                         "test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"],
                         "test_weighted_f1": m["weighted_f1"],
                         "trainable_parameters": (self.baseline["n_genes"] + 1) * self.baseline["n_classes"],
                         "train_seconds": None, "peak_memory_mb": None, "saved_mb": None, "best": False})
        return pd.DataFrame(rows)

    def _manifest(self, strategy: str | None) -> dict[str, Any]:
        from ..core.io import package_versions

        split = self.adata.uns.get("scgpt_protocol", {}).get("preprocess", {}) if hasattr(self.adata, "uns") else {}
        return {
            "strategy": strategy,
            "strategy_config": (cfg.to_dict() if strategy and (cfg := strategy_config(self.params, strategy))
                                else None),
            "label_key": self.label_key, "categories": self.categories, "genes": list(self.adata.var_names),
            "base_checkpoint": self.base_checkpoint, "training": self.params.to_dict(),
            "split_seed": (split.get("params") or {}).get("seed") if isinstance(split, Mapping) else None,
            "versions": package_versions(),
        }

    # -- using the best model --
    def _require_model(self) -> ScGPT:
        """The best model, on the runner's device (kept on the CPU between uses)."""
        from ..core.device import resolve_device

        if self.model is None:
            raise RuntimeError("no model yet: call fit() first, or AnnotationRunner.load(directory).")
        return self.model.to(resolve_device(self.params.device))

    def predict(self, adata: AnnData, *, min_confidence: float = 0.0, majority_voting: bool = False,
                resolution: float | None = None) -> Prediction:
        """Labels, confidences and fine-tuned embeddings of the best model for ``adata``.

        Data holding less than :data:`~scgpt_protocol.model.vocab.MIN_GENE_OVERLAP` of the model's training
        genes is refused with a :class:`~scgpt_protocol.core.errors.GeneMatchError` (the rule of every step).
        ``min_confidence`` (cells whose predicted-class probability is below it are ``"Unknown"``) and
        ``majority_voting`` (the majority label of each over-cluster of the fine-tuned embedding, at
        ``resolution`` or CellTypist's rule) apply :func:`~scgpt_protocol.annotate.refinement.refine`.
        """
        model = self._require_model()
        genes = self.manifest.get("genes") or list(self.adata.var_names)
        prediction = self._predict_with(model, adata, genes=genes)
        if min_confidence or majority_voting:
            from ..annotate.refinement import refine

            prediction = refine(prediction, min_confidence=min_confidence, majority_voting=majority_voting,
                                resolution=resolution, seed=self.params.seed)
        return prediction

    @renamed_arguments(obs_key="key_added", embedding_key="embedding_key_added")
    def annotate_adata(self, adata: AnnData, key_added: str = "scgpt_label", embedding_key_added: str = "X_scgpt", *,
                       min_confidence: float = 0.0, majority_voting: bool = False,
                       resolution: float | None = None) -> None:
        """Write labels (``obs[key_added]``), codes, confidences and embeddings into ``adata`` (in place).

        With ``min_confidence`` / ``majority_voting`` (see :meth:`predict`) also ``obs["scgpt_prediction"]``
        (the class before abstention), ``obs["scgpt_unknown"]``, ``obs["scgpt_over_clustering"]``,
        ``obs["scgpt_majority_voting"]`` and ``uns["scgpt_annotation"]`` (the parameters).
        """
        from ..annotate.inference import annotate

        prediction = self.predict(adata, min_confidence=min_confidence, majority_voting=majority_voting,
                                  resolution=resolution)
        annotate(adata, prediction, key_added=key_added, embedding_key_added=embedding_key_added)

    # -- saving --
    def save(self, directory: str | Path) -> Path:
        """Save the best model (only what was trained, for PEFT strategies) with ``manifest.json``."""
        model = self._require_model()
        m = self.manifest
        config = strategy_config(self.params, m["strategy"])
        return save_finetuned(model, directory, strategy=m["strategy"], config=config, label_key=m["label_key"],
                              categories=m["categories"], genes=m["genes"], base_checkpoint=m["base_checkpoint"],
                              extra={k: m[k] for k in ("training", "split_seed", "calibration") if k in m})

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> AnnotationRunner:
        """A runner around a saved model; a base checkpoint that differs from the recorded one is an error."""
        model, manifest = load_finetuned(directory, device=device)
        training = {k: v for k, v in (manifest.get("training") or {}).items() if k in FinetuneParams.field_names()}
        params = FinetuneParams(**{**training, "device": device})
        runner = cls(adata=None,  # type: ignore[arg-type]
                     label_key=manifest["label_key"], categories=manifest["categories"],
                     base_checkpoint=manifest["base_checkpoint"], params=params, best_strategy=manifest["strategy"],
                     model=model, manifest=manifest)
        return runner

    def write_bundle(self, output_dir: str | Path) -> dict[str, Path]:
        """comparison.csv / comparison.md, and the best model's confusion matrix and per-class F1 plots."""
        from ..pl.metrics import plot_confusion, plot_per_class_f1

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        layout = RunLayout(out)
        table = self.comparison
        written = {"comparison_csv": layout.write_csv(table, out / "comparison.csv", index=False)}
        written["comparison_md"] = atomic_write(out / "comparison.md",
                                                lambda tmp: tmp.write_text(_markdown(table) + "\n"))
        best = self.outcomes.get(self.best_strategy or "")
        if best is not None:
            from ..pl.figure import save_figure

            title = f"{self.best_strategy}, test split"
            written["confusion"] = save_figure(plot_confusion(best.test_confusion, title=title), layout,
                                               "confusion_best")
            methods = {name: o.test_metrics for name, o in self.outcomes.items()}
            if self.baseline is not None:
                methods[BASELINE_METHOD] = self.baseline["metrics"]
            written["per_class_f1"] = save_figure(plot_per_class_f1(methods), layout, "per_class_f1")
        return written


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append("" if v is None or (isinstance(v, float) and np.isnan(v)) else
                         f"{v:.3f}" if isinstance(v, float) else
                         f"{v:,}" if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adapt_annotation(
    adata: AnnData,
    label_key: str,
    *,
    checkpoint: str | Path = "whole-human",
    strategies: Sequence[str] = ("probe", "head"),
    output_dir: str | Path = "scgpt_annotation",
    baseline: bool = True,
    **overrides: Any,
) -> AnnotationRunner:
    """Inspect, prepare and split ``adata`` once, adapt the checkpoint with each strategy, keep the best.

    Parameters
    ----------
    adata
        Labelled cells: raw counts or log-normalised values, gene symbols in ``var_names``.
    label_key
        ``obs`` column with the cell types.
    checkpoint
        ``"whole-human"`` (downloaded once into the cache) or a checkpoint folder.
    strategies
        Any of ``probe``, ``head``, ``full``, ``lora``, ``adapter``, ``prefix_tuning``, ``ia3``.
    output_dir
        The bundle: ``comparison.csv``/``.md``, figures, ``strategies/<name>/`` and ``model/`` (the best).
    **overrides
        Fields of :class:`~scgpt_protocol.core.params.PreprocessParams` (``n_hvg``, ``test_size``,
        ``batch_key``...) and :class:`~scgpt_protocol.core.params.FinetuneParams` (``epochs``, ``lr``,
        ``weight_decay``, ``warmup_ratio``, ``batch_size``, ``class_weighted``, ``lora_r``...).

    Returns
    -------
    AnnotationRunner
        ``.comparison`` (a DataFrame), ``.best_strategy``, ``.predict(adata)``, ``.annotate_adata(adata)``.
    """
    from ..pp.in_memory import prepare

    fixed = {"run_dir", "mount_drive", "label_key", "checkpoint"}  # set by the arguments above
    pre_fields, ft_fields = set(PreprocessParams.field_names()) - fixed, set(FinetuneParams.field_names()) - fixed
    unknown = sorted(set(overrides) - pre_fields - ft_fields)
    if unknown:
        msg = f"unknown setting(s) {unknown}; valid: {sorted(pre_fields | ft_fields)}."
        raise ParamsError(msg)
    out = Path(output_dir)
    record = _checkpoint_record(checkpoint)
    pre = PreprocessParams(**{k: v for k, v in overrides.items() if k in pre_fields},
                           run_dir=str(out), label_key=label_key, checkpoint=record["checkpoint"])
    params = FinetuneParams(**{k: v for k, v in overrides.items() if k in ft_fields}, run_dir=str(out))
    inspection = inspect_annotation_data(adata, label_key, checkpoint=record["checkpoint"], batch_key=pre.batch_key,
                                         layer=pre.layer, gene_symbol_key=pre.gene_symbol_key)
    logger.info("%s", inspection)
    prepared = prepare(adata, pre, read_vocab(record["checkpoint"]))
    runner = AnnotationRunner(prepared.adata, label_key=label_key, categories=list(prepared.categories),
                              base_checkpoint=record, params=params)
    runner.fit(list(strategies), output_dir=out)
    if baseline:
        runner.fit_baseline()
    runner.write_bundle(out)
    runner.save(out / "model")
    out.joinpath("split.csv").write_text(prepared.adata.obs[["split"]].to_csv())
    logger.info("comparison:\n%s", runner.comparison.to_string(index=False))
    return runner


def compare_strategies(
    adata: AnnData,
    params: FinetuneParams,
    layout: Any,
    *,
    label_key: str,
    categories: Sequence[str],
    base_checkpoint: Mapping[str, Any],
) -> AnnotationRunner:
    """02_finetune with ``strategies``: compare them on the run's split and keep the best in ``model/``.

    Writes the comparison bundle to ``train/comparison/`` and, like a single-strategy run, the best
    strategy's ``train/history.csv``, ``train/summary.json`` and ``model/``.
    """
    runner = AnnotationRunner(adata, label_key=label_key, categories=list(categories),
                              base_checkpoint=dict(base_checkpoint), params=params)
    out = layout.train_dir / "comparison"
    runner.fit(list(params.strategies), output_dir=out)
    runner.fit_baseline()
    runner.write_bundle(out)
    runner.save(layout.model_dir)
    best = runner.outcomes[runner.best_strategy].train
    layout.write_csv(best.history, layout.history, index=False)
    layout.write_json(layout.train_summary, best.summary() | {"model_dir": str(layout.model_dir),
                                                             "comparison": str(out / "comparison.csv")})
    return runner

"""Parameters of the four protocol steps: one dataclass per step, the single source of truth.

A notebook's ``parameters`` cell and every ``params/<scenario>/<notebook-stem>.yaml`` hold exactly
(a subset of) these fields; ``tests/test_notebook_structure.py`` keeps the three in line.
:meth:`StepParams.from_namespace` reads the cell's variables, type-, range- and choice-checks them,
and writes ``run_dir/params/<step>.yaml``. An unknown key in a YAML file is an error.

A field whose default is None "(None: recipe)" takes its value from :data:`RECIPES` for the kind of checkpoint
01 recorded (:meth:`StepParams.with_recipe`): the published values for a pretrained checkpoint, the demo's for
the demo checkpoint. The notebooks' defaults, ``params/demo`` and ``make demo`` therefore run the same demo.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import yaml

from .errors import shown

__all__ = ["StepParams", "PreprocessParams", "FinetuneParams", "EvaluateParams", "ZeroshotParams", "STEPS",
    "load_params_file", "parameters_cell", "RECIPES", "recipe_kind", "published_adam_eps", "resolve_run_dir"]


#: the adaptation strategies (scgpt_protocol.adapt.strategies implements them)
STRATEGY_NAMES = ("probe", "head", "full", "lora", "adapter", "prefix_tuning", "ia3")


logger = logging.getLogger(__name__)


class ParamsError(ValueError):
    """A parameter value or a parameter file is wrong."""


def _f(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None, advanced: bool = False) -> Any:
    """A parameter: default, help text, checks; ``advanced`` ones come last in the notebook's cell."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max,
                                            "advanced": advanced})


def _field_types(kind: Any) -> tuple[bool, tuple[type, ...]]:
    """``(optional, the types a value may have)`` of a field's annotation: ``Optional[int]`` -> ``(True, (int,))``,
    ``Optional[Union[str, dict]]`` -> ``(True, (str, dict))``, ``bool`` -> ``(False, (bool,))``."""
    if typing.get_origin(kind) is not typing.Union:
        return False, (kind,)
    args = typing.get_args(kind)
    return type(None) in args, tuple(a for a in args if a is not type(None))


def _device() -> Any:
    return _f("auto", "'auto' (cuda, mps, cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'", advanced=True)


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: the numeric types a YAML string such as "1e-4" may stand for (PyYAML reads 1e-4 as a string)
_NUMERIC = (int, float)


def _coerce_number(value: Any, base: type) -> Any:
    """``"1e-4"`` -> 1e-4 for a float field, ``"3"`` / ``"1e3"`` -> 3 / 1000 for an int field; else unchanged.

    PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; users write it that way.
    """
    if not isinstance(value, str) or base not in _NUMERIC:
        return value
    try:
        number = float(value.strip())
    except ValueError:
        return value
    if base is int:
        return int(number) if number.is_integer() else value
    return number


#: the values of every ``precision`` parameter (scgpt_protocol.core.device.PRECISIONS; no torch import here)
PRECISION_NAMES = ("auto", "fp32", "bf16", "fp16")


def _precision(what: str) -> Any:
    return _f("auto", f"{what}: auto (bf16 where supported, fp16 on old GPUs, else fp32), fp32, bf16, fp16",
              choices=PRECISION_NAMES, advanced=True)


#: what a parameter left at None (its default) means, for each kind of checkpoint 01 recorded: the published
#: fine-tuning recipe for a pretrained checkpoint; for the tiny random demo checkpoint, values it can learn with
#: from scratch on 2 CPU cores (a 10x higher lr, Adam eps 1e-8: with 1e-4 it stays at chance; a class-weighted
#: loss for the rare populations; shorter sequences) and abstention + majority voting shown in 03 and 04.
#: The one source of the demo: the notebooks' defaults, params/demo and ``make demo`` all resolve through it.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "pretrained": {
        "finetune": {"lr": 1e-4, "adam_eps": "published", "batch_size": 32, "max_seq_len": 1200,
                     "class_weighted": False},
        "evaluate": {"min_confidence": 0.0, "majority_voting": False},
        "zeroshot": {"max_seq_len": 1200, "min_confidence": 0.0, "majority_voting": False},
    },
    "demo": {
        "finetune": {"lr": 1e-3, "adam_eps": 1e-8, "batch_size": 16, "max_seq_len": 256, "class_weighted": True},
        "evaluate": {"min_confidence": 0.5, "majority_voting": True},
        "zeroshot": {"max_seq_len": 256, "min_confidence": 0.5, "majority_voting": True},
    },
}


def recipe_kind(checkpoint_kind: str | None) -> str:
    """The recipe for a checkpoint of this kind (``checkpoint.json``'s ``kind``): ``demo`` or ``pretrained``."""
    return "demo" if checkpoint_kind == "demo" else "pretrained"


def published_adam_eps(amp: bool) -> float:
    """Adam's eps as the official fine-tuning loop sets it: 1e-4 whenever ``amp`` is on (on every device, so a
    result does not depend on the GPU generation), else PyTorch's 1e-8."""
    return 1e-4 if amp else 1e-8


def _recipe(step: str, name: str, what: str, *, advanced: bool = True, **checks: Any) -> Any:
    """A parameter whose default (None) is the recipe for the run's checkpoint (:data:`RECIPES`)."""
    assert all(name in RECIPES[kind][step] for kind in RECIPES), name
    return _f(None, f"{what} (None: recipe)", advanced=advanced, **checks)


def resolve_run_dir(run_dir: str | Path, cwd: str | Path | None = None) -> Path:
    """The absolute run folder, the same for a notebook and the headless runner.

    A relative ``run_dir`` is taken from the protocol folder (the one holding ``notebooks/`` and ``params/``:
    a clone or ``scgpt-protocol init``) when the working directory is its ``notebooks/`` folder, as in
    JupyterLab; else from the working directory. So ``runs/demo`` is ``<protocol>/runs/demo`` from
    ``make demo`` and from a notebook opened in ``<protocol>/notebooks/`` alike.
    """
    path = Path(run_dir).expanduser()
    if path.is_absolute():
        return path.resolve()
    base = Path(cwd) if cwd is not None else Path.cwd()
    if base.name == "notebooks" and (base.parent / "params").is_dir():
        base = base.parent
    return (base / path).resolve()



#: the longest text one parameter may hold (a path's limit on Linux): a longer value is a mistake (a file pasted
#: into a field), refused before anything runs rather than copied into every record and report
MAX_TEXT = 4096


def _check_text_length(params: StepParams, name: str, value: Any) -> None:
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, Mapping):
        texts = [str(x) for item in value.items() for x in item]
    elif isinstance(value, (list, tuple)):
        texts = [str(x) for x in value]
    else:
        texts = []
    longest = max((len(t) for t in texts), default=0)
    if longest > MAX_TEXT:
        params._fail(name, value, f"text of at most {MAX_TEXT:,} characters (a column name, a path or a label); "
                                  f"it holds {longest:,}")


@dataclass
class StepParams:
    """Fields shared by every step."""

    STEP: ClassVar[str] = ""
    NOTEBOOK: ClassVar[str] = ""

    run_dir: str = _f("runs/demo", "every output goes here; use the same run_dir in all four notebooks")
    seed: int = _f(0, "random seed (splits, gene sampling, training)", min=0, advanced=True)
    mount_drive: bool = _f(False, "Colab only: mount Google Drive (keep run_dir there to survive disconnects)")

    def __post_init__(self) -> None:
        self.validate()

    # -- validation --
    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = hints[f.name]
            optional, bases = _field_types(kind)
            base = bases[0]
            _check_text_length(self, f.name, value)
            if value is None:
                if optional:
                    continue
                self._fail(f.name, value, f"a {base.__name__}")
            if len(bases) > 1:  # e.g. a label map: a CSV path or an inline mapping
                if not isinstance(value, bases):
                    self._fail(f.name, value, " or ".join(f"a {b.__name__}" for b in bases)
                               + (" or None" if optional else ""))
                continue
            coerced = _coerce_number(value, base)
            if coerced is not value:
                value = coerced
                setattr(self, f.name, value)
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
                self._fail(f.name, value, f"a {base.__name__}" + (" or None" if optional else ""))
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                self._fail(f.name, value, f"one of {list(meta['choices'])}")
            if meta.get("min") is not None and value < meta["min"]:
                self._fail(f.name, value, f">= {meta['min']}")
            if meta.get("max") is not None and value > meta["max"]:
                self._fail(f.name, value, f"<= {meta['max']}")
            if f.name == "device" and not _DEVICE.match(value):
                self._fail(f.name, value, "'auto', 'cpu', 'cuda', 'cuda:N' (a GPU index) or 'mps'")
        self._check()

    def _check(self) -> None:
        """Checks across fields (subclasses)."""

    def _fail(self, name: str, value: Any, expected: str) -> None:
        msg = (
            f"parameter {name}={shown(value)} of step {self.STEP!r} is invalid: expected {expected}. "
            f"Fix it in the parameters cell of {self.NOTEBOOK} or in the YAML file."
        )
        raise ParamsError(msg)

    # -- construction --
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "parameters") -> StepParams:
        """Build from a mapping; an unknown key is an error naming the valid ones."""
        names = cls.field_names()
        unknown = sorted(set(values) - set(names))
        if unknown:
            import difflib

            hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, names, 1)) else repr(u)
                     for u in unknown]
            msg = (
                f"unknown parameter(s) {', '.join(hints)} in {source} for step {cls.STEP!r}; "
                f"valid: {names}."
            )
            raise ParamsError(msg)
        return cls(**dict(values))

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any], *, write: bool = True) -> StepParams:
        """Build from a notebook's globals (the parameters cell, maybe overridden by papermill).

        Takes the run folder (:meth:`~scgpt_protocol.core.layout.RunLayout.hold`: one notebook or run writes it at
        a time) and writes ``run_dir/params/<step>.yaml`` so that the run records what it ran with.
        """
        cls._check_injected(namespace)
        missing = [n for n in cls.field_names() if n not in namespace]
        if missing:
            msg = f"the parameters cell of {cls.NOTEBOOK} lacks {missing}; restore them from the package's notebook."
            raise ParamsError(msg)
        params = cls(**{n: namespace[n] for n in cls.field_names()})
        params.run_dir = str(resolve_run_dir(params.run_dir))
        if cls.RECIPE_FIELDS:
            params = params.with_recipe(_checkpoint_kind(params.run_dir, cls.NOTEBOOK))
        from .log import ensure_logging

        ensure_logging()
        logger.info("run_dir: %s%s", params.run_dir, f"; {params.recipe_note()}" if cls.RECIPE_FIELDS else "")
        if write:  # the run folder first: another notebook or run writing it stops here, before any file changes
            from .layout import RunLayout

            layout = RunLayout(params.run_dir).hold(params.STEP)
            params.to_yaml(layout.step_params(params.STEP))
        return params

    # -- the recipe --
    #: fields whose default (None) is the recipe for the run's checkpoint (:data:`RECIPES`)
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def with_recipe(self, checkpoint_kind: str | None) -> StepParams:
        """A copy with every recipe field left at None set from :data:`RECIPES` for a checkpoint of this kind
        (``"demo"``, ``"released"``, ``"folder"``...). ``.recipe`` records the recipe and what it set. Already
        resolved parameters come back as they are."""
        if getattr(self, "recipe", None) is not None:
            return self
        kind = recipe_kind(checkpoint_kind)
        recipe = RECIPES[kind].get(self.STEP, {})
        values = {}
        for name in self.RECIPE_FIELDS:
            if getattr(self, name) is None:
                value = recipe[name]
                values[name] = published_adam_eps(getattr(self, "amp", True)) if value == "published" else value
        out = dataclasses.replace(self, **values)
        out.recipe = {"kind": kind, "set": values}
        return out

    def recipe_note(self) -> str:
        """One line: which recipe the parameters left at None took, and their values."""
        info = getattr(self, "recipe", None)
        if not info:
            return "recipe not resolved"
        where = "the demo checkpoint" if info["kind"] == "demo" else "a pretrained checkpoint"
        values = ", ".join(f"{k}={v!r}" for k, v in info["set"].items())
        return f"recipe for {where}: {values}" if values else f"recipe for {where}: every value set by hand"

    @classmethod
    def _check_injected(cls, namespace: Mapping[str, Any]) -> None:
        """Fail on names papermill injected that are not parameters (papermill itself only warns).

        papermill's injected cell starts with the line ``# Parameters``; IPython keeps every executed
        cell's source in ``In``.
        """
        import ast

        history = namespace.get("In")
        if not isinstance(history, list):
            return
        for source in history:
            if not (isinstance(source, str) and source.startswith("# Parameters\n")):
                continue
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                     if isinstance(t, ast.Name)}
            cls.from_mapping({n: namespace.get(n) for n in names - set(cls.field_names())},
                             source="the parameters papermill injected")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        """The parameters as run (the recipe's values filled in; a comment says which came from it)."""
        from .io import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = getattr(self, "recipe", None)
        head = f"# {self.recipe_note()}{' (these were None)' if info['set'] else ''}\n" if info else ""
        text = head + yaml.safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class PreprocessParams(StepParams):
    """01_preprocess: load, inspect, filter, normalise, select genes, split."""

    STEP: ClassVar[str] = "preprocess"
    NOTEBOOK: ClassVar[str] = "01_preprocess.ipynb"

    adata_path: str = _f("demo", "an .h5ad file, or 'demo' for scanpy's bundled pbmc68k_reduced")
    label_key: str = _f("bulk_labels", "adata.obs column with the cell-type labels")
    batch_key: Optional[str] = _f(None, "adata.obs column with batches (batch-aware HVG selection)")
    layer: Optional[str] = _f(None, "adata.layers key with counts or log-normalised values (None: X)")
    gene_symbol_key: Optional[str] = _f(None, "adata.var column with gene symbols (None: var_names)")
    label_map: Optional[Union[str, dict]] = _f(None, "labels -> names to learn: CSV (label,name) or a mapping")
    checkpoint: str = _f("demo", "'demo' (tiny random checkpoint), 'whole-human' (download) or a folder")
    min_genes: int = _f(0, "drop cells with fewer expressed genes", min=0, advanced=True)
    min_cells: int = _f(0, "drop genes expressed in fewer cells", min=0, advanced=True)
    max_pct_mito: Optional[float] = _f(None, "drop cells with more % mitochondrial counts (None: keep)", min=0,
                                       max=100, advanced=True)
    normalize: str = _f("auto", "normalise_total + log1p: 'auto' (only raw counts), 'yes' or 'no'",
                        choices=("auto", "yes", "no"), advanced=True)
    n_hvg: Optional[int] = _f(None, "keep this many highly variable genes (None: all known genes)", min=1,
                              advanced=True)
    test_size: float = _f(0.2, "share of cells in the test split", min=0.05, max=0.5, advanced=True)
    val_size: float = _f(0.1, "share of cells in the validation split", min=0.05, max=0.5, advanced=True)
    min_cells_per_class: int = _f(5, "classes with fewer cells stay in train only (reported)", min=3, advanced=True)
    chunked: Optional[bool] = _f(None, "stream X in row chunks (None: when X is over 1/4 of free memory)",
                                 advanced=True)
    chunk_size: Optional[int] = _f(None, "cells per chunk (None: about 2M stored values)", min=1,
                                   advanced=True)

    def _check(self) -> None:
        if self.test_size + self.val_size >= 0.9:
            self._fail("val_size", self.val_size, f"test_size + val_size < 0.9 (test_size={self.test_size})")


@dataclass
class FinetuneParams(StepParams):
    """02_finetune: fine-tune the pretrained model on the train split."""

    STEP: ClassVar[str] = "finetune"
    NOTEBOOK: ClassVar[str] = "02_finetune.ipynb"
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = tuple(RECIPES["demo"]["finetune"])

    strategy: str = _f("full", "what to train: probe, head, full, lora, adapter, prefix_tuning or ia3",
                       choices=STRATEGY_NAMES)
    strategies: Optional[list] = _f(None, "compare these on one split, keep the best (None: only strategy)")
    epochs: int = _f(10, "maximum number of epochs", min=1)
    lr: Optional[float] = _recipe("finetune", "lr", "Adam learning rate", min=0.0)
    lr_gamma: float = _f(0.9, "StepLR decay per epoch", min=0.0, max=1.0, advanced=True)
    weight_decay: float = _f(0.0, "AdamW weight decay (0: plain Adam, as published)", min=0.0, advanced=True)
    warmup_ratio: float = _f(0.0, "share of all training steps with a linear learning-rate warm-up", min=0.0,
                             max=0.5, advanced=True)
    batch_size: Optional[int] = _recipe("finetune", "batch_size", "cells per training step", min=1)
    max_seq_len: Optional[int] = _recipe("finetune", "max_seq_len", "tokens per cell including <cls>", min=2)
    grad_clip: float = _f(1.0, "gradient norm clipping", min=0.0, advanced=True)
    class_weighted: Optional[bool] = _recipe("finetune", "class_weighted", "weight the loss by inverse class frequency",
                                             advanced=False)
    patience: int = _f(3, "stop after this many epochs without a better validation macro-F1 (0: never)", min=0,
                       advanced=True)
    amp: bool = _f(True, "mixed precision as precision says (False: fp32)", advanced=True)
    adam_eps: Optional[float] = _recipe("finetune", "adam_eps", "Adam eps", min=0.0)  # published: 1e-8 without amp
    resume: bool = _f(True, "same parameters: go on after the last finished epoch (False: set it aside, start over)",
                      advanced=True)
    device: str = _device()
    precision: str = _precision("training")
    threads: Union[int, str, None] = _f(None, "CPU training threads: None (torch's), 'auto' (1 if faster), N",
                                        advanced=True)
    lora_r: int = _f(8, "lora: rank of the low-rank updates", min=1, advanced=True)
    lora_alpha: float = _f(16.0, "lora: scaling numerator (updates are scaled by alpha / r)", min=0.0, advanced=True)
    adapter_bottleneck: int = _f(64, "adapter: hidden size of the bottleneck adapters", min=1, advanced=True)
    prefix_length: int = _f(8, "prefix_tuning: learned key/value prefixes per layer", min=1, advanced=True)
    steps_per_epoch: Optional[int] = _f(None, "batches per epoch, drawn in turn from all train cells (None: all once)",
                                        min=1, advanced=True)
    num_workers: Optional[int] = _f(None, "data-loading processes (None: 0 under 20k cells, else min(4, CPUs - 1))",
                                    min=0, advanced=True)
    nproc_per_node: int = _f(1, "GPUs (processes) to train on; > 1 runs torchrun with DistributedDataParallel", min=1,
                             advanced=True)

    def _check(self) -> None:
        if self.nproc_per_node > 1 and self.strategies is not None:
            self._fail("nproc_per_node", self.nproc_per_node, "1 when comparing strategies (or set strategies: None)")
        if self.strategies is not None:
            bad = [s for s in self.strategies if s not in STRATEGY_NAMES]
            if not self.strategies or bad:
                self._fail("strategies", self.strategies, f"a non-empty list of {list(STRATEGY_NAMES)}")
        if self.lora_alpha <= 0:
            self._fail("lora_alpha", self.lora_alpha, "> 0")
        if self.threads is not None and self.threads != "auto" and (
                isinstance(self.threads, (bool, str)) or self.threads < 1):
            self._fail("threads", self.threads, "None, 'auto' or a number of threads >= 1")
        if not self.amp and self.precision in ("bf16", "fp16"):
            self._fail("precision", self.precision, f"'auto' or 'fp32' when amp is False (or set amp: True for "
                       f"{self.precision})")


@dataclass
class EvaluateParams(StepParams):
    """03_evaluate: test-split (and optional external query) predictions and metrics."""

    STEP: ClassVar[str] = "evaluate"
    NOTEBOOK: ClassVar[str] = "03_evaluate.ipynb"
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = tuple(RECIPES["demo"]["evaluate"])

    query_path: Optional[str] = _f(None, "an extra labelled .h5ad to evaluate on (None: test split only)")
    query_label_key: Optional[str] = _f(None, "label column of the query (None: the run's label_key)")
    query_gene_symbol_key: Optional[str] = _f(None, "var column of the query with gene symbols (None: var_names)")
    query_label_map: Optional[Union[str, dict]] = _f(
        None, "query labels -> model's: CSV (label,model label) or mapping")
    calibrate: bool = _f(True, "temperature-scale the probabilities on the validation cells (False: raw softmax)")
    batch_size: int = _f(64, "cells per forward pass", min=1, advanced=True)
    max_seq_len: Optional[int] = _f(
        None, "tokens per cell including <cls> (None: the length the model was trained with)", min=2, advanced=True)
    baseline: bool = _f(True, "also fit a logistic-regression baseline on the same split (and the query)")
    device: str = _device()
    precision: str = _precision("prediction")
    min_confidence: Optional[float] = _recipe(
        "evaluate", "min_confidence", "cells below this class probability are 'Unknown' (0: off)",
        advanced=False, min=0.0, max=1.0)
    majority_voting: Optional[bool] = _recipe(
        "evaluate", "majority_voting", "also label each over-cluster by its majority",
        advanced=False)
    export: bool = _f(True, "write export/vars.h5 (expression) and export/obs.duckdb (cells, metrics; SQL)",
                      advanced=True)
    require_artifacts: bool = _f(True, "a failure to write the export stops the step (False: warn and go on)",
                                 advanced=True)
    max_plot_cells: int = _f(50000, "UMAP of at most this many test cells (a seeded random sample when more)",
                             min=1, advanced=True)
    store_outputs: Optional[bool] = _f(None, "probabilities, embeddings to data/predictions.h5 (None: > 200,000 cells)",
                                       advanced=True)


@dataclass
class ZeroshotParams(StepParams):
    """04_zeroshot: kNN label transfer with the pretrained model, no fine-tuning."""

    STEP: ClassVar[str] = "zeroshot"
    NOTEBOOK: ClassVar[str] = "04_zeroshot.ipynb"
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = tuple(RECIPES["demo"]["zeroshot"])

    reference_path: Optional[str] = _f(None, "labelled reference .h5ad (None: the run's train+val cells)")
    reference_index: Optional[str] = _f(None, "or a reference index folder (scgpt-protocol index build); not both")
    query_path: Optional[str] = _f(None, "query .h5ad (None: test cells of the prepared data)")
    label_key: Optional[str] = _f(None, "label column in reference/query (None: the run's label_key)")
    gene_symbol_key: Optional[str] = _f(None, "var column with gene symbols in those files (None: var_names)")
    label_map: Optional[Union[str, dict]] = _f(None, "reference, query labels -> common names: CSV or mapping")
    k: int = _f(10, "neighbours for the vote", min=1, advanced=True)
    batch_size: int = _f(64, "cells per forward pass", min=1, advanced=True)
    max_seq_len: Optional[int] = _recipe("zeroshot", "max_seq_len", "tokens per cell including <cls>", min=2)
    device: str = _device()
    precision: str = _precision("embedding")
    min_confidence: Optional[float] = _recipe(
        "zeroshot", "min_confidence", "share of the k neighbours that must agree, else 'Unknown'",
        advanced=False, min=0.0, max=1.0)
    majority_voting: Optional[bool] = _recipe(
        "zeroshot", "majority_voting", "also label each over-cluster of the query by its majority",
        advanced=False)
    max_plot_cells: int = _f(
        50000, "UMAP of at most this many reference + query cells (a seeded random sample when more)", min=1,
        advanced=True)

    def with_recipe(self, checkpoint_kind: str | None) -> StepParams:
        """As :meth:`StepParams.with_recipe`, except that with a ``reference_index`` a ``max_seq_len`` left at None
        is the one the index was embedded with (its ``manifest.json``): a query must be embedded as the index was."""
        if getattr(self, "recipe", None) is None and self.reference_index is not None and self.max_seq_len is None:
            built = _index_max_seq_len(self.reference_index)
            if built is not None:
                out = dataclasses.replace(self, max_seq_len=built).with_recipe(checkpoint_kind)
                out.recipe["set"] = {"max_seq_len": built, **out.recipe["set"]}
                out.recipe["index"] = f"max_seq_len={built} from the reference index"
                return out
        return super().with_recipe(checkpoint_kind)

    def _check(self) -> None:
        if self.reference_path is not None and self.reference_index is not None:
            self._fail("reference_index", self.reference_index,
                       f"None when reference_path is set (reference_path={self.reference_path!r}): give one "
                       "reference, a .h5ad to embed or an index built once from it")


def _index_max_seq_len(folder: str) -> int | None:
    """The ``max_seq_len`` a reference index of ours was embedded with (None: not ours, or unreadable)."""
    from .io import read_json

    value = read_json(Path(folder).expanduser() / "manifest.json", default=None, lenient=True)
    embedding = value.get("embedding") if isinstance(value, dict) else None
    built = embedding.get("max_seq_len") if isinstance(embedding, dict) else None
    return int(built) if isinstance(built, int) and not isinstance(built, bool) else None


def _checkpoint_kind(run_dir: str, notebook: str) -> str | None:
    """``kind`` of the checkpoint 01 recorded in ``run_dir/checkpoint.json`` (the recipe depends on it)."""
    from .io import read_json
    from .layout import RunLayout

    layout = RunLayout(run_dir)
    try:
        return read_json(layout.checkpoint_record).get("kind")
    except FileNotFoundError:
        msg = (f"{layout.checkpoint_record} does not exist: run step '01_preprocess' first with the same run_dir "
               f"({run_dir}); {notebook} takes the recipe for the checkpoint 01 chose.")
        raise FileNotFoundError(msg) from None


STEPS: dict[str, type[StepParams]] = {
    "01_preprocess": PreprocessParams,
    "02_finetune": FinetuneParams,
    "03_evaluate": EvaluateParams,
    "04_zeroshot": ZeroshotParams,
}


def load_params_file(path: str | Path, cls: type[StepParams]) -> dict[str, Any]:
    """Read a YAML override file and check its keys against ``cls`` (values are checked too)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of parameter names to values; found {type(data).__name__}.")
    cls.from_mapping(data, source=str(path))  # unknown keys and bad values fail here, before any work
    return data


def parameters_cell(cls: type[StepParams]) -> str:
    """The source of a notebook's parameters cell for ``cls`` (papermill's annotated form)."""
    hints = typing.get_type_hints(cls)
    lines = [
        "# Parameters: the defaults run the interactive demo.",
        *(["# None (recipe): the value for the checkpoint 01 chose, pretrained or demo; the first output lists them."]
          if cls.RECIPE_FIELDS else []),
        "# Headless: scgpt-protocol run params/<scenario> "
        f"(papermill: -f params/<scenario>/{Path(cls.NOTEBOOK).stem}.yaml)",
        "# --- change these ---",
    ]
    fields = dataclasses.fields(cls)
    basic = [f for f in fields if not f.metadata.get("advanced")]
    advanced = [f for f in fields if f.metadata.get("advanced")]
    for f in basic + advanced:
        if f is (advanced[0] if advanced else None):
            lines.append("# --- advanced: the defaults suit most data ---")
        kind = hints[f.name]
        optional, bases = _field_types(kind)
        if optional or len(bases) > 1:
            names = ", ".join(b.__name__ for b in bases)
            shown = f"Union[{names}]" if len(bases) > 1 else names
            lines.append(f"{f.name} = {f.default!r}  # type: Optional[{shown}] {f.metadata['help']}")
        else:
            lines.append(f"{f.name}: {kind.__name__} = {f.default!r}  # {f.metadata['help']}")
    return "\n".join(lines)

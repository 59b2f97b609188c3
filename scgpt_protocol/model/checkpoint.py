"""Reading scGPT checkpoint folders (``args.json``, ``vocab.json``, ``best_model.pt``); writing them is
:mod:`~scgpt_protocol.model.save`.

The loader checks every key against the model and reports what it did (loaded, renamed,
dropped, missing); it fails, naming the file and keys, whenever a part of the encoder would
otherwise stay randomly initialised. This is the failure of loaders that "keep the keys that match"
and silently skip the released ``Wqkv`` attention weights.
"""

from __future__ import annotations

import logging
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..core.device import resolve_device
from ..core.errors import CheckpointError, CheckpointNotFoundError, format_keys
from ..core.io import read_json
from ..core.log import DETAIL
from .released import ARCH_KEYS, CHECKPOINT_FILES, OPTIONAL_PREFIXES, PRETRAINING_ONLY_PREFIXES, REQUIRED_PREFIXES
from .scgpt import ScGPT, ScGPTConfig

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_RECORD_KEYS", "checkpoint_record", "model_checkpoint_record", "LoadReport",
           "load_model", "locate_checkpoint", "read_vocab", "CHECKPOINT_FILES", "ARCH_KEYS"]

_REQUIRED_ARGS = ("embsize", "nheads", "d_hid", "nlayers")


@dataclass
class LoadReport:
    """What a checkpoint load did; printed in the log and kept as ``model.load_report``."""

    checkpoint_dir: str
    n_loaded: int = 0
    renamed: int = 0
    dropped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    head: str = "none"  # "none", "loaded" or "new"

    def __str__(self) -> str:
        lines = [
            f"scGPT checkpoint {self.checkpoint_dir}",
            f"  loaded      {self.n_loaded} tensors"
            + (f" ({self.renamed} renamed Wqkv/in_proj)" if self.renamed else ""),
            f"  dropped     {format_keys(self.dropped)} (pretraining only)",
            f"  unexpected  {format_keys(self.unexpected)} (ignored)",
            f"  missing     {format_keys(self.missing)}",
            f"  initialised {format_keys(self.initialised)}",
            f"  classifier  {self.head}",
        ]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line for a reader, without internal tensor names (``str()`` has the details)."""
        n = self.n_loaded
        kind = "" if self.head == "loaded" else "pretrained "  # a fine-tuned model brings its own head
        parts = [f"{'all ' if not self.missing else ''}{n:,} {kind}weight{'s' if n != 1 else ''} loaded"]
        if self.dropped:
            k = len(self.dropped)
            parts.append(f"{k} pretraining-only weight{'s' if k != 1 else ''} dropped")
        if self.missing:
            k = len(self.missing)
            parts.append(f"{k} decoder weight{'s' if k != 1 else ''} missing (left random)")
        if self.head == "new":
            parts.append("a new classifier head, trained in fine-tuning")
        elif self.head == "loaded":
            parts.append("the fine-tuned classifier head")
        return "; ".join(parts)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython display
        p.text(str(self))


def _require_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        msg = (
            f"checkpoint file {path} is missing; a scGPT checkpoint folder holds "
            f"{', '.join(CHECKPOINT_FILES)} (found: {present or 'nothing'}). "
            "Point to the folder of the released model (download_checkpoint('whole-human')) "
            "or to one written by save_checkpoint."
        )
        raise CheckpointNotFoundError(msg)
    return path


def _read_json(path: Path) -> Any:
    return read_json(path, error=CheckpointError, damaged_hint="the file is damaged or not part of a scGPT checkpoint.")


def read_vocab(path: str | Path) -> dict[str, int]:
    """Read a ``vocab.json`` (gene symbol -> token id), or that of a checkpoint folder, and check the ids."""
    path = Path(path)
    if path.is_dir():
        path = _require_file(path, "vocab.json")
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not vocab:
        msg = f"{path} must be a JSON object mapping gene symbols to token ids; found {type(vocab).__name__}."
        raise CheckpointError(msg)
    bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        msg = f"{path}: token ids must be non-negative integers; bad entries: {bad[:5]}."
        raise CheckpointError(msg)
    if len(set(vocab.values())) != len(vocab):
        msg = f"{path}: {len(vocab) - len(set(vocab.values()))} token ids are used by more than one gene."
        raise CheckpointError(msg)
    return vocab


def _config_from_args(args: Any, vocab: dict[str, int], path: Path) -> ScGPTConfig:
    if not isinstance(args, dict):
        msg = f"{path} must be a JSON object of training arguments; found {type(args).__name__}."
        raise CheckpointError(msg)
    missing = [k for k in _REQUIRED_ARGS if k not in args]
    if missing:
        msg = (
            f"{path} lacks the architecture keys {missing}; a scGPT args.json has "
            f"{', '.join(_REQUIRED_ARGS)} (the released model: embsize 512, nheads 8, d_hid 512, nlayers 12)."
        )
        raise CheckpointError(msg)
    for key in ("embsize", "nheads", "d_hid", "nlayers", "n_layers_cls"):
        value = args.get(key, 3)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            msg = f"{path}: {key} must be a positive integer; found {value!r}."
            raise CheckpointError(msg)
    if args["embsize"] % args["nheads"]:
        msg = f"{path}: embsize {args['embsize']} is not divisible by nheads {args['nheads']}."
        raise CheckpointError(msg)
    kwargs = {cfg: args[key] for key, cfg in ARCH_KEYS.items() if key in args}
    pad_token = kwargs.get("pad_token", "<pad>")
    if pad_token not in vocab:
        msg = f"pad token {pad_token!r} from {path} is not in vocab.json next to it."
        raise CheckpointError(msg)
    if "<cls>" not in vocab:
        specials = [t for t in vocab if t.startswith("<") and t.endswith(">")]
        msg = (f"vocab.json next to {path} has no '<cls>' token (special tokens there: {specials or 'none'}); "
               "scGPT reads each cell's embedding at <cls>, so fine-tuning and zero-shot need it. Use the "
               "vocab.json released with this checkpoint (it has <pad>, <cls> and <eoc>).")
        raise CheckpointError(msg)
    extra = {k: v for k, v in args.items() if k not in ARCH_KEYS}
    vocab_size = max(vocab.values()) + 1
    try:
        return ScGPTConfig(vocab_size=vocab_size, pad_token_id=vocab[pad_token], extra_args=extra, **kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the checks above
        raise CheckpointError(f"{path}: {err}") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = (
            f"could not read {path} as a PyTorch state dict ({first}). The file is truncated "
            "(an interrupted download: download it again) or is not a model checkpoint."
        )
        raise CheckpointError(msg) from None
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        msg = f"{path} does not hold a state dict (a mapping of parameter names to tensors)."
        raise CheckpointError(msg)
    return obj


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Strip DDP ``module.`` prefixes and map PyTorch's ``in_proj_*`` to the released ``Wqkv.*``."""
    out: dict[str, torch.Tensor] = {}
    renamed = 0
    for key, value in state.items():
        new = key[len("module.") :] if key.startswith("module.") else key
        for old, rel in (("self_attn.in_proj_weight", "self_attn.Wqkv.weight"),
                         ("self_attn.in_proj_bias", "self_attn.Wqkv.bias")):
            if new.endswith(old):
                new = new[: -len(old)] + rel
                renamed += 1
        out[new] = value
    return out, renamed


def _head_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    weight = state.get("cls_decoder.out_layer.weight")
    return None if weight is None else int(weight.shape[0])


#: the keys of a checkpoint record, in the order every file writes them
CHECKPOINT_RECORD_KEYS = ("checkpoint", "kind", "sha256")


def checkpoint_record(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The record of a pretrained checkpoint, the one shape that ``checkpoint.json``, the fine-tuned model's
    ``manifest.json``, the run manifest and the annotation bundles write: ``{"checkpoint": folder, "kind":
    "demo" / "released" / "folder" (None when unknown), "sha256": of best_model.pt (None when absent)}``."""
    from ..core.io import sha256_file

    weights = Path(path) / "best_model.pt"
    return {"checkpoint": str(path), "kind": kind, "sha256": sha256_file(weights) if weights.is_file() else None}


def model_checkpoint_record(model: ScGPT) -> dict[str, Any]:
    """:func:`checkpoint_record` of the checkpoint ``model`` was loaded from (its load report; kind unknown)."""
    return checkpoint_record(Path(getattr(model.load_report, "checkpoint_dir", "")))


def locate_checkpoint(
    spec: str | Path, *, demo_dir: str | Path | None = None, demo_genes: Iterable[str] | None = None
) -> tuple[Path, str]:
    """The one checkpoint resolver: ``(folder, kind)`` for ``"demo"``, a released name or a folder.

    Parameters
    ----------
    spec
        ``"demo"``: a tiny randomly initialised checkpoint over ``demo_genes`` written to ``demo_dir``
        (kind ``"demo"``); an existing folder (kind ``"folder"``); a name of
        :data:`~scgpt_protocol.model.download.KNOWN_CHECKPOINTS` such as ``"whole-human"``, downloaded once
        into the cache (kind ``"released"``). A folder of that name in the working directory wins.

    Raises
    ------
    CheckpointNotFoundError
        Neither a folder, a known name nor ``"demo"``; or the folder lacks one of the three files.
    """
    from .download import KNOWN_CHECKPOINTS, download_checkpoint

    text = str(spec)
    if text == "demo" and not Path(spec).is_dir():
        if demo_dir is None or demo_genes is None:
            msg = "checkpoint 'demo' is made from the data's genes; this call has no data to make it from."
            raise CheckpointNotFoundError(msg)
        unique = list(dict.fromkeys(str(g) for g in demo_genes if str(g) and str(g) != "nan"))
        from .save import make_tiny_checkpoint

        return make_tiny_checkpoint(demo_dir, unique, seed=0), "demo"
    path = Path(spec).expanduser()
    if not path.is_dir() and text in KNOWN_CHECKPOINTS:
        return download_checkpoint(text), "released"
    if not path.is_dir():
        msg = (
            f"checkpoint {text!r} does not exist: it is not 'demo', not a known checkpoint name "
            f"{format_keys(sorted(KNOWN_CHECKPOINTS))} and not an existing folder (resolved to {path.absolute()}; "
            f"the current working directory is {Path.cwd()}). Set checkpoint to 'demo', 'whole-human' or a folder "
            f"holding {', '.join(CHECKPOINT_FILES)}."
        )
        raise CheckpointNotFoundError(msg)
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        present = sorted(p.name for p in path.iterdir())
        msg = (
            f"checkpoint folder {path} lacks {', '.join(missing)} (found: {format_keys(present)}); a scGPT "
            f"checkpoint folder holds {', '.join(CHECKPOINT_FILES)}. Point checkpoint to the folder of the "
            "released model or one written by save_checkpoint."
        )
        raise CheckpointNotFoundError(msg)
    return path, "folder"


def load_model(
    checkpoint_dir: str | Path,
    *,
    n_classes: int | None = None,
    device: str | torch.device = "auto",
    head_seed: int = 0,
) -> ScGPT:
    """Load an scGPT checkpoint folder into an :class:`~scgpt_protocol.model.scgpt.ScGPT` in eval mode.

    Parameters
    ----------
    checkpoint_dir
        A folder with ``args.json``, ``vocab.json`` and ``best_model.pt`` (the released layout),
        or the name of a known checkpoint (``"whole-human"``), which is downloaded into the cache.
    n_classes
        Number of classes of the classification head. ``None`` keeps the checkpoint's head if it
        has one. A number that differs from the checkpoint's head (or a checkpoint without one)
        gives a freshly initialised output layer, listed in the load report.
    device
        ``"auto"`` (CUDA, then MPS, then CPU) or any torch device.
    head_seed
        Seed of a newly initialised classification head (the global torch RNG is left alone).

    Returns
    -------
    The model, with ``.vocab`` (gene -> id), ``.config`` and ``.load_report``.

    Raises
    ------
    CheckpointNotFoundError
        The folder or one of its files does not exist.
    CheckpointError
        Unreadable files, missing encoder/attention weights, or shapes that disagree with
        ``args.json`` / ``vocab.json``.
    """
    directory, _ = locate_checkpoint(checkpoint_dir)
    args_path, vocab_path, weights_path = (_require_file(directory, f) for f in CHECKPOINT_FILES)
    vocab = read_vocab(vocab_path)
    config = _config_from_args(_read_json(args_path), vocab, args_path)
    state, renamed = _normalise_keys(_read_state_dict(weights_path))

    report = LoadReport(checkpoint_dir=str(directory), renamed=renamed)
    report.dropped = sorted(k for k in state if k.startswith(PRETRAINING_ONLY_PREFIXES))
    for key in report.dropped:
        del state[key]

    saved_classes = _head_classes(state)
    config.n_classes = n_classes if n_classes is not None else saved_classes
    if config.n_classes is not None and saved_classes != config.n_classes:
        # a new label set: the output layer starts fresh (the hidden head layers load if present)
        state = {k: v for k, v in state.items() if not k.startswith("cls_decoder.out_layer.")}
    if config.n_classes is None:
        state = {k: v for k, v in state.items() if not k.startswith("cls_decoder.")}

    with torch.random.fork_rng(devices=[]):  # a new head starts the same every time
        torch.manual_seed(head_seed)
        model = ScGPT(config)
    expected = model.state_dict()
    _check_keys_and_shapes(state, expected, report, weights_path, vocab_path)

    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    report.n_loaded = sum(1 for k in state if k in expected)
    if config.n_classes is not None:
        report.head = "loaded" if not any(k.startswith("cls_decoder.") for k in report.initialised) else "new"
    model.vocab = vocab
    model.load_report = report
    if config.n_classes is not None and report.head == "loaded":
        model.cls_value = _trained_cls_value(directory)
    logger.info("checkpoint %s: %s", directory.name, report.summary())
    for line in str(report).splitlines():
        logger.info(line, extra=DETAIL)  # tensor names: the log file only
    if report.missing:
        warnings.warn(
            f"{weights_path}: {len(report.missing)} decoder weights are missing and were left "
            f"randomly initialised ({format_keys(report.missing, 3)}); cell embeddings and classification "
            "do not use them.",
            UserWarning,
            stacklevel=2,
        )
    return model.to(resolve_device(device)).eval()


def _trained_cls_value(directory: Path) -> float | None:
    """The ``<cls>`` value a checkpoint's classifier was fine-tuned with.

    Recorded in ``manifest.json`` by this package (``cls_value``); a manifest of ours without it
    predates the record and was trained with pad_value (None); a classifier fine-tuned elsewhere (no
    manifest of ours) was fine-tuned by the official tokeniser, which feeds 0.
    """
    from .vocab import FINETUNE_CLS_VALUE

    path = directory / "manifest.json"
    manifest = read_json(path, default={}, lenient=True)
    if isinstance(manifest, dict) and "cls_value" in manifest:
        value = manifest["cls_value"]
        return None if value is None else float(value)
    if isinstance(manifest, dict) and manifest.get("strategy"):
        return None
    return FINETUNE_CLS_VALUE


def _check_keys_and_shapes(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    report: LoadReport,
    weights_path: Path,
    vocab_path: Path,
) -> None:
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong_shape:
        hint = (
            f" (the embedding has one row per token of {vocab_path.name}: do vocab.json and best_model.pt "
            "belong together?)"
            if any(s.startswith("encoder.embedding.weight") for s in wrong_shape)
            else " (does args.json describe this model: embsize, d_hid, nlayers?)"
        )
        msg = f"{weights_path}: {len(wrong_shape)} tensors have the wrong shape: {wrong_shape[:5]}{hint}"
        raise CheckpointError(msg)

    missing = [k for k in expected if k not in state]
    fatal = [k for k in missing if k.startswith(REQUIRED_PREFIXES)]
    if fatal:
        attention = [k for k in fatal if ".self_attn." in k]
        what = "attention" if attention else "encoder"
        msg = (
            f"{weights_path} lacks {len(fatal)} {what} weights that the model needs: {format_keys(fatal, 8)}. "
            "A model run without them would be randomly initialised. Is this a scGPT checkpoint, and "
            "does args.json (nlayers, embsize) match it?"
        )
        raise CheckpointError(msg)
    report.initialised = [k for k in missing if k.startswith("cls_decoder.")]
    report.missing = [k for k in missing if k.startswith(OPTIONAL_PREFIXES)]

    unexpected = sorted(k for k in state if k not in expected)
    structural = [k for k in unexpected if k.startswith(REQUIRED_PREFIXES + OPTIONAL_PREFIXES)]
    if structural:
        msg = (
            f"{weights_path} holds {len(structural)} weights that this architecture has no place for: "
            f"{format_keys(structural, 8)}. args.json (nlayers, n_layers_cls) does not describe this checkpoint."
        )
        raise CheckpointError(msg)
    report.unexpected = unexpected
    if unexpected:
        warnings.warn(
            f"{weights_path}: ignoring {len(unexpected)} weights this model does not use: {format_keys(unexpected, 5)}",
            UserWarning,
            stacklevel=3,
        )

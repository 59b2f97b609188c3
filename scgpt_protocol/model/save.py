"""Writing scGPT checkpoint folders in the released layout (``args.json``, ``vocab.json``, ``best_model.pt``
and a ``manifest.json`` of checksums): :func:`save_checkpoint`, and :func:`make_tiny_checkpoint` for the demo and
the tests. Reading them is :mod:`~scgpt_protocol.model.checkpoint`."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..core.io import atomic_write, utc_now
from .released import ARCH_KEYS, CHECKPOINT_FILES
from .scgpt import ScGPT, ScGPTConfig
from .vocab import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "make_tiny_checkpoint", "write_manifest", "torch_save_atomic"]


def _args_from_config(config: ScGPTConfig) -> dict[str, Any]:
    args = dict(config.extra_args)
    for key, cfg in ARCH_KEYS.items():
        args[key] = getattr(config, cfg)
    args.setdefault("fast_transformer", True)  # the released value; attention here is SDPA either way
    return args


def torch_save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` through a temporary file, then rename; byte-identical for identical content.

    Saving to a file object (not a path) makes the zip's inner folder ``archive/`` rather than the
    (temporary) file name, so the same weights always give the same sha256.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    atomic_write(path, write, size_hint=_tensor_bytes(obj))  # a full disk: DiskFullError with the tensors' size
    return path


def _tensor_bytes(obj: Any, _seen: set | None = None) -> int:
    """Bytes of the tensor storages in ``obj`` (nested dicts, lists, tuples), each storage once: what
    ``torch.save`` writes besides the pickle, so a lower bound of the file's size."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (str(storage.device), storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _write_checkpoint(
    directory: Path,
    args: Mapping[str, Any],
    vocab: Mapping[str, int],
    state: Mapping[str, torch.Tensor],
    manifest_extra: Mapping[str, Any] | None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "args.json", lambda p: p.write_text(json.dumps(args, indent=2) + "\n"))
    atomic_write(directory / "vocab.json", lambda p: p.write_text(json.dumps(vocab, indent=1) + "\n"))
    cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    torch_save_atomic(cpu_state, directory / "best_model.pt")
    if manifest_extra is not None:
        write_manifest(directory, CHECKPOINT_FILES, {
            "format": "scgpt checkpoint folder (args.json, vocab.json, best_model.pt)", **manifest_extra,
        })
    return directory


def write_manifest(directory: Path, files: Iterable[str], extra: Mapping[str, Any]) -> Path:
    """Write ``directory/manifest.json``: creation time, package versions, sha256 and size of ``files``."""
    from ..core.io import sha256_file
    from ..core.version import __version__

    manifest = {
        "created": utc_now(),
        "versions": {"scgpt_protocol": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "files": {
            name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in files
        },
        **extra,
    }
    path = directory / "manifest.json"
    atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=2, default=str) + "\n"))
    return path


def save_checkpoint(model: ScGPT, directory: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a checkpoint folder in the released layout, plus ``manifest.json``.

    ``best_model.pt`` uses the released key names (``Wqkv``), so the folder loads here and in the
    official scGPT code; a classification head is saved under ``cls_decoder.*``. Each file is written
    to a temporary name and renamed, so an interrupted save never leaves a half-written file.
    ``manifest.json`` records package versions and the sha256 of every file, plus ``extra``.
    """
    if not model.vocab:
        msg = "model.vocab is empty; a checkpoint needs its gene vocabulary (load the model with load_model)."
        raise ValueError(msg)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"n_classes": model.config.n_classes, "n_parameters": n_params, **(extra or {})}
    path = _write_checkpoint(
        Path(directory), _args_from_config(model.config), model.vocab, model.state_dict(), info
    )
    logger.info("saved checkpoint to %s (%s parameters)", path, f"{n_params:,}")
    return path


def make_tiny_checkpoint(
    directory: str | Path,
    genes: Iterable[str],
    *,
    d_model: int = 64,
    nlayers: int = 2,
    nheads: int = 4,
    d_hid: int = 128,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised checkpoint in the exact layout of the released one.

    For demos and tests: the weights mean nothing. ``genes`` become the vocabulary (ids in the
    given order), followed by ``<pad>``, ``<cls>``, ``<eoc>``. The file also carries the
    pretraining-only ``flag_encoder.weight`` as the released file does. With ``d_model=512,
    nlayers=12, nheads=8, d_hid=512`` and the 60,694 genes of the released vocabulary, the file holds
    exactly the released model's 51,330,049 parameters.
    """
    genes = [str(g) for g in genes if str(g) not in SPECIAL_TOKENS]
    if len(set(genes)) != len(genes):
        msg = "genes contains duplicates; a vocabulary needs unique gene symbols."
        raise ValueError(msg)
    if not genes:
        raise ValueError("genes is empty; give the gene symbols of the vocabulary.")
    vocab = {g: i for i, g in enumerate([*genes, *SPECIAL_TOKENS])}
    config = ScGPTConfig(
        vocab_size=len(vocab), pad_token_id=vocab["<pad>"], d_model=d_model, nheads=nheads,
        d_hid=d_hid, nlayers=nlayers,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = ScGPT(config).state_dict()
        state["flag_encoder.weight"] = torch.randn(2, d_model)
    args = {
        "data_source": "random init (make_tiny_checkpoint)",
        "input_style": "binned",
        "vocab_path": "vocab.json",
        "MVC": True,
        "seed": seed,
        **_args_from_config(config),
    }
    return _write_checkpoint(Path(directory), args, vocab, state, manifest_extra=None)

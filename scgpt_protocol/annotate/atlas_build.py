"""Building a reference index once (:func:`build_index`): embed a labelled reference by chunks with the pretrained
model, exactly as 04 embeds a reference, stream the embeddings into a faiss index (:func:`make_faiss_index`) and
write the index folder that :func:`~scgpt_protocol.annotate.atlas.load_index` reads. The command line is
``scgpt-protocol index build REFERENCE.h5ad --label-key KEY --out DIR``.

Up to :data:`FLAT_MAX_CELLS` cells the index is flat (exact search: the labels are those of the brute-force
search); above, an inverted file of 8-bit scalar-quantised vectors (``IVF{nlist},SQ8``: ``nlist`` about 4 sqrt(n)
lists trained on a seeded sample, 512 bytes per cell for 512 dimensions, a quarter of flat), searched in
``nprobe`` lists chosen as the official scGPT index does. Product quantisation (``kind="ivfpq"``, 64 bytes per
cell, as the official CELLxGENE index compresses 33M cells) is smaller still, but its coarser distances change
more kNN votes. The figures behind these choices are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..core.errors import format_keys
from ..data.labels import missing_labels
from .atlas import (CELLS_FILE, FORMAT, FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, OFFICIAL_CONFIG_FILE,
                    OFFICIAL_META_FILE, default_nprobe, embedding_cls_value, faiss_on_device, import_faiss, ivf_part)
from .knn import check_embedding

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model.scgpt import ScGPT

logger = logging.getLogger(__name__)

__all__ = ["build_index", "make_faiss_index", "FLAT_MAX_CELLS", "INDEX_KINDS"]

#: up to this many cells ``kind="auto"`` builds a flat (exact) index, above it IVF-SQ8 (benchmarks/README.md: a
#: flat index holds 2 KiB per cell, 1 GiB at this size, and searches 10,000 query cells in 20 s on 2 CPU cores,
#: little beside embedding them; below about 200,000 cells IVF-SQ8 would change more than 1% of the votes)
FLAT_MAX_CELLS = 500_000
#: ``flat``: exact; ``ivf``: inverted file, vectors kept whole; ``ivfsq8``: inverted file, 8-bit scalar-quantised
#: vectors (the default above :data:`FLAT_MAX_CELLS`); ``ivfpq``: inverted file, product-quantised
INDEX_KINDS = ("auto", "flat", "ivf", "ivfsq8", "ivfpq")
#: cells whose embeddings the folder keeps for a joint UMAP of reference and query
SAMPLE_SIZE = 10_000
#: faiss's k-means wants at least this many training points per centroid
_POINTS_PER_CENTROID = 39


def _index_spec(kind: str, n: int, d: int, *, flat_max_cells: int, nlist: int | None, pq_m: int | None,
                train_size: int | None) -> dict[str, Any]:
    """The kind, faiss factory string and sizes of the index to build for ``n`` cells of ``d`` dimensions."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"kind={kind!r} is not an index kind; expected one of {list(INDEX_KINDS)}.")
    if kind == "auto":
        kind = "flat" if n <= flat_max_cells else "ivfsq8"
    if kind == "flat":
        return {"kind": "flat", "factory": "Flat", "nlist": None, "pq_m": None, "pq_bits": None, "train_size": 0}
    nlist = int(nlist or max(1, min(round(4 * math.sqrt(n)), n // _POINTS_PER_CENTROID)))
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist={nlist} inverted lists for {n:,} cells; expected 1 <= nlist <= {n:,}.")
    train = int(min(n, train_size or max(40 * nlist, 10_000)))
    if kind in ("ivf", "ivfsq8"):
        return {"kind": kind, "factory": f"IVF{nlist},{'Flat' if kind == 'ivf' else 'SQ8'}", "nlist": nlist,
                "pq_m": None, "pq_bits": None, "train_size": train}
    m = int(pq_m or max(1, d // 8))
    if d % m:
        raise ValueError(f"pq_m={m} must divide the embedding dimension {d} (e.g. {d // 8} or {d // 16}).")
    bits = 8 if train >= 256 * _POINTS_PER_CENTROID else 4  # 256 codes per sub-vector need ~10,000 points
    return {"kind": "ivfpq", "factory": f"IVF{nlist},PQ{m}x{bits}", "nlist": nlist, "pq_m": m, "pq_bits": bits,
            "train_size": train}


def make_faiss_index(embeddings: Any, *, kind: str = "auto", flat_max_cells: int = FLAT_MAX_CELLS,
                     nlist: int | None = None, pq_m: int | None = None, nprobe: int | None = None,
                     train_size: int | None = None, seed: int = 0, chunk_size: int = 65536,
                     device: Any = None) -> tuple[Any, dict[str, Any]]:
    """A faiss index (L2 distance) of the L2-normalised rows of ``embeddings``, added ``chunk_size`` rows at a time.

    Parameters
    ----------
    embeddings
        ``[n, d]``: an array or an on-disk (h5py) dataset, read by chunks (memory holds one chunk and the
        training sample, besides the index itself).
    kind
        ``"auto"`` (``"flat"`` up to ``flat_max_cells`` cells, else ``"ivfsq8"``), ``"flat"``, ``"ivf"``,
        ``"ivfsq8"``, ``"ivfpq"`` (:data:`INDEX_KINDS`).
    nlist, pq_m, nprobe, train_size
        Inverted lists (default about ``4 sqrt(n)``), PQ sub-vectors (default ``d / 8``: 8 dimensions each, one
        byte per sub-vector), lists searched per query (default :func:`~scgpt_protocol.annotate.atlas.default_nprobe`)
        and training cells (default ``max(40 nlist, 10,000)``, a seeded sample).
    seed
        Seed of the training sample.
    device
        A CUDA device trains and fills an inverted-file index on the GPU when faiss has GPU support (faiss-gpu).

    Returns
    -------
    tuple
        The index (on the CPU) and what was built: ``kind``, ``factory``, ``metric``, ``nlist``, ``pq_m``,
        ``pq_bits``, ``nprobe``, ``train_size``, ``n_cells``, ``dim``, ``train_seconds``, ``add_seconds``.
    """
    from ..core.log import progress
    from ..data.matrix import sample_rows
    from ..data.store import take_rows

    faiss = import_faiss()
    n, d = int(embeddings.shape[0]), int(embeddings.shape[1])
    spec = _index_spec(kind, n, d, flat_max_cells=flat_max_cells, nlist=nlist, pq_m=pq_m, train_size=train_size)
    index = faiss.index_factory(d, spec["factory"], faiss.METRIC_L2)
    work = index if spec["kind"] == "flat" else faiss_on_device(index, device)
    start = time.perf_counter()
    if spec["kind"] != "flat":
        rows = sample_rows(np.arange(n), spec["train_size"], seed)
        train = check_embedding(take_rows(embeddings, rows), "embeddings", normalize=True)
        work.train(np.ascontiguousarray(train, dtype=np.float32))
        del train
    trained = time.perf_counter()
    for lo in progress(range(0, n, chunk_size), total=n, desc="indexing cells", unit="cells",
                       size=lambda lo: min(chunk_size, n - lo)):
        chunk = check_embedding(np.asarray(embeddings[lo : lo + chunk_size]), "embeddings", normalize=True)
        work.add(np.ascontiguousarray(chunk, dtype=np.float32))
    if work is not index:
        index = faiss.index_gpu_to_cpu(work)
    ivf = ivf_part(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe or default_nprobe(ivf.nlist))
    info = {**spec, "metric": "L2", "normalized": True, "nprobe": None if ivf is None else int(ivf.nprobe),
            "n_cells": n, "dim": d, "train_seconds": round(trained - start, 3),
            "add_seconds": round(time.perf_counter() - trained, 3)}
    return index, info


def _label_table(reference: AnnData, label_keys: str | Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (codes, categories)}`` of each label column (code -1: no label, the one rule of
    :func:`~scgpt_protocol.data.labels.missing_labels`); labels are kept as text, as the vote compares them."""
    keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    if not keys:
        raise ValueError("label_keys is empty; give the obs column(s) with the reference's cell-type labels.")
    absent = [k for k in keys if k not in reference.obs.columns]
    if absent:
        msg = (f"label key(s) {format_keys(absent)} are not columns of the reference's obs; found "
               f"{format_keys(reference.obs.columns)}. Pass the column(s) with the cell-type labels (--label-key).")
        raise KeyError(msg)
    table = {}
    for key in dict.fromkeys(keys):
        values = reference.obs[key].to_numpy(dtype=object)
        missing = missing_labels(values)
        text = np.where(missing, "", values.astype(str))
        categories, codes = np.unique(text[~missing], return_inverse=True)
        full = np.full(len(values), -1, dtype=np.int32)
        full[~missing] = codes
        if not (~missing).any():
            msg = f"the reference's obs[{key!r}] has no label at all (every value is missing); pass a labelled column."
            raise ValueError(msg)
        table[key] = (full, categories.astype(object))
    return table


def _known_genes(reference: AnnData, model: ScGPT, gene_symbol_key: str | None) -> list[str]:
    """The reference's genes the checkpoint knows (what the embeddings are made of), in the data's order."""
    from ..model.vocab import gene_symbols, match_genes

    symbols = np.asarray(gene_symbols(reference, gene_symbol_key), dtype=object)
    return [str(g) for g in symbols[match_genes(reference, model.vocab, gene_symbol_key=gene_symbol_key).token_ids
                                    >= 0]]


def _target(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        msg = (f"{out} already exists; an index is never written over by accident. Pass another folder, or "
               "overwrite=True (--overwrite) to replace it once the new one is complete.")
        raise FileExistsError(msg)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; pass a folder for the index.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def build_index(
    reference: AnnData,
    model: ScGPT,
    out_dir: str | Path,
    *,
    label_keys: str | Sequence[str],
    max_seq_len: int = 1200,
    batch_size: int = 64,
    seed: int = 0,
    layer: str | None = None,
    gene_symbol_key: str | None = None,
    precision: str = "auto",
    kind: str = "auto",
    flat_max_cells: int = FLAT_MAX_CELLS,
    nlist: int | None = None,
    pq_m: int | None = None,
    nprobe: int | None = None,
    sample_size: int = SAMPLE_SIZE,
    overwrite: bool = False,
) -> Path:
    """Embed a labelled reference once and save it as a reference index folder to map queries onto.

    The reference is embedded with :func:`~scgpt_protocol.model.embedding.embed` as
    :func:`~scgpt_protocol.annotate.zeroshot.zeroshot_annotate` embeds one (same genes, ``max_seq_len``,
    ``<cls>`` value, precision, seed), by chunks to a temporary HDF5 file beside ``out_dir``, then streamed into a
    faiss index (:func:`make_faiss_index`): memory holds one chunk (and an IVF's training sample) besides the
    index, whatever the size of a backed reference (``read_h5ad(path, backed="r")``); the temporary file holds
    ``n_cells x d`` float32 (2 GiB for a million cells) until the end.

    The folder is written under a temporary name beside ``out_dir`` and renamed when complete, so it is never
    half-written. It holds ``index.faiss``, ``cells.h5`` (cell names, every label column, the embeddings of a
    seeded sample of ``sample_size`` cells for a joint UMAP), ``manifest.json`` (checkpoint sha256, the genes,
    the embedding settings, the index kind and sizes, counts, build time, faiss version) and the official scGPT
    files ``meta.h5ad`` + ``index_config.json`` (the first label column), so the official code loads it too.

    Parameters
    ----------
    reference
        Cells x genes (raw counts or log1p-normalised), in memory or backed. Cells without a label are indexed
        but do not vote.
    model
        The pretrained model (:func:`~scgpt_protocol.load_model`); a query is mapped with the same checkpoint.
    out_dir
        The index folder to write.
    label_keys
        One or more ``obs`` columns with labels; a query votes with any of them.
    max_seq_len, batch_size, seed, layer, gene_symbol_key, precision
        As for :func:`~scgpt_protocol.model.embedding.embed` (``max_seq_len``, ``precision`` and the ``<cls>``
        value are recorded: a query must be embedded with the same).
    kind, flat_max_cells, nlist, pq_m, nprobe
        The index (:func:`make_faiss_index`): flat up to ``flat_max_cells`` cells, else IVF-SQ8.
    sample_size
        Reference cells whose embeddings are kept for a joint UMAP (a seeded sample).
    overwrite
        Replace an existing ``out_dir`` (once the new folder is complete).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    KeyError
        A label key is not a column of ``reference.obs``.
    FileExistsError
        ``out_dir`` exists and ``overwrite`` is False.
    FaissMissingError
        faiss is not installed (the message names ``pip install 'scgpt-protocol[atlas]'``).
    DiskFullError
        The disk filled up; nothing half-written is left.

    Examples
    --------
    >>> import anndata as ad, scgpt_protocol as sp  # doctest: +SKIP
    >>> model = sp.load_model("whole-human")  # doctest: +SKIP
    >>> ref = ad.read_h5ad("atlas.h5ad", backed="r")  # doctest: +SKIP
    >>> sp.build_index(ref, model, "atlas-index", label_keys=["cell_type"])  # doctest: +SKIP
    >>> res = sp.zeroshot_annotate(sp.load_index("atlas-index"), query, model, label_key="cell_type")  # doctest: +SKIP
    """
    from ..core.io import disk_full_error, is_disk_full

    start = time.perf_counter()
    labels = _label_table(reference, label_keys)
    out = _target(out_dir, overwrite)
    import_faiss()  # before any embedding
    genes = _known_genes(reference, model, gene_symbol_key)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    settings = {"max_seq_len": int(max_seq_len), "batch_size": int(batch_size), "seed": int(seed), "layer": layer,
                "gene_symbol_key": gene_symbol_key, "precision": precision}
    try:
        info, sample = _embed_and_index(reference, model, tmp, settings, kind=kind, flat_max_cells=flat_max_cells,
                                        nlist=nlist, pq_m=pq_m, nprobe=nprobe, sample_size=sample_size)
        _write_cells(tmp / CELLS_FILE, reference.obs_names, labels, sample)
        _write_official(tmp, labels, info)
        manifest = _manifest(reference, model, labels, genes, info, settings,
                             seconds=time.perf_counter() - start, n_sample=len(sample[0]))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        _publish(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(out, needed=None, cause=err, note="Nothing half-written was left.") from err
        raise
    size = sum(p.stat().st_size for p in out.iterdir())
    logger.info("reference index of %s cells (%s, %d dimensions) in %.0f s: %s (%.1f MiB)", f"{info['n_cells']:,}",
                info["factory"], info["dim"], time.perf_counter() - start, out, size / 2**20)
    return out


def _embed_and_index(reference: AnnData, model: ScGPT, tmp: Path, settings: dict[str, Any], *, sample_size: int,
                     **index_args: Any) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Embed ``reference`` to a temporary store in ``tmp``, index it into ``tmp/index.faiss``, keep the seeded
    sample's embeddings; the store is removed. Returns the index's info (with the precision used) and the
    sample ``(rows, embeddings)``."""
    from ..data.matrix import sample_rows
    from ..data.store import open_store, take_rows
    from ..model.embedding import embed

    faiss = import_faiss()
    embed_args = {k: v for k, v in settings.items() if k in ("max_seq_len", "batch_size", "seed", "layer",
                                                             "gene_symbol_key", "precision")}
    view = reference if reference.is_view else reference[:]  # embed records nothing in the caller's uns
    store = embed(view, model, key_added="X_scgpt", out=tmp / "embeddings.h5", **embed_args)
    datasets, attrs = open_store(store)
    embeddings = datasets["X_scgpt"]
    try:
        device = next(model.parameters()).device
        index, info = make_faiss_index(embeddings, seed=settings["seed"], device=device, **index_args)
        rows = sample_rows(np.arange(embeddings.shape[0]), sample_size, settings["seed"])
        sample = (rows, check_embedding(take_rows(embeddings, rows), "embeddings", normalize=True))
    finally:
        embeddings.file.close()
    store.unlink()
    faiss.write_index(index, str(tmp / INDEX_FILE))
    info["precision"] = attrs.get("precision")
    info["faiss"] = faiss.__version__
    return info, sample


def _write_cells(path: Path, names: Any, labels: dict[str, tuple[np.ndarray, np.ndarray]],
                 sample: tuple[np.ndarray, np.ndarray]) -> None:
    """``cells.h5``: ``obs_names``, ``labels/<i>/{codes,categories}`` (attribute ``key``: the column),
    ``sample/{rows,embedding}``."""
    import h5py

    text = h5py.string_dtype()
    with h5py.File(path, "w") as handle:
        handle.create_dataset("obs_names", data=np.asarray(names, dtype=object), dtype=text, compression="gzip")
        group = handle.create_group("labels")
        for position, (key, (codes, categories)) in enumerate(labels.items()):
            column = group.create_group(str(position))
            column.attrs["key"] = key
            column.create_dataset("codes", data=codes, compression="gzip")
            column.create_dataset("categories", data=categories, dtype=text)
        handle.create_dataset("sample/rows", data=sample[0].astype(np.int64))
        handle.create_dataset("sample/embedding", data=sample[1].astype(np.float32), compression="gzip")


def _write_official(folder: Path, labels: dict[str, tuple[np.ndarray, np.ndarray]], info: dict[str, Any]) -> None:
    """The official scGPT files beside ours: ``meta.h5ad`` (``meta_labels`` of the first label column, ``""``
    where a cell has none) and ``index_config.json``."""
    import h5py

    key, (codes, categories) = next(iter(labels.items()))
    meta = np.where(codes >= 0, np.append(categories, "")[codes], "").astype(object)
    with h5py.File(folder / OFFICIAL_META_FILE, "w") as handle:
        handle.create_dataset("meta_labels", data=meta, dtype=h5py.string_dtype(), compression="gzip",
                              chunks=True)
    config = {"index_desc": info["factory"], "num_embeddings": info["n_cells"], "num_features": info["dim"],
              "nprobe": info["nprobe"], "gpu": False, "meta_key": key, "embedding_key": "X_scgpt"}
    (folder / OFFICIAL_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")


def _manifest(reference: AnnData, model: ScGPT, labels: dict[str, tuple[np.ndarray, np.ndarray]], genes: list[str],
              info: dict[str, Any], settings: dict[str, Any], *, seconds: float, n_sample: int) -> dict[str, Any]:
    from ..core.io import utc_now
    from ..core.version import __version__
    from ..model.checkpoint import model_checkpoint_record

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": utc_now(), "build_seconds": round(seconds, 1),
        "versions": {"scgpt_protocol": __version__, "faiss": info.pop("faiss")},
        "checkpoint": model_checkpoint_record(model),
        "embedding": {"max_seq_len": settings["max_seq_len"], "cls_value": embedding_cls_value(model),
                      "precision": info.pop("precision"), "seed": settings["seed"], "layer": settings["layer"] or "X",
                      "gene_symbol_key": settings["gene_symbol_key"], "d_model": int(model.config.d_model),
                      "normalized": True},
        "n_cells": int(reference.n_obs),
        "labels": {key: {"n_labelled": int((codes >= 0).sum()), "n_labels": int(len(categories))}
                   for key, (codes, categories) in labels.items()},
        "index": info,
        "sample": {"n_cells": int(n_sample), "seed": settings["seed"]},
        "n_genes": len(genes),
        "genes": genes,
    }


def _publish(tmp: Path, out: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out``; an existing ``out`` is set aside first, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        old.rmdir()
        out.rename(old)
    mask = os.umask(0o022)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # as a plain mkdir would make it (mkdtemp's is private)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

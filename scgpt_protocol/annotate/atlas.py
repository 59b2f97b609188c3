"""A labelled reference saved as a faiss index of its cell embeddings: load it (:func:`load_index`), check that a
model may map onto it, and search it (:class:`AtlasIndex`). Building one is
:func:`~scgpt_protocol.annotate.atlas_build.build_index`; mapping a query onto one is
:func:`~scgpt_protocol.annotate.zeroshot.zeroshot_annotate` with the index as its reference.

Two layouts of an index folder load:

ours
    ``index.faiss``, ``cells.h5`` (cell names, one or more label columns, the embeddings of a seeded sample of
    cells for a joint UMAP) and ``manifest.json`` (checkpoint sha256, genes, embedding settings, index kind,
    counts, build time, faiss version). It also holds the official files below, so the official code loads it.
the official scGPT layout
    ``index.faiss`` + ``meta.h5ad`` (an HDF5 file with one dataset ``meta_labels``, one label per indexed cell in
    index order) + ``index_config.json`` (``index_desc``, ``num_embeddings``, ``num_features``, ``nprobe``,
    ``gpu``, ``meta_key``), e.g. the prebuilt CELLxGENE index. It loads as is, with a warning: its checkpoint and
    embedding settings are not recorded, so they cannot be checked.

Every index searches L2-normalised embeddings by Euclidean (L2) distance, the measure of the brute-force vote
(:func:`~scgpt_protocol.annotate.knn.transfer_labels`): on a flat (exact) index the labels are those of the
brute-force search. faiss is an optional dependency: ``pip install 'scgpt-protocol[atlas]'``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.errors import ScGPTProtocolError, format_keys
from .knn import LabelTransfer, check_embedding, exact_distances, vote_neighbors

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model.scgpt import ScGPT

logger = logging.getLogger(__name__)

__all__ = ["AtlasIndex", "AtlasIndexError", "FaissMissingError", "load_index", "default_nprobe", "search_index",
           "ATLAS_PIP"]

#: the pip line that installs faiss with the package (``faiss-cpu``; on a GPU machine ``faiss-gpu`` is used too)
ATLAS_PIP = "pip install 'scgpt-protocol[atlas]'"
FORMAT = "scgpt-protocol atlas index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
CELLS_FILE = "cells.h5"
MANIFEST_FILE = "manifest.json"
OFFICIAL_META_FILE = "meta.h5ad"
OFFICIAL_CONFIG_FILE = "index_config.json"
#: query rows whose neighbours' distances are recomputed at once (1,024 x k x d float64: 40 MiB at k=10, d=512)
_EXACT_BLOCK = 1024


class AtlasIndexError(ScGPTProtocolError, ValueError):
    """A reference index that cannot be used as given: built with another checkpoint or other embedding
    settings, of another dimension, or a damaged or unknown folder."""


class FaissMissingError(ScGPTProtocolError, ImportError):
    """faiss, needed to build or search a reference index, is not installed."""


def import_faiss() -> Any:
    """The ``faiss`` module, or :class:`FaissMissingError` naming the pip line that installs it."""
    try:
        import faiss
    except ImportError as err:
        msg = (f"a reference index needs faiss, which is not installed ({err}). Install it with: {ATLAS_PIP} "
               "(faiss-cpu; on a GPU machine faiss-gpu is used when installed instead), then run this again.")
        raise FaissMissingError(msg) from None
    return faiss


def default_nprobe(nlist: int) -> int:
    """Inverted lists searched per query, from the number of lists, as the official scGPT index does: 16 up to
    1,000 lists, 32 up to 4,000, 64 up to 16,000, else 128 (never more than ``nlist``)."""
    nprobe = 16 if nlist <= 1_000 else 32 if nlist <= 4_000 else 64 if nlist <= 16_000 else 128
    return max(1, min(nprobe, int(nlist)))


def ivf_part(index: Any) -> Any:
    """The inverted-file part of ``index`` (also inside a PCA pre-transform), None for a flat index."""
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _search_params(faiss: Any, index: Any, nprobe: int | None, selector: Any) -> Any:
    """faiss search parameters: ``nprobe`` for an inverted-file index, ``selector`` (cells that may be found)."""
    ivf = ivf_part(index)
    if ivf is None:
        return faiss.SearchParameters(sel=selector) if selector is not None else None
    inner = faiss.SearchParametersIVF(nprobe=int(nprobe or ivf.nprobe))
    if selector is not None:
        inner.sel = selector
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = inner
        return outer
    return inner


def search_index(index: Any, query: np.ndarray, k: int, *, nprobe: int | None = None,
                 allowed: np.ndarray | None = None, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest indexed cells of each (L2-normalised, float32) query row: ``(ids, distances)``, both
    ``[n, k]``, distances Euclidean in float64.

    ``allowed``: the ids that may be found (None: all). ``exact`` (a flat index): the distances are recomputed
    from the stored vectors in float64 (:func:`~scgpt_protocol.annotate.knn.exact_distances`), as the brute-force
    vote does; otherwise they are faiss's (approximate for a compressed index). A row of an inverted-file index
    that finds fewer than ``k`` cells in its ``nprobe`` lists is searched again with twice as many lists.

    Raises
    ------
    AtlasIndexError
        Fewer than ``k`` cells can be found at all.
    """
    faiss = import_faiss()
    query = np.ascontiguousarray(query, dtype=np.float32)
    selector = None if allowed is None else faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
    ivf = ivf_part(index)
    probes = int(nprobe or (ivf.nprobe if ivf is not None else 1))
    squared, ids = index.search(query, k, params=_search_params(faiss, index, probes, selector))
    short = np.flatnonzero((ids < 0).any(axis=1))
    while short.size and ivf is not None and probes < ivf.nlist:
        probes = min(2 * probes, ivf.nlist)
        squared[short], ids[short] = index.search(query[short], k, params=_search_params(faiss, index, probes,
                                                                                         selector))
        short = short[(ids[short] < 0).any(axis=1)]
    if short.size:
        msg = (f"{short.size:,} query cells find fewer than k={k} reference cells in the index (it holds "
               f"{index.ntotal:,}, {'all' if allowed is None else f'{len(allowed):,}'} of them labelled); use a "
               "smaller k.")
        raise AtlasIndexError(msg)
    if exact:  # by blocks of rows: the neighbours' vectors in float64 are n x k x d
        dist = np.empty(ids.shape, dtype=np.float64)
        for lo in range(0, len(ids), _EXACT_BLOCK):
            rows = ids[lo : lo + _EXACT_BLOCK]
            vectors = index.reconstruct_batch(rows.ravel()).reshape(*rows.shape, -1)
            dist[lo : lo + len(rows)] = exact_distances(vectors, query[lo : lo + _EXACT_BLOCK])
        return ids.astype(np.int64), dist
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:  # on unit vectors |a - b|^2 = 2 - 2 a.b
        squared = 2.0 - 2.0 * squared
    return ids.astype(np.int64), np.sqrt(np.maximum(squared.astype(np.float64), 0.0))


@dataclass
class AtlasIndex:
    """A reference index loaded by :func:`load_index`: give it to
    :func:`~scgpt_protocol.annotate.zeroshot.zeroshot_annotate` as the reference.

    Attributes
    ----------
    path
        The folder.
    layout
        ``"scgpt-protocol"`` (ours, with a manifest) or ``"official"`` (the official scGPT layout).
    index
        The faiss index (on the CPU; moved to a GPU for a search when faiss can and the model is there).
    obs
        One row per indexed cell, in index order: the label columns (categorical, NaN where a cell has no label);
        indexed by the cell names when the folder has them (ours), else by the row number.
    manifest
        Our ``manifest.json`` (None for the official layout).
    config
        The official ``index_config.json`` (ours writes one too).
    nprobe
        Inverted lists searched per query (None for a flat index).
    has_names
        Whether ``obs`` is indexed by cell names (query cells that are reference cells are then found).
    left_out
        A mask of indexed cells that do not vote whatever their labels (:meth:`leave_out`); None: none.
    """

    path: Path
    layout: str
    index: Any
    obs: pd.DataFrame
    manifest: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    nprobe: int | None = None
    has_names: bool = False
    left_out: np.ndarray | None = None

    @property
    def n_obs(self) -> int:
        """Cells in the index."""
        return int(self.index.ntotal)

    @property
    def obs_names(self) -> pd.Index | None:
        """The cell names (None when the folder has none: the official layout)."""
        return self.obs.index if self.has_names else None

    @property
    def dim(self) -> int:
        """Dimensions of the indexed embeddings."""
        return int(self.index.d)

    @property
    def exact(self) -> bool:
        """Whether a search is exact: a flat index, whose neighbours' distances are recomputed from its vectors."""
        faiss = import_faiss()
        return isinstance(faiss.downcast_index(self.index), faiss.IndexFlat)

    @property
    def kind(self) -> str:
        """``flat``, ``ivf``, ``ivfpq`` (ours) or the faiss factory string of an official index."""
        if self.manifest is not None:
            return str(self.manifest["index"]["kind"])
        return str(self.config.get("index_desc", type(self.index).__name__))

    @property
    def genes(self) -> list[str] | None:
        """The reference genes the checkpoint knows (None: not recorded, the official layout)."""
        return None if self.manifest is None else list(self.manifest["genes"])

    def describe(self) -> str:
        """One line for a report: folder, layout, cells, kind, labels."""
        labels = ", ".join(map(repr, self.obs.columns))
        probes = f", nprobe {self.nprobe}" if self.nprobe else ""
        return (f"reference index {self.path} ({self.layout} layout): {self.n_obs:,} cells, {self.dim} dimensions, "
                f"{self.kind}{probes}; labels {labels}")

    def label_column(self, label_key: str) -> pd.Series:
        """The labels of ``label_key``; an index with one label column under another name gives that one (logged,
        and kept in ``obs`` under ``label_key`` too: the official layout names its column ``meta_key``).

        Raises
        ------
        KeyError
            ``label_key`` is not a label column and the index has several.
        """
        if label_key in self.obs.columns:
            return self.obs[label_key]
        if len(self.obs.columns) == 1:
            only = self.obs.columns[0]
            logger.info("the reference index has one label column, %r: its labels vote as %r", only, label_key)
            self.obs[label_key] = self.obs[only]
            return self.obs[label_key]
        msg = (f"label_key={label_key!r} is not a label column of the reference index {self.path}; it holds "
               f"{format_keys(self.obs.columns)}. Pass one of those (or build the index with --label-key "
               f"{label_key}).")
        raise KeyError(msg)

    def leave_out(self, cells: np.ndarray) -> None:
        """Keep ``cells`` (a mask over the indexed cells) out of every vote, as a reference file's cells are left
        out when a label map sends them to nothing (:attr:`left_out`)."""
        cells = np.asarray(cells, dtype=bool)
        self.left_out = cells if self.left_out is None else self.left_out | cells

    def check_model(self, model: ScGPT, *, max_seq_len: int, precision: str) -> str:
        """Check that ``model`` and the settings embed the query as the reference was embedded; returns the
        precision to embed the query with (``"auto"``: the index's).

        Raises
        ------
        AtlasIndexError
            Another checkpoint (sha256 of ``best_model.pt``), another ``max_seq_len``, ``<cls>`` value or
            precision, or another embedding dimension; the message names both and how to fix it.
        """
        from ..core.device import resolve_precision

        device = next(model.parameters()).device
        if self.dim != model.config.d_model:
            msg = (f"the reference index {self.path} holds {self.dim}-dimensional embeddings but the model embeds "
                   f"into {model.config.d_model}: it was built with another checkpoint. Map with the checkpoint that "
                   "built it, or build an index with this one (scgpt-protocol index build).")
            raise AtlasIndexError(msg)
        if self.manifest is None:
            return resolve_precision(precision, device)
        self._check_checkpoint(model)
        built = self.manifest["embedding"]
        wanted = precision if precision != "auto" else built["precision"]
        mine = {"max_seq_len": max_seq_len, "cls_value": embedding_cls_value(model),
                "precision": resolve_precision(wanted, device)}
        differ = {key: (built[key], value) for key, value in mine.items() if built[key] != value}
        if differ:
            listed = "; ".join(f"{key} {a!r} in the index, {b!r} here" for key, (a, b) in differ.items())
            msg = (f"the reference index {self.path} was embedded with other settings: {listed}. Embeddings made "
                   "otherwise are not comparable. Map with the index's settings (e.g. max_seq_len: "
                   f"{built['max_seq_len']}, precision: {built['precision']}), or rebuild the index with yours.")
            raise AtlasIndexError(msg)
        return mine["precision"]

    def _check_checkpoint(self, model: ScGPT) -> None:
        from ..model.checkpoint import model_checkpoint_record

        built, mine = self.manifest["checkpoint"], model_checkpoint_record(model)
        if mine["sha256"] is None:
            warnings.warn(f"the model's checkpoint ({mine['checkpoint']}) has no best_model.pt to compare with the "
                          f"one that built the reference index ({built['checkpoint']}); not checked.", UserWarning,
                          stacklevel=4)
            return
        if built["sha256"] != mine["sha256"]:
            msg = (f"the reference index {self.path} was built with the checkpoint {built['checkpoint']} "
                   f"(best_model.pt sha256 {built['sha256'][:16]}...), but the model is {mine['checkpoint']} "
                   f"(sha256 {mine['sha256'][:16]}...). Embeddings of two checkpoints are not comparable: map with "
                   "the checkpoint that built the index, or build an index with this one (scgpt-protocol index "
                   "build REFERENCE.h5ad --checkpoint ...).")
            raise AtlasIndexError(msg)

    def check_genes(self, query: AnnData, model: ScGPT, gene_symbol_key: str | None) -> None:
        """The query must hold enough of the genes the reference was embedded with (the package's one rule,
        :func:`~scgpt_protocol.model.vocab.check_gene_overlap`); the official layout records none: a warning."""
        from ..model.vocab import check_gene_overlap, gene_symbols, match_genes

        symbols = np.asarray(gene_symbols(query, gene_symbol_key), dtype=object)
        known = symbols[match_genes(query, model.vocab, gene_symbol_key=gene_symbol_key).token_ids >= 0]
        if self.genes is None:
            logger.warning("the reference index %s records no genes: the query's gene overlap with the reference "
                           "is not checked (the query has %d genes the checkpoint knows)", self.path, len(known))
            return
        check_gene_overlap(known, self.genes, what="the query",
                           against="the reference index (genes the checkpoint knows)")

    def transfer(self, query_emb: Any, used: np.ndarray, labels: np.ndarray, *, k: int, device: Any = None,
                 block: int = 65536) -> LabelTransfer:
        """The votes of the ``k`` nearest ``used`` (labelled) indexed cells of every query cell, read by blocks of
        ``block`` query cells (an on-disk embedding too). ``labels``: the ``used`` cells' labels, as ``str``.
        Neighbour indices refer to the used cells, as those of
        :func:`~scgpt_protocol.annotate.knn.transfer_labels` on the reference do."""
        used = np.asarray(used, dtype=bool)
        categories, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
        position = np.full(self.n_obs, -1, dtype=np.int64)
        position[used] = np.arange(int(used.sum()))
        allowed = None if used.all() else np.flatnonzero(used)
        exact = self.exact
        index = self.index if allowed is not None or exact else faiss_on_device(self.index, device)
        n_query = query_emb.shape[0]
        neighbors = np.zeros((n_query, k), dtype=np.int64)
        distances = np.zeros((n_query, k), dtype=np.float64)
        for lo in range(0, n_query, block):
            q = check_embedding(np.asarray(query_emb[lo : lo + block]), "query_emb", normalize=True)
            ids, dist = search_index(index, q, k, nprobe=self.nprobe, allowed=allowed, exact=exact)
            neighbors[lo : lo + len(q)], distances[lo : lo + len(q)] = position[ids], dist
        return vote_neighbors(neighbors, distances, codes, categories)

    def sample_adata(self, label_key: str | None = None, *, key: str = "X_scgpt") -> AnnData:
        """The seeded sample of reference cells whose embeddings the folder holds (ours), or reconstructs
        (the official layout; approximate for a compressed index), as an AnnData without genes: ``obs`` with the
        label columns, ``obsm[key]`` the embeddings. For :func:`~scgpt_protocol.pl.joint_embedding`."""
        import anndata as ad

        rows, emb = self._sample()
        obs = self.obs.iloc[rows].copy()
        if label_key is not None and label_key not in obs.columns and len(self.obs.columns) == 1:
            obs[label_key] = obs[self.obs.columns[0]]
        obs.index = (pd.Index(self.obs.index[rows].astype(str)) if self.has_names
                     else pd.Index([f"reference-{r}" for r in rows]))
        return ad.AnnData(obs=obs, obsm={key: emb})

    def _sample(self) -> tuple[np.ndarray, np.ndarray]:
        import h5py

        if self.layout == "scgpt-protocol":
            with h5py.File(self.path / CELLS_FILE, "r") as handle:
                return handle["sample/rows"][:].astype(np.int64), handle["sample/embedding"][:].astype(np.float32)
        from ..data.matrix import sample_rows

        rows = np.sort(sample_rows(np.arange(self.n_obs), min(self.n_obs, 10_000), 0))
        try:
            return rows, _reconstruct(self.index, rows)
        except RuntimeError as err:
            logger.warning("the reference index cannot give back embeddings (%s): the joint UMAP shows the query "
                           "only", str(err).splitlines()[0][:200])
            return rows[:0], np.zeros((0, self.dim), dtype=np.float32)


def _reconstruct(index: Any, rows: np.ndarray) -> np.ndarray:
    """Vectors of ``rows`` of an index; an inverted-file index first gets the direct map this needs."""
    try:
        return index.reconstruct_batch(rows.astype(np.int64))
    except RuntimeError:
        ivf = ivf_part(index)
        if ivf is None:
            raise
        ivf.make_direct_map()
        return index.reconstruct_batch(rows.astype(np.int64))


def embedding_cls_value(model: ScGPT) -> float:
    """The value ``<cls>`` carries when ``model`` embeds (:func:`~scgpt_protocol.model.embedding.embed`)."""
    value = model.cls_value if model.cls_value is not None else model.config.pad_value
    return float(value)


def faiss_on_device(index: Any, device: Any) -> Any:
    """``index`` on the GPU of ``device`` when faiss has GPU support and ``device`` is CUDA (faiss-gpu), else as
    it is."""
    faiss = import_faiss()
    if device is None or getattr(device, "type", str(device)) != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return index
    if faiss.get_num_gpus() < 1:
        return index
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, getattr(device, "index", None) or 0, index)


def load_index(path: str | Path, *, nprobe: int | None = None) -> AtlasIndex:
    """Load a reference index folder: ours (:func:`~scgpt_protocol.annotate.atlas_build.build_index`) or the
    official scGPT layout (``index.faiss`` + ``meta.h5ad`` + ``index_config.json``).

    Parameters
    ----------
    path
        The folder.
    nprobe
        Inverted lists to search per query (more: closer to exact, slower); None: the one the folder records
        (the manifest, or the official ``index_config.json``), else :func:`default_nprobe`.

    Returns
    -------
    AtlasIndex
        The index, its labels (and cell names), its manifest and ``nprobe``.

    Raises
    ------
    FileNotFoundError
        No such folder, or it holds neither layout (the message lists what it holds).
    AtlasIndexError
        A damaged folder: labels and index of different lengths, an unknown format version.
    FaissMissingError
        faiss is not installed.

    Warns
    -----
    UserWarning
        The official layout: its checkpoint and embedding settings are not recorded, so cannot be checked.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        msg = (f"reference index {folder} does not exist (resolved to {folder.absolute()}); build one with "
               "`scgpt-protocol index build REFERENCE.h5ad --label-key KEY --out DIR`, or pass its folder.")
        raise FileNotFoundError(msg)
    if (folder / MANIFEST_FILE).is_file() and (folder / CELLS_FILE).is_file():
        return _set_nprobe(_load_ours(folder), nprobe)
    if all((folder / f).is_file() for f in (INDEX_FILE, OFFICIAL_META_FILE, OFFICIAL_CONFIG_FILE)):
        return _set_nprobe(_load_official(folder), nprobe)
    msg = (f"{folder} is not a reference index: it holds {format_keys(sorted(p.name for p in folder.iterdir()))}; "
           f"expected {INDEX_FILE}, {CELLS_FILE} and {MANIFEST_FILE} (scgpt-protocol index build), or the official "
           f"layout {INDEX_FILE} + {OFFICIAL_META_FILE} + {OFFICIAL_CONFIG_FILE}.")
    raise FileNotFoundError(msg)


def _set_nprobe(index: AtlasIndex, nprobe: int | None) -> AtlasIndex:
    ivf = ivf_part(index.index)
    if nprobe is not None and ivf is not None:
        if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
            raise ValueError(f"nprobe must be a positive integer; got {nprobe!r} (the index has {ivf.nlist} lists).")
        ivf.nprobe = index.nprobe = int(min(nprobe, ivf.nlist))
    return index


def _read_faiss(folder: Path) -> Any:
    faiss = import_faiss()
    try:
        return faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as err:
        msg = (f"{folder / INDEX_FILE} is not a readable faiss index ({str(err).splitlines()[0][:200]}); the folder "
               "is damaged or incomplete: build it again.")
        raise AtlasIndexError(msg) from None


def _load_ours(folder: Path) -> AtlasIndex:
    import h5py

    from ..core.io import read_json

    manifest = read_json(folder / MANIFEST_FILE, error=AtlasIndexError,
                         damaged_hint="the index folder is damaged: build it again.")
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        msg = (f"{folder / MANIFEST_FILE} is not a manifest this version reads (format {manifest.get('format')!r}, "
               f"version {manifest.get('format_version')!r}; expected {FORMAT!r} up to version {FORMAT_VERSION}). "
               "Build the index again with this version, or upgrade scgpt-protocol.")
        raise AtlasIndexError(msg)
    index = _read_faiss(folder)
    columns = {}
    with h5py.File(folder / CELLS_FILE, "r") as handle:
        names = pd.Index(handle["obs_names"].asstr()[:], dtype=object)
        for position in range(len(handle["labels"])):
            group = handle[f"labels/{position}"]
            categories = group["categories"].asstr()[:]
            columns[group.attrs["key"]] = pd.Categorical.from_codes(group["codes"][:], categories=categories)
    _check_lengths(folder, index, len(names))
    nprobe = manifest["index"].get("nprobe")
    ivf = ivf_part(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe or default_nprobe(ivf.nlist))
    config = {"index_desc": manifest["index"]["factory"], "meta_key": next(iter(columns), None)}
    return AtlasIndex(path=folder, layout="scgpt-protocol", index=index, obs=pd.DataFrame(columns, index=names),
                      manifest=manifest, config=config, nprobe=None if ivf is None else ivf.nprobe, has_names=True)


def _load_official(folder: Path) -> AtlasIndex:
    import h5py

    from ..core.io import read_json

    config = read_json(folder / OFFICIAL_CONFIG_FILE, error=AtlasIndexError,
                       damaged_hint="the index folder is damaged: download or build it again.")
    index = _read_faiss(folder)
    with h5py.File(folder / OFFICIAL_META_FILE, "r") as handle:
        if "meta_labels" not in handle:
            msg = (f"{folder / OFFICIAL_META_FILE} has no dataset 'meta_labels' (found {format_keys(list(handle))}); "
                   "the official layout holds one label per indexed cell there.")
            raise AtlasIndexError(msg)
        labels = handle["meta_labels"].asstr()[:]
    _check_lengths(folder, index, len(labels))
    key = str(config.get("meta_key") or "cell_type")
    ivf = ivf_part(index)
    if ivf is not None:
        ivf.nprobe = int(config.get("nprobe") or default_nprobe(ivf.nlist))
    warnings.warn(
        f"the reference index {folder} is in the official scGPT layout (index.faiss, meta.h5ad, index_config.json): "
        "it records neither the checkpoint nor the embedding settings it was built with, so they cannot be checked. "
        "Map onto it only with the checkpoint that built it (whole-human for the CELLxGENE index).",
        UserWarning, stacklevel=3)
    obs = pd.DataFrame({key: pd.Categorical(labels)})
    return AtlasIndex(path=folder, layout="official", index=index, obs=obs, manifest=None, config=config,
                      nprobe=None if ivf is None else ivf.nprobe, has_names=False)


def _check_lengths(folder: Path, index: Any, n_labels: int) -> None:
    if n_labels != index.ntotal:
        msg = (f"the reference index {folder} is damaged: {INDEX_FILE} holds {index.ntotal:,} cells but its labels "
               f"{n_labels:,}; expected one label per indexed cell. Build it again.")
        raise AtlasIndexError(msg)

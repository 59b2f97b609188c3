"""The four steps at the size users bring (issue 27): 25,000 cells x 2,400 genes, made in seconds.

Every neighbour graph of the protocol -- 01's overview UMAP, 03's UMAPs and majority voting's over-clustering,
04's joint UMAP and voting -- runs on 8,192 cells or more, where scanpy leaves exact neighbours for
pynndescent, and HVG selection runs batch-aware on counts. The model settings are the ``ci`` scenario's (a tiny
checkpoint, 2 epochs of 64 tokens), each epoch 100 batches (3,200 of the 13,750 train cells): the run checks
that the protocol works at this size, not what it learns.
``make test-realsize`` runs it (CI does); ``make test-latest`` runs it on the newest releases, with the graph of an
atlas (``tests/test_neighbors.py``, above 50,000 cells, where pynndescent searches).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
N_CELLS, N_GENES, TEST_SIZE = 25_000, 2_400, 0.35


@pytest.fixture(scope="module")
def real_size_run(tmp_path_factory):
    from scgpt_protocol import make_tiny_checkpoint
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.data.demo import make_real_size_demo
    from scgpt_protocol.protocol.run.runner import run_protocol

    work = tmp_path_factory.mktemp("realsize")
    adata = make_real_size_demo(N_CELLS, N_GENES)
    adata.write_h5ad(work / "cells.h5ad")
    # the checkpoint misses every tenth synthetic gene, so 01 also drops genes it does not know
    genes = [g for j, g in enumerate(adata.var_names) if not (g.startswith("SYN") and j % 10 == 0)]
    checkpoint = make_tiny_checkpoint(work / "checkpoint", genes)
    params = work / "params"
    params.mkdir()
    extra = {"01_preprocess": {"adata_path": str(work / "cells.h5ad"), "label_key": "bulk_labels",
                               "batch_key": "batch", "checkpoint": str(checkpoint), "n_hvg": 2_000,
                               "test_size": TEST_SIZE},
             "02_finetune": {"steps_per_epoch": 100}}
    for source in sorted((ROOT / "params" / "ci").glob("*.yaml")):
        values = {**yaml.safe_load(source.read_text()), **extra.get(source.stem, {})}
        (params / source.name).write_text(yaml.safe_dump(values))
    start = time.perf_counter()
    result = run_protocol(params, work / "run")
    print(f"real-size smoke: {N_CELLS:,} cells x {N_GENES:,} genes, four steps in "
          f"{time.perf_counter() - start:.0f} s ({', '.join(f'{s.step} {s.seconds:.0f} s' for s in result.steps)})")
    return RunLayout(work / "run"), result


@pytest.mark.realsize
def test_every_step_finishes_at_real_size(real_size_run):
    layout, result = real_size_run
    assert [s.status for s in result.steps] == ["finished"] * 4
    for stem in ("overview_umap", "call_umaps", "zeroshot_umap"):
        assert layout.figure(stem).is_file(), stem


@pytest.mark.realsize
def test_the_graphs_ran_past_the_exact_neighbour_shortcut(real_size_run):
    import anndata as ad

    from scgpt_protocol.data.graph import EXACT_BELOW
    from scgpt_protocol.metrics import SCGPT_METHOD

    layout, _ = real_size_run
    prepared = ad.read_h5ad(layout.prepared_adata, backed="r")
    split = prepared.obs["split"].value_counts()
    assert prepared.n_obs == N_CELLS and prepared.n_vars == 2_000  # the HVGs among the genes the model knows
    assert split["test"] >= EXACT_BELOW and split["train"] >= EXACT_BELOW
    # each graph, as its step's log has it: 01's overview UMAP (a sample of 20,000 cells); 03's UMAP of the test
    # cells and majority voting per split; 04's joint UMAP (reference + query) and its voting on the query
    logs = {step: (layout.logs_dir / f"{step}.log").read_text() for step in ("preprocess", "evaluate", "zeroshot")}
    expected = {"preprocess": [20_000], "evaluate": [split["test"], split["train"]],
                "zeroshot": [N_CELLS, split["test"]]}
    for step, sizes in expected.items():
        for n in sizes:
            assert f"neighbour graph of {n} cells: exact search" in logs[step], (step, n)
    voting = json.loads(layout.metrics.read_text())["methods"][SCGPT_METHOD]["refinement"]["params"]
    assert voting["n_cells"] == N_CELLS and voting["n_clusters"] > 10  # over-clustered per split
    zeroshot = json.loads(layout.zeroshot_metrics.read_text())
    assert zeroshot["refinement"]["params"]["n_clusters"] > 10
    assert zeroshot["knn_vote"]["n_cells"] == split["test"]


def test_the_real_size_data_are_counts_of_the_demos_types():
    """make_real_size_demo (what the smoke runs on), small: counts, the demo's labels and genes, seeded."""
    import numpy as np

    from scgpt_protocol.data.demo import load_demo, make_real_size_demo

    demo = load_demo()
    adata = make_real_size_demo(3_000, 900, seed=2)
    assert adata.shape == (3_000, 900) and adata.X.dtype == np.float32
    assert list(adata.var_names[: demo.n_vars]) == list(demo.var_names) and adata.var_names[-1] == "SYN00134"
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and adata.X.data.min() > 0
    assert set(adata.obs["bulk_labels"]) == set(demo.obs["bulk_labels"]) and set(adata.obs["batch"]) == {
        "batch_0", "batch_1"}
    assert (make_real_size_demo(3_000, 900, seed=2).X != adata.X).nnz == 0
    assert (make_real_size_demo(3_000, 900, seed=3).X != adata.X).nnz > 0
    with pytest.raises(ValueError, match="at least the demo's 765 genes"):
        make_real_size_demo(100, 700)

"""Shared fixtures: the official fixture checkpoint, tiny checkpoints, toy and real small data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "scgpt_official_tiny"
#: markers whose tests run only with their flag (--slow, ...); realsize: the real-size smoke (make test-realsize)
FLAGS = ("slow", "gpu", "internet", "realsize")


def pytest_addoption(parser: pytest.Parser) -> None:
    for flag in FLAGS:
        parser.addoption(f"--{flag}", action="store_true", default=False, help=f"run tests marked {flag}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for flag in FLAGS:
        if config.getoption(f"--{flag}"):
            continue
        skip = pytest.mark.skip(reason=f"needs --{flag}")
        for item in items:
            if flag in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "reference.npz") as ref:
        return {k: ref[k] for k in ref.files}


@pytest.fixture(scope="session")
def pbmc():
    """scanpy's bundled pbmc68k_reduced (700 cells, FACS labels), log-normalised values of 765 genes."""
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced().raw.to_adata()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, pbmc) -> Path:
    from scgpt_protocol import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), list(pbmc.var_names), d_model=32, nheads=4, d_hid=64)


@pytest.fixture()
def tiny_model(tiny_checkpoint: Path):
    from scgpt_protocol import load_model

    return load_model(tiny_checkpoint, device="cpu")


def _labelled_split(pbmc, n_cells: int):
    """The first ``n_cells`` demo cells with labels in obs["label"] and a seeded split (01's job, done by hand)."""
    import scanpy as sc

    adata = pbmc[:n_cells].copy()
    adata.obs["label"] = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()[:n_cells]
    adata.obs["split"] = np.random.default_rng(0).choice(["train", "val", "test"], adata.n_obs, p=[0.6, 0.2, 0.2])
    return adata


@pytest.fixture(scope="session")
def split_pbmc(pbmc):
    """200 labelled, split demo cells."""
    return _labelled_split(pbmc, 200)


@pytest.fixture(scope="session")
def labelled_split(pbmc):
    """``labelled_split(n)``: the first ``n`` demo cells, labelled and split as in ``split_pbmc``."""
    return lambda n_cells: _labelled_split(pbmc, n_cells)


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory):
    """One headless run of the four notebooks with params/ci, shared by the tests that read it (never modify it:
    copy its run_dir first)."""
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.protocol.run.runner import run_protocol

    run_dir = tmp_path_factory.mktemp("ci") / "run"
    result = run_protocol(Path(__file__).resolve().parent.parent / "params" / "ci", run_dir)
    return RunLayout(run_dir), result


def _write_fake_notebooks(folder: Path, cells: list[str]) -> Path:
    """A stand-in 01_preprocess.ipynb (real papermill, real kernel) with the parameters of step 01 and ``cells``."""
    import nbformat

    from scgpt_protocol.core.params import STEPS

    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    params = "\n".join(f"{name} = None" for name in STEPS["01_preprocess"].field_names())
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "01_preprocess.ipynb")
    return folder


@pytest.fixture()
def fake_notebooks():
    """``fake_notebooks(folder, cells)``: a notebook folder whose 01_preprocess.ipynb runs ``cells`` (for
    ``run_protocol(..., notebooks=folder)``)."""
    return _write_fake_notebooks

"""Old public names keep working for a release, each with a DeprecationWarning that names the new one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.core.renamed import renamed_arguments


def test_a_renamed_argument_still_works_and_says_its_new_name():
    @renamed_arguments(obs_key="key_added")
    def write(*, key_added: str = "scgpt_label") -> str:
        return key_added

    with pytest.warns(DeprecationWarning, match=r"write\(obs_key=\.\.\.\) is now write\(key_added=\.\.\.\)"):
        assert write(obs_key="pred") == "pred"
    assert write(key_added="pred") == "pred"
    with pytest.raises(TypeError, match="obs_key is the old name of key_added"):
        write(obs_key="a", key_added="b")


def test_annotate_writes_under_key_added_and_takes_obs_key_with_a_warning():
    import anndata as ad

    from scgpt_protocol.annotate import annotate
    from scgpt_protocol.annotate.prediction import Prediction

    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32), obs=pd.DataFrame(index=["a", "b", "c"]))
    prediction = Prediction(labels=np.array(["T", "B", "T"]), confidence=np.array([0.9, 0.8, 0.7]),
                            codes=np.array([0, 1, 0]), probabilities=np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]),
                            embeddings=np.zeros((3, 4), dtype=np.float32), categories=["T", "B"])
    annotate(adata, prediction, key_added="pred", embedding_key_added="X_mine")
    assert list(adata.obs["pred"]) == ["T", "B", "T"] and "X_mine" in adata.obsm
    with pytest.warns(DeprecationWarning, match="key_added"):
        annotate(adata, prediction, obs_key="old", embedding_key=None)
    assert "old" in adata.obs


def test_the_old_flat_protocol_names_point_at_their_new_homes():
    import scgpt_protocol.protocol as protocol
    from scgpt_protocol.protocol.display import next_steps
    from scgpt_protocol.tl import AnnotationRunner

    with pytest.warns(DeprecationWarning, match="import it from scgpt_protocol.protocol.display"):
        assert protocol.next_steps is next_steps
    with pytest.warns(DeprecationWarning, match="scgpt_protocol.tl"):
        assert protocol.AnnotationRunner is AnnotationRunner
    assert "next_steps" not in protocol.__all__ and "run_protocol" in protocol.__all__


def test_a_renamed_package_name_gives_the_new_function():
    import scgpt_protocol.evaluate as evaluate
    from scgpt_protocol.evaluate.export import sql_duckdb

    with pytest.warns(DeprecationWarning, match="import sql_duckdb from scgpt_protocol.evaluate.export"):
        assert evaluate.query_duckdb is sql_duckdb
    assert "query_duckdb" not in evaluate.__all__

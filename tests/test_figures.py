"""Figures a biologist reads: one grey for "no call", method colours apart from class colours, one class
order, legible text, and the evidence figures (markers, confidence, three-panel UMAPs, overview UMAP)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from scgpt_protocol.core.layout import RunLayout
from scgpt_protocol.data.labels import UNKNOWN, UNKNOWN_COLOR


# -- colours --------------------------------------------------------------------------------
def test_unknown_is_grey_and_no_class_takes_its_colour():
    from scanpy.plotting import palettes

    from scgpt_protocol.data.colors import is_grey, label_palette

    for n in (3, 25, 60):
        classes = [f"type {i}" for i in range(n)]
        palette = label_palette(classes)
        assert palette[UNKNOWN] == UNKNOWN_COLOR
        assert UNKNOWN_COLOR not in {palette[c] for c in classes}
        assert not any(is_grey(palette[c]) for c in classes)
        assert len({palette[c] for c in classes}) == n
    assert palettes.default_20[2] == "#279e68"  # the green Unknown used to get, as the third class
    adata = ad.AnnData(obs=pd.DataFrame({"ct": pd.Categorical(["a", UNKNOWN], categories=["a", UNKNOWN])}, index=["c1", "c2"]))
    adata.uns["ct_colors"] = ["#123456", "#279e68"]  # an input that gave Unknown a class colour
    assert label_palette(["a", UNKNOWN], adata=adata, label_key="ct") == {"a": "#123456", UNKNOWN: UNKNOWN_COLOR}


def test_unknown_is_importable_where_it_was():
    from scgpt_protocol.annotate.refinement import UNKNOWN as from_refinement

    assert from_refinement is UNKNOWN


def test_method_colours_are_no_cell_type_colours():
    from scanpy.plotting import palettes

    from scgpt_protocol.metrics import METHODS
    from scgpt_protocol.pl.metrics import METHOD_COLORS

    cell_type_colours = {to_hex(c) for name in ("default_20", "default_28", "default_102")
                         for c in getattr(palettes, name)}
    method_colours = {to_hex(m.color) for m in METHODS} | {to_hex(c) for c in METHOD_COLORS.values()}
    assert len({m.color for m in METHODS}) == len(METHODS)
    assert not method_colours & cell_type_colours

"""Step 03's scoring: scGPT predictions, the logistic-regression baseline, exported artifacts."""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "BaselineResult": "baseline",
    "logistic_regression_baseline": "baseline",
    "CalibrationReport": "calibration",
    "calibration_report": "calibration",
    "write_vars_h5": "export",
    "write_duckdb": "export",
    "evaluation_tables": "export",
    "export_evaluation": "export",
    "sql_duckdb": "export",
    "CentredLogisticOvR": "linear",
    "GeneStats": "linear",
    "standardise": "linear",
    "marker_genes": "markers",
    "expression_rows": "markers",
    "split_novel": "novel",
    "crosstab": "novel",
    "novel_record": "novel",
    "zeroshot_novel": "novel",
    "zeroshot_crosstab": "novel",
    "EvalResult": "scoring",
    "evaluate_predictions": "scoring",
    "prediction_store": "scoring",
    "STORE_OUTPUTS_CELLS": "scoring",
    "write_results": "scoring",
    "evaluate_query": "scoring",
    "like_for_like": "scoring",
}, moved={"query_duckdb": "scgpt_protocol.evaluate.export:sql_duckdb"})

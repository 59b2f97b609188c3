"""What the executed notebooks show a reader: banners and the closing "Next" (``banners``), the closing summary
(``summary``), the report tables (``tables``), novel types (``novel``) and calibration (``calibration``). Each
returns an object Jupyter displays richly and that prints as plain text elsewhere."""

from ...core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "describe_refinement": "banners",
    "Banner": "banners",
    "checkpoint_banner": "banners",
    "training_report": "banners",
    "settings_table": "banners",
    "next_steps": "banners",
    "Summary": "summary",
    "summary_of": "summary",
    "run_summary": "summary",
    "styled": "tables",
    "comparison_table": "tables",
    "comparison_display": "tables",
    "metrics_display": "tables",
    "per_class_frame": "tables",
    "per_class_table": "tables",
    "rule_metrics": "tables",
    "refinement_table": "tables",
    "files_table": "tables",
    "fmt_value": "tables",
    "FEW_CELLS": "tables",
    "DECIMALS": "tables",
    "novel_frame": "novel",
    "novel_display": "novel",
    "all_cells_frame": "novel",
    "crosstab_display": "novel",
    "calibration_display": "calibration",
    "calibration_frame": "calibration",
    "temperature_meaning": "calibration",
})

"""The run: the four notebooks headless with papermill (:func:`run_protocol`), the run manifest (what ran with
which inputs, what changed, what is stale), the executed notebooks as HTML reports, the run summary
``reports/index.html``, where the notebooks and scenarios are (a clone or the wheel), and the command line."""

from ...core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "run_protocol": "runner",
    "RunFailed": "runner",
    "RunDirInUse": "runner",
    "RunInterrupted": "runner",
    "BUILTIN_SCENARIOS": "workspace",
    "COLAB_INSTALL": "workspace",
    "ProtocolNotFound": "workspace",
    "WorkspaceExists": "workspace",
    "protocol_root": "workspace",
    "notebooks_dir": "workspace",
    "params_root": "workspace",
    "resolve_scenario": "workspace",
    "resolve_notebooks": "workspace",
    "scenario_summary": "workspace",
    "step_summary": "workspace",
    "init_workspace": "workspace",
    "step_file": "workspace",
    "scenario_files": "workspace",
    "INDEX_NAME": "index",
    "MAIN_FIGURES": "index",
    "write_run_index": "index",
    "write_index_safely": "index",
    "run_index_html": "index",
    "main": "cli",
})

"""Command line of the protocol.

``scgpt-protocol run demo`` runs the four notebooks headless with a built-in scenario (or a scenario
folder such as ``params/demo``); ``scgpt-protocol init DIR`` copies the notebooks and scenarios into DIR
to open and edit; ``scgpt-protocol list`` shows the scenarios and steps. ``scgpt-protocol finetune`` runs
step 02 alone from a run folder, also in many processes:
``torchrun --nproc_per_node=N -m scgpt_protocol finetune params/demo --run-dir runs/demo``.
``scgpt-protocol index build REFERENCE.h5ad --label-key KEY --out DIR`` embeds a labelled reference once and saves
it as an index that step 04 maps queries onto (``reference_index``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ...core.version import __version__

logger = logging.getLogger("scgpt_protocol.protocol.run.cli")

__all__ = ["main"]


def _run(args: argparse.Namespace) -> int:
    from .runner import run_protocol
    from .workspace import resolve_scenario

    start = time.perf_counter()
    steps = args.steps.split(",") if args.steps else None
    params_dir = resolve_scenario(args.scenario)
    run_dir = args.run_dir or str(Path("runs") / params_dir.name)
    result = run_protocol(params_dir, run_dir, steps=steps, force=args.force, html=not args.no_html,
                          kernel_name=args.kernel, notebooks=args.notebooks)
    logger.info("")
    logger.info("finished %d step(s) in %.0f s; run folder %s", len(result.steps), time.perf_counter() - start,
                result.run_dir)
    for outcome in result.steps:
        logger.info("  %-14s %6.1f s  %s", outcome.step, outcome.seconds, outcome.report)
    if result.summary:
        logger.info("headline metrics (each row on the cells it names):")
        logger.info("  %-40s %9s %9s %11s  %s", "method", "accuracy", "macro-F1", "weighted-F1", "measured on")
        for method, values in result.summary.items():
            cells = [f"{values.get(k):.3f}" if isinstance(values.get(k), (int, float)) else "-"
                     for k in ("accuracy", "macro_f1", "weighted_f1")]
            logger.info("  %-40s %9s %9s %11s  %s", method, *cells, values.get("cells", "-"))
    logger.info("reports: %s", result.run_dir / "reports")
    return 0


def _init(args: argparse.Namespace) -> int:
    from .workspace import BUILTIN_SCENARIOS, init_workspace

    written = init_workspace(args.dir, force=args.force)
    dest = Path(args.dir)
    logger.info("copied the scgpt-protocol %s protocol into %s (%d files):", __version__, dest.resolve(), len(written))
    logger.info("  %s/notebooks/   01_preprocess, 02_finetune, 03_evaluate, 04_zeroshot (.ipynb)", dest)
    logger.info("  %s/params/      %s (one YAML of overrides per notebook)", dest, ", ".join(BUILTIN_SCENARIOS))
    logger.info("")
    logger.info("next:")
    logger.info("  cd %s", dest)
    logger.info("  jupyter lab notebooks/                 # open a notebook, edit its parameters cell, run all")
    logger.info("  scgpt-protocol run params/demo --notebooks notebooks   # headless: your copies -> runs/demo/")
    logger.info("  scgpt-protocol run demo                # headless: the packaged notebooks and demo scenario")
    logger.info("For your data: copy params/demo to params/mine, set adata_path, label_key and checkpoint, then")
    logger.info("  scgpt-protocol run params/mine --notebooks notebooks   # -> runs/mine/")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .workspace import params_root, protocol_root, scenario_summary, step_summary

    root = protocol_root()
    logger.info("scgpt-protocol %s; protocol in %s (%s)", __version__, root.path, root.kind)
    logger.info("steps (notebooks in %s):", root.path / "notebooks")
    for step, title in step_summary().items():
        logger.info("  %-14s %s", step, title)
    logger.info("scenarios (scgpt-protocol run NAME; files in %s):", params_root())
    for name, about in scenario_summary().items():
        logger.info("  %-14s %s", name, about)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from ...core.params import FinetuneParams, load_params_file
    from ..steps.finetune import run_finetune_step
    from .workspace import step_file

    source = Path(args.params)
    path = ((step_file(source, "02_finetune") or source / Path(FinetuneParams.NOTEBOOK).with_suffix(".yaml").name)
            if source.is_dir() else source)
    if not path.is_file():
        msg = (f"{path} does not exist: pass the 02 parameters YAML (e.g. runs/demo/params/finetune.yaml) or a "
               "scenario folder holding 02_finetune.yaml (e.g. params/demo).")
        raise FileNotFoundError(msg)
    values = load_params_file(path, FinetuneParams)
    if args.run_dir:
        values["run_dir"] = args.run_dir
    params = FinetuneParams.from_mapping(values, source=str(path))
    result = run_finetune_step(params)
    logger.info("finetune: best epoch %d, val macro-F1 %.4f, %d process(es); model in %s", result.best_epoch,
                result.best_val_macro_f1, result.world_size, result.model_dir)
    return 0


def _index(args: argparse.Namespace) -> int:
    """``scgpt-protocol index build``: embed a labelled reference once and save it as an index to map onto."""
    import anndata as ad

    from ...annotate.atlas_build import build_index
    from ...model.checkpoint import load_model

    source = Path(args.reference)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist (resolved to {source.absolute()}): pass the labelled "
                                "reference .h5ad to index.")
    model = load_model(args.checkpoint, device=args.device)
    reference = ad.read_h5ad(source, backed="r")  # X stays on disk: embedded chunk by chunk
    out = build_index(reference, model, args.out, label_keys=args.label_key, max_seq_len=args.max_seq_len,
                      batch_size=args.batch_size, seed=args.seed, layer=args.layer,
                      gene_symbol_key=args.gene_symbol_key, precision=args.precision, kind=args.kind,
                      nprobe=args.nprobe, overwrite=args.overwrite)
    logger.info("map a query onto it: reference_index: %s in 04_zeroshot's parameters (the same checkpoint)", out)
    return 0


def _index_parser(sub: Any) -> None:
    index = sub.add_parser("index", help="reference indexes: embed a labelled reference once, map queries onto it")
    build = index.add_subparsers(dest="index_command", required=True).add_parser(
        "build", help="embed a labelled .h5ad with the pretrained model and save it as a faiss index folder")
    build.add_argument("reference", help="the labelled reference .h5ad (read backed: any size)")
    build.add_argument("--label-key", action="append", required=True,
                       help="obs column with the labels; repeat it for several columns")
    build.add_argument("--out", required=True, help="the index folder to write")
    build.add_argument("--checkpoint", default="whole-human", help="'whole-human' (default) or a checkpoint folder")
    build.add_argument("--device", default="auto", help="'auto' (cuda, mps, cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    build.add_argument("--max-seq-len", type=int, default=1200, help="tokens per cell including <cls> (1200)")
    build.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
    build.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    build.add_argument("--seed", type=int, default=0, help="seed of gene sampling, the training and UMAP samples")
    build.add_argument("--gene-symbol-key", default=None, help="var column with gene symbols (default: var_names)")
    build.add_argument("--layer", default=None, help="layer with the expression values (default: X)")
    build.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf", "ivfsq8", "ivfpq"),
                       help="auto: flat (exact) up to 500,000 cells, IVF-SQ8 above")
    build.add_argument("--nprobe", type=int, default=None, help="lists searched per query (default: as scGPT)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is done")


def main(argv: list[str] | None = None) -> int:
    from ...core.log import ensure_logging

    parser = argparse.ArgumentParser(prog="scgpt-protocol", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"scgpt-protocol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the protocol notebooks headless with a scenario")
    run.add_argument("scenario", help="a built-in scenario (demo, ci, retina-example) or a scenario folder, "
                                      "e.g. params/demo (one YAML per notebook); a folder wins over a name")
    run.add_argument("--run-dir", default=None,
                     help="where outputs and reports go (default: runs/<scenario folder name>)")
    run.add_argument("--notebooks", default=None,
                     help="a folder with your edited copies of the notebooks (from `scgpt-protocol init`); "
                          "default: the packaged ones")
    run.add_argument("--steps", default=None, help="comma-separated subset, e.g. 01,02 or preprocess,finetune")
    run.add_argument("--force", action="store_true", help="run into a run_dir that holds a finished run")
    run.add_argument("--no-html", action="store_true", help="skip the HTML copies of the reports")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks' python3)")
    init = sub.add_parser("init", help="copy the notebooks and scenarios into a folder to open and edit")
    init.add_argument("dir", help="the folder to copy into (made if missing)")
    init.add_argument("--force", action="store_true", help="overwrite notebooks and scenario files already there")
    sub.add_parser("list", help="show the steps and the built-in scenarios")
    tune = sub.add_parser("finetune", help="run step 02 alone on a run folder that step 01 prepared (also under "
                                           "torchrun: one process per GPU)")
    tune.add_argument("params", help="the 02 parameters: a YAML file (e.g. runs/demo/params/finetune.yaml) or a "
                                     "scenario folder with 02_finetune.yaml (e.g. params/demo)")
    tune.add_argument("--run-dir", default=None, help="the run folder (default: run_dir of the parameters)")
    _index_parser(sub)
    args = parser.parse_args(argv)
    ensure_logging()
    from ...core.errors import ScGPTProtocolError
    from ...core.params import ParamsError
    from .runner import RunDirInUse, RunFailed, RunInterrupted

    command = {"run": _run, "init": _init, "list": _list, "finetune": _finetune, "index": _index}[args.command]
    try:
        return command(args)
    except RunInterrupted as err:  # the runner has logged where it stopped and the command that resumes
        return 143 if err.signal_name == "SIGTERM" else 130
    except RunFailed as err:
        logger.error("%s", err)
        return 1
    except (ScGPTProtocolError, ParamsError, RunDirInUse, KeyError, FileNotFoundError, FileExistsError) as err:
        logger.error("error: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())

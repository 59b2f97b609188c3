"""Command line: ``scgpt-protocol run params/demo`` runs the protocol notebooks headless."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("scgpt_protocol.cli")


def _run(args: argparse.Namespace) -> int:
    from .runner import run_protocol

    start = time.perf_counter()
    steps = args.steps.split(",") if args.steps else None
    result = run_protocol(args.params_dir, args.run_dir, steps=steps, force=args.force, html=not args.no_html,
                          kernel_name=args.kernel)
    logger.info("")
    logger.info("finished %d step(s) in %.0f s; run folder %s", len(result.steps), time.perf_counter() - start,
                result.run_dir)
    for outcome in result.steps:
        logger.info("  %-14s %6.1f s  %s", outcome.step, outcome.seconds, outcome.report)
    if result.summary:
        logger.info("headline metrics (test split):")
        logger.info("  %-44s %9s %9s %11s", "method", "accuracy", "macro-F1", "weighted-F1")
        for method, values in result.summary.items():
            cells = [f"{values.get(k):.3f}" if isinstance(values.get(k), (int, float)) else "-"
                     for k in ("accuracy", "macro_f1", "weighted_f1")]
            logger.info("  %-44s %9s %9s %11s", method, *cells)
    logger.info("reports: %s", result.run_dir / "reports")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .log import ensure_logging

    parser = argparse.ArgumentParser(prog="scgpt-protocol", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the protocol notebooks headless with a parameter folder")
    run.add_argument("params_dir", help="a scenario folder, e.g. params/demo (one YAML per notebook)")
    run.add_argument("--run-dir", default="runs/demo", help="where outputs and reports go (default: runs/demo)")
    run.add_argument("--steps", default=None, help="comma-separated subset, e.g. 01,02 or preprocess,finetune")
    run.add_argument("--force", action="store_true", help="run into a run_dir that holds a finished run")
    run.add_argument("--no-html", action="store_true", help="skip the HTML copies of the reports")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks' python3)")
    args = parser.parse_args(argv)
    ensure_logging()
    from .errors import ScGPTProtocolError

    from .params import ParamsError
    from .runner import RunDirInUse, RunFailed, RunInterrupted

    try:
        return _run(args)
    except RunInterrupted as err:  # the runner has logged where it stopped and the command that resumes
        return 143 if err.signal_name == "SIGTERM" else 130
    except RunFailed as err:
        logger.error("%s", err)
        return 1
    except (ScGPTProtocolError, ParamsError, RunDirInUse, KeyError, FileNotFoundError) as err:
        logger.error("error: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Plot the training and validation curves of one or more runs from their metrics.json.

    python tools/plot_logs.py OUTPUT_DIR [OUTPUT_DIR ...] --output curves.png [--smooth K]

Each OUTPUT_DIR is a training run's folder holding detectron2's ``metrics.json`` (one JSON
object per line with "iteration" and the scalars logged then; evaluation lines carry
"bbox/AP", "bbox/AP50" and, with TEST.EVAL_LOSSES, the criterion on the test set as
"val/loss", "val/loss_ce", ...). One panel per metric (total_loss, loss_ce, loss_bbox,
loss_giou, class_error, cardinality_error, lr, bbox/AP, bbox/AP50) against the iteration,
the runs overlaid in their own colour and named by their folder. The loss and error
panels draw the training value as a line and the validation value at each evaluation
as a dashed line with markers (total_loss beside val/loss); with several test sets each
has its own marker ("<dataset>/val/..." keys). ``--smooth K`` plots the training losses
and errors as a trailing moving average over K logged points. When a resumed run logged
an iteration twice, the later line counts. The figure format follows the --output
extension (png, pdf, svg); the file is written atomically.
"""
import argparse
import io
import json
import logging
import os
import sys

import detr_d2  # noqa: F401  (first: compat fixes)
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from detr_d2.checkpoint.io import atomic_write
from detr_d2.errors import SetupError
from detr_d2.utils.tool_setup import positive_int, run_tool, setup_tool_logging

PANELS = ("total_loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error",
          "lr", "bbox/AP", "bbox/AP50")
SMOOTHED = ("total_loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
EVALUATED = ("bbox/AP", "bbox/AP50")
VALIDATION_NAME = {"total_loss": "loss"}  # training metric -> its name among the val/ statistics
TEST_SET_MARKERS = ("o", "s", "^", "D", "v")
FIGURE_FORMATS = ("png", "pdf", "svg")
METRICS_FILE = "metrics.json"

logger = logging.getLogger("detectron2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="training output folders")
    parser.add_argument("--output", required=True, metavar="FILE", help="figure file (.png, .pdf, .svg)")
    parser.add_argument("--smooth", type=positive_int, default=1, metavar="K",
                        help="moving-average window of the losses, in logged points (default: 1, none)")
    return parser


def read_metrics(run_dir):
    """The rows (dicts with "iteration") of ``run_dir/metrics.json``; lines that do not parse
    (e.g. the last one of a run killed while writing) are skipped with a warning."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise SetupError(f"No {METRICS_FILE} in {run_dir}: give the OUTPUT_DIR of a training run")
    rows = []
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning(f"{path}:{number} is not valid JSON; skipped")
                continue
            if isinstance(row, dict) and "iteration" in row:
                rows.append(row)
    return rows


def metric_series(rows, key):
    """(iterations, values) of ``key`` in ``rows``, sorted by iteration; for an iteration
    logged more than once (a resumed run) the last row wins."""
    by_iteration = {row["iteration"]: row[key] for row in rows if isinstance(row.get(key), (int, float))}
    iterations = sorted(by_iteration)
    return np.array(iterations, dtype=float), np.array([by_iteration[i] for i in iterations], dtype=float)


def moving_average(values, window):
    """Trailing mean over ``window`` points (fewer at the start), same length as ``values``."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def run_labels(run_dirs):
    """Legend label of each run: its folder name, or the path as given when names repeat."""
    names = [os.path.basename(os.path.normpath(run)) for run in run_dirs]
    return [name if names.count(name) == 1 else run for name, run in zip(names, run_dirs)]


def keys_ending_in(rows, suffix):
    """The keys of ``rows`` that are ``suffix`` or end in "/<suffix>" (one per test set when
    there are several: "<dataset>/bbox/AP"), sorted."""
    return sorted({key for row in rows for key in row if key == suffix or key.endswith("/" + suffix)})


def evaluation_keys(rows, key):
    """The keys of ``rows`` drawn as evaluations in panel ``key``: its AP keys, or for a
    training loss or error its validation counterparts ("val/<name>")."""
    if key in EVALUATED:
        return keys_ending_in(rows, key)
    if key in SMOOTHED:
        return keys_ending_in(rows, "val/" + VALIDATION_NAME.get(key, key))
    return []


def plot_panel(axes, key, runs, smooth):
    """Draw metric ``key`` of every (label, rows) run into ``axes`` (run i in colour Ci): the
    training value as a line, evaluations with markers (validation values dashed).
    Returns the validation keys drawn."""
    drawn, validation = False, set()
    for index, (label, rows) in enumerate(runs):
        iterations, values = metric_series(rows, key)
        if len(values) and key not in EVALUATED:
            if key in SMOOTHED and smooth > 1:
                values = moving_average(values, smooth)
            axes.plot(iterations, values, color=f"C{index}", label=label)
            drawn = True
        for number, evaluated in enumerate(evaluation_keys(rows, key)):
            iterations, values = metric_series(rows, evaluated)
            style = "-" if key in EVALUATED else "--"
            axes.plot(iterations, values, color=f"C{index}", linestyle=style,
                      marker=TEST_SET_MARKERS[number % len(TEST_SET_MARKERS)], markersize=4)
            drawn = True
            validation.update([evaluated] if key not in EVALUATED else [])
    axes.set_title(f"{key} (dashed: validation)" if validation else key)
    axes.grid(alpha=0.3)
    if not drawn:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="grey")
    return validation


def curves_figure(runs, smooth):
    """(3x3 Figure with one panel per metric of PANELS (a shared iteration axis) and a
    legend of the runs and line styles, sorted validation keys drawn)."""
    figure = Figure(figsize=(13, 9.5), dpi=100, layout="constrained")
    grid = figure.subplots(3, 3, sharex=True)
    validation = set()
    for axes, key in zip(grid.flat, PANELS):
        validation |= plot_panel(axes, key, runs, smooth)
    for axes in grid[-1]:
        axes.set_xlabel("iteration")
    handles = [Line2D([], [], color=f"C{index}") for index in range(len(runs))]
    labels = [label for label, _ in runs]
    if validation:
        handles += [Line2D([], [], color="black"), Line2D([], [], color="black", linestyle="--", marker="o")]
        labels += ["training", "validation (test set, at each evaluation)"]
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    smoothing = f" (training losses and errors: moving average of {smooth} points)" if smooth > 1 else ""
    figure.suptitle(f"training and validation curves{smoothing}")
    return figure, sorted(validation)


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    extension = os.path.splitext(args.output)[1].lower().lstrip(".")
    if extension not in FIGURE_FORMATS:
        raise SetupError(f"--output {args.output}: use one of the extensions {', '.join(FIGURE_FORMATS)}")
    runs = list(zip(run_labels(args.runs), [read_metrics(run) for run in args.runs]))
    buffer = io.BytesIO()
    figure, validation = curves_figure(runs, args.smooth)
    figure.savefig(buffer, format=extension)
    atomic_write(args.output, lambda file: file.write(buffer.getvalue()))
    drawn = f"; validation curves: {', '.join(validation)}" if validation else "; no validation values logged"
    logger.info(f"Wrote the curves of {len(runs)} run(s) to {args.output}{drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))

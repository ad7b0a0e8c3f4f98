#!/usr/bin/env python
"""Plot the training and validation curves of one or more runs from their metrics.json.

    python tools/plot_logs.py OUTPUT_DIR [OUTPUT_DIR ...] --output curves.png [--smooth K] \
        [--labels NAME ...] [--x {iteration,minutes} ...] [--iteration-seconds S ...] \
        [--panels KEY ...] [--title TEXT]

Each OUTPUT_DIR is a training run's folder holding detectron2's ``metrics.json`` (one JSON
object per line with "iteration" and the scalars logged then; evaluation lines carry
"bbox/AP", "bbox/AP50" and, with TEST.EVAL_LOSSES, the criterion on the test set as
"val/loss", "val/loss_ce", ...). One panel per metric (total_loss, loss_ce, loss_bbox,
loss_giou, class_error, cardinality_error, lr, bbox/AP, bbox/AP50; or those of --panels:
any logged key, those with a "/" drawn as evaluations) against the iteration, the runs
overlaid in their own colour and named by their folder (or by --labels). ``--x minutes``
puts training minutes on the x axis instead: each run's logged seconds per iteration
("time", the training step without evaluations) summed over its iterations, or its
iterations times a measured speed given as ``--iteration-seconds`` (one per run); ``--x
iteration minutes`` draws one row of panels per axis. The loss and error panels draw the training value as a line and the validation value at each evaluation
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
import math
import sys

import detr_d2  # noqa: F401  (first: compat fixes)
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from detr_d2.checkpoint.io import atomic_write
from detr_d2.errors import SetupError
from detr_d2.utils.tool_setup import positive_float, positive_int, run_tool, setup_tool_logging

PANELS = ("total_loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error",
          "lr", "bbox/AP", "bbox/AP50")
SMOOTHED = ("total_loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
VALIDATION_NAME = {"total_loss": "loss"}  # training metric -> its name among the val/ statistics
TEST_SET_MARKERS = ("o", "s", "^", "D", "v")
FIGURE_FORMATS = ("png", "pdf", "svg")
X_AXES = {"iteration": "iteration", "minutes": "training minutes"}
GRID_COLUMNS = 3
METRICS_FILE = "metrics.json"

logger = logging.getLogger("detectron2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="training output folders")
    parser.add_argument("--output", required=True, metavar="FILE", help="figure file (.png, .pdf, .svg)")
    parser.add_argument("--smooth", type=positive_int, default=1, metavar="K",
                        help="moving-average window of the losses, in logged points (default: 1, none)")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="legend names of the runs, one per OUTPUT_DIR (default: their folder names)")
    parser.add_argument("--x", nargs="+", choices=tuple(X_AXES), default=["iteration"], dest="x_axes",
                        help="x axis: iteration and/or minutes (training minutes: the logged seconds per "
                             "iteration summed); several: one row of panels each (default: iteration)")
    parser.add_argument("--iteration-seconds", nargs="+", type=positive_float, metavar="S",
                        help="with --x minutes: each run's seconds per iteration (one per OUTPUT_DIR, e.g. "
                             "measured by tools/benchmark.py) in place of its logged times")
    parser.add_argument("--title", default="training and validation curves", help="figure title")
    parser.add_argument("--panels", nargs="+", metavar="KEY", default=list(PANELS),
                        help="metrics to draw, one panel each, e.g. bbox/AP bbox/AP50 (default: "
                             f"{' '.join(PANELS)})")
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


def run_labels(run_dirs, labels=None):
    """Legend label of each run: ``labels`` (one per run), else its folder name, or the path
    as given when names repeat."""
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise SetupError(f"--labels gives {len(labels)} name(s) for {len(run_dirs)} run(s); give one per OUTPUT_DIR")
        return list(labels)
    names = [os.path.basename(os.path.normpath(run)) for run in run_dirs]
    return [name if names.count(name) == 1 else run for name, run in zip(names, run_dirs)]


def with_iteration_seconds(rows, seconds):
    """``rows`` with ``seconds`` as every row's seconds per iteration ("time"): training
    minutes become iterations times ``seconds``, also for a log of evaluations alone."""
    return [dict(row, time=seconds) for row in rows]


def is_evaluated(key):
    """Whether ``key`` is logged at evaluations ("bbox/AP", "val/loss_ce", ...): it has a "/"."""
    return "/" in key


def training_clock(rows):
    """(iterations, training minutes at each): the logged seconds per iteration ("time")
    times the iterations since the previous logged row, summed; None without "time"."""
    iterations, seconds = metric_series(rows, "time")
    if not len(iterations):
        return None
    steps = np.diff(np.concatenate([[-1.0], iterations]))
    return iterations, np.cumsum(steps * seconds) / 60.0


def x_transform(label, rows, x_axis):
    """The function mapping a run's iterations to its ``x_axis`` values."""
    if x_axis == "iteration":
        return lambda iterations: iterations
    clock = training_clock(rows)
    if clock is None:
        raise SetupError(f"--x minutes: run {label} logged no iteration times ('time' in its {METRICS_FILE})")
    return lambda iterations: np.interp(iterations, *clock)


def keys_ending_in(rows, suffix):
    """The keys of ``rows`` that are ``suffix`` or end in "/<suffix>" (one per test set when
    there are several: "<dataset>/bbox/AP"), sorted."""
    return sorted({key for row in rows for key in row if key == suffix or key.endswith("/" + suffix)})


def evaluation_keys(rows, key):
    """The keys of ``rows`` drawn as evaluations in panel ``key``: its AP keys, or for a
    training loss or error its validation counterparts ("val/<name>")."""
    if is_evaluated(key):
        return keys_ending_in(rows, key)
    if key in SMOOTHED:
        return keys_ending_in(rows, "val/" + VALIDATION_NAME.get(key, key))
    return []


def plot_panel(axes, key, runs, smooth, x_axis="iteration"):
    """Draw metric ``key`` of every (label, rows) run into ``axes`` (run i in colour Ci)
    against ``x_axis``: the training value as a line, evaluations with markers (validation
    values dashed). Returns the validation keys drawn."""
    drawn, validation = False, set()
    for index, (label, rows) in enumerate(runs):
        to_x = x_transform(label, rows, x_axis)
        iterations, values = metric_series(rows, key)
        if len(values) and not is_evaluated(key):
            if key in SMOOTHED and smooth > 1:
                values = moving_average(values, smooth)
            axes.plot(to_x(iterations), values, color=f"C{index}", label=label)
            drawn = True
        for number, evaluated in enumerate(evaluation_keys(rows, key)):
            iterations, values = metric_series(rows, evaluated)
            style = "-" if is_evaluated(key) else "--"
            axes.plot(to_x(iterations), values, color=f"C{index}", linestyle=style,
                      marker=TEST_SET_MARKERS[number % len(TEST_SET_MARKERS)], markersize=4)
            drawn = True
            validation.update([] if is_evaluated(key) else [evaluated])
    axes.set_title(f"{key} (dashed: validation)" if validation else key)
    axes.grid(alpha=0.3)
    if not drawn:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="grey")
    return validation


def panel_grid(figure, num_panels, x_axes):
    """[(axes, panel index, x axis)] of the figure: with one x axis the panels in rows of
    GRID_COLUMNS (unused cells hidden), with several one row per x axis."""
    if len(x_axes) > 1:
        grid = figure.subplots(len(x_axes), num_panels, sharex="row", squeeze=False)
        return [(grid[row, column], column, x_axis) for row, x_axis in enumerate(x_axes)
                for column in range(num_panels)]
    columns = min(num_panels, GRID_COLUMNS)
    grid = figure.subplots(math.ceil(num_panels / columns), columns, sharex=True, squeeze=False)
    for axes in grid.flat[num_panels:]:
        axes.set_visible(False)
    return [(axes, index, x_axes[0]) for index, axes in enumerate(grid.flat[:num_panels])]


def label_bottom_axes(cells):
    """Name the x axis, with tick labels, under the lowest panel of each column (of each x
    axis's row with several)."""
    lowest = {}
    for axes, _, x_axis in cells:  # row by row: the lowest comes last
        lowest[(x_axis, axes.get_subplotspec().colspan.start)] = axes
    for (x_axis, _), axes in lowest.items():
        axes.xaxis.set_tick_params(labelbottom=True)
        axes.set_xlabel(X_AXES[x_axis])


def curves_figure(runs, smooth, panels=PANELS, x_axes=("iteration",), title="training and validation curves"):
    """(Figure with one panel per metric of ``panels`` (per x axis of ``x_axes``) and a
    legend of the runs and line styles, sorted validation keys drawn)."""
    rows = len(x_axes) if len(x_axes) > 1 else math.ceil(len(panels) / GRID_COLUMNS)
    columns = len(panels) if len(x_axes) > 1 else min(len(panels), GRID_COLUMNS)
    figure = Figure(figsize=(1.0 + 4.0 * columns, 1.2 + 2.8 * rows), dpi=100, layout="constrained")
    validation = set()
    cells = panel_grid(figure, len(panels), list(x_axes))
    for axes, index, x_axis in cells:
        validation |= plot_panel(axes, panels[index], runs, smooth, x_axis)
    label_bottom_axes(cells)
    handles = [Line2D([], [], color=f"C{index}") for index in range(len(runs))]
    labels = [label for label, _ in runs]
    if validation:
        handles += [Line2D([], [], color="black"), Line2D([], [], color="black", linestyle="--", marker="o")]
        labels += ["training", "validation (test set, at each evaluation)"]
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    smoothing = f" (training losses and errors: moving average of {smooth} points)" if smooth > 1 else ""
    figure.suptitle(f"{title}{smoothing}")
    return figure, sorted(validation)


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    extension = os.path.splitext(args.output)[1].lower().lstrip(".")
    if extension not in FIGURE_FORMATS:
        raise SetupError(f"--output {args.output}: use one of the extensions {', '.join(FIGURE_FORMATS)}")
    metrics = [read_metrics(run) for run in args.runs]
    if args.iteration_seconds is not None:
        if len(args.iteration_seconds) != len(args.runs):
            raise SetupError(f"--iteration-seconds gives {len(args.iteration_seconds)} value(s) for "
                             f"{len(args.runs)} run(s); give one per OUTPUT_DIR")
        metrics = [with_iteration_seconds(rows, seconds) for rows, seconds in zip(metrics, args.iteration_seconds)]
    runs = list(zip(run_labels(args.runs, args.labels), metrics))
    buffer = io.BytesIO()
    figure, validation = curves_figure(runs, args.smooth, args.panels, args.x_axes, args.title)
    figure.savefig(buffer, format=extension)
    atomic_write(args.output, lambda file: file.write(buffer.getvalue()))
    drawn = f"; validation curves: {', '.join(validation)}" if validation else "; no validation values logged"
    logger.info(f"Wrote the curves of {len(runs)} run(s) to {args.output}{drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))

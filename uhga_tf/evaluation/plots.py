"""Figures of protocol §3.2 / §7 with matplotlib (Agg), written atomically.

Each function writes one image to `path` through `io_utils.atomic_path`
(a temporary file in the same folder, renamed into place), so a reader never
sees a half-written file. The format follows the extension of `path` (png,
pdf, svg; png when there is none).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import logging  # noqa: E402

from uhga_tf import io_utils  # noqa: E402


def _check_mapping(name, value):
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f"{name} must be a non-empty dict {{method: ...}}; received "
            f"{type(value).__name__} {value!r:.80}"
        )


def _save(figure, path):
    path = os.fspath(path)
    extension = os.path.splitext(path)[1] or ".png"
    try:
        with io_utils.atomic_path(path, suffix=extension) as tmp:
            figure.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    logging.info("wrote %s", path)
    return path


def _finish_unit_axes(axes, xlabel, ylabel):
    """Labels, y in [0, 1], grid and legend shared by the precision plots."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()


def plot_pr_curves(pr_curves, path):
    """Precision-recall over Hamming radius, one line per method.

    Args:
        pr_curves: {method: {"hamming_radius": [...], "precision": [...],
            "recall": [...]}} as returned by `metrics.precision_recall_curve`
            or `evaluate_codes(...)["pr_curve"]`. None (NaN) points are left
            out.
        path: output image path.

    Returns:
        path.
    """
    _check_mapping("pr_curves", pr_curves)
    figure, axes = plt.subplots(figsize=(5, 4))
    for method, curve in pr_curves.items():
        points = [
            (r, p) for r, p in zip(curve["recall"], curve["precision"])
            if r is not None and p is not None
        ]
        if points:
            recall, precision = zip(*points)
            axes.plot(recall, precision, marker=".", label=str(method))
    axes.set_xlim(0, 1)
    axes.set_title("precision-recall over Hamming radius")
    _finish_unit_axes(axes, "recall", "precision")
    return _save(figure, path)


def plot_precision_at_n(precision_at_n, path):
    """Precision of the first n ranked items against n, one line per method.

    Args:
        precision_at_n: {method: {n: precision}}; n may be a str (a dict
            read back from JSON).
        path: output image path.
    """
    _check_mapping("precision_at_n", precision_at_n)
    figure, axes = plt.subplots(figsize=(5, 4))
    for method, values in precision_at_n.items():
        pairs = sorted((int(n), p) for n, p in values.items())
        if pairs:
            n_values, precision = zip(*pairs)
            axes.plot(n_values, precision, marker=".", label=str(method))
    _finish_unit_axes(axes, "number of retrieved items n", "precision@n")
    return _save(figure, path)


def plot_map_vs_code_length(maps, path, paper=None):
    """MAP against code_length, one line per method, paper values dashed.

    Args:
        maps: {method: {code_length: map}}; code_length may be a str.
        path: output image path.
        paper: optional {method: {code_length: map}} from the paper, drawn
            dashed in the colour of the same method.
    """
    _check_mapping("maps", maps)
    figure, axes = plt.subplots(figsize=(8, 5))
    for method, values in maps.items():
        pairs = sorted((int(k), v) for k, v in values.items())
        code_lengths, map_values = zip(*pairs)
        (line,) = axes.plot(code_lengths, map_values, marker="o",
                            label=str(method))
        reference = (paper or {}).get(method)
        if reference:
            pairs = sorted(
                (int(k), v) for k, v in reference.items() if v is not None
            )
            if pairs:
                axes.plot(*zip(*pairs), linestyle="--", marker="x",
                          color=line.get_color(), label=f"{method} (paper)")
    all_lengths = sorted({int(k) for v in maps.values() for k in v})
    axes.set_xscale("log", base=2)
    axes.set_xticks(all_lengths)
    axes.set_xticklabels([str(k) for k in all_lengths])
    axes.set_xlabel("code_length (bits)")
    axes.set_ylabel("MAP")
    axes.grid(alpha=0.3)
    axes.legend(
        fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5)
    )
    return _save(figure, path)

"""Pictures and the HTML report: compatibility heatmaps, curves, and the validation report.

Matplotlib is imported inside the functions (with the non-interactive Agg backend), so importing this
module stays cheap. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Mapping, Optional, Sequence, Union

MetricSource = Union[Mapping[str, float], Any]  # a dict of metrics or an evaluation.RetrievalResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric(source: MetricSource, metric: str) -> float:
    return float(source[metric] if isinstance(source, Mapping) else getattr(source, metric))


def _write_bytes_atomically(path: str, payload: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def figure_png(figure) -> bytes:
    """Renders a matplotlib figure to PNG bytes and closes it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def save_figure(figure, path: str) -> str:
    """Writes a figure as a PNG file atomically; returns the path."""
    _write_bytes_atomically(path, figure_png(figure))
    return path


def plot_compatibility_heatmap(matrix: Mapping[tuple[str, str], MetricSource], models: Sequence[str], *,
                               metric: str = "top1", title: str = "", path: Optional[str] = None,
                               galleries: Optional[Sequence[str]] = None):
    """The compatibility matrix M(query model, gallery model) as a heatmap.

    Args:
      matrix: {(query_model, gallery_model): metrics} (RetrievalResult or a dict with `metric`).
      models: row order (oldest first), and the column order unless `galleries` is given.
      galleries: the column order when it differs from the rows, e.g. with a transformed gallery
        "T12(v1)" (`lce_tf.comparison.transformed_label`) beside the models.
      metric: "top1", "top5" or "mAP".
      title: figure title.
      path: when given, the PNG is written there.

    Returns:
      The matplotlib Figure (closed when written to `path`).
    """
    import numpy as np

    plt = _pyplot()
    galleries = list(models if galleries is None else galleries)
    values = np.full((len(models), len(galleries)), np.nan)
    for i, query in enumerate(models):
        for j, gallery in enumerate(galleries):
            if (query, gallery) in matrix:
                values[i, j] = _metric(matrix[(query, gallery)], metric)
    size = 1.2 + 0.9 * len(models)
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(galleries) + 1.2, size))
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(galleries)), labels=galleries, rotation=30, ha="right")
    axes.set_yticks(range(len(models)), labels=models)
    axes.set_xlabel("gallery model")
    axes.set_ylabel("query model")
    for i in range(len(models)):
        for j in range(len(galleries)):
            text = "n/a" if np.isnan(values[i, j]) else f"{values[i, j]:.3f}"
            color = "black" if np.isnan(values[i, j]) or values[i, j] > 0.6 else "white"
            axes.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    figure.colorbar(image, ax=axes, label=metric)
    axes.set_title(title or f"Compatibility matrix ({metric})")
    if path:
        save_figure(figure, path)
    return figure


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
                title: str = "", path: Optional[str] = None, log_y: bool = False, markers: bool = True):
    """Line plot of named (x, y) series, e.g. a backfill curve or recall against queries per second."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, (x, y) in curves.items():
        axes.plot(list(x), list(y), marker="o" if markers else None, label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if log_y:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(title)
    if path:
        save_figure(figure, path)
    return figure


def _table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_report(path: str, *, title: str, verdict: str, reasons: Sequence[str],
                      matrix: Mapping[tuple[str, str], MetricSource], models: Sequence[str],
                      metrics_table: Sequence[Mapping[str, Any]] = (),
                      details: Optional[Mapping[str, Any]] = None, galleries: Optional[Sequence[str]] = None,
                      routes_table: Sequence[Mapping[str, Any]] = ()) -> str:
    """A self-contained HTML page (images inlined) a person can open in a browser.

    Args:
      path: where to write the page.
      title: page title, e.g. "Compatibility validation of v2 against v1".
      verdict: "BLESSED" or "NOT_BLESSED" (shown as a coloured banner).
      reasons: one line per check, e.g. "top-1 M(new, old) 0.84 > M(old, old) 0.80 + margin 0.00: yes".
      matrix: the compatibility matrix for the heatmaps (top-1 and mAP).
      models: heatmap order (rows; also the columns unless `galleries`).
      metrics_table: rows of a table (dicts with the same keys) under the heatmaps.
      galleries: heatmap column order (e.g. with the transformed old gallery "T12(v1)").
      routes_table: rows of the "Upgrade routes" table shown under the verdict (backward and forward
        side by side).
      details: key/value facts shown at the end (model ids, data sizes, settings).

    Returns:
      `path`.
    """
    images = []
    for metric in ("top1", "mAP"):
        png = figure_png(plot_compatibility_heatmap(matrix, models, metric=metric, galleries=galleries))
        images.append(f'<img alt="compatibility heatmap ({metric})" '
                      f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    color = "#1b7f3b" if verdict == "BLESSED" else "#b3261e"
    table = _table_html(metrics_table, list(metrics_table[0])) if metrics_table else ""
    routes = (f"<h2>Upgrade routes</h2>{_table_html(routes_table, list(routes_table[0]))}" if routes_table else "")
    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in (details or {}).items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
.verdict {{ background: {color}; color: white; padding: 0.6em 1em; font-size: 1.4em; border-radius: 4px; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; }}
img {{ max-width: 48%; margin-right: 1%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="verdict">{html.escape(verdict)}</p>
<ul>{"".join(f"<li>{html.escape(r)}</li>" for r in reasons)}</ul>
{routes}
<h2>Compatibility matrix</h2>
<p>Rows: the model that embeds the queries; columns: the model that embedded the gallery.</p>
{"".join(images)}
{table}
<h2>Details</h2><table>{facts}</table>
</body></html>
"""
    _write_bytes_atomically(path, page.encode("utf-8"))
    return path

"""A run's figures: ``curves.png`` (loss and accuracy) and ``deltas.png`` (EWGS Fig. 3).

matplotlib is the ``plots`` extra; a missing one, or any failure, only warns: the run is done.
"""

from __future__ import annotations

import os
import sys

from ewgs_jax import extras, names
from ewgs_jax.reporting.metrics import read_metrics


def write_plots(workdir: str, delta_history: list[dict], title: str | None = None) -> None:
  """``curves.png`` and (with delta refreshes) ``deltas.png``; a failure only warns: the run is done.

  Args:
    workdir: the run's directory (holds ``metrics.jsonl``; receives the PNGs).
    delta_history: the delta refreshes, as :func:`plot_deltas` takes them (empty for none).
    title: the figures' title, or ``None``.
  """
  try:
    plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"), title=title)
    if delta_history:
      plot_deltas(delta_history, os.path.join(workdir, "deltas.png"), title=title)
  except Exception as e:  # noqa: BLE001 - plots are a convenience; the summary is already written
    print(f"warning: plotting in {workdir} failed ({type(e).__name__}: {e})", file=sys.stderr)


def plot_curves(metrics_path: str, out_png: str, title: str | None = None) -> None:
  """Loss and accuracy against the training step: train, and the evaluation split(s).

  Args:
    metrics_path: the ``metrics.jsonl`` to read.
    out_png: the PNG to write.
    title: the figure's title, or ``None``.
  """
  plt = extras.pyplot()
  records = read_metrics(metrics_path)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key in zip(axes, ("loss", "accuracy")):
    for split in ("train", "validation", "test"):
      points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
      if points:
        ax.plot(*zip(*points), label=split, marker=None if split == "train" else "o")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if ax.get_legend_handles_labels()[0]:   # a metric no split logged gets no (empty) legend
      ax.legend()
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)


def plot_deltas(history: list[dict], out_png: str, title: str | None = None) -> None:
  """EWGS Fig. 3: delta of every weight and activation quantizer at each refresh (by epoch).

  ``history``: ``[{"step", "epoch", "quantizers": {layer: {"delta_w", "delta_a", ...}}}, ...]``.

  Args:
    history: the refreshes, as above.
    out_png: the PNG to write.
    title: the figure's title, or ``None``.
  """
  plt = extras.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
  layers = sorted({layer for h in history for layer in h["quantizers"]})
  for ax, key, side in zip(axes, names.DELTA_NAMES, ("weights", "activations")):
    for layer in layers:
      points = [(h["epoch"], h["quantizers"][layer][key]) for h in history
                if key in h["quantizers"].get(layer, {})]
      if points:
        ax.plot(*zip(*points), marker=".", label=layer)
    ax.set_title(f"EWGS delta, {side}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("delta (EWGS Eq. 10)")
    ax.grid(alpha=0.3)
  if layers:
    axes[1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1, 0.5), ncol=1 + len(layers) // 20)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)

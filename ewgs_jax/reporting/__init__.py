"""Run outputs, one job per module; the names below are the public surface (``reporting.X``).

============  ============================================================================
module        job
============  ============================================================================
``events``    the TensorBoard event codec (TFRecord framing, CRC-32C; no TensorFlow needed)
``metrics``   ``metrics.jsonl`` and TensorBoard scalars as a run goes (:class:`MetricsWriter`)
``progress``  the progress line and one-line announcements on stderr
``timer``     wall time and the training clock of ``train_images_per_s`` (:class:`RunTimer`)
``summary``   ``summary.json`` (atomic write, read) and the software versions it records
``plots``     ``curves.png`` and ``deltas.png``
``tables``    the results table of finished runs and their provenance
``__main__``  ``python -m ewgs_jax.reporting table WORKDIR...`` (``make train`` uses it)
============  ============================================================================

Only process 0 writes.
"""

from ewgs_jax.reporting.events import crc32c, encode_event, read_events, tfrecord
from ewgs_jax.reporting.metrics import MetricsWriter, read_metrics
from ewgs_jax.reporting.plots import plot_curves, plot_deltas, write_plots
from ewgs_jax.reporting.progress import ProgressBar, announce
from ewgs_jax.reporting.summary import (ENVIRONMENT_PACKAGES, device, environment, final_message, read_summary,
                                        write_summary)
from ewgs_jax.reporting.tables import provenance, results_table
from ewgs_jax.reporting.timer import RunTimer

__all__ = [
    "ENVIRONMENT_PACKAGES",
    "MetricsWriter",
    "ProgressBar",
    "RunTimer",
    "announce",
    "crc32c",
    "device",
    "encode_event",
    "environment",
    "final_message",
    "plot_curves",
    "plot_deltas",
    "provenance",
    "read_events",
    "read_metrics",
    "read_summary",
    "results_table",
    "tfrecord",
    "write_plots",
    "write_summary",
]

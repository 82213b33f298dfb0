"""What a running job tells its user on stderr: a progress line and one-line announcements.

The progress line's images/s and ETA are measured on the run's training clock
(:meth:`ewgs_jax.reporting.RunTimer.training_seconds`), the clock of ``train_images_per_s`` in
``summary.json``: it stops during evaluations, delta refreshes and checkpoints and never runs
backwards, so the rate is never negative and agrees with the summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import jax


class ProgressBar:
  """One status line (rewritten in place on a TTY, one line per update otherwise) on stderr.

  Args:
    total_steps: the run's last step.
    batch_size: images per step.
    enabled: whether to write (process 0 only in any case).
    stream: where to write; ``None`` for ``sys.stderr``.
    clock: the training clock in seconds (``RunTimer.training_seconds``); ``None`` for
      ``time.perf_counter`` (then pauses count as training).
  """

  def __init__(self, total_steps: int, batch_size: int, enabled: bool = True, stream: TextIO | None = None,
               clock: Callable[[], float] | None = None):
    self.total, self.batch_size = total_steps, batch_size
    self.enabled = enabled and jax.process_index() == 0
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.clock = clock or time.perf_counter
    self._last: tuple[int, float] | None = None

  def update(self, step: int, **scalars: float) -> None:
    """Writes the line for ``step``: its values, and the rate and ETA since the previous update.

    Args:
      step: the step the values belong to.
      **scalars: ``name=value`` pairs to show (loss, accuracy, ...).
    """
    if not self.enabled:
      return
    now = self.clock()
    rate = ""
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      per_step = (now - self._last[1]) / (step - self._last[0])
      eta = int(per_step * (self.total - step))
      rate = f" | {self.batch_size / per_step:,.0f} img/s | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    self._last = (step, now)
    values = " | ".join(f"{k} {v:.4f}" for k, v in scalars.items())
    line = f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) | {values}{rate}"
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    """A line of its own (an evaluation's result, a delta refresh), below the progress line.

    Args:
      text: the line, without its newline.
    """
    if self.enabled:
      self.stream.write(("\n" if self.tty else "") + text + "\n")
      self.stream.flush()

  def close(self) -> None:
    """Ends the rewritten line on a TTY."""
    if self.enabled and self.tty:
      self.stream.write("\n")


def announce(text: str, stream: TextIO | None = None) -> None:
  """A line for the user on stderr (process 0 only): resume, stop, end of a run.

  Args:
    text: the line, without its newline.
    stream: where to write; ``None`` for ``sys.stderr``.
  """
  if jax.process_index() == 0:
    stream = stream or sys.stderr
    stream.write(text + "\n")
    stream.flush()

"""A run's wall time and its training time (the clock of ``train_images_per_s``), over resumes.

JAX dispatches a step asynchronously: the host returns from ``train_step`` long before the device
has finished it, and only a read of its outputs (fetching the logged metrics, an evaluation, a
checkpoint) waits for it. A pause that starts without waiting would hide the device time of every
step still queued, and how many are queued depends on how often metrics are fetched: the same run
measured 14,441 or 496 images/s with only ``log_every_steps`` changed. So a pause first blocks on
the last step's outputs (``sync``), and only then starts its clock: queued steps count as training.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax


class RunTimer:
  """A run's wall time and steady-state training time, summed over its resumes.

  The training clock starts after the first (compiling) step (:meth:`start_training`); work done
  inside :meth:`paused` (evaluation, delta refresh, checkpoints) is left out of it.
  :meth:`training_seconds` is the clock itself (frozen during a pause), e.g. for a progress bar.

  Args:
    batch_size: images per training step.
    previous: the totals of earlier starts of this run (:meth:`totals` as checkpointed), or None.
    clock: a monotonic clock in seconds (``time.perf_counter``; tests pass a fake one).
    wall_clock: the wall clock in seconds (``time.time``).
    block: waits until a pytree of arrays is computed (``jax.block_until_ready``).
  """

  def __init__(self, batch_size: int, previous: dict | None = None, *,
               clock: Callable[[], float] = time.perf_counter, wall_clock: Callable[[], float] = time.time,
               block: Callable[[Any], Any] = jax.block_until_ready):
    self.batch_size = batch_size
    self.previous = dict(previous or {"wall_time_s": 0.0, "train_seconds": 0.0, "train_images": 0})
    self._clock, self._wall_clock, self._block = clock, wall_clock, block
    self._wall_start = wall_clock()
    self._loop_start: float | None = None
    self._first_step = 0
    self._excluded = 0.0
    self._pause_start: float | None = None   # the clock when the outermost open pause began

  @property
  def started(self) -> bool:
    """Whether :meth:`start_training` was called."""
    return self._loop_start is not None

  def start_training(self, step: int) -> None:
    """Starts the training clock at ``step``.

    Call it once the first (compiling) step has finished (block on its outputs first).

    Args:
      step: the step count at that moment (its images are not counted).
    """
    self._loop_start, self._first_step, self._excluded = self._clock(), step, 0.0

  def training_seconds(self) -> float:
    """This start's training clock: seconds since :meth:`start_training`, pauses left out.

    Returns:
      The seconds (0 before :meth:`start_training`); inside a pause, the value at its start, so the
      clock never runs backwards.
    """
    if self._loop_start is None:
      return 0.0
    now = self._clock() if self._pause_start is None else self._pause_start
    return max(0.0, now - self._loop_start - self._excluded)

  @contextlib.contextmanager
  def paused(self, sync: Any = None) -> Iterator[dict[str, float]]:
    """Leaves the time spent inside the ``with`` block out of training time.

    Args:
      sync: the last step's outputs (e.g. the train state): the pause waits for them before its
        clock starts, so that the device time of steps still queued counts as training. ``None``
        when the block does no work that waits for the device (the host and device stay overlapped).

    Yields:
      A dict whose ``"seconds"`` holds the pause's length once the block has ended.
    """
    if sync is not None:
      self._block(sync)
    pause = {"seconds": 0.0}
    outermost = self._pause_start is None
    tick = self._clock()
    if outermost:
      self._pause_start = tick
    try:
      yield pause
    finally:
      end = self._clock()
      pause["seconds"] = end - tick
      if outermost:
        self._pause_start = None
        if self._loop_start is not None:   # a pause the training clock started inside counts from its start
          self._excluded += end - max(tick, self._loop_start)

  def totals(self, step: int) -> dict:
    """``{"wall_time_s", "train_seconds", "train_images"}`` up to ``step``, earlier starts included.

    Args:
      step: the current training step.

    Returns:
      The totals (JSON-serialisable, to checkpoint and pass back as ``previous``).
    """
    images = (step - self._first_step) * self.batch_size if self.started else 0
    return {"wall_time_s": self.previous["wall_time_s"] + self._wall_clock() - self._wall_start,
            "train_seconds": self.previous["train_seconds"] + self.training_seconds(),
            "train_images": self.previous["train_images"] + images}

  @staticmethod
  def images_per_s(totals: dict) -> float | None:
    """Training images per second of :meth:`totals`.

    Args:
      totals: as :meth:`totals` returns them.

    Returns:
      The rate, or None before any timed step.
    """
    if totals["train_seconds"] > 0 and totals["train_images"]:
      return totals["train_images"] / totals["train_seconds"]
    return None

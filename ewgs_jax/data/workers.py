"""Producing batches ahead of the training loop: threads for in-memory gathers, worker processes
(grain) for per-image decoding.

Both loaders compute ``fn(start), fn(start + 1), ...`` for a pure, picklable ``fn`` of a batch's
flat position, in order, a few batches ahead:

* :class:`ThreadLoader`: a thread pool in this process. Right for in-memory arrays, where a batch
  is one numpy gather (the GIL is released while copying) and worker processes would only add a
  copy of every batch.
* :class:`ProcessLoader`: grain's ``MapDataset`` with ``mp_prefetch`` worker processes (extra
  ``data``). Right for ImageNet-style work (JPEG decode, crop, resize per image: the GIL would
  serialise it in threads). Worker ``i`` of ``n`` computes the positions ``i, i + n, ...`` after
  ``start``; a batch is one element, so a worker's per-image work never waits on another's.

A failure in ``fn`` (a corrupt record, a record of the wrong shape) arrives as its own
exception, naming the record; a worker process that dies becomes a
:class:`~ewgs_jax.data.metadata.DataError` naming the worker and the batch it was loading.
"""

from __future__ import annotations

import collections
import concurrent.futures
import signal
import threading
from multiprocessing import resource_tracker
from typing import Callable, Iterator

import numpy as np

from ewgs_jax import extras
from ewgs_jax.data.metadata import DataError


class ThreadLoader:
  """``fn(start), fn(start + 1), ...`` computed ``prefetch`` batches ahead by ``threads`` threads."""

  def __init__(self, fn: Callable[[int], dict], start: int, *, stop: int | None = None, threads: int = 1,
               prefetch: int = 2):
    self.fn, self.next_position, self.stop = fn, start, stop
    self._pool = concurrent.futures.ThreadPoolExecutor(max(threads, 1), thread_name_prefix="ewgs_jax-data")
    self._ahead = max(prefetch, 0) + 1
    self._queue: collections.deque = collections.deque()
    self._submitted = start

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while len(self._queue) < self._ahead and (self.stop is None or self._submitted < self.stop):
      self._queue.append(self._pool.submit(self.fn, self._submitted))
      self._submitted += 1
    if not self._queue:
      raise StopIteration
    self.next_position += 1
    return self._queue.popleft().result()

  def close(self) -> None:
    """Cancels the batches not started and waits for those being computed (at most one per thread)."""
    self._queue.clear()
    self._pool.shutdown(wait=True, cancel_futures=True)


def _grain():
  grain = extras.require("grain", "decoding ImageNet-style images in worker processes (config.data_workers > 0)")
  from absl import flags
  if not flags.FLAGS.is_parsed():   # grain reads absl flags; a program that is not an absl app has none
    flags.FLAGS.mark_as_parsed()
  return grain


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """In each worker process: Ctrl-C in a terminal (SIGINT to the process group) and a scheduler's
  SIGTERM to every process are the training process's to handle (it saves, then closes the loader,
  which stops the workers); a worker that took them would die mid-batch and fail the save."""
  del worker_index, worker_count
  for stop_signal in _STOP_SIGNALS:
    signal.signal(stop_signal, signal.SIG_IGN)   # also discards those that arrived while they were blocked
  signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _with_stop_signals_blocked(fn: Callable[[], dict]) -> dict:
  """``fn()`` in a thread that blocks SIGINT and SIGTERM, waited for here.

  A worker process runs ``_ignore_stop_signals`` only after it has imported this package (seconds);
  a Ctrl-C or SIGTERM in between would kill it. Grain starts the workers from threads made by the
  first ``next``: made from this thread, they, and the processes they spawn, inherit its blocked
  mask (kept across ``exec``), so such a signal waits in the worker until it is ignored. The calling
  thread keeps its mask: the training process still sees the Ctrl-C at once.
  """
  result: concurrent.futures.Future = concurrent.futures.Future()

  def run():
    # The stdlib's resource tracker (grain's shared memory needs it) starts with these signals
    # blocked and then *unblocks* them in the starting thread: started from a grain thread, it would
    # undo the block below. Started here first, later calls find it running and touch no mask.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
      result.set_result(fn())
    except BaseException as e:   # noqa: BLE001 - re-raised in the calling thread by result()
      result.set_exception(e)

  # A daemon thread, not a pool's: after a Ctrl-C in the wait, exit must not wait for the workers' start.
  threading.Thread(target=run, name="ewgs_jax-input-start", daemon=True).start()
  return result.result()


def _exit_reason(message: str) -> str:
  """``exit code -9`` in grain's message -> ``exit code -9 (SIGKILL: killed, e.g. out of memory)``."""
  for word in message.replace(".", " ").split():
    if word.lstrip("-").isdigit() and int(word) < 0:
      try:
        name = signal.Signals(-int(word)).name
      except ValueError:
        break
      hint = ": killed, e.g. by the out-of-memory killer" if name == "SIGKILL" else ""
      return f"exit code {word} ({name}{hint})"
  return "it exited"


class ProcessLoader:
  """``fn(start), fn(start + 1), ...`` computed by ``workers`` grain worker processes.

  ``describe(position)`` names a batch in error messages. Each worker keeps ``prefetch`` batches
  ready. Worker processes start with the first batch (a few seconds: they import this package).
  """

  def __init__(self, fn: Callable[[int], dict], start: int, *, stop: int | None = None, workers: int = 2,
               prefetch: int = 2, describe: Callable[[int], str] = str):
    grain = _grain()
    self.start, self.next_position, self.workers, self.describe = start, start, workers, describe
    stop = start + 2 ** 40 if stop is None else stop   # "endless": far more batches than any run
    dataset = grain.MapDataset.range(start, stop).map(fn)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    self._dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch, 1)), worker_init_fn=_ignore_stop_signals)
    self._iterator: Iterator[dict] | None = None
    self._closed = False

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    position = self.next_position
    try:
      batch = next(self._iterator) if self._iterator is not None else _with_stop_signals_blocked(self._start)
    except RuntimeError as e:
      if "terminated unexpectedly" not in str(e):
        raise
      worker = (position - self.start) % self.workers   # grain's worker i computes start + i, + i + n, ...
      self.close()
      raise DataError(f"input worker process {worker} of {self.workers} died, "
                      f"{_exit_reason(str(e))}, while loading {self.describe(position)}; re-run the same command "
                      "to resume from the last checkpoint (fewer config.data_workers if memory is short)") from None
    self.next_position += 1
    # Out of grain's shared memory into plain arrays (a ~1 ms copy per ImageNet batch): the block is
    # freed now, not by a finaliser that fails at interpreter exit and leaves it to the resource tracker.
    return {key: np.array(value) for key, value in batch.items()}

  def _start(self) -> dict:
    """The iterator and its first batch, which starts the worker processes."""
    try:
      self._iterator = iter(self._dataset)
      return next(self._iterator)
    finally:
      if self._closed:    # closed while starting (a Ctrl-C in the wait for this): stop what started
        self.close()

  def close(self) -> None:
    self._closed = True
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()

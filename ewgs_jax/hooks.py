"""Observers of quantized-layer calls, scoped to a ``with`` block: the layer report and the Hessian probes.

Two things need to see every quantizer of a model without being part of its variables:

* :func:`recording` collects each quantized layer's call (its module path and resolved setting).
  Start-up code traces the model once inside it to learn which layers are quantized, how, and with
  which rules (``initialization``, ``interception``, ``training``).
* :func:`probing` gives the Hessian code (:mod:`ewgs_jax.hessian`) access to each quantizer's
  discrete output ``x_q``: in ``"record"`` mode a traced call lists the quantizers (path, shape,
  rule, and the ``quant_state`` value its factor was read from); in ``"add"`` mode the i-th selected
  quantizer of the call returns ``x_q + probes[i]``, so the loss becomes a function of the probes.

Both are context variables read at trace time, like ``flax.linen.intercept_methods``: a function
traced inside the block sees them, the same function traced outside does not. The probes are
therefore not variables of the model, and a model initialised at one batch size runs, and is probed,
at any other (``ARCHITECTURE.md``, "State in a model"). Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Sequence

_RECORDERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("ewgs_jax_recorders", default=())
_PROBING: contextvars.ContextVar[Probing | None] = contextvars.ContextVar("ewgs_jax_probing", default=None)


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a quantized layer: its module path and the setting it resolved to.

  Attributes:
    path: the module path, e.g. ``("stage1_block0", "conv1")``.
    kind: the layer's class name (``"QuantConv"``, ``"QuantDense"``, ...).
    setting: the resolved :class:`ewgs_jax.quantconfig.LayerQuant`, or ``None`` for a layer that the
      setting leaves at full precision.
    note: why a layer stays at full precision, where that is not the setting's doing.
  """
  path: tuple[str, ...]
  kind: str
  setting: Any
  note: str = ""


@contextlib.contextmanager
def recording() -> Iterator[list[LayerCall]]:
  """Collects every quantized layer's call made (traced) inside the block, in call order.

  Yields:
    The list the calls are appended to.
  """
  calls: list[LayerCall] = []
  token = _RECORDERS.set(_RECORDERS.get() + (calls,))
  try:
    yield calls
  finally:
    _RECORDERS.reset(token)


def record_layer(path: Sequence[str], kind: str, setting: Any, note: str = "") -> None:
  """Called by every quantized layer: reports the call to the active :func:`recording` blocks.

  Args:
    path: the layer's module path.
    kind: the layer's class name.
    setting: its resolved setting (``None``: full precision).
    note: why it stays at full precision, if the setting is not the reason.
  """
  for calls in _RECORDERS.get():
    calls.append(LayerCall(tuple(path), kind, setting, note))


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """One quantizer as a ``"record"`` probing pass saw it.

  Attributes:
    path: the layer's module path plus the quantizer's probe name, e.g. ``("conv1", "w_q")``.
    rule: the name of its backward rule.
    shape: the shape of its discrete output ``x_q`` (the probe's shape).
    dtype: its dtype.
    state: the ``quant_state`` value its rule's factor was read from (the traced leaf itself, so the
      caller can find where it lives in the state it passed), or ``None``.
  """
  path: tuple[str, ...]
  rule: str
  shape: tuple[int, ...]
  dtype: Any
  state: Any = None


class Probing:
  """The state of one :func:`probing` block (see the module docstring)."""

  def __init__(self, mode: str, probes: Sequence[Any] = (), select: frozenset[int] | None = None):
    if mode not in ("record", "add"):
      raise ValueError(f"probing mode must be 'record' or 'add', got {mode!r}")
    self.mode = mode
    self.probes = list(probes)
    self.select = select
    self.quantizers: list[Quantizer] = []
    self._calls = 0
    self._used = 0

  def visit(self, path: Sequence[str], rule: str, x_q: Any, state: Any) -> Any:
    """One quantizer's output ``x_q``: recorded (``record``), or with its probe added (EWGS Eq. 8's
    ``v^T H v`` is differentiated with respect to that probe) when the quantizer is selected."""
    index = self._calls
    self._calls += 1
    if self.mode == "record":
      self.quantizers.append(Quantizer(tuple(path), rule, tuple(x_q.shape), x_q.dtype, state))
      return x_q
    if self.select is not None and index not in self.select:
      return x_q
    if self._used >= len(self.probes):
      raise ValueError(f"the probed function called more quantizers than were recorded ({len(self.probes)}): "
                       "it must call the model the same way for the same batch shapes")
    probe = self.probes[self._used]
    self._used += 1
    if tuple(probe.shape) != tuple(x_q.shape):
      raise ValueError(f"probe {'/'.join(path)}: shape {tuple(probe.shape)} recorded, {tuple(x_q.shape)} now: "
                       "probe with batches of the shape the quantizers were recorded with")
    return x_q + probe.astype(x_q.dtype)


@contextlib.contextmanager
def probing(mode: str, probes: Sequence[Any] = (), select: frozenset[int] | None = None) -> Iterator[Probing]:
  """Exposes every quantizer's ``x_q`` inside the block (see the module docstring).

  Args:
    mode: ``"record"`` (list the quantizers) or ``"add"`` (add ``probes`` to the selected ones).
    probes: in ``"add"`` mode, one array per selected quantizer, in call order.
    select: in ``"add"`` mode, the call indices (in the order of a ``"record"`` pass) that get a
      probe; ``None``: all of them.

  Yields:
    The :class:`Probing` state (its ``quantizers`` after a ``"record"`` pass).
  """
  state = Probing(mode, probes, select)
  token = _PROBING.set(state)
  try:
    yield state
  finally:
    _PROBING.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
  """No recording and no probing inside the block, whatever encloses it: for a library's own inner
  traces (e.g. :func:`ewgs_jax.quantize` tracing a model to find its first and last layers) that
  must not count as calls of the traced function.

  Yields:
    Nothing.
  """
  recorders, probing_state = _RECORDERS.set(()), _PROBING.set(None)
  try:
    yield
  finally:
    _PROBING.reset(probing_state)
    _RECORDERS.reset(recorders)


def probe(path: Sequence[str], rule: str, x_q: Any, state: Any = None) -> Any:
  """Called by every quantizer on its discrete output: ``x_q`` itself outside :func:`probing`.

  Args:
    path: the layer's module path plus the probe name.
    rule: the quantizer's backward rule.
    x_q: the discrete output (the [0, 1] value before the output map).
    state: the ``quant_state`` value the rule's factor was read from, if any.

  Returns:
    ``x_q``, plus the quantizer's probe in ``"add"`` mode.
  """
  active = _PROBING.get()
  return x_q if active is None else active.visit(path, rule, x_q, state)

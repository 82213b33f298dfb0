"""Names shared by the layers, the Hessian code, training and reporting, defined once.

The layers create variables under these names; the EWGS rule writes the deltas; the training
program labels the quantizer parameters for their own optimiser and reports them;
:mod:`ewgs_jax.reporting` plots the deltas. Each of them imports the names from here instead of
re-typing the strings. Plain Python, imports nothing.

A quantizer is identified by its *kind*: ``"w"`` (the kernel's quantizer) or ``"a"`` (the input
activation's). Its variables:

* learned parameters in ``params``: ``q_<kind>_<suffix>`` (``q_w_lower``, ``q_a_step``, ...) and the
  layer's output scale ``q_alpha``; everything starting with ``q_`` trains with the quantizer
  optimiser (:func:`is_quantizer_param`);
* the EWGS factor in ``quant_state``: ``delta_<kind>``;
* the name of the probe on its discrete output (:mod:`ewgs_jax.hooks`): ``<kind>_q``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

PARAMS = "params"
BATCH_STATS = "batch_stats"
QUANT_STATE = "quant_state"          # per-quantizer rule state (EWGS delta), written only by the rule's action

QUANTIZER_PARAM_PREFIX = "q_"
OUTPUT_SCALE = "q_alpha"             # the layer's learned output scale (EWGS Sec. 3.1)
KINDS = ("w", "a")                   # weight quantizer, activation quantizer


def quantizer_param(kind: str, suffix: str) -> str:
  """The ``params`` name of a quantizer's learned parameter.

  Args:
    kind: ``"w"`` or ``"a"``.
    suffix: the forward method's name for the parameter (``"lower"``, ``"clip"``, ``"step"``).

  Returns:
    ``"q_<kind>_<suffix>"``, e.g. ``"q_w_lower"``.
  """
  return f"{QUANTIZER_PARAM_PREFIX}{kind}_{suffix}"


def probe_name(kind: str) -> str:
  """The name of a quantizer's probe on its discrete output (the last entry of its probe path).

  Args:
    kind: ``"w"`` or ``"a"``.

  Returns:
    ``"<kind>_q"``.
  """
  return f"{kind}_q"


def delta_name(kind: str) -> str:
  """The ``quant_state`` name of a quantizer's EWGS delta.

  Args:
    kind: ``"w"`` or ``"a"``.

  Returns:
    ``"delta_<kind>"``.
  """
  return f"delta_{kind}"


DELTA_NAMES = tuple(delta_name(k) for k in KINDS)


def is_quantizer_param(path: Sequence[Any]) -> bool:
  """Whether a ``params`` leaf is a learned quantizer parameter.

  Args:
    path: the leaf's keys (strings or JAX key-path entries), outermost first.

  Returns:
    True when the leaf's name starts with ``q_``.
  """
  return bool(path) and path_keys(path[-1:])[0].startswith(QUANTIZER_PARAM_PREFIX)


def is_delta(name: str) -> bool:
  """Whether a ``quant_state`` leaf name is an EWGS delta.

  Args:
    name: a leaf name.

  Returns:
    True for ``delta_w`` and ``delta_a``.
  """
  return name in DELTA_NAMES


def path_keys(path: Iterable[Any]) -> tuple[str, ...]:
  """The plain string keys of a JAX key path (``DictKey``, ``GetAttrKey``, ``SequenceKey``) or strings.

  Args:
    path: a key path from ``jax.tree_util.tree_flatten_with_path`` or a sequence of strings.

  Returns:
    The keys as strings.
  """
  keys = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        p = getattr(p, attr)
        break
    keys.append(str(p))
  return tuple(keys)


def path_str(path: Iterable[Any]) -> str:
  """A key path as ``"stage1_block0/conv1/w_q"``.

  Args:
    path: a key path or a sequence of strings.

  Returns:
    The keys joined by ``/``.
  """
  return "/".join(path_keys(path))

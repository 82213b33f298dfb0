"""The task loss, defined once: training minimises it and the Hessian code differentiates it twice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
  """Softmax cross-entropy and accuracy of integer labels, in float32.

  Args:
    logits: ``[batch, classes]``.
    labels: ``[batch]`` integers.
    weights: optional ``[batch]`` mask (evaluation's padding).

  Returns:
    ``(mean loss, mean accuracy)`` without weights; ``(weighted loss sum, weighted correct count)``
    with them.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if weights is None:
    return losses.mean(), correct.mean()
  return (losses * weights).sum(), (correct * weights).sum()


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The training loss: the mean softmax cross-entropy (the ``task_loss`` of :mod:`ewgs_jax.hessian`).

  Args:
    logits: ``[batch, classes]``.
    labels: ``[batch]`` integers.

  Returns:
    A float32 scalar.
  """
  return cross_entropy(logits, labels)[0]

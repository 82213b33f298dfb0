"""The comparison's statistics: mean and sample standard deviation, and the paired t-test over seeds.

Runs of one seed share the warm start, the data order and the initialisation, so a rule's result and
the reference rule's result for the same seed are a pair; the test is on the per-seed differences.
"""

from __future__ import annotations

import math


def mean_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``n - 1``) of ``values``.

  Args:
    values: at least one number.

  Returns:
    ``(mean, sd)``; ``sd`` is NaN for a single value.
  """
  n = len(values)
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
  return mean, sd


def paired_test(values: list[float], baseline: list[float]) -> dict:
  """Mean difference, its 95 % t confidence interval, and the two-sided paired t-test p-value.

  Args:
    values: one rule's results, one per seed.
    baseline: the reference rule's results for the same seeds, in the same order.

  Returns:
    ``{"diff", "low", "high", "p", "n"}``: the mean of ``values - baseline``, its 95 % confidence
    interval, the p-value and the number of pairs (the interval and p are NaN below 2 pairs).
  """
  from scipy import stats
  diffs = [a - b for a, b in zip(values, baseline)]
  n = len(diffs)
  mean, sd = mean_sd(diffs)
  if n < 2:
    return {"diff": mean, "low": float("nan"), "high": float("nan"), "p": float("nan"), "n": n}
  se = sd / math.sqrt(n)
  half = stats.t.ppf(0.975, n - 1) * se
  p = 1.0 if se == 0 and mean == 0 else (0.0 if se == 0 else float(2 * stats.t.sf(abs(mean / se), n - 1)))
  return {"diff": mean, "low": mean - half, "high": mean + half, "p": p, "n": n}

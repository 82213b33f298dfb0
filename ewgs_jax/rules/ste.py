"""The straight-through estimator (EWGS Sec. 3.1; Bengio et al. 2013): ``dL/dx = dL/dx_q``.

No factor, no settings, no actions: the baseline every other rule is compared with.
"""

from ewgs_jax import estimators
from ewgs_jax.rules import base

RULE = base.register(base.Rule(
    "ste", estimators.ste,
    summary="straight-through estimator: the rounding's gradient is passed on unchanged"))

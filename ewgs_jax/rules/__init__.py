"""Backward rules: the contract (:mod:`ewgs_jax.rules.base`) and the rules the library ships.

Importing this package registers ``ste``, ``ewgs`` and ``pege``; a user's rule is one more module
calling :func:`register` (README, "Adding a backward rule").
"""

from ewgs_jax.rules.base import (  # noqa: F401 (the public contract)
    FACTOR_SOURCES, RULES, Action, ActionInput, Clock, Rule, RuleOptions, Setting, Trace, check_provided, get,
    metric_key, register, unregister)
from ewgs_jax.rules import ste, ewgs, pege  # noqa: F401,E402 (registration, in this order)

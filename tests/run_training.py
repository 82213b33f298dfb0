"""Runs a short quickstart training in a fresh process (for multi-device / multi-process tests).

Usage: python tests/run_training.py WORKDIR '{"config.key": value, ...}'
Prints the train losses (one per step) as a JSON line on stdout.
"""

import json
import sys

import jax
from absl import logging

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests.training_configs import small_config  # noqa: E402
from ewgs_jax import reporting, training  # noqa: E402

if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  config = small_config(overrides)
  summary = training.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    losses = [r["loss"] for r in reporting.read_metrics(f"{workdir}/metrics.jsonl") if r["split"] == "train"]
    print(json.dumps({"losses": losses, "final_test_accuracy": summary["final_test_accuracy"]}))

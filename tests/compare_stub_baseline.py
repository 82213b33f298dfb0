"""A stand-in baseline for tests/test_compare.py: a fixed accuracy, no model (the baseline hook, not PTQ)."""

ACCURACY = 0.5


def evaluate(fp_workdir, config):
  """A summary shaped like a training run's, as a baseline's ``evaluate`` returns.

  Args:
    fp_workdir: the full-precision run (only recorded).
    config: the resolved config of the row.

  Returns:
    The summary.
  """
  split = "validation" if config.validation_examples else "test"
  summary = {f"final_{split}_accuracy": ACCURACY, f"best_{split}_accuracy": ACCURACY, "final_test_accuracy": ACCURACY,
             "eval_split": split, "train_steps": 0, "epochs": 0.0, "wall_time_s": 0.0, "config": config.to_dict(),
             "stub_source": fp_workdir}
  return summary

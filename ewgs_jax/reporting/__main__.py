"""``python -m ewgs_jax.reporting table WORKDIR [WORKDIR ...]``: the results table of finished runs.

Prints the Markdown table (:func:`ewgs_jax.reporting.results_table`), then when, on what and with
which versions the runs were measured (:func:`ewgs_jax.reporting.provenance`). ``make train`` uses it.
"""

from __future__ import annotations

import sys

from ewgs_jax.reporting.tables import provenance, results_table

USAGE = "usage: python -m ewgs_jax.reporting table WORKDIR [WORKDIR ...]"


def main(argv: list[str]) -> int:
  """Runs the command line.

  Args:
    argv: the arguments after the program name.

  Returns:
    The exit status: 0, or 2 with the usage line on stderr for bad arguments.
  """
  if len(argv) < 2 or argv[0] != "table":
    print(USAGE, file=sys.stderr)
    return 2
  print(results_table(argv[1:]))
  print()
  print(provenance(argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

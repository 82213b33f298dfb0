"""A pytest plugin that appends every test outcome to a JSON-lines file as soon as it is known.

    REPORT_PYTEST_LOG=outcomes.jsonl python -m pytest -p pytest_outcomes ...   (benchmarks/ on PYTHONPATH)

Used by ``accelerator_report.py``: unlike ``--junitxml``, which is written only when pytest ends,
the lines survive a suite that is stopped at the report's time budget, so the outcomes so far (and
each failure's first line) are still counted. Under pytest-xdist only the controller writes (it
receives every worker's reports). Lines: ``{"collected": n}`` once, then ``{"nodeid", "when",
"outcome", "message", "seconds"}`` per setup/call/teardown phase that did not simply pass, and per
passed call.
"""

import json
import os

import pytest

ENV = "REPORT_PYTEST_LOG"
_state = {"file": None}


def _write(record: dict) -> None:
  if _state["file"] is not None:
    _state["file"].write(json.dumps(record) + "\n")
    _state["file"].flush()


def first_line(report) -> str:
  """The first informative line of a test report's failure or skip reason.

  Args:
    report: a pytest ``TestReport``.

  Returns:
    The crash message's first line (``AssertionError: ...``) where pytest has one, else the last
    line of the long representation, else ``""``.
  """
  longrepr = report.longrepr
  if longrepr is None:
    return ""
  if isinstance(longrepr, tuple) and len(longrepr) == 3:   # a skip: (file, line, reason)
    return str(longrepr[2]).splitlines()[0] if str(longrepr[2]) else ""
  crash = getattr(longrepr, "reprcrash", None)
  if crash is not None and getattr(crash, "message", None):
    return crash.message.strip().splitlines()[0]
  lines = [line for line in str(longrepr).splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("E ")]
  return (errors[0][1:].strip() if errors else lines[-1].strip()) if lines else ""


def pytest_configure(config):
  """Opens the outcome file in the controlling process (pytest hook).

  Args:
    config: pytest's config.
  """
  path = os.environ.get(ENV)
  if path and not hasattr(config, "workerinput"):   # xdist workers send their reports to the controller
    _state["file"] = open(path, "a")


def pytest_unconfigure(config):
  """Closes the outcome file (pytest hook).

  Args:
    config: pytest's config.
  """
  del config
  if _state["file"] is not None:
    _state["file"].close()
    _state["file"] = None


def pytest_collection_finish(session):
  """Records how many tests were collected, without xdist (pytest hook).

  Args:
    session: the pytest session.
  """
  if session.items:
    _write({"collected": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
  """Records how many tests were collected, with xdist (every worker collects the same ids).

  Args:
    node: the worker.
    ids: the collected test ids.
  """
  del node
  if not _state.get("collected"):
    _state["collected"] = True
    _write({"collected": len(ids)})


def pytest_runtest_logreport(report):
  """Appends one phase's outcome (pytest hook).

  Args:
    report: the phase's ``TestReport``.
  """
  outcome = report.outcome
  if hasattr(report, "wasxfail"):
    outcome = "xfailed" if report.skipped else "xpassed"
  if report.when == "call" or outcome != "passed":
    _write({"nodeid": report.nodeid, "when": report.when, "outcome": outcome, "message": first_line(report),
            "seconds": round(float(report.duration), 3)})
